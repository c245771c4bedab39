"""`merge-distill run`: train a recipe (and its `compare:` variants), evaluate side by side, report."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

from merge_distill.errors import UserError
from merge_distill.provenance import provenance
from merge_distill.evaluation.report import PairedDifference, write_results
from merge_distill.evaluation.runner import (
    EvalResult,
    ModelSpec,
    evaluate,
    generate_and_grade,
    longest_request,
    score_rows,
)
from merge_distill.adapters import model_folder
from merge_distill.recipe import STUDENT, Recipe, model_label
from merge_distill.tracking import log_report, open_trackers


def eval_suites(recipe: Recipe):
    """The recipe's held-out suites (by name, path, or a name an extension registered, e.g. the toy world's `zoo-*`)."""
    from merge_distill.evaluation.suites import load_suite

    names = recipe.eval.suites if recipe.eval and recipe.eval.suites else [e.eval_suite for e in recipe.experts]
    if any(n is None for n in names):
        missing = [e.name for e in recipe.experts if e.eval_suite is None]
        raise UserError(f"eval: experts {', '.join(missing)} have no eval_suite and eval.suites is not set")
    suites = [load_suite(n) for n in names]
    if recipe.eval and recipe.eval.max_problems:
        from dataclasses import replace

        suites = [replace(s, records=s.records[: recipe.eval.max_problems]) for s in suites]
    return suites


def closed_form_spec(recipe: Recipe, suites) -> ModelSpec:
    """Each domain's suite decoded from lam*log T + (1-lam)*log R of that domain's teacher and reference."""
    from merge_distill.closed_form import PREFIX
    paths = {}
    for e in recipe.experts:
        for s in suites:
            if s.domain == e.name or s.name == e.eval_suite:
                teacher, reference = (model_folder(recipe.frozen_ref(e, ref)) for ref in (e.teacher, e.reference))
                paths[s.name] = f"{PREFIX}lam={recipe.scale_of(e)},teacher={teacher},reference={reference}"
    first = next(iter(paths.values()))
    return ModelSpec("closed_form", first, suite_paths=paths, only_suites=tuple(paths))


def at(name: str, temperature: float) -> str:
    """A model's row name at an extra decoding temperature: `math@T0.8`, `student@greedy`."""
    return f"{name}@{'greedy' if temperature == 0 else f'T{temperature:g}'}"


def model_specs(recipe: Recipe, students: dict[str, str], suites) -> list[ModelSpec]:
    """Baselines (base, each teacher, teachers at extra temperatures), the closed form, then the student(s), also
    at every temperature the teachers get (matched comparisons: `student@T0.8` against `math@T0.8`)."""
    cfg = recipe.eval
    specs = []
    if cfg.baselines:
        specs.append(ModelSpec("base", recipe.student.path))
        seen = set()
        for i, e in enumerate(recipe.experts):
            if e.teacher and model_label(e.teacher) not in seen:
                seen.add(model_label(e.teacher))
                teacher = model_folder(e.teacher, what=f"experts.{i}.teacher ({e.name})")  # (adapters: merged)
                specs.append(ModelSpec(e.name, teacher))
                # the sharpened teacher only on its own domain: how much of a gain is mere sharpening?
                own = tuple(s.name for s in suites if s.domain == e.name or s.name == e.eval_suite)
                for t in cfg.teacher_temperatures:
                    specs.append(ModelSpec(at(e.name, t), teacher, temperature=t, only_suites=own))
    if cfg.closed_form:
        specs.append(closed_form_spec(recipe, suites))
    for name, path in students.items():
        specs.append(ModelSpec(name, str(path)))
        specs += [ModelSpec(at(name, t), str(path), temperature=t) for t in cfg.teacher_temperatures]
    return specs


def paired_differences(recipe: Recipe, result: EvalResult, suites, students=("student",)) -> list[PairedDifference]:
    """Each student minus each expert (at each of the expert's temperatures) on that expert's own suite, and
    minus base everywhere; then each student at each extra temperature minus each expert at the same one; then,
    with `compare_against`, each other student minus that one on every suite."""
    temps = recipe.eval.teacher_temperatures if recipe.eval else []
    against = recipe.compare_against
    between = [_difference(result, s.name, st, against)
               for st in students if against in students and st != against for s in suites]
    return ([d for st in students for d in _paired(recipe, result, suites, st)]
            + [d for st in students for t in temps for d in _paired(recipe, result, suites, at(st, t), at("", t))]
            + between)


def _difference(result: EvalResult, suite: str, a: str, b: str) -> PairedDifference:
    """`a - b` on `suite`, paired per problem, labelled with a's headline metric: its first whole-suite row
    (avg@k, or pass@1 for pass suites)."""
    row = next(r for r in result.rows if r.subset is None and r.model == a and r.suite == suite)
    return PairedDifference(suite, a, b, row.metric, row.k, *result.paired(a, b, suite))


def _paired(recipe: Recipe, result: EvalResult, suites, student: str, matched: str | None = None
            ) -> list[PairedDifference]:
    """`student` minus each expert on its suite (only the expert at suffix `matched`, e.g. '@T0.8', when given;
    else the expert at every temperature) and minus base everywhere (not when matched)."""
    out = []
    by_domain = {s.domain: s for s in suites}
    names = list(dict.fromkeys(m for m, _ in result.per_problem))  # in evaluation order (a set would vary by run)
    for e in recipe.experts:
        suite = by_domain.get(e.name) or next((s for s in suites if s.name == e.eval_suite), None)
        others = [e.name + matched] if matched else [e.name] + [n for n in names if n.startswith(f"{e.name}@")]
        for other in others:
            if suite and (other, suite.name) in result.per_problem and (student, suite.name) in result.per_problem:
                out.append(_difference(result, suite.name, student, other))
    if "base" in names and not matched:
        out += [_difference(result, s.name, student, "base") for s in suites]
    return out


def evaluate_recipe(recipe: Recipe, students: dict[str, str], out_dir: Path, *, progress=None
                    ) -> tuple[EvalResult, list]:
    """Every model of the report on the recipe's suites, with the run's rollout engine; under torchrun every rank
    calls it and evaluates its share (`evaluation.runner.evaluate`)."""
    cfg = recipe.eval
    suites = eval_suites(recipe)
    b, engine_options = recipe.backend, None
    if b.rollout == "vllm":  # the training engine's settings (`engines.make_sampler`)
        engine_options = dict(dtype=recipe.dtype, gpu_memory_utilization=b.gpu_memory_utilization,
                              max_num_seqs=b.max_num_seqs, max_num_batched_tokens=b.max_num_batched_tokens,
                              batch_invariant=b.batch_invariant)
    result = evaluate(model_specs(recipe, students, suites), suites, samples=cfg.samples, temperature=cfg.temperature,
                      max_new_tokens=cfg.max_new_tokens or recipe.rollout.max_new_tokens, seed=cfg.seed,
                      out_dir=out_dir, progress=progress, device=recipe.device, isolation=recipe.isolation,
                      sampler=recipe.backend.rollout, engine_options=engine_options)
    return result, paired_differences(recipe, result, suites, tuple(students))


def graders_to_run(recipe: Recipe, *, evaluate_after: bool) -> set[str]:
    """The graders a run of `recipe` uses: building what its paths name (`extensions.graders_to_build`: the zoo's
    GRPO experts), its own training when graders reward it (GRPO), and its periodic and final evaluation. Works
    before the zoo is built."""
    from merge_distill import extensions
    from merge_distill.evaluation.suites import suite_grader
    from merge_distill.methods import method_of, trains

    names = extensions.graders_to_build(recipe)
    if trains(recipe) and method_of(recipe).graded:
        names |= {e.grader_name for e in recipe.experts}
    if recipe.eval and (evaluate_after or recipe.schedule.eval_every):
        suites = recipe.eval.suites or [e.eval_suite for e in recipe.experts if e.eval_suite]
        names |= {g for g in map(suite_grader, suites) if g}
    return names


def start(device: str, gradings: list[tuple[set[str], str]]):
    """The one place a command starts, before it builds, trains or evaluates anything: for each (graders, isolation)
    it will grade with, where those graders run code, that the isolation works here (``IsolationUnavailable``, one
    line, where bubblewrap is asked for and missing); then this process joins the launcher's process group (every
    rank under torchrun; alone, nothing). Returns the `distributed.World`."""
    from merge_distill import distributed
    from merge_distill.graders import sandbox_level

    for graders, isolation in gradings:
        sandbox_level(graders, isolation)
    return distributed.init(device)


def start_recipes(recipes: list[Recipe], *, evaluate_after: bool):
    """`start` for a recipe and its `compare:` variants (or a sweep's): every grader each of them will run
    (`graders_to_run`), under its own `isolation`."""
    return start(recipes[0].device, [(graders_to_run(r, evaluate_after=evaluate_after), r.isolation) for r in recipes])


def run_recipe(recipe: Recipe, variants: dict[str, Recipe], *, resume: bool, evaluate_after: bool, progress,
               command: list[str] | None = None):
    """Train every variant (`validate.variant_recipes`), evaluate them side by side, write the report, after
    `start_recipes`. Recipes have plain paths, what they name built at the edge (`extensions.build`). Each trained
    model gets its card (`evaluation.card`: `final/README.md`) when it is trained, rewritten after the report;
    `command`: the command line it records. Returns (students, (result, paired, paths) or None, timings)."""
    import time

    from merge_distill import distributed
    from merge_distill.checkpoint import holding
    from merge_distill.build import train_recipe
    from merge_distill.evaluation.card import record_run, write_card

    t0 = time.perf_counter()
    world = distributed.world()  # under torchrun every rank trains and evaluates; rank 0 writes
    out = Path(recipe.output_dir)
    students, evaluated, trackers = {}, None, []
    # the whole run, training and evaluation: one live run per output_dir; each variant's trackers stay open
    # until the report (which compares them all) is logged to each
    with holding(out), contextlib.ExitStack() as stack:
        for name, r in variants.items():
            on_eval = periodic_eval(r, Path(r.output_dir)) if r.eval and r.schedule.eval_every else None
            trackers.append(stack.enter_context(open_trackers(r)))
            students[name] = str(train_recipe(r, resume=resume, progress=progress, on_eval=on_eval,
                                              trackers=trackers[-1]))
            if world.main:
                curves = Path(r.output_dir) / "training_curves.png"
                training_curves_png(Path(r.output_dir) / "metrics.jsonl", curves, r)
                trackers[-1].log_image("training_curves", curves)
                record_run(r, name, command, None)  # once trained: a run refused here keeps its old files
                write_card(r.output_dir)
        timings = {"train_s": time.perf_counter() - t0}
        if evaluate_after and recipe.eval:
            result, paired = evaluate_recipe(recipe, students, out / "eval", progress=progress if world.main else None)
            if world.main:
                paths = write_report(recipe, result, paired, out)
                evaluated = (result, paired, paths)
                for name, r in variants.items():  # a report.json of an earlier run is named only now
                    record_run(r, name, command, paths["json"])
                    write_card(r.output_dir)
                for t in trackers:
                    log_report(t, json.loads(paths["json"].read_text()), {"report": paths["png"]})
            timings["eval_s"] = time.perf_counter() - t0 - timings["train_s"]
        stack.close()
        distributed.shutdown()
    return students, evaluated, timings


def training_curves_png(metrics_path: Path, out_path: Path, recipe: Recipe) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not metrics_path.exists():  # weight-space methods train nothing
        return
    rows = [json.loads(l) for l in metrics_path.read_text().splitlines() if l.strip()]
    if not rows:
        return
    from merge_distill.methods import method_of

    keys = list(method_of(recipe).curves)
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.2))
    for ax, key in zip(axes, keys):
        for e in recipe.experts:
            pts = [(r["step"], r[f"{e.name}/{key}"]) for r in rows if f"{e.name}/{key}" in r]
            if pts:
                ax.plot(*zip(*pts), label=e.name)
        if not ax.lines and any(key in r for r in rows):  # a whole-batch metric (e.g. the SFT loss)
            ax.plot(*zip(*[(r["step"], r[key]) for r in rows if key in r]), label="all")
        ax.set_title(key.replace("_", " "))
        ax.set_xlabel("step")
        if ax.lines:
            ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = out_path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(out_path)


def write_report(recipe: Recipe, result: EvalResult, paired: list[PairedDifference], out_dir: Path) -> dict:
    extra = {"paired_differences": [p.to_dict() for p in paired], "sandbox_isolation": result.isolation,
             "reward_scales": {e.name: recipe.scale_of(e) for e in recipe.experts},
             "eval_samples_per_second": round(result.samples_per_second, 1),
             "eval_sampled_by_rank": result.sampled_by_rank, "provenance": provenance()}
    return write_results(result.rows, out_dir, extra, stem="report")



def periodic_eval(recipe: Recipe, out_dir: Path):
    """A callback for `train`: the live student (through the run's own `Sampler`) on each suite, one sample
    per problem. Under torchrun every rank calls it (inside the trainer's decoding section) and samples its share
    of the problems; every rank returns the same metrics."""
    from merge_distill.graders import sandbox_level
    from merge_distill.models import load_tokenizer

    suites, tokenizer, cfg = eval_suites(recipe), load_tokenizer(recipe.student.path), recipe.eval
    sandbox_level([s.grader for s in suites], recipe.isolation)  # before training starts, not at its first eval

    max_new_tokens = cfg.max_new_tokens or recipe.rollout.max_new_tokens

    def on_eval(sampler, step: int) -> dict:
        metrics = {}
        for suite in suites:
            graded = generate_and_grade(ModelSpec("student", recipe.student.path), suite, samples=1,
                                        temperature=cfg.temperature, max_new_tokens=max_new_tokens,
                                        seed=cfg.seed, out_dir=out_dir / "evals" / f"step-{step}",
                                        sampler=sampler, tokenizer=tokenizer, isolation=recipe.isolation)
            metrics[f"eval/{suite.name}"] = score_rows("student", suite, graded.rows, 1, cfg.temperature)[0][0].score
        return metrics

    # the longest request's prompt + response tokens: sizes the vLLM sampler (build.build_run)
    on_eval.max_tokens = longest_request(tokenizer, suites, max_new_tokens) if recipe.backend.rollout == "vllm" else 0
    return on_eval


def headline_rows(rows):
    """The rows a terminal shows: whole suites, at each suite's first (headline) k; subsets stay in the files."""
    seen, out = set(), []
    for r in rows:
        if r.subset is None and (r.model, r.suite) not in seen:
            seen.add((r.model, r.suite))
            out.append(r)
    return out
