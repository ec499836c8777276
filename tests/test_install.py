"""The issue's "done when": the built wheel, installed into a fresh venv with no network, works from any folder.

Dependencies come from the wheelhouse `make wheelhouse` fills (~/.cache/polargrid-local/wheelhouse). The models
are pulled from a local index: wheels made here from the model files already pulled, named by a models.toml in
the app's folder that overrides the packaged entries (same ids, same sha256s, a local package as the source).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT
from test_registry_and_pull import make_wheel

WHEELHOUSE = Path(os.environ.get("POLARGRID_LOCAL_WHEELHOUSE", "~/.cache/polargrid-local/wheelhouse")).expanduser()
MODELS = {"chat": "smollm2-135m-instruct", "embedding": "all-minilm-l6-v2", "stt": "whisper-tiny.en",
          "tts": "piper-en_US-joe-medium"}

pytestmark = pytest.mark.slow


def run(cmd, **kw):
    done = subprocess.run(cmd, capture_output=True, text=True, **kw)
    assert done.returncode == 0, f"{cmd}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


def model_index(registry, folder: Path) -> str:
    """Local wheels holding the pulled model files, and a models.toml naming them (the app's overlay)."""
    folder.mkdir()
    entries = []
    for kind, model_id in MODELS.items():
        spec = registry.get(model_id)
        package = f"local-{model_id.replace('.', '-').replace('_', '-').lower()}"
        module = package.replace("-", "_")
        fetched = [f for f in spec.files if not f.convert]   # converted files are made again at pull
        files = {f"{module}/{f.path}": (registry.cache_dir / spec.id / f.path).read_bytes() for f in fetched}
        make_wheel(folder, package, "1.0", files)
        rows = ",\n  ".join(f'{{ path = "{f.path}", sha256 = "{f.sha256}", convert = "{f.convert}" }}' if f.convert else
                            f'{{ path = "{f.path}", sha256 = "{f.sha256}", pypi = "{package}==1.0:{module}/{f.path}" }}'
                            for f in spec.files)
        engine = {k: v for k, v in spec.engine.items() if k != "multilingual_fallback"}
        engine_toml = "\n".join(f"{k} = {_toml(v)}" for k, v in engine.items())
        entries.append(f'[[models]]\nid = "{spec.id}"\nkind = "{spec.kind}"\naliases = {_toml(list(spec.aliases))}\n'
                       + (f'entry = "{spec.entry}"\n' if spec.entry else "")
                       + f"files = [\n  {rows},\n]\n[models.engine]\n{engine_toml}\n")
    # The packaged default chat model (Qwen, 491 MB) would need a wheel of its own; the app picks SmolLM2.
    return '[defaults]\nchat = "smollm2-135m-instruct"\n\n' + "\n".join(entries)


def _toml(value) -> str:
    import json

    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + " }"
    return json.dumps(value)


def test_the_wheel_installs_offline_and_pulls_chats_speaks_transcribes_and_checks(registry, tmp_path):
    if not (WHEELHOUSE / ".complete").exists():
        pytest.skip(f"no wheelhouse at {WHEELHOUSE}: `make wheelhouse` (make test does it)")
    source = tmp_path / "src"
    for name in ("polargrid_local", "kernels"):
        shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__", "models.toml"))
    for name in ("pyproject.toml", "setup.py", "README.md", "models.toml"):
        shutil.copy(ROOT / name, source / name)
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet", "-w", str(tmp_path),
         str(source)])
    wheel = next(tmp_path.glob("polargrid_local-*.whl"))

    offline = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "POLARGRID_LOCAL_", "VIRTUAL_ENV"))}
    offline.update(PIP_CONFIG_FILE=os.devnull, PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1",
                   HF_HUB_OFFLINE="1", NUMBA_CACHE_DIR=str(tmp_path / "numba"))
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", str(venv)])
    run([str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "--find-links", str(WHEELHOUSE),
         str(wheel)], env=offline)

    app = tmp_path / "app"
    app.mkdir()
    cli = [str(venv / "bin" / "polargrid-local")]
    listing = run([*cli, "list"], cwd=app, env=offline).stdout
    assert "site-packages/polargrid_local/models.toml" in listing and "smollm2-135m-instruct" in listing

    (app / "models.toml").write_text(model_index(registry, tmp_path / "model-wheels"))
    env = {**offline, "PIP_FIND_LINKS": str(tmp_path / "model-wheels"), "POLARGRID_LOCAL_CACHE": str(tmp_path / "cache")}
    run([*cli, "pull"], cwd=app, env=env)
    chat = run([*cli, "chat", "Say hello.", "--max-tokens", "8", "--temperature", "0"], cwd=app, env=env)
    assert chat.stdout.strip()
    run([*cli, "speak", "The quick brown fox jumps over the lazy dog.", "-o", "fox.mp3"], cwd=app, env=env)
    heard = run([*cli, "transcribe", "fox.mp3"], cwd=app, env=env).stdout.lower()
    assert "fox" in heard and "dog" in heard, heard
    doctor = run([*cli, "doctor"], cwd=app, env=env).stdout
    assert "all good" in doctor and "sha256 verified" in doctor, doctor
    code = "import sys, polargrid_local; print([m for m in ('llama_cpp', 'numba', 'av') if m in sys.modules])"
    assert run([str(venv / "bin" / "python"), "-c", code], cwd=app, env=env).stdout.strip() == "[]"
