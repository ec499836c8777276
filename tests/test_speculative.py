"""Speculative decoding on the real model (SmolLM2-135M): drafted tokens verified in the shared batch change
nothing in the output, at temperature 0 or with a seed, and are counted where users can see them.

Whether a step drafts is the cost model's call, learned from step times; on a machine shared with other work
those times are noise, and a test of the verify step must not depend on them. So these engines load the real
model with a steady cost model (one more token costs a tenth of a step) through the engine's factories; the
cost model itself is tested in test_drafting.py."""
from __future__ import annotations

import json
import math
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import polargrid
import pytest
from conftest import CHAT, MODELS_FILE

from polargrid_local import LocalEngine, Registry
from polargrid_local.runtime.factories import chat_factory, default_factories
from polargrid_local.server import running

PASSAGE = ("The committee met on Tuesday to review the budget. Members agreed that the library renovation should "
           "proceed, that the park lighting contract be renewed for two years, and that the school bus routes be "
           "reviewed before September. The chair thanked the volunteers who organised the spring fair.")
CODE = ("def total(items):\n    result = 0\n    for item in items:\n        result += item.price * item.quantity\n"
        "    return result\n")
# Completion prompts the model continues by copying (drafts accepted) or not (drafts rejected).
COPYING = [f"Text: {PASSAGE}\nThe same text again: The committee met",
           f"{CODE}\n# The same function, unchanged:\n{CODE[:20]}",
           "red, green, blue, red, green, blue, red, green, blue, red,",
           "Monday Tuesday Wednesday Thursday Friday Monday Tuesday"]
FREE = ["Once upon a time, in a small village by the sea,", "Photosynthesis is the process by which"]


class SteadyCosts:
    """A step of n tokens costs 1 + (n - 1) / 10 units, whatever the clock says."""

    def record(self, n: int, seconds: float) -> None:
        pass

    def cost(self, n: int) -> float:
        return 1.0 + 0.1 * (n - 1)


def steady_chat_factory(spec, path, settings):
    backend = chat_factory(spec, path, settings)
    drafting = getattr(getattr(backend, "scheduler", None), "drafting", None)
    if drafting is not None:
        drafting.costs = SteadyCosts()
    return backend


def steady_engine(registry: Registry, **settings) -> LocalEngine:
    return LocalEngine(registry, factories={**default_factories(), "chat": steady_chat_factory}, **settings)


@pytest.fixture(scope="module")
def spec_engine(registry):
    engine = steady_engine(registry, n_parallel=4)
    yield engine
    engine.close()


def scheduler_of(engine: LocalEngine):
    return engine.pool.worker(engine.registry.get(CHAT))[0].backend.scheduler


def complete(engine: LocalEngine, prompt: str, speculative: bool, **extra):
    """A greedy completion. Its seed changes nothing at temperature 0 but makes the engine evaluate the whole
    prompt (no prefix reuse): a prompt's last token evaluated alone rounds differently from one evaluated in
    a long prefill (llama.cpp's kernels), which would make two runs differ for a reason other than drafts."""
    request = {"model": CHAT, "prompt": prompt, "max_tokens": 40, "temperature": 0, "seed": 0,
               "speculative": speculative, **extra}
    return engine.completion(request)


def drafts_of(response) -> tuple[int, int]:
    """(accepted, rejected) drafted tokens of one response."""
    details = response.usage.completion_tokens_details
    return details.accepted_prediction_tokens, details.rejected_prediction_tokens


def test_greedy_text_is_the_same_with_and_without_drafts(spec_engine):
    accepted = rejected = 0
    for prompt in COPYING + FREE:
        plain = complete(spec_engine, prompt, False)
        drafted = complete(spec_engine, prompt, True)
        assert drafted.choices[0].text == plain.choices[0].text, prompt
        assert drafted.choices[0].finish_reason == plain.choices[0].finish_reason
        assert drafted.usage.completion_tokens == plain.usage.completion_tokens
        assert drafts_of(plain) == (0, 0)
        accepted += drafts_of(drafted)[0]
        rejected += drafts_of(drafted)[1]
    assert accepted > 30 and rejected > 0, (accepted, rejected)   # both ways of the verify step ran


def test_greedy_tokens_are_llama_cpp_greedy_samplers_tokens(spec_engine):
    """A greedy request reads its token as the logits' argmax (llm/decoder.py), not through llama.cpp's sampler
    chain: at every position the scheduler samples, drafted ones included, llama.cpp's greedy sampler agrees."""
    decoder = scheduler_of(spec_engine).decoder
    L = decoder.L
    greedy = L.llama_sampler_init_greedy()
    pairs: list[tuple[int, int]] = []
    real = decoder.sample

    def both(sampler, index):   # on the model's worker thread, where the batch's logits are
        tokens = real(sampler, index)
        if sampler.argmax:
            pairs.append((tokens[0], int(L.llama_sampler_sample(greedy, decoder.ctx, index))))
        return tokens

    decoder.sample = both
    try:
        for prompt in COPYING[:2] + FREE:
            complete(spec_engine, prompt, True)
    finally:
        del decoder.sample
        L.llama_sampler_free(greedy)
    assert len(pairs) > 100
    assert [ours for ours, _ in pairs] == [theirs for _, theirs in pairs]


def test_chat_keeps_its_text_and_reports_its_drafts(spec_engine):
    messages = [{"role": "user", "content": f"Repeat this text exactly:\n\n{PASSAGE}"}]
    answers = [spec_engine.chat_completion({"model": CHAT, "messages": messages, "max_tokens": 80, "temperature": 0,
                                            "seed": 0, "speculative": flag}) for flag in (False, True)]
    assert answers[1].choices[0].message.content == answers[0].choices[0].message.content
    assert drafts_of(answers[1])[0] > 0 and drafts_of(answers[0]) == (0, 0)
    dumped = answers[1].model_dump(mode="json")["usage"]["completion_tokens_details"]
    assert dumped["accepted_prediction_tokens"] > 0


@pytest.mark.parametrize("max_tokens", [7, 12, 23])
def test_max_tokens_ends_the_text_at_the_same_token(spec_engine, max_tokens):
    prompt = COPYING[0]
    plain = complete(spec_engine, prompt, False, max_tokens=max_tokens)
    drafted = complete(spec_engine, prompt, True, max_tokens=max_tokens)
    assert plain.choices[0].finish_reason == drafted.choices[0].finish_reason == "length"
    assert drafted.usage.completion_tokens == max_tokens
    assert drafted.choices[0].text == plain.choices[0].text


def test_stop_strings_inside_accepted_drafts_end_the_text_at_the_same_place(spec_engine):
    prompt = COPYING[0]
    full = complete(spec_engine, prompt, False, max_tokens=40).choices[0].text
    assert len(full) > 80
    stops = 0
    for start in range(20, 70, 12):   # stops that begin at several places, so some span a draft's tokens
        stop = full[start:start + 9]
        if full.find(stop) != start:
            continue
        plain = complete(spec_engine, prompt, False, max_tokens=40, stop=[stop])
        drafted = complete(spec_engine, prompt, True, max_tokens=40, stop=[stop])
        assert drafted.choices[0].text == plain.choices[0].text == full[:start]
        assert drafted.choices[0].finish_reason == "stop"
        assert drafted.usage.completion_tokens == plain.usage.completion_tokens
        stops += 1
    assert stops >= 3


def test_a_json_schema_request_drafts_under_its_grammar(spec_engine):
    record = {"name": "Alice Smith", "city": "Paris", "notes": "likes long walks along the river Seine"}
    schema = {"type": "object", "properties": {k: {"type": "string"} for k in record},
              "required": list(record), "additionalProperties": False}
    request = {"model": CHAT, "max_tokens": 60, "temperature": 0, "seed": 0,
               "messages": [{"role": "user", "content": f"Return this record as JSON: {json.dumps(record)}"}],
               "response_format": {"type": "json_schema", "json_schema": {"name": "record", "schema": schema}}}
    plain = spec_engine.chat_completion({**request, "speculative": False})
    drafted = spec_engine.chat_completion({**request, "speculative": True})
    text = drafted.choices[0].message.content
    assert text == plain.choices[0].message.content
    assert set(json.loads(text)) == set(record)       # the grammar held for every kept draft token
    assert drafts_of(drafted)[0] > 0


def test_a_tool_call_is_the_same_with_drafts(spec_engine):
    tool = {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                             "parameters": {"type": "object", "properties": {
                                                 "city": {"type": "string"}, "unit": {"type": "string"}},
                                                 "required": ["city", "unit"]}}}
    request = {"model": CHAT, "max_tokens": 60, "temperature": 0, "seed": 0, "tools": [tool],
               "tool_choice": "required",
               "messages": [{"role": "user", "content": "What is the weather in San Francisco, in celsius? "
                                                        "Call get_weather with city San Francisco, unit celsius."}]}
    plain = spec_engine.chat_completion({**request, "speculative": False})
    drafted = spec_engine.chat_completion({**request, "speculative": True})
    assert drafted.choices[0].message.tool_calls is not None
    calls = [(c.function.name, c.function.arguments) for c in drafted.choices[0].message.tool_calls]
    assert calls == [(c.function.name, c.function.arguments) for c in plain.choices[0].message.tool_calls]


def test_slots_with_and_without_drafts_side_by_side(spec_engine):
    short = [COPYING[2], COPYING[3]]   # short prompts: prefilled together, they are not cut into other chunks
    jobs = [(prompt, flag) for prompt in short for flag in (True, False)]
    alone = {prompt: complete(spec_engine, prompt, False).choices[0].text for prompt in short}
    together: dict[tuple[str, bool], object] = {}
    threads = [threading.Thread(target=lambda p=p, f=f: together.__setitem__((p, f), complete(spec_engine, p, f)))
               for p, f in jobs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)
    assert len(together) == len(jobs)
    for (prompt, flag), response in together.items():
        assert response.choices[0].text == alone[prompt], (prompt, flag)
        if not flag:
            assert drafts_of(response) == (0, 0)
    assert sum(drafts_of(together[(p, True)])[0] for p in short) > 0


def test_no_step_drafts_beside_a_prompt_chunk(spec_engine):
    """A step that carries a prompt chunk decodes the running sequences' next tokens but no drafts: the cost
    model knows decode steps only, and it learns from them only."""
    scheduler = scheduler_of(spec_engine)
    decoder, costs = scheduler.decoder, scheduler.drafting.costs
    steps: list[list] = []   # each decode: [entries, some sequence drafted, a prompt chunk rode along, timed]
    chunk = [0]
    real_plan, real_decode, real_record = scheduler._plan_drafts, decoder.decode, costs.record

    def plan(generating, prompt_tokens):
        chunk[0] = prompt_tokens
        real_plan(generating, prompt_tokens)

    def decode(entries):
        per_sequence = Counter(entry.seq_id for entry in entries if entry.logits)
        steps.append([len(entries), max(per_sequence.values(), default=0) > 1, chunk[0] > 0, False])
        real_decode(entries)

    def record(n, seconds):   # a step timed before this test wrapped decode (the one before) is not ours
        if steps:
            assert steps[-1][0] == n
            steps[-1][3] = True
        real_record(n, seconds)

    scheduler._plan_drafts, decoder.decode, costs.record = plan, decode, record
    try:
        copying = threading.Thread(target=complete, args=(spec_engine, COPYING[0], True), kwargs={"max_tokens": 80})
        copying.start()
        time.sleep(0.5)
        for prompt in (PASSAGE * 3, CODE * 4):
            complete(spec_engine, prompt, True, max_tokens=4)
        copying.join(300)
    finally:
        del scheduler._plan_drafts, decoder.decode, costs.record
    assert any(drafted for _, drafted, _, _ in steps) and any(prompt for _, _, prompt, _ in steps)
    assert not any(drafted and prompt for _, drafted, prompt, _ in steps)
    assert not any(timed for _, _, prompt, timed in steps if prompt)
    # the last step's time may be recorded after its request has ended (and this test has let go)
    assert all(timed for _, _, prompt, timed in steps[:-1] if not prompt)


def test_seeded_sampling_gives_the_same_text_with_drafts(spec_engine):
    for seed in range(3):
        texts = [complete(spec_engine, COPYING[2], flag, temperature=0.9, seed=seed, max_tokens=24).choices[0].text
                 for flag in (False, True)]
        assert texts[0] == texts[1], seed


def test_sampled_tokens_keep_their_distribution(spec_engine):
    """Different seeds on each side: continuations drafted and verified are distributed as continuations sampled
    one token at a time. The statistic is how many leading words a continuation shares with the greedy one (the
    copy the drafts propose); a chi-square test of homogeneity compares its counts."""
    sentence = "The committee met on Tuesday to review the budget. Members agreed that the library renovation "
    prompt = f"{sentence}should proceed. {sentence[:-len('library renovation ')]}library"
    greedy = complete(spec_engine, prompt, False, max_tokens=4).choices[0].text.split()
    runs = 120
    samples: dict[bool, Counter[int]] = {True: Counter(), False: Counter()}
    accepted = 0
    lock = threading.Lock()

    def sample(flag: bool, seeds: range) -> None:
        nonlocal accepted
        for seed in seeds:
            response = complete(spec_engine, prompt, flag, temperature=1.5, top_k=5, top_p=1.0, seed=seed,
                                max_tokens=4)
            words = response.choices[0].text.split()
            shared = next((i for i, (a, b) in enumerate(zip(words, greedy, strict=False)) if a != b),
                          min(len(words), len(greedy)))
            with lock:
                samples[flag][shared] += 1
                accepted += drafts_of(response)[0]

    for flag in (True, False):   # two at a time: a batch of two still drafts, and the test takes half as long
        first = 0 if flag else 10_000
        threads = [threading.Thread(target=sample, args=(flag, range(first + i, first + runs, 2))) for i in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(500)
    assert sum(samples[True].values()) == sum(samples[False].values()) == runs
    assert accepted > runs / 2, accepted   # most runs kept drafted tokens: the verify step was what sampled
    rows = [[samples[flag][k] for k in range(len(greedy) + 1)] for flag in (True, False)]
    while len(rows[0]) > 2 and min(a + b for a, b in zip(*rows, strict=True)) < 5:   # rare outcomes join a neighbour
        sums = [a + b for a, b in zip(*rows, strict=True)]
        i = sums.index(min(sums))
        j = i + 1 if i + 1 < len(sums) else i - 1
        for row in rows:
            row[min(i, j)] += row[max(i, j)]
            del row[max(i, j)]
    columns = [a + b for a, b in zip(*rows, strict=True)]
    chi2 = sum((rows[r][c] - columns[c] / 2) ** 2 / (columns[c] / 2) for r in range(2) for c in range(len(columns)))
    dof = len(columns) - 1
    assert dof >= 2 and min(columns) >= 5, samples   # several outcomes, each seen often enough for the test
    # upper 0.1% point of chi-square (Wilson-Hilferty): a failure here is a changed distribution, not chance
    limit = dof * (1 - 2 / (9 * dof) + 3.09 * math.sqrt(2 / (9 * dof))) ** 3
    assert chi2 < limit, (chi2, limit, samples)


def test_closing_a_stream_mid_draft_frees_its_slot_and_the_cache_stays_right(spec_engine):
    prompt = COPYING[0]
    expected = complete(spec_engine, prompt, False).choices[0].text
    scheduler = scheduler_of(spec_engine)
    for _ in range(2):
        stream = spec_engine.completion_stream({"model": CHAT, "prompt": prompt, "max_tokens": 400,
                                                "temperature": 0, "speculative": True})
        for _, _chunk in zip(range(4), stream, strict=False):
            pass
        stream.close()
        deadline = time.monotonic() + 30
        while scheduler.active and time.monotonic() < deadline:
            time.sleep(0.01)
        assert scheduler.active == 0
        generated = scheduler.tokens_generated
        time.sleep(0.2)
        assert scheduler.tokens_generated == generated   # nothing runs for the closed stream
        # the slot's cache (a prefix of this prompt) is reused by the next request: it must hold no draft's cells
        assert complete(spec_engine, prompt, True).choices[0].text == expected


def test_unloading_mid_draft_ends_the_stream_with_503_and_the_model_serves_again(registry):
    engine = steady_engine(registry, n_parallel=2)
    try:
        expected = complete(engine, COPYING[0], False, max_tokens=40).choices[0].text
        stream = engine.completion_stream({"model": CHAT, "prompt": COPYING[0], "max_tokens": 1500,
                                           "temperature": 0, "speculative": True})
        next(stream)
        scheduler = scheduler_of(engine)
        deadline = time.monotonic() + 60
        while scheduler.drafting.tokens_drafted == 0 and time.monotonic() < deadline:
            time.sleep(0.005)
        assert scheduler.drafting.tokens_drafted > 0
        engine.unload_model({"model_name": CHAT})
        with pytest.raises(polargrid.ServerError) as info:
            list(stream)
        assert info.value.status_code == 503
        assert complete(engine, COPYING[0], True, max_tokens=40).choices[0].text == expected
    finally:
        engine.close()


def test_status_reports_drafted_and_accepted_tokens(spec_engine):
    complete(spec_engine, COPYING[2], True)
    (status,) = [m for m in spec_engine.get_model_status().models if m.model == CHAT]
    stats = status.speculative
    assert stats is not None and stats.mode == "prompt-lookup"
    assert stats.drafted_tokens >= stats.accepted_tokens > 0
    assert stats.acceptance_rate == pytest.approx(stats.accepted_tokens / stats.drafted_tokens, abs=1e-3)
    drafting = scheduler_of(spec_engine).drafting   # the counters a metrics exporter reads
    assert (drafting.tokens_drafted, drafting.tokens_accepted) == (stats.drafted_tokens, stats.accepted_tokens)


def test_over_http_the_speculative_field_turns_drafting_off(spec_engine):
    with running(spec_engine) as server:
        bodies = [httpx.post(server.url + "/v1/completions", timeout=300, json={
            "model": CHAT, "prompt": COPYING[2], "max_tokens": 40, "temperature": 0, "seed": 0,
            "speculative": flag}).json()
            for flag in (True, False)]
        bad = httpx.post(server.url + "/v1/chat/completions", timeout=60, json={
            "model": CHAT, "messages": [{"role": "user", "content": "Hi"}], "speculative": "sometimes"})
    on, off = (body["usage"]["completion_tokens_details"] for body in bodies)
    assert on["accepted_prediction_tokens"] > 0
    assert off == {"accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0}
    assert bodies[0]["choices"][0]["text"] == bodies[1]["choices"][0]["text"]
    assert bad.status_code == 400 and "speculative" in bad.text


def _registry_with(tmp_path: Path, registry: Registry, engine_settings: str) -> Registry:
    path = registry.get(CHAT).path_in(registry.cache_dir)
    models = tmp_path / "models.toml"
    models.write_text(MODELS_FILE.read_text() + f'\n[[models]]\nid = "tuned"\nkind = "chat"\nlocal = "{path}"\n'
                      f"[models.engine]\n{engine_settings}\n")
    return Registry.load(models, registry.cache_dir)


def test_a_model_set_to_off_never_drafts(tmp_path, registry):
    engine = steady_engine(_registry_with(tmp_path, registry, 'speculative = "off"\nn_parallel = 2'))
    try:
        response = engine.completion({"model": "tuned", "prompt": COPYING[2], "max_tokens": 30, "temperature": 0})
        assert drafts_of(response) == (0, 0)
        (status,) = [m for m in engine.get_model_status().models if m.model == "tuned"]
        assert status.speculative is not None and status.speculative.mode == "off"
    finally:
        engine.close()


@pytest.mark.parametrize("mode, says", [("medusa", "speculative must be one of"),
                                         ("draft", "draft model is not offered")])   # measured not to pay
def test_a_mode_that_is_not_offered_is_refused_clearly(tmp_path, registry, mode, says):
    engine = LocalEngine(_registry_with(tmp_path, registry, f'speculative = "{mode}"'))
    try:
        with pytest.raises(polargrid.PolarGridError, match=says):
            engine.completion({"model": "tuned", "prompt": "Hi", "max_tokens": 3})
    finally:
        engine.close()


def test_with_exact_kernels_drafts_leave_a_greedy_answer_unchanged_on_the_default_model(tmp_path):
    """llama.cpp's repacked weights multiply several tokens with other kernels than one token; with
    POLARGRID_LOCAL_EXACT=1 they are off, and Qwen's free-text answer (where drafts are often rejected at near-ties)
    is the same, byte for byte, with drafts and without, and again on a reused prompt."""
    import os
    import subprocess
    import sys

    from conftest import QWEN

    code = f"""
import json
from polargrid_local import LocalEngine
from polargrid_local.host.llama_safety import extra_bufts_enabled
engine = LocalEngine(n_threads=2)
ask = {{"model": {QWEN!r}, "messages": [{{"role": "user", "content": "Explain how a bicycle stays upright."}}],
        "max_tokens": 96, "temperature": 0}}
texts, drafted = [], 0
for flag in (False, True, False, True):
    reply = engine.chat_completion({{**ask, "speculative": flag}})
    texts.append(reply.choices[0].message.content)
    details = reply.usage.completion_tokens_details
    drafted += details.accepted_prediction_tokens + details.rejected_prediction_tokens
engine.close()
print(json.dumps({{"texts": texts, "drafted": drafted, "repack": extra_bufts_enabled()}}))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "POLARGRID_LOCAL_EXACT": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got["repack"] is False
    assert got["drafted"] > 0, "no drafts were verified: the check proves nothing"
    assert len(set(got["texts"])) == 1, got["texts"]
