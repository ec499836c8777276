"""polargrid_local: the PolarGrid SDK's interface, served in-process by local engines."""
from ._version import __version__
from .client import PolarGrid, PolarGridSync
from .engine import LocalEngine
from .registry import ModelSpec, Registry
from .stream import Stream

__all__ = ["PolarGrid", "PolarGridSync", "LocalEngine", "Registry", "ModelSpec", "Stream", "__version__"]
