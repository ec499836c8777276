"""Remote models: OpenAI-compatible servers (vLLM, SGLang, llama.cpp's server, ...) behind the factories seam."""
from .backend import RemoteBackend, remote_factory
from .service import RemoteService
from .worker import RemoteWorker

__all__ = ["RemoteBackend", "RemoteService", "RemoteWorker", "remote_factory"]
