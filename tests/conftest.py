"""Shared fixtures: one engine on the real models, pulled beforehand by `make models` (no network here)."""
from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# The prompt cache is on by default: this session's engines (and the CLIs it starts) save into a folder of
# their own, never the user's model cache.
if "POLARGRID_LOCAL_PROMPT_CACHE_DIR" not in os.environ:
    os.environ["POLARGRID_LOCAL_PROMPT_CACHE_DIR"] = tempfile.mkdtemp(prefix="polargrid-prompt-cache-")
    atexit.register(shutil.rmtree, os.environ["POLARGRID_LOCAL_PROMPT_CACHE_DIR"], True)

from polargrid_local import LocalEngine, PolarGridSync, Registry, offline  # noqa: E402
from polargrid_local.store.pull import is_pulled  # noqa: E402

# The whole suite runs under the offline guard: any connection outside loopback fails the test that made it.
offline.enable()

ROOT = Path(__file__).resolve().parent.parent
MODELS_FILE = ROOT / "models.toml"
CHAT = "smollm2-135m-instruct"      # the fast model: tests that need "some chat model"
QWEN = "qwen2.5-coder-0.5b-instruct"  # the default chat model: tests of the default alias, templates, tool calls
DEFAULT_CHAT = "gpt-4o-mini"         # an alias of the default


@pytest.fixture(scope="session")
def registry() -> Registry:
    from polargrid_local.cli import default_models

    reg = Registry.load(MODELS_FILE)
    missing = [m.id for m in [*default_models(reg), reg.get(CHAT)] if not is_pulled(reg, m)]
    if missing:
        pytest.fail(f"models not pulled: {missing}; run `make models` first", pytrace=False)
    return reg


@pytest.fixture(scope="session")
def engine(registry: Registry):
    eng = LocalEngine(registry)
    yield eng
    eng.close()


@pytest.fixture(scope="session")
def client(engine: LocalEngine) -> PolarGridSync:
    return PolarGridSync(engine=engine)


def chat_request(content: str = "Write one sentence about cats.", **extra):
    """A chat request with one user message: SmolLM2, greedy, 32 tokens unless ``extra`` says otherwise (a key
    given as None is left out of the request)."""
    request = {"model": CHAT, "messages": [{"role": "user", "content": content}], "max_tokens": 32,
               "temperature": 0, **extra}
    return {key: value for key, value in request.items() if value is not None}


@pytest.fixture(scope="module")
def fake_engine():
    """An engine on polargrid_local.testing's fake engines (no model files), for one test module."""
    eng = LocalEngine(fake=True)
    yield eng
    eng.close()


@pytest.fixture
def fake(fake_engine):
    """The fake engine's script, reset before and after the test."""
    fake_engine.fake.reset()
    yield fake_engine.fake
    fake_engine.fake.reset()


SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Please call me back before five o'clock tomorrow.",
    "It was a bright cold day in April and the clocks were striking thirteen.",
]


def words(text: str) -> list[str]:
    return "".join(c.lower() if c.isalnum() or c.isspace() else " " for c in text).split()


def word_error_rate(reference: str, hypothesis: str) -> float:
    ref, hyp = words(reference), words(hypothesis)
    row = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        prev, row[0] = row[0], i
        for j, h in enumerate(hyp, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (r != h))
    return row[-1] / max(1, len(ref))


@pytest.fixture(scope="session")
def speech_wav(client) -> bytes:
    """Piper speaking the first test sentence, as WAV bytes."""
    return client.text_to_speech({"model": "tts-1", "input": SENTENCES[0], "voice": "alloy",
                                  "response_format": "wav"})
