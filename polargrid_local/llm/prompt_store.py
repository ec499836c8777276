"""PromptStore: one prompt cache folder on disk, shared by every model and process that uses it.

Layout: ``<root>/<layout folder>/<key>.pgkv`` (``.pin.pgkv`` when pinned), one sub-folder per model and
settings (prompt_files.Layout), and ``<root>/.lock``, the lock every writer holds while it makes room.

- A file appears only whole: it is written to a temporary name, flushed to disk and renamed. A writer first
  reserves its full size under the lock (counted by every other writer), so the folder never holds more
  than its budget, however many processes write to it.
- Room is made by removing the least recently used files (restoring one touches it), pinned ones last.
- A file that does not fit what it claims (truncated, corrupted, zero bytes, another model's header in this
  model's folder) is removed when it is found; a directory where a file should be is skipped.
"""
from __future__ import annotations

import errno
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .prompt_files import (
    PINNED_SUFFIX,
    SUFFIX,
    BadFile,
    Header,
    Layout,
    block_hashes,
    encode,
    entry_key,
    read_entry,
    read_header,
)

logger = logging.getLogger("polargrid_local")

LOCK_TIMEOUT_S = 10.0
STALE_TEMP_S = 3600.0        # a temporary file this old is abandoned, whoever wrote it
RESCAN_S = 1.0               # look again at a folder after this long even if its mtime did not move
_HOST = socket.gethostname().replace("-", "_")[:32] or "host"


class NotSaved(Exception):
    """A state was not saved (no room within the budget, the disk is full, no permission, ...)."""


@dataclass
class Entry:
    """One saved prefix: where it is and which tokens its cells hold."""

    path: Path
    tokens: list[int]
    blocks: list[str]
    size: int
    inode: int
    pinned: bool
    model: str = ""
    last_used: float = 0.0

    @property
    def key(self) -> str:
        return self.path.name.split(".", 1)[0]


@dataclass
class _Index:
    """What this process knows of one layout folder (a hint: every restore checks the file itself)."""

    mtime_ns: int = -1
    scanned_at: float = 0.0
    files: dict[str, Entry] = field(default_factory=dict)
    by_block: dict[str, list[str]] = field(default_factory=dict)


class PromptStore:
    """A cache folder with a byte budget. Thread-safe; several processes may share the folder."""

    def __init__(self, root: str | Path, max_bytes: int) -> None:
        self.root = Path(root)
        self.max_bytes = int(max_bytes)
        self._indexes: dict[str, _Index] = {}
        self._guard = threading.Lock()   # this process's indexes
        self._skipped: set[str] = set()  # directories found where files should be (warned about once)
        self.evicted = 0
        self.bad_files = 0
        self.write_bytes = os.write      # the low-level writer (a test simulates a full disk with its own)

    # -- finding a prefix ---------------------------------------------------------------------

    def lookup(self, layout: Layout, tokens: Sequence[int]) -> tuple[Entry, int] | None:
        """The saved entry sharing the longest prefix with ``tokens`` (at least one block), and that length."""
        hashes = block_hashes(tokens)
        if not hashes:
            return None
        index = self._refresh(layout)
        with self._guard:
            for j in range(len(hashes) - 1, -1, -1):
                names = index.by_block.get(hashes[j])
                if not names:
                    continue
                found = [(index.files[n], _common_prefix(index.files[n].tokens, tokens)) for n in names
                         if n in index.files]
                if found:
                    # the longest shared prefix; of those, the smallest file (the fewest bytes to read)
                    return max(found, key=lambda pair: (pair[1], -pair[0].size))
        return None

    def load(self, entry: Entry, layout: Layout) -> tuple[Header, memoryview] | None:
        """The entry's checked header and payload; None when it is gone or bad (a bad file is removed)."""
        try:
            header, payload = read_entry(entry.path, layout)
        except FileNotFoundError:
            self._forget(layout, entry.path.name)
            return None
        except (BadFile, OSError) as exc:
            self._discard(layout, entry.path, exc)
            return None
        try:
            os.utime(entry.path)   # recently used: evicted last
        except OSError:
            pass
        return header, payload

    def _refresh(self, layout: Layout) -> _Index:
        """This layout's index, read again when its folder changed (files added, renamed or removed)."""
        folder = self.root / layout.folder
        with self._guard:
            index = self._indexes.setdefault(layout.folder, _Index())
        try:
            mtime = os.stat(folder).st_mtime_ns
        except OSError:
            with self._guard:
                self._indexes[layout.folder] = _Index()
                return self._indexes[layout.folder]
        now = time.monotonic()
        if mtime == index.mtime_ns and now - index.scanned_at < RESCAN_S:
            return index
        files: dict[str, Entry] = {}
        bad: list[tuple[Path, BaseException]] = []
        try:
            listing = list(os.scandir(folder))
        except OSError:
            listing = []
        for item in listing:
            if item.name.startswith(".") or not item.name.endswith(SUFFIX):
                continue
            try:
                if item.is_dir(follow_symlinks=False):
                    bad.append((Path(item.path), IsADirectoryError(item.path)))
                    continue
                stat = item.stat()
            except OSError:
                continue
            known = index.files.get(item.name)
            if known is not None and (known.size, known.inode) == (stat.st_size, stat.st_ino):
                known.last_used = stat.st_mtime
                files[item.name] = known
                continue
            try:
                header = read_header(Path(item.path), layout)
            except (BadFile, OSError) as exc:
                bad.append((Path(item.path), exc))
                continue
            files[item.name] = Entry(Path(item.path), header.tokens, header.blocks, stat.st_size, stat.st_ino,
                                     item.name.endswith(PINNED_SUFFIX), header.model, stat.st_mtime)
        fresh = _Index(mtime, now, files, {})
        for name, entry in files.items():
            for block in entry.blocks:
                fresh.by_block.setdefault(block, []).append(name)
        with self._guard:
            self._indexes[layout.folder] = fresh
        for path, why in bad:
            self._discard(layout, path, why)
        return fresh

    def _forget(self, layout: Layout, name: str) -> None:
        with self._guard:
            index = self._indexes.get(layout.folder)
            if index is not None and index.files.pop(name, None) is not None:
                index.mtime_ns = -1

    def _discard(self, layout: Layout, path: Path, why: BaseException) -> None:
        """Remove a file that cannot be used (a directory in its place is only skipped, unless it is empty)."""
        if str(path) in self._skipped:
            return
        self.bad_files += 1
        logger.warning("prompt cache: ignoring %s: %s", path, why)
        try:
            if path.is_dir() and not path.is_symlink():
                path.rmdir()
            else:
                path.unlink()
        except OSError:
            if path.is_dir():
                self._skipped.add(str(path))
        self._forget(layout, path.name)

    # -- saving -------------------------------------------------------------------------------

    def save(self, layout: Layout, model: str, tokens: Sequence[int], payload: Any, *, pinned: bool = False,
             checksum: int, logits_bytes: int = 0) -> Entry:
        """Write the state of ``tokens`` (``payload``: a buffer, or a list of buffers written one after another;
        ``checksum``: their CRC-32; the last ``logits_bytes`` are logits) as one whole file, within the budget.
        Raises NotSaved; leaves no partial file behind whatever fails."""
        folder = self.root / layout.folder
        parts = list(payload) if isinstance(payload, (list, tuple)) else [payload]
        payload_bytes = sum(memoryview(part).nbytes for part in parts)
        head = encode(layout, model, tokens, payload_bytes, checksum, time.time(), logits_bytes)
        size = len(head) + payload_bytes
        if size > self.max_bytes:
            raise NotSaved(f"{size} bytes is more than the whole budget of {self.max_bytes}")
        final = folder / (entry_key(tokens) + (PINNED_SUFFIX if pinned else SUFFIX))
        temp = folder / f".tmp-{_HOST}-{os.getpid()}-{uuid.uuid4().hex[:8]}{SUFFIX}"
        fd = -1
        try:
            folder.mkdir(parents=True, exist_ok=True)
            with self._locked():
                self._make_room(size)
                fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                _reserve(fd, size)   # counted by every other writer from now on; the disk's blocks taken now
            for piece in (head, *parts):
                _write_all(fd, piece, self.write_bytes)
            os.fsync(fd)
            inode = os.fstat(fd).st_ino
            os.close(fd)
            fd = -1
            with self._locked():   # a writer counting the folder must see the file under one of its two names
                os.replace(temp, final)
            _sync_dir(folder)
        except (OSError, NotSaved) as exc:
            if fd >= 0:
                os.close(fd)
            _unlink(temp)
            raise exc if isinstance(exc, NotSaved) else NotSaved(f"{type(exc).__name__}: {exc}") from exc
        except BaseException:
            if fd >= 0:
                os.close(fd)
            _unlink(temp)
            raise
        if pinned:
            _unlink(final.with_name(entry_key(tokens) + SUFFIX))
        entry = Entry(final, list(tokens), block_hashes(tokens), size, inode, pinned, model, time.time())
        self._drop_prefixes_of(layout, entry)
        return entry

    def _drop_prefixes_of(self, layout: Layout, entry: Entry) -> None:
        """Unpinned entries whose every token the new one also holds are redundant now."""
        index = self._refresh(layout)
        with self._guard:
            older = [e for e in index.files.values() if e.path != entry.path and not e.pinned
                     and len(e.tokens) <= len(entry.tokens) and entry.tokens[:len(e.tokens)] == e.tokens]
        for old in older:
            _unlink(old.path)
            self._forget(layout, old.path.name)

    def pin(self, entry: Entry) -> Entry:
        """Mark an entry pinned (evicted last)."""
        if entry.pinned:
            return entry
        target = entry.path.with_name(entry.key + PINNED_SUFFIX)
        try:
            os.replace(entry.path, target)
            os.utime(target)
        except OSError as exc:
            raise NotSaved(f"could not pin {entry.path.name}: {exc}") from exc
        stat = target.stat()
        return Entry(target, entry.tokens, entry.blocks, stat.st_size, stat.st_ino, True, entry.model, stat.st_mtime)

    def _locked(self):
        from filelock import FileLock, Timeout

        lock = FileLock(str(self.root / ".lock"), timeout=LOCK_TIMEOUT_S)
        try:
            lock.acquire()
        except Timeout as exc:
            raise NotSaved(f"the cache folder stayed locked for {LOCK_TIMEOUT_S:g} s") from exc
        return _Held(lock)

    def _make_room(self, size: int) -> None:
        """Remove least recently used files (unpinned first) until ``size`` more bytes fit; under the lock."""
        total, candidates = 0, []
        for path, stat, temp in self._files():
            if temp:
                if _stale(path.name, stat.st_mtime):
                    _unlink(path)
                    continue
            else:
                candidates.append((path.name.endswith(PINNED_SUFFIX), stat.st_mtime, path, stat.st_size))
            total += stat.st_size
        if total + size <= self.max_bytes:
            return
        for _pinned, _mtime, path, bytes_ in sorted(candidates):
            if _unlink(path):
                self.evicted += 1
                total -= bytes_
            if total + size <= self.max_bytes:
                return
        raise NotSaved(f"no room: {total} of {self.max_bytes} bytes are held by files being written")

    def _files(self):
        """(path, stat, is_temporary) of every cache file and temporary file under the root."""
        try:
            folders = [f for f in os.scandir(self.root) if f.is_dir(follow_symlinks=False) and not
                       f.name.startswith(".")]
        except OSError:
            return
        for folder in folders:
            try:
                items = list(os.scandir(folder.path))
            except OSError:
                continue
            for item in items:
                if not item.name.endswith(SUFFIX):
                    continue
                try:
                    if not item.is_file(follow_symlinks=False):
                        continue
                    stat = item.stat(follow_symlinks=False)
                except OSError:
                    continue
                yield Path(item.path), stat, item.name.startswith(".tmp-")

    # -- what is there ----------------------------------------------------------------------------

    def used_bytes(self) -> int:
        """Bytes held under the root, temporary files included."""
        return sum(stat.st_size for _path, stat, _temp in self._files())

    def entries(self) -> list[Entry]:
        """Every saved entry of every model (files that cannot be read are left out), newest use first."""
        out = []
        for path, stat, temp in self._files():
            if temp:
                continue
            try:
                header = read_header(path)
            except (BadFile, OSError):
                continue
            out.append(Entry(path, header.tokens, header.blocks, stat.st_size, stat.st_ino,
                             path.name.endswith(PINNED_SUFFIX), header.model, stat.st_mtime))
        return sorted(out, key=lambda e: -e.last_used)

    def remove(self, entries: list[Entry]) -> int:
        """Remove these entries; how many were removed."""
        with self._locked():
            return sum(1 for entry in entries if _unlink(entry.path))


class _Held:
    def __init__(self, lock: Any) -> None:
        self.lock = lock

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        self.lock.release()


def _reserve(fd: int, size: int) -> None:
    """Give the file its full size now: disk blocks where the filesystem can allocate them (a full disk fails
    here, before anything is written), else a sparse length."""
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as exc:
        if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            raise
        os.ftruncate(fd, size)
    except AttributeError:  # pragma: no cover - platforms without posix_fallocate
        os.ftruncate(fd, size)


def _write_all(fd: int, data: Any, write: Any) -> None:
    view = memoryview(data).cast("B")
    while view:
        written = write(fd, view[:1 << 24])
        if written <= 0:
            raise OSError(errno.EIO, "nothing was written")
        view = view[written:]


def _sync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _unlink(path: Path) -> bool:
    try:
        os.unlink(path)
        return True
    except OSError:
        return False


def _stale(name: str, mtime: float) -> bool:
    """A temporary file whose writer is gone (this host, its process has exited) or that is very old."""
    if time.time() - mtime > STALE_TEMP_S:
        return True
    parts = name.split("-")
    if len(parts) < 4 or parts[1] != _HOST:
        return False
    try:
        pid = int(parts[2])
    except ValueError:
        return True
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False
    return False


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    return len(os.path.commonprefix([list(a), list(b)]))
