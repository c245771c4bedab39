"""Where one merge-distill training step goes, against the floor of the same work, in one process.

    python benchmarks/profile_step.py                       # zoo-like: 2 experts, ExOPD lam 1.25, 128 x 48 tokens
    python benchmarks/profile_step.py --batch 256 --steps 5 --threads 2

A zoo-like setup: the byte tokenizer (vocab 260), Qwen3-config models of the default zoo's size (hidden 128,
3 layers, 4 heads; random weights: speed does not depend on them), a base (the student and, as `reference:
student`, both experts' reference), a math and a code expert, prompts from the toy world's math and code
training sets, and the default recipe's objective (lam 1.25, so each domain's rows are scored by its
teacher and by the reference). `merge_distill.train.train_step` runs as `merge-distill run` runs it; the
split comes from its own timers plus a timer around each `ModelCache.score` call.

The floor is the unavoidable passes timed alone in this process, alternating with our steps: KV-cached
sampling, each expert's forward on its rows and the reference's on all rows, the student's forward/backward
and AdamW (see `_workloads.floor_step`; the faster of its plain and chunked forms). loop / floor is the
median step over the median floor.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from _workloads import time_floor  # noqa: E402


def build(root: Path, n_prompts: int) -> Path:
    import torch

    from merge_distill.models import save_model
    from merge_distill.toyworld.models import byte_tokenizer, tiny_qwen3
    from merge_distill.toyworld.tasks import make_splits

    if (root / "done").exists():
        return root
    tok = byte_tokenizer()
    for name, seed in (("base", 0), ("math_expert", 1), ("code_expert", 2)):
        model = tiny_qwen3(len(tok), hidden=128, layers=3, heads=4, seed=seed, eos_token_id=tok.eos_token_id,
                           pad_token_id=tok.pad_token_id)
        save_model(model.to(torch.float32), tok, root / name)
    for domain in ("math", "code"):
        train, _ = make_splits(domain, n_prompts, 10, 0)
        (root / f"{domain}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train))
    (root / "done").write_text("")
    return root


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=128, help="prompts per step (half math, half code)")
    p.add_argument("--new-tokens", type=int, default=48)
    p.add_argument("--steps", type=int, default=5, help="timed steps (after one warm-up), each paired with a floor")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dir", default=str(Path(tempfile.gettempdir()) / "merge-distill-bench" / "zoo-like"))
    a = p.parse_args()

    import torch

    torch.set_num_threads(a.threads)
    from merge_distill.recipe import Recipe
    from merge_distill.frozen import ModelCache
    from merge_distill.build import build_run
    from merge_distill.train import train_step

    d = build(Path(a.dir), max(1000, a.batch * (a.steps + 2)))
    recipe = Recipe.model_validate({
        "student": str(d / "base"), "reward_scale": 1.25,
        "experts": [{"name": "math", "teacher": str(d / "math_expert"), "prompts": str(d / "math.jsonl")},
                    {"name": "code", "teacher": str(d / "code_expert"), "prompts": str(d / "code.jsonl")}],
        "rollout": {"prompts_per_step": a.batch, "max_new_tokens": a.new_tokens}, "optim": {"lr": 1e-4},
        "schedule": {"steps": 100},
        "output_dir": tempfile.mkdtemp(prefix="md-profile-")})

    score_times: dict[str, float] = defaultdict(float)

    class TimedModels(ModelCache):
        def score(self, path, rollouts, **kw):
            t0 = time.perf_counter()
            out = super().score(path, rollouts, **kw)
            score_times[Path(path).name] += time.perf_counter() - t0
            return out

    s = build_run(recipe, frozen=TimedModels())
    records, step = [], 0

    def ours() -> float:
        nonlocal step
        score_times.clear()
        t0 = time.perf_counter()
        m = train_step(s, step)
        wall = time.perf_counter() - t0
        step += 1
        models = dict(score_times)
        parts = {"sample": m["time/sample_s"], **{f"score {k}": v for k, v in sorted(models.items())},
                 "advantages": m["time/score_s"] - sum(models.values()), "grading": m.get("time/grade_s", 0.0),
                 "update": m["time/update_s"]}
        parts["overhead"] = wall - sum(parts.values())
        parts["step"] = wall
        records.append(parts)
        return wall

    ours()  # warm-up
    records.clear()
    half = a.batch // 2
    prompts = [list(p.token_ids) for p in s.mixer.next_batch(a.batch)]
    floor = time_floor(d, [("math_expert", list(range(half))), ("code_expert", list(range(half, a.batch))),
                           ("base", None)], prompts, a.new_tokens, a.steps, ours,
                       pad_token_id=s.tokenizer.pad_token_id, student="base")

    med = statistics.median
    ours_parts = {k: med([r[k] for r in records]) for k in records[0]}
    floors = {k: {p: med([f[p] for f in floor[k]]) for p in floor[k][0]} for k in ("plain", "chunked")}
    kind = min(floors, key=lambda k: floors[k]["step"])
    f = floors[kind]
    print(f"zoo-like step: vocab 260, hidden 128, 3 layers, {a.batch} prompts (math + code) x {a.new_tokens} new "
          f"tokens, lam 1.25 (teacher + reference per domain), {a.threads} threads, {a.steps} steps; "
          f"load average {' '.join(Path('/proc/loadavg').read_text().split()[:3])}")
    print(f"{'part':<28}{'merge-distill s':>16}{'floor s':>10}")
    scored = sum(v for k, v in ours_parts.items() if k.startswith("score "))
    rows = [(k, v, f.get(k)) for k, v in ours_parts.items() if k != "step"]
    at = next(i for i, r in enumerate(rows) if r[0] == "advantages")
    rows.insert(at, ("score, all frozen models", scored, f["score"]))
    rows.append(("step", ours_parts["step"], f["step"]))
    for k, v, fv in rows:
        print(f"{k:<28}{v:>16.3f}{'' if fv is None else f'{fv:>10.3f}'}")
    print(f"floor kind: {kind} log-probs (plain {floors['plain']['step']:.3f} s, chunked {floors['chunked']['step']:.3f} s)")
    print(f"loop / floor: {ours_parts['step'] / f['step']:.2f}")


if __name__ == "__main__":
    main()
