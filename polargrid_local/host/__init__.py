"""Facts about and guards for the machine the engine runs on: GPUs (NVML), malloc arenas, the llama.cpp
build and its safety check, install diagnostics, and the offline guard."""
