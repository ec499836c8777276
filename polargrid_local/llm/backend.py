"""LlamaBackend: one llama.cpp model, its tokenizer, chat template, token stream and embeddings.

Runs only on its model's worker thread; nothing here is shared between threads.
"""
from __future__ import annotations

import codecs
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..runtime.compute import on_lane
from .generation import DEFAULT_SEED, SamplingParams, StopMatcher, TextDelta

logger = logging.getLogger("polargrid_local")

def available_cpus() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - macOS, Windows
        return max(1, os.cpu_count() or 1)


class LlamaBackend:
    """Loads a GGUF with llama-cpp-python and generates from token prompts."""

    def __init__(self, path: str | Path, *, n_ctx: int = 2048, n_threads: int = 0, n_gpu_layers: int = 0,
                 n_batch: int = 512, embedding: bool = False, chat_template: str | None = None,
                 main_gpu: int = 0, tensor_split: list[float] | None = None, normalize: bool = True,
                 pooling: str | None = None, flash_attn: bool = False, tokenizer: str | Path | None = None) -> None:
        import llama_cpp

        self._llama_cpp = llama_cpp
        threads = n_threads or available_cpus()
        kwargs: dict[str, Any] = {}
        if pooling:
            kwargs["pooling_type"] = {"none": 0, "mean": 1, "cls": 2, "last": 3, "rank": 4}[pooling]
        if tokenizer:
            from .hf_tokenizer import HFTokenizer

            kwargs["tokenizer"] = HFTokenizer(tokenizer)
        self.llama = llama_cpp.Llama(
            model_path=str(path), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads,
            n_gpu_layers=n_gpu_layers, n_batch=n_batch, n_ubatch=min(n_batch, 512), embedding=embedding,
            main_gpu=main_gpu, tensor_split=tensor_split, flash_attn=flash_attn, verbose=False, **kwargs)
        self.path = Path(path)
        self.n_gpu_layers = n_gpu_layers
        self.n_threads = threads
        self.embedding = embedding
        self.normalize = normalize
        self.chat_template = chat_template or self.llama.metadata.get("tokenizer.chat_template")
        self._vocab = self.llama._model.vocab
        self._formatter: Any = None
        self.tokens_generated = 0  # lifetime count; shows that abandoned streams really stop

    # -- facts ---------------------------------------------------------------------------

    @property
    def n_ctx(self) -> int:
        return self.llama.n_ctx()

    @property
    def n_embd(self) -> int:
        """The width of the model's vectors."""
        return self.llama.n_embd()

    @property
    def weights_bytes(self) -> int:
        return self.path.stat().st_size

    @property
    def metadata(self) -> dict[str, str]:
        return dict(self.llama.metadata)

    # -- text ----------------------------------------------------------------------------

    def tokenize(self, text: str, *, add_bos: bool = True, special: bool = True) -> list[int]:
        return self.llama.tokenize(text.encode("utf-8"), add_bos=add_bos, special=special)

    def render_chat(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None) -> str:
        """Apply the model's chat template (from the GGUF, unless overridden in models.toml)."""
        if not self.chat_template:
            raise ValueError("this model has no chat template; set engine.chat_template in models.toml")
        if self._formatter is None:
            from llama_cpp.llama_chat_format import Jinja2ChatFormatter

            bos = self._token_text(self.llama.token_bos())
            eos = self._token_text(self.llama.token_eos())
            self._formatter = Jinja2ChatFormatter(self.chat_template, eos_token=eos, bos_token=bos)
        return self._formatter(messages=messages, tools=tools).prompt

    @property
    def template_mentions_tools(self) -> bool:
        return "tool" in (self.chat_template or "")

    def _token_text(self, token: int) -> str:
        if token < 0:
            return ""
        return self.llama.detokenize([token], special=True).decode("utf-8", errors="ignore")

    def add_bos_for_template(self, prompt: str) -> bool:
        """Templates usually write the BOS text themselves; add it only when they do not."""
        bos = self._token_text(self.llama.token_bos())
        return not (bos and prompt.startswith(bos))

    def stream(self, prompt_tokens: Sequence[int], params: SamplingParams, max_tokens: int,
               stop: Sequence[str] = (), cancelled: Callable[[], bool] = lambda: False) -> Iterator[TextDelta]:
        """Generate up to max_tokens after the prompt; text arrives as soon as it is safe to show."""
        llama_cpp = self._llama_cpp
        grammar = None
        if params.grammar:
            from llama_cpp.llama_grammar import LlamaGrammar

            grammar = LlamaGrammar.from_string(params.grammar.gbnf, verbose=False)
        self.llama.set_seed(DEFAULT_SEED if params.seed is None else params.seed & 0xFFFFFFFF)
        if params.seed is not None:
            # A reused prefix changes how the prompt is batched, which moves logits by rounding
            # error; a seeded request evaluates its whole prompt so the same seed gives the same text.
            self.llama.reset()
        room = self.n_ctx - len(prompt_tokens)
        budget = min(max_tokens, room)
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        held = StopMatcher(stop)
        history = list(prompt_tokens)
        produced = 0
        finish = "length"
        generator = self.llama.generate(
            prompt_tokens, top_k=params.top_k, top_p=params.top_p, min_p=params.min_p, temp=params.temperature,
            repeat_penalty=params.repetition_penalty, frequency_penalty=params.frequency_penalty,
            presence_penalty=params.presence_penalty, grammar=grammar)
        try:
            while produced < budget:
                if cancelled():
                    return
                token = on_lane(next, generator)   # llama.cpp computes on the process's compute lane
                if llama_cpp.llama_vocab_is_eog(self._vocab, token):
                    finish = "stop"
                    break
                produced += 1
                self.tokens_generated += 1
                piece = decoder.decode(self.llama.detokenize([token], prev_tokens=history))
                history.append(token)
                visible, hit = held.feed(piece)
                if hit:
                    finish = "stop"
                    if visible:
                        yield TextDelta(visible)
                    break
                if visible:
                    yield TextDelta(visible)
            else:
                finish = "length"
            if finish == "length" or not held.hit:
                tail = held.flush(decoder.decode(b"", final=True))
                if tail:
                    yield TextDelta(tail)
        finally:
            generator.close()
        yield TextDelta("", finish_reason=finish, prompt_tokens=len(prompt_tokens), completion_tokens=produced)

    # -- embeddings ----------------------------------------------------------------------

    def embed(self, texts: list[str]) -> tuple[list[list[float]], int]:
        """One pooled vector per text, and the number of tokens read."""
        vectors, count = on_lane(self.llama.embed, texts, normalize=False, truncate=False, return_count=True)
        out = []
        for vector in vectors:
            arr = np.asarray(vector, dtype=np.float32)
            if arr.ndim == 2:  # model without pooling: mean over tokens
                arr = arr.mean(axis=0)
            if self.normalize:
                norm = float(np.linalg.norm(arr))
                if norm > 0:
                    arr = arr / norm
            out.append(arr.tolist())
        return out, count

    def close(self) -> None:
        self.llama.close()
