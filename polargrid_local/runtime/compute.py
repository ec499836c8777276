"""One compute lane for the process: every heavy native computation runs on one thread, one at a time, each
with all the cores.

llama.cpp is built with OpenMP (GNU libgomp), whose speed on a small CPU comes from threads that spin at the
~900 barriers of a decode step instead of sleeping. libgomp keeps one thread team per thread that starts
parallel work, and once it manages more threads than there are cores it stops spinning and sleeps (a futex
wake per barrier): a chat model beside an idle embedding model, each driven from its own worker thread, then
decodes at a third of its speed, and numba's kernels (their 'omp' threading layer is the same libgomp) run
from any other thread do the same. On the lane all of them start their work from one thread: libgomp sees
one team, which keeps spinning, and work of different models takes turns on the cores instead of fighting
over them (a decode step of one model, then a batch of another's embeddings, then a sentence of piper's
onnxruntime). Whisper (CTranslate2, its own copy of libgomp) computes on a lane of its own: its calls last
too long to take turns with decode steps (see ``speech_lane``). README "Many models, one process" has the
measurements.

``POLARGRID_LOCAL_COMPUTE_LANE=0`` runs the work on each model's own thread again, for machines with cores
to spare for every pool at once.
"""
from __future__ import annotations

import os
import threading
from collections import deque
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any, TypeVar

from ..host.openmp import set_native_name

T = TypeVar("T")

LANE_NAME = "pg-compute"
SPEECH_LANE_NAME = "pg-speech"
ENV = "POLARGRID_LOCAL_COMPUTE_LANE"


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

    def __init__(self, name: str = LANE_NAME, around: Callable[[], AbstractContextManager[Any]] | None = None) -> None:
        """``around``: a context each call runs in (the speech lane's SpinYield)."""
        self.name = name
        self._around = around or nullcontext
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
                with self._around():
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


_lanes: dict[str, ComputeLane | _Direct] = {}
_lock = threading.Lock()


def _lane_named(name: str, around: Callable[[], AbstractContextManager[Any]] | None = None
                ) -> ComputeLane | _Direct:
    lane = _lanes.get(name)
    if lane is None:
        with _lock:
            lane = _lanes.get(name)
            if lane is None:
                off = os.environ.get(ENV, "1").strip().lower() in ("0", "false", "off", "no")
                lane = _lanes[name] = _Direct() if off else ComputeLane(name, around)
    return lane


def compute_lane() -> ComputeLane | _Direct:
    """The process's lane (started on first use), or direct calls when ``POLARGRID_LOCAL_COMPUTE_LANE=0``."""
    return _lane_named(LANE_NAME)


def speech_lane() -> ComputeLane | _Direct:
    """The lane of CTranslate2 (whisper). Its calls last up to seconds (a window of audio): on the compute lane a
    decoding chat model would wait for each (measured: 0.7 tokens/s beside a transcription). So they run beside
    the compute lane, on one thread for every whisper model (CTranslate2's own copy of libgomp keeps one team),
    with that copy passive (host/openmp.py) and, while a call runs, llama.cpp's threads yielding too
    (SpinYield): two pools sleep at their barriers and share the cores, instead of one spinning against the
    other (2-60 tokens/s, from one run to the next)."""
    return _lane_named(SPEECH_LANE_NAME, _spin_yield)


def _spin_yield() -> AbstractContextManager[Any]:
    global _yield
    if _yield is None:
        from ..host.openmp import SpinYield

        _yield = SpinYield()
    return _yield


_yield: AbstractContextManager[Any] | None = None


def on_lane(fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
    """``fn(*args, **kwargs)`` on the process's compute lane."""
    return compute_lane().run(fn, *args, **kwargs)


class OnLane:
    """A stand-in for an object whose methods do heavy native work (CTranslate2's Whisper, an onnxruntime
    session): each method call runs on the compute lane; attributes read through."""

    def __init__(self, target: Any, methods: tuple[str, ...], lane: Callable[[], ComputeLane | _Direct] = compute_lane
                 ) -> None:
        self._target = target
        self._methods = frozenset(methods)
        self._lane = lane

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._target, name)
        if name in self._methods and callable(value):
            return lambda *args, **kwargs: self._lane().run(value, *args, **kwargs)
        return value
