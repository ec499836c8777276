"""glibc's allocator, tamed for a long-running multi-threaded server.

glibc gives each thread that allocates concurrently an arena of its own (up to 8 per core), and each
arena keeps what it freed for reuse: a server whose handler threads come and go while native engines
allocate and free hundreds of MB holds on to that memory in many 64 MB heaps, so its RSS climbs for
a long time before it levels off. Capping the arenas and trimming after an unload keeps RSS near what
is in use. Both are no-ops where the C library is not glibc.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
from functools import lru_cache

logger = logging.getLogger("polargrid_local")

M_ARENA_MAX = -8  # mallopt parameter, from glibc's malloc.h


@lru_cache(maxsize=1)
def _libc():
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        return libc if libc is not None and hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


def limit_arenas(count: int) -> bool:
    """At most ``count`` malloc arenas from now on (as MALLOC_ARENA_MAX does); True if applied."""
    libc = _libc()
    if libc is None or count < 1:
        return False
    applied = bool(libc.mallopt(M_ARENA_MAX, int(count)))
    logger.debug("malloc arenas capped at %d: %s", count, applied)
    return applied


def trim() -> bool:
    """Hand memory that malloc holds free (in every arena) back to the system; True if any was."""
    libc = _libc()
    return bool(libc.malloc_trim(0)) if libc is not None else False
