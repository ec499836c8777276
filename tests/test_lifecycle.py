"""keep_alive (per engine, per model, per request, over HTTP), the reaper, LRU eviction across kinds, status."""
from __future__ import annotations

import json
import time
import urllib.request

import polargrid
import pytest
from conftest import CHAT, chat_request

from polargrid_local import LocalEngine, Registry
from polargrid_local.runtime.keep_alive import FOREVER, parse_keep_alive

EMBED, TTS = "smollm2-135m-embed", "piper-en_US-joe-medium"


def wait_unloaded(engine, model, timeout=30.0) -> float:
    started = time.monotonic()
    while model in engine.get_model_status().loaded:
        if time.monotonic() - started > timeout:
            raise AssertionError(f"{model} still loaded after {timeout}s")
        time.sleep(0.01)
    return time.monotonic() - started


@pytest.mark.parametrize("value, seconds", [(0, 0.0), (30, 30.0), ("45", 45.0), ("5m", 300.0), ("1h30m", 5400.0),
                                            ("250ms", 0.25), ("-1", FOREVER), (-1, FOREVER), ("-5m", FOREVER)])
def test_keep_alive_reads_like_ollama(value, seconds):
    assert parse_keep_alive(value) == seconds


@pytest.mark.parametrize("value", ["soon", "5 minutes", "", None, True, [1], "5m3"])
def test_bad_keep_alive_is_a_validation_error_naming_the_field(value):
    with pytest.raises(polargrid.ValidationError, match="keep_alive"):
        parse_keep_alive(value)


@pytest.mark.parametrize("value", [10 ** 400, 10 ** 30, float("inf"), "inf", "1e400", "99999999999d"],
                         ids=["10**400", "10**30", "float-inf", "inf", "1e400", "days"])
def test_a_huge_keep_alive_is_a_validation_error_not_an_overflow(value):
    """Issue 22 item 14: 10**400 raised OverflowError (a 500 over HTTP)."""
    with pytest.raises(polargrid.ValidationError, match="use -1") as info:
        parse_keep_alive(value)
    assert info.value.details == {"field": "keep_alive"}


@pytest.mark.parametrize("value", [-(10 ** 400), float("-inf"), "-1e400"], ids=["-10**400", "-inf", "-1e400"])
def test_a_huge_negative_keep_alive_is_forever(value):
    assert parse_keep_alive(value) == FOREVER


def test_a_huge_keep_alive_is_a_400_over_http_and_in_process(engine):
    from polargrid_local.server import running

    with pytest.raises(polargrid.ValidationError, match="keep_alive"):
        engine.embeddings({"model": EMBED, "input": "x", "keep_alive": 10 ** 400})
    with running(engine) as server:
        for path, body in (("/v1/embeddings", {"model": EMBED, "input": "x"}),
                           ("/v1/chat/completions", {"model": CHAT, "messages": [{"role": "user", "content": "x"}]})):
            data = json.dumps({**body, "keep_alive": 10 ** 400}).encode()
            request = urllib.request.Request(f"{server.url}{path}", data, {"Content-Type": "application/json"})
            with pytest.raises(urllib.error.HTTPError) as info:
                urllib.request.urlopen(request, timeout=60)
            assert info.value.code == 400, path
            assert json.loads(info.value.read())["error"]["param"] == "keep_alive"


def test_keep_alive_zero_in_a_request_unloads_when_done_and_status_shows_it(registry):
    engine = LocalEngine(registry)
    try:
        engine.chat_completion(chat_request(max_tokens=2))
        status = engine.get_model_status()
        assert isinstance(status, polargrid.types.ModelStatusResponse)
        (row,) = status.models
        assert row.model == CHAT and row.keep_alive_s is None and row.expires_in_s is None and row.memory_mb > 0
        engine.embeddings({"model": EMBED, "input": "bye", "keep_alive": 0})
        wait_unloaded(engine, EMBED, timeout=5)
        assert engine.get_model_status().loaded == [CHAT], "the chat model keeps the default: forever"
        stream = engine.chat_completion_stream(chat_request(max_tokens=64, keep_alive="0s"))
        next(iter(stream))
        stream.close()  # a reader that leaves counts as done
        wait_unloaded(engine, CHAT, timeout=10)
    finally:
        engine.close()


def test_an_idle_model_unloads_after_its_keep_alive_not_before(registry):
    engine = LocalEngine(registry, keep_alive="1s")
    try:
        engine.embeddings({"model": EMBED, "input": "hello"})
        row = engine.get_model_status().models[0]
        assert row.keep_alive_s == 1.0 and 0 < row.expires_in_s <= 1.0
        elapsed = wait_unloaded(engine, EMBED)
        assert elapsed > 0.5
        engine.embeddings({"model": EMBED, "input": "again", "keep_alive": -1})
        time.sleep(1.6)
        assert EMBED in engine.get_model_status().loaded, "keep_alive -1 keeps it"
    finally:
        engine.close()


def test_keep_alive_per_model_in_models_toml(registry, tmp_path):
    gguf = registry.get(CHAT).path_in(registry.cache_dir)
    path = tmp_path / "models.toml"
    path.write_text(f'[[models]]\nid = "brief"\nkind = "embedding"\nlocal = "{gguf}"\n'
                    f'[models.engine]\nkeep_alive = "300ms"\nn_ctx = 256\n')
    engine = LocalEngine(Registry.load(path, cache_dir=tmp_path / "c"))
    try:
        engine.embeddings({"model": "brief", "input": "x"})
        wait_unloaded(engine, "brief", timeout=10)
    finally:
        engine.close()


def test_keep_alive_is_accepted_over_http(registry):
    from polargrid_local.server import running

    engine = LocalEngine(registry)
    try:
        with running(engine) as server:
            body = json.dumps({"model": EMBED, "input": "over http", "keep_alive": 0}).encode()
            request = urllib.request.Request(f"{server.url}/v1/embeddings", body, {"Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=60) as response:
                assert json.load(response)["data"]
            wait_unloaded(engine, EMBED, timeout=5)
            bad = urllib.request.Request(f"{server.url}/v1/embeddings",
                                         json.dumps({"model": EMBED, "input": "x", "keep_alive": "later"}).encode(),
                                         {"Content-Type": "application/json"})
            with pytest.raises(urllib.error.HTTPError) as info:
                urllib.request.urlopen(bad, timeout=60)
            assert info.value.code == 400 and "keep_alive" in info.value.read().decode()
            with urllib.request.urlopen(f"{server.url}/v1/models/status", timeout=10) as response:
                assert "models" in json.load(response)
    finally:
        engine.close()


def test_one_budget_for_every_kind_evicts_the_least_recently_used_first(registry):
    engine = LocalEngine(registry, memory_budget_mb=700, memory_policy="evict")
    try:
        engine.load_model({"model_name": EMBED})
        engine.load_model({"model_name": TTS})
        assert engine.pool.estimates[TTS].total > 0, "speech models count against the budget too"
        engine.embeddings({"model": EMBED, "input": "recently used"})
        engine.chat_completion(chat_request(max_tokens=2))
        loaded = engine.get_model_status().loaded
        assert TTS not in loaded and EMBED in loaded and CHAT in loaded, loaded
    finally:
        engine.close()


def test_preload_from_settings(registry, tmp_path):
    path = tmp_path / "models.toml"
    path.write_text(f'[settings]\npreload = ["{EMBED}"]\n')
    engine = LocalEngine(Registry.load(path, cache_dir=registry.cache_dir))
    try:
        assert engine.get_model_status().loaded == [EMBED]
    finally:
        engine.close()
