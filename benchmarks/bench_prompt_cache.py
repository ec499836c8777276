#!/usr/bin/env python3
"""The prompt cache: time to first token of a chat whose system prompt is long, cold and warm, in one run.

For each model and system prompt length (512, 1,024, 2,048 tokens), each phase in its own process so nothing is
warm that should not be:
  off    cold, with the prompt cache off (the baseline)
  save   cold, with the cache on: the request that saves (its TTFT and total time against `off`: the cost of
         saving), then, in the same process, another question after the same system prompt (warm in memory)
  disk   a new process on the folder `save` left: the other question (its system prompt from disk), then
         the exact first request again (the whole prompt from disk, its first token from the saved logits)
Also: how long the worker thread is held taking a state out (the most a saving request delays any stream;
a process's first save writes into fresh memory, later ones into the buffer the previous save gave back:
llama_state_io's get_data_ms and get_data_reused_ms), the file's size per 1,000 tokens, and llama.cpp's
get/set_data against its save_file/load_file on the same state. Ratios are against `off` measured in the same
run. Prints one JSON object.

    python benchmarks/bench_prompt_cache.py [--quick] [--reps 3] [--threads 2] [--sizes 512 ...] [--models ID ...]

The full run takes about 15 minutes on 2 quiet cores (Qwen2.5-Coder-0.5B's 2,048-token prefill dominates);
--quick (SmolLM2, 512 tokens, one repetition) about one minute.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SMOL = "smollm2-135m-instruct"
QWEN = "qwen2.5-coder-0.5b-instruct"
QWEN_FILE = "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
QUESTIONS = ["Which shelf holds the atlases?", "Summarise the rules above in one sentence."]
TEXT = ("The harbour office keeps records of every vessel that has entered the port since the old customs house "
        "burned down. Clerks note the tonnage, the cargo, the flag and the name of the master, and they copy each "
        "entry twice, once for the ledger kept on site and once for the archive in the capital. ")


# -- the child: one phase, one process ------------------------------------------------------------

def system_prompt(engine, model: str, tokens: int) -> str:
    """A system prompt of about ``tokens`` tokens for this model's tokenizer."""
    backend = engine.pool.worker(engine.registry.get(model))[0].backend
    text = TEXT * (tokens // 40 + 4)
    ids = backend.tokenize(text, add_bos=False, special=False)[:tokens]
    return backend.llama.detokenize(ids).decode("utf-8", errors="ignore")


def timed_chat(engine, model: str, system: str, question: str, max_tokens: int) -> dict:
    """Time to first content and total time of one streamed chat (greedy)."""
    started = time.perf_counter()
    first = None
    usage = None
    stream = engine.chat_completion_stream({"model": model, "max_tokens": max_tokens, "temperature": 0, "messages": [
        {"role": "system", "content": system}, {"role": "user", "content": question}]},
        stream_options={"include_usage": True})
    with stream:
        for chunk in stream:
            if first is None and chunk.choices and chunk.choices[0].delta.content:
                first = time.perf_counter()
            usage = chunk.usage or usage
    end = time.perf_counter()
    return {"ttft_s": (first or end) - started, "total_s": end - started, "prompt_tokens": usage.prompt_tokens,
            "cached_tokens": usage.prompt_tokens_details.cached_tokens}


def child(spec: dict) -> dict:
    from polargrid_local import LocalEngine
    from polargrid_local.llm import prompt_cache

    stalls: list[float] = []
    remember = prompt_cache.PromptCache.remember

    def timed_remember(self, *args, **kwargs):   # the worker thread's share of saving: taking the state out
        started = time.perf_counter()
        try:
            return remember(self, *args, **kwargs)
        finally:
            stalls.append(time.perf_counter() - started)

    prompt_cache.PromptCache.remember = timed_remember
    engine = LocalEngine(spec["models"], n_threads=spec["threads"], n_ctx=spec["n_ctx"], n_parallel=2,
                         prompt_cache=spec["phase"] != "off", prompt_cache_dir=spec["dir"])
    model, out = spec["model"], {}
    try:
        engine.load_model({"model_name": model})
        system = system_prompt(engine, model, spec["tokens"])
        if spec["phase"] in ("off", "save"):
            out["cold"] = timed_chat(engine, model, system, QUESTIONS[0], spec["max_tokens"])
        if spec["phase"] == "save":   # the same system prompt, another question: the prefix from memory
            out["memory_other_question"] = timed_chat(engine, model, system, QUESTIONS[1], spec["max_tokens"])
        if spec["phase"] == "disk":   # a new process: the prefix `save` left on disk, then the whole prompt
            out["disk_other_question"] = timed_chat(engine, model, system, QUESTIONS[1], spec["max_tokens"])
            engine.unload_model({"model_name": model})
            engine.load_model({"model_name": model})
            out["disk_same_prompt"] = timed_chat(engine, model, system, QUESTIONS[0], spec["max_tokens"])
        if spec["phase"] == "save":
            engine.unload_model({"model_name": model})   # waits for the save
            files = [p for p in Path(spec["dir"]).rglob("*.pgkv") if not p.name.startswith(".")]
            out["file_bytes"] = max((p.stat().st_size for p in files), default=0)
            out["stall_ms"] = 1000 * max(stalls, default=0.0)
            out["raw"] = raw_state_io(engine, spec, system)
    finally:
        engine.close()
    return out


def raw_state_io(engine, spec: dict, system: str) -> dict:
    """llama.cpp's in-memory get/set_data against its save_file/load_file, on one processed prompt."""
    import ctypes

    import llama_cpp as L

    from polargrid_local.llm.decoder import BatchEntry

    engine.load_model({"model_name": spec["model"]})
    backend = engine.pool.worker(engine.registry.get(spec["model"]))[0].backend
    worker = engine.pool.worker(engine.registry.get(spec["model"]))[0]
    tokens = backend.tokenize(system, add_bos=True, special=False)
    result: dict = {}

    def measure(_backend, _ctx):   # on the model's thread: nothing else touches the context meanwhile
        decoder = backend.scheduler.decoder
        for start in range(0, len(tokens), 512):
            chunk = tokens[start:start + 512]
            decoder.decode([BatchEntry(0, t, start + i, start + i == len(tokens) - 1) for i, t in enumerate(chunk)])
        began = time.perf_counter()
        state = decoder.save_sequence(0)
        result["get_data_ms"] = 1000 * (time.perf_counter() - began)       # into fresh memory (page faults)
        began = time.perf_counter()
        state = decoder.save_sequence(0, state)
        result["get_data_reused_ms"] = 1000 * (time.perf_counter() - began)  # into the spare buffer, as saves do
        decoder.clear(1)
        began = time.perf_counter()
        decoder.load_sequence(1, state)
        result["set_data_ms"] = 1000 * (time.perf_counter() - began)
        path = os.path.join(spec["dir"], "raw-state.bin").encode()
        array = (L.llama_token * len(tokens))(*tokens)
        began = time.perf_counter()
        L.llama_state_seq_save_file(decoder.ctx, path, 0, array, len(tokens))
        result["save_file_ms"] = 1000 * (time.perf_counter() - began)
        decoder.clear(1)
        out = (L.llama_token * len(tokens))()
        count = ctypes.c_size_t(0)
        began = time.perf_counter()
        L.llama_state_seq_load_file(decoder.ctx, path, 1, out, len(tokens), ctypes.byref(count))
        result["load_file_ms"] = 1000 * (time.perf_counter() - began)
        os.unlink(path)
        for seq in (0, 1):
            decoder.clear(seq)
        return iter(())

    from polargrid_local.runtime.interfaces import Job

    stream, _ctx = worker.submit(Job(measure))
    list(stream)
    result["tokens"] = len(tokens)
    return result


# -- the parent ---------------------------------------------------------------------------------

def run_child(spec: dict) -> dict:
    done = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True,
                          timeout=1800, cwd=ROOT)
    if done.returncode != 0:
        raise RuntimeError(f"phase {spec['phase']} of {spec['model']} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def models_file(workdir: Path, want_qwen: bool) -> tuple[str, list[str]]:
    """A registry with SmolLM2 and (when pulled) Qwen2.5-Coder-0.5B, whose entry may not be on this branch yet."""
    from polargrid_local import Registry

    registry = Registry.load(ROOT / "models.toml")
    models = [SMOL]
    qwen = registry.get(QWEN)
    if not want_qwen:
        return str(ROOT / "models.toml"), models
    path = qwen.path_in(registry.cache_dir) if qwen else registry.cache_dir / QWEN / QWEN_FILE
    if not Path(path).is_file():
        print(f"{QWEN} is not pulled ({path}); SmolLM2 only", file=sys.stderr)
        return str(ROOT / "models.toml"), models
    if qwen is not None:
        return str(ROOT / "models.toml"), [*models, QWEN]
    toml = workdir / "models.toml"
    toml.write_text(f'[[models]]\nid = "{QWEN}"\nkind = "chat"\nlocal = "{path}"\n[models.engine]\nn_ctx = 4096\n')
    return str(toml), [*models, QWEN]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="SmolLM2, 512 tokens, one repetition")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--sizes", type=int, nargs="+", help="system prompt lengths (default 512 1024 2048)")
    parser.add_argument("--models", nargs="+", help=f"model ids (default {SMOL} and {QWEN} when pulled)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    sizes, reps = ([512], 1) if args.quick else ([512, 1024, 2048], args.reps)
    sizes = args.sizes or sizes
    report: dict = {"threads": args.threads, "reps": reps, "max_tokens": args.max_tokens, "models": {}}
    with tempfile.TemporaryDirectory(prefix="bench-prompt-cache-") as tmp:
        workdir = Path(tmp)
        toml, models = models_file(workdir, want_qwen=not args.quick or QWEN in (args.models or []))
        models = [m for m in models if m in args.models] if args.models else models
        for model in models:
            report["models"][model] = {}
            for tokens in sizes:
                runs: dict[str, list] = {"off": [], "save": [], "disk": []}
                for rep in range(reps):
                    folder = workdir / f"{model}-{tokens}-{rep}"
                    base = {"models": toml, "model": model, "tokens": tokens, "threads": args.threads,
                            "n_ctx": 4096, "max_tokens": args.max_tokens, "dir": str(folder)}
                    for phase in ("off", "save", "disk"):   # interleaved, so drift hits every phase alike
                        runs[phase].append(run_child({**base, "phase": phase}))
                report["models"][model][str(tokens)] = summarise(runs)
                print(json.dumps({model: {tokens: report["models"][model][str(tokens)]}}), file=sys.stderr)
    print(json.dumps(report, indent=1))


def summarise(runs: dict[str, list]) -> dict:
    def median(phase: str, *keys: str) -> float:
        values = []
        for run in runs[phase]:
            value = run
            for key in keys:
                value = value[key]
            values.append(value)
        return statistics.median(values)

    cold_ttft, cold_total = median("off", "cold", "ttft_s"), median("off", "cold", "total_s")
    prompt = runs["off"][0]["cold"]["prompt_tokens"]
    disk_other = median("disk", "disk_other_question", "ttft_s")
    disk_same = median("disk", "disk_same_prompt", "ttft_s")
    memory = median("save", "memory_other_question", "ttft_s")
    raw = {k: round(statistics.median(r["raw"][k] for r in runs["save"]), 2)
           for k in ("get_data_ms", "get_data_reused_ms", "set_data_ms", "save_file_ms", "load_file_ms")}
    return {
        "prompt_tokens": prompt,
        "cold_ttft_s": round(cold_ttft, 3),
        "saving_request_ttft_ratio": round(median("save", "cold", "ttft_s") / cold_ttft, 3),
        "saving_request_total_ratio": round(median("save", "cold", "total_s") / cold_total, 3),
        "worker_stall_first_save_ms": round(median("save", "stall_ms"), 2),
        "memory_ttft_s": round(memory, 4), "memory_vs_cold": round(memory / cold_ttft, 4),
        "disk_other_question_ttft_s": round(disk_other, 4),
        "disk_other_question_vs_cold": round(disk_other / cold_ttft, 4),
        "disk_same_prompt_ttft_s": round(disk_same, 4), "disk_same_prompt_vs_cold": round(disk_same / cold_ttft, 4),
        "disk_cached_tokens": runs["disk"][0]["disk_other_question"]["cached_tokens"],
        "file_mb": round(median("save", "file_bytes") / 1e6, 2),
        "mb_per_1k_tokens": round(median("save", "file_bytes") / 1e6 / prompt * 1000, 2),
        "llama_state_io": raw,
    }


if __name__ == "__main__":
    main()
