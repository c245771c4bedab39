"""The model card of a run's trained model: `<output_dir>/final/README.md` in the Hugging Face Hub's format (YAML
metadata between `---` lines, then markdown), rendered from the run's own files alone, so `merge-distill card
RUN_DIR` rewrites the same file:

    resolved_recipe.yaml  the resolved recipe (every key, the paths the run used), written when training ends
    run.json              the model's name in the report, the command, where its report.json is, the provenance
    metrics.jsonl         one line per step (steps and response tokens trained; a weight-space merge has none)
    report.json           the evaluation (`run.write_report`), where the run evaluated

The metadata: `base_model` (the student's hub id, or its folder's name), `tags` (merge-distill, distillation, the
method: g-opd, or exopd where an expert's lam > 1, and the expert names), `library_name`, `datasets` (the hub
datasets the prompts came from) and, where the run evaluated, a `model-index` with the model's scores exactly as
report.json holds them. The body: each expert's method, lam, teacher and reference; what was trained; the
evaluation table and paired differences as report.md prints them; the command and the recipe that reproduce it;
the software and the processor (`merge_distill.provenance`).
"""

from __future__ import annotations

import json
import os
import re
import shlex
from pathlib import Path

import yaml

from merge_distill.errors import UserError
from merge_distill.evaluation.report import PairedDifference, caption, markdown_table
from merge_distill.io import atomic_write_text, read_jsonl
from merge_distill.merging import COMBINERS
from merge_distill.provenance import provenance
from merge_distill.recipe import STUDENT, TEACHER_BASE, DatasetSpec, Recipe

RECIPE_FILE, RUN_FILE, CARD = "resolved_recipe.yaml", "run.json", "README.md"
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def record_run(recipe: Recipe, model: str, command: list[str] | None, report: Path | None) -> None:
    """Write `resolved_recipe.yaml` (not `recipe.yaml`: a user's recipe may lie in its own output folder) and
    `run.json` (`model`: its name in the report; the `command` that ran it; `report`: the report.json its
    evaluation goes to, relative to the output folder, or None; the provenance) into the recipe's output folder:
    what its card is rendered from."""
    out = Path(recipe.output_dir)
    atomic_write_text(out / RECIPE_FILE, yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False))
    run = {"model": model, "command": command, "report": os.path.relpath(report, out) if report else None,
           "provenance": provenance()}
    atomic_write_text(out / RUN_FILE, json.dumps(run, indent=2) + "\n")


def write_card(run_dir: str | os.PathLike) -> Path:
    """Render the card of the run in `run_dir` from its files and write it atomically to `final/README.md`; its
    path. A folder that is no finished run (no run.json or no final/) is a one-line UserError."""
    run_dir = Path(run_dir)
    if not (run_dir / RUN_FILE).is_file():
        raise UserError(f"{run_dir}: no {RUN_FILE}; not the output_dir of a finished merge-distill run")
    if not (run_dir / "final").is_dir():
        raise UserError(f"{run_dir}: no final/ model folder; the run has not finished")
    run = json.loads((run_dir / RUN_FILE).read_text())
    metrics = read_jsonl(run_dir / "metrics.jsonl") if (run_dir / "metrics.jsonl").is_file() else []
    report_path = run_dir / run["report"] if run.get("report") else None
    report = json.loads(report_path.read_text()) if report_path and report_path.is_file() else None
    path = run_dir / "final" / CARD
    atomic_write_text(path, render_card((run_dir / RECIPE_FILE).read_text(), run, metrics, report))
    return path


def run_dirs(folder: str | os.PathLike) -> list[Path]:
    """The runs under a `merge-distill run` output folder: itself, or each `compare:` variant's folder."""
    folder = Path(folder)
    if (folder / RUN_FILE).is_file():
        return [folder]
    found = sorted(p.parent for p in (folder / "variants").glob(f"*/{RUN_FILE}"))
    if not found:
        raise UserError(f"{folder}: no {RUN_FILE} here or in variants/*/; not the output_dir of a finished "
                        "merge-distill run")
    return found


# ------------------------------------------------------------------------------------------------- rendering


def render_card(recipe_yaml: str, run: dict, metrics: list[dict], report: dict | None) -> str:
    """The card's text from the run's files (the text of resolved_recipe.yaml, run.json, metrics.jsonl's rows, report.json)."""
    recipe = Recipe.model_validate(yaml.safe_load(recipe_yaml))
    model = run["model"]
    meta = card_metadata(recipe, model, report)
    parts = [
        "---", yaml.safe_dump(meta, sort_keys=False, allow_unicode=True).rstrip(), "---", "",
        f"# {Path(recipe.output_dir).name}", "",
        f"`{recipe.student.path}` made into one model for {len(recipe.experts)} domains by merge-distill, method "
        f"`{recipe.method.name}`; this folder is its `final/` model." + lora_line(recipe), "",
        "## Experts", "", *experts_table(recipe), "",
        "## Training", "", *training_lines(recipe, metrics), "",
    ]
    if report is not None:
        parts += ["## Evaluation", "", markdown_table(report["rows"]), "", f"_{caption(report['rows'])}_", ""]
        paired = [PairedDifference(**d) for d in report.get("paired_differences", []) if involves(d, model)]
        if paired:
            parts += ["### Paired differences", "", *[f"- {d.format()}" for d in paired], ""]
    else:
        parts += ["## Evaluation", "", "No report: the run had no `eval:` section, ran with `--no-eval`, or is a "
                  "point of a sweep (its scores are in the sweep's `sweep.json`).", ""]
    parts += ["## Reproduce", ""]
    if run.get("command"):
        parts += ["This run:", "", "```bash", shlex.join(run["command"]), "```", ""]
    parts += ["The resolved recipe (every key; the paths are this run's):", "", "```yaml", recipe_yaml.rstrip(), "```",
              "", "## Software and machine", "", *provenance_table(run["provenance"]), "",
              "The same recipe and seed give other weights, and so other scores, on a processor with another vector "
              "instruction set or at another thread count: compare runs on different machines through the spread "
              "over seeds, not digit for digit.", ""]
    return "\n".join(parts)


def card_metadata(recipe: Recipe, model: str, report: dict | None) -> dict:
    """The card's YAML metadata (the Hub's keys)."""
    meta = {"base_model": base_model(recipe.student.path), "tags": tags(recipe), "library_name": "transformers",
            "pipeline_tag": "text-generation"}
    datasets = list(dict.fromkeys(e.prompts.dataset for e in recipe.experts if isinstance(e.prompts, DatasetSpec)))
    if datasets:
        meta["datasets"] = datasets
    if report is not None:
        meta["model-index"] = [{"name": Path(recipe.output_dir).name, "results": model_results(report["rows"], model)}]
    return meta


def base_model(student: str) -> str:
    """The student's hub id where it is one (`org/name` and no such local path), else its folder's (file's) name."""
    return student if HUB_ID.fullmatch(student) and not Path(student).exists() else Path(student).name


def tags(recipe: Recipe) -> list[str]:
    """merge-distill, distillation, the method (gopd: g-opd, and exopd where some expert's lam > 1), the experts."""
    if recipe.method.name == "gopd":
        methods = ["g-opd"] + ["exopd"] * any(recipe.scale_of(e) > 1 for e in recipe.experts)
    else:
        methods = [recipe.method.name]
    return ["merge-distill", "distillation", *methods, *["lora"] * (recipe.student.lora is not None),
            *(e.name for e in recipe.experts)]


def lora_line(recipe: Recipe) -> str:
    """For a LoRA student: what was trained and where the adapter is."""
    lora = recipe.student.lora
    if lora is None:
        return ""
    return (f" Only a LoRA adapter was trained (r {lora.r}, alpha {lora.lora_alpha:g}, on {lora.target_modules}); "
            "this folder holds it merged into the student's base, and the adapter alone (peft) in `adapter/`.")


def method_label(recipe: Recipe, lam: float) -> str:
    """An expert's method: for gopd, ExOPD (lam > 1, reward extrapolation), OPD (lam = 1) or G-OPD (lam < 1)."""
    if recipe.method.name != "gopd":
        return recipe.method.name
    return "ExOPD" if lam > 1 else "OPD" if lam == 1 else "G-OPD"


def experts_table(recipe: Recipe) -> list[str]:
    lines = ["| expert | method | reward scale (lam) | teacher | reference | prompts |", "|---|---|---:|---|---|---|"]
    for e in recipe.experts:
        lam = recipe.scale_of(e)
        reference = {STUDENT: "the student's initial weights",
                     TEACHER_BASE: "the teacher's base (adapters off)"}.get(e.reference, f"`{e.reference}`")
        prompts = e.prompts.dataset if isinstance(e.prompts, DatasetSpec) else e.prompts
        teacher = f"`{e.teacher}`" if isinstance(e.teacher, str) or e.teacher is None else \
            f"`{e.teacher.base}` + adapter `{e.teacher.adapter}`"
        lines.append(f"| {e.name} | {method_label(recipe, lam)} | {lam:g} | {teacher} | {reference} | `{prompts}` |")
    return lines


def trained(metrics: list[dict], experts: list[str]) -> dict:
    """From metrics.jsonl's rows: `steps` (the last step logged), `skipped` steps, and `tokens` per expert: the
    response tokens of the steps that updated the weights (mean response length x sequences)."""
    kept = [m for m in metrics if not m.get("skipped")]
    tokens = {e: round(sum(m.get(f"{e}/response_length", 0) * m.get(f"{e}/n_sequences", 0) for m in kept))
              for e in experts}
    return {"steps": max((m["step"] for m in metrics), default=0), "skipped": len(metrics) - len(kept),
            "tokens": tokens}


def training_lines(recipe: Recipe, metrics: list[dict]) -> list[str]:
    if not metrics:
        return [f"No training: a weight-space merge of the teachers (`{recipe.method.name}`)."
                if recipe.method.name in COMBINERS else "No steps logged (metrics.jsonl is missing)."]
    done = trained(metrics, [e.name for e in recipe.experts])
    r, o = recipe.rollout, recipe.optim
    per_expert = ", ".join(f"{e} {n:,}" for e, n in done["tokens"].items())
    return [f"- steps: {done['steps']} of {recipe.schedule.steps} ({done['skipped']} skipped)",
            f"- response tokens trained: {sum(done['tokens'].values()):,} ({per_expert})",
            f"- each step: {r.prompts_per_step} prompts x {r.rollouts_per_prompt} rollouts at temperature "
            f"{r.temperature:g}, up to {r.max_new_tokens} new tokens; AdamW lr {o.lr:g} ({o.lr_schedule}), seed "
            f"{recipe.seed}"]


def model_results(rows: list[dict], model: str) -> list[dict]:
    """The model-index results of `model`: each of its rows (suite, subset as the dataset's config) with its score
    exactly as report.json holds it."""
    out = []
    for r in rows:
        if r["model"] == model:
            dataset = {"name": r["suite"], "type": r["suite"], **({"config": r["subset"]} if r["subset"] else {})}
            label = f"{r['metric']}@{r['k']}"
            out.append({"task": {"type": "text-generation"}, "dataset": dataset,
                        "metrics": [{"type": label, "name": label, "value": r["score"]}]})
    return out


def involves(paired: dict, model: str) -> bool:
    """A paired difference with `model` (at any temperature, `model@T0.8`) on either side."""
    return any(side == model or side.startswith(f"{model}@") for side in (paired["a"], paired["b"]))


def provenance_table(record: dict) -> list[str]:
    return ["| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in record.items())]
