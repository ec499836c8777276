"""`polargrid-local doctor`: the checks for what breaks installs, one row each, with the fix for each problem.

A check is ok, warn (works, but worth knowing) or fail (something will break). The command exits non-zero
when any check fails. Checks never load a model; the llama.cpp check imports llama_cpp (its system info).
"""
from __future__ import annotations

import os
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from ..store.registry import Registry

OK, WARN, FAIL = "ok", "warn", "fail"
DEFAULT_PORT = 55111
MIN_FREE_DISK = 2 * 1024 ** 3
# llama.cpp system-info feature -> /proc/cpuinfo flag: a build using an instruction the CPU lacks dies with SIGILL
BUILD_FEATURES = {"AVX": "avx", "AVX2": "avx2", "AVX_VNNI": "avx_vnni", "F16C": "f16c", "FMA": "fma", "BMI2": "bmi2",
                  "AVX512": "avx512f", "AVX512_VBMI": "avx512vbmi", "AVX512_VNNI": "avx512_vnni",
                  "AVX512_BF16": "avx512_bf16", "AMX_INT8": "amx_int8"}
ENCODED_FORMATS = {"mp3": "libmp3lame", "opus": "libopus", "aac": "aac", "flac": "flac", "wav/pcm": "pcm_s16le"}


@dataclass(frozen=True)
class Check:
    name: str
    status: str
    detail: str
    fix: str = ""


def check_llama_build() -> list[Check]:
    from .llama_safety import FIX, cpu_flags, facts, safe_load_supported

    try:
        found = facts()
    except Exception as exc:
        return [Check("llama.cpp build", FAIL, f"llama-cpp-python does not import: {exc}", f"run `{FIX}`")]
    flags = cpu_flags()
    on = {name.strip() for name, value in (p.split("=", 1) for p in _features(found.system_info))
          if value.strip() == "1"}
    missing = sorted(f for f in on if f in BUILD_FEATURES and flags and BUILD_FEATURES[f] not in flags)
    checks = []
    if missing:
        checks.append(Check("llama.cpp build", FAIL, f"built for instructions this CPU lacks: {', '.join(missing)} "
                            "(the first model load dies with an illegal instruction)", f"run `{FIX}`"))
    elif found.crash_prone:
        status = WARN if safe_load_supported() else FAIL
        checks.append(Check("llama.cpp build", status, f"AMX build on a CPU advertising {', '.join(found.cpu_amx)}: "
                            + ("models load with use_extra_bufts=False (safe, slower)" if status == WARN
                               else "loading a model would crash the process"), f"run `{FIX}`"))
    else:
        matched = ", ".join(sorted(on & set(BUILD_FEATURES)))
        checks.append(Check("llama.cpp build", OK, "flags match this CPU: " + matched))
    return checks


def _features(info: str) -> Iterable[str]:
    for line in info.splitlines():
        _, _, rest = line.partition(":")
        for part in rest.split("|"):
            if "=" in part:
                yield part.strip()


def check_cuda(nvml) -> list[Check]:
    from .gpu import cuda_build

    devices = nvml.device_count()
    built = cuda_build()
    rows = [Check("NVML", OK if devices else WARN if built else OK,
                  f"{devices} NVIDIA device(s)" if devices else "no NVIDIA driver or device (CPU only)",
                  "install the NVIDIA driver" if built and not devices else "")]
    if built and devices:
        rows.append(Check("CUDA", OK, "llama.cpp has a GPU backend and a device is present"))
    elif devices:
        rows.append(Check("CUDA", WARN, "a GPU is present but llama.cpp is a CPU build",
                          "run `polargrid-local install-llama --cuda`"))
    elif built:
        rows.append(Check("CUDA", WARN, "llama.cpp has a GPU backend but there is no device; models run on the CPU"))
    else:
        rows.append(Check("CUDA", OK, "CPU build, no GPU"))
    return rows


def check_numba_cache() -> Check:
    import importlib.util

    kernels = importlib.util.find_spec("polargrid_local.kernels")  # numba caches beside the kernels' sources
    locations = list(kernels.submodule_search_locations or []) if kernels else []
    beside = Path(locations[0]) if locations else Path(__file__).parent.parent / "kernels"
    path = Path(os.environ.get("NUMBA_CACHE_DIR") or beside / "__pycache__")
    probe = path
    while not probe.exists() and probe != probe.parent:  # numba creates the folder: its parent must be writable
        probe = probe.parent
    try:
        with tempfile.NamedTemporaryFile(dir=probe):
            pass
    except OSError as exc:
        return Check("numba cache", WARN, f"{path} is not writable ({exc.strerror}): kernels compile in every process",
                     "set NUMBA_CACHE_DIR to a writable folder")
    return Check("numba cache", OK, f"{path} is writable")


def check_codecs() -> Check:
    try:
        import av
    except Exception as exc:
        return Check("audio codecs", FAIL, f"PyAV does not import: {exc}", "pip install --force-reinstall av")
    missing = []
    for fmt, codec in ENCODED_FORMATS.items():
        try:
            av.codec.Codec(codec, "w")
        except Exception:
            missing.append(f"{fmt} ({codec})")
    if missing:
        return Check("audio codecs", FAIL, f"PyAV cannot encode: {', '.join(missing)}",
                     "install the PyAV wheel from PyPI (its FFmpeg has every codec): pip install --force-reinstall av")
    return Check("audio codecs", OK, "encoders for " + ", ".join(ENCODED_FORMATS))


def check_disk(registry: Registry) -> Check:
    folder = registry.cache_dir
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    status = OK if free >= MIN_FREE_DISK else WARN
    return Check("disk", status, f"{free / 1024 ** 3:.1f} GB free for {folder}",
                 "" if status == OK else "free some disk, or set POLARGRID_LOCAL_CACHE to a larger disk")


def check_models(registry: Registry, verify: bool = True) -> list[Check]:
    from ..store.pull import is_pulled, model_dir, sha256_file

    rows = []
    for spec in registry.models:
        if not is_pulled(registry, spec):
            partly = not spec.local and model_dir(registry, spec).exists()
            if partly:
                rows.append(Check(f"model {spec.id}", FAIL, "partly pulled",
                                  f"polargrid-local pull {spec.id}"))
            continue
        bad = []
        if verify and not spec.local:
            for f in spec.files:
                if f.sha256 and sha256_file(model_dir(registry, spec) / f.path) != f.sha256:
                    bad.append(f.path)
        if bad:
            rows.append(Check(f"model {spec.id}", FAIL, f"sha256 mismatch: {', '.join(bad)}",
                              f"polargrid-local pull --force {spec.id}"))
        else:
            rows.append(Check(f"model {spec.id}", OK, "pulled" + (", sha256 verified" if verify else "")))
    if not rows:
        rows.append(Check("models", WARN, "no model is pulled", "polargrid-local pull"))
    return rows


def check_port(port: int = DEFAULT_PORT, host: str = "127.0.0.1") -> Check:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return Check("port", WARN, f"{host}:{port} is in use (a running `polargrid-local serve`?)",
                         "stop what listens there, or serve with --port")
    return Check("port", OK, f"{host}:{port} is free")


def run_checks(registry: Registry, *, verify: bool = True, port: int = DEFAULT_PORT, nvml=None) -> list[Check]:
    from .gpu import NvmlProbe

    steps: list[Callable[[], Check | list[Check]]] = [
        check_llama_build, lambda: check_cuda(nvml or NvmlProbe()), check_numba_cache, check_codecs,
        lambda: check_disk(registry), lambda: check_models(registry, verify), lambda: check_port(port)]
    rows: list[Check] = []
    for step in steps:
        try:
            result = step()
        except Exception as exc:  # a broken check is a finding, not a crash of the doctor
            result = Check(getattr(step, "__name__", "check"), FAIL, f"{type(exc).__name__}: {exc}")
        rows.extend(result if isinstance(result, list) else [result])
    return rows


def render(rows: list[Check]) -> str:
    width = max(len(r.name) for r in rows)
    lines = []
    for row in rows:
        lines.append(f"{row.status.upper():4}  {row.name:{width}}  {row.detail}")
        if row.fix and row.status != OK:
            lines.append(f"{'':4}  {'':{width}}  fix: {row.fix}")
    return "\n".join(lines)
