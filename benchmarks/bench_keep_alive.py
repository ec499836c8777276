"""keep_alive timings: how long after a model's keep_alive expires it is actually unloaded.

For each keep_alive, one embedding request (the small embedder), then status is polled every 5 ms until the
model is gone. Writes benchmarks/results/keep_alive.json: per keep_alive, the observed idle time before the
unload and the lag past the expiry (median of --rounds).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from polargrid_local import LocalEngine

OUT = Path(__file__).resolve().parent / "results" / "keep_alive.json"
MODEL = "smollm2-135m-embed"


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--keep-alive", type=float, nargs="*", default=[0.0, 0.5, 1.0, 2.0])
    opts = parser.parse_args()
    engine = LocalEngine()
    results = {}
    try:
        for keep in opts.keep_alive:
            lags = []
            for _ in range(opts.rounds):
                engine.embeddings({"model": MODEL, "input": "timing", "keep_alive": keep})
                done = time.monotonic()
                while MODEL in engine.pool.loaded():
                    time.sleep(0.005)
                lags.append(time.monotonic() - done)
            results[str(keep)] = {"unloaded_after_s_median": round(statistics.median(lags), 3),
                                  "lag_past_expiry_ms_median": round(1000 * (statistics.median(lags) - keep), 1),
                                  "lag_past_expiry_ms_max": round(1000 * (max(lags) - keep), 1)}
            print(keep, results[str(keep)])
    finally:
        engine.close()
    report = {"model": MODEL, "rounds": opts.rounds, "reaper_interval_s": 0.25, "keep_alive": results}
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
