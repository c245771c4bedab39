"""`merge-distill validate`: every check a run makes before it spends compute, and nothing more."""

from __future__ import annotations

from pathlib import Path

from merge_distill.errors import UserError
from merge_distill.recipe import STUDENT, Recipe


def validate_recipe(recipe: Recipe) -> list[str]:
    """Raise UserError at the first problem; return lines describing what was checked."""
    from merge_distill.data import load_records, render_prompt, user_message
    from merge_distill.graders import available_graders
    from merge_distill.models import load_tokenizer
    from merge_distill.toyworld.zoo import resolve, zoo_for

    lines = []
    zoo = zoo_for(recipe)
    resolved = resolve(recipe, build=False)
    pending = []
    if zoo is not None:
        for original, path in zip(recipe.model_paths(), resolved.model_paths()):
            if original.startswith("zoo:") and not Path(path).exists():
                pending.append(original)
        for e in recipe.experts:
            if isinstance(e.prompts, str) and e.prompts.startswith("zoo:") and not zoo.path("data").exists():
                pending.append(e.prompts)
    if pending:
        lines.append(f"zoo '{zoo.name}' (seed {zoo.seed}) at {zoo.dir}: not built yet "
                     f"({', '.join(sorted(set(pending)))}); `merge-distill run` or `merge-distill zoo build` builds it")
        return lines + _static_checks(recipe, available_graders())

    from merge_distill.train import check_models

    check_models(resolved)
    lines.append(f"models: student and {len(resolved.experts)} expert(s) share one vocabulary and chat template")
    tokenizer = load_tokenizer(resolved.student, what="student")
    for i, e in enumerate(resolved.experts):
        what = f"experts.{i}.prompts ({e.name})"
        records = load_records(e.prompts, what=what)
        template = None if e.prompt_template == "{prompt}" else e.prompt_template
        ids = render_prompt(tokenizer, user_message(records[0], template, what=what), e.system_prompt)
        ref = "student's initial weights" if e.reference == STUDENT else e.reference
        lines.append(f"expert {e.name}: {len(records)} prompts (first is {len(ids)} tokens), "
                     f"reward_scale {resolved.scale_of(e)}, reference {ref}, grader {e.grader_name}")
    lines += _static_checks(recipe, available_graders())
    if recipe.eval:
        from merge_distill.run import eval_suites

        suites = eval_suites(resolved)
        lines.append("eval suites: " + ", ".join(f"{s.name} ({len(s)} problems)" for s in suites))
    return lines


def _static_checks(recipe: Recipe, graders: list[str]) -> list[str]:
    for i, e in enumerate(recipe.experts):
        if e.grader_name not in graders:
            hint = "set grader: to one of " + ", ".join(graders) + " or register one (see the guide)"
            raise UserError(f"experts.{i} ({e.name}): no grader named '{e.grader_name}'; {hint}")
    scales = ", ".join(f"{e.name}={recipe.scale_of(e)}" for e in recipe.experts)
    lines = [f"reward scales: {scales}"]
    for e in recipe.experts:
        lam = recipe.scale_of(e)
        if lam > 1.4:
            lines.append(f"note: expert {e.name} has reward_scale {lam}; the paper saw reward hacking from 1.5 "
                         "(length grows, accuracy falls)")
    return lines
