"""How a model is loaded, decided once: the engine's keyword arguments over the model's ``[models.engine]``
over the defaults. Memory admission estimates exactly what the factory then builds."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from ..host.gpu import NvmlProbe, cuda_build
from ..store.registry import ModelSpec


def resolve_gpu_layers(value: Any, nvml: NvmlProbe | None = None) -> int:
    """'auto' (or None) means every layer when this is a CUDA build with a CUDA device, else none."""
    if value is None or value == "auto":
        return -1 if cuda_build() and (nvml or NvmlProbe()).device_count() > 0 else 0
    return int(value)


@dataclass(frozen=True)
class LoadSettings:
    """What a model is loaded with. ``n_gpu_layers`` is as asked ("auto", or a count; -1: all) until
    ``resolved`` settles "auto" for this machine (which asks llama.cpp whether it is a CUDA build)."""

    n_ctx: int = 2048            # tokens per sequence
    n_parallel: int = 8          # sequences decoded together (chat); 1: one request at a time
    max_queue: int = 64          # requests waiting beyond those (chat)
    n_batch: int = 512
    n_threads: int = 0           # 0: one per CPU this process may use
    n_gpu_layers: int | str = "auto"
    main_gpu: int = 0
    tensor_split: list[float] | None = None
    flash_attn: bool = False
    chat_template: str | None = None
    speculative: str = "prompt-lookup"   # chat: "prompt-lookup" drafts (llm/drafting.py) or "off"
    prompt_cache: Any = None     # llm/prompt_cache.py's PromptCacheConfig (chat), or None: off

    @classmethod
    def resolve(cls, spec: ModelSpec, overrides: dict[str, Any]) -> LoadSettings:
        """The settings of ``spec`` under the engine's ``overrides`` (None values do not override)."""
        fields = {f.name for f in dataclasses.fields(cls)}
        merged = dict(spec.engine)
        # An engine-wide n_parallel or max_queue of 0 means "not set" (as a keyword's default would); a model's
        # own max_queue = 0 means no queue.
        merged.update({k: v for k, v in overrides.items() if k in fields and v is not None
                       and not (k in ("n_parallel", "max_queue") and v == 0)})
        values = {k: merged[k] for k in fields if merged.get(k) is not None}
        for key in ("n_ctx", "n_parallel", "max_queue", "n_batch", "n_threads", "main_gpu"):
            if key in values:
                values[key] = int(values[key])
        return cls(**values)

    @property
    def wants_gpu(self) -> bool:
        """False when the user asked for no GPU (0 layers); speech engines have no layers to count."""
        return self.n_gpu_layers not in (0, "0")

    def resolved(self, nvml: NvmlProbe | None = None) -> LoadSettings:
        """These settings with ``n_gpu_layers`` a number: "auto" is every layer on a CUDA build with a device."""
        if isinstance(self.n_gpu_layers, int):
            return self
        return dataclasses.replace(self, n_gpu_layers=resolve_gpu_layers(self.n_gpu_layers, nvml))

    def replace(self, **changes: Any) -> LoadSettings:
        return dataclasses.replace(self, **changes)

    def llama(self) -> dict[str, Any]:
        """The keyword arguments of LlamaBackend."""
        return {"n_ctx": self.n_ctx, "n_threads": self.n_threads, "n_batch": self.n_batch,
                "n_gpu_layers": self.resolved().n_gpu_layers, "main_gpu": self.main_gpu,
                "tensor_split": self.tensor_split,
                "flash_attn": self.flash_attn, "chat_template": self.chat_template}
