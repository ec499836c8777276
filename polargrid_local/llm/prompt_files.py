"""The prompt cache's files: what identifies a saved KV state, how a file is laid out, and how it is checked.

A file holds the KV cells of one sequence after a prompt was processed (llama.cpp's per-sequence state)
and the logits of the prompt's last token (so the same prompt again gets exactly the first token a cold run
would sample), behind a header that says exactly what it fits: the model file's sha256, the cells per sequence, the KV
cache's type and layout, llama.cpp's state version, the prompt's tokens with their chained block hashes,
and a checksum of the payload. Anything that does not match is ``BadFile``: the caller removes it and
processes the prompt instead.

    MAGIC | header length (u32, little-endian) | header (JSON) | payload: llama_state_seq_get_data's bytes,
    then logits_bytes of float32 logits
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
import zlib
from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MAGIC = b"PGKVSEQ\x01"
FORMAT = 1
BLOCK = 64                  # tokens per hashed block: prefixes are found a block at a time
MAX_HEADER = 1 << 22        # a longer header is not one of ours
SUFFIX = ".pgkv"
PINNED_SUFFIX = ".pin.pgkv"


class BadFile(Exception):
    """A cache file that cannot be used: truncated, corrupted, or made for another model or other settings."""


def block_hashes(tokens: Sequence[int], block: int = BLOCK) -> list[str]:
    """Chained hashes of each full block of ``tokens``: the j-th names the first j+1 blocks, so two prompts
    share a hash exactly when they share every token up to the end of that block."""
    hashes, previous = [], b""
    for start in range(0, len(tokens) - block + 1, block):
        previous = hashlib.sha256(previous + array("i", tokens[start:start + block]).tobytes()).digest()[:16]
        hashes.append(previous.hex())
    return hashes


def entry_key(tokens: Sequence[int]) -> str:
    """The file name (without suffix) of the state of exactly these tokens."""
    return hashlib.sha256(array("i", tokens).tobytes()).hexdigest()[:32]


@dataclass(frozen=True)
class Layout:
    """Everything a saved state must share with the context it is loaded into."""

    model_sha256: str
    n_ctx_per_seq: int
    kv: dict[str, Any]          # KV cache types and layout (type_k, type_v, flash attention, offload, ...)
    llama_state: str            # llama-cpp-python's version and llama.cpp's sequence-state version

    def facts(self) -> dict[str, Any]:
        return {"format": FORMAT, "block": BLOCK, "model_sha256": self.model_sha256,
                "n_ctx_per_seq": self.n_ctx_per_seq, "kv": self.kv, "llama_state": self.llama_state}

    @property
    def folder(self) -> str:
        """The sub-folder this layout's files live in (other layouts never read each other's files)."""
        canonical = json.dumps(self.facts(), sort_keys=True).encode()
        return hashlib.sha256(canonical).hexdigest()[:16]


@dataclass(frozen=True)
class Header:
    """What a file says about itself."""

    facts: dict[str, Any]
    model: str
    tokens: list[int]
    blocks: list[str]
    payload_bytes: int
    payload_crc32: int
    created: float
    logits_bytes: int = 0


def encode(layout: Layout, model: str, tokens: Sequence[int], payload_bytes: int, payload_crc32: int,
           created: float, logits_bytes: int = 0) -> bytes:
    """The bytes that go before the payload (whose last ``logits_bytes`` are the last token's logits)."""
    header = {**layout.facts(), "model": model, "tokens": list(tokens), "blocks": block_hashes(tokens),
              "payload_bytes": payload_bytes, "logits_bytes": logits_bytes, "payload_crc32": payload_crc32,
              "created": created}
    body = json.dumps(header, separators=(",", ":")).encode()
    return MAGIC + struct.pack("<I", len(body)) + body


def decode_header(head: bytes | memoryview, file_size: int, layout: Layout | None = None) -> tuple[Header, int]:
    """The header at the start of a file of ``file_size`` bytes (``head``: its first bytes, or all of them), and
    where its payload starts. Raises BadFile when the file is not one of ours, is truncated, or (given
    ``layout``) was made for another layout."""
    if len(head) < len(MAGIC) + 4 or bytes(head[:len(MAGIC)]) != MAGIC:
        raise BadFile("not a prompt cache file")
    (length,) = struct.unpack_from("<I", head, len(MAGIC))
    start = len(MAGIC) + 4
    if length > MAX_HEADER or len(head) < start + length:
        raise BadFile("truncated header")
    try:
        raw = json.loads(bytes(head[start:start + length]))
        facts = {k: raw[k] for k in ("format", "block", "model_sha256", "n_ctx_per_seq", "kv", "llama_state")}
        header = Header(facts, str(raw.get("model", "")), [int(t) for t in raw["tokens"]], list(raw["blocks"]),
                        int(raw["payload_bytes"]), int(raw["payload_crc32"]), float(raw.get("created", 0)),
                        int(raw.get("logits_bytes", 0)))
    except (ValueError, KeyError, TypeError) as exc:
        raise BadFile(f"unreadable header: {exc}") from None
    if layout is not None and facts != layout.facts():
        different = sorted(k for k in facts if facts[k] != layout.facts()[k])
        raise BadFile(f"made for another model or other settings ({', '.join(different)})")
    if not 0 <= header.logits_bytes <= header.payload_bytes or header.logits_bytes % 4:
        raise BadFile("its logits do not fit its payload")
    if header.blocks != block_hashes(header.tokens, int(facts["block"])):
        raise BadFile("its block hashes do not match its tokens")
    if file_size != start + length + header.payload_bytes:
        raise BadFile(f"{file_size} bytes where its header promises {start + length + header.payload_bytes}")
    return header, start + length


def read_header(path: Path, layout: Layout | None = None) -> Header:
    """The header of a file (its payload is not read). Raises BadFile or OSError."""
    with open(path, "rb") as file:
        size = os.fstat(file.fileno()).st_size
        head = file.read(len(MAGIC) + 4)
        if len(head) == len(MAGIC) + 4 and head.startswith(MAGIC):
            (length,) = struct.unpack_from("<I", head, len(MAGIC))
            head += file.read(min(length, MAX_HEADER))
    return decode_header(head, size, layout)[0]


def read_entry(path: Path, layout: Layout) -> tuple[Header, memoryview]:
    """A whole file, checked against ``layout`` and its payload checksum. Raises BadFile or OSError."""
    with open(path, "rb") as file:
        size = os.fstat(file.fileno()).st_size
        data = bytearray(size)
        got = file.readinto(data)
    if got != size:
        raise BadFile("the file changed while it was read")
    view = memoryview(data)
    header, start = decode_header(view, size, layout)
    payload = view[start:]
    if zlib.crc32(payload) != header.payload_crc32:
        raise BadFile("its payload does not match its checksum")
    return header, payload


def model_sha256(path: str | Path, declared: str | None, memo_dir: Path | None) -> str:
    """The model file's sha256: the registry's (checked when it was pulled), else computed once and remembered
    in ``memo_dir`` by path, size and modification time."""
    if declared:
        return declared.lower()
    stat = os.stat(path)
    key = hashlib.sha256(f"{os.path.realpath(path)}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:32]
    memo = memo_dir / ".models" / key if memo_dir is not None else None
    if memo is not None:
        try:
            known = memo.read_text().strip()
            if len(known) == 64:
                return known
        except OSError:
            pass
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 22), b""):
            digest.update(chunk)
    value = digest.hexdigest()
    if memo is not None:
        try:
            memo.parent.mkdir(parents=True, exist_ok=True)
            temp = memo.with_name(f".{key}.{os.getpid()}")
            temp.write_text(value)
            os.replace(temp, memo)
        except OSError:
            pass
    return value
