"""The cost of the safe load (use_extra_bufts=False: no AMX / repack buffers) against the normal load.

Same GGUF, threads, prompt and token counts; the two loads alternate, and the medians are compared.
Writes benchmarks/results/safe_load.json with ratios safe/normal (1.0 = no cost; below 1 = slower).
Usage: python benchmarks/bench_safe_load.py [--rounds 3] [--threads 1] [--models smollm2-135m-instruct gemma3-270m]
(On a loaded machine use --threads 1: llama.cpp's threads wait on each other, and a starved one stalls both.)
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from polargrid_local import Registry
from polargrid_local.host.llama_safety import set_extra_bufts, system_info

OUT = Path(__file__).resolve().parent / "results" / "safe_load.json"


def measure(path: str, threads: int, prompt_tokens: int, gen_tokens: int) -> dict[str, float]:
    import llama_cpp

    llama = llama_cpp.Llama(model_path=path, n_ctx=1024, n_threads=threads, n_threads_batch=threads, n_batch=512,
                            verbose=False)
    try:
        prompt = [1000 + (i * 7) % 5000 for i in range(prompt_tokens)]
        started = time.perf_counter()
        llama.eval(prompt)
        prompt_s = time.perf_counter() - started
        token = int(llama.scores[llama.n_tokens - 1].argmax())
        started = time.perf_counter()
        for _ in range(gen_tokens):
            llama.eval([token])
            token = int(llama.scores[llama.n_tokens - 1].argmax())
        gen_s = time.perf_counter() - started
        return {"prompt_tok_s": prompt_tokens / prompt_s, "gen_tok_s": gen_tokens / gen_s}
    finally:
        llama.close()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt-tokens", type=int, default=256)
    parser.add_argument("--gen-tokens", type=int, default=64)
    parser.add_argument("--models", nargs="*", default=["smollm2-135m-instruct", "gemma3-270m"])
    opts = parser.parse_args()
    registry = Registry.load()
    report = {"threads": opts.threads, "prompt_tokens": opts.prompt_tokens, "gen_tokens": opts.gen_tokens,
              "rounds": opts.rounds, "system_info": system_info().strip(), "models": {}}
    for name in opts.models:
        spec = registry.get(name)
        path = str(spec.path_in(registry.cache_dir))
        if not Path(path).is_file():
            print(f"skip {name}: not pulled")
            continue
        runs: dict[str, list[dict[str, float]]] = {"normal": [], "safe": []}
        for _ in range(opts.rounds):
            for mode in ("normal", "safe"):
                set_extra_bufts(mode == "normal")
                runs[mode].append(measure(path, opts.threads, opts.prompt_tokens, opts.gen_tokens))
        set_extra_bufts(True)
        med = {mode: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for mode, rs in runs.items()}
        report["models"][spec.id] = {
            "normal": med["normal"], "safe": med["safe"],
            "prompt_ratio_safe_over_normal": round(med["safe"]["prompt_tok_s"] / med["normal"]["prompt_tok_s"], 3),
            "gen_ratio_safe_over_normal": round(med["safe"]["gen_tok_s"] / med["normal"]["gen_tok_s"], 3)}
        print(spec.id, json.dumps(report["models"][spec.id]), flush=True)
        OUT.parent.mkdir(parents=True, exist_ok=True)
        OUT.write_text(json.dumps(report, indent=2) + "\n")  # after each model: a partial run still reports
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
