"""The runtime's parts on their own, on the fake engines and small stand-ins: worker, channel, scheduler, pool,
fallback. A fault in one of them fails a test here that names it, in well under a second each."""
from __future__ import annotations

import asyncio
import threading
import time

import polargrid
import pytest

from polargrid_local import LocalEngine
from polargrid_local.limits import Limits
from polargrid_local.llm.batching import BatchScheduler, PromptJob
from polargrid_local.llm.generation import SamplingParams, Started, TextDelta
from polargrid_local.runtime.channel import ResultStream, StreamCancelled
from polargrid_local.runtime.fallback import Router
from polargrid_local.runtime.interfaces import Job
from polargrid_local.runtime.worker import ModelWorker

# -- the channel ---------------------------------------------------------------------------------


def test_a_channel_hands_items_over_in_order_then_ends():
    channel: ResultStream[int] = ResultStream()
    threading.Thread(target=lambda: ([channel.push(i) for i in range(5)], channel.finish())).start()
    assert list(channel) == [0, 1, 2, 3, 4]
    assert list(channel) == []   # stays ended


def test_a_channel_ended_with_an_error_raises_it_after_its_items():
    channel: ResultStream[str] = ResultStream()
    channel.push("a")
    channel.finish(polargrid.ServerError("boom", 500))
    assert next(channel) == "a"
    with pytest.raises(polargrid.ServerError, match="boom"):
        next(channel)


def test_closing_a_channel_tells_its_producer_to_stop():
    channel: ResultStream[int] = ResultStream()
    channel.push(1)
    channel.close()
    assert channel.cancelled
    with pytest.raises(StreamCancelled):
        channel.push(2)


def test_an_abort_reaches_a_waiting_reader_at_once():
    channel: ResultStream[int] = ResultStream()
    threading.Timer(0.05, channel.abort, args=(polargrid.ServerError("unloaded", 503),)).start()
    started = time.monotonic()
    with pytest.raises(polargrid.ServerError, match="unloaded"):
        next(channel)
    assert time.monotonic() - started < 1.0 and channel.cancelled


def test_a_channel_past_its_deadline_ends_with_the_deadline_error_and_cancels():
    channel: ResultStream[int] = ResultStream(deadline=time.monotonic() + 0.1,
                                              on_deadline=lambda: polargrid.TimeoutError("too long"))
    with pytest.raises(polargrid.TimeoutError, match="too long"):
        next(channel)
    assert channel.cancelled


def test_a_waiting_reader_notices_that_its_producer_died():
    alive = [True]
    channel: ResultStream[int] = ResultStream(producer_alive=lambda: alive[0])
    threading.Timer(0.05, lambda: alive.__setitem__(0, False)).start()
    with pytest.raises(polargrid.ServerError) as info:
        next(channel)
    assert info.value.status_code == 503


def test_a_channel_reads_from_an_event_loop_without_blocking_it():
    channel: ResultStream[int] = ResultStream()

    async def read() -> tuple[list[int], int]:
        ticks = 0

        async def tick():
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0.01)

        ticker = asyncio.ensure_future(tick())
        threading.Timer(0.2, lambda: (channel.push(7), channel.finish())).start()
        items = [item async for item in channel]
        ticker.cancel()
        return items, ticks

    items, ticks = asyncio.run(read())
    assert items == [7] and ticks >= 10


# -- the worker ----------------------------------------------------------------------------------

class _Backend:
    def __init__(self) -> None:
        self.closed = threading.Event()

    def close(self) -> None:
        self.closed.set()


def _job(items, delay: float = 0.0, fail: BaseException | None = None) -> Job:
    def run(backend, ctx):
        for item in items:
            if ctx.cancelled:
                return
            time.sleep(delay)
            yield item
        if fail is not None:
            raise fail
    return Job(run)


def test_a_worker_runs_jobs_in_order_and_a_failing_job_fails_only_its_request():
    worker = ModelWorker("m", _Backend())
    try:
        first, _ = worker.submit(_job([1, 2]))
        broken, _ = worker.submit(_job([3], fail=RuntimeError("inside the job")))
        last, _ = worker.submit(_job([4]))
        assert list(first) == [1, 2]
        assert next(broken) == 3
        with pytest.raises(RuntimeError, match="inside the job"):
            next(broken)
        assert list(last) == [4]
    finally:
        worker.close()


def test_closing_a_worker_ends_running_and_queued_requests_and_frees_the_backend_on_its_thread():
    backend = _Backend()
    worker = ModelWorker("m", backend)
    running, _ = worker.submit(_job(range(1000), delay=0.01))
    queued, _ = worker.submit(_job([1]))
    assert next(running) == 0
    worker.close(polargrid.ServerError("model 'm' was unloaded", 503))
    for channel in (running, queued):
        with pytest.raises(polargrid.ServerError, match="unloaded"):
            list(channel)
    assert worker.wait_freed(5) and backend.closed.is_set()
    with pytest.raises(polargrid.ServerError, match="unloaded"):
        worker.submit(_job([1]))


def test_a_worker_times_a_request_out_at_the_limit():
    worker = ModelWorker("m", _Backend(), Limits(request_timeout_s=0.2))
    try:
        channel, _ = worker.submit(_job(range(1000), delay=0.05))
        with pytest.raises(polargrid.TimeoutError, match="request_timeout_s"):
            list(channel)
    finally:
        worker.close()


class _CountingScheduler:
    """A scheduler whose prompts never advance (every one waits on a paced source)."""

    def __init__(self) -> None:
        self.steps = 0
        self.prompts: list = []

    busy = property(lambda self: bool(self.prompts))
    active = property(lambda self: len(self.prompts))
    queued = 0

    def admit(self, prompt) -> None:
        self.prompts.append(prompt)

    def step(self) -> bool:
        self.steps += 1
        return False

    def fail_all(self, error) -> None:
        self.prompts.clear()

    def close(self, error=None) -> None:
        for prompt in self.prompts:
            prompt.finish(error)
        self.prompts.clear()


def test_a_worker_whose_prompts_all_wait_does_not_spin():
    backend = _Backend()
    backend.scheduler = _CountingScheduler()
    backend.n_parallel, backend.max_queue = 2, 2
    worker = ModelWorker("m", backend)
    try:
        worker.submit(Job(lambda b, ctx: [ctx.stream], batched=True))
        deadline = time.monotonic() + 30
        while not backend.scheduler.steps and time.monotonic() < deadline:   # admitted (a loaded machine is slow)
            time.sleep(0.01)
        first = backend.scheduler.steps
        time.sleep(0.5)
        steps = backend.scheduler.steps - first
        assert 1 <= steps <= 400, f"{steps} steps in 0.5 s"   # a spinning thread makes 100,000s
    finally:
        worker.close()


def test_a_worker_refuses_batched_work_past_its_queue():
    backend = _Backend()
    backend.scheduler = _CountingScheduler()
    backend.n_parallel, backend.max_queue = 1, 1
    worker = ModelWorker("m", backend)
    try:
        with pytest.raises(polargrid.ValidationError, match="at most 2"):
            worker.submit(Job(lambda b, ctx: [], cost=3, batched=True))
        worker.submit(Job(lambda b, ctx: [ctx.stream], cost=2, batched=True))
        with pytest.raises(polargrid.RateLimitError):
            worker.submit(Job(lambda b, ctx: [ctx.stream], batched=True))
    finally:
        worker.close()


# -- the scheduler over a decoder ----------------------------------------------------------------

class _Decoder:
    """Each sequence writes its words one per step; "WAIT" means no token yet (for ever), "PAUSE" no token at
    this step only, "FAIL" a sampler error."""

    def __init__(self) -> None:
        self.words = ["<end>"]

    def token(self, word: str) -> int:
        if word not in self.words:
            self.words.append(word)
        return self.words.index(word)

    def decode(self, entries) -> None:
        pass

    def sampler(self, params, tokens):
        return list(params.grammar)   # the words this sequence will write

    def sample(self, sampler, index):
        word = sampler.pop(0) if sampler else "<end>"
        if word == "WAIT":
            sampler.insert(0, "WAIT")
            return []
        if word == "PAUSE":
            return []
        if word == "FAIL":
            raise RuntimeError("this sequence's sampler failed")
        return [self.token(word)]

    def free_sampler(self, sampler) -> None:
        pass

    def is_end(self, token: int) -> bool:
        return token == 0

    def piece(self, token: int) -> bytes:
        return self.words[token].encode()

    def truncate(self, seq_id, start) -> bool:
        return True

    def clear(self, seq_id) -> None:
        pass

    def copy(self, source, target) -> None:
        pass

    def close(self) -> None:
        pass


def _prompt(words: list[str], max_tokens: int = 100, stops: tuple[str, ...] = ()) -> PromptJob:
    return PromptJob([1, 2, 3], SamplingParams(grammar=words), max_tokens, list(stops), ResultStream())


def _run(scheduler: BatchScheduler, steps: int = 20) -> None:
    for _ in range(steps):
        scheduler.step()


def _texts(job: PromptJob) -> tuple[str, str | None]:
    events = []
    while True:
        try:
            events.append(next(job.stream))
        except StopIteration:
            break
    assert isinstance(events[0], Started)
    deltas = [e for e in events if isinstance(e, TextDelta)]
    return "".join(d.text for d in deltas), deltas[-1].finish_reason


def test_the_scheduler_runs_sequences_side_by_side_with_stops_and_budgets():
    scheduler = BatchScheduler(_Decoder(), n_parallel=3, n_ctx_per_seq=64, n_batch=32)
    plain, cut, stopped = _prompt(["a", " b", " c"]), _prompt(["a", " b", " c"], max_tokens=2), \
        _prompt(["x", " y", " z"], stops=(" y",))
    for job in (plain, cut, stopped):
        scheduler.admit(job)
    _run(scheduler)
    assert _texts(plain) == ("a b c", "stop")
    assert _texts(cut) == ("a b", "length")
    assert _texts(stopped) == ("x", "stop")
    assert not scheduler.busy


def test_a_waiting_sequence_holds_no_one_up_and_a_failing_one_fails_alone():
    scheduler = BatchScheduler(_Decoder(), n_parallel=3, n_ctx_per_seq=64, n_batch=32)
    waiting, failing, fine = _prompt(["a", "WAIT"]), _prompt(["a", "FAIL"]), _prompt(["p", "PAUSE", " q"])
    for job in (waiting, failing, fine):
        scheduler.admit(job)
    _run(scheduler)
    assert _texts(fine) == ("p q", "stop")   # asked again after its pause
    with pytest.raises(RuntimeError, match="sampler failed"):
        _texts(failing)
    assert scheduler.active == 1 and not waiting.stream.done   # still waiting for its next token
    waiting.stream.close()
    _run(scheduler, 2)
    assert scheduler.active == 0


def test_more_prompts_than_slots_wait_their_turn():
    scheduler = BatchScheduler(_Decoder(), n_parallel=1, n_ctx_per_seq=64, n_batch=32)
    first, second = _prompt(["1"]), _prompt(["2"])
    scheduler.admit(first)
    scheduler.admit(second)
    scheduler.step()
    assert scheduler.active == 1 and scheduler.queued == 1
    _run(scheduler)
    assert _texts(first)[0] == "1" and _texts(second)[0] == "2"


# -- the pool, on the fakes ----------------------------------------------------------------------

def test_the_pool_loads_on_first_use_and_an_unload_ends_its_requests(tmp_path):
    engine = LocalEngine(fake=True, cache_dir=tmp_path)
    try:
        spec = engine.pool.resolve("gpt-4o-mini", "chat")
        assert engine.pool.state(spec) == "unloaded" and engine.pool.loadable(spec)
        engine.fake.chat.stall("hold")
        stream = engine.chat_completion_stream({"model": "gpt-4o-mini", "messages": [{"role": "user",
                                                                                      "content": "hold"}]})
        next(stream)
        assert engine.pool.state(spec) == "loaded" and engine.pool.usage_of(spec.id)["in_flight"] == 1
        report = engine.pool.unload(spec)
        assert report is not None and report.freed
        with pytest.raises(polargrid.ServerError) as info:
            list(stream)
        assert info.value.status_code == 503 and engine.pool.state(spec) == "unloaded"
        assert engine.pool.usage_of(spec.id)["in_flight"] == 0
    finally:
        engine.close()


def test_remote_entries_are_served_in_process_by_the_fakes_and_never_forwarded(tmp_path):
    models = tmp_path / "models.toml"
    models.write_text('[[models]]\nid = "far"\nkind = "chat"\n[models.remote]\n'
                      'base_url = "http://192.0.2.1:9/v1"\nmodel = "m"\n')
    engine = LocalEngine(models, fake=True, cache_dir=tmp_path)
    try:
        spec = engine.registry.get("far")
        assert not engine.pool.forwards(spec) and engine.reachability(spec) == "up"
        reply = engine.chat_completion({"model": "far", "messages": [{"role": "user", "content": "hi"}]})
        assert reply.choices[0].message.content and reply.pg_metadata.region == "local"
    finally:
        engine.close()


# -- fallback ------------------------------------------------------------------------------------

class _Registry:
    def __init__(self, *specs) -> None:
        self.specs = {s.id: s for s in specs}

    def get(self, name):
        return self.specs.get(name)


class _Spec:
    def __init__(self, model_id: str, fallback: tuple[str, ...] = ()) -> None:
        self.id, self.fallback, self.remote = model_id, fallback, None


def test_fallback_hands_a_request_on_only_when_the_model_cannot_take_it():
    first, second = _Spec("a", fallback=("b",)), _Spec("b")
    router = Router(_Registry(first, second))  # type: ignore[arg-type]
    tried = []

    def full_then_fine(spec):
        tried.append(spec.id)
        if spec.id == "a":
            raise polargrid.RateLimitError("a is full", retry_after=1)
        return "answered by b"

    assert router.run(first, full_then_fine) == "answered by b" and tried == ["a", "b"]

    def bad_request(spec):
        raise polargrid.ValidationError("messages is empty")

    with pytest.raises(polargrid.ValidationError):
        router.run(first, bad_request)   # the request is at fault: no fallback could do better

    def everyone_full(spec):
        raise polargrid.ServerError(f"{spec.id} is down", 503)

    with pytest.raises(polargrid.ServerError, match="a is down.*fallbacks failed too: b: b is down"):
        router.run(first, everyone_full)


# -- load settings: one source for memory admission and the factory -----------------------------

def test_memory_admission_estimates_exactly_what_the_factory_builds(registry, tmp_path):
    from conftest import CHAT

    from polargrid_local.runtime.memory import estimate
    from polargrid_local.testing import FakeScript
    from polargrid_local.testing.chat import FakeChatBackend

    built = []

    def chat_factory(spec, path, settings):
        built.append((path, settings))
        return FakeChatBackend(spec.id, FakeScript().chat, n_ctx=settings.n_ctx, n_parallel=settings.n_parallel)

    gguf = registry.get(CHAT).path_in(registry.cache_dir)
    models = tmp_path / "models.toml"
    models.write_text(f'[[models]]\nid = "sized"\nkind = "chat"\nlocal = "{gguf}"\n'
                      '[models.engine]\nn_ctx = 4096\nn_parallel = 4\n')
    engine = LocalEngine(models, factories={"chat": chat_factory}, n_ctx=1024, n_gpu_layers=0, cache_dir=tmp_path)
    try:
        spec = engine.registry.get("sized")
        engine.pool.worker(spec)
        (path, settings), = built
        assert (settings.n_ctx, settings.n_parallel, settings.max_queue) == (1024, 4, 64)   # the engine's n_ctx wins
        assert engine.pool.estimates[spec.id] == estimate(path, n_ctx=1024, n_parallel=4, n_batch=settings.n_batch,
                                                          n_gpu_layers=0)
    finally:
        engine.close()


def test_a_models_own_max_queue_of_zero_means_no_queue_but_an_engine_wide_zero_is_unset():
    from polargrid_local.runtime.settings import LoadSettings
    from polargrid_local.store.registry import ModelSpec

    spec = ModelSpec(id="m", kind="chat", engine={"max_queue": 0, "n_parallel": 2})
    assert LoadSettings.resolve(spec, {}).max_queue == 0
    assert LoadSettings.resolve(spec, {"max_queue": 0, "n_parallel": 0}).n_parallel == 2
    assert LoadSettings.resolve(spec, {"max_queue": 5, "n_ctx": None}).max_queue == 5
