#!/usr/bin/env python3
"""Embedding benchmark: sentences per second through PolarGrid against the numpy reference, and quality.

Throughput: the same sentences, in requests of --batch, on the same number of threads, through
(a) LocalEngine (all-MiniLM-L6-v2, converted GGUF on llama.cpp), (b) llama-cpp-python's
Llama.embed on that GGUF directly, (c) the plain-numpy reference (polargrid_local.store.bert_reference,
what sentence-transformers computes, without torch). Runs alternate; medians of --repeats.

Quality, for the default model and SmolLM2 mean pooling: Spearman correlation with the grades of
benchmarks/data/embed_sts_pairs.json, and top-1 accuracy and MRR on
benchmarks/data/embed_retrieval.json (each query against every passage of the pool).

    python benchmarks/bench_embed.py [--repeats 5] [--threads N] [--out results.json]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(__file__).resolve().parent / "data"
MODELS = {"all-minilm-l6-v2": "the default (text-embedding-3-small)", "smollm2-135m-embed": "SmolLM2-135M mean-pooled"}


def sentences() -> list[str]:
    pairs = json.loads((DATA / "embed_sts_pairs.json").read_text())["pairs"]
    retrieval = json.loads((DATA / "embed_retrieval.json").read_text())
    seen: dict[str, None] = {}
    for text in [p[k] for p in pairs for k in ("a", "b")] + retrieval["passages"] + [q["query"] for q in retrieval["queries"]]:
        seen.setdefault(text)
    return list(seen)


def spearman(x: list[float], y: list[float]) -> float:
    def ranks(values: list[float]) -> np.ndarray:
        values = np.asarray(values, dtype=np.float64)
        order = values.argsort(kind="stable")
        out = np.empty(len(values))
        out[order] = np.arange(len(values), dtype=np.float64)
        for v in np.unique(values):  # ties share their mean rank
            out[values == v] = out[values == v].mean()
        return out

    return float(np.corrcoef(ranks(x), ranks(y))[0, 1])


def quality(embed) -> dict[str, float]:
    pairs = json.loads((DATA / "embed_sts_pairs.json").read_text())["pairs"]
    a, b = embed([p["a"] for p in pairs]), embed([p["b"] for p in pairs])
    cosines = (a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    retrieval = json.loads((DATA / "embed_retrieval.json").read_text())
    passages = embed(retrieval["passages"])
    queries = embed([q["query"] for q in retrieval["queries"]])
    passages /= np.linalg.norm(passages, axis=1, keepdims=True)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    scores = queries @ passages.T
    ranks = [int((scores[i] > scores[i, q["relevant"]]).sum()) + 1 for i, q in enumerate(retrieval["queries"])]
    return {"sts_spearman": round(spearman(cosines.tolist(), [p["grade"] for p in pairs]), 4),
            "sts_pairs": len(pairs),
            "retrieval_top1": round(sum(r == 1 for r in ranks) / len(ranks), 4),
            "retrieval_mrr": round(float(np.mean([1.0 / r for r in ranks])), 4),
            "retrieval_queries": len(ranks), "retrieval_pool": len(retrieval["passages"])}


def per_second(fn, texts: list[str], batch: int) -> float:
    started = time.perf_counter()
    for i in range(0, len(texts), batch):
        fn(texts[i:i + batch])
    return len(texts) / (time.perf_counter() - started)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="0: every core this process may use")
    parser.add_argument("--batch", type=int, default=32, help="sentences per request")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args()

    import llama_cpp
    from threadpoolctl import threadpool_limits

    from polargrid_local import LocalEngine
    from polargrid_local.llm.backend import available_cpus
    from polargrid_local.store.bert_reference import NumpyBert

    threads = args.threads or available_cpus()
    engine = LocalEngine(ROOT / "models.toml", n_threads=threads)
    spec = engine.registry.get("all-minilm-l6-v2")
    gguf = spec.path_in(engine.registry.cache_dir)
    reference = NumpyBert(gguf.parent / "hf")
    raw = llama_cpp.Llama(str(gguf), embedding=True, n_ctx=512, n_batch=512, n_ubatch=512, pooling_type=1,
                          n_threads=threads, n_threads_batch=threads, verbose=False)

    def through_engine(model: str):
        def embed(texts: list[str]) -> np.ndarray:
            reply = engine.embeddings({"model": model, "input": texts})
            return np.array([d.embedding for d in reply.data], dtype=np.float32)
        return embed

    texts = sentences()
    ours = through_engine("all-minilm-l6-v2")
    with threadpool_limits(limits=threads):
        expected = reference.embed(texts)
        got = ours(texts)
        cosine = (got * expected).sum(axis=1)
        runs: dict[str, list[float]] = {"engine": [], "llama_cpp_direct": [], "numpy_reference": []}
        raw.embed(texts[:args.batch])  # warm up the direct path as the engine was warmed up above
        for _ in range(args.repeats):
            runs["engine"].append(per_second(ours, texts, args.batch))
            runs["llama_cpp_direct"].append(per_second(lambda b: raw.embed(b, normalize=True), texts, args.batch))
            runs["numpy_reference"].append(per_second(lambda b: reference.embed(b, batch_size=args.batch),
                                                      texts, args.batch))
    median = {k: round(statistics.median(v), 1) for k, v in runs.items()}
    report = {
        "model": "all-minilm-l6-v2 (F16 GGUF converted at pull)",
        "threads": threads, "sentences": len(texts), "batch": args.batch, "repeats": args.repeats,
        "sentences_per_second": median,
        "ratio_engine_vs_numpy_reference": round(median["engine"] / median["numpy_reference"], 2),
        "ratio_engine_vs_llama_cpp_direct": round(median["engine"] / median["llama_cpp_direct"], 3),
        "cosine_vs_reference": {"min": round(float(cosine.min()), 6), "mean": round(float(cosine.mean()), 6)},
        "quality": {model: {"what": what, **quality(through_engine(model))} for model, what in MODELS.items()},
    }
    report["quality"]["numpy_reference"] = {"what": "all-MiniLM-L6-v2 in numpy (same weights)",
                                            **quality(lambda t: reference.embed(t))}
    engine.close()
    raw.close()
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
