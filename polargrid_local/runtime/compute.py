"""One compute lane for the process: every heavy native computation runs on one thread, one at a time, each
with all the cores.

llama.cpp is built with OpenMP (GNU libgomp), whose speed on a small CPU comes from threads that spin at the
~900 barriers of a decode step instead of sleeping. libgomp keeps one thread team per thread that starts
parallel work, and once it manages more threads than there are cores it stops spinning and sleeps (a futex
wake per barrier): a chat model beside an idle embedding model, each driven from its own worker thread, then
decodes at a third of its speed, and numba's kernels (their 'omp' threading layer is the same libgomp) run
from any other thread do the same. Whisper (CTranslate2, its own libgomp) and piper (onnxruntime) bring
pools of their own that spin while they work. On the lane all of them start their work from one thread:
libgomp sees one team, which keeps spinning, and work of different models takes turns on the cores instead
of fighting over them (a decode step of one model, then a batch of another's embeddings, then a window of
speech). README "Many models, one process" has the measurements.

``POLARGRID_LOCAL_COMPUTE_LANE=0`` runs the work on each model's own thread again, for machines with cores
to spare for every pool at once.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import threading
from collections import deque
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

LANE_NAME = "pg-compute"
ENV = "POLARGRID_LOCAL_COMPUTE_LANE"


def set_native_name(name: str) -> None:
    """Name the calling thread for the OS (``ps -L``, /proc/self/task/*/comm); threads it starts (OpenMP's)
    inherit the name, which is how tests and operators tell whose pool a thread belongs to. Linux only."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(15, name.encode()[:15], 0, 0, 0)   # PR_SET_NAME
    except (OSError, AttributeError):   # pragma: no cover - another OS: the name is only a label
        pass


class _Task:
    __slots__ = ("fn", "args", "kwargs", "done", "result", "error")

    def __init__(self, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self.fn, self.args, self.kwargs = fn, args, kwargs
        self.done = threading.Event()
        self.result: Any = None
        self.error: BaseException | None = None


class ComputeLane:
    """A daemon thread that runs the calls handed to it, in the order they arrive; ``run`` waits for the result.

    A call made on the lane itself runs at once (no deadlock for nested calls)."""

    def __init__(self, name: str = LANE_NAME) -> None:
        self.name = name
        self._tasks: deque[_Task] = deque()
        self._ready = threading.Condition()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    @property
    def ident(self) -> int | None:
        """The lane thread's ``threading.get_ident()``."""
        return self._thread.ident

    def run(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        """``fn(*args, **kwargs)`` on the lane; its result, or its exception raised here."""
        if threading.get_ident() == self._thread.ident:
            return fn(*args, **kwargs)
        task = _Task(fn, args, kwargs)
        with self._ready:
            self._tasks.append(task)
            self._ready.notify()
        task.done.wait()
        if task.error is not None:
            raise task.error
        return task.result

    def _loop(self) -> None:
        set_native_name(self.name)
        while True:
            with self._ready:
                while not self._tasks:
                    self._ready.wait()
                task = self._tasks.popleft()
            try:
                task.result = task.fn(*task.args, **task.kwargs)
            except BaseException as exc:  # handed to the caller, never kills the lane
                task.error = exc
            task.done.set()


class _Direct:
    """No lane: each call runs on its caller's thread."""

    name = "direct"
    ident = None

    @staticmethod
    def run(fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        return fn(*args, **kwargs)


_lane: ComputeLane | _Direct | None = None
_lock = threading.Lock()


def compute_lane() -> ComputeLane | _Direct:
    """The process's lane (started on first use), or direct calls when ``POLARGRID_LOCAL_COMPUTE_LANE=0``."""
    global _lane
    if _lane is None:
        with _lock:
            if _lane is None:
                off = os.environ.get(ENV, "1").strip().lower() in ("0", "false", "off", "no")
                _lane = _Direct() if off else ComputeLane()
    return _lane


def on_lane(fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
    """``fn(*args, **kwargs)`` on the process's compute lane."""
    return compute_lane().run(fn, *args, **kwargs)


class OnLane:
    """A stand-in for an object whose methods do heavy native work (CTranslate2's Whisper, an onnxruntime
    session): each method call runs on the compute lane; attributes read through."""

    def __init__(self, target: Any, methods: tuple[str, ...]) -> None:
        self._target = target
        self._methods = frozenset(methods)

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._target, name)
        if name in self._methods and callable(value):
            return lambda *args, **kwargs: on_lane(value, *args, **kwargs)
        return value
