"""Import time and chat-only RSS of polargrid_local, against a baseline checkout measured in the same run.

The baseline is another source tree of the library (e.g. `git archive <commit> | tar -x -C /tmp/base`, with
kernels/ copied to polargrid_local/kernels), put first on PYTHONPATH; "current" is the installed one.
Each probe runs in a fresh process from /tmp: wall time of `import polargrid_local` (median of --rounds),
which heavy modules the import loaded, and VmRSS/VmHWM after one chat request (and which engines it loaded).
Writes benchmarks/results/footprint.json with ratios current/baseline.
Usage: python benchmarks/bench_footprint.py --baseline-src /tmp/base [--rounds 5]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parent / "results" / "footprint.json"
HEAVY = ["llama_cpp", "faster_whisper", "ctranslate2", "piper", "onnxruntime", "av", "numba", "jsonschema"]
IMPORT = "import time; t = time.perf_counter(); import polargrid_local; print(time.perf_counter() - t)"
MODULES = f"import sys, json, polargrid_local; print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))"
CHAT = f"""
import sys, json, polargrid_local
client = polargrid_local.PolarGridSync()
client.chat_completion({{"model": "smollm2", "messages": [{{"role": "user", "content": "hi"}}], "max_tokens": 8}})
status = dict(line.split(":", 1) for line in open("/proc/self/status") if line.startswith(("VmRSS", "VmHWM")))
print(json.dumps({{"rss_mb": int(status["VmRSS"].split()[0]) // 1024, "hwm_mb": int(status["VmHWM"].split()[0]) // 1024,
                  "heavy_loaded": [m for m in {HEAVY!r} if m in sys.modules]}}))
client.close()
"""


def probe(pythonpath: str | None, rounds: int) -> dict:
    env = dict(os.environ)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath

    def run(code: str) -> str:
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd="/tmp",
                              check=True)
        return done.stdout.strip().splitlines()[-1]

    times = [float(run(IMPORT)) for _ in range(rounds)]
    return {"import_s_median": round(statistics.median(times), 3), "import_s_min": round(min(times), 3),
            "heavy_after_import": json.loads(run(MODULES)), "chat_only": json.loads(run(CHAT))}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--baseline-src", required=True)
    parser.add_argument("--rounds", type=int, default=5)
    opts = parser.parse_args()
    baseline, current = probe(opts.baseline_src, opts.rounds), probe(None, opts.rounds)
    report = {"baseline": baseline, "current": current,
              "import_time_ratio_current_over_baseline": round(current["import_s_median"] / baseline["import_s_median"], 3),
              "chat_rss_ratio_current_over_baseline": round(current["chat_only"]["rss_mb"] / baseline["chat_only"]["rss_mb"], 3)}
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
