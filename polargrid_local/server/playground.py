"""The playground: a page at / to try the server in a browser (chat, speak, transcribe, models).

Static files shipped inside the package (server/playground/), no build step and nothing fetched from anywhere
else, so it works offline. The page calls the public API only, with the key the user types when the server
asks for one; a Content-Security-Policy keeps it to this origin (and blob: audio it made itself).
"""
from __future__ import annotations

import re
from importlib import resources
from typing import Any

from .app import Request, Response
from .routes import ROUTES

TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
         ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml"}
POLICY = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; media-src 'self' blob:; "
          "connect-src 'self'; form-action 'none'; frame-ancestors 'none'; base-uri 'none'")
NAME = re.compile(r"^[a-z][a-z0-9_-]*\.(html|js|css|svg)$")


def _file(name: str) -> bytes | None:
    if not NAME.match(name):
        return None
    try:
        return resources.files(__package__).joinpath("playground", name).read_bytes()
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return None


def _static(name: str) -> Response:
    from polargrid import errors as sdk

    data = _file(name)
    if data is None:
        raise sdk.NotFoundError(f"No playground file {name!r}")
    content_type = TYPES["." + name.rsplit(".", 1)[1]]
    return Response(200, data, content_type=content_type, headers={
        "Content-Security-Policy": POLICY, "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
        "Cache-Control": "no-cache"})


@ROUTES.add("GET", "/")
def page(engine: Any, request: Request) -> Response:
    return _static("index.html")


@ROUTES.add("GET", "/playground/(?P<name>[^/]+)")
def static_file(engine: Any, request: Request, name: str) -> Response:
    return _static(name)
