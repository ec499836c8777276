"""Raw llama.cpp baselines through llama-cpp-python's C API only (as ../shared/tools/llama_bench.py measures)."""
from __future__ import annotations

import time

import numpy as np


class RawLlama:
    """A model and a context with n_seq sequences; greedy decoding by argmax over the logits."""

    def __init__(self, path: str, threads: int, n_seq: int = 1, n_ctx: int = 4096, n_gpu_layers: int = 0) -> None:
        import llama_cpp as L
        from llama_cpp import _logger

        _logger.set_verbose(False)
        L.llama_backend_init()
        self.L = L
        params = L.llama_model_default_params()
        params.n_gpu_layers = n_gpu_layers
        self.model = L.llama_model_load_from_file(path.encode(), params)
        self.n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(self.model))
        cp = L.llama_context_default_params()
        cp.n_ctx, cp.n_batch, cp.n_seq_max = n_ctx, 512, n_seq
        cp.n_threads = cp.n_threads_batch = threads
        self.ctx = L.llama_init_from_model(self.model, cp)
        self.batch = L.llama_batch_init(512, 0, 1)

    def decode(self, entries: list[tuple[int, int, int, bool]]) -> None:
        b = self.batch
        for i, (tok, pos, seq, logits) in enumerate(entries):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = tok, pos, 1, logits
            b.seq_id[i][0] = seq
        b.n_tokens = len(entries)
        if self.L.llama_decode(self.ctx, b) != 0:
            raise RuntimeError("llama_decode failed")

    def argmax(self, i: int) -> int:
        return int(np.ctypeslib.as_array(self.L.llama_get_logits_ith(self.ctx, i), shape=(self.n_vocab,)).argmax())

    def single_decode_tok_s(self, prompt_len: int, n: int) -> float:
        self.L.llama_memory_clear(self.L.llama_get_memory(self.ctx), True)
        self.decode([(1000 + j, j, 0, j == prompt_len - 1) for j in range(prompt_len)])
        tok = self.argmax(-1)
        started = time.perf_counter()
        for i in range(n):
            self.decode([(tok, prompt_len + i, 0, True)])
            tok = self.argmax(0)
        return n / (time.perf_counter() - started)

    def greedy(self, prompt: list[int], n: int) -> tuple[list[int], float]:
        """Greedy decoding of ``n`` tokens after ``prompt`` (never stopping early); the tokens and the decode
        rate of tokens 2..n (the first comes from the prefill, as an engine's first streamed token does)."""
        self.L.llama_memory_clear(self.L.llama_get_memory(self.ctx), True)
        for start in range(0, len(prompt), 512):
            chunk = prompt[start:start + 512]
            self.decode([(t, start + j, 0, start + j == len(prompt) - 1) for j, t in enumerate(chunk)])
        tok = self.argmax(len(prompt) - 1 - (len(prompt) - 1) // 512 * 512)
        out = [tok]
        started = time.perf_counter()
        for i in range(n - 1):
            self.decode([(tok, len(prompt) + i, 0, True)])
            tok = self.argmax(0)
            out.append(tok)
        return out, (n - 1) / max(time.perf_counter() - started, 1e-9)

    def batched_decode_tok_s(self, n_seq: int, prompt_len: int, steps: int) -> float:
        """n_seq sequences of prompt_len tokens, then `steps` decode steps with all of them in one batch."""
        self.L.llama_memory_clear(self.L.llama_get_memory(self.ctx), True)
        toks = []
        for s in range(n_seq):  # one prefill per sequence, so n_seq x prompt_len may exceed the batch (untimed)
            self.decode([(1000 + (s * prompt_len + j) % 5000, j, s, j == prompt_len - 1) for j in range(prompt_len)])
            toks.append(self.argmax(prompt_len - 1))
        started = time.perf_counter()
        for step in range(steps):
            self.decode([(toks[s], prompt_len + step, s, True) for s in range(n_seq)])
            toks = [self.argmax(i) for i in range(n_seq)]
        return n_seq * steps / (time.perf_counter() - started)

    def close(self) -> None:
        self.L.llama_batch_free(self.batch)
        self.L.llama_free(self.ctx)
        self.L.llama_model_free(self.model)


def measure(path: str, threads: int, mode: str, n_seq: int = 1, prompt_len: int = 32, tokens: int = 96,
            repeats: int = 1, n_gpu_layers: int = 0) -> list[float]:
    """Run the raw baseline in a fresh interpreter: two llama.cpp instances in one process slow each other
    down (measured here: a context created and freed before the engine's cost it a third of its speed)."""
    import json
    import subprocess
    import sys

    code = ("import json, sys; sys.path.insert(0, %r); from _raw import RawLlama\n"
            "r = RawLlama(%r, %d, n_seq=%d, n_ctx=%d, n_gpu_layers=%d)\n"
            "out = [r.single_decode_tok_s(%d, %d) if %r == 'single' else r.batched_decode_tok_s(%d, %d, %d)"
            " for _ in range(%d)]\n"
            "r.close(); print(json.dumps(out))\n") % (
        __file__.rsplit("/", 1)[0], path, threads, n_seq, max(4096, n_seq * (prompt_len + tokens) + 64), n_gpu_layers,
        prompt_len, tokens, mode, n_seq, prompt_len, tokens, repeats)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def prompt_tokens(path: str, prompts: list[str]) -> int:
    """The prompts' mean length in tokens as the engine reads them (BOS added): the raw baseline's prompt_len."""
    import statistics

    import llama_cpp

    vocab = llama_cpp.Llama(path, vocab_only=True, verbose=False)
    return round(statistics.mean(len(vocab.tokenize(p.encode(), add_bos=True, special=False)) for p in prompts))
