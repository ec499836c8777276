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
    # Checked before a schema becomes a grammar: llama.cpp parses grammars recursively on the
    # model's worker thread, and a bound like maxLength 20000 used to overflow its stack.
    schema_max_bytes: int = 64 * 1024       # one schema (response_format, or one tool's parameters) as JSON
    schema_max_depth: int = 32              # subschemas inside subschemas (objects in arrays in objects...)
    schema_max_repetition: int = 2000       # min|maxLength, min|maxItems, min|maxProperties, min|maxContains
    schema_max_properties: int = 500        # properties of all objects of one schema together
    schema_max_enum: int = 500              # enum values of one schema together (each costs grammar work per token)
    grammar_max_bytes: int = 512 * 1024     # the grammar a schema (or all tools together) becomes
    grammar_max_nesting: int = 128          # nested groups in that grammar (a pattern's a{0,n} nests n deep)

    # -- audio -----------------------------------------------------------------------------

    # Longest audio a transcription accepts, read from the container before decoding and enforced while
    # decoding (decode_audio's 16 kHz float32 buffer is at most this long: 1 h = 230 MB; a transcription
    # holds only one window of it, transcription_window_s).
    max_audio_seconds: float = 3600.0
    # Source sample rates accepted (Hz); outside them a file is refused before decoding.
    min_audio_sample_rate: int = 1000
    max_audio_sample_rate: int = 384000
    # Wall-clock budget of one transcription: base + per_audio_second x the audio's duration. Past it the
    # request ends with a TimeoutError (HTTP 504) instead of holding the speech worker.
    transcription_seconds_base: float = 60.0
    transcription_seconds_per_audio_second: float = 2.0
    # Token budget of one transcription: base + per_audio_second x duration (speech runs at 3-5 tokens/s;
    # a decoder stuck repeating itself runs past this and is stopped with a TimeoutError).
    transcription_tokens_base: int = 256
    transcription_tokens_per_audio_second: float = 20.0
    # Audio longer than this is decoded, cut at a pause by VAD and transcribed in windows of about this many
    # seconds as the file streams in, so what one transcription holds stays flat with the audio's duration.
    transcription_window_s: float = 120.0
    # Speech requests (transcription, translation, speech) waiting or running per speech model; past it
    # a RateLimitError (429) with retry_after.
    max_speech_queue: int = 16

    # -- HTTP ------------------------------------------------------------------------------
    max_body_bytes: int = 64 * 1024 * 1024    # largest request body (413 past it, connection closed)
    max_json_depth: int = 64                  # deepest nesting of a JSON body (400 past it)
    header_timeout_s: float = 10.0            # request line and headers must arrive within this (408, closed)
    body_timeout_s: float = 60.0              # the whole declared body must arrive within this (408, closed)
    keep_alive_timeout_s: float = 15.0        # an idle connection is closed after this long without a request
    socket_timeout_s: float = 60.0            # any single read or write that stalls this long ends the connection
    max_connections: int = 64                 # open connections; past it a new one gets 503 and is closed
    max_connections_per_address: int = 32     # open connections from one address (IPv6: one /64); 503 past it
    auth_failures_per_minute: int = 10        # failed API-key checks per client address (IPv6: /64) (429 past it)
    auth_failures_global_per_minute: int = 100  # failed API-key checks from all addresses together (429 past it)
    drain_timeout_s: float = 10.0             # on SIGTERM: how long in-flight requests may finish before exit


DEFAULT_LIMITS = Limits()
