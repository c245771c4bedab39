"""The `merge-distill` command line: run, validate, plan, eval, card, grade, sweep, and the commands extensions
mount (`merge_distill.extensions`: the toy world's `zoo build`)."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)

from merge_distill import extensions
from merge_distill.errors import UserError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Merge domain-expert LMs into one student by G-OPD / ExOPD on-policy distillation.")
extensions.mount_commands(app)
# Tables are wide (one column per model): when output goes to a file or CI log, don't wrap at 80 columns.
console = Console() if sys.stdout.isatty() else Console(width=160)
err_console = Console(stderr=True) if sys.stderr.isatty() else Console(stderr=True, width=400)


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def progress_bar() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=console, transient=False)


def _guard(fn):
    """Run a command body; a UserError becomes one red line on stderr and exit code 1."""
    try:
        _quiet_libraries()
        return fn()
    except UserError as e:
        err_console.print(f"[red]error:[/red] {escape(str(e))}", highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        err_console.print("[yellow]interrupted[/yellow]: finished checkpoints and results are kept; rerun with --resume")
        raise typer.Exit(130) from None


Sets = Annotated[Optional[list[str]], typer.Option("--set",
                                                   help="override a recipe key, e.g. --set schedule.steps=10")]
Isolation = Annotated[Optional[str], typer.Option(
    help="how model-written code is isolated: bubblewrap (the default; nothing runs where it is missing) or "
         "rlimits (your opt-out: no namespaces, programs can read your files and reach the network)")]
RecipeIsolation = Annotated[Optional[str], typer.Option(
    help="how model-written code is isolated, overriding the recipe's `isolation:`: bubblewrap (the default; "
         "nothing runs where it is missing) or rlimits (your opt-out: no namespaces)")]


def _isolation(value: str | None) -> str | None:
    """A --isolation value, checked (one line when it is neither level)."""
    from merge_distill.sandbox import LEVELS

    if value is not None and value not in LEVELS:
        raise UserError(f"--isolation {value!r}: expected {' or '.join(LEVELS)}")
    return value


def _with_isolation(overrides: list[str] | None, isolation: str | None) -> list[str]:
    """--isolation on a recipe command is the recipe key `isolation` (so `compare:` variants get it too)."""
    return [*(overrides or []), *([f"isolation={isolation}"] if _isolation(isolation) else [])]


def _resolved(recipe_path: Path, overrides: list[str], progress, evaluate: bool):
    """The edge: the recipe and its `compare:` variants, with what their paths name built (rank 0 builds the zoo
    members they name, `extensions.build`; the other ranks then find them). First, where any of them will grade by
    running code, its isolation is checked (one line, before anything is built or trained)."""
    from merge_distill import distributed
    from merge_distill.run import start_recipes
    from merge_distill.validate import load_recipe, variant_recipes

    recipe = load_recipe(recipe_path, overrides)
    variants = variant_recipes(recipe_path, overrides, recipe)
    start_recipes([recipe, *variants.values()], evaluate_after=evaluate)
    with distributed.main_first():
        extensions.build(recipe, progress=progress, log=console.print)
        _convert_gguf_files(recipe)
    return recipe, variants


def _convert_gguf_files(recipe) -> None:
    """Convert the recipe's .gguf models once, before any rank loads them (`models.gguf_folder`): under torchrun
    rank 0 converts while the others wait, instead of every rank dequantising the same file at once."""
    from merge_distill.models import gguf_folder
    from merge_distill.recipe import AdapterModel

    refs = [e.teacher.base if isinstance(e.teacher, AdapterModel) else e.teacher for e in recipe.experts]
    paths = [recipe.student.path, *refs, *(e.reference for e in recipe.experts)]
    for path in dict.fromkeys(paths):
        if str(path).endswith(".gguf") and Path(path).is_file():
            gguf_folder(path, log=console.print)


@app.command()
def run(recipe: Annotated[Path, typer.Argument(help="YAML recipe")], overrides: Sets = None,
        resume: Annotated[bool, typer.Option(help="continue from the last checkpoint in output_dir")] = False,
        evaluate: Annotated[bool, typer.Option("--eval/--no-eval", help="evaluate after training")] = True,
        isolation: RecipeIsolation = None):
    """Distill the recipe's experts into its student, then evaluate and write a report."""

    def body():
        from merge_distill import distributed
        from merge_distill import run as pipeline
        from merge_distill.evaluation.report import rich_table
        from merge_distill.sandbox import isolation_note

        if not distributed.launched().main:  # under torchrun, rank 0 alone shows progress and results
            console.quiet = True
        with progress_bar() as progress:
            t0 = time.perf_counter()
            resolved, variants = _resolved(recipe, _with_isolation(overrides, isolation), progress, evaluate)
            zoo_s = time.perf_counter() - t0
            command = ["merge-distill", "run", str(recipe), *[a for s in overrides or [] for a in ("--set", s)],
                       *["--resume"] * resume, *["--no-eval"] * (not evaluate),
                       *(["--isolation", isolation] if isolation else [])]
            students, evaluated, t = pipeline.run_recipe(resolved, variants, resume=resume, evaluate_after=evaluate,
                                                         progress=progress, command=command)
            t["zoo_s"] = zoo_s
        console.print(f"zoo {t['zoo_s']:.0f} s, training {t['train_s']:.0f} s; "
                      + ", ".join(f"{k}: {v}" for k, v in students.items()))
        if evaluated:
            result, paired, paths = evaluated
            console.print(rich_table(pipeline.headline_rows(result.rows), title=f"{recipe.name}: students vs teachers"))
            if result.isolation:
                console.print(isolation_note(result.isolation), highlight=False)
            for p in paired:
                console.print("  " + p.format())
            console.print(f"report: {paths['md']}  {paths['json']}  ({sum(t.values()):.0f} s in all: "
                          f"evaluation {t['eval_s']:.0f} s)")

    _guard(body)


@app.command()
def validate(recipe: Annotated[Path, typer.Argument(help="YAML recipe")], overrides: Sets = None):
    """Check a recipe, every path in it, and model compatibility, without training."""

    def body():
        from merge_distill.validate import MissingInputs, load_recipe, static_checks, validate_recipe

        loaded = load_recipe(recipe, overrides)
        try:
            pending = extensions.unbuilt(loaded)  # e.g. a zoo recipe whose zoo is not built: what needs no file
            lines = [pending, *static_checks(loaded)] if pending else validate_recipe(loaded)
        except MissingInputs as e:  # what could be checked, then (by _guard) every missing input, one a line
            for line in e.checked:
                console.print(escape(line), highlight=False)
            raise
        for line in lines:
            console.print(escape(line), highlight=False)
        console.print(f"[green]ok[/green]: {recipe}")

    _guard(body)


@app.command()
def plan(recipe: Annotated[Path, typer.Argument(help="YAML recipe")], overrides: Sets = None,
         gpus: Annotated[int, typer.Option(min=1, help="devices (ranks) the run uses")] = 1,
         gpu_memory: Annotated[Optional[float], typer.Option(
             help="GiB per device (default: the GPU's, or 80 without one; on cpu, this machine's over --gpus)")] = None,
         device: Annotated[Optional[str], typer.Option(help="cuda or cpu (default: the recipe's)")] = None,
         assume_config: Annotated[Optional[str], typer.Option(
             help="shape of every model whose folder is missing: a shipped config (qwen3-0.6b, qwen3-1.7b, "
                  "qwen3-4b, qwen3-8b in merge_distill/configs)")] = None,
         prompt_tokens: Annotated[int, typer.Option(min=1, help="longest prompt in tokens (configs do not say)")] = 512,
         as_json: Annotated[bool, typer.Option("--json", help="print one JSON object")] = False):
    """Say before launch whether a recipe fits: memory per device from the models' config.json alone."""

    def body():
        from rich.table import Table

        from merge_distill.plan import GiB, device_memory
        from merge_distill.plan import plan as make_plan
        from merge_distill.validate import load_recipe

        loaded = load_recipe(recipe, overrides)
        pending = extensions.unbuilt(loaded)
        if pending and not assume_config:
            raise UserError(pending)
        kind = (device or loaded.device).split(":")[0]
        # CPU ranks share the machine: each gets its share
        budget = int(gpu_memory * GiB) if gpu_memory else device_memory(kind) // (gpus if kind == "cpu" else 1)
        p = make_plan(loaded, gpus=gpus, gpu_memory_bytes=budget, device=kind,
                      assume_config=assume_config, prompt_tokens=prompt_tokens)
        if as_json:
            typer.echo(json.dumps(p.to_json()))
            return
        sizes, held = p.phase_bytes(), {}
        for phase, names in p.phases.items():
            for name in names:
                held.setdefault(name, []).append(phase)
        table = Table(title=f"{recipe.name}: memory per device ({p.gpus} x {kind}, {p.parallel}, "
                            f"prompts to {prompt_tokens} tokens)")
        for col, justify in (("component", "left"), ("GiB", "right"), ("held during", "left")):
            table.add_column(col, justify=justify)
        for name, nbytes in p.components.items():
            phases = held.get(name, [])
            during = "all" if len(phases) == len(p.phases) else ", ".join(phases)
            table.add_row(escape(name), f"{nbytes / GiB:.2f}", during)
        console.print(table)
        console.print("phases (GiB): " + ", ".join(f"{k} {v / GiB:.1f}" + (" (peak)" if k == p.peak_phase else "")
                                                     for k, v in sizes.items()), highlight=False)
        for note in p.notes:
            console.print(escape(note), highlight=False, soft_wrap=True)
        if not p.fits:
            console.print("would fit with: " + ("; ".join(p.suggestions) if p.suggestions else "none of the settings "
                          "the planner tries"), highlight=False, soft_wrap=True)
        console.print(p.verdict(), highlight=False)

    _guard(body)


@app.command("eval")
def eval_cmd(
    model: Annotated[list[str], typer.Option("--model", help="NAME=PATH (a model folder, or closed-form:lam=1.25,teacher=PATH,reference=PATH); repeat")],
    suite: Annotated[list[str], typer.Option("--suite", help="built-in (zoo-math, zoo-code, humaneval, champ, gsm8k, aime) or a suite YAML/JSONL")],
    samples: Annotated[int, typer.Option(help="samples per problem (k)")] = 1,
    temperature: float = 1.0,
    max_new_tokens: int = 256,
    max_problems: Annotated[Optional[int], typer.Option(help="evaluate only the first N problems of each suite")] = None,
    seed: int = 1234,
    zoo: Annotated[Optional[str], typer.Option(help="zoo preset for zoo-* suites, e.g. default or smoke")] = None,
    zoo_seed: int = 0,
    zoo_dir: Annotated[Optional[Path], typer.Option(help="zoo folder for zoo-* suites (overrides --zoo)")] = None,
    out: Annotated[Path, typer.Option(help="output folder")] = Path("eval_results"),
    device: Annotated[str, typer.Option(help="torch device for the models, e.g. cpu or cuda")] = "cpu",
    isolation: Isolation = None,
    sampler: Annotated[str, typer.Option(help="transformers (padded batches) or paged (continuous batching); "
                                              "the same samples from the same seeds")] = "transformers",
):
    """Score models side by side: a table, results.json/.md/.png and per-sample generations (resumable). Under
    torchrun each rank samples and grades its share of the problems on its own device; rank 0 writes the files."""

    def body():
        from dataclasses import replace

        from merge_distill import closed_form, distributed
        from merge_distill.evaluation.report import (
            pairwise_differences,
            rich_table,
            write_results,
        )
        from merge_distill.evaluation.runner import ModelSpec, evaluate
        from merge_distill.evaluation.suites import load_suite
        from merge_distill.models import check_model_dir
        from merge_distill.provenance import provenance
        from merge_distill.run import start
        from merge_distill.sandbox import isolation_note

        level = _isolation(isolation) or "bubblewrap"

        specs = []
        for m in model:
            if "=" not in m:
                raise UserError(f"--model '{m}': expected NAME=PATH")
            name, path = m.split("=", 1)
            if not closed_form.is_spec(path):
                check_model_dir(path, what=f"--model {name}")
            specs.append(ModelSpec(name, path))
        if zoo or zoo_dir:  # the zoo of the zoo-* suites, named as a recipe's `zoo:` section names it
            extensions.parse_section("zoo", {"preset": zoo or "default", "seed": zoo_seed,
                                             "dir": str(zoo_dir) if zoo_dir else None}, source="--zoo")
        suites = [load_suite(s) for s in suite]
        if max_problems:
            suites = [replace(s, records=s.records[:max_problems]) for s in suites]
        world = start(device, [({s.grader for s in suites}, level)])
        console.quiet = console.quiet or not world.main
        with progress_bar() as progress:
            result = evaluate(specs, suites, samples=samples, temperature=temperature, max_new_tokens=max_new_tokens,
                              seed=seed, out_dir=out, progress=progress, device=device, isolation=level,
                              sampler=sampler)
        distributed.shutdown()
        if not world.main:
            return
        paired = pairwise_differences(result.rows, result.per_problem, [m.name for m in specs],
                                      [s.name for s in suites])
        paths = write_results(result.rows, out, {"paired_differences": [p.to_dict() for p in paired],
                                                 "sandbox_isolation": result.isolation,
                                                 "samples_per_second": round(result.samples_per_second, 1),
                                                 "sampled_by_rank": result.sampled_by_rank,
                                                 "provenance": provenance()})
        console.print(rich_table(result.rows))
        if result.isolation:
            console.print(isolation_note(result.isolation), highlight=False)
        for p in paired:
            console.print("  " + p.format())
        console.print(f"{result.samples_per_second:.1f} samples/s; wrote {paths['md']}, {paths['json']}, {paths['png']}")

    _guard(body)


@app.command()
def card(run_dir: Annotated[Path, typer.Argument(help="a `merge-distill run` output_dir")]):
    """Rewrite a finished run's model card, final/README.md (each compare: variant's), from the run's files:
    resolved_recipe.yaml, run.json, metrics.jsonl and report.json."""

    def body():
        from merge_distill.evaluation.card import run_dirs, write_card

        for folder in run_dirs(run_dir):
            console.print(f"wrote {write_card(folder)}", highlight=False)

    _guard(body)


@app.command()
def grade(file: Annotated[Path, typer.Argument(help="JSONL: task records with a completion")],
          out: Annotated[Path, typer.Option(help="verdicts JSONL (resumed if it exists)")] = Path("verdicts.jsonl"),
          timeout: Annotated[Optional[float], typer.Option(help="seconds per program / math item")] = None,
          isolation: Isolation = None):
    """Grade completions produced elsewhere (HumanEval-shape code, math with an answer, or a record whose
    'domain' names any registered grader)."""

    def body():
        from merge_distill.graders.grade_file import grade_file, summary_table
        from merge_distill.sandbox import isolation_note

        summary = grade_file(file, out, timeout_s=timeout, isolation=_isolation(isolation) or "bubblewrap")
        console.print(summary_table(summary))
        if summary["isolation"]:
            console.print(isolation_note(summary["isolation"]), highlight=False)
        console.print(f"verdicts: {out}")

    _guard(body)


@app.command()
def sweep(recipe: Annotated[Path, typer.Argument(help="YAML recipe")],
          overrides: Annotated[list[str], typer.Option("--set", help="KEY=v1,v2,... is swept; KEY=v is fixed")],
          isolation: RecipeIsolation = None):
    """Run a recipe over a grid (e.g. --set reward_scale=0,0.5,1,1.25,1.5) and plot score and length."""

    def body():
        from merge_distill.sandbox import isolation_note
        from merge_distill.sweep import sweep as run_sweep

        with progress_bar() as progress:
            root = run_sweep(recipe, _with_isolation(overrides, isolation), progress=progress,
                             log=console.print)
        data = json.loads((root / "sweep.json").read_text())
        points = data["points"]
        from rich.table import Table

        table = Table(title="sweep")
        for col in ("variant", "suite", "score", "response length"):
            table.add_column(col)
        for p in points:
            table.add_row(p["variant"], f"{p['suite']} {p['metric']}@{p['k']}",
                          f"{100 * p['score']:.1f} ± {100 * p['stderr']:.1f}", f"{p['response_length']:.1f}")
        console.print(table)
        if data.get("sandbox_isolation"):
            console.print(isolation_note(data["sandbox_isolation"]), highlight=False)
        console.print(f"wrote {root / 'sweep.json'} and {root / 'sweep.png'}")

    _guard(body)


def main() -> None:  # pragma: no cover
    app(sys.argv[1:])
