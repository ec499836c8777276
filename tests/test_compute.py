"""Many models, one process: every heavy computation runs on the one compute lane, so the process holds one
OpenMP team for llama.cpp and numba instead of one per model thread (which made libgomp stop spinning and a
chat model decode at a third of its speed beside an idle embedding model). Timing-free: these tests look at
which thread did the work and which threads exist."""
from __future__ import annotations

import os
import threading

from conftest import CHAT, chat_request

from polargrid_local import LocalEngine
from polargrid_local.runtime.compute import LANE_NAME, ComputeLane, compute_lane
from polargrid_local.runtime.worker import WORKER_NAME

EMBED = "all-minilm-l6-v2"


def _thread_names() -> list[str]:
    names = []
    for task in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{task}/comm", encoding="utf-8") as f:
                names.append(f.read().strip())
        except OSError:   # the thread ended while we looked
            pass
    return names


def _work(engine, speech_wav) -> None:
    engine.chat_completion(chat_request(max_tokens=8))
    engine.embeddings({"model": EMBED, "input": ["one", "two"]})
    engine.text_to_speech({"model": "tts-1", "input": "Hello there.", "voice": "alloy", "response_format": "wav"})
    engine.transcribe(speech_wav, {"model": "whisper-1", "language": "en"})


def test_llama_cpp_and_the_numba_kernels_run_only_on_the_compute_lane(registry, speech_wav, monkeypatch):
    import llama_cpp
    import llama_cpp.llama_cpp as low

    from polargrid_local import kernels
    from polargrid_local.kernels import resample as resample_module

    lane = compute_lane()
    assert isinstance(lane, ComputeLane), "the lane is off (POLARGRID_LOCAL_COMPUTE_LANE=0?)"
    seen: dict[str, set[int]] = {"llama_decode": set(), "log_mel": set(), "resample": set()}

    def recorded(name, fn):
        def call(*args, **kwargs):
            seen[name].add(threading.get_ident())
            return fn(*args, **kwargs)
        return call

    monkeypatch.setattr(llama_cpp, "llama_decode", recorded("llama_decode", llama_cpp.llama_decode))
    monkeypatch.setattr(low, "llama_decode", recorded("llama_decode", low.llama_decode))
    monkeypatch.setattr(kernels, "log_mel_spectrogram", recorded("log_mel", kernels.log_mel_spectrogram))
    monkeypatch.setattr(resample_module.Resampler, "process",
                        recorded("resample", resample_module.Resampler.process))
    engine = LocalEngine(registry)
    plain = LocalEngine(registry, n_parallel=1)   # one request at a time: llama-cpp-python's own generate loop
    try:
        _work(engine, speech_wav)
        plain.chat_completion(chat_request(max_tokens=4))
    finally:
        engine.close()
        plain.close()
    assert all(seen.values()), seen
    assert seen == {name: {lane.ident} for name in seen}, "some computation ran off the lane"


def test_the_process_holds_one_openmp_team_not_one_per_model(registry, speech_wav):
    """OpenMP's threads take the OS name of the thread that starts them. With every model computing on the
    lane, no model worker starts any: each worker is one thread, and OpenMP's threads are the lane's."""
    before = _thread_names().count(WORKER_NAME)   # other engines' workers, in this test session
    engine = LocalEngine(registry, n_threads=2)
    try:
        _work(engine, speech_wav)
        engine.completion({"model": CHAT, "prompt": "1, 2, 3,", "max_tokens": 4})
        names = _thread_names()
        workers = len(engine.pool.loaded())
        assert workers >= 4
        assert names.count(WORKER_NAME) - before == workers, (names.count(WORKER_NAME), before, workers)
        assert names.count(LANE_NAME) >= 2, "the lane's team: the lane and at least one OpenMP thread"
    finally:
        engine.close()
