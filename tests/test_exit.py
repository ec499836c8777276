"""A process that exits without closing its client, in the middle of a request, still exits cleanly.

Before issue 22 item 16 every modality crashed at exit (chat and embeddings with SIGSEGV, TTS with an abort
from onnxruntime's threads): the model threads were inside native code while the interpreter tore down.
Each run below is a real process on the real models, with another process keeping the CPU busy.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from polargrid_local.host import offline

ROOT = Path(__file__).resolve().parent.parent
RUNS = int(os.environ.get("POLARGRID_EXIT_RUNS", "3"))   # per modality; the crashes were every run before


@pytest.fixture
def busy_cpu():
    """A process spinning on the CPU for the test's duration (started and stopped by its own handle)."""
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    yield
    hog.kill()
    hog.wait()


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["chat", "embeddings", "tts", "stt"])
def test_exiting_mid_request_without_close_exits_cleanly(mode, speech_wav, tmp_path, busy_cpu):
    audio = tmp_path / "speech.wav"
    audio.write_bytes(speech_wav)
    env = {**os.environ, offline.OFFLINE_ENV: "1", "HF_HUB_OFFLINE": "1"}
    for run in range(RUNS):
        done = subprocess.run([sys.executable, str(ROOT / "tests" / "exit_mid_request.py"), mode, str(audio)],
                              capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
        assert "exiting mid-request" in done.stdout, done.stderr[-3000:]
        assert done.returncode == 0, f"run {run + 1} of {mode} exited {done.returncode}: {done.stderr[-3000:]}"
        assert "terminate called" not in done.stderr and "Segmentation fault" not in done.stderr
