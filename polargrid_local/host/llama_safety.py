"""Keeping the host alive on llama.cpp builds that crash on this CPU.

A native build of llama-cpp-python (plain ``pip install``) compiles ggml's AMX backend in when the build machine
advertises AMX. On virtual machines that advertise AMX without enabling it, the first quantized matmul placed in
the AMX buffer type kills the process (SIGSEGV in ``ggml_backend_amx_mul_mat``): no Python exception, no error
message. Before the first model load we compare the CPU's flags with the build's (``llama_print_system_info``);
when the two meet, weights are kept out of the extra buffer types (AMX, and also the CPU repack layouts) through
llama.cpp's ``llama_model_params.use_extra_bufts = False``. llama-cpp-python's ``Llama`` has no argument for it,
so the library's default model parameters are wrapped once, for the whole process (the CPU and the build are
the same for every load). Where the field does not exist, loading is refused with an error naming the fix.
"""
from __future__ import annotations

import logging
import os
import re
import threading
from dataclasses import dataclass

from ..errors import ServerError
from .build_llama import cpu_flags

logger = logging.getLogger("polargrid_local")

AMX_CPU_FLAGS = ("amx_tile", "amx_int8", "amx_bf16")
FIX = "polargrid-local install-llama"  # rebuilds llama-cpp-python with flags read from this CPU (AMX off)
_AMX_IN_BUILD = re.compile(r"\bAMX(?:_INT8|_BF16|_TILE)?\s*=\s*1\b")
_lock = threading.Lock()
_original_defaults = None


class UnsafeLlamaBuild(ServerError):
    """The installed llama.cpp would crash on this CPU and cannot be loaded safely."""

    def __init__(self, message: str) -> None:
        super().__init__(message, 500)


@dataclass(frozen=True)
class LlamaCpuFacts:
    """What the CPU advertises and what the llama.cpp build has compiled in."""

    cpu_amx: tuple[str, ...]
    build_amx: bool
    system_info: str

    @property
    def crash_prone(self) -> bool:
        return bool(self.cpu_amx) and self.build_amx


def system_info() -> str:
    """llama.cpp's own account of its build: ``CPU : AVX2 = 1 | ... | AMX_INT8 = 1 | REPACK = 1 |``."""
    import llama_cpp

    info = llama_cpp.llama_print_system_info()
    return info.decode("utf-8", "replace") if isinstance(info, bytes) else str(info)


def facts() -> LlamaCpuFacts:
    info = system_info()
    return LlamaCpuFacts(tuple(f for f in AMX_CPU_FLAGS if f in cpu_flags()), bool(_AMX_IN_BUILD.search(info)), info)


def safe_load_supported() -> bool:
    """True when this llama-cpp-python exposes ``llama_model_params.use_extra_bufts``."""
    from llama_cpp import llama_cpp as lib

    return any(name == "use_extra_bufts" for name, *_ in getattr(lib.llama_model_params, "_fields_", ()))


# llama.cpp's repacked weights (its "extra buffer types" on AVX2/AVX512) multiply a batch of several tokens with
# other kernels than one token, which round differently: a greedy answer can then change at a near-tie with the
# shape of the batch (a reused prompt prefix, verified drafts). Without them every token's logits are the same
# whatever the batch, at some cost in speed (benchmarks/results/safe_load.json).
EXACT_ENV = "POLARGRID_LOCAL_EXACT"


def set_extra_bufts(enabled: bool) -> None:
    """Process-wide: whether models loaded from now on may use llama.cpp's extra buffer types (AMX, repack)."""
    global _original_defaults
    from llama_cpp import llama_cpp as lib

    with _lock:
        if enabled:
            if _original_defaults is not None:
                lib.llama_model_default_params = _original_defaults
                _original_defaults = None
            return
        if _original_defaults is not None:
            return
        original = lib.llama_model_default_params

        def without_extra_bufts():
            params = original()
            params.use_extra_bufts = False
            return params

        _original_defaults = original
        lib.llama_model_default_params = without_extra_bufts


def extra_bufts_enabled() -> bool:
    return _original_defaults is None


def ensure_safe_llama() -> LlamaCpuFacts:
    """Call before loading a GGUF: makes the load safe on a crash-prone CPU/build pair, or raises UnsafeLlamaBuild.
    With ``POLARGRID_LOCAL_EXACT=1`` models load without repacked weights (see EXACT_ENV)."""
    if os.environ.get(EXACT_ENV, "").strip().lower() in ("1", "true", "yes", "on") and extra_bufts_enabled():
        set_extra_bufts(False)
    found = facts()
    if not found.crash_prone:
        return found
    if not safe_load_supported():
        raise UnsafeLlamaBuild(
            f"This CPU advertises AMX ({', '.join(found.cpu_amx)}) and the installed llama-cpp-python was built "
            f"with its AMX backend, a pair that crashes the process on the first matmul on many virtual machines; "
            f"this llama-cpp-python cannot keep weights out of AMX. Fix: run `{FIX}` (add --cuda for a GPU build), "
            f"which rebuilds it with flags read from this CPU.")
    if extra_bufts_enabled():
        logger.warning("CPU advertises AMX and llama.cpp was built with AMX: loading models with "
                       "use_extra_bufts=False (no AMX/repack buffers). `%s` rebuilds llama.cpp without AMX.", FIX)
        set_extra_bufts(False)
    return found
