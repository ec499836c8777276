"""The local HTTP facade: PolarGrid's REST API (OpenAI-compatible) over stdlib http.server."""
from .app import PolarGridHTTPServer, ServerConfig, make_server
from .drain import serve

__all__ = ["PolarGridHTTPServer", "ServerConfig", "make_server", "serve"]
