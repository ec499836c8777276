"""models.toml parsing and `polargrid-local pull`, against wheels built here (pip with --no-index)."""
from __future__ import annotations

import hashlib
import subprocess
import sys
import zipfile
from dataclasses import replace
from pathlib import Path

import polargrid
import pytest

from polargrid_local import LocalEngine, Registry
from polargrid_local.store.pull import PullError, is_pulled, pull
from polargrid_local.store.registry import RegistryError

ROOT = Path(__file__).resolve().parent.parent


def make_wheel(folder: Path, package: str, version: str, members: dict[str, bytes]) -> Path:
    dist = package.replace("-", "_")
    path = folder / f"{dist}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as wheel:
        for name, data in members.items():
            wheel.writestr(name, data)
        info = f"{dist}-{version}.dist-info"
        wheel.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {package}\nVersion: {version}\n")
        wheel.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        wheel.writestr(f"{info}/RECORD", "")
    return path


@pytest.fixture()
def index(tmp_path, monkeypatch):
    """A local package index of two wheels; pip may look nowhere else."""
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    make_wheel(wheels, "tiny-model-part1", "1.0", {"tiny_model_part1/data/blob.part0": b"A" * 3000})
    make_wheel(wheels, "tiny-model-part2", "1.0", {"tiny_model_part2/data/blob.part1": b"B" * 2000,
                                                   "tiny_model_part2/data/config.json": b'{"ok": true}'})
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(wheels))
    monkeypatch.delenv("PIP_EXTRA_INDEX_URL", raising=False)
    return wheels


def write_registry(tmp_path: Path, blob_sha: str, extra: str = "") -> Path:
    text = f'''
[defaults]
chat = "tiny"

[[models]]
id = "tiny"
kind = "chat"
aliases = ["Tiny-Alias"]
entry = "blob.bin"
files = [
  {{ path = "blob.bin", size = 5000, sha256 = "{blob_sha}", pypi = [
      "tiny-model-part1==1.0:tiny_model_part1/data/blob.part0",
      "tiny-model-part2==1.0:tiny_model_part2/data/blob.part1"] }},
  {{ path = "config.json", pypi = "tiny-model-part2==1.0:tiny_model_part2/data/config.json" }},
]
{extra}
'''
    path = tmp_path / "models.toml"
    path.write_text(text)
    return path


BLOB_SHA = hashlib.sha256(b"A" * 3000 + b"B" * 2000).hexdigest()


def test_pull_assembles_parts_verifies_and_is_idempotent(tmp_path, index):
    registry = Registry.load(write_registry(tmp_path, BLOB_SHA), cache_dir=tmp_path / "cache")
    spec = registry.get("tiny-alias")
    assert not is_pulled(registry, spec)
    path = pull(registry, spec, log=lambda _m: None)
    assert path.read_bytes() == b"A" * 3000 + b"B" * 2000
    assert (path.parent / "config.json").read_text() == '{"ok": true}'
    assert is_pulled(registry, spec)
    mtime = path.stat().st_mtime_ns
    messages: list[str] = []
    pull(registry, spec, verify=True, log=messages.append)
    assert path.stat().st_mtime_ns == mtime and all("present" in m for m in messages)


def test_pull_rejects_a_wrong_sha256_and_leaves_nothing(tmp_path, index):
    registry = Registry.load(write_registry(tmp_path, "0" * 64), cache_dir=tmp_path / "cache")
    with pytest.raises(PullError, match="sha256 mismatch"):
        pull(registry, registry.get("tiny"), log=lambda _m: None)
    assert not is_pulled(registry, registry.get("tiny"))
    assert not [p for p in (tmp_path / "cache" / "blobs").iterdir()]


def test_pull_reports_a_missing_package(tmp_path, index):
    registry = Registry.load(write_registry(tmp_path, BLOB_SHA).parent / "models.toml", cache_dir=tmp_path / "c")
    text = (tmp_path / "models.toml").read_text().replace("tiny-model-part1==1.0", "tiny-model-part1==9.9")
    (tmp_path / "models.toml").write_text(text)
    registry = Registry.load(tmp_path / "models.toml", cache_dir=tmp_path / "c")
    with pytest.raises(PullError, match="could not download tiny-model-part1==9.9"):
        pull(registry, registry.get("tiny"), log=lambda _m: None)


def test_cli_pull_and_list(tmp_path, index):
    models = write_registry(tmp_path, BLOB_SHA)
    env_cmd = [sys.executable, "-m", "polargrid_local", "--models", str(models), "--cache-dir", str(tmp_path / "cache")]
    done = subprocess.run([*env_cmd, "pull", "tiny"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "extract blob.part0" in done.stderr and "100.0%" in done.stderr
    listing = subprocess.run([*env_cmd, "list"], capture_output=True, text=True).stdout
    assert "tiny" in listing and "yes" in listing
    unknown = subprocess.run([*env_cmd, "pull", "nope"], capture_output=True, text=True)
    assert unknown.returncode == 2 and "unknown model" in unknown.stderr


def test_a_model_that_is_not_pulled_says_how_to_pull_it(tmp_path):
    registry = Registry.load(write_registry(tmp_path, BLOB_SHA), cache_dir=tmp_path / "empty")
    engine = LocalEngine(registry)
    with pytest.raises(polargrid.NotFoundError, match="polargrid-local pull tiny"):
        engine.chat_completion({"model": "tiny", "messages": [{"role": "user", "content": "hi"}]})
    assert engine.get_model_status().loading_status["tiny"] == "failed"


@pytest.mark.parametrize("body, words", [
    ('[[models]]\nid = "a/b"\nkind = "chat"\nlocal = "/x"\n', "path separators"),
    ('[[models]]\nid = "a"\nkind = "video"\nlocal = "/x"\n', "kind must be"),
    ('[[models]]\nid = "a"\nkind = "chat"\n', "needs files"),
    ('[[models]]\nid = "a"\nkind = "chat"\nfiles = [{ path = "../x", pypi = "p==1:x" }]\n', "without '..'"),
    ('[[models]]\nid = "a"\nkind = "chat"\nfiles = [{ path = "x", pypi = "p:x" }]\n', "package==version"),
    ('[[models]]\nid = "a"\nkind = "chat"\nlocal = "/x"\n[[models]]\nid = "b"\nkind = "chat"\naliases = ["A"]\n'
     'local = "/y"\n', "is used by"),
    ('[defaults]\nchat = "zzz"\n', "not defined"),
    ('this is = = not toml', "models.toml"),
    # issue 22 item 13: ids that are the cache's own folders, and package names that are paths
    ('[[models]]\nid = "blobs"\nkind = "chat"\nlocal = "/x"\n', "reserved"),
    ('[[models]]\nid = "Downloads"\nkind = "chat"\nlocal = "/x"\n', "reserved"),
    ('[[models]]\nid = "a"\nkind = "chat"\nfiles = [{ path = "x", pypi = "../../evil==1:x" }]\n', "PEP 508"),
    ('[[models]]\nid = "a"\nkind = "chat"\nfiles = [{ path = "x", pypi = "p/q==1:x" }]\n', "PEP 508"),
    ('[[models]]\nid = "a"\nkind = "chat"\nfiles = [{ path = "x", pypi = "p==1/../..:x" }]\n', "version"),
    ('[[models]]\nid = "a"\nkind = "chat"\nfiles = [{ path = "x", pypi = "p==..:x" }]\n', "version"),
])
def test_registry_errors_name_the_problem(tmp_path, body, words):
    path = tmp_path / "models.toml"
    path.write_text(body)
    with pytest.raises(RegistryError, match=words.replace(".", r"\.").replace("(", r"\(")):
        Registry.load(path)


def test_shipped_registry_is_complete():
    registry = Registry.load(ROOT / "models.toml")
    for kind in ("chat", "embedding", "stt", "tts"):
        assert registry.default(kind) is not None and registry.default(kind).kind == kind
    for alias in ("whisper-1", "tts-1", "tts-1-hd", "gpt-3.5-turbo"):
        assert registry.get(alias) is not None
    for spec in registry.models:
        assert spec.files and all(f.sha256 and len(f.sha256) == 64 for f in spec.files)


def test_local_source_is_used_in_place(tmp_path, registry):
    gguf = registry.get("smollm2").path_in(registry.cache_dir)
    path = tmp_path / "models.toml"
    path.write_text(f'[[models]]\nid = "mine"\nkind = "chat"\nlocal = "{gguf}"\n')
    engine = LocalEngine(Registry.load(path, cache_dir=tmp_path / "cache"))
    try:
        reply = engine.chat_completion({"model": "mine", "messages": [{"role": "user", "content": "hi"}],
                                        "max_tokens": 3})
        assert reply.usage.completion_tokens > 0
    finally:
        engine.close()


# -- the packaged registry and the user's overlay ---------------------------------------------------------------

def test_a_checkout_finds_the_packaged_registry_without_building():
    from polargrid_local.store.registry import packaged_models_file

    assert packaged_models_file().read_text() == (ROOT / "models.toml").read_text()


def test_a_user_registry_adds_to_and_overrides_the_packaged_one(tmp_path, monkeypatch):
    monkeypatch.delenv("POLARGRID_LOCAL_MODELS", raising=False)
    user = tmp_path / "mine.toml"
    user.write_text('[defaults]\nchat = "mine"\n[settings]\nkeep_alive = "5m"\n'
                    '[[models]]\nid = "mine"\nkind = "chat"\naliases = ["gpt-3.5-turbo"]\nlocal = "/x.gguf"\n'
                    '[[models]]\nid = "whisper-base"\nkind = "stt"\nlocal = "/my/whisper"\n')
    registry = Registry.load(user)
    assert registry.get("mine").local == "/x.gguf" and registry.default("chat").id == "mine"
    assert registry.get("gpt-3.5-turbo").id == "mine", "the user's alias wins"
    assert "gpt-3.5-turbo" not in registry.get("qwen2.5-coder-0.5b-instruct").aliases, "the packaged entry lost it"
    assert registry.get("whisper-base").local == "/my/whisper", "same id: the user's entry replaces the packaged one"
    assert registry.default("tts").id == "piper-en_US-joe-medium", "packaged defaults the user leaves alone stay"
    assert registry.settings["keep_alive"] == "5m"
    only = Registry.load(user, models_only=True)
    assert {m.id for m in only.models} == {"mine", "whisper-base"}
    user.write_text(user.read_text().replace('[settings]\n', '[settings]\nreplace_defaults = true\n'))
    assert {m.id for m in Registry.load(user).models} == {"mine", "whisper-base"}


def test_the_user_registry_comes_from_the_environment_or_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.delenv("POLARGRID_LOCAL_MODELS", raising=False)
    monkeypatch.chdir(tmp_path)
    assert Registry.load().get("mine") is None and Registry.load().get("smollm2") is not None
    (tmp_path / "models.toml").write_text('[[models]]\nid = "mine"\nkind = "chat"\nlocal = "/x.gguf"\n')
    assert Registry.load().get("mine") is not None and Registry.load().get("smollm2") is not None
    other = tmp_path / "other.toml"
    other.write_text('[[models]]\nid = "theirs"\nkind = "chat"\nlocal = "/y.gguf"\n')
    monkeypatch.setenv("POLARGRID_LOCAL_MODELS", str(other))
    assert Registry.load().get("theirs") is not None and Registry.load().get("mine") is None


def test_a_wheel_folder_outside_the_downloads_folder_is_refused_at_pull_time(tmp_path):
    """Registry.load checks package names; pull checks again, for a PyPIPart made by hand."""
    from polargrid_local.store.pull import _download_wheel
    from polargrid_local.store.registry import PyPIPart

    with pytest.raises(PullError, match="PEP 508"):
        _download_wheel(PyPIPart("../../outside", "1.0", "x"), tmp_path / "downloads", lambda _m: None)
    assert not (tmp_path / "outside-1.0").exists() and not (tmp_path.parent / "outside-1.0").exists()
    registry = Registry.load(write_registry(tmp_path, BLOB_SHA), cache_dir=tmp_path / "cache")
    with pytest.raises(PullError, match="reserved"):  # a ModelSpec made by hand never reaches the blob store
        pull(registry, replace(registry.get("tiny"), id="blobs"), log=lambda _m: None)
    assert not (tmp_path / "cache" / "blobs").exists()


@pytest.mark.parametrize("files, words", [
    ('entry = "../../outside"\nfiles = [{ path = "x", pypi = "p==1:x" }]', "entry"),
    ('entry = "/etc/passwd"\nfiles = [{ path = "x", pypi = "p==1:x" }]', "entry"),
    ('files = [{ path = "x", sha256 = "../../../etc/passwd", pypi = "p==1:x" }]', "64 hexadecimal"),
    ('files = [{ path = "x", sha256 = "abc", pypi = "p==1:x" }]', "64 hexadecimal"),
    ('files = [{ path = "/abs/x", pypi = "p==1:x" }]', "relative"),
    ('files = [{ path = "a\\\\..\\\\..\\\\x", pypi = "p==1:x" }]', "relative"),
])
def test_paths_and_hashes_from_the_registry_are_checked_before_use(tmp_path, files, words):
    path = tmp_path / "models.toml"
    path.write_text(f'[[models]]\nid = "a"\nkind = "chat"\n{files}\n')
    with pytest.raises(RegistryError, match=words):
        Registry.load(path)


# -- Hugging Face downloads: token kept on its origin, resumed after a break ----------------------------------

class _Recorder:
    """A loopback HTTP server that records each request's headers and answers with a handler function."""

    def __init__(self, answer):
        import http.server
        import threading

        self.requests: list[dict[str, str]] = []
        recorder = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                recorder.requests.append({"path": self.path, **{k.lower(): v for k, v in self.headers.items()}})
                answer(self)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


DATA = bytes(range(256)) * 4096  # 1 MiB
DATA_SHA = hashlib.sha256(DATA).hexdigest()


def _hf_registry(tmp_path, endpoint_repo="o/r"):
    path = tmp_path / "hf.toml"
    path.write_text(f'[[models]]\nid = "hfm"\nkind = "tts"\nentry = "m.bin"\n'
                    f'files = [{{ path = "m.bin", size = {len(DATA)}, sha256 = "{DATA_SHA}", hf = "{endpoint_repo}:m.bin" }}]\n')
    return Registry.load(path, cache_dir=tmp_path / "cache", models_only=True)


def test_hf_token_goes_to_its_own_origin_only(tmp_path, monkeypatch):
    def cdn(handler):
        handler.send_response(200)
        handler.send_header("Content-Length", str(len(DATA)))
        handler.end_headers()
        handler.wfile.write(DATA)

    other = _Recorder(cdn)

    def hub(handler):
        if handler.path.endswith("/m.bin"):  # same origin first, then off to the "CDN" on another port
            target = "/moved/m.bin.next"
        else:
            target = f"{other.url}/blob?sig=1"
        handler.send_response(302)
        handler.send_header("Location", target)
        handler.end_headers()

    hub_server = _Recorder(hub)
    try:
        monkeypatch.setenv("HF_ENDPOINT", hub_server.url)
        monkeypatch.setenv("HF_TOKEN", "hf_secret")
        registry = _hf_registry(tmp_path)
        path = pull(registry, registry.get("hfm"), log=lambda _m: None)
        assert path.read_bytes() == DATA
        assert [r.get("authorization") for r in hub_server.requests] == ["Bearer hf_secret"] * 2
        assert other.requests and all("authorization" not in r for r in other.requests)
    finally:
        hub_server.close()
        other.close()


def test_an_interrupted_hf_download_resumes_with_a_range_request(tmp_path, monkeypatch):
    def flaky(handler):
        first = len(server.requests) == 1
        wanted = handler.headers.get("Range")
        start = int(wanted.split("=")[1].rstrip("-")) if wanted else 0
        handler.send_response(206 if wanted else 200)
        if wanted:
            handler.send_header("Content-Range", f"bytes {start}-{len(DATA) - 1}/{len(DATA)}")
        handler.send_header("Content-Length", str(len(DATA) - start))
        handler.end_headers()
        handler.wfile.write(DATA[start:start + 300_000] if first else DATA[start:])  # the first one breaks off

    server = _Recorder(flaky)
    try:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        registry = _hf_registry(tmp_path)
        with pytest.raises(PullError, match="resume") as info:
            pull(registry, registry.get("hfm"), log=lambda _m: None)
        assert info.value.resumable
        assert (tmp_path / "cache" / "blobs" / f".partial-{DATA_SHA}").stat().st_size == 300_000
        path = pull(registry, registry.get("hfm"), log=lambda _m: None)
        assert path.read_bytes() == DATA
        assert server.requests[1].get("range") == "bytes=300000-"
        assert not list((tmp_path / "cache" / "blobs").glob(".partial-*"))
    finally:
        server.close()


def test_an_interrupted_wheel_download_resumes_with_a_range_request(tmp_path, monkeypatch):
    """pip finds the wheel on a loopback find-links page; the download breaks once and continues."""
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    payload = DATA * 2
    wheel = make_wheel(wheels, "tiny-model-big", "1.0", {"tiny_model_big/blob": payload}).read_bytes()
    name = "tiny_model_big-1.0-py3-none-any.whl"

    def index(handler):
        if handler.path.rstrip("/") in ("", "/"):
            body = (f'<html><body><a href="/{name}" data-dist-info-metadata="true" data-core-metadata="true">'
                    f'{name}</a></body></html>').encode()
            handler.send_response(200)
            handler.send_header("Content-Type", "text/html")
            handler.send_header("Content-Length", str(len(body)))
            handler.end_headers()
            handler.wfile.write(body)
            return
        if handler.path.endswith(".metadata"):  # PEP 658: pip reads this instead of downloading the wheel
            body = b"Metadata-Version: 2.1\nName: tiny-model-big\nVersion: 1.0\n"
            handler.send_response(200)
            handler.send_header("Content-Length", str(len(body)))
            handler.end_headers()
            handler.wfile.write(body)
            return
        wanted = handler.headers.get("Range")
        start = int(wanted.split("=")[1].rstrip("-")) if wanted else 0
        downloads = [r for r in server.requests if r["path"].endswith(".whl")]
        handler.send_response(206 if wanted else 200)
        handler.send_header("Content-Length", str(len(wheel) - start))
        handler.end_headers()
        handler.wfile.write(wheel[start:start + 100_000] if len(downloads) == 1 else wheel[start:])

    server = _Recorder(index)
    try:
        monkeypatch.setenv("PIP_NO_INDEX", "1")
        monkeypatch.setenv("PIP_FIND_LINKS", server.url + "/")
        monkeypatch.delenv("PIP_EXTRA_INDEX_URL", raising=False)
        path = tmp_path / "models.toml"
        path.write_text(f'[[models]]\nid = "big"\nkind = "tts"\nentry = "blob"\nfiles = [{{ path = "blob", '
                        f'sha256 = "{hashlib.sha256(payload).hexdigest()}", pypi = "tiny-model-big==1.0:tiny_model_big/blob" }}]\n')
        registry = Registry.load(path, cache_dir=tmp_path / "cache", models_only=True)
        with pytest.raises(PullError, match="resume"):
            pull(registry, registry.get("big"), log=lambda _m: None)
        assert pull(registry, registry.get("big"), log=lambda _m: None).read_bytes() == payload
        ranges = [r.get("range") for r in server.requests if r["path"].endswith(".whl")]
        assert ranges[-1] == "bytes=100000-", ranges
    finally:
        server.close()


# -- issue 22 item 12: a download stops at the size the registry declares ---------------------------------

class _CountingProgress:
    """The pull's progress bars, counting every byte the pull took in."""

    taken = 0

    def __init__(self, label, total):
        self.label, self.total, self.done = label, total, 0

    def update(self, n):
        self.done += n
        _CountingProgress.taken += n

    def close(self):
        pass


@pytest.mark.parametrize("declare_length", [False, True])
def test_a_download_stops_at_the_declared_size(tmp_path, monkeypatch, declare_length):
    flood = b"x" * (8 << 20)   # 8 MiB for an entry that declares 1,000 bytes

    def generous(handler):
        handler.send_response(200)
        if declare_length:
            handler.send_header("Content-Length", str(len(flood)))
        handler.end_headers()
        try:
            handler.wfile.write(flood)
        except OSError:   # the pull hung up: what it refused never left the server
            pass

    server = _Recorder(generous)
    try:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        path = tmp_path / "hf.toml"
        path.write_text(f'[[models]]\nid = "hfm"\nkind = "tts"\nentry = "m.bin"\n'
                        f'files = [{{ path = "m.bin", size = 1000, sha256 = "{DATA_SHA}", hf = "o/r:m.bin" }}]\n')
        registry = Registry.load(path, cache_dir=tmp_path / "cache", models_only=True)
        _CountingProgress.taken = 0
        with pytest.raises(PullError, match="1000 bytes") as info:
            pull(registry, registry.get("hfm"), progress=_CountingProgress, log=lambda _m: None)
        assert not info.value.resumable
        assert _CountingProgress.taken <= 1001, f"took {_CountingProgress.taken} bytes for a 1,000-byte entry"
        assert not list((tmp_path / "cache" / "blobs").iterdir()), "nothing of the refused download stays"
    finally:
        server.close()


def test_a_wheel_member_stops_at_the_declared_size(tmp_path, index):
    make_wheel(index, "tiny-model-big", "1.0", {"tiny_model_big/blob": b"B" * (4 << 20)})
    path = tmp_path / "models.toml"
    path.write_text('[[models]]\nid = "big"\nkind = "tts"\nentry = "blob"\nfiles = [{ path = "blob", size = 1000, '
                    'pypi = "tiny-model-big==1.0:tiny_model_big/blob" }]\n')
    registry = Registry.load(path, cache_dir=tmp_path / "cache", models_only=True)
    _CountingProgress.taken = 0
    with pytest.raises(PullError, match="1000 bytes"):
        pull(registry, registry.get("big"), progress=_CountingProgress, log=lambda _m: None)
    assert _CountingProgress.taken <= 1001
    assert not [p for p in (tmp_path / "cache" / "blobs").iterdir()]
