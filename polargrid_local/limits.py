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

    # -- JSON schemas (response_format, tools) ---------------------------------------------
    # Checked before a schema becomes a grammar: llama.cpp parses grammars recursively on the
    # model's worker thread, and a bound like maxLength 20000 used to overflow its stack.
    schema_max_bytes: int = 64 * 1024       # one schema (response_format, or one tool's parameters) as JSON
    schema_max_depth: int = 32              # subschemas inside subschemas (objects in arrays in objects...)
    schema_max_repetition: int = 2000       # any minLength/maxLength/minItems/maxItems/min|maxProperties/min|maxContains
    schema_max_properties: int = 500        # properties of all objects of one schema together
    schema_max_enum: int = 500              # enum values of one schema together (each costs grammar work per token)
    grammar_max_bytes: int = 512 * 1024     # the grammar a schema (or all tools together) becomes
    grammar_max_nesting: int = 128          # nested groups in that grammar (a pattern's a{0,n} nests n deep)

    # -- audio -----------------------------------------------------------------------------

    # -- HTTP ------------------------------------------------------------------------------


DEFAULT_LIMITS = Limits()
