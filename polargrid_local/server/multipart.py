"""multipart/form-data, parsed from a body already read and bounded in size."""
from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import invalid


@dataclass(frozen=True)
class Part:
    name: str
    data: bytes
    filename: str | None = None
    content_type: str | None = None


def _boundary(content_type: str) -> bytes:
    match = re.search(r'boundary="?([^";]+)"?', content_type or "")
    if not match:
        raise invalid("multipart/form-data request without a boundary")
    return match.group(1).encode("latin-1")


def parse_multipart(body: bytes, content_type: str) -> dict[str, Part]:
    """Fields by name; a malformed body is a ValidationError (HTTP 400)."""
    delimiter = b"--" + _boundary(content_type)
    if delimiter not in body:
        raise invalid("malformed multipart body: boundary not found")
    fields: dict[str, Part] = {}
    for chunk in body.split(delimiter)[1:]:
        if chunk.startswith(b"--"):
            break
        if chunk.startswith(b"\r\n"):
            chunk = chunk[2:]
        head, sep, data = chunk.partition(b"\r\n\r\n")
        if not sep:
            raise invalid("malformed multipart body: a part has no header end")
        if data.endswith(b"\r\n"):
            data = data[:-2]
        headers = {}
        for line in head.decode("utf-8", "replace").split("\r\n"):
            key, _, value = line.partition(":")
            headers[key.strip().lower()] = value.strip()
        disposition = headers.get("content-disposition", "")
        name = re.search(r'\bname="([^"]*)"', disposition)
        if not name:
            raise invalid("malformed multipart body: a part has no name")
        filename = re.search(r'filename="([^"]*)"', disposition)
        fields[name.group(1)] = Part(name.group(1), data, filename.group(1) if filename else None,
                                     headers.get("content-type"))
    return fields
