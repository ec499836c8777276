"""Memory-aware loading on any machine: estimates from the GGUF header, refusal, eviction, budgets."""
from __future__ import annotations

import llama_cpp
import polargrid
import pytest
from conftest import CHAT, chat_request

from polargrid_local import LocalEngine, Registry
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


def test_loads_started_at_once_stay_within_the_budget(registry):
    """Issue 22 item 4: with a 490 MB budget, the chat model (~480 MB), the TTS voice (~120 MB) and the small
    embedder (~70 MB) loaded one after another refuse what does not fit, but three loads started at once all
    loaded (680 MB): each was admitted before any of the others counted."""
    import threading

    models = [CHAT, "piper-en_US-joe-medium", "all-minilm-l6-v2"]
    engine = LocalEngine(registry, memory_budget_mb=490)
    try:
        start = threading.Barrier(len(models))
        outcome: dict[str, object] = {}

        def load(name):
            start.wait()
            try:
                outcome[name] = engine.load_model({"model_name": name}).status
            except polargrid.ServerError as exc:
                outcome[name] = exc.status_code

        threads = [threading.Thread(target=load, args=(name,)) for name in models]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(300)
        loaded = engine.get_model_status().loaded
        held = sum(engine.pool.estimates[m].total for m in loaded)
        assert held <= 490 * MB, (outcome, loaded, held // MB)
        assert 507 in outcome.values(), outcome
        refused = [m for m, status in outcome.items() if status == 507]
        assert sorted(loaded + refused) == sorted(models)
        for name in loaded:   # what is reserved is released again on unload: a refused model now fits
            engine.unload_model({"model_name": name})
        assert not engine.pool.estimates
        engine.load_model({"model_name": refused[0]})
    finally:
        engine.close()


def test_a_failed_load_gives_back_its_reservation(registry, tmp_path):
    """A model whose load fails after admission must not keep holding budget it never used."""
    broken = tmp_path / "broken.gguf"
    good = registry.get(CHAT).path_in(registry.cache_dir)
    broken.write_bytes(good.read_bytes()[: 4 << 20])   # a real header, weights cut off: llama.cpp refuses it
    path = tmp_path / "models.toml"
    path.write_text(f'[[models]]\nid = "broken"\nkind = "embedding"\nlocal = "{broken}"\n'
                    f'[[models]]\nid = "small"\nkind = "embedding"\nlocal = "{good}"\n[models.engine]\nn_ctx = 256\n')
    engine = LocalEngine(Registry.load(path, cache_dir=tmp_path / "c", models_only=True), memory_budget_mb=400)
    try:
        for _ in range(3):
            with pytest.raises(polargrid.ServerError) as info:
                engine.load_model({"model_name": "broken"})
            assert info.value.status_code == 500, info.value
        assert engine.pool.estimates == {}
        engine.load_model({"model_name": "small"})
    finally:
        engine.close()
