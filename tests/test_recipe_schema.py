"""The recipe schema: the sections the former `train:` section was split into (each old key refused with its new
place, from a file, from `--set` and from a compare variant), `method:` as a name or a section, the removed
`backend.scoring`, and recipe.py as a schema that imports nothing of the package but (at most) its errors."""

import ast
from pathlib import Path

import pytest
import yaml

from merge_distill.errors import UserError
from merge_distill.recipe import Recipe
from merge_distill.validate import check_recipe, load_recipe

ROOT = Path(__file__).resolve().parents[1]
SPLIT = "(the train: section was split into method, optim, rollout, budget, schedule)"

# every key of the former train: section, its new place and a valid value that differs from its default
MOVED = {
    "steps": ("schedule.steps", 7),
    "prompts_per_step": ("rollout.prompts_per_step", 3),
    "rollouts_per_prompt": ("rollout.rollouts_per_prompt", 2),
    "max_new_tokens": ("rollout.max_new_tokens", 9),
    "temperature": ("rollout.temperature", 0.5),
    "lr": ("optim.lr", 0.25),
    "lr_schedule": ("optim.lr_schedule", "cosine"),
    "warmup_steps": ("optim.warmup_steps", 4),
    "weight_decay": ("optim.weight_decay", 0.125),
    "grad_clip": ("optim.grad_clip", 2.5),
    "importance_truncation": ("method.importance_truncation", 3.5),
    "objective": ("method.objective", "dense"),
    "log_ratio_clip": ("method.log_ratio_clip", 0.75),
    "micro_batch_size": ("budget.micro_batch_size", 5),
    "max_tokens_per_micro_batch": ("budget.max_tokens_per_micro_batch", 640),
    "max_rollout_tokens": ("budget.max_rollout_tokens", 320),
    "gradient_checkpointing": ("budget.gradient_checkpointing", True),
    "threads": ("budget.threads", 6),
    "seed": ("seed", 11),
    "checkpoint_every": ("schedule.checkpoint_every", 8),
    "keep_checkpoints": ("schedule.keep_checkpoints", 5),
    "eval_every": ("schedule.eval_every", 12),
    "max_consecutive_skips": ("schedule.max_consecutive_skips", 9),
}
BASE = {"student": "s", "experts": [{"name": "math", "teacher": "t", "prompts": "p.jsonl"}], "output_dir": "o"}


def write(tmp_path: Path, **data) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({**BASE, **data}, sort_keys=False))
    return path


def at(recipe: Recipe, place: str):
    value = recipe
    for part in place.split("."):
        value = getattr(value, part)
    return value


def test_every_old_train_key_is_listed():
    assert len(MOVED) == 23


@pytest.mark.parametrize("key", MOVED)
def test_an_old_train_key_in_a_recipe_names_its_new_place(tmp_path, key):
    place, value = MOVED[key]
    path = write(tmp_path, train={key: value})
    with pytest.raises(UserError) as e:
        load_recipe(path)
    assert str(e.value) == f"{path}: train.{key} moved to {place} {SPLIT}"


@pytest.mark.parametrize("key", MOVED)
def test_an_old_train_key_in_set_names_its_new_place_which_takes_the_value(tmp_path, key):
    place, value = MOVED[key]
    path = write(tmp_path)
    text = f"train.{key}={yaml.safe_dump(value).splitlines()[0]}"
    with pytest.raises(UserError) as e:
        load_recipe(path, [text])
    assert str(e.value) == f"--set '{text}': train.{key} moved to {place} {SPLIT}"
    # the pointer is true: the new place takes the value (grpo would need 2 rollouts; gopd is the default)
    moved = load_recipe(path, [text.replace(f"train.{key}", place, 1)])
    assert at(moved, place) == value
    assert at(load_recipe(path), place) != value  # ... and it is not the default


def test_a_train_section_lists_every_key_and_the_unknown_ones(tmp_path):
    path = write(tmp_path, train={"lr": 0.1, "stesp": 3, "seed": 2})
    with pytest.raises(UserError) as e:
        load_recipe(path)
    assert str(e.value) == (f"{path}: train.lr moved to optim.lr; train.stesp is an unknown key; train.seed moved "
                            f"to seed {SPLIT}")
    assert len(str(e.value).splitlines()) == 1


def test_a_compare_variant_setting_an_old_train_key_is_refused(tmp_path):
    path = write(tmp_path, compare=[{"name": "fast", "set": {"train.lr": 0.1}}])
    with pytest.raises(UserError, match=r"compare\.0\.set: train\.lr moved to optim\.lr \(the train: section"):
        load_recipe(path)
    assert load_recipe(write(tmp_path, compare=[{"name": "fast", "set": {"optim.lr": 0.1}}])).compare[0].set


def test_a_sweep_over_an_old_train_key_is_refused_before_anything_runs(tmp_path):
    from merge_distill.sweep import sweep

    with pytest.raises(UserError, match=r"^--set 'train\.log_ratio_clip=null,0\.5': train\.log_ratio_clip moved "
                                        r"to method\.log_ratio_clip "):
        sweep(write(tmp_path), ["train.log_ratio_clip=null,0.5"])


def test_method_is_a_name_or_a_section(tmp_path):
    named = load_recipe(write(tmp_path, method="gopd"))
    assert (named.method.name, named.method.objective, named.method.importance_truncation) == ("gopd", "sampled", 5.0)
    section = load_recipe(write(tmp_path, method={"name": "gopd", "objective": "dense"}))
    assert (section.method.name, section.method.objective) == ("gopd", "dense")
    assert section.manifest()["method"] == "gopd"  # runs written before the split resume: a name, as then
    assert load_recipe(write(tmp_path)).method.name == "gopd"  # the default


def test_set_reaches_into_a_method_given_by_name(tmp_path):
    dense = load_recipe(write(tmp_path, method="gopd"), ["method.objective=dense"])
    assert (dense.method.name, dense.method.objective) == ("gopd", "dense")


def test_set_method_names_the_method_and_keeps_the_sections_other_keys(tmp_path):
    path = write(tmp_path, method={"name": "gopd", "importance_truncation": 2.0}, rollout={"rollouts_per_prompt": 2})
    grpo = load_recipe(path, ["method=grpo"])
    assert (grpo.method.name, grpo.method.importance_truncation) == ("grpo", 2.0)
    # the objective set before the name still meets the method's checks
    with pytest.raises(UserError, match="method.objective dense is not available for method sft"):
        load_recipe(write(tmp_path), ["method.objective=dense", "method=sft"])


def test_backend_scoring_is_refused_in_one_line(tmp_path):
    line = ("backend.scoring was removed: teachers and references always score through the trainer's chunked "
            "scorer; delete the line")
    path = write(tmp_path, backend={"rollout": "transformers", "scoring": "transformers"})
    with pytest.raises(UserError) as e:
        load_recipe(path)
    assert str(e.value) == f"{path}: {line}"
    with pytest.raises(UserError) as e:
        load_recipe(write(tmp_path), ["backend.scoring=vllm"])
    assert str(e.value).endswith(f": {line}")


def test_the_schema_asks_no_registry_and_check_recipe_does():
    """`Recipe` alone takes any method name (the registry is validate's); `check_recipe` refuses it in one line."""
    recipe = Recipe.model_validate({**BASE, "method": "no_such_method"})
    assert recipe.method.name == "no_such_method"
    with pytest.raises(UserError, match=r"^method\.name: unknown method 'no_such_method' \(registered: .*gopd"):
        check_recipe(recipe)
    sharded = Recipe.model_validate({**BASE, "method": "sft", "placement": {"shard_frozen": True}})
    with pytest.raises(UserError, match="placement.shard_frozen: method sft loads its frozen models"):
        check_recipe(sharded)
    assert check_recipe(Recipe.model_validate(BASE)).method.name == "gopd"


def test_recipe_py_imports_nothing_of_the_package_but_its_errors():
    tree = ast.parse((ROOT / "merge_distill" / "recipe.py").read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert {m for m in imported if m.split(".")[0] == "merge_distill"} <= {"merge_distill.errors"}
    assert "yaml" not in imported  # loading a file is validate's
