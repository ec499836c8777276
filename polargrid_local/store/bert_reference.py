"""A plain-numpy BERT sentence embedder: the reference a converted GGUF is checked against.

It reads the same Hugging Face files the conversion starts from (config.json,
model.safetensors, tokenizer.json) and computes what sentence-transformers computes for
a BERT model with mean pooling and normalisation: WordPiece tokens (the ``tokenizers``
package, no truncation), embeddings + LayerNorm, the encoder layers (erf GELU), mean over
the tokens, L2 norm. Batches are padded to their longest input and masked, and inputs are
sorted by length first, as sentence-transformers does. float32 throughout.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np


class NumpyBert:
    """``NumpyBert(folder).embed(texts)`` -> an (n, hidden) float32 array of unit vectors."""

    def __init__(self, folder: str | Path) -> None:
        from safetensors.numpy import load_file
        from tokenizers import Tokenizer

        folder = Path(folder)
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        self.n_head = int(config["num_attention_heads"])
        self.eps = float(config["layer_norm_eps"])
        self.n_layer = int(config["num_hidden_layers"])
        raw = load_file(str(folder / "model.safetensors"))
        self.w = {k.removeprefix("bert."): v.astype(np.float32) for k, v in raw.items()}
        # y = x @ W.T + b as one 2-D BLAS product: weights transposed once, contiguous
        self.linear = {k.removesuffix(".weight"): np.ascontiguousarray(v.T) for k, v in self.w.items()
                       if k.startswith("encoder.") and v.ndim == 2}
        self.tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        self.tokenizer.no_truncation()
        self.tokenizer.no_padding()

    def tokens(self, text: str) -> list[int]:
        """The token ids the model reads for ``text`` ([CLS] ... [SEP])."""
        return self.tokenizer.encode(text).ids

    def embed(self, texts: list[str], batch_size: int = 32) -> np.ndarray:
        encoded = [self.tokens(t) for t in texts]
        order = sorted(range(len(texts)), key=lambda i: -len(encoded[i]))
        out = np.zeros((len(texts), self.w["embeddings.word_embeddings.weight"].shape[1]), np.float32)
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            out[chunk] = self._batch([encoded[i] for i in chunk])
        return out

    def _batch(self, batch: list[list[int]]) -> np.ndarray:
        w, n = self.w, max(len(ids) for ids in batch)
        ids = np.zeros((len(batch), n), np.int64)
        mask = np.zeros((len(batch), n), np.float32)
        for row, tokens in enumerate(batch):
            ids[row, :len(tokens)] = tokens
            mask[row, :len(tokens)] = 1.0
        x = (w["embeddings.word_embeddings.weight"][ids] + w["embeddings.position_embeddings.weight"][:n]
             + w["embeddings.token_type_embeddings.weight"][0])
        x = self._norm(x, "embeddings.LayerNorm")
        bias = ((1.0 - mask) * np.float32(-1e9))[:, None, None, :]  # padding is never attended to
        for i in range(self.n_layer):
            x = self._layer(x, bias, f"encoder.layer.{i}.")
        pooled = (x * mask[:, :, None]).sum(axis=1) / mask.sum(axis=1, keepdims=True)
        return pooled / np.linalg.norm(pooled, axis=1, keepdims=True)

    def _layer(self, x: np.ndarray, bias: np.ndarray, p: str) -> np.ndarray:
        b, n, d = x.shape
        h, hd = self.n_head, d // self.n_head

        def heads(name: str) -> np.ndarray:
            return self._linear(x, p + name).reshape(b, n, h, hd).transpose(0, 2, 1, 3)

        q, k, v = heads("attention.self.query"), heads("attention.self.key"), heads("attention.self.value")
        scores = q @ k.transpose(0, 1, 3, 2) / np.float32(np.sqrt(hd)) + bias
        scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
        attn = (scores / scores.sum(axis=-1, keepdims=True)) @ v
        attn = attn.transpose(0, 2, 1, 3).reshape(b, n, d)
        x = self._norm(x + self._linear(attn, p + "attention.output.dense"), p + "attention.output.LayerNorm")
        inner = _gelu(self._linear(x, p + "intermediate.dense"))
        return self._norm(x + self._linear(inner, p + "output.dense"), p + "output.LayerNorm")

    def _linear(self, x: np.ndarray, name: str) -> np.ndarray:
        weight = self.linear[name]
        return (x.reshape(-1, x.shape[-1]) @ weight + self.w[name + ".bias"]).reshape(*x.shape[:-1], weight.shape[1])

    def _norm(self, x: np.ndarray, name: str) -> np.ndarray:
        mean = x.mean(axis=-1, keepdims=True)
        var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
        return (x - mean) / np.sqrt(var + self.eps) * self.w[name + ".weight"] + self.w[name + ".bias"]


def _gelu(x: np.ndarray) -> np.ndarray:
    """BERT's exact GELU, x * Phi(x), with erf from Abramowitz & Stegun 7.1.26 (|error| < 1.5e-7)."""
    z = np.abs(x) / np.float32(np.sqrt(2.0))
    t = 1.0 / (1.0 + np.float32(0.3275911) * z)
    poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))))
    erf = np.sign(x) * (1.0 - poly * np.exp(-z * z))
    return (0.5 * x * (1.0 + erf)).astype(np.float32)
