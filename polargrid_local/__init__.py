"""polargrid_local: the PolarGrid SDK's interface, served in-process by local engines."""
from ._version import __version__
from .client import PolarGrid, PolarGridSync
from .engine import LocalEngine
from .host import offline
from .limits import Limits
from .runtime.stream import Stream
from .store.registry import ModelSpec, Registry

__all__ = ["PolarGrid", "PolarGridSync", "LocalEngine", "Limits", "Registry", "ModelSpec", "Stream", "offline",
           "__version__"]
