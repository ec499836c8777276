"""The prompt cache (README, "Prompt cache"): processed prompts' KV states saved on disk, restored by prefix in
this process or the next, bounded, pinned, and safe against bad files. Real SmolLM2 throughout."""
from __future__ import annotations

import asyncio
import errno
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import polargrid
import pytest
from conftest import CHAT, ROOT

from polargrid_local import LocalEngine, PolarGrid, PolarGridSync
from polargrid_local.llm import prompt_files
from polargrid_local.llm.prompt_cache import store_for

SYSTEM = ("You are the help desk of a small public library in a river town. "
          + "Answer in one short sentence and always name the shelf. " * 9)
QUESTION = "Where are the atlases?"
CHAT_REQUEST = {"model": CHAT, "max_tokens": 16, "temperature": 0,
                "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTION}]}
COMPLETION_REQUEST = {"model": CHAT, "max_tokens": 16, "temperature": 0,
                      "prompt": f"{SYSTEM}\nQuestion: {QUESTION}\nAnswer:"}
MIN_TOKENS = 64   # the prompts here are ~140 tokens: long enough to save, short enough for a shared 2-core box
THREADS = 1       # kind to the other users of a shared 2-core box (OpenMP's barriers stall when cores are taken)


def engine_on(registry, folder: Path, **options) -> LocalEngine:
    return LocalEngine(registry, **{"prompt_cache_dir": folder, "prompt_cache_min_tokens": MIN_TOKENS,
                                    "n_threads": THREADS, **options})


def texts(engine: LocalEngine) -> tuple:
    chat = engine.chat_completion(CHAT_REQUEST)
    completion = engine.completion(COMPLETION_REQUEST)
    return chat, completion


def entries(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob(f"*{prompt_files.SUFFIX}") if not p.name.startswith("."))


def temporaries(folder: Path) -> list[Path]:
    return sorted(folder.rglob(".tmp-*"))


@pytest.fixture(scope="module")
def reference(registry):
    """The greedy texts with the prompt cache off."""
    engine = LocalEngine(registry, prompt_cache=False, n_threads=THREADS)
    try:
        chat, completion = texts(engine)
        return chat.choices[0].message.content, completion.choices[0].text
    finally:
        engine.close()


@pytest.fixture(scope="module")
def saved(registry, tmp_path_factory):
    """A cache folder where a first engine saved the chat's and the completion's prompts: (folder, chat file,
    completion file)."""
    folder = tmp_path_factory.mktemp("saved")
    engine = engine_on(registry, folder)
    try:
        chat = engine.chat_completion(CHAT_REQUEST)
        assert chat.pg_metadata.prompt_cache != "disk"
        engine.close()   # waits for the save
        chat_file = entries(folder)
        engine = engine_on(registry, folder)
        engine.completion(COMPLETION_REQUEST)
    finally:
        engine.close()
    assert len(chat_file) == 1 and len(entries(folder)) == 2, entries(folder)
    completion_file = next(p for p in entries(folder) if p != chat_file[0])
    return folder, chat_file[0].relative_to(folder), completion_file.relative_to(folder)


@pytest.fixture
def copy_of(saved, tmp_path):
    """A fresh copy of the saved folder for one test to use (and damage)."""
    folder, chat_file, completion_file = saved
    target = tmp_path / "cache"
    shutil.copytree(folder, target)
    return target, target / chat_file, target / completion_file


# -- the same answers ----------------------------------------------------------------------------

def test_greedy_text_is_the_same_with_the_cache_off_and_restored_from_disk(registry, reference, copy_of):
    folder, chat_file, _ = copy_of
    engine = engine_on(registry, folder)
    try:
        chat, completion = texts(engine)
    finally:
        engine.close()
    assert (chat.choices[0].message.content, completion.choices[0].text) == reference
    for reply in (chat, completion):
        assert reply.pg_metadata.prompt_cache == "disk"
        cached = reply.usage.prompt_tokens_details.cached_tokens
        assert reply.usage.prompt_tokens == cached, "the whole prompt was restored, its first token from saved logits"
    assert json.loads(chat.model_dump_json())["usage"]["prompt_tokens_details"]["cached_tokens"] > 100
    assert json.loads(chat.model_dump_json())["pg_metadata"]["prompt_cache"] == "disk"


def test_restoring_into_one_sequence_while_others_decode_gives_the_same_text(registry, reference, copy_of):
    folder, _, _ = copy_of
    engine = engine_on(registry, folder)
    try:
        busy = engine.completion_stream({"model": CHAT, "prompt": "1, 2, 3,", "max_tokens": 300, "temperature": 0})
        next(busy)
        results: dict[str, object] = {}

        def ask(kind: str) -> None:
            results[kind] = (engine.chat_completion(CHAT_REQUEST) if kind == "chat"
                             else engine.completion(COMPLETION_REQUEST))

        threads = [threading.Thread(target=ask, args=(kind,)) for kind in ("chat", "completion")]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(300)
        after = [chunk for _, chunk in zip(range(3), busy, strict=False)]
        busy.close()
    finally:
        engine.close()
    chat, completion = results["chat"], results["completion"]
    assert (chat.choices[0].message.content, completion.choices[0].text) == reference
    assert chat.pg_metadata.prompt_cache == completion.pg_metadata.prompt_cache == "disk"
    assert len(after) == 3, "the running stream stopped"


def test_a_longer_prompt_restores_the_saved_prefix_and_processes_only_the_rest(registry, copy_of):
    folder, _, _ = copy_of
    longer = {**CHAT_REQUEST, "messages": CHAT_REQUEST["messages"] + [
        {"role": "assistant", "content": "On shelf B."}, {"role": "user", "content": "And the poetry?"}]}
    engine = engine_on(registry, folder)
    try:
        reply = engine.chat_completion(longer)
        scheduler = engine.pool.worker(engine.registry.get(CHAT))[0].backend.scheduler
        evaluated = scheduler.prompt_tokens_evaluated
    finally:
        engine.close()
    cached = reply.usage.prompt_tokens_details.cached_tokens
    assert reply.pg_metadata.prompt_cache == "disk" and cached > 100
    assert evaluated == reply.usage.prompt_tokens - cached


# -- across processes --------------------------------------------------------------------------

CHILD = """
import json, sys
from polargrid_local import LocalEngine
engine = LocalEngine(sys.argv[1], prompt_cache_dir=sys.argv[2], prompt_cache_min_tokens=64, n_threads=1)
reply = engine.chat_completion(json.loads(sys.argv[3]))
engine.close()
print(json.dumps({"text": reply.choices[0].message.content, "cache": reply.pg_metadata.prompt_cache,
                  "cached": reply.usage.prompt_tokens_details.cached_tokens}))
"""


def child(folder: Path) -> dict:
    done = subprocess.run([sys.executable, "-c", CHILD, str(ROOT / "models.toml"), str(folder),
                           json.dumps(CHAT_REQUEST)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_new_process_restores_a_prefix_saved_by_another(reference, tmp_path):
    first = child(tmp_path)
    assert first["cache"] != "disk" and entries(tmp_path)
    second = child(tmp_path)
    assert second["cache"] == "disk" and second["cached"] > 100
    assert first["text"] == second["text"] == reference[0]


# -- bad files ----------------------------------------------------------------------------------

def _rewrite_header(path: Path, **changes) -> None:
    data = path.read_bytes()
    header, start = prompt_files.decode_header(data, len(data))
    raw = json.loads(data[len(prompt_files.MAGIC) + 4:start])
    raw.update(changes)
    body = json.dumps(raw).encode()
    path.write_bytes(prompt_files.MAGIC + len(body).to_bytes(4, "little") + body + data[start:])


def _flip_payload_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-len(data) // 3] ^= 0x40
    path.write_bytes(bytes(data))


def _as_directory(path: Path) -> None:
    path.unlink()
    path.mkdir()
    (path / "something").write_text("not ours")


DAMAGE = {
    "truncated": lambda p: p.write_bytes(p.read_bytes()[:-5000]),
    "bit-flipped payload": _flip_payload_byte,
    "another model's header": lambda p: _rewrite_header(p, model_sha256="0" * 64),
    "another context size": lambda p: _rewrite_header(p, n_ctx_per_seq=4096),
    "an older llama.cpp": lambda p: _rewrite_header(p, llama_state="llama-cpp-python 0.2.0, sequence state v1"),
    "zero bytes": lambda p: p.write_bytes(b""),
    "a directory in its place": _as_directory,
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_bad_file_is_ignored_and_removed_and_the_prompt_is_processed(registry, reference, copy_of, damage):
    folder, chat_file, completion_file = copy_of
    DAMAGE[damage](chat_file)
    engine = engine_on(registry, folder)
    try:
        reply = engine.chat_completion(CHAT_REQUEST)
        completion = engine.completion(COMPLETION_REQUEST)   # a good file beside it still serves
    finally:
        engine.close()
    assert reply.choices[0].message.content == reference[0]
    assert reply.pg_metadata.prompt_cache != "disk" and reply.usage.prompt_tokens_details.cached_tokens < 64
    assert completion.choices[0].text == reference[1] and completion.pg_metadata.prompt_cache == "disk"
    if damage == "a directory in its place":
        assert chat_file.is_dir() and (chat_file / "something").is_file(), "someone else's folder is left alone"
    else:   # removed; the prompt processed again was saved anew, whole
        header, _ = prompt_files.read_entry(chat_file, _layout_of(completion_file))
        assert header.tokens and len(header.tokens) == reply.usage.prompt_tokens
    assert not temporaries(folder)


def _layout_of(path: Path) -> prompt_files.Layout:
    header = prompt_files.read_header(path)
    facts = header.facts
    return prompt_files.Layout(facts["model_sha256"], facts["n_ctx_per_seq"], facts["kv"], facts["llama_state"])


def test_without_write_permission_requests_are_answered_and_nothing_is_written(registry, reference, saved):
    import tempfile

    outer = Path(tempfile.mkdtemp(prefix="prompt-cache-readonly-"))   # pytest's folders are private to root
    try:
        outer.chmod(0o755)
        folder = outer / "cache"
        shutil.copytree(saved[0], folder)
        (folder / saved[1]).unlink()
        completion_file = folder / saved[2]
        for path in (completion_file.parent, folder):
            path.chmod(0o555)
        engine = engine_on(registry, folder)
        engine.load_model({"model_name": CHAT})   # root reads the model file; nobody may not
        try:
            with _unprivileged():
                reply = engine.chat_completion(CHAT_REQUEST)
                completion = engine.completion(COMPLETION_REQUEST)
                engine.pool.unload(engine.registry.get(CHAT))   # waits for the saves, which fail
        finally:
            engine.close()
            for path in (completion_file.parent, folder):
                path.chmod(0o755)
        assert reply.choices[0].message.content == reference[0]
        assert completion.choices[0].text == reference[1] and completion.pg_metadata.prompt_cache == "disk"
        assert entries(folder) == [completion_file] and not temporaries(folder)
        assert engine.get_model_status().prompt_cache.stats[CHAT]["save_failures"] >= 1
    finally:
        shutil.rmtree(outer, ignore_errors=True)


class _unprivileged:
    """Root ignores file modes: run as nobody (every thread of the process) for the duration."""

    def __enter__(self) -> None:
        self.was = os.geteuid()
        if self.was == 0:
            os.seteuid(65534)

    def __exit__(self, *exc: object) -> None:
        if self.was == 0:
            os.seteuid(0)


# -- failures while saving ------------------------------------------------------------------------

def test_a_full_disk_while_saving_leaves_no_file_and_the_answer_is_right(registry, reference, tmp_path):
    engine = engine_on(registry, tmp_path)
    store = store_for(engine.prompt_cache)
    written = []

    def full_disk(fd: int, data) -> int:
        if written:
            raise OSError(errno.ENOSPC, "No space left on device")
        written.append(os.write(fd, data[:len(data) // 2]))
        return written[-1]

    store.write_bytes = full_disk
    try:
        reply = engine.chat_completion(CHAT_REQUEST)
        engine.pool.unload(engine.registry.get(CHAT))
    finally:
        store.write_bytes = os.write
        engine.close()
    assert reply.choices[0].message.content == reference[0]
    assert written, "the save was attempted"
    assert not entries(tmp_path) and not temporaries(tmp_path)


def test_unloading_during_a_save_leaves_a_whole_file_that_restores(registry, reference, tmp_path):
    engine = engine_on(registry, tmp_path)
    store = store_for(engine.prompt_cache)
    writing = threading.Event()

    def slow_disk(fd: int, data) -> int:
        writing.set()
        time.sleep(0.5)
        return os.write(fd, data)

    store.write_bytes = slow_disk
    try:
        engine.chat_completion(CHAT_REQUEST)
        assert writing.wait(60)
        engine.unload_model({"model_name": CHAT})
    finally:
        store.write_bytes = os.write
        engine.close()
    assert len(entries(tmp_path)) == 1 and not temporaries(tmp_path)
    engine = engine_on(registry, tmp_path)
    try:
        reply = engine.chat_completion(CHAT_REQUEST)
    finally:
        engine.close()
    assert reply.pg_metadata.prompt_cache == "disk" and reply.choices[0].message.content == reference[0]


KILLED_WRITER = """
import os, sys, time
from polargrid_local.llm.prompt_files import Layout
from polargrid_local.llm.prompt_store import PromptStore
store = PromptStore(sys.argv[1], 1 << 30)
def slow(fd, data):
    print("writing", flush=True)
    time.sleep(60)
store.write_bytes = slow
store.save(Layout("a" * 64, 256, {}, "test"), "m", list(range(128)), b"x" * 100000, checksum=0)
"""


def test_a_writer_killed_mid_save_leaves_no_entry_and_its_leftover_is_cleaned(tmp_path):
    writer = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(tmp_path)], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert writer.stdout.readline().strip() == "writing"
    finally:
        writer.kill()
        writer.wait(30)
    assert not entries(tmp_path), "a file being written is never visible as an entry"
    assert temporaries(tmp_path), "the killed writer's temporary file is still there"
    store = store_for_dir(tmp_path)
    store.save(prompt_files.Layout("b" * 64, 256, {}, "test"), "m", list(range(64)), b"y" * 1000, checksum=0)
    assert not temporaries(tmp_path), "the next writer removed the dead writer's leftover"


def store_for_dir(folder: Path, budget: int = 1 << 30):
    from polargrid_local.llm.prompt_store import PromptStore

    return PromptStore(folder, budget)


# -- the budget ------------------------------------------------------------------------------------

WRITER = """
import random, sys, zlib
from polargrid_local.llm.prompt_files import Layout
from polargrid_local.llm.prompt_store import NotSaved, PromptStore
store = PromptStore(sys.argv[1], int(sys.argv[2]))
rng = random.Random(int(sys.argv[3]))
layout = Layout("c" * 64, 256, {}, "test")
for i in range(40):
    payload = rng.randbytes(rng.randrange(20000, 120000))
    tokens = [rng.randrange(50000) for _ in range(64 * rng.randrange(1, 4))]
    try:
        store.save(layout, "m", tokens, payload, pinned=(i % 10 == 0), checksum=zlib.crc32(payload))
    except NotSaved:
        pass
"""


def test_the_byte_budget_holds_under_concurrent_writers(tmp_path):
    budget = 600_000
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path), str(budget), str(seed)])
               for seed in range(4)]
    highest = 0
    while any(w.poll() is None for w in writers):
        highest = max(highest, _held(tmp_path))
        time.sleep(0.002)
    for writer in writers:
        assert writer.wait(120) == 0
    highest = max(highest, _held(tmp_path))
    assert 0.5 * budget < highest <= budget, highest
    assert len(entries(tmp_path)) >= 3


def _held(folder: Path) -> int:
    """Bytes the folder holds, temporary files included, measured under the writers' lock (a writer only makes
    room and reserves its file's size while holding it)."""
    from filelock import FileLock

    with FileLock(str(folder / ".lock")):
        seen: dict[int, int] = {}
        for path in folder.rglob(f"*{prompt_files.SUFFIX}"):
            try:
                stat = path.stat()
            except OSError:
                continue
            seen[stat.st_ino] = stat.st_size
        return sum(seen.values())


def test_pinned_entries_are_evicted_last(tmp_path):
    store = store_for_dir(tmp_path, budget=10_000)
    layout = prompt_files.Layout("d" * 64, 256, {}, "test")
    pinned = store.save(layout, "m", list(range(64)), b"p" * 3000, pinned=True, checksum=0)
    for i in range(6):
        store.save(layout, "m", list(range(100 + i, 164 + i)), b"u" * 3000, checksum=0)
    assert pinned.path.is_file() and pinned.path.name.endswith(prompt_files.PINNED_SUFFIX)
    assert store.used_bytes() <= 10_000 and store.evicted >= 4


# -- pinning, status, HTTP, CLI ---------------------------------------------------------------------

def test_cache_prompt_pins_a_system_prompt_that_a_later_process_restores(registry, tmp_path):
    system_only = {"model": CHAT, "messages": [{"role": "system", "content": SYSTEM}]}
    client = PolarGridSync(models=registry, prompt_cache_dir=tmp_path, n_threads=THREADS)
    try:
        entry = client.cache_prompt(system_only)
        status = client.get_model_status().prompt_cache
    finally:
        client.close()
    assert entry.pinned and entry.tokens > 100 and entry.bytes > 0 and entry.model == CHAT
    pinned = entries(tmp_path)
    assert [p.name for p in pinned] == [entry.key + prompt_files.PINNED_SUFFIX]
    assert status.directory == str(tmp_path) and [e.key for e in status.entries] == [entry.key]
    assert status.entries[0].pinned and status.used_bytes == entry.bytes
    engine = engine_on(registry, tmp_path, prompt_cache_min_tokens=100000)   # nothing new is saved
    try:
        reply = engine.chat_completion(CHAT_REQUEST)
    finally:
        engine.close()
    assert reply.pg_metadata.prompt_cache == "disk"
    assert reply.usage.prompt_tokens_details.cached_tokens >= entry.tokens - 4   # all but the assistant header


def test_cache_prompt_from_the_async_client_and_over_http(registry, tmp_path):
    from polargrid_local.server import running

    async def pin() -> object:
        client = PolarGrid(models=registry, prompt_cache_dir=tmp_path, n_threads=THREADS)
        try:
            return await client.cache_prompt({"model": CHAT, "prompt": COMPLETION_REQUEST["prompt"]})
        finally:
            await client.aclose()

    first = asyncio.run(pin())
    assert first.pinned and first.tokens > 100
    engine = engine_on(registry, tmp_path)
    try:
        with running(engine) as server:
            import httpx

            answer = httpx.post(f"{server.url}/v1/cache/prompt", timeout=300, json={
                "model": CHAT, "messages": [{"role": "system", "content": SYSTEM}]})
            bad = httpx.post(f"{server.url}/v1/cache/prompt", timeout=60, json={"model": CHAT, "messages": [
                {"role": "user", "content": "Hi"}]})
    finally:
        engine.close()
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["object"] == "prompt_cache.entry" and body["pinned"] and body["tokens"] > 100
    assert bad.status_code == 400 and "at least" in bad.json()["error"]["message"]
    assert len(entries(tmp_path)) == 2


def test_cache_prompt_says_so_when_the_cache_is_off(registry):
    engine = LocalEngine(registry, prompt_cache=False, n_threads=THREADS)
    try:
        with pytest.raises(polargrid.ValidationError, match="no prompt cache"):
            engine.cache_prompt({"model": CHAT, "messages": [{"role": "system", "content": SYSTEM}]})
    finally:
        engine.close()


def test_the_cli_lists_removes_and_clears_saved_prompts(saved, tmp_path, capsys):
    from polargrid_local.cli import main

    folder = tmp_path / "cache"
    shutil.copytree(saved[0], folder)
    key = saved[1].name.split(".")[0]
    assert main(["cache", "--dir", str(folder), "ls"]) == 0
    listing = capsys.readouterr().out
    assert key in listing and CHAT in listing and str(folder) in listing
    assert main(["cache", "--dir", str(folder), "rm", key[:10]]) == 0
    assert len(entries(folder)) == 1 and "removed 1" in capsys.readouterr().out
    assert main(["cache", "--dir", str(folder), "rm", "zzzz"]) == 2
    assert main(["cache", "--dir", str(folder), "clear"]) == 0
    assert not entries(folder)


# -- options ------------------------------------------------------------------------------------------

def test_with_the_cache_off_nothing_is_saved(registry, tmp_path):
    engine = LocalEngine(registry, prompt_cache=False, prompt_cache_dir=tmp_path, prompt_cache_min_tokens=1,
                         n_threads=THREADS)
    try:
        reply = engine.chat_completion(CHAT_REQUEST)
        assert engine.get_model_status().prompt_cache is None
    finally:
        engine.close()
    assert reply.choices[0].message.content and not list(tmp_path.iterdir())


def test_prompts_shorter_than_min_tokens_are_not_saved(registry, tmp_path):
    engine = LocalEngine(registry, prompt_cache_dir=tmp_path, n_threads=THREADS)   # the default: 256 tokens
    try:
        reply = engine.chat_completion(CHAT_REQUEST)
    finally:
        engine.close()
    assert reply.usage.prompt_tokens < 256 and not entries(tmp_path)


def test_where_the_cache_lives_and_how_big_it_may_grow(registry, tmp_path, monkeypatch):
    from polargrid_local.llm.prompt_cache import DIR_ENV, PromptCacheConfig

    settings = {"prompt_cache_dir": str(tmp_path / "toml"), "prompt_cache_bytes": 5 << 20}
    monkeypatch.delenv(DIR_ENV, raising=False)
    assert PromptCacheConfig.resolve(None, None, None, None, {}, tmp_path).directory == tmp_path / "prompt-cache"
    config = PromptCacheConfig.resolve(None, None, None, None, settings, tmp_path)
    assert (config.directory, config.max_bytes, config.min_tokens) == (tmp_path / "toml", 5 << 20, 256)
    monkeypatch.setenv(DIR_ENV, str(tmp_path / "env"))
    assert PromptCacheConfig.resolve(None, None, None, None, settings, tmp_path).directory == tmp_path / "env"
    assert PromptCacheConfig.resolve(True, tmp_path / "arg", 7, 8, settings, tmp_path) == PromptCacheConfig(
        tmp_path / "arg", 7, 8)
    assert PromptCacheConfig.resolve(None, None, None, None, {"prompt_cache": False}, tmp_path) is None
    with pytest.raises(polargrid.ValidationError, match="prompt_cache_bytes"):
        LocalEngine(registry, prompt_cache_bytes=-1)
