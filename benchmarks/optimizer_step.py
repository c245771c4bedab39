"""One AdamW step on workload L's student (41M parameters, vocab 151,936): the for-loop, foreach and fused forms.

    python benchmarks/optimizer_step.py            # each form in a fresh process, 2 threads
    python benchmarks/optimizer_step.py --reps 10

merge-distill's trainer uses the fused kernel (`build.make_optimizer`). Time is the median step after the
first (which allocates the state); memory is the peak RSS the steps add over the model and its gradients.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

FORMS = {"for-loop": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}


def child(form: str, root: Path, reps: int, threads: int) -> dict:
    import resource

    import torch
    from _workloads import WORKLOADS, build

    from merge_distill.models import load_model

    torch.set_num_threads(threads)
    model = load_model(build(WORKLOADS["L"], root) / "student", trainable=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, **FORMS[form])
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    times = []
    for _ in range(reps + 1):
        t0 = time.perf_counter()
        optimizer.step()
        times.append(time.perf_counter() - t0)
    return {"params_m": sum(p.numel() for p in model.parameters()) / 1e6, "step_s": statistics.median(times[1:]),
            "added_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - before}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dir", default=str(Path(tempfile.gettempdir()) / "merge-distill-bench"))
    p.add_argument("--child", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        print("RESULT " + json.dumps(child(a.child, Path(a.dir), a.reps, a.threads)))
        return
    print(f"AdamW step, workload L's student, {a.threads} threads, median of {a.reps} steps")
    for form in FORMS:
        out = subprocess.run([sys.executable, __file__, "--child", form, "--reps", str(a.reps), "--threads",
                              str(a.threads), "--dir", a.dir], capture_output=True, text=True, check=True).stdout
        r = json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:])
        print(f"{form:<10} {r['params_m']:.1f}M params  {r['step_s'] * 1000:7.1f} ms  peak +{r['added_mb']:6.0f} MB")


if __name__ == "__main__":
    main()
