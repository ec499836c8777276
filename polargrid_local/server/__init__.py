"""The local HTTP facade: PolarGrid's REST API (OpenAI-compatible) over stdlib http.server."""
from .app import PolarGridHTTPServer, ServerConfig, make_server, running
from .drain import serve

__all__ = ["PolarGridHTTPServer", "ServerConfig", "make_server", "running", "serve"]
