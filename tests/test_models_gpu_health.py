"""Model management, GPU facts, health, status and usage, answered by the real engine."""
from __future__ import annotations

import math
import re
import time

import polargrid
import pytest
from conftest import CHAT, QWEN, chat_request
from polargrid.types import (
    GPUMemoryResponse,
    GPUPurgeResponse,
    GPUStatusResponse,
    HealthResponse,
    ListModelsResponse,
    ModelInfo,
    SystemStatus,
    UsageResponse,
)

from polargrid_local import LocalEngine
from polargrid_local.host.gpu import NvmlProbe


@pytest.fixture()
def fresh(registry):
    engine = LocalEngine(registry)
    yield engine
    engine.close()


def test_list_models_covers_every_kind_with_types(client, registry):
    models = client.list_models()
    assert isinstance(models, ListModelsResponse)
    by_id = {m.id: m for m in models.data}
    for spec in registry.models:
        assert spec.id in by_id
        for alias in spec.aliases:
            assert by_id[alias].parent == spec.id and by_id[alias].root == spec.id
    assert by_id[CHAT].pg_model_type == "chat"
    assert by_id["smollm2-135m-embed"].pg_model_type == "embedding"
    assert "whisper-1" in by_id and "tts-1" in by_id
    assert by_id[CHAT].pg_regions == ["local"] and by_id[CHAT].pg_max_tokens == 2048


def test_get_model_by_id_and_alias(client):
    info = client.get_model("gpt-3.5-turbo")
    assert isinstance(info, ModelInfo) and info.id == "gpt-3.5-turbo" and info.root == QWEN
    assert client.get_model(CHAT).parent is None
    with pytest.raises(polargrid.NotFoundError):
        client.get_model("nope")
    with pytest.raises(polargrid.ValidationError):
        client.get_model("")


def test_load_unload_status_transitions_and_freed_memory(fresh):
    status = fresh.get_model_status()
    assert status.loading_status[CHAT] == "unloaded" and status.loaded == []
    loaded = fresh.load_model({"model_name": "smollm2"})
    assert loaded.status == "success" and loaded.model == CHAT and "loaded" in loaded.message
    assert fresh.get_model_status().loaded == [CHAT]
    again = fresh.load_model({"model_name": CHAT})
    assert "already loaded" in again.message
    reloaded = fresh.load_model({"model_name": CHAT, "force_reload": True})
    assert reloaded.force_reload and "loaded" in reloaded.message
    reply = fresh.chat_completion(chat_request(max_tokens=4))
    assert reply.pg_metadata.model_load_time_ms == 0
    unloaded = fresh.unload_model({"model_name": CHAT})
    assert unloaded.status == "success" and "freed" in unloaded.message and "MB" in unloaded.message
    assert fresh.get_model_status().loading_status[CHAT] == "unloaded"
    assert "was not loaded" in fresh.unload_model({"model_name": CHAT}).message
    first = fresh.chat_completion(chat_request(max_tokens=4))
    assert first.pg_metadata.model_load_time_ms > 0, "a request after unload loads the model again"
    with pytest.raises(polargrid.NotFoundError):
        fresh.load_model({"model_name": "nope"})
    with pytest.raises(polargrid.ValidationError):
        fresh.load_model({"force_reload": True})


def test_unload_all(fresh):
    fresh.load_model({"model_name": CHAT})
    fresh.load_model({"model_name": "text-embedding-3-small"})
    result = fresh.unload_all_models()
    assert result.status == "success" and result.total_unloaded == 2
    assert sorted(result.unloaded_models) == sorted([CHAT, "all-minilm-l6-v2"])
    assert fresh.get_model_status().loaded == []


def test_gpu_status_reports_what_nvml_sees(client):
    probe = NvmlProbe()
    status = client.get_gpu_status()
    assert isinstance(status, GPUStatusResponse)
    assert status.total_gpus == len(status.gpus) == probe.device_count()
    memory = client.get_gpu_memory()
    assert isinstance(memory, GPUMemoryResponse) and len(memory.memory) == probe.device_count()
    for gpu, simple in zip(status.gpus, memory.memory):
        assert gpu.memory.total_mb > 0 and math.isclose(simple.percent_used + simple.percent_free, 100, abs_tol=1)


def test_purge_unloads_and_reports(fresh, registry):
    fresh.chat_completion(chat_request(max_tokens=4))  # loaded and used: its weights and cache are resident
    deadline = time.monotonic() + 10
    while fresh.pool.queue_depth(registry.get(CHAT)) and time.monotonic() < deadline:
        time.sleep(0.01)  # the slot is released just after the reply's last chunk
    result = fresh.purge_gpu()
    assert isinstance(result, GPUPurgeResponse)
    assert result.status == "success" and result.models_unloaded == [CHAT]
    assert fresh.get_model_status().loaded == []
    action = next(action for action in result.actions if CHAT in action)
    freed_ram_mb = float(re.search(r"freed ([0-9.]+) MB of RAM", action).group(1))
    weights_mb = registry.get(CHAT).path_in(registry.cache_dir).stat().st_size / 2 ** 20
    assert freed_ram_mb > 0.5 * weights_mb, f"purge reports {freed_ram_mb} MB freed for {weights_mb:.0f} MB of weights"
    if NvmlProbe().device_count() == 0:
        assert "No GPU" in result.recommendation and "RAM was released" in result.recommendation
    else:
        assert result.memory_before.total_gb > 0 and result.memory_after.total_gb == result.memory_before.total_gb
    assert fresh.purge_gpu({"force": True}).actions == ["no models were loaded"]


def test_health_status_usage(fresh):
    health = fresh.health()
    assert isinstance(health, HealthResponse) and health.status == "healthy" and health.backend.healthy
    assert "llama-cpp-python" in health.runtime and "chat" in health.backend.info.extensions
    fresh.chat_completion(chat_request(max_tokens=5))
    status = fresh.get_status()
    assert isinstance(status, SystemStatus) and status.regions[0].region == "local"
    chat = next(m for m in status.regions[0].models if m.model_id == CHAT)
    assert chat.status == "available" and chat.instances == 1 and chat.avg_latency_ms > 0
    usage = fresh.get_usage()
    assert isinstance(usage, UsageResponse) and usage.usage.total_requests == 1
    assert usage.usage.by_model[0].model_id == CHAT and usage.usage.by_model[0].tokens > 5
    assert usage.usage.total_cost == 0
    with pytest.raises(polargrid.ValidationError):
        fresh.get_usage(start_date="yesterday")


def test_embeddings_are_normalised_and_meaningful(client):
    result = client.embeddings({"model": "text-embedding-3-small",
                                "input": ["The cat sat on the mat.", "A cat is sitting on a rug.",
                                          "Quarterly revenue grew by eight percent."]})
    vectors = [d.embedding for d in result.data]
    assert [d.index for d in result.data] == [0, 1, 2] and result.usage.prompt_tokens > 10
    assert all(math.isclose(sum(x * x for x in v), 1.0, rel_tol=1e-3) for v in vectors)
    dot = lambda a, b: sum(x * y for x, y in zip(a, b))  # noqa: E731
    assert dot(vectors[0], vectors[1]) > dot(vectors[0], vectors[2])
    single = client.embeddings({"model": "all-minilm-l6-v2", "input": "The cat sat on the mat."})
    assert single.data[0].embedding == pytest.approx(vectors[0], abs=1e-4)
    with pytest.raises(polargrid.ValidationError):
        client.embeddings({"model": "smollm2-135m-embed", "input": []})
    with pytest.raises(polargrid.NotFoundError):
        client.embeddings({"model": CHAT, "input": "x"})
