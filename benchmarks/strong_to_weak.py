"""The strong-to-weak study: OPD, ExOPD and ExOPD with reward correction, side by side, across zoo seeds,
student sizes, teacher RL strengths and training steps.

    python benchmarks/strong_to_weak.py                                  # the shipped preset on zoo seeds 0, 1, 2
    python benchmarks/strong_to_weak.py \\
        --set schedule.steps=100 --set schedule.eval_every=25            # the preset at 100 steps
    python benchmarks/strong_to_weak.py --seeds 0 --students small_base,mid_base \\
        --set schedule.steps=100 --set schedule.eval_every=25            # the student's size
    python benchmarks/strong_to_weak.py --seeds 0 --teachers large_math_expert@20 \\
        --set schedule.steps=100 --set schedule.eval_every=25            # the teacher's RL strength
    python benchmarks/strong_to_weak.py --decompose --seeds 0 --students small_base,mid_base,base \\
        --teachers large_math_expert@20,large_math_expert   # what log T/R_student is made of (a minute)

Each cell is one `merge-distill run recipes/strong_to_weak.yaml` (its three arms, trained and evaluated side by
side on the same held-out problems with the same per-(problem, sample) seeds) with the student, teacher and zoo
seed set on the command line; runs resume (`--resume`), so an interrupted sweep picks up where it stopped.
Its report.json gives the paired differences exopd - opd and exopd_corrected - opd (avg@k over the test split,
standard errors paired per problem). With `schedule.eval_every`, every arm's student was also evaluated during
training (one sample per problem, the same seeds in every arm): the script pairs the arms at each of those
steps too, which is the step sweep. Prints one table and adds its cells to `<out>/strong_to_weak.json`.

Zoo members: `small_base` 0.12M parameters, `mid_base` 0.36M, `base` 0.62M, `large_base` and
`large_math_expert` 1.27M; `large_math_expert@N` is the large expert after N of its 80 GRPO steps.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

ARMS = ("opd", "exopd", "exopd_corrected")
SUITE = "zoo-math"


def per_problem(path: Path) -> dict[str, float]:
    """task id -> mean score over its samples, from a generations file."""
    sums: dict[str, list[float]] = {}
    for line in path.read_text().splitlines():
        r = json.loads(line)
        sums.setdefault(r["task_id"], []).append(r["score"])
    return {k: sum(v) / len(v) for k, v in sums.items()}


def step_curves(out: Path) -> list[dict]:
    """Per periodic-evaluation step: each arm's score and each arm minus opd (paired)."""
    from merge_distill.evaluation.metrics import paired_difference

    steps = sorted({int(p.name.removeprefix("step-")) for arm in ARMS
                    for p in (out / "variants" / arm / "evals").glob("step-*")})
    rows = []
    for step in steps:
        files = {arm: out / "variants" / arm / "evals" / f"step-{step}" / "generations" / f"student__{SUITE}.jsonl"
                 for arm in ARMS}
        if not all(f.exists() for f in files.values()):
            continue
        scores = {arm: per_problem(f) for arm, f in files.items()}
        row = {"step": step, **{arm: sum(s.values()) / len(s) for arm, s in scores.items()}}
        for arm in ARMS[1:]:
            d, se, n = paired_difference(scores[arm], scores["opd"])
            row[f"{arm}-opd"] = {"diff": d, "stderr": se, "n": n}
        rows.append(row)
    return rows


def cell(seed: int, student: str, teacher: str, sets: list[str], out_root: Path, recipe: str) -> dict:
    from merge_distill.sweep import mean_response_length

    name = f"seed{seed}-{student}-{teacher.replace('@', '-rl')}" + "".join(
        "-" + x.split(".")[-1].replace("=", "") for x in sets)  # e.g. seed0-base-large_math_expert-steps200
    out = out_root / name
    cmd = [sys.executable, "-m", "merge_distill", "run", recipe, "--resume",
           "--set", f"zoo.seed={seed}", "--set", f"student=zoo:{student}",
           "--set", f"experts.math.teacher=zoo:{teacher}", "--set", f"output_dir={out}"]
    for s in sets:
        cmd += ["--set", s]
    if not (out / "report.json").exists():
        print(f"== {name}: {' '.join(cmd[2:])}", flush=True)
        subprocess.run(cmd, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    report = json.loads((out / "report.json").read_text())
    whole = {r["model"]: r for r in report["rows"] if r["suite"] == SUITE and r["subset"] is None}
    paired = {f"{p['a']}-{p['b']}": p for p in report["paired_differences"] if p["suite"] == SUITE}
    lengths = {arm: mean_response_length(out / "eval", arm, SUITE) for arm in ARMS}
    return {"name": name, "seed": seed, "student": student, "teacher": teacher, "sets": sets,
            "scores": {m: {"score": r["score"], "stderr": r["stderr"], "n_problems": r["n_problems"],
                           "n_samples": r["n_samples"]} for m, r in whole.items()},
            "paired": {k: paired[k] for k in ("exopd-opd", "exopd_corrected-opd") if k in paired},
            "mean_length": lengths, "steps": step_curves(out)}


def decomposition(seed: int, students: list[str], teacher: str, rows: int = 512) -> dict:
    """What ExOPD extrapolates, measured on the teacher's own samples of training prompts: per response token,
    log T/R_student = log T/B (what the teacher's RL changed; B = its pre-RL base, `large_base`) + log B/S0 (the
    capacity gap: the large base against the student's initial weights). Mean and standard deviation over
    tokens; `gap_share` = var(log B/S0) / (var(log T/B) + var(log B/S0))."""
    import torch

    from merge_distill.data import render_prompt
    from merge_distill.models import load_model, load_tokenizer
    from merge_distill.sampling import row_seeds, sample
    from merge_distill.scoring import response_logprobs
    from merge_distill.toyworld.zoo import Zoo

    zoo = Zoo("default", seed)
    tok = load_tokenizer(zoo.path(teacher))
    records = [json.loads(line) for line in (zoo.path("data") / "math_train.jsonl").read_text().splitlines()][:rows]
    prompts = [render_prompt(tok, r["prompt"]) for r in records]
    with torch.no_grad():
        t_model = load_model(zoo.path(teacher)).eval()
        rollouts = sample(t_model, prompts, max_new_tokens=48, temperature=1.0, eos_token_id=tok.eos_token_id,
                          pad_token_id=tok.pad_token_id, seeds=row_seeds(seed, len(prompts)))
        mask = rollouts.response_mask.bool()
        lp = {name: response_logprobs(load_model(zoo.path(name)).eval(), rollouts)[mask]
              for name in dict.fromkeys(["large_base", *students])}
        lp_t = response_logprobs(t_model, rollouts)[mask]
    out = {}
    for st in students:
        rl, gap = lp_t - lp["large_base"], lp["large_base"] - lp[st]
        out[st] = {"rl_mean": rl.mean().item(), "rl_std": rl.std().item(), "gap_mean": gap.mean().item(),
                   "gap_std": gap.std().item(), "gap_share": (gap.var() / (rl.var() + gap.var())).item(),
                   "tokens": int(mask.sum())}
    return out


def pts(d: dict) -> str:
    return f"{100 * d['diff']:+.1f} ± {100 * d['stderr']:.1f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--students", default="base", help="zoo members: small_base, mid_base, base")
    p.add_argument("--teachers", default="large_math_expert", help="zoo members, e.g. large_math_expert@40")
    p.add_argument("--set", action="append", default=[], help="recipe overrides for every cell")
    p.add_argument("--recipe", default=str(ROOT / "recipes" / "strong_to_weak.yaml"))
    p.add_argument("--out", default="runs/strong_to_weak_study")
    p.add_argument("--decompose", action="store_true",
                   help="only measure log T/R_student = log T/B + log B/S0 on the teacher's samples, per student")
    a = p.parse_args()
    if a.decompose:
        print("per response token of the teacher's own samples (512 training prompts): nats")
        print(f"{'seed':>4} {'teacher':<22} {'student':<10} {'log T/B mean':>13} {'sd':>6} {'log B/S0 mean':>14} "
              f"{'sd':>6} {'gap share of variance':>22}")
        for seed in a.seeds.split(","):
            for teacher in a.teachers.split(","):
                for st, d in decomposition(int(seed), a.students.split(","), teacher).items():
                    print(f"{seed:>4} {teacher:<22} {st:<10} {d['rl_mean']:>13.3f} {d['rl_std']:>6.3f} "
                          f"{d['gap_mean']:>14.3f} {d['gap_std']:>6.3f} {d['gap_share']:>22.2f}")
        return
    out_root = Path(a.out)
    cells = [cell(int(seed), student, teacher, a.set, out_root, a.recipe)
             for seed in a.seeds.split(",") for student in a.students.split(",") for teacher in a.teachers.split(",")]
    summary = out_root / "strong_to_weak.json"  # every cell run into this folder so far, by name
    known = {c["name"]: c for c in json.loads(summary.read_text())} if summary.exists() else {}
    known.update({c["name"]: c for c in cells})
    summary.write_text(json.dumps(sorted(known.values(), key=lambda c: c["name"]), indent=1))

    print(f"\n{SUITE} avg@k at T=1 (points; paired standard errors over the test problems)")
    print(f"{'seed':>4} {'student':<10} {'teacher':<22} {'base':>6} {'teacher':>8} {'opd':>6} {'exopd':>6} "
          f"{'corr':>6} {'exopd - opd':>14} {'corr - opd':>14} {'len opd/ex/corr':>17}")
    for c in cells:
        s = c["scores"]
        n = s["opd"]["n_problems"]
        print(f"{c['seed']:>4} {c['student']:<10} {c['teacher']:<22} {100 * s['base']['score']:>6.1f} "
              f"{100 * s['math']['score']:>8.1f} " + " ".join(f"{100 * s[arm]['score']:>6.1f}" for arm in ARMS)
              + f" {pts(c['paired']['exopd-opd']):>14} {pts(c['paired']['exopd_corrected-opd']):>14} "
              + "/".join(f"{c['mean_length'][arm]:.1f}" for arm in ARMS)
              + f"   ({n} problems x {s['opd']['n_samples']} samples)")
    curves = [c for c in cells if c["steps"]]
    if curves:
        print("\nduring training (one sample per problem; paired against opd at the same step)")
        print(f"{'cell':<44} {'step':>5} {'opd':>6} {'exopd':>6} {'corr':>6} {'exopd - opd':>14} {'corr - opd':>14}")
        for c in curves:
            for r in c["steps"]:
                print(f"{c['name']:<44} {r['step']:>5} " + " ".join(f"{100 * r[arm]:>6.1f}" for arm in ARMS)
                      + f" {pts(r['exopd-opd']):>14} {pts(r['exopd_corrected-opd']):>14}")


if __name__ == "__main__":
    main()
