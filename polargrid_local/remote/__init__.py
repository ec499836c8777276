"""Remote models: OpenAI-compatible servers (vLLM, SGLang, llama.cpp's server, ...) behind the factories seam."""
from .backend import RemoteBackend, remote_factory
from .forward import Forward
from .probes import Reachability
from .worker import RemoteWorker

__all__ = ["Forward", "Reachability", "RemoteBackend", "RemoteWorker", "remote_factory"]
