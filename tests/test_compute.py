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


def _native_thread_names() -> list[str]:
    """The OS names of the threads Python did not start (OpenMP's, onnxruntime's, CTranslate2's...)."""
    python = {t.native_id for t in threading.enumerate()}
    names = []
    for task in os.listdir("/proc/self/task"):
        if int(task) in python:
            continue
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
    import importlib

    import llama_cpp
    import llama_cpp.llama_cpp as low

    from polargrid_local import kernels

    resample_module = importlib.import_module("polargrid_local.kernels.resample")

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
    parallel_process = resample_module.Resampler.process

    def process(self, chunk):   # the kernel with a thread team (speech's); decoding runs a serial one
        if self._polyphase is resample_module._polyphase:
            seen["resample"].add(threading.get_ident())
        return parallel_process(self, chunk)

    monkeypatch.setattr(resample_module.Resampler, "process", process)
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


def test_decoding_audio_starts_no_thread_team_and_waits_for_no_model(speech_wav):
    """Audio is decoded (and resampled) before a request is queued, on the caller's thread: its kernel runs
    serially there, so it neither waits behind a model's work on the lane nor starts a team of its own."""
    from polargrid_local.audio.decode import decode_audio
    from polargrid_local.runtime.compute import set_native_name

    decoded, checked = threading.Event(), threading.Event()

    def decode():
        set_native_name("pg-decoder")
        decode_audio(speech_wav, 16000)   # our 24 kHz speech: resampled to 16 kHz
        decoded.set()
        checked.wait(30)   # alive while the threads are counted (a thread team ends with the thread)

    thread = threading.Thread(target=decode)
    thread.start()
    assert decoded.wait(60)
    names = _native_thread_names()
    checked.set()
    thread.join()
    assert "pg-decoder" not in names


def test_the_process_holds_one_openmp_team_not_one_per_model(registry, speech_wav):
    """A native thread takes the OS name of the thread that starts it. With every model computing on the lane,
    no model worker starts OpenMP threads of its own: the only OpenMP team is the lane's."""
    engine = LocalEngine(registry, n_threads=2)
    try:
        _work(engine, speech_wav)
        engine.completion({"model": CHAT, "prompt": "1, 2, 3,", "max_tokens": 4})
        names = _native_thread_names()
        assert len(engine.pool.loaded()) >= 4
        assert names.count(WORKER_NAME) == 0, "a model's worker thread started a thread team of its own"
        assert names.count(LANE_NAME) >= 1, "the lane's team"
    finally:
        engine.close()
