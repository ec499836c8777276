"""Every bound the engine and the HTTP server enforce, in one place: defaults, and how to change them.

``LocalEngine(limits=Limits(...))`` sets them for a process (the server reads the engine's); each field's
comment says what it bounds. A request past a limit gets a ValidationError (400) or RateLimitError (429)
that names the limit, never a crash or a silent truncation.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Limits:
    """The bounds one LocalEngine (and the server in front of it) enforces."""

    # -- requests (engine) ----------------------------------------------------------------
    # Wall-clock bound on one request, queueing included: past it the request ends with
    # polargrid.TimeoutError (504 over HTTP) and its work is cancelled at the next step.
    request_timeout_s: float = 600.0
    # Prompts in one completions request; each one counts against the model's queue.
    max_prompts: int = 16
    # Strings in one embeddings request.
    max_embedding_inputs: int = 2048
    # Embedding inputs embedded per llama.cpp call; cancellation (unload, timeout) is checked between calls.
    embedding_batch: int = 8
    # How long unload waits for a model's thread to stop and free its memory before answering
    # (the memory is then freed by that thread when its current step ends; the answer says so).
    unload_wait_s: float = 10.0

    # -- JSON schemas (response_format, tools) ---------------------------------------------

    # -- audio -----------------------------------------------------------------------------

    # -- HTTP ------------------------------------------------------------------------------


DEFAULT_LIMITS = Limits()
