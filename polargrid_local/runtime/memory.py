"""Memory-aware loading: estimate what a model needs before loading it, against what is free.

Weights are the GGUF's size (the part offloaded goes to the GPU); the KV cache is
2 (K and V) x layers x kv heads x head size x cells x 2 bytes (f16); compute buffers are
estimated from the batch size and vocabulary. A load that does not fit is refused with a
clear error, or (by policy) idle models are unloaded first, or fewer layers are offloaded.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

MB = 1024 * 1024
POLICIES = ("refuse", "evict", "offload-less")


@dataclass(frozen=True)
class Estimate:
    """Bytes a model needs once loaded, split by where they live."""

    weights_bytes: int
    kv_bytes: int
    compute_bytes: int
    gpu_fraction: float     # share of the weights and KV cache placed on the GPU

    @property
    def total(self) -> int:
        return self.weights_bytes + self.kv_bytes + self.compute_bytes

    @property
    def gpu_bytes(self) -> int:
        return int((self.weights_bytes + self.kv_bytes) * self.gpu_fraction) + (
            self.compute_bytes if self.gpu_fraction > 0 else 0)

    @property
    def host_bytes(self) -> int:
        return self.total - self.gpu_bytes

    def describe(self) -> str:
        return (f"{self.total / MB:.0f} MB ({self.weights_bytes / MB:.0f} MB weights, {self.kv_bytes / MB:.0f} MB KV "
                f"cache, {self.compute_bytes / MB:.0f} MB compute buffers)")


_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


def gguf_metadata(path: str) -> dict[str, Any]:
    """The scalar key/values of a GGUF header (arrays such as the vocabulary are skipped, not kept)."""
    import struct

    def read(fmt: str):
        return struct.unpack(fmt, f.read(struct.calcsize(fmt)))[0]

    def read_string() -> str:
        return f.read(read("<Q")).decode("utf-8", "replace")

    def skip(kind: int, count: int = 1) -> None:
        if kind == 8:
            for _ in range(count):
                f.seek(read("<Q"), 1)
        elif kind == 9:
            for _ in range(count):
                inner, n = read("<I"), read("<Q")
                skip(inner, n)
        else:
            f.seek(struct.calcsize(_SCALARS[kind]) * count, 1)

    out: dict[str, Any] = {}
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ValueError(f"{path} is not a GGUF file")
        version = read("<I")
        if version < 2:
            raise ValueError(f"GGUF version {version} is too old")
        read("<Q")  # tensor count
        for _ in range(read("<Q")):
            key, kind = read_string(), read("<I")
            if kind in _SCALARS:
                out[key] = read(_SCALARS[kind])
            elif kind == 8:
                out[key] = read_string()
            else:
                skip(kind)
    return out


def gguf_facts(path: str) -> dict[str, int]:
    """Layer count, KV width and vocabulary size from the GGUF header (no weights are read)."""
    meta = gguf_metadata(path)
    arch = meta.get("general.architecture", "llama")

    def number(key: str, default: int) -> int:
        value = meta.get(f"{arch}.{key}", default)
        return int(value) if isinstance(value, (int, float)) else default

    n_embd = number("embedding_length", 4096)
    n_head = number("attention.head_count", 32) or 1
    head_dim = number("attention.key_length", n_embd // n_head)
    return {"n_layer": number("block_count", 32), "n_head_kv": number("attention.head_count_kv", n_head),
            "head_dim": head_dim, "n_embd": n_embd, "n_vocab": number("vocab_size", 32000)}


def estimate(path: str, *, n_ctx: int, n_parallel: int = 1, n_batch: int = 512, n_gpu_layers: int = 0,
             embedding: bool = False) -> Estimate:
    facts = gguf_facts(path)
    layers = facts["n_layer"]
    cells = n_ctx * max(1, n_parallel)
    kv = 2 * layers * facts["n_head_kv"] * facts["head_dim"] * cells * 2
    # logits for the sequences sampled each step, activations for a full batch, and graph overhead
    compute = 4 * (facts["n_vocab"] * max(1, n_parallel) + 8 * facts["n_embd"] * n_batch) + 16 * MB
    if embedding:
        kv = 2 * layers * facts["n_head_kv"] * facts["head_dim"] * n_ctx * 2
    offloaded = layers if n_gpu_layers < 0 else min(n_gpu_layers, layers)
    return Estimate(os.path.getsize(path), kv, compute, offloaded / layers if layers else 0.0)


# Resident bytes per byte of model files: loading adds the weights plus the runtime's buffers and arenas.
# Measured on the default models (CPU): whisper-tiny.en (int8 CTranslate2) 74 MB of files -> +91 MB RSS at load,
# more while transcribing; piper (onnxruntime) 60 MB of onnx -> +122 MB.
FILE_FACTORS = {"stt": 1.5, "tts": 2.0}


def estimate_files(path: str, kind: str) -> Estimate:
    """A model that is not a GGUF (STT, TTS): the size of its files times its kind's factor (FILE_FACTORS)."""
    size = os.path.getsize(path) if os.path.isfile(path) else 0
    for folder, _dirs, files in os.walk(path):  # a folder (whisper): every file in it
        size += sum(os.path.getsize(os.path.join(folder, f)) for f in files)
    return Estimate(int(size * FILE_FACTORS.get(kind, 1.5)), 0, 0, 0.0)


def available_host_bytes() -> int:
    """MemAvailable from /proc/meminfo (Linux); 0 where unknown."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def gpu_layers_that_fit(est: Estimate, free_gpu: int, n_layer: int) -> int:
    """The most layers whose share of weights and KV fits in free_gpu (compute buffers reserved first)."""
    per_layer = (est.weights_bytes + est.kv_bytes) / max(1, n_layer)
    room = free_gpu - est.compute_bytes
    return max(0, min(n_layer, int(room // per_layer))) if per_layer else n_layer


def check_fits(est: Estimate, *, free_gpu: int | None, free_host: int, budget: int | None) -> str | None:
    """None when it fits, else the reason in words."""
    if budget is not None and est.total > budget:
        return f"needs about {est.describe()}, over the engine's memory budget of {budget / MB:.0f} MB"
    if free_gpu is not None and est.gpu_bytes > free_gpu:
        return f"needs about {est.gpu_bytes / MB:.0f} MB of GPU memory ({est.describe()}); {free_gpu / MB:.0f} MB free"
    if free_host and est.host_bytes > free_host:
        return f"needs about {est.host_bytes / MB:.0f} MB of RAM ({est.describe()}); {free_host / MB:.0f} MB available"
    return None
