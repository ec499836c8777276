"""Many models, one process: every heavy computation runs on the one compute lane, so the process holds one
OpenMP team for llama.cpp and numba instead of one per model thread (which made libgomp stop spinning and a
chat model decode at a third of its speed beside an idle embedding model). Timing-free: these tests look at
which thread did the work and which threads exist."""
from __future__ import annotations

import os
import threading
import time

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


def test_whisper_computes_on_the_speech_lane_while_llama_cpp_yields(registry, speech_wav):
    """CTranslate2's calls last up to seconds: they run on the speech lane (not the compute lane, where a chat
    model's steps would wait for each), and while one runs, llama.cpp's team yields (SpinYield's team exists)."""
    from polargrid_local.runtime.compute import SPEECH_LANE_NAME, speech_lane

    calls: list[tuple[int, list[str]]] = []

    class Recording:
        def __init__(self, target):
            self._target = target

        def __getattr__(self, name):
            value = getattr(self._target, name)
            if name in ("encode", "generate") and callable(value):
                def call(*args, **kwargs):
                    calls.append((threading.get_ident(), _native_thread_names()))
                    return value(*args, **kwargs)
                return call
            return value

    engine = LocalEngine(registry)
    try:
        engine.transcribe(speech_wav, {"model": "whisper-1", "language": "en"})   # loaded
        (spec,) = [s for s in engine.registry.models if s.id == engine.registry.get("whisper-1").id]
        lane_proxy = engine.pool._workers[spec.id].backend.model.model
        lane_proxy._target = Recording(lane_proxy._target)
        engine.transcribe(speech_wav, {"model": "whisper-1", "language": "en"})
    finally:
        engine.close()
    lane = speech_lane()
    assert isinstance(lane, ComputeLane) and lane.name == SPEECH_LANE_NAME
    assert calls and {ident for ident, _ in calls} == {lane.ident}, "CTranslate2 ran off the speech lane"
    assert all("pg-spin-yield" in names for _, names in calls), "llama.cpp's team did not yield during whisper"


def test_spin_yield_holds_a_team_only_while_entered():
    from polargrid_local.host.openmp import SpinYield

    hold = SpinYield()
    with hold:
        with hold:   # nested holds share the team
            inside = _native_thread_names()
        still = _native_thread_names()
    assert inside.count("pg-spin-yield") == 1 and still.count("pg-spin-yield") == 1
    # libgomp ends a team's threads when the thread that formed it exits (a thread-key destructor), just after the
    # join: the team's thread may take a moment to go (seen once in a full suite)
    deadline = time.monotonic() + 5
    while "pg-spin-yield" in _native_thread_names() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert "pg-spin-yield" not in _native_thread_names()


def test_ctranslate2_keeps_its_own_openmp_and_sleeps_at_its_barriers():
    """CTranslate2 brings its own libgomp: it must bind to it (not llama.cpp's, which its team would throttle)
    and that copy must read a passive wait policy, while the system's keeps the user's (active)."""
    import subprocess
    import sys

    code = ("import os, llama_cpp\nfrom polargrid_local.host.openmp import import_ctranslate2\nimport_ctranslate2()\n"
            "assert 'OMP_WAIT_POLICY' not in os.environ\n")
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    done = subprocess.run([sys.executable, "-c", code], env={**env, "LD_DEBUG": "bindings", "OMP_DISPLAY_ENV": "verbose"},
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    bindings = [line for line in done.stderr.splitlines() if "libctranslate2" in line and "`GOMP_parallel'" in line]
    assert bindings and all("ctranslate2.libs/libgomp" in line for line in bindings), bindings
    spins = [line.split("=")[1].strip() for line in done.stdout.splitlines() + done.stderr.splitlines()
             if line.strip().startswith("GOMP_SPINCOUNT")]
    assert spins == ["'300000'", "'0'"], spins   # the system's copy first (libgomp's default), then CTranslate2's
