"""OpenMP pools kept apart: a busy whisper and a decoding chat model share the cores instead of fighting.

llama.cpp (and numba's kernels) use the system's GNU libgomp, whose threads spin at each barrier: that spinning
is the speed of a decode on a small CPU (README, "Many models, one process"). CTranslate2 brings a copy of its
own (``ctranslate2.libs/libgomp-*.so``), which reads the same environment when it loads. Two teams that spin
at once on two cores wait at every barrier for threads the other team holds: measured, a chat model decoded
at 2.4 tokens/s while whisper transcribed. So CTranslate2's copy is loaded with ``OMP_WAIT_POLICY=PASSIVE``
and the system's is loaded first, with the environment as the user set it. A user who sets either variable
keeps it for both.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
import threading
from types import ModuleType
from typing import Any

_lock = threading.Lock()
SYSTEM_LIBGOMP = "libgomp.so.1"


def set_native_name(name: str) -> None:
    """Name the calling thread for the OS (``ps -L``, /proc/self/task/*/comm); threads it starts (OpenMP's)
    inherit the name, which is how tests and operators tell whose pool a thread belongs to. Linux only."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(15, name.encode()[:15], 0, 0, 0)   # PR_SET_NAME
    except (OSError, AttributeError):   # pragma: no cover - another OS: the name is only a label
        pass


def import_ctranslate2() -> ModuleType:
    """``import ctranslate2``, its OpenMP copy passive unless the user chose a wait policy or spin count."""
    with _lock:
        if "ctranslate2" in sys.modules:
            return sys.modules["ctranslate2"]
        try:   # the system libgomp reads the environment as it is, before we change it
            ctypes.CDLL(SYSTEM_LIBGOMP)   # RTLD_LOCAL: CTranslate2 must still bind to its own copy
        except OSError:   # no system libgomp (a build without OpenMP): nothing to keep apart
            pass
        chosen = "OMP_WAIT_POLICY" in os.environ or "GOMP_SPINCOUNT" in os.environ
        if not chosen:
            os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
        try:
            import ctranslate2
        finally:
            if not chosen:
                del os.environ["OMP_WAIT_POLICY"]
        return ctranslate2


class SpinYield:
    """While entered, llama.cpp's OpenMP threads sleep at their barriers instead of spinning.

    libgomp spins at a barrier only while it manages no more threads than there are cores
    (``gomp_throttled_spin_count`` otherwise: 100 spins, then a futex), and it checks at every wait. Entering
    starts a thread that forms a team of two in the system libgomp and keeps it (each thread of the team runs
    ``free(NULL)``: nothing), which takes the count past the cores; leaving ends that thread, which frees its
    team. Measured: a chat model decodes at 96-103 tokens/s, 35-36 while held, and at full speed again after.
    The speech lane holds it while CTranslate2 works, so a decoding chat model shares the cores with whisper
    instead of spinning against it. Nested and concurrent holds share one team.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._holders = 0
        self._release: threading.Event | None = None
        self._thread: threading.Thread | None = None
        self._parallel: Any = None
        try:
            gomp = ctypes.CDLL(SYSTEM_LIBGOMP)
            libc = ctypes.CDLL(None)
            gomp.GOMP_parallel.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint, ctypes.c_uint]
            gomp.GOMP_parallel.restype = None
            self._parallel = (gomp.GOMP_parallel, ctypes.cast(libc.free, ctypes.c_void_p))
        except (OSError, AttributeError):   # no system libgomp: no team spins, nothing to do
            pass

    def __enter__(self) -> SpinYield:
        with self._lock:
            self._holders += 1
            if self._holders == 1 and self._parallel is not None:
                self._release, formed = threading.Event(), threading.Event()
                self._thread = threading.Thread(target=self._hold, args=(self._release, formed),
                                                name="pg-spin-yield", daemon=True)
                self._thread.start()
                formed.wait()
        return self

    def __exit__(self, *exc_info: object) -> None:
        with self._lock:
            self._holders -= 1
            if self._holders == 0 and self._thread is not None:
                assert self._release is not None
                self._release.set()
                self._thread.join()
                self._thread = self._release = None

    def _hold(self, release: threading.Event, formed: threading.Event) -> None:
        set_native_name("pg-spin-yield")   # its team's thread takes the name
        parallel, noop = self._parallel
        try:
            parallel(noop, None, 2, 0)
        finally:
            formed.set()
        release.wait()
