"""The contracts between the engine and its runtime: what a worker runs, what a stream reads, what a call is.

A request becomes a ``Call``. The engine asks the call to prepare itself for the side that serves the model
(``local``: a ``Job`` for a model's worker thread; ``remote``: a forwarded HTTP request for a remote worker),
submits the prepared work to the model's ``Worker``, and wraps the ``Channel`` it gets back in a ``Stream``,
which the ``Reader`` turns into what the caller reads and ``Prepared.fold`` folds into a whole response.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

T = TypeVar("T")
T_co = TypeVar("T_co", covariant=True)


class Channel(Protocol[T_co]):
    """Items of one request, produced elsewhere (a worker thread, a remote server), read by one reader.

    ``ResultStream`` (a worker pushes) and ``PulledStream`` (the reader pulls) implement it; ``Stream``
    reads nothing else."""

    @property
    def cancelled(self) -> bool:
        """True once the reader left, the engine aborted the request, or its time ran out."""

    @property
    def done(self) -> bool:
        """True once the channel has ended (its last item, or its error, is queued)."""

    def __next__(self) -> T_co:
        """The next item (blocking); StopIteration at the end; the request's error if it failed."""

    async def __anext__(self) -> T_co:
        """The next item without blocking an event loop."""

    def close(self) -> None:
        """The reader leaves: the producer stops at its next step."""

    def abort(self, error: BaseException) -> None:
        """The engine ends the request with ``error``: the reader sees it now."""

    def abandon(self) -> None:
        """close() for finalizers: takes no lock a running thread might hold."""


@dataclass
class JobContext:
    """What a running job can see: its timings and whether it should stop (reader left, unload, time limit)."""

    stream: Any   # the producer's end: a ResultStream a local job pushes to (PulledStream for a remote)
    submitted_at: float
    started_at: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def cancelled(self) -> bool:
        return self.stream.cancelled

    @property
    def queue_seconds(self) -> float:
        return max(0.0, self.started_at - self.submitted_at)

    def mark_started(self) -> None:
        """The job got the model (a batch slot, or the worker itself): queueing ends here."""
        if not self.started_at:
            self.started_at = time.perf_counter()


class Scheduler(Protocol):
    """A backend's batch scheduler: prompts admitted on the worker thread, advanced together one step at a time."""

    @property
    def busy(self) -> bool:
        """True while any prompt is running or waiting."""

    @property
    def active(self) -> int:
        """Prompts holding a slot."""

    @property
    def queued(self) -> int:
        """Prompts admitted, waiting for a slot."""

    def admit(self, prompt: Any) -> None:
        """Take a prepared prompt; it gets a slot at a coming step."""

    def step(self) -> bool:
        """Advance every running prompt once; False when none could (all of them wait on a paced source)."""

    def fail_all(self, error: BaseException) -> None:
        """End every running prompt with ``error`` (a failed step)."""

    def close(self, error: BaseException | None = None) -> None:
        """End everything with ``error`` and free the model context."""


@dataclass(frozen=True)
class Job:
    """Work for a model's worker thread: ``run(backend, ctx)``.

    A plain job returns an iterable whose items go to the caller's channel. A ``batched`` job runs on a
    backend with a scheduler: ``run`` prepares its prompts (template, tokens, checks) and returns them for
    the scheduler to admit; it counts ``cost`` prompts against the model's queue (n_parallel + max_queue).
    On a backend without a scheduler, a batched job's ``run`` yields results as a plain job does.
    """

    run: Callable[[Any, JobContext], Iterable[Any]]
    cost: int = 1
    batched: bool = False


class Worker(Protocol):
    """The owner of one loaded model: what the pool holds and the engine submits to."""

    name: str
    backend: Any
    region: str

    @property
    def alive(self) -> bool:
        """False once closed (or its thread died)."""

    @property
    def queue_depth(self) -> int:
        """Requests (prompts) queued or running on the model."""

    def submit(self, work: Any) -> tuple[Channel[Any], JobContext]:
        """Start ``work`` (prepared by a Call for this worker's side); the channel its results arrive on."""

    def close(self, reason: BaseException | None = None) -> None:
        """Refuse new work, end the requests in flight with ``reason``, free the backend when they stop."""

    def wait_freed(self, timeout: float) -> bool:
        """Wait until the backend is released; False if it is still in use."""


class Reader(Protocol):
    """Turns the items a worker produces into what the caller reads (for example events into SDK chunks)."""

    def feed(self, item: Any) -> list[Any]:
        """What the caller reads for one item (possibly nothing)."""


@dataclass
class Prepared:
    """A call made ready for one side: the work to submit, how its items are read and folded, request facts."""

    work: Any                                         # a Job (local) or a Forward (remote)
    reader: Any                                       # a Reader: worker items -> what the caller reads
    fold: Callable[[list[Any], Any], Any]             # (items read, pg_metadata) -> the whole response
    tokens: Callable[[], int] = lambda: 0             # tokens counted in usage when the request ends
    content_type: str | None = None                   # byte streams (speech): the MIME type
    tail: Callable[[], list[Any]] | None = None       # items appended after the last one (a done event)
    counted: bool = True                              # a request of its own in the usage report


class Call(Protocol):
    """One request, as either side of the pool can run it, and how its stream folds into a response."""

    what: str   # names the work in errors: "chat", "speech", "transcription", ...

    def local(self, model_id: str) -> Prepared:
        """Checked and prepared for a model's worker in this process (a Job)."""

    def remote(self) -> Prepared:
        """Prepared for a remote worker (a Forward: the request as the remote server takes it)."""
