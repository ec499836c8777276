"""Build and install llama-cpp-python for the CPU (or CUDA device) this machine has (`polargrid-local install-llama`).

The upstream sdist builds with ``GGML_NATIVE=ON`` by default. On some virtual
machines the CPU advertises AMX but the hypervisor does not enable it, and the
native build then crashes in ``ggml_backend_amx_mul_mat``. We instead read the
instruction sets from ``/proc/cpuinfo`` and pass them explicitly, AMX off unless
asked for. The wheel is built once per (version, flags) and kept in a cache
folder, so later ``make`` runs install it without rebuilding.

Usage: polargrid-local install-llama [--cuda] [--cuda-arch 90] [--print-flags]
   or: python scripts/build_llama_cpp.py ...   (the Makefile's way, before the project is installed)
Stdlib only: it runs before the project is installed. A file lock in the wheel cache lets two builds
(two `make` runs) wait for each other instead of racing on the same cache folder.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

LLAMA_CPP_PYTHON_VERSION = "0.3.36"

# /proc/cpuinfo flag -> ggml CMake option
X86_FLAGS = {
    "avx": "GGML_AVX",
    "avx2": "GGML_AVX2",
    "fma": "GGML_FMA",
    "f16c": "GGML_F16C",
    "bmi2": "GGML_BMI2",
    "avx512f": "GGML_AVX512",
    "avx512vbmi": "GGML_AVX512_VBMI",
    "avx512_vnni": "GGML_AVX512_VNNI",
    "avx512_bf16": "GGML_AVX512_BF16",
    "avx_vnni": "GGML_AVX_VNNI",
}
AMX_FLAGS = {"amx_tile": "GGML_AMX_TILE", "amx_int8": "GGML_AMX_INT8", "amx_bf16": "GGML_AMX_BF16"}


def cpu_flags() -> set[str]:
    """The instruction-set flags of this CPU from /proc/cpuinfo (empty where unknown)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def cmake_args(cuda: bool, cuda_arch: str | None, allow_amx: bool) -> list[str]:
    args = ["-DGGML_NATIVE=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF"]
    if platform.machine().lower() in ("x86_64", "amd64"):
        flags = cpu_flags()
        for flag, option in X86_FLAGS.items():
            args.append(f"-D{option}={'ON' if flag in flags else 'OFF'}")
        for flag, option in AMX_FLAGS.items():
            on = allow_amx and flag in flags
            args.append(f"-D{option}={'ON' if on else 'OFF'}")
    else:
        # Non-x86 (aarch64): ggml's native detection is reliable there.
        args[0] = "-DGGML_NATIVE=ON"
    if cuda:
        args.append("-DGGML_CUDA=ON")
        args.append(f"-DCMAKE_CUDA_ARCHITECTURES={cuda_arch or 'native'}")
    return args


def wheel_cache_dir(args: list[str]) -> Path:
    base = wheel_cache_root()
    key = hashlib.sha256(" ".join([LLAMA_CPP_PYTHON_VERSION, sys.version.split()[0], *args]).encode()).hexdigest()[:16]
    return base / f"llama-cpp-python-{LLAMA_CPP_PYTHON_VERSION}-{key}"


def wheel_cache_root() -> Path:
    return Path(os.environ.get("POLARGRID_LOCAL_WHEELS")
                or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "polargrid-local" / "wheels")


@contextlib.contextmanager
def cache_lock(root: Path):
    """An exclusive lock on the wheel cache, held while a wheel is looked up or built (waits for the holder)."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "a+") as handle:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows: no lock, as before
            yield
            return
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def cached_wheel(args: list[str], python: str, build=None) -> Path:
    """The wheel for these flags, built into the cache under its lock if it is not there yet."""
    cache = wheel_cache_dir(args)
    with cache_lock(cache.parent):
        wheels = sorted(cache.glob("llama_cpp_python-*.whl"))
        if wheels:
            print(f"reusing {wheels[-1]}")
            return wheels[-1]
        print(f"building llama-cpp-python {LLAMA_CPP_PYTHON_VERSION} with CMAKE_ARGS={' '.join(args)}", flush=True)
        tmp = cache.parent / (cache.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        (build or _pip_wheel)(args, python, tmp)
        shutil.rmtree(cache, ignore_errors=True)
        tmp.rename(cache)
        return sorted(cache.glob("llama_cpp_python-*.whl"))[-1]


def _pip_wheel(args: list[str], python: str, folder: Path) -> None:
    env = dict(os.environ, CMAKE_ARGS=" ".join(args), CMAKE_BUILD_PARALLEL_LEVEL=str(os.cpu_count() or 2))
    subprocess.run([python, "-m", "pip", "wheel", "--no-deps", "--no-binary", "llama-cpp-python",
                    "-w", str(folder), f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}"], env=env, check=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="polargrid-local install-llama", description=__doc__.splitlines()[0])
    parser.add_argument("--cuda", action="store_true", help="build with the CUDA backend")
    parser.add_argument("--cuda-arch", help="CMAKE_CUDA_ARCHITECTURES, e.g. 90 for Hopper (default: native)")
    parser.add_argument("--allow-amx", action="store_true", help="enable AMX when the CPU advertises it")
    parser.add_argument("--print-flags", action="store_true", help="print CMAKE_ARGS and exit")
    parser.add_argument("--python", default=sys.executable, help="interpreter whose environment gets the wheel")
    opts = parser.parse_args(argv)

    args = cmake_args(opts.cuda, opts.cuda_arch, opts.allow_amx)
    if opts.print_flags:
        print(" ".join(args))
        return 0
    wheel = cached_wheel(args, opts.python)
    subprocess.run([opts.python, "-m", "pip", "install", "--quiet", "--force-reinstall", "--no-deps", str(wheel)],
                   check=True)
    subprocess.run([opts.python, "-m", "pip", "install", "--quiet", "typing-extensions>=4.5", "numpy>=1.20",
                    "diskcache>=5.6.1", "jinja2>=2.11.3"], check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
