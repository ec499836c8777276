"""Sampling knobs do what they say, on both generation paths (continuous batching, and one request at a time).

At temperature 1 with a seed, top_k=1, min_p=1 and a tiny top_p each leave one candidate, so the text must equal
greedy decoding; a knob that is ignored gives sampled text instead. Each penalty must make a repetitive answer
less repetitive, measured on the generated tokens, over a few seeds.
"""
from __future__ import annotations

import pytest
from conftest import CHAT, chat_request

from polargrid_local import LocalEngine

SEEDS = (1, 2)


@pytest.fixture(scope="module", params=["batched", "single"])
def engine(request, registry):
    engine = LocalEngine(registry, n_parallel=4 if request.param == "batched" else 1)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def tokenizer(registry):
    import llama_cpp

    spec = registry.get(CHAT)
    return llama_cpp.Llama(str(spec.path_in(registry.cache_dir)), vocab_only=True, verbose=False)


def text(engine, prompt: str, **extra) -> str:
    return engine.chat_completion(chat_request(prompt, **extra)).choices[0].message.content


@pytest.mark.parametrize("knob", [{"top_k": 1}, {"min_p": 1.0, "top_k": 0}, {"top_p": 1e-6, "top_k": 0}],
                         ids=["top_k", "min_p", "top_p"])
def test_a_knob_that_leaves_one_candidate_gives_greedy_text(engine, knob):
    greedy = text(engine, "Describe a forest.", max_tokens=12)
    sampled = [text(engine, "Describe a forest.", max_tokens=12, temperature=1.0, seed=s, **knob) for s in SEEDS]
    assert sampled == [greedy] * len(SEEDS)


def test_without_such_a_knob_temperature_one_samples(engine):
    """The control for the test above: the same request with nothing narrowing the candidates is not greedy."""
    greedy = text(engine, "Describe a forest.", max_tokens=12)
    sampled = [text(engine, "Describe a forest.", max_tokens=12, temperature=1.0, seed=s, top_k=0) for s in SEEDS]
    assert any(s != greedy for s in sampled)


def test_completions_take_min_p_and_repetition_penalty_too(engine):
    prompt = {"model": CHAT, "prompt": "The best thing about summer is", "max_tokens": 12}
    greedy = engine.completion({**prompt, "temperature": 0}).choices[0].text
    narrowed = [engine.completion({**prompt, "temperature": 1.0, "seed": s, "top_k": 0, "min_p": 1.0}).choices[0].text
                for s in SEEDS]
    assert narrowed == [greedy] * len(SEEDS)
    repetitive = {**prompt, "prompt": "apple, apple, apple, apple, apple, apple,", "temperature": 0}
    plain = engine.completion(repetitive).choices[0].text
    penalised = engine.completion({**repetitive, "repetition_penalty": 3.0}).choices[0].text
    assert plain.count("apple") > penalised.count("apple"), (plain, penalised)


def distinct_share(tokenizer, texts: list[str]) -> float:
    """Distinct tokens over generated tokens, summed over the texts (1.0: no token repeats)."""
    distinct = total = 0
    for t in texts:
        tokens = tokenizer.tokenize(t.encode(), add_bos=False, special=False)
        distinct, total = distinct + len(set(tokens)), total + len(tokens)
    return distinct / total


@pytest.mark.parametrize("penalty", [{"frequency_penalty": 1.5}, {"presence_penalty": 2.0},
                                     {"repetition_penalty": 1.3}], ids=lambda p: next(iter(p)))
def test_each_penalty_makes_a_repetitive_answer_less_repetitive(engine, tokenizer, penalty):
    prompt = "List twenty colours, separated by commas."
    plain = [text(engine, prompt, max_tokens=40, temperature=0.7, seed=s) for s in SEEDS]
    penalised = [text(engine, prompt, max_tokens=40, temperature=0.7, seed=s, **penalty) for s in SEEDS]
    before, after = distinct_share(tokenizer, plain), distinct_share(tokenizer, penalised)
    assert after > before + 0.05, f"distinct share {before:.2f} without the penalty, {after:.2f} with it"
