"""The prompt cache: KV states of processed prompts saved on disk and restored into a sequence by prefix.

``PromptCache`` is one model's view of a cache folder (prompt_store.PromptStore), used by the batch
scheduler on the model's worker thread: ``restore`` loads the longest saved prefix of a prompt into a
sequence when it beats what that sequence (or a donor) already holds in memory; ``remember`` takes a
processed prompt's state out of the context (milliseconds, on the worker thread) and hands it to the one
background saver thread of the process, which checksums, writes, flushes and renames it. Counters per
model are in ``stats()`` (for /metrics and the model status).
"""
from __future__ import annotations

import atexit
import logging
import os
import queue
import threading
import zlib
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .prompt_files import BLOCK, Layout, model_sha256
from .prompt_store import Entry, NotSaved, PromptStore

logger = logging.getLogger("polargrid_local")

DIR_ENV = "POLARGRID_LOCAL_PROMPT_CACHE_DIR"
DEFAULT_BYTES = 1 << 30
DEFAULT_MIN_TOKENS = 256
MAX_PENDING_BYTES = 256 << 20   # states waiting for the saver; past it, prompts are not saved (never pinned ones)
CLOSE_WAIT_S = 30.0


@dataclass(frozen=True)
class PromptCacheConfig:
    """Where the cache lives, how many bytes it may hold, and the shortest prompt worth saving."""

    directory: Path
    max_bytes: int = DEFAULT_BYTES
    min_tokens: int = DEFAULT_MIN_TOKENS

    @classmethod
    def resolve(cls, enabled: Any, directory: Any, max_bytes: Any, min_tokens: Any, settings: dict[str, Any],
                model_cache_dir: Path) -> PromptCacheConfig | None:
        """The engine's options over ``$POLARGRID_LOCAL_PROMPT_CACHE_DIR`` (the folder) over models.toml's
        ``[settings]`` over the defaults; None when the cache is off."""
        from ..errors import invalid

        enabled = settings.get("prompt_cache", True) if enabled is None else enabled
        if not isinstance(enabled, bool):
            raise invalid("prompt_cache must be true or false", field="prompt_cache")
        if not enabled:
            return None
        folder = directory or os.environ.get(DIR_ENV) or settings.get("prompt_cache_dir")
        folder = Path(os.path.expanduser(str(folder))) if folder else Path(model_cache_dir) / "prompt-cache"
        values = {}
        for name, value, default in (("prompt_cache_bytes", max_bytes, DEFAULT_BYTES),
                                     ("prompt_cache_min_tokens", min_tokens, DEFAULT_MIN_TOKENS)):
            value = settings.get(name, default) if value is None else value
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise invalid(f"{name} must be a whole number of at least 0", field=name)
            values[name] = value
        return cls(folder, values["prompt_cache_bytes"], values["prompt_cache_min_tokens"])


# -- counters ---------------------------------------------------------------------------------

_COUNTERS = ("lookups", "disk_hits", "memory_hits", "misses", "restored_tokens", "saves", "saved_bytes",
             "save_failures", "save_skipped", "bad_files")


class CacheStats:
    """One model's prompt cache counters in this process (monotonic, for Prometheus counters)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values = dict.fromkeys(_COUNTERS, 0)

    def add(self, name: str, amount: int = 1) -> None:
        with self._lock:
            self._values[name] += amount

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._values)


_STATS: dict[str, CacheStats] = {}
_STATS_LOCK = threading.Lock()


def stats_for(model: str) -> CacheStats:
    with _STATS_LOCK:
        return _STATS.setdefault(model, CacheStats())


def stats() -> dict[str, dict[str, int]]:
    """Every model's prompt cache counters in this process: lookups, disk_hits, memory_hits, misses,
    restored_tokens, saves, saved_bytes, save_failures, save_skipped, bad_files."""
    with _STATS_LOCK:
        return {model: counters.snapshot() for model, counters in _STATS.items()}


_STORES: dict[tuple[str, int], PromptStore] = {}


def store_for(config: PromptCacheConfig) -> PromptStore:
    """The process's one store for a folder and budget (its index is shared by every model using it)."""
    key = (str(config.directory), config.max_bytes)
    with _STATS_LOCK:
        if key not in _STORES:
            _STORES[key] = PromptStore(config.directory, config.max_bytes)
        return _STORES[key]


# -- the saver thread ---------------------------------------------------------------------------

class _Saver:
    """One background thread per process: checksums and writes states the worker threads took out."""

    def __init__(self) -> None:
        self._queue: queue.Queue[tuple[PromptCache, list[int], list[Any], Future[Entry] | None]] = queue.Queue()
        self._lock = threading.Condition()
        self.pending_bytes = 0
        self.pending = 0
        self._thread: threading.Thread | None = None

    def submit(self, cache: PromptCache, tokens: list[int], parts: list[Any], pin: Future[Entry] | None) -> None:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="polargrid-prompt-saver", daemon=True)
                self._thread.start()
            self.pending_bytes += _nbytes(parts)
            self.pending += 1
            cache.pending += 1
        self._queue.put((cache, tokens, parts, pin))

    def _run(self) -> None:
        while True:
            cache, tokens, parts, pin = self._queue.get()
            try:
                cache.write(tokens, parts, pin)
                cache.give_back(parts)
            except BaseException as exc:  # never let one save stop the thread
                logger.exception("prompt cache: saving failed")
                if pin is not None and not pin.done():
                    pin.set_exception(exc)
            finally:
                with self._lock:
                    self.pending_bytes -= _nbytes(parts)
                    self.pending -= 1
                    cache.pending -= 1
                    self._lock.notify_all()

    def wait(self, cache: PromptCache | None, timeout: float) -> bool:
        """Wait until ``cache``'s saves (every save, for None) are written; False on timeout."""
        with self._lock:
            return self._lock.wait_for(lambda: (cache.pending if cache is not None else self.pending) == 0, timeout)


def _nbytes(parts: list[Any]) -> int:
    return sum(memoryview(part).nbytes for part in parts)


SAVER = _Saver()
atexit.register(lambda: SAVER.wait(None, 5.0))


# -- one model's cache ------------------------------------------------------------------------

@dataclass(frozen=True)
class Restored:
    """What a restore left in a sequence: the tokens its cells hold, and the saved logits of the last one when
    the entry is exactly the prompt asked for (the first token is sampled from them, as a cold run would)."""

    tokens: list[int]
    logits: Any = None


class PromptCache:
    """A model's saved prompt prefixes: restore into a sequence, remember a processed prompt."""

    def __init__(self, store: PromptStore, layout: Layout, model: str, min_tokens: int) -> None:
        self.store, self.layout, self.model, self.min_tokens = store, layout, model, min_tokens
        self.stats = stats_for(model)
        self.pending = 0   # states handed to the saver, not yet written (guarded by the saver's lock)
        self._spare: Any = None   # the last state's buffer, written and given back: the next state goes there

    def restore(self, decoder: Any, seq_id: int, tokens: Sequence[int], have: int) -> Restored | None:
        """``_restore``, which never fails a request: whatever goes wrong, the prompt is processed instead."""
        try:
            return self._restore(decoder, seq_id, tokens, have)
        except Exception:
            logger.exception("prompt cache: restoring a prefix of %s failed; processing the prompt", self.model)
            self.stats.add("misses")
            decoder.clear(seq_id)
            return Restored([], None)

    def _restore(self, decoder: Any, seq_id: int, tokens: Sequence[int], have: int) -> Restored | None:
        """Load the longest saved prefix of ``tokens`` into the sequence when it is at least a block longer than
        the ``have`` tokens it holds in memory. Returns what the sequence now holds (and, when the entry is
        exactly this prompt, the saved logits of its last token), or None when the sequence was left as it was
        (nothing better saved, or the file was bad and is removed)."""
        if len(tokens) < BLOCK:
            return None
        self.stats.add("lookups")
        found = self.store.lookup(self.layout, tokens)
        if found is None or found[1] < have + BLOCK:
            self.stats.add("memory_hits" if have >= BLOCK else "misses")
            return None
        entry, shared = found
        bad_before = self.store.bad_files
        loaded = self.store.load(entry, self.layout)
        if loaded is None:
            self.stats.add("bad_files", self.store.bad_files - bad_before)
            self.stats.add("misses")
            return None
        header, payload = loaded
        state_bytes = header.payload_bytes - header.logits_bytes
        decoder.clear(seq_id)
        if not decoder.load_sequence(seq_id, payload[:state_bytes]):
            decoder.clear(seq_id)
            logger.warning("prompt cache: llama.cpp refused %s; removed", entry.path)
            self.store.remove([entry])
            self.stats.add("bad_files")
            self.stats.add("misses")
            return Restored([], None)
        exact = bool(header.logits_bytes) and header.tokens == list(tokens)
        self.stats.add("disk_hits")
        self.stats.add("restored_tokens", len(tokens) if exact else min(shared, len(tokens) - 1))
        return Restored(header.tokens, payload[state_bytes:] if exact else None)

    def remember(self, decoder: Any, seq_id: int, cells: list[int], pin: Future[Entry] | None = None,
                 index: int | None = None) -> None:
        """``_remember``, which never fails a request: a state that cannot be taken out is not saved."""
        try:
            self._remember(decoder, seq_id, cells, pin, index)
        except Exception as exc:
            logger.exception("prompt cache: saving a prompt of %s failed", self.model)
            self.stats.add("save_failures")
            if pin is not None and not pin.done():
                pin.set_exception(exc)

    def _remember(self, decoder: Any, seq_id: int, cells: list[int], pin: Future[Entry] | None,
                  index: int | None) -> None:
        """Save the state of a sequence holding exactly ``cells`` (a prompt just processed; its last token's
        logits at ``index`` of the last batch) unless it is short or a saved entry already holds all but a
        block of it; ``pin`` (from cache_prompt) saves it pinned, whatever its length, and is resolved with
        the entry once it is on disk."""
        from ..errors import invalid

        if pin is None and len(cells) < max(self.min_tokens, BLOCK):
            return
        if len(cells) < BLOCK:
            assert pin is not None
            pin.set_exception(invalid(f"the prompt is {len(cells)} tokens; the prompt cache keeps prompts of at "
                                      f"least {BLOCK} tokens", field="messages"))
            return
        found = self.store.lookup(self.layout, cells)
        if found is not None and found[1] == len(cells) and (pin is None or len(found[0].tokens) == len(cells)):
            if pin is not None:
                self._pin(found[0], pin)
            return
        if pin is None and found is not None and len(cells) - found[1] < BLOCK:
            return
        if pin is None and SAVER.pending_bytes > MAX_PENDING_BYTES:
            self.stats.add("save_skipped")
            return
        spare, self._spare = self._spare, None
        state = decoder.save_sequence(seq_id, spare)
        if state is None:
            if pin is not None:
                pin.set_exception(RuntimeError("the model's state could not be read"))
            return
        logits = decoder.logits(index) if index is not None else None
        SAVER.submit(self, list(cells), [state] if logits is None else [state, logits], pin)

    def _pin(self, entry: Entry, pin: Future[Entry]) -> None:
        try:
            pin.set_result(self.store.pin(entry))
        except NotSaved as exc:
            pin.set_exception(_not_saved(exc))

    def write(self, tokens: list[int], parts: list[Any], pin: Future[Entry] | None) -> None:
        """On the saver thread: checksum and write one state (and its logits, the last part when there are two)."""
        checksum = 0
        for part in parts:
            checksum = zlib.crc32(part, checksum)
        logits_bytes = memoryview(parts[-1]).nbytes if len(parts) > 1 else 0
        try:
            entry = self.store.save(self.layout, self.model, tokens, parts, pinned=pin is not None,
                                    checksum=checksum, logits_bytes=logits_bytes)
        except NotSaved as exc:
            self.stats.add("save_failures")
            logger.warning("prompt cache: a %d-token prompt of %s was not saved: %s", len(tokens), self.model, exc)
            if pin is not None:
                pin.set_exception(_not_saved(exc))
            return
        self.stats.add("saves")
        self.stats.add("saved_bytes", entry.size)
        if pin is not None:
            pin.set_result(entry)

    def give_back(self, parts: list[Any]) -> None:
        """On the saver thread, once a state is written: keep its buffer for the next one (one at most, the
        largest), so taking a state out touches memory that is already mapped."""
        buffer = getattr(parts[0], "base", None)
        if buffer is None or not hasattr(buffer, "nbytes"):
            return
        spare = self._spare
        if spare is None or spare.nbytes < buffer.nbytes:
            self._spare = buffer

    def close(self) -> None:
        """Wait for this model's states still being written (they no longer need the model)."""
        if not SAVER.wait(self, CLOSE_WAIT_S):
            logger.warning("prompt cache: %s's saves are still being written", self.model)
        self._spare = None


def _not_saved(exc: NotSaved) -> BaseException:
    from ..errors import ServerError

    return ServerError(f"the prompt was processed but not saved in the prompt cache: {exc}", 507)


def open_prompt_cache(config: Any, model: str, model_path: str, declared_sha256: str | None,
                      n_ctx_per_seq: int, kv: dict[str, Any], llama_state: str) -> PromptCache | None:
    """The model's prompt cache under ``config`` (None: off). A cache that cannot be set up is off, with a
    warning: serving requests never depends on it."""
    if not isinstance(config, PromptCacheConfig):
        return None
    store = store_for(config)
    try:
        sha = model_sha256(model_path, declared_sha256, config.directory)
    except OSError as exc:
        logger.warning("prompt cache off for %s: %s", model, exc)
        return None
    return PromptCache(store, Layout(sha, n_ctx_per_seq, kv, llama_state), model, config.min_tokens)


def cache_status(config: PromptCacheConfig) -> Any:
    """What the cache folder holds (every model's entries) and this process's counters: the model status's
    ``prompt_cache``."""
    from datetime import datetime, timezone

    from ..types import PromptCacheEntry, PromptCacheStatus

    store = store_for(config)
    entries = [PromptCacheEntry(key=e.key, model=e.model, tokens=len(e.tokens), bytes=e.size, pinned=e.pinned,
                                last_used=datetime.fromtimestamp(e.last_used, timezone.utc).isoformat())
               for e in store.entries()]
    return PromptCacheStatus(directory=str(config.directory), max_bytes=config.max_bytes,
                             used_bytes=store.used_bytes(), min_tokens=config.min_tokens, entries=entries,
                             stats=stats())
