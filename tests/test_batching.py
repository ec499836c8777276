"""Continuous batching: many requests decoded together, prefix reuse, admission limits, no cross-talk."""
from __future__ import annotations

import asyncio
import json
import threading
import time

import jsonschema
import polargrid
import pytest
from conftest import CHAT, chat_request

from polargrid_local import LocalEngine, PolarGrid


@pytest.fixture(scope="module")
def fresh(registry):
    engine = LocalEngine(registry, n_parallel=8, max_queue=8)
    yield engine
    engine.close()


def scheduler_of(engine):
    return engine.pool.worker(engine.registry.get(CHAT))[0].backend.scheduler


def run_threads(fn, args_list):
    errors: list[BaseException] = []

    def guarded(*args):
        try:
            fn(*args)
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=guarded, args=args) for args in args_list]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors


def test_temperature_zero_text_is_the_same_alone_or_among_seven_others(fresh):
    prompts = [f"Write a short sentence about the number {i}." for i in range(8)]
    alone = {p: fresh.chat_completion(chat_request(p, max_tokens=40)).choices[0].message.content for p in prompts}
    together: dict[str, str] = {}
    run_threads(lambda p: together.__setitem__(p, fresh.chat_completion(
        chat_request(p, max_tokens=40)).choices[0].message.content), [(p,) for p in prompts])
    assert together == alone


def test_requests_really_share_decode_steps(fresh):
    scheduler = scheduler_of(fresh)
    seen = []
    real_step = scheduler.step

    def watching_step():
        seen.append(scheduler.active)
        real_step()

    scheduler.step = watching_step
    try:
        run_threads(lambda i: fresh.chat_completion(chat_request(f"Tell a story about {i} cats.", max_tokens=30)),
                    [(i,) for i in range(6)])
    finally:
        del scheduler.step
    assert max(seen) >= 4, f"at most {max(seen)} requests were ever decoded together"


def test_mixed_sampling_settings_at_once_stay_valid(fresh):
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    tool = {"type": "function", "function": {"name": "add", "parameters": {
        "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["a", "b"]}}}
    solo_greedy = fresh.chat_completion(chat_request("Name a colour.", max_tokens=12)).choices[0].message.content
    results: dict[str, object] = {}

    def work(kind: str) -> None:
        if kind == "greedy":
            results[kind] = fresh.chat_completion(chat_request("Name a colour.", max_tokens=12))
        elif kind == "seeded":
            results[kind] = fresh.chat_completion(chat_request("Name a fish.", temperature=1.1, seed=9, top_k=20,
                                                               min_p=0.05, max_tokens=16))
        elif kind == "schema":
            results[kind] = fresh.chat_completion(chat_request("Give a number as JSON.", max_tokens=30,
                                                               response_format={"type": "json_schema",
                                                                                "json_schema": {"schema": schema}}))
        elif kind == "tool":
            results[kind] = fresh.chat_completion(chat_request("Add 2 and 3.", tools=[tool], tool_choice="required",
                                                               max_tokens=40))
        elif kind == "penalised":
            results[kind] = fresh.chat_completion(chat_request("Describe rain.", repetition_penalty=1.5,
                                                               presence_penalty=0.5, max_tokens=20))
        elif kind == "stream":
            results[kind] = "".join(c.choices[0].delta.content or "" for c in fresh.chat_completion_stream(
                chat_request("Name a colour.", max_tokens=12)) if c.choices)
        elif kind == "stopped":
            results[kind] = fresh.chat_completion(chat_request("Count from 1 to 20, separated by commas.",
                                                               stop=["5"], max_tokens=60))

    kinds = ["greedy", "seeded", "schema", "tool", "penalised", "stream", "stopped"]
    run_threads(work, [(k,) for k in kinds])
    assert results["greedy"].choices[0].message.content == solo_greedy == results["stream"]
    jsonschema.validate(json.loads(results["schema"].choices[0].message.content), schema)
    call = results["tool"].choices[0].message.tool_calls[0]
    assert call.function.name == "add" and set(json.loads(call.function.arguments)) == {"a", "b"}
    assert "5" not in results["stopped"].choices[0].message.content
    assert results["stopped"].choices[0].finish_reason == "stop"
    assert results["seeded"].choices[0].message.content and results["penalised"].choices[0].message.content


def test_abandoning_one_stream_leaves_the_others_running(fresh):
    scheduler = scheduler_of(fresh)
    streams = [fresh.completion_stream({"model": CHAT, "prompt": f"{i}, {i + 1}, {i + 2},", "max_tokens": 40,
                                        "temperature": 0}) for i in range(4)]
    for stream in streams:
        next(stream)
    streams[0].close()
    before = scheduler.tokens_generated
    texts = ["".join(c.choices[0].text for c in s if c.choices) for s in streams[1:]]
    assert all(texts)
    assert scheduler.tokens_generated - before <= 3 * 40
    deadline = time.monotonic() + 5
    while scheduler.busy and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not scheduler.busy


def test_second_turn_evaluates_only_its_new_tokens(fresh):
    scheduler = scheduler_of(fresh)
    system = {"role": "system", "content": "You are a patient tutor. " + "Explain things step by step. " * 40}
    turn1 = [system, {"role": "user", "content": "What is a prime number?"}]
    before = scheduler.prompt_tokens_evaluated
    first = fresh.chat_completion({"model": CHAT, "messages": turn1, "max_tokens": 24, "temperature": 0})
    evaluated_first = scheduler.prompt_tokens_evaluated - before
    assert evaluated_first > 0.9 * first.usage.prompt_tokens  # only the template's opening was cached
    turn2 = turn1 + [{"role": "assistant", "content": first.choices[0].message.content},
                     {"role": "user", "content": "And is 7 one?"}]
    before = scheduler.prompt_tokens_evaluated
    second = fresh.chat_completion({"model": CHAT, "messages": turn2, "max_tokens": 8, "temperature": 0})
    evaluated_second = scheduler.prompt_tokens_evaluated - before
    new_tokens = second.usage.prompt_tokens - first.usage.prompt_tokens - first.usage.completion_tokens
    assert evaluated_second <= new_tokens + 4, (evaluated_second, new_tokens)
    assert evaluated_second < 0.1 * second.usage.prompt_tokens
    other_user = [system, {"role": "user", "content": "What is a square number?"}]
    before = scheduler.prompt_tokens_evaluated
    fresh.chat_completion({"model": CHAT, "messages": other_user, "max_tokens": 4, "temperature": 0})
    assert scheduler.prompt_tokens_evaluated - before < 30, "the shared system prompt was evaluated again"


def test_long_prompts_are_prefilled_in_chunks_while_streams_flow(registry):
    engine = LocalEngine(registry, n_parallel=4)
    engine.pool.overrides["n_batch"] = 32
    try:
        runner = engine.completion_stream({"model": CHAT, "prompt": "1, 2, 3,", "max_tokens": 300, "temperature": 0})
        next(runner)
        long_prompt = "The history of the region is long and varied. " * 60
        arrived = []
        done = threading.Event()

        def long_request():
            engine.completion({"model": CHAT, "prompt": long_prompt, "max_tokens": 1})
            done.set()

        worker = threading.Thread(target=long_request)
        worker.start()
        for chunk in runner:
            if done.is_set():
                break
            arrived.append(chunk)
        runner.close()
        worker.join(60)
        assert len(arrived) >= 10, "the running stream stalled while a long prompt was prefilled"
    finally:
        engine.close()


def test_several_waiting_prompts_are_prefilled_in_small_chunks(registry):
    """README: when several prompts wait, a step prefills at most prefill_chunk of their tokens, so the first
    starts streaming while the others are still being read (instead of one 512-token step for all of them)."""
    engine = LocalEngine(registry, n_parallel=4)
    try:
        engine.completion({"model": CHAT, "prompt": "Hi", "max_tokens": 1})
        scheduler = scheduler_of(engine)
        gate, steps = threading.Event(), []
        real_step = scheduler.step

        def observed_step():  # the worker waits here until every request is queued: all arrive together
            gate.wait(60)
            waiting = sum(1 for s in scheduler.slots if s.job is not None and s.pending) + len(scheduler.waiting)
            before = scheduler.prompt_tokens_evaluated
            real_step()
            steps.append((waiting, scheduler.prompt_tokens_evaluated - before))

        scheduler.step = observed_step
        try:
            prompts = [f"Story {i}: " + "the river ran past the old mill and the children watched it. " * 12
                       for i in range(4)]
            streams = [engine.completion_stream({"model": CHAT, "prompt": p, "max_tokens": 2, "temperature": 0})
                       for p in prompts]
            gate.set()
            texts = ["".join(c.choices[0].text for c in stream if c.choices) for stream in streams]
        finally:
            gate.set()
            del scheduler.step
        assert all(texts)
        crowded = [evaluated for waiting, evaluated in steps if waiting >= 2]
        assert max(crowded, default=0) <= scheduler.prefill_chunk, \
            f"a step with several prompts waiting prefilled {max(crowded)} tokens: {steps}"
        assert len(crowded) >= 3, f"several prompts were never waiting at once: {steps}"
    finally:
        engine.close()


def test_a_full_queue_is_refused_with_retry_after(registry):
    engine = LocalEngine(registry, n_parallel=2, max_queue=2)
    try:
        streams = [engine.completion_stream({"model": CHAT, "prompt": "1, 2,", "max_tokens": 500}) for _ in range(4)]
        with pytest.raises(polargrid.RateLimitError) as info:
            engine.completion_stream({"model": CHAT, "prompt": "1, 2,", "max_tokens": 5})
        assert info.value.retry_after >= 1 and "queued" in str(info.value)
        for stream in streams:
            stream.close()
        deadline = time.monotonic() + 10
        while engine.pool.queue_depth(engine.registry.get(CHAT)) and time.monotonic() < deadline:
            time.sleep(0.01)
        reply = engine.chat_completion(chat_request(max_tokens=3))
        assert reply.usage.completion_tokens > 0 and reply.choices[0].message.content.strip()
    finally:
        engine.close()


def test_many_async_tasks_at_once(fresh):
    async def main():
        client = PolarGrid(engine=fresh)
        prompts = [f"Say the word number {i}." for i in range(12)]
        return await asyncio.gather(*(client.chat_completion(chat_request(p, max_tokens=10)) for p in prompts))

    replies = asyncio.run(main())
    assert len({r.id for r in replies}) == 12 and all(r.choices[0].message.content for r in replies)


def test_a_shared_system_prompt_is_copied_between_slots(registry):
    engine = LocalEngine(registry, n_parallel=4)
    try:
        system = {"role": "system", "content": "You answer questions about the weather. " * 25}
        busy = engine.chat_completion_stream({"model": CHAT, "max_tokens": 400, "temperature": 0, "messages": [
            system, {"role": "user", "content": "Write a very long essay about clouds."}]})
        next(busy)
        next(busy)
        scheduler = scheduler_of(engine)
        evaluated, borrowed = scheduler.prompt_tokens_evaluated, scheduler.prompt_tokens_borrowed
        reply = engine.chat_completion({"model": CHAT, "max_tokens": 12, "temperature": 0, "messages": [
            system, {"role": "user", "content": "Is it raining?"}]})
        assert scheduler.prompt_tokens_borrowed - borrowed > 150
        assert scheduler.prompt_tokens_evaluated - evaluated < 30
        assert reply.choices[0].message.content
        busy.close()
    finally:
        engine.close()


def test_queue_time_counts_the_wait_for_a_slot(registry):
    """Six requests, two slots: the four that wait for a slot report that wait as queue time, not inference."""
    engine = LocalEngine(registry, n_parallel=2, max_queue=8)
    try:
        engine.load_model({"model_name": CHAT})
        barrier = threading.Barrier(6)
        replies = []

        def ask(i):
            barrier.wait()
            replies.append(engine.completion({"model": CHAT, "prompt": f"{i}, {i + 1}, {i + 2},", "max_tokens": 24,
                                              "temperature": 0}))

        run_threads(ask, [(i,) for i in range(6)])
        meta = sorted((r.pg_metadata for r in replies), key=lambda m: m.queue_time_ms)
        first_two = min(m.inference_time_ms for m in meta[:2])
        waited = [m.queue_time_ms for m in meta[2:]]
        assert all(q >= 0.5 * first_two for q in waited), (waited, first_two)
        for m in meta:
            assert m.queue_time_ms + m.inference_time_ms <= m.latency_ms + 2
    finally:
        engine.close()


def test_every_prompt_of_a_completion_counts_against_the_queue(registry):
    engine = LocalEngine(registry, n_parallel=2, max_queue=2)
    try:
        three = engine.completion_stream({"model": CHAT, "prompt": ["1, 2,", "a, b,", "x, y,"], "max_tokens": 500})
        next(three)
        with pytest.raises(polargrid.RateLimitError):
            engine.completion_stream({"model": CHAT, "prompt": ["3, 4,", "c, d,"], "max_tokens": 5})
        with pytest.raises(polargrid.ValidationError) as info:   # more prompts than the model ever takes at once
            engine.completion_stream({"model": CHAT, "prompt": ["p,"] * 5, "max_tokens": 5})
        assert info.value.details["field"] == "prompt"
        one = engine.completion_stream({"model": CHAT, "prompt": "3, 4,", "max_tokens": 5})  # 3 + 1 fit
        three.close()
        assert "".join(c.choices[0].text for c in one if c.choices)
    finally:
        engine.close()


def test_the_prompt_list_is_capped(registry):
    from polargrid_local.limits import Limits

    engine = LocalEngine(registry, limits=Limits(max_prompts=4))
    try:
        with pytest.raises(polargrid.ValidationError) as info:
            engine.completion({"model": CHAT, "prompt": ["1, 2,"] * 5, "max_tokens": 2})
        assert "max_prompts" in str(info.value) and info.value.details["field"] == "prompt"
        reply = engine.completion({"model": CHAT, "prompt": ["1, 2,"] * 4, "max_tokens": 2})
        assert len(reply.choices) == 4
    finally:
        engine.close()
    from polargrid_local.limits import DEFAULT_LIMITS

    default = LocalEngine(registry)
    with pytest.raises(polargrid.ValidationError):
        default.completion_stream({"model": CHAT, "prompt": ["1,"] * (DEFAULT_LIMITS.max_prompts + 1)})
    default.close()
