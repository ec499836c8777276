#!/usr/bin/env python3
"""Quality benchmark: what each chat model gets right, by category, and how fast it decodes.

64 prompts (benchmarks/data/quality_cases.json): short factual questions, arithmetic, extraction into
JSON, following a format, a tool call from a natural request (tool_choice auto), multi-turn recall. Each
goes through PolarGrid at temperature 0 and passes when every automatic check holds (a normalised
answer, the last number, JSON fields, the tool name and arguments, a pattern). Decode speed is tokens/s
after the first token, of one stream and of N concurrent streams (aggregate), measured in the same run.
Prints one JSON object; ``--markdown`` prints the README's table from it instead.

    python benchmarks/bench_quality.py [--models a,b] [--quick] [--streams 1,8] [--threads N] [--verbose]
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import polargrid

from polargrid_local import LocalEngine, PolarGridSync, Registry
from polargrid_local.llm.backend import available_cpus
from polargrid_local.store.pull import is_pulled

MODELS = ["smollm2-135m-instruct", "gemma3-270m", "qwen2.5-coder-0.5b-instruct", "qwen2.5-coder-1.5b-instruct"]
CASES = Path(__file__).parent / "data" / "quality_cases.json"
SPEED_PROMPT = "1, 2, 3, 4, 5, 6, 7, 8,"


# -- checks -------------------------------------------------------------------------------------

def _norm(text: Any) -> str:
    return re.sub(r"\s+", " ", str(text)).strip().lower()


def _numbers(text: str) -> list[float]:
    return [float(n.replace(",", "")) for n in re.findall(r"-?\d[\d,]*(?:\.\d+)?", text)]


def _unfenced(text: str) -> str:
    match = re.fullmatch(r"\s*```(?:json)?\s*(.*?)\s*```\s*", text, re.S)
    return match.group(1) if match else text.strip()


def _same(got: Any, want: Any) -> bool:
    if isinstance(want, bool) or want is None:
        return got == want
    if isinstance(want, (int, float)):
        try:
            return float(str(got).replace(",", "")) == float(want)
        except ValueError:
            return False
    if isinstance(want, list):
        return (isinstance(got, list) and len(got) == len(want)
                and all(_same(g, w) for g, w in zip(got, want, strict=True)))
    return _norm(got) == _norm(want)


def _calls_match(calls: list[Any], want: list[list[Any]]) -> bool:
    if len(calls) != len(want):
        return False
    for call, (name, arguments) in zip(calls, want, strict=True):
        try:
            got = json.loads(call.function.arguments)
        except json.JSONDecodeError:
            return False
        if call.function.name != name or not all(_same(got.get(k), v) for k, v in arguments.items()):
            return False
    return True


def passes(check: dict[str, Any], text: str, calls: list[Any]) -> bool:
    """One check of a case against the reply's text and tool calls."""
    kind, want = next(iter(check.items()))
    if kind == "tool_calls":
        return _calls_match(calls, want)
    if calls:  # a call where an answer was wanted
        return False
    if kind == "contains":
        return any(re.search(rf"(?<!\w){re.escape(_norm(w))}(?!\w)", _norm(text)) for w in want)
    if kind == "last_number":
        numbers = _numbers(text)
        return bool(numbers) and numbers[-1] == want
    if kind == "regex":
        return re.fullmatch(want, text.strip()) is not None
    if kind == "max_words":
        return 0 < len(text.split()) <= want
    if kind == "json":
        try:
            return json.loads(_unfenced(text)) == want
        except json.JSONDecodeError:
            return False
    if kind == "fields":
        try:
            document = json.loads(_unfenced(text))
        except json.JSONDecodeError:
            return False
        return isinstance(document, dict) and all(_same(document.get(k), v) for k, v in want.items())
    raise ValueError(f"unknown check {kind!r}")


# -- runs ---------------------------------------------------------------------------------------

def run_case(client: PolarGridSync, model: str, case: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
    request: dict[str, Any] = {"model": model, "messages": case["messages"], "temperature": 0,
                               "max_tokens": data["max_tokens"][case["category"]]}
    if "response_format" in case:
        request["response_format"] = case["response_format"]
    if "tools" in case:
        request["tools"] = data["tools"][case["tools"]]
    started = time.perf_counter()
    try:
        reply = client.chat_completion(request)
        message = reply.choices[0].message
        text, calls, tokens = message.content or "", message.tool_calls or [], reply.usage.completion_tokens
        error = None
    except polargrid.PolarGridError as exc:  # a call that broke its schema, a template that refused...
        text, calls, tokens, error = "", [], 0, f"{type(exc).__name__}: {exc}"
    ok = error is None and all(passes(check, text, calls) for check in case["checks"])
    return {"id": case["id"], "category": case["category"], "passed": ok, "tokens": tokens,
            "seconds": time.perf_counter() - started, "reply": text[:200],
            "calls": [[c.function.name, c.function.arguments] for c in calls], **({"error": error} if error else {})}


def decode_speed(client: PolarGridSync, model: str, streams: int, tokens: int) -> float:
    """Aggregate decode tokens/s of ``streams`` concurrent completions (each stream's first token, which
    carries its prefill, excluded)."""
    stamps: list[list[float]] = [[] for _ in range(streams)]

    def one(i: int) -> None:
        for chunk in client.completion_stream({"model": model, "prompt": SPEED_PROMPT, "max_tokens": tokens,
                                               "temperature": 0}):
            if chunk.choices and chunk.choices[0].text:
                stamps[i].append(time.perf_counter())

    threads = [threading.Thread(target=one, args=(i,)) for i in range(streams)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    start = max(s[0] for s in stamps if s)
    end = max(s[-1] for s in stamps if s)
    counted = sum(sum(1 for t in s if t > start) for s in stamps)
    return counted / (end - start) if end > start else 0.0


def bench_model(model: str, cases: list[dict[str, Any]], data: dict[str, Any], args: argparse.Namespace
                ) -> dict[str, Any]:
    streams = [int(s) for s in args.streams.split(",") if s]
    engine = LocalEngine(n_threads=args.threads, n_gpu_layers=0, n_parallel=max([8, *streams]))
    try:
        client = PolarGridSync(engine=engine)
        started = time.perf_counter()
        client.completion({"model": model, "prompt": "Hello", "max_tokens": 2, "temperature": 0})  # load
        load_s = time.perf_counter() - started
        results = [run_case(client, model, case, data) for case in cases]
        speed = {str(n): round(decode_speed(client, model, n, args.tokens), 1) for n in streams}
    finally:
        engine.close()
    categories: dict[str, list[bool]] = {}
    for result in results:
        categories.setdefault(result["category"], []).append(result["passed"])
    out = {
        "passed": sum(r["passed"] for r in results), "cases": len(results),
        "share": round(sum(r["passed"] for r in results) / len(results), 3),
        "by_category": {c: {"passed": sum(v), "cases": len(v), "share": round(sum(v) / len(v), 3)}
                        for c, v in categories.items()},
        "decode_tok_s": speed,
        "mean_answer_tokens": round(sum(r["tokens"] for r in results) / len(results), 1),
        "answer_seconds": round(sum(r["seconds"] for r in results), 1),
        "load_s": round(load_s, 2),
    }
    if args.verbose:
        out["results"] = results
    return out


def first_of_each(cases: list[dict[str, Any]], n: int) -> list[dict[str, Any]]:
    """The first ``n`` cases of every category, in order."""
    seen: Counter[str] = Counter()
    kept = []
    for case in cases:
        if seen[case["category"]] < n:
            kept.append(case)
            seen[case["category"]] += 1
    return kept


def markdown(result: dict[str, Any]) -> str:
    """The README's table: one row per model, the share passed per category, and decode speed."""
    models = result["models"]
    categories = list(next(iter(models.values()))["by_category"]) if models else []
    streams = list(next(iter(models.values()))["decode_tok_s"]) if models else []
    head = ["model", *categories, "all", *[f"tok/s ({n} stream{'s' if n != '1' else ''})" for n in streams]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for model, row in models.items():
        cells = [f"{row['by_category'][c]['passed']}/{row['by_category'][c]['cases']}" for c in categories]
        speeds = [str(row["decode_tok_s"][n]) for n in streams]
        lines.append("| " + " | ".join([model, *cells, f"**{row['passed']}/{row['cases']}**", *speeds]) + " |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated ids or aliases")
    parser.add_argument("--quick", action="store_true", help="two prompts per category, one stream, short decode")
    parser.add_argument("--streams", default="1,8", help="concurrent streams to measure decode speed at")
    parser.add_argument("--tokens", type=int, default=64, help="tokens per stream in the speed runs")
    parser.add_argument("--threads", type=int, default=available_cpus())
    parser.add_argument("--verbose", action="store_true", help="every reply in the JSON")
    parser.add_argument("--markdown", metavar="JSON", help="print the README table of a saved result and exit")
    args = parser.parse_args()
    if args.markdown:
        print(markdown(json.loads(Path(args.markdown).read_text())))
        return 0
    if args.quick:
        args.streams, args.tokens = "1", 24
    data = json.loads(CASES.read_text())
    cases = data["cases"]
    if args.quick:
        cases = first_of_each(cases, 2)
    registry = Registry.load()
    result: dict[str, Any] = {"benchmark": "quality", "threads": args.threads, "temperature": 0,
                              "cases": len(cases), "streams": args.streams, "speed_tokens": args.tokens,
                              "models": {}, "skipped": {}}
    started = time.perf_counter()
    for name in [m for m in args.models.split(",") if m]:
        spec = registry.get(name)
        if spec is None or not is_pulled(registry, spec):
            result["skipped"][name] = "not registered" if spec is None else f"not pulled: polargrid-local pull {name}"
            continue
        print(f"{spec.id}...", file=sys.stderr, flush=True)
        result["models"][spec.id] = bench_model(spec.id, cases, data, args)
    result["seconds"] = round(time.perf_counter() - started, 1)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
