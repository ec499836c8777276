"""Conversions run at pull time: model files as published -> the file an engine loads.

A registry file with ``convert = "NAME:folder"`` is made by converter NAME from the files
already pulled into ``folder`` of the same model, then checked against its sha256 like a
download. Converters must be deterministic (same input bytes, same output bytes) so that
the recorded sha256 holds on every machine.

``bert-gguf`` turns a Hugging Face BERT checkpoint (config.json, model.safetensors,
tokenizer.json, sentence-transformers pooling config) into the GGUF that llama.cpp's BERT
graph expects, with the metadata llama.cpp's own converter writes (convert_hf_to_gguf.py,
``BertModel``): bert.* hyperparameters, a WordPiece vocabulary in "phantom space" form
with token types, the special token ids, non-causal attention and the pooling type.
Matrices are stored as F16 and everything else as F32, as that converter does by default.
It needs only numpy, ``safetensors`` and ``gguf`` (no torch, no transformers).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from .registry import FileSpec

PHANTOM_SPACE = "\u2581"
# The hash of llama.cpp's tokenizer check text for bert-base-uncased's WordPiece tokenizer,
# which its converter names "bert-bge" (the pre-tokenizer name is informational for WPM vocabularies).
BERT_UNCASED_PRE = "bert-bge"


class ConversionError(RuntimeError):
    """The source files are missing or are not what the converter understands."""


def convert_into(f: FileSpec, model_dir: Path, blobs: Path, log: Callable[[str], None]) -> Path:
    """Run the conversion that makes ``f``; returns a temporary file in ``blobs`` matching f's sha256 and size."""
    from .pull import PullError

    name, _, folder = (f.convert or "").partition(":")
    converter = CONVERTERS.get(name)
    if converter is None:
        raise PullError(f"{f.path}: unknown converter {name!r} (known: {', '.join(sorted(CONVERTERS))})")
    source = model_dir / folder
    fd, tmp_name = tempfile.mkstemp(dir=blobs, prefix=".partial-")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        started = time.perf_counter()
        log(f"converting {source} -> {f.path} ({name})")
        converter(source, tmp)
        log(f"converted {f.path} in {time.perf_counter() - started:.1f}s")
        actual = _sha256(tmp)
        if f.sha256 and actual != f.sha256:
            raise PullError(f"{f.path}: the converted file's sha256 is {actual}, expected {f.sha256}; "
                            "the converter or its gguf/safetensors versions changed its output")
        if f.size is not None and tmp.stat().st_size != f.size:
            raise PullError(f"{f.path}: size mismatch (expected {f.size}, got {tmp.stat().st_size})")
        return tmp
    except ConversionError as exc:
        tmp.unlink(missing_ok=True)
        raise PullError(f"{f.path}: {exc}") from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def bert_to_gguf(source: Path, out: Path, *, rank: bool = False) -> None:
    """Write a llama.cpp BERT GGUF (F16 matrices) for the Hugging Face checkpoint in ``source``. ``rank=True``: a
    cross-encoder (BertForSequenceClassification): its pooler and classifier become llama.cpp's rank head."""
    import gguf
    from safetensors.numpy import load_file

    config = _json(source / "config.json")
    if config.get("model_type") != "bert":
        raise ConversionError(f"{source}/config.json is model_type {config.get('model_type')!r}, not 'bert'")
    tokenizer = _json(source / "tokenizer.json")
    n_layer = int(config["num_hidden_layers"])
    weights = load_file(str(source / "model.safetensors"))

    writer = gguf.GGUFWriter(str(out), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.BERT])
    writer.add_block_count(n_layer)
    writer.add_context_length(int(config["max_position_embeddings"]))
    writer.add_embedding_length(int(config["hidden_size"]))
    writer.add_feed_forward_length(int(config["intermediate_size"]))
    writer.add_head_count(int(config["num_attention_heads"]))
    writer.add_layer_norm_eps(float(config["layer_norm_eps"]))
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    writer.add_causal_attention(False)
    writer.add_pooling_type(gguf.PoolingType.RANK if rank else _pooling(source))
    _add_vocab(writer, tokenizer, source, int(config["vocab_size"]), int(config.get("type_vocab_size", 1)))

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.BERT, n_layer)
    for hf_name in sorted(weights):
        stripped = hf_name.removeprefix("bert.")
        if rank and stripped.startswith(("pooler.dense.", "classifier.")):  # the head, as llama.cpp names it
            module, _, suffix = stripped.rpartition(".")
            stripped = f"{RANK_HEAD[module]}.{suffix}"
        if stripped == "embeddings.position_ids" or stripped.startswith(("pooler.", "cls.")):
            continue
        new_name = names.get_name(stripped, try_suffixes=(".weight", ".bias"))
        if new_name is None:
            raise ConversionError(f"no GGUF name for tensor {hf_name!r}")
        data = weights[hf_name].astype(np.float32)
        keep_f32 = data.ndim <= 1 or new_name.endswith("_norm.weight") or new_name.startswith(
            ("position_embd.", "token_types."))
        writer.add_tensor(new_name, data if keep_f32 else data.astype(np.float16))

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _add_vocab(writer, tokenizer: dict, source: Path, vocab_size: int, type_vocab_size: int) -> None:
    """WordPiece vocabulary as llama.cpp's BertModel.set_vocab writes it."""
    import gguf

    model = tokenizer.get("model", {})
    if model.get("type") != "WordPiece":
        raise ConversionError(f"{source}/tokenizer.json is a {model.get('type')!r} tokenizer, not WordPiece")
    by_id = {i: token for token, i in model["vocab"].items()}
    added = {t["id"]: t for t in tokenizer.get("added_tokens", [])}
    tokens: list[str] = []
    types: list[int] = []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added and added[i].get("special"):
            tokens.append(by_id[i])
            types.append(gguf.TokenType.CONTROL)
        else:  # "##piece" continues a word; any other token starts one (the phantom space)
            token = by_id[i]
            tokens.append(token[2:] if token.startswith("##") else PHANTOM_SPACE + token)
            types.append(gguf.TokenType.USER_DEFINED if i in added else gguf.TokenType.NORMAL)
    writer.add_token_type_count(type_vocab_size)
    writer.add_tokenizer_model("bert")
    writer.add_tokenizer_pre(BERT_UNCASED_PRE)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    normalizer = tokenizer.get("normalizer") or {}
    if normalizer.get("type") == "BertNormalizer":
        lowercase = bool(normalizer.get("lowercase", True))
        strip = normalizer.get("strip_accents")
        writer.add_bool("tokenizer.ggml.normalizer.lowercase", lowercase)
        writer.add_bool("tokenizer.ggml.normalizer.strip_accents", lowercase if strip is None else bool(strip))
    quiet = logging.getLogger("gguf.vocab")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # it warns that the writer has no key for [CLS]; llama.cpp uses bos for it
    try:
        gguf.SpecialVocab(source, load_merges=False, n_vocab=len(tokens)).add_to_gguf(writer, quiet=True)
    finally:
        quiet.setLevel(level)


def _pooling(source: Path) -> Any:
    """The sentence-transformers pooling of the checkpoint (mean when it does not say)."""
    import gguf

    modules = source / "modules.json"
    folder = None
    if modules.is_file():
        folder = next((m["path"] for m in _json(modules) if m.get("type", "").endswith("Pooling")), None)
    if folder is None:
        return gguf.PoolingType.MEAN
    pooling = _json(source / folder / "config.json")
    if pooling.get("pooling_mode_mean_tokens"):
        return gguf.PoolingType.MEAN
    if pooling.get("pooling_mode_cls_token"):
        return gguf.PoolingType.CLS
    raise ConversionError(f"{source}/{folder}/config.json: only mean and CLS pooling are supported")


def _json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConversionError(f"{path} is missing; pull the model's source files first") from None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def bert_rerank_to_gguf(source: Path, out: Path) -> None:
    """A BERT cross-encoder (ms-marco-MiniLM and the like) as a llama.cpp rank-pooling GGUF."""
    bert_to_gguf(source, out, rank=True)


# BertForSequenceClassification's head -> the names gguf maps to llama.cpp's cls and cls.output tensors
RANK_HEAD = {"pooler.dense": "classifier.dense", "classifier": "classifier.out_proj"}
CONVERTERS: dict[str, Callable[[Path, Path], None]] = {"bert-gguf": bert_to_gguf,
                                                       "bert-rerank-gguf": bert_rerank_to_gguf}
