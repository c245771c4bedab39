"""Summarise a run's metrics.jsonl: median step time and its split, tokens/s, peak GPU memory.

    python benchmarks/step_stats.py runs/math_code/metrics.jsonl [more.jsonl ...]

Used to compare the same recipe on CPU and GPU (`--set device=cuda`); the first `--skip` steps (warm-up)
are left out of the medians.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def summarise(path: Path, skip: int) -> dict:
    rows = [json.loads(l) for l in path.read_text().splitlines() if l.strip()]
    timed = [r for r in rows if "time/step_s" in r][skip:] or rows
    med = {k: statistics.median(r[k] for r in timed) for k in
           ("time/step_s", "time/sample_s", "time/score_s", "time/update_s")}
    tokens = [sum(r[k] * r[k.replace("response_length", "n_sequences")] for k in r if k.endswith("/response_length")
                  and k.replace("response_length", "n_sequences") in r) for r in timed]
    out = {"run": str(path.parent), "steps": len(rows), "median_step_s": med["time/step_s"],
           "sample_s": med["time/sample_s"], "score_s": med["time/score_s"], "update_s": med["time/update_s"],
           "total_train_s": sum(r["time/step_s"] for r in rows),
           "response_tokens_per_s": statistics.median(t / r["time/step_s"] for t, r in zip(tokens, timed))}
    peaks = [r["memory/gpu_peak_gib"] for r in rows if "memory/gpu_peak_gib" in r]
    if peaks:
        out["gpu_peak_gib"] = max(peaks)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("metrics", nargs="+", type=Path)
    ap.add_argument("--skip", type=int, default=2, help="warm-up steps left out of the medians")
    args = ap.parse_args()
    for p in args.metrics:
        s = summarise(p, args.skip)
        print(" ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in s.items()))


if __name__ == "__main__":
    main()
