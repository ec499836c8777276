#!/usr/bin/env python3
"""Rerank benchmark: quality (nDCG@5, recall@1) and documents per second of each rerank method, as JSON.

The set is benchmarks/data/rerank_set.json: 36 queries x 10 candidates with graded relevance (3 answers,
2 partly answers, 1 on topic without answering, 0 another question of the same topic or another topic).
Methods, through polargrid_local's rerank (in-process, the same code /v1/rerank runs):

- cosine: embedding cosine alone, all-MiniLM-L6-v2 (the default embedding model; the baseline)
- judge: SmolLM2-135M-Instruct's P(yes) for "does the document answer the query?" (rerank-1)
- judge+cosine: the two fused by reciprocal rank (k=60), a cheap way to use both
- cosine on SmolLM2 mean-pooled vectors, for reference

Quality is deterministic (greedy probes, fixed candidates); speed is documents per second for each method
on the same requests in the same run (each method's model warmed first), and the judge's ratio to cosine.

    python benchmarks/bench_rerank.py [--quick] [--repeats 3] [--out results.json]

On the 2-core development machine shared with other jobs (load ~12), --quick (8 queries, one timing pass) took
5 minutes and the full set with --repeats 1 about 20; the default --repeats 3 adds two more timing passes.
"""
from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(__file__).resolve().parent / "data" / "rerank_set.json"
sys.path.insert(0, str(ROOT))

METHODS = {"cosine": "all-minilm-l6-v2", "judge": "rerank-1", "cosine-smollm2": "smollm2-135m-embed"}


def load_set() -> list[dict]:
    """Each query with its 10 candidates (text, grade), shuffled with a fixed seed so position tells nothing."""
    data = json.loads(DATA.read_text())
    grades = data["grades"]
    topics = data["topics"]
    rng = random.Random(23)
    out = []
    for t, topic in enumerate(topics):
        neighbour = topics[(t + 1) % len(topics)][0]["answer"]
        for entry in topic:
            candidates = [(entry[k], g) for k, g in grades.items()]
            candidates += [(other[k], 0) for other in topic if other is not entry for k in grades]
            candidates.append((neighbour, 0))
            rng.shuffle(candidates)
            out.append({"query": entry["query"], "documents": [c[0] for c in candidates],
                        "grades": [c[1] for c in candidates]})
    return out


def ndcg_at(order: list[int], grades: list[int], k: int = 5) -> float:
    gains = [(2 ** grades[i] - 1) / math.log2(rank + 2) for rank, i in enumerate(order[:k])]
    ideal = [(2 ** g - 1) / math.log2(rank + 2) for rank, g in enumerate(sorted(grades, reverse=True)[:k])]
    return sum(gains) / sum(ideal)


def fuse(*orders: list[int], k: int = 60) -> list[int]:
    """Reciprocal rank fusion of several orderings of the same documents."""
    score: dict[int, float] = {}
    for order in orders:
        for rank, i in enumerate(order):
            score[i] = score.get(i, 0.0) + 1.0 / (k + rank + 1)
    return sorted(score, key=lambda i: (-score[i], i))


def quality(orders: list[list[int]], queries: list[dict]) -> dict:
    ndcg = [ndcg_at(o, q["grades"]) for o, q in zip(orders, queries, strict=True)]
    top1 = [q["grades"][o[0]] == 3 for o, q in zip(orders, queries, strict=True)]
    return {"ndcg@5": round(statistics.mean(ndcg), 4), "recall@1": round(sum(top1) / len(top1), 4)}


def run(client, model: str, queries: list[dict]) -> tuple[list[list[int]], float]:
    started = time.perf_counter()
    orders = [[r.index for r in client.rerank({"model": model, "query": q["query"], "documents": q["documents"],
                                                "return_documents": False}).results] for q in queries]
    return orders, time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="8 queries, one timing pass")
    parser.add_argument("--repeats", type=int, default=3, help="timing passes per method (median)")
    parser.add_argument("--threads", type=int, help="CPU threads per model (default: all)")
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args(argv)

    from polargrid_local import PolarGridSync

    queries = load_set()[:8] if args.quick else load_set()
    repeats = 1 if args.quick else args.repeats
    documents = sum(len(q["documents"]) for q in queries)
    results: dict[str, dict] = {}
    with PolarGridSync(n_threads=args.threads) as client:
        orders: dict[str, list[list[int]]] = {}
        for name, model in METHODS.items():
            run(client, model, queries[:1])  # load and warm the model
            orders[name], _ = run(client, model, queries)
            results[name] = {"model": model, **quality(orders[name], queries)}
        seconds: dict[str, list[float]] = {name: [] for name in METHODS}
        for n in range(repeats):  # alternate, so load on the machine falls on every method alike
            # a new query text per pass: the judge is not timed on prompts its cache already holds
            fresh = [{**q, "query": f"({n + 1}) {q['query']}"} for q in queries]
            for name, model in METHODS.items():
                seconds[name].append(run(client, model, fresh)[1])
        for name in METHODS:
            results[name]["documents_per_s"] = round(documents / statistics.median(seconds[name]), 1)
        fused = [fuse(j, c) for j, c in zip(orders["judge"], orders["cosine"], strict=True)]
        results["judge+cosine"] = {"model": "rerank-1 + all-minilm-l6-v2", **quality(fused, queries)}
    report = {
        "benchmark": "rerank", "queries": len(queries), "candidates_per_query": 10, "repeats": repeats,
        "methods": results,
        "judge_minus_cosine": {k: round(results["judge"][k] - results["cosine"][k], 4) for k in ("ndcg@5", "recall@1")},
        "fused_minus_cosine": {k: round(results["judge+cosine"][k] - results["cosine"][k], 4)
                               for k in ("ndcg@5", "recall@1")},
        "judge_speed_vs_cosine": round(results["judge"]["documents_per_s"] / results["cosine"]["documents_per_s"], 4),
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
