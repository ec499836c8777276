"""Strict request framing (RFC 9112): where a request ends is never a guess.

A server and a client (or a proxy) that disagree on where a body ends let one request hide inside another.
So a request line must be ``METHOD SP target SP HTTP/1.x``, header names must be tokens with no folded
values, ``Content-Length`` must be one run of digits given once, and ``Transfer-Encoding`` (which this
server does not take) is refused with the connection closed.
"""
from __future__ import annotations

import re
from email import errors as email_errors
from email.message import Message

from polargrid import errors as sdk

_TOKEN = r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_REQUEST_LINE = re.compile(rf"({_TOKEN}) ([^\s]+) HTTP/([0-9])\.([0-9])\r?\n")
_HEADER_NAME = re.compile(_TOKEN)
_DIGITS = re.compile(r"[0-9]+")
# What the stdlib's header parser notes when a line is not a header (it would quietly end the headers there).
_BROKEN_HEADERS = (email_errors.MissingHeaderBodySeparatorDefect, email_errors.FirstHeaderLineIsContinuationDefect)


class HttpRefusal(sdk.PolarGridError):
    """A request refused at the HTTP level (400, 408, 411, 413, 501, 503, 505), before any route runs."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status_code = status


def check_request_line(line: str) -> None:
    """Refuse anything but an HTTP/1.x request line (HTTP/0.9's ``GET /`` included)."""
    match = _REQUEST_LINE.fullmatch(line)
    if match is None:
        words = line.split()
        if len(words) == 2:
            raise HttpRefusal(400, "HTTP/0.9 requests are not supported; send an HTTP/1.1 request line")
        raise HttpRefusal(400, "malformed request line; expected 'METHOD /path HTTP/1.1'")
    if match.group(3) != "1":
        raise HttpRefusal(505, f"HTTP/{match.group(3)}.{match.group(4)} is not supported; use HTTP/1.1")


def check_headers(headers: Message) -> None:
    """Header names are tokens, values are not folded, and nothing follows the header block."""
    if any(isinstance(d, _BROKEN_HEADERS) for d in headers.defects):
        raise HttpRefusal(400, "malformed header block: every header line must be 'Name: value'")
    for name, value in headers.items():
        if not _HEADER_NAME.fullmatch(name):
            raise HttpRefusal(400, f"malformed header name {name!r}")
        if "\n" in value or "\r" in value:
            raise HttpRefusal(400, f"header {name} is folded over several lines; send it on one line")


def body_length(headers: Message, max_body: int) -> int:
    """The declared body length, after refusing every framing this server does not accept."""
    encodings = headers.get_all("Transfer-Encoding") or []
    lengths = headers.get_all("Content-Length") or []
    if encodings and lengths:
        raise HttpRefusal(400, "a request may not have both Transfer-Encoding and Content-Length")
    if encodings:
        coding = ",".join(encodings).strip().lower()
        if coding == "chunked":
            raise HttpRefusal(411, "chunked request bodies are not accepted; send Content-Length")
        raise HttpRefusal(501, f"Transfer-Encoding {coding!r} is not implemented; send Content-Length")
    if not lengths:
        return 0
    if len(lengths) > 1:
        raise HttpRefusal(400, "Content-Length is given more than once")
    value = lengths[0].strip(" \t")
    if not _DIGITS.fullmatch(value):
        raise HttpRefusal(400, f"Content-Length {value[:40]!r} is not a number of bytes")
    digits = value.lstrip("0") or "0"
    length = int(digits) if len(digits) <= 20 else max_body + 1  # no huge-int parsing for a silly header
    if length > max_body:
        raise HttpRefusal(413, f"request body of {value[:40]} bytes is over the {max_body} byte limit")
    return length
