"""Shared fixtures: one engine on the real models, pulled beforehand by `make models` (no network here)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from polargrid_local import LocalEngine, PolarGridSync, Registry  # noqa: E402
from polargrid_local.pull import is_pulled  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
MODELS_FILE = ROOT / "models.toml"
CHAT = "smollm2-135m-instruct"


@pytest.fixture(scope="session")
def registry() -> Registry:
    reg = Registry.load(MODELS_FILE)
    missing = [m.id for m in (reg.default(k) for k in ("chat", "embedding")) if m and not is_pulled(reg, m)]
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
    return {"model": CHAT, "messages": [{"role": "user", "content": content}], "max_tokens": 32,
            "temperature": 0, **extra}
