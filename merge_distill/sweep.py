"""`merge-distill sweep`: run a recipe over a grid of overrides (e.g. lam values) and plot score and
response length against the swept key, per domain (the paper's Figure 2). One zoo, one evaluation setup:
the teachers are evaluated once, each variant's student with the same suites, samples and seeds.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

from merge_distill.adapters import model_folder
from merge_distill.errors import UserError
from merge_distill.io import atomic_write_json


def parse_grid(overrides: list[str]) -> tuple[list[str], dict[str, list[str]]]:
    """Split `--set` values: `KEY=a,b,c` is swept, anything else is fixed for every variant."""
    fixed, grid = [], {}
    for text in overrides:
        key, _, value = text.partition("=")
        if "," in value and not value.strip().startswith(("[", "{")):
            grid[key.strip()] = [v.strip() for v in value.split(",")]
        else:
            fixed.append(text)
    if not grid:
        raise UserError("sweep: give at least one --set KEY=v1,v2,... to sweep over")
    return fixed, grid


def variants(grid: dict[str, list[str]]) -> list[dict[str, str]]:
    keys = list(grid)
    return [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))]


def variant_name(v: dict[str, str]) -> str:
    return ",".join(f"{k.split('.')[-1]}={x}" for k, x in v.items())


def sweep(recipe_path: Path, overrides: list[str], *, progress=None, log=print) -> Path:
    """Train and evaluate one student per grid point. What each point's recipe names is built first
    (`extensions.build`: the zoo a recipe's `zoo:` paths name)."""
    from merge_distill import extensions
    from merge_distill.evaluation.metrics import paired_difference
    from merge_distill.evaluation.runner import ModelSpec, evaluate
    from merge_distill.run import eval_suites, start_recipes
    from merge_distill.build import train_recipe
    from merge_distill.evaluation.card import record_run, write_card
    from merge_distill.validate import check_override_key, load_recipe

    fixed, grid = parse_grid(overrides)
    for key, values in grid.items():  # the grid's points load one at a time, after the baselines: check keys now
        check_override_key(key.split("."), f"{key}={','.join(values)}")
    loaded = load_recipe(recipe_path, fixed)
    if loaded.eval is None:
        raise UserError(f"{recipe_path}: a sweep needs an eval: section")
    start_recipes([loaded], evaluate_after=True)  # before the zoo is built or anything trains
    base = extensions.build(loaded, progress=progress, log=log)
    root = Path(base.output_dir) / "sweep"
    suites = eval_suites(base)
    cfg = base.eval
    common = dict(samples=cfg.samples, temperature=cfg.temperature, seed=cfg.seed,
                  max_new_tokens=cfg.max_new_tokens or base.rollout.max_new_tokens, progress=progress,
                  isolation=base.isolation)
    teachers = [ModelSpec(e.name, model_folder(e.teacher)) for e in base.experts if e.teacher]
    reference = evaluate([ModelSpec("base", base.student.path), *teachers], suites, out_dir=root / "baselines", **common)
    points = []
    for v in variants(grid):
        name = variant_name(v)
        recipe = extensions.build(load_recipe(recipe_path, fixed + [f"{k}={x}" for k, x in v.items()] +
                                     [f"output_dir={root / name}"]), progress=progress, log=log)
        final = Path(recipe.output_dir) / "final"
        if not final.exists():
            final = train_recipe(recipe, resume=True, progress=progress)
            record_run(recipe, name, None, None)  # its scores are sweep.json's
            write_card(recipe.output_dir)
        result = evaluate([ModelSpec(name, str(final))], suites, out_dir=root / name / "eval", **common)
        for row in result.rows:
            if row.subset is None:
                lengths = mean_response_length(root / name / "eval", name, row.suite)
                # minus each baseline on the same problems and samples (common seeds): paired
                paired = {m: dict(zip(("diff", "stderr", "n_problems"), paired_difference(
                    result.per_problem[(name, row.suite)], reference.per_problem[(m, s)])))
                    for m, s in reference.per_problem if s == row.suite}
                points.append({**{k: _number(x) for k, x in v.items()}, "variant": name, "suite": row.suite,
                               "domain": row.domain, "metric": row.metric, "k": row.k, "score": row.score,
                               "stderr": row.stderr, "response_length": lengths, "n_problems": row.n_problems,
                               "n_samples": row.n_samples, "minus": paired})
    baselines = [{**r.to_dict(), "response_length": mean_response_length(root / "baselines", r.model, r.suite)}
                 for r in reference.rows if r.subset is None]
    atomic_write_json(root / "sweep.json", {"swept": list(grid), "points": points, "baselines": baselines,
                                            "sandbox_isolation": reference.isolation})
    plot(points, baselines, list(grid), root / "sweep.png")
    return root


def _number(x: str):
    try:
        return float(x)
    except ValueError:
        return x


def mean_response_length(eval_dir: Path, model: str, suite: str) -> float:
    """Mean response tokens of (model, suite) over its generations file in `eval_dir`."""
    from merge_distill.evaluation.runner import _safe

    path = eval_dir / "generations" / f"{_safe(model)}__{_safe(suite)}.jsonl"
    rows = [json.loads(l) for l in path.read_text().splitlines() if l.strip()]
    return sum(r["n_tokens"] for r in rows) / max(1, len(rows))


def plot(points: list[dict], baselines: list[dict], swept: list[str], out: Path) -> None:
    """Score (top) and mean response length (bottom) against the first swept key, one line per value of the
    others (e.g. reward_scale with and without method.log_ratio_clip); baselines dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key, rest = swept[0], swept[1:]
    suites = sorted({p["suite"] for p in points})
    fig, axes = plt.subplots(2, len(suites), figsize=(4.5 * len(suites), 6), squeeze=False)
    colours: dict[str, str] = {"base": "gray"}
    others = itertools.cycle(f"C{i}" for i in range(10))
    for j, suite in enumerate(suites):
        k_head = min(q["k"] for q in points if q["suite"] == suite)
        pts = [p for p in points if p["suite"] == suite and p["k"] == k_head]
        series = list(dict.fromkeys(tuple(p[r] for r in rest) for p in pts))
        lengths = []
        for n, values in enumerate(series):
            line = sorted((p for p in pts if tuple(p[r] for r in rest) == values), key=lambda p: p[key])
            label = ", ".join(f"{r.split('.')[-1]}={v}" for r, v in zip(rest, values)) or "student"
            style = dict(marker="os^vD"[n % 5], color="black" if n == 0 else f"C{9 - n % 10}", label=label)
            xs = [p[key] for p in line]
            axes[0][j].errorbar(xs, [100 * p["score"] for p in line], yerr=[100 * p["stderr"] for p in line],
                                capsize=3, zorder=3, **style)
            axes[1][j].plot(xs, [p["response_length"] for p in line], **style)
            lengths += [p["response_length"] for p in line]
        for b in baselines:  # one colour per baseline model, the same in every panel
            if b["suite"] == suite and b["k"] == k_head:
                if b["model"] not in colours:
                    colours[b["model"]] = next(others)
                axes[0][j].axhline(100 * b["score"], linestyle="--", linewidth=1, color=colours[b["model"]],
                                   label=f"{b['model']} {100 * b['score']:.1f}")
                axes[1][j].axhline(b["response_length"], linestyle="--", linewidth=1, color=colours[b["model"]],
                                   label=f"{b['model']} {b['response_length']:.1f}")
                lengths.append(b["response_length"])
        axes[0][j].set_title(f"{suite} ({pts[0]['metric']}@{k_head})")
        axes[0][j].set_ylabel("score (%)")
        axes[0][j].legend(fontsize=7)
        axes[1][j].set_ylim(0, 1.15 * max(lengths + [1.0]))  # from 0: a 0.1-token wobble must not look like growth
        axes[1][j].set_ylabel("response length (tokens)")
        axes[1][j].set_xlabel(key)
        axes[1][j].legend(fontsize=7)
    fig.tight_layout()
    tmp = out.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(out)
