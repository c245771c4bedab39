"""`merge-distill validate`: every check a run makes before it spends compute, and nothing more.

When models or prompt files the recipe names are not there yet (a paper-scale recipe validated before the
weights are fetched), it still checks everything that needs no weights (schema, graders, reward scales,
prompt files that exist, eval suites) and then reports every missing path at once, one line each.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from merge_distill.errors import UserError
from merge_distill.io import RECORD_SUFFIXES
from merge_distill.recipe import STUDENT, Recipe


class MissingInputs(UserError):
    """Paths the recipe names that are missing (or unusable), all of them; `checked` = what still passed."""

    def __init__(self, problems: list[str], checked: list[str]):
        self.problems, self.checked = problems, checked
        if len(problems) == 1:  # one problem, one line (as every other UserError)
            super().__init__(problems[0])
            return
        head = (f"{len(problems)} inputs of the recipe missing or unusable; fill them in (see the comments in "
                "the recipe) and validate again:")
        super().__init__("\n".join([head, *("  " + p for p in problems)]))


def _input_fields(recipe: Recipe) -> list[tuple[str, str, bool]]:
    """(field, path, is_model) of every model a run loads (as `train.check_models` decides) and every
    prompt file, in recipe order."""
    from merge_distill.methods import frozen_models

    fields = [("student", recipe.student, True)]
    for i, e in enumerate(recipe.experts):
        for role, path in frozen_models(recipe, e).items():
            if path != STUDENT:
                fields.append((f"experts.{i}.{role} ({e.name})", path, True))
        if isinstance(e.prompts, str):  # a `datasets` spec is checked when it loads
            fields.append((f"experts.{i}.prompts ({e.name})", e.prompts, False))
    return fields


def missing_paths(recipe: Recipe) -> list[str]:
    """One line per model folder or prompt file that does not exist (`zoo:` paths resolved when the recipe loaded)."""
    from merge_distill.models import is_model_dir

    problems = []
    for field, path, is_model in _input_fields(recipe):
        if not Path(path).exists():
            problems.append(f"{field}: {path} not found")
        elif is_model and not is_model_dir(path):
            problems.append(f"{field}: {path} is not a model folder (no config.json) or a .gguf file")
        elif not is_model and not Path(path).is_file():
            problems.append(f"{field}: {path} is not a file (expected {', '.join(RECORD_SUFFIXES)})")
    return problems


def _partial_checks(recipe: Recipe, problems: list[str]) -> list[str]:
    """What can be checked while some inputs are missing; further problems are appended to `problems`."""
    from merge_distill.data import load_records

    lines = []
    for i, e in enumerate(recipe.experts):
        if isinstance(e.prompts, str) and Path(e.prompts).is_file():
            try:
                records = load_records(e.prompts, what=f"experts.{i}.prompts ({e.name})")
                lines.append(f"expert {e.name}: {len(records)} prompts in {e.prompts}")
            except UserError as err:
                problems.append(str(err))
    try:
        lines += static_checks(recipe)
    except UserError as err:
        problems.append(str(err))
    if recipe.eval:
        from merge_distill.run import eval_suites

        try:
            lines.append(_suites_line(eval_suites(recipe)))
        except UserError as err:
            problems.append(str(err))
    return lines


def validate_recipe(recipe: Recipe) -> list[str]:
    """Return lines describing what was checked. Raise MissingInputs listing every missing model or prompt
    path (after the checks that need none of them), or UserError at the first other problem. `recipe` has plain
    paths (a zoo recipe's `zoo:` paths are resolved when it loads, `merge_distill.extensions`)."""
    from merge_distill.data import load_records, render_prompt, user_message
    from merge_distill.models import load_tokenizer
    from merge_distill.build import check_models

    problems = missing_paths(recipe)
    if problems:
        raise MissingInputs(problems, _partial_checks(recipe, problems))
    check_models(recipe)
    lines = [f"models: student and {len(recipe.experts)} expert(s) share one vocabulary and chat template"]
    tokenizer = load_tokenizer(recipe.student, what="student")
    for i, e in enumerate(recipe.experts):
        what = f"experts.{i}.prompts ({e.name})"
        records = load_records(e.prompts, what=what)
        template = None if e.prompt_template == "{prompt}" else e.prompt_template
        ids = render_prompt(tokenizer, user_message(records[0], template, what=what), e.system_prompt)
        ref = "student's initial weights" if e.reference == STUDENT else e.reference
        lines.append(f"expert {e.name}: {len(records)} prompts (first is {len(ids)} tokens), "
                     f"reward_scale {recipe.scale_of(e)}, reference {ref}, grader {e.grader_name}")
    lines += static_checks(recipe)
    if recipe.eval:
        from merge_distill.run import eval_suites

        lines.append(_suites_line(eval_suites(recipe)))
    return lines + plan_line(recipe)


def plan_line(recipe: Recipe) -> list[str]:
    """The memory plan's verdict on one device of the recipe's kind (`merge-distill plan` says more)."""
    from merge_distill.methods import trains
    from merge_distill.plan import device_memory, plan

    if not trains(recipe):
        return []
    kind = recipe.device.split(":")[0]
    p = plan(recipe, gpu_memory_bytes=device_memory(kind), device=kind, suggest=False)
    return [f"memory plan (1 {kind}, prompts to 512 tokens; see merge-distill plan): {p.verdict()}"]


def _suites_line(suites) -> str:
    return "eval suites: " + ", ".join(f"{s.name} ({len(s)} problems)" for s in suites)


def static_checks(recipe: Recipe) -> list[str]:
    """The checks that need no file: graders exist, reward scales, engines."""
    from merge_distill.graders import available_graders

    return _static_checks(recipe, available_graders())


def _static_checks(recipe: Recipe, graders: list[str]) -> list[str]:
    for i, e in enumerate(recipe.experts):
        if e.grader_name not in graders:
            hint = "set grader: to one of " + ", ".join(graders) + " or register one (see the guide)"
            raise UserError(f"experts.{i} ({e.name}): no grader named '{e.grader_name}'; {hint}")
    scales = ", ".join(f"{e.name}={recipe.scale_of(e)}" for e in recipe.experts)
    lines = [f"reward scales: {scales}"]
    if recipe.backend.rollout == "vllm":
        found = importlib.util.find_spec("vllm") is not None
        lines.append(f"backend: vllm for rollout, gpu_memory_utilization {recipe.backend.gpu_memory_utilization}, "
                     f"sleep level {recipe.backend.sleep_level}; "
                     + ("vllm is installed" if found else
                        "vllm is not installed here (pip install 'merge-distill[vllm]' where it runs)"))
    for e in recipe.experts:
        lam = recipe.scale_of(e)
        if lam > 1.4:
            lines.append(f"note: expert {e.name} has reward_scale {lam}; the paper saw reward hacking from 1.5 "
                         "(length grows, accuracy falls)")
    return lines
