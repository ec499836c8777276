"""The GPU path, on a CUDA device with a CUDA build of llama-cpp-python (skipped elsewhere).

Models: $PGL_GPU_MODEL_1B (a random-weight Llama GGUF, as ../shared/gpu/device.sh makes) or the
pulled SmolLM2.
"""
from __future__ import annotations

import os
import threading

import polargrid
import pytest

from polargrid_local import LocalEngine, Registry
from polargrid_local.host.gpu import NvmlProbe, cuda_build

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not (cuda_build() and NvmlProbe().device_count() > 0),
                                                  reason="needs a CUDA device and a CUDA build of llama-cpp-python")]
MB = 1024 * 1024


@pytest.fixture(scope="module")
def gpu_registry(tmp_path_factory):
    path = os.environ.get("PGL_GPU_MODEL_1B")
    if not path:
        reg = Registry.load()
        path = str(reg.get("smollm2").path_in(reg.cache_dir))
    toml = tmp_path_factory.mktemp("gpu") / "models.toml"
    toml.write_text(f'[[models]]\nid = "gpu-chat"\nkind = "chat"\nlocal = "{path}"\n'
                    f'[models.engine]\nn_ctx = 1024\nn_parallel = 8\n')
    return Registry.load(toml)


def request(i: int = 0, n: int = 16):
    return {"model": "gpu-chat", "prompt": f"{i}, {i + 1}, {i + 2},", "max_tokens": n, "temperature": 0}


def test_offload_generation_and_status(gpu_registry):
    engine = LocalEngine(gpu_registry)
    try:
        probe = engine.nvml
        before = probe.used_by_this_process()
        reply = engine.completion(request())
        assert reply.usage.completion_tokens > 0
        used = probe.used_by_this_process() - before
        weights = os.path.getsize(gpu_registry.get("gpu-chat").path_in(gpu_registry.cache_dir))
        assert used > 0.8 * weights, f"only {used / MB:.0f} MB on the GPU for {weights / MB:.0f} MB of weights"
        status = engine.get_gpu_status()
        assert status.total_gpus == probe.device_count() and status.gpus[0].memory.total_mb > 0
        assert status.models[0].measured_gpu_mb > 0.8 * weights / MB
        memory = engine.get_gpu_memory().memory[0]
        assert abs(memory.total_gb - probe.devices()[0].total_bytes / 1024 ** 3) < 0.05
    finally:
        engine.close()


def test_batched_streams_on_the_gpu(gpu_registry):
    engine = LocalEngine(gpu_registry)
    try:
        texts = {}
        threads = [threading.Thread(target=lambda i=i: texts.__setitem__(i, engine.completion(request(i * 10, 32))))
                   for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert len(texts) == 8 and all(r.usage.completion_tokens == 32 for r in texts.values())
    finally:
        engine.close()


def test_unload_and_purge_release_gpu_memory(gpu_registry):
    engine = LocalEngine(gpu_registry)
    try:
        engine.completion(request())
        message = engine.unload_model({"model_name": "gpu-chat"}).message
        assert "GPU memory" in message
        engine.completion(request())
        purge = engine.purge_gpu()
        assert purge.models_unloaded == ["gpu-chat"] and purge.memory_freed_gb > 0
        assert purge.memory_after.used_gb < purge.memory_before.used_gb
    finally:
        engine.close()


def test_admission_refuses_an_impossible_load(gpu_registry):
    free = NvmlProbe().devices()[0].free_bytes
    huge_ctx = int(free / MB) * 64  # KV cache far beyond the card
    engine = LocalEngine(gpu_registry, n_ctx=huge_ctx, n_parallel=1)
    try:
        with pytest.raises(polargrid.ServerError) as info:
            engine.completion(request())
        assert info.value.status_code == 507 and "GPU memory" in str(info.value)
    finally:
        engine.close()
