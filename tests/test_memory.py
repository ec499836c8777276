"""Memory-aware loading on any machine: estimates from the GGUF header, refusal, eviction, budgets."""
from __future__ import annotations

import llama_cpp
import polargrid
import pytest
from conftest import CHAT, chat_request

from polargrid_local import LocalEngine
from polargrid_local.host.gpu import resident_bytes
from polargrid_local.runtime.memory import estimate, gguf_facts, gguf_metadata

MB = 1024 * 1024


def gguf_path(registry, name=CHAT):
    return str(registry.get(name).path_in(registry.cache_dir))


def test_gguf_header_reader_agrees_with_llama_cpp(registry):
    ours = gguf_metadata(gguf_path(registry))
    theirs = llama_cpp.Llama(gguf_path(registry), vocab_only=True, verbose=False).metadata
    for key in ("llama.block_count", "llama.embedding_length", "llama.attention.head_count_kv", "llama.vocab_size"):
        assert str(ours[key]) == theirs[key]
    assert gguf_facts(gguf_path(registry)) == {"n_layer": 30, "n_head_kv": 3, "head_dim": 64, "n_embd": 576,
                                               "n_vocab": 49152}


def test_estimate_is_close_to_what_loading_really_takes(registry):
    est = estimate(gguf_path(registry), n_ctx=2048, n_parallel=8)
    engine = LocalEngine(registry)
    try:
        before = resident_bytes()
        engine.chat_completion(chat_request(max_tokens=2))
        grown = resident_bytes() - before
        assert 0.6 * est.total < grown < 1.3 * est.total, (grown / MB, est.describe())
        status = engine.get_gpu_status()
        assert [m.model for m in status.models] == [CHAT] and status.models[0].estimated_mb == est.total // MB
    finally:
        engine.close()


def test_a_load_over_budget_is_refused_clearly_and_nothing_breaks(registry):
    engine = LocalEngine(registry, memory_budget_mb=200)
    try:
        with pytest.raises(polargrid.ServerError) as info:
            engine.chat_completion(chat_request(max_tokens=2))
        assert info.value.status_code == 507
        assert "memory budget of 200 MB" in str(info.value) and "KV cache" in str(info.value)
        assert engine.get_model_status().loading_status[CHAT] == "failed"
        small = LocalEngine(registry, memory_budget_mb=200, n_parallel=1, n_ctx=512)
        try:
            assert small.chat_completion(chat_request(max_tokens=2)).choices[0].message.content is not None
        finally:
            small.close()
        assert engine.embeddings({"model": "smollm2-135m-embed", "input": "still serving"}).data
    finally:
        engine.close()


def test_evict_policy_unloads_idle_models_to_make_room(registry):
    engine = LocalEngine(registry, memory_budget_mb=700, memory_policy="evict")
    try:
        engine.load_model({"model_name": "smollm2-135m-embed"})
        assert engine.get_model_status().loaded == ["smollm2-135m-embed"]
        engine.chat_completion(chat_request(max_tokens=2))
        loaded = engine.get_model_status().loaded
        assert CHAT in loaded
        second = LocalEngine(registry, memory_budget_mb=600, memory_policy="evict")
        try:
            second.load_model({"model_name": "smollm2-135m-embed"})
            second.chat_completion(chat_request(max_tokens=2))
            assert second.get_model_status().loaded == [CHAT], "the idle embedder was unloaded to fit the chat model"
        finally:
            second.close()
    finally:
        engine.close()


def test_unknown_policy_is_rejected(registry):
    with pytest.raises(ValueError, match="memory_policy"):
        LocalEngine(registry, memory_policy="pray")
