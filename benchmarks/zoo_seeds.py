"""Does the headline hold across zoos? The default recipe on several zoo seeds: each seed builds its own zoo
(base, math and code experts, data), distills, evaluates; then each seed's paired gains of the student over
each expert on the expert's own suite, at every temperature the report scores both, and their mean.

    python benchmarks/zoo_seeds.py                       # seeds 0, 1, 2; runs in runs/zoo_seeds/seed-N
    python benchmarks/zoo_seeds.py --seeds 0 1 2 3 --recipe recipes/math_code.yaml

A seed whose run finished is not run again (its report is read); an interrupted one resumes. On 2 CPU cores a
seed takes about half an hour (the zoo build, 100 steps, the evaluation).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_seed(recipe: Path, seed: int, out: Path) -> dict:
    report = out / "report.json"
    if not report.is_file():
        cmd = [sys.executable, "-m", "merge_distill", "run", str(recipe), "--resume", "--set", f"zoo.seed={seed}",
               "--set", f"output_dir={out}"]
        subprocess.run(cmd, check=True, cwd=ROOT)
    return json.loads(report.read_text())


def gains(report: dict) -> dict[str, tuple[float, float]]:
    """'student@T0.8 - math@T0.8' -> (points, standard error), for the student against each expert."""
    out = {}
    for d in report["paired_differences"]:
        a, b = d["a"], d["b"]
        matched = a.partition("@")[2] == b.partition("@")[2]
        if b != "base" and matched:
            out[f"{a} - {b}"] = (100 * d["diff"], 100 * d["stderr"])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--recipe", type=Path, default=ROOT / "recipes" / "math_code.yaml")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "zoo_seeds")
    args = ap.parse_args()
    per_seed = {s: gains(run_seed(args.recipe, s, args.out / f"seed-{s}")) for s in args.seeds}
    keys = list(dict.fromkeys(k for g in per_seed.values() for k in g))
    print(f"paired gain, points +- SE (n problems as in each report), per zoo seed and mean over {len(args.seeds)}")
    print(f"{'comparison':<32} | " + " | ".join(f"seed {s:<10}" for s in args.seeds) + " | mean")
    for k in keys:
        cells = [per_seed[s].get(k) for s in args.seeds]
        mean = statistics.mean(c[0] for c in cells if c) if any(cells) else float("nan")
        print(f"{k:<32} | " + " | ".join(f"{c[0]:+5.1f} +- {c[1]:.1f}  " if c else f"{'-':<15}" for c in cells)
              + f" | {mean:+.1f}")


if __name__ == "__main__":
    main()
