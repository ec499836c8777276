"""GPU facts from NVML (nvidia-ml-py). On a machine without an NVIDIA driver every answer is 'no GPUs'."""
from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass

logger = logging.getLogger("polargrid_local")

MB = 1024 * 1024


@dataclass(frozen=True)
class DeviceFacts:
    index: int
    name: str
    total_bytes: int
    used_bytes: int
    free_bytes: int
    gpu_percent: int
    memory_percent: int
    temperature_c: int


@dataclass(frozen=True)
class ProcessFacts:
    pid: int
    name: str
    used_bytes: int


class NvmlProbe:
    """Reads devices and processes through NVML; initialises lazily, once."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._nvml = None
        self._tried = False

    def _handle(self):
        with self._lock:
            if not self._tried:
                self._tried = True
                try:
                    import pynvml

                    pynvml.nvmlInit()
                    self._nvml = pynvml
                except Exception as exc:  # no driver, no library: a CPU-only machine
                    logger.debug("NVML unavailable: %s", exc)
            return self._nvml

    @property
    def available(self) -> bool:
        return self._handle() is not None and self.device_count() > 0

    def device_count(self) -> int:
        nvml = self._handle()
        if nvml is None:
            return 0
        try:
            return int(nvml.nvmlDeviceGetCount())
        except Exception:
            return 0

    def devices(self) -> list[DeviceFacts]:
        nvml = self._handle()
        out: list[DeviceFacts] = []
        for index in range(self.device_count()):
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            memory = nvml.nvmlDeviceGetMemoryInfo(handle)
            try:
                util = nvml.nvmlDeviceGetUtilizationRates(handle)
                gpu_pct, mem_pct = int(util.gpu), int(util.memory)
            except Exception:
                gpu_pct = mem_pct = 0
            try:
                temp = int(nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU))
            except Exception:
                temp = 0
            name = nvml.nvmlDeviceGetName(handle)
            out.append(DeviceFacts(index, name.decode() if isinstance(name, bytes) else str(name),
                                   int(memory.total), int(memory.used), int(memory.free), gpu_pct, mem_pct, temp))
        return out

    def processes(self) -> list[ProcessFacts]:
        nvml = self._handle()
        seen: dict[int, ProcessFacts] = {}
        for index in range(self.device_count()):
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            for getter in ("nvmlDeviceGetComputeRunningProcesses", "nvmlDeviceGetGraphicsRunningProcesses"):
                try:
                    procs = getattr(nvml, getter)(handle)
                except Exception:
                    continue
                for proc in procs:
                    used = int(proc.usedGpuMemory or 0)
                    seen[proc.pid] = ProcessFacts(int(proc.pid), _process_name(int(proc.pid)), used)
        return list(seen.values())

    def used_by_this_process(self) -> int:
        pid = os.getpid()
        return sum(p.used_bytes for p in self.processes() if p.pid == pid)


def _process_name(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm", encoding="utf-8") as f:
            return f.read().strip()
    except OSError:
        return str(pid)


def cuda_build() -> bool:
    """True when llama-cpp-python was built with a GPU backend."""
    try:
        import llama_cpp

        return bool(llama_cpp.llama_supports_gpu_offload())
    except Exception:
        return False


def resident_bytes() -> int:
    """This process's resident memory (Linux); 0 where it cannot be read."""
    try:
        with open("/proc/self/statm", encoding="ascii") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0
