"""Loading a recipe (`load_recipe`: YAML, `--set` overrides, the schema, then `check_recipe`) and
`merge-distill validate`: every check a run makes before it spends compute, and nothing more.

When models or prompt files the recipe names are not there yet (a paper-scale recipe validated before the
weights are fetched), it still checks everything that needs no weights (schema, graders, reward scales,
prompt files that exist, eval suites) and then reports every missing path at once, one line each.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from merge_distill import extensions
from merge_distill.errors import UserError
from merge_distill.io import RECORD_SUFFIXES
from merge_distill.recipe import STUDENT, TEACHER_BASE, AdapterModel, Recipe, train_keys_moved


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


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """The recipe at `path` with `--set` overrides applied, checked by the schema and by `check_recipe`."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"recipe '{path}' does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}" if mark else ""
        raise UserError(f"{path}{where}: not valid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: a recipe is a YAML mapping (student:, experts:, ...)")
    if isinstance(data.get("method"), str):  # `method: gopd` is `method: {name: gopd}`: `--set method.x=` reaches it
        data["method"] = {"name": data["method"]}
    for text in overrides or []:
        apply_override(data, *parse_override(text), text)
    data = extensions.resolve_recipe_data(data, str(path))
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as e:
        raise UserError(_format_error(e, str(path))) from None
    try:
        return check_recipe(recipe)
    except UserError as e:
        raise UserError(f"{path}: {e}") from None


def variant_recipes(recipe_path: Path, overrides: list[str], recipe: Recipe) -> dict[str, Recipe]:
    """The recipe itself as 'student', or each `compare:` variant under its own name and output folder (the
    recipe loaded again with the variant's `set:` as overrides)."""
    if not recipe.compare:
        return {"student": recipe}
    out = {}
    for v in recipe.compare:
        sets = [f"{k}={json.dumps(x)}" for k, x in v.set.items()]
        r = load_recipe(recipe_path, overrides + sets + [f"output_dir={Path(recipe.output_dir) / 'variants' / v.name}",
                                                         "compare=null", "compare_against=null"])
        out[v.name] = r
    return out


def check_recipe(recipe: Recipe) -> Recipe:
    """The checks that span sections or ask a registry, which the schema leaves out: the method is registered
    and accepts the recipe (its own `check`: GRPO's groups, teachers where they are needed), and the rollout
    engine and placement fit `parallel` and `device`. Raises UserError (one line, naming the key); returns
    `recipe`. `load_recipe` calls it; code that builds a `Recipe` itself calls it where it needs these checks."""
    from merge_distill.merging import COMBINERS
    from merge_distill.methods import available_methods, method_of, trains

    if not trains(recipe) and recipe.method.name not in COMBINERS:
        raise UserError(f"method.name: unknown method '{recipe.method.name}' (registered: "
                        f"{', '.join(sorted([*available_methods(), *COMBINERS]))})")
    if not trains(recipe):  # a weight-space merge of the teachers (`merging.COMBINERS`)
        missing = [f"experts.{i} ({e.name})" for i, e in enumerate(recipe.experts) if not e.teacher]
        if missing:
            raise UserError(f"{missing[0]}: teacher is required for method {recipe.method.name} (it merges the "
                            "teachers' weights)")
        return recipe
    try:
        method = method_of(recipe)
        method.check(recipe)
    except ValueError as e:
        raise UserError(str(e)) from None
    if recipe.backend.rollout == "paged" and recipe.parallel == "fsdp":
        raise UserError("backend.rollout paged runs transformers' continuous batching, which does not take "
                        "FSDP-sharded models (and its cache takes the weights' dtype, not fsdp's param_dtype); "
                        "use parallel: ddp or backend.rollout: transformers")
    if recipe.placement.shard_frozen:
        if not method.frozen_shardable:
            raise UserError(f"placement.shard_frozen: method {recipe.method.name} loads its frozen models into the "
                            "trainer whole (it samples from them or takes full distributions)")
        if recipe.placement.offload:
            raise UserError("placement.shard_frozen does not combine with placement.offload")
    if recipe.placement.offload_optimizer and (recipe.parallel != "fsdp" or not recipe.device.startswith("cuda")):
        raise UserError(f"placement.offload_optimizer moves fsdp's shards from the GPU to the host: it needs "
                        f"parallel: fsdp and a cuda device (parallel is {recipe.parallel}, device {recipe.device})")
    return recipe


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise UserError(f"--set '{text}': expected KEY=VALUE, e.g. schedule.steps=10")
    key, value = text.split("=", 1)
    return key.strip().split("."), yaml.safe_load(value)


def check_override_key(path: list[str], text: str) -> None:
    """Refuse a `--set` key of the former `train:` section, saying where it went."""
    if path[0] == "train":
        raise UserError(f"--set '{text}': {train_keys_moved(path[1:2])}")


def apply_override(data: dict, path: list[str], value: Any, text: str) -> None:
    """Set a dotted key in raw recipe data. `experts.math.reward_scale` picks the expert by name;
    `method=NAME` names the method and keeps the section's other keys (e.g. `method.objective`)."""
    check_override_key(path, text)
    if path == ["method"] and isinstance(value, str):
        method = data.get("method")
        data["method"] = {**(method if isinstance(method, dict) else {}), "name": value}
        return
    node: Any = data
    for i, part in enumerate(path):
        last = i == len(path) - 1
        if isinstance(node, list):
            idx = next((j for j, x in enumerate(node) if isinstance(x, dict) and x.get("name") == part), None)
            if idx is None and part.isdigit() and int(part) < len(node):
                idx = int(part)
            if idx is None:
                raise UserError(f"--set '{text}': no list item named '{part}'")
            if last:
                node[idx] = value
            else:
                node = node[idx]
        elif isinstance(node, dict):
            if last:
                node[part] = value
            else:
                node = node.setdefault(part, {})
        else:
            raise UserError(f"--set '{text}': '{part}' is not inside a section")


def _format_error(err: ValidationError, source: str) -> str:
    parts = []
    for e in err.errors()[:3]:
        loc = ".".join(str(x) for x in e["loc"])
        if e["type"] == "extra_forbidden":
            parts.append(f"{loc}: unknown key")
        elif e["type"] == "missing":
            parts.append(f"{loc}: required key is missing")
        else:
            msg = e["msg"].removeprefix("Value error, ")
            parts.append(f"{loc}: {msg} (got {e.get('input')!r})" if loc else msg)
    more = f" (+{len(err.errors()) - 3} more)" if len(err.errors()) > 3 else ""
    return f"{source}: " + "; ".join(parts) + more


def _input_fields(recipe: Recipe) -> list[tuple[str, str, str]]:
    """(field, path, kind) of every model a run loads (as `train.check_models` decides) and every prompt file,
    in recipe order; kind: 'model', 'adapter' (a peft folder) or 'records' (a prompt file)."""
    from merge_distill.methods import frozen_models

    fields = [("student", recipe.student.path, "model")]
    for i, e in enumerate(recipe.experts):
        for role, path in frozen_models(recipe, e).items():
            if isinstance(path, AdapterModel):  # its base a model, its adapter a peft folder
                fields += [(f"experts.{i}.{role}.base ({e.name})", path.base, "model"),
                           (f"experts.{i}.{role}.adapter ({e.name})", path.adapter, "adapter")]
            elif path not in (STUDENT, TEACHER_BASE):
                fields.append((f"experts.{i}.{role} ({e.name})", path, "model"))
        if isinstance(e.prompts, str):  # a `datasets` or `reasoning_gym` spec is checked when it loads
            fields.append((f"experts.{i}.prompts ({e.name})", e.prompts, "records"))
    return fields


def missing_paths(recipe: Recipe) -> list[str]:
    """One line per model folder, adapter folder or prompt file that does not exist (`zoo:` paths resolved when
    the recipe loaded)."""
    from merge_distill.adapters import ADAPTER_CONFIG, is_adapter_dir
    from merge_distill.models import is_model_dir

    problems = []
    for field, path, kind in _input_fields(recipe):
        if not Path(path).exists():
            problems.append(f"{field}: {path} not found")
        elif kind == "model" and not is_model_dir(path):
            problems.append(f"{field}: {path} is not a model folder (no config.json) or a .gguf file")
        elif kind == "adapter" and not is_adapter_dir(path):
            problems.append(f"{field}: {path} is not a peft adapter (no {ADAPTER_CONFIG})")
        elif kind == "records" and not Path(path).is_file():
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
    tokenizer = load_tokenizer(recipe.student.path, what="student")
    for i, e in enumerate(recipe.experts):
        what = f"experts.{i}.prompts ({e.name})"
        records = load_records(e.prompts, what=what)
        template = None if e.prompt_template == "{prompt}" else e.prompt_template
        ids = render_prompt(tokenizer, user_message(records[0], template, what=what), e.system_prompt)
        ref = {STUDENT: "student's initial weights", TEACHER_BASE: "the teacher's base"}.get(e.reference, e.reference)
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
