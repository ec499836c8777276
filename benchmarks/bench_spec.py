#!/usr/bin/env python3
"""Speculative decoding: single-stream decode with prompt-lookup drafts vs without, vs raw llama.cpp.

For each model and task (copy-heavy chat work, and free text), in alternated rounds, on the same prompt
tokens, thread count and token count:
  - our engine with drafting on (the default) and with ``speculative: false``;
  - raw llama.cpp greedy decoding through the C API in its own process (benchmarks/_raw.py, the same loop as
    ../shared/tools/llama_bench.py, fed the very prompt tokens the engine evaluates);
the decode rate of tokens 2..n of each (the first one carries the prefill), the acceptance rate and the draft
lengths chosen, and whether the three texts are the same. Then 8 concurrent streams over HTTP with drafting
on and off (total generated tokens/s). Then, for Qwen2.5-Coder 1.5B, a draft model: Qwen2.5-Coder 0.5B
drafting k tokens greedily, verified by the 1.5B in one batch (raw llama.cpp, in its own process), against
the 1.5B alone. Prints one JSON object.

    python benchmarks/bench_spec.py [--quick] [--models smollm2,qwen0.5b,qwen1.5b] [--tokens 128] [--rounds 3]

A full run takes about 25 minutes on a quiet 2-core machine; ``--quick`` (SmolLM2 only, 3 tasks, 48 tokens, one
round, no draft model) about 2 minutes.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx

from polargrid_local import LocalEngine, Registry
from polargrid_local.llm.backend import available_cpus
from polargrid_local.server import running

HERE = Path(__file__).resolve().parent
MODELS = {"smollm2": "smollm2-135m-instruct", "qwen0.5b": "qwen2.5-coder-0.5b-instruct",
          "qwen1.5b": "qwen2.5-coder-1.5b-instruct"}
QWEN_FILES = {"qwen2.5-coder-0.5b-instruct": "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
              "qwen2.5-coder-1.5b-instruct": "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf"}

MINUTES = ("The committee met on Tuesday to review the budget for the coming year.\n\n"
           "Library: members agreed that the library renovation should proceed in two phases, starting with the "
           "children's reading room in March and the roof repairs in June, at a total cost of 420,000 dollars.\n\n"
           "Parks: the park lighting contract will be renewed for two years with the current supplier, and the "
           "broken lamps on the river path will be replaced before the end of the month.\n\n"
           "Transport: the school bus routes will be reviewed before September, and parents will be asked for "
           "their views in a short survey sent home with the pupils.")
TYPOS = ("Teh library renovaton should procede in two phases, starting with the childrens reading room in March "
         "and the roof repairs in Juen, at a total cost of four hundred and twenty thousand dolars. The park "
         "lighting contract will be renewd for two years with the curent supplier.")
ITEMS = ("apples, bananas, carrots, dark chocolate, eggs, fresh basil, green tea, honey, Italian parsley, jasmine "
         "rice, kale, lemons, mozzarella, nutmeg, olive oil, paprika")
CODE = ('def invoice_total(items, tax_rate):\n    """The total of an invoice, tax included."""\n    total = 0\n'
        "    for item in items:\n        if item.quantity <= 0:\n            continue\n"
        "        total += item.price * item.quantity\n    total = total * (1 + tax_rate)\n"
        "    return round(total, 2)\n")
TASKS: dict[str, tuple[str, str]] = {
    "extract": ("copy", f"Copy the paragraph about the parks from these minutes, word for word.\n\n{MINUTES}"),
    "typos": ("copy", f"Fix the spelling mistakes in this paragraph and return the corrected paragraph.\n\n{TYPOS}"),
    "reformat": ("copy", f"Reformat this shopping list as a Markdown bullet list, one item per line.\n\n{ITEMS}"),
    "code_edit": ("copy", "Rename the variable `total` to `subtotal` in this function and return the whole "
                          f"function.\n\n```python\n{CODE}```"),
    "quotes": ("copy", f"Using exact quotes from these minutes, what was decided about the library?\n\n{MINUTES}"),
    "story": ("free", "Write a short story about a lighthouse keeper who finds a message in a bottle."),
    "explain": ("free", "Explain how vaccines train the immune system, in a few paragraphs."),
}
QUICK_TASKS = ("extract", "code_edit", "story")


def registry_with_qwen(directory: Path) -> Registry:
    """The checkout's registry plus the Qwen2.5-Coder files already in the cache (no download)."""
    base = Registry.load(HERE.parent / "models.toml")
    text = (HERE.parent / "models.toml").read_text()
    for model_id, name in QWEN_FILES.items():
        path = base.cache_dir / model_id / name
        if base.get(model_id) is None and path.exists():
            text += f'\n[[models]]\nid = "{model_id}"\nkind = "chat"\nlocal = "{path}"\n'
    models = directory / "models.toml"
    models.write_text(text)
    return Registry.load(models, base.cache_dir)


class RawWorker:
    """Raw llama.cpp greedy decoding in its own process, kept alive for the run; one request at a time."""

    CODE = ("import json, sys\nsys.path.insert(0, %r)\nfrom _raw import RawLlama\n"
            "r = RawLlama(%r, %d, n_ctx=4096)\nprint('ready', flush=True)\n"
            "for line in sys.stdin:\n    job = json.loads(line)\n    tokens, rate = r.greedy(job['prompt'], job['n'])\n"
            "    print(json.dumps({'tokens': tokens, 'tok_s': rate}), flush=True)\n")

    def __init__(self, path: str, threads: int) -> None:
        self.process = subprocess.Popen([sys.executable, "-c", self.CODE % (str(HERE), path, threads)],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                        text=True)
        assert self.process.stdout is not None and self.process.stdout.readline().strip() == "ready"

    def greedy(self, prompt: list[int], n: int) -> tuple[list[int], float]:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(json.dumps({"prompt": prompt, "n": n}) + "\n")
        self.process.stdin.flush()
        reply = json.loads(self.process.stdout.readline())
        return reply["tokens"], reply["tok_s"]

    def close(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.close()
        self.process.wait(30)


def chat(content: str, model: str, tokens: int, speculative: bool) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": tokens,
            "temperature": 0, "speculative": speculative}


def engine_run(engine: LocalEngine, request: dict[str, Any]) -> dict[str, Any]:
    """One streamed chat: decode rate of tokens 2..n, the text, the usage and the drafts."""
    stamps, text, usage = [], [], None
    for chunk in engine.chat_completion_stream(request, stream_options={"include_usage": True}):
        if chunk.choices and chunk.choices[0].delta.content:
            stamps.append(time.perf_counter())
            text.append(chunk.choices[0].delta.content)
        if chunk.usage:
            usage = chunk.usage
    assert usage is not None
    details = usage.completion_tokens_details
    tokens = usage.completion_tokens
    return {"tok_s": (tokens - 1) / max(stamps[-1] - stamps[0], 1e-9) if len(stamps) > 1 else 0.0,
            "text": "".join(text), "tokens": tokens, "accepted": details.accepted_prediction_tokens,
            "rejected": details.rejected_prediction_tokens}


def prompt_tokens(engine: LocalEngine, model: str, content: str) -> tuple[Any, list[int]]:
    """The tokens the engine evaluates for this chat (as llm/requests.py's chat_job makes them)."""
    backend = engine.pool.worker(engine.registry.get(model))[0].backend
    prompt = backend.render_chat([{"role": "user", "content": content}])
    return backend, backend.tokenize(prompt, add_bos=backend.add_bos_for_template(prompt))


def single_stream(engine: LocalEngine, model: str, path: str, tasks: list[str], tokens: int, rounds: int,
                  threads: int) -> dict[str, Any]:
    """Each task in alternated rounds: drafting on, drafting off, raw llama.cpp (order rotated each round)."""
    engine.chat_completion(chat("Hi", model, 8, True))   # load and warm
    engine.chat_completion(chat("Hi", model, 8, False))
    scheduler = engine.pool.worker(engine.registry.get(model))[0].backend.scheduler
    raw = RawWorker(path, threads)
    out: dict[str, Any] = {}
    try:
        for name in tasks:
            kind, content = TASKS[name]
            backend, prompt = prompt_tokens(engine, model, content)
            runs: dict[str, list[float]] = {"on": [], "off": [], "raw": []}
            lengths: Counter[int] = Counter()
            accepted = rejected = 0
            texts: dict[str, str] = {}
            generated = tokens
            for r in range(rounds):
                order = ["on", "off", "raw"]
                order = order[r % 3:] + order[:r % 3]
                for mode in order:
                    if mode == "raw":
                        raw_tokens, rate = raw.greedy(prompt, max(generated, 2))
                        texts["raw"] = backend.base.llama.detokenize(raw_tokens[:generated]).decode(errors="replace")
                        runs["raw"].append(rate)
                        continue
                    before = Counter(scheduler.drafting.draft_lengths) if scheduler.drafting else Counter()
                    result = engine_run(engine, chat(content, model, tokens, mode == "on"))
                    runs[mode].append(result["tok_s"])
                    texts[mode] = result["text"]
                    generated = result["tokens"]   # raw decodes as many tokens as the engine gave (EOS included)
                    if mode == "on":
                        accepted += result["accepted"]
                        rejected += result["rejected"]
                        if scheduler.drafting:
                            lengths.update(scheduler.drafting.draft_lengths - before)
            on, off, raw_rate = (statistics.median(runs[m]) for m in ("on", "off", "raw"))
            per_round = [a / b for a, b in zip(runs["on"], runs["raw"], strict=True)]
            out[name] = {
                "kind": kind, "prompt_tokens": len(prompt), "generated_tokens": generated,
                "on_tok_s": round(on, 2), "off_tok_s": round(off, 2), "raw_tok_s": round(raw_rate, 2),
                "on_vs_raw": round(on / raw_rate, 3), "on_vs_off": round(on / off, 3),
                "off_vs_raw": round(off / raw_rate, 3),
                "on_vs_raw_worst_round": round(min(per_round), 3),
                "acceptance_rate": round(accepted / (accepted + rejected), 3) if accepted + rejected else None,
                "drafted_tokens": accepted + rejected, "accepted_tokens": accepted,
                "draft_lengths": dict(sorted(lengths.items())),
                "same_text_on_off": texts["on"] == texts["off"],
                "same_text_as_raw": texts["raw"].strip() == texts["off"].strip(),
            }
            print(json.dumps({model: {name: out[name]}}), file=sys.stderr, flush=True)
    finally:
        raw.close()
    copy = [v["on_vs_raw"] for v in out.values() if v["kind"] == "copy"]
    free = [v["on_vs_raw"] for v in out.values() if v["kind"] == "free"]
    out["summary"] = {"copy_on_vs_raw_median": round(statistics.median(copy), 3) if copy else None,
                      "free_on_vs_raw_median": round(statistics.median(free), 3) if free else None,
                      "worst_on_vs_off": min(v["on_vs_off"] for k, v in out.items() if k != "summary")}
    return out


def http_streams(engine: LocalEngine, model: str, tasks: list[str], tokens: int, rounds: int,
                 streams: int = 8) -> dict[str, Any]:
    """``streams`` chats at once over HTTP, tasks cycled; total generated tokens/s, drafting on vs off."""
    rates: dict[str, list[float]] = {"on": [], "off": []}
    with running(engine) as server, httpx.Client(timeout=600) as http:
        def one(content: str, flag: bool, counts: list[int]) -> None:
            reply = http.post(server.url + "/v1/chat/completions", json=chat(content, model, tokens, flag))
            reply.raise_for_status()
            counts.append(reply.json()["usage"]["completion_tokens"])

        for r in range(-1, rounds):   # round -1 warms up: the first 8 prompts at once reserve memory and graphs
            for mode in (["on", "off"] if r % 2 == 0 else ["off", "on"]):
                counts: list[int] = []
                threads = [threading.Thread(target=one, args=(TASKS[tasks[i % len(tasks)]][1], mode == "on", counts))
                           for i in range(streams)]
                started = time.perf_counter()
                for thread in threads:
                    thread.start()
                for thread in threads:
                    thread.join()
                if r >= 0:
                    rates[mode].append(sum(counts) / (time.perf_counter() - started))
    on, off = statistics.median(rates["on"]), statistics.median(rates["off"])
    return {"streams": streams, "on_tok_s": round(on, 2), "off_tok_s": round(off, 2), "on_vs_off": round(on / off, 3),
            "on_vs_off_per_round": [round(a / b, 3) for a, b in zip(rates["on"], rates["off"], strict=True)]}


def load_neighbours(engine: LocalEngine) -> None:
    """An embedding model, whisper and piper, loaded and used once: the app's other models, idle while measured."""
    engine.embeddings({"model": "all-minilm-l6-v2", "input": ["a retrieval app embeds its documents"]})
    speech = engine.text_to_speech({"model": "tts-1", "input": "A voice app speaks and listens.", "voice": "alloy",
                                    "response_format": "wav"})
    engine.transcribe(speech, {"model": "whisper-1", "language": "en"})


def draft_model_child(target: str, draft: str, threads: int, tokens: int, rounds: int) -> None:
    """Runs in its own process: Qwen2.5-Coder 0.5B drafting k tokens greedily for the 1.5B, verified in one
    batch, against the 1.5B alone; prints JSON."""
    sys.path.insert(0, str(HERE))
    import llama_cpp
    from _raw import RawLlama

    vocab = llama_cpp.Llama(target, vocab_only=True, verbose=False)
    big, small = RawLlama(target, threads, n_ctx=2048), RawLlama(draft, threads, n_ctx=2048)

    def rm(model: Any, pos: int) -> None:
        model.L.llama_memory_seq_rm(model.L.llama_get_memory(model.ctx), 0, pos, -1)

    def prefill(model: Any, prompt: list[int]) -> None:
        model.L.llama_memory_clear(model.L.llama_get_memory(model.ctx), True)
        model.decode([(t, i, 0, i == len(prompt) - 1) for i, t in enumerate(prompt)])

    def speculate(prompt: list[int], k: int) -> tuple[list[int], float, float]:
        prefill(big, prompt)
        prefill(small, prompt)
        out, pos, dpos = [big.argmax(len(prompt) - 1)], len(prompt), len(prompt)
        drafted = accepted = 0
        started = time.perf_counter()
        while len(out) < tokens:
            pending = out[-(pos - dpos) - 1:]        # tokens the draft model has not seen yet
            small.decode([(x, dpos + i, 0, i == len(pending) - 1) for i, x in enumerate(pending)])
            dpos += len(pending)
            guess = [small.argmax(len(pending) - 1)]
            for _ in range(k - 1):
                small.decode([(guess[-1], dpos, 0, True)])
                dpos += 1
                guess.append(small.argmax(0))
            big.decode([(x, pos + i, 0, True) for i, x in enumerate([out[-1], *guess])])
            new = []
            for i in range(k + 1):
                new.append(big.argmax(i))
                if i == k or new[-1] != guess[i]:
                    break
            drafted, accepted = drafted + k, accepted + len(new) - 1
            out += new
            pos += len(new)
            rm(big, pos)
            dpos = min(dpos, pos)
            rm(small, dpos)
        return out[:tokens], (len(out) - 1) / (time.perf_counter() - started), accepted / max(drafted, 1)

    result: dict[str, Any] = {}
    for name in ("code_edit", "explain"):
        text = f"<|im_start|>user\n{TASKS[name][1]}<|im_end|>\n<|im_start|>assistant\n"
        prompt = vocab.tokenize(text.encode(), add_bos=False, special=True)
        rows: dict[str, list[float]] = {}
        same = True
        for _ in range(rounds):
            plain_tokens, plain = big.greedy(prompt, tokens)
            rows.setdefault("alone", []).append(plain)
            for k in (2, 4, 6):
                got, rate, acceptance = speculate(prompt, k)
                rows.setdefault(f"k{k}", []).append(rate)
                rows.setdefault(f"k{k}_acceptance", []).append(acceptance)
                same = same and got == plain_tokens
        alone = statistics.median(rows["alone"])
        result[name] = {"alone_tok_s": round(alone, 2), "same_tokens": same, **{
            f"k{k}": {"tok_s": round(statistics.median(rows[f"k{k}"]), 2),
                      "vs_alone": round(statistics.median(rows[f"k{k}"]) / alone, 3),
                      "acceptance": round(statistics.median(rows[f"k{k}_acceptance"]), 3)} for k in (2, 4, 6)}}
    print(json.dumps(result))


def draft_model(registry: Registry, threads: int, tokens: int, rounds: int) -> dict[str, Any]:
    paths = [str(registry.cache_dir / m / f) for m, f in QWEN_FILES.items()]
    if not all(Path(p).exists() for p in paths):
        return {"skipped": "the Qwen2.5-Coder 0.5B and 1.5B GGUFs are not in the cache"}
    done = subprocess.run([sys.executable, __file__, "--child-draft-model", paths[1], paths[0], str(threads),
                           str(tokens), str(rounds)], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--child-draft-model":
        target, draft, threads, tokens, rounds = sys.argv[2:7]
        draft_model_child(target, draft, int(threads), int(tokens), int(rounds))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="SmolLM2 only, 3 tasks, 48 tokens, one round")
    parser.add_argument("--models", default="smollm2,qwen0.5b,qwen1.5b")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=available_cpus())
    parser.add_argument("--skip-http", action="store_true")
    parser.add_argument("--skip-draft-model", action="store_true")
    parser.add_argument("--tasks", default=",".join(TASKS), help="which tasks (comma-separated)")
    parser.add_argument("--neighbours", action="store_true",
                        help="load a voice and retrieval app's other models first (an embedding model, whisper-1, "
                             "tts-1), idle beside the chat model while it is measured")
    args = parser.parse_args()
    models = ["smollm2"] if args.quick else args.models.split(",")
    tasks = list(QUICK_TASKS) if args.quick else args.tasks.split(",")
    tokens, rounds = (48, 1) if args.quick else (args.tokens, args.rounds)
    started = time.perf_counter()
    result: dict[str, Any] = {"benchmark": "speculative", "threads": args.threads, "tokens": tokens, "rounds": rounds,
                              "cpu_count": os.cpu_count(), "models": {}}
    with tempfile.TemporaryDirectory() as tmp:
        registry = registry_with_qwen(Path(tmp))
        engine = LocalEngine(registry, n_threads=args.threads, n_gpu_layers=0)
        try:
            if args.neighbours:
                load_neighbours(engine)
                result["neighbours"] = [m.model for m in engine.get_model_status().models]
            for key in models:
                model = MODELS[key]
                spec = registry.get(model)
                if spec is None:
                    result["models"][model] = {"skipped": "not in the registry or the cache"}
                    continue
                path = str(spec.path_in(registry.cache_dir))
                model_tasks = tasks if key != "qwen1.5b" else [t for t in ("code_edit", "extract", "explain")
                                                                if t in tasks]
                entry = single_stream(engine, model, path, model_tasks, tokens, rounds, args.threads)
                if not args.skip_http and key != "qwen1.5b":
                    entry["http_8_streams"] = http_streams(engine, model, model_tasks, tokens, max(rounds, 4))
                result["models"][model] = entry
                engine.unload_model({"model_name": model})
            if args.neighbours:   # still loaded when the last model was measured (no keep_alive unloaded them)
                result["neighbours_at_end"] = [m.model for m in engine.get_model_status().models]
        finally:
            engine.close()
        if not args.quick and not args.skip_draft_model:
            result["draft_model_0.5b_for_1.5b"] = draft_model(registry, args.threads, min(tokens, 64), rounds)
    result["seconds"] = round(time.perf_counter() - started, 1)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
