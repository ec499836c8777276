"""Engines still open when the interpreter exits are closed first, while the runtime is whole.

An application that forgets ``close()``, or exits in the middle of a stream, used to crash at exit (SIGSEGV or
abort) in every modality: the model threads were still inside llama.cpp, CTranslate2 or onnxruntime while the
interpreter tore its modules down, and the backends were freed by the garbage collector on the wrong thread.
``atexit`` callbacks run after non-daemon threads are joined and before any module is torn down; the one
registered here closes every engine still open, which stops each model's worker at its next step and has
that worker free its own backend before the callback returns (``Limits.unload_wait_s`` per model).
"""
from __future__ import annotations

import atexit
import logging
import threading
import weakref
from typing import Any

logger = logging.getLogger("polargrid_local")

_open: weakref.WeakSet[Any] = weakref.WeakSet()   # weak: an engine collected early is simply gone
_lock = threading.Lock()
_registered = False


def close_at_exit(engine: Any) -> None:
    """Close ``engine`` (anything with ``close()``) when the interpreter exits, unless it is closed before."""
    global _registered
    with _lock:
        _open.add(engine)
        if not _registered:
            atexit.register(close_open_engines)
            _registered = True


def forget(engine: Any) -> None:
    """``engine`` was closed: nothing to do for it at exit."""
    with _lock:
        _open.discard(engine)


def close_open_engines() -> None:
    """Close every engine still open (the atexit callback; safe to call at any time)."""
    with _lock:
        engines = list(_open)
        _open.clear()
    for engine in engines:
        try:
            engine.close()
        except Exception:  # one engine failing to close must not leave the others open at teardown
            logger.exception("closing an engine at exit failed")
