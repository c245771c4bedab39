"""`merge-distill validate` before the weights are there: every check that needs none of them, then every
missing model or prompt path, one line each, exit code 1, no traceback."""

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from merge_distill.cli import app

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()

MISSING = {
    "qwen3_4b_math_code.yaml": [
        "student: checkpoints/qwen3-4b not found",
        "experts.0.teacher (math): checkpoints/qwen3-4b-math-rl not found",
        "experts.0.prompts (math): data/deepmath_25k.jsonl not found",
        "experts.1.teacher (code): checkpoints/qwen3-4b-code-rl not found",
        "experts.1.prompts (code): data/eurus_code_25k.jsonl not found",
    ],
    "qwen3_4b_math_code_lora.yaml": [
        "student: checkpoints/qwen3-4b not found",
        "experts.0.teacher.base (math): checkpoints/qwen3-4b not found",
        "experts.0.teacher.adapter (math): checkpoints/qwen3-4b-math-lora not found",
        "experts.0.prompts (math): data/deepmath_25k.jsonl not found",
        "experts.1.teacher.base (code): checkpoints/qwen3-4b not found",
        "experts.1.teacher.adapter (code): checkpoints/qwen3-4b-code-lora not found",
        "experts.1.prompts (code): data/eurus_code_25k.jsonl not found",
    ],
    "qwen3_strong_to_weak.yaml": [
        "student: checkpoints/qwen3-1.7b not found",
        "experts.0.teacher (math): checkpoints/qwen3-4b-math-rl not found",
        "experts.0.reference (math): checkpoints/qwen3-4b not found",
        "experts.0.prompts (math): data/deepmath_25k.jsonl not found",
    ],
}


def validate(*args):
    result = runner.invoke(app, ["validate", *map(str, args)])
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output
    err = result.stderr.strip().splitlines()
    if len(err) == 1:  # a single problem is a single line, as every other error
        assert err[0].startswith("error: "), err
        return result.stdout, [err[0].removeprefix("error: ")]
    assert err[0].startswith(f"error: {len(err) - 1} inputs of the recipe missing or unusable"), err
    return result.stdout, [line.strip() for line in err[1:]]


@pytest.mark.parametrize("recipe", sorted(MISSING))
def test_paper_recipes_list_every_missing_input(recipe, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the recipes' relative paths do not exist here
    out, missing = validate(ROOT / "recipes" / recipe)
    assert missing == MISSING[recipe]  # one line each, in recipe order, nothing else
    # the checks that need no weights still ran
    assert "reward scales: math=1.25" in out
    assert "eval suites: champ (270 problems)" in out
    # both sample with vLLM; teachers and references score through the trainer's chunked scorer
    share = yaml.safe_load((ROOT / "recipes" / recipe).read_text())["backend"]["gpu_memory_utilization"]
    assert f"backend: vllm for rollout, gpu_memory_utilization {share}, sleep level 2; vllm is" in out


def test_inputs_that_exist_are_checked_and_not_listed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "deepmath_25k.jsonl").write_text("".join(json.dumps({"prompt": f"{i}+1?", "answer": str(i + 1)}) + "\n"
                                                                  for i in range(3)))
    (tmp_path / "checkpoints" / "qwen3-4b").mkdir(parents=True)  # there, but no config.json
    out, missing = validate(ROOT / "recipes" / "qwen3_strong_to_weak.yaml", "--set", "experts.math.grader=nope")
    assert "expert math: 3 prompts in data/deepmath_25k.jsonl" in out
    assert missing[:3] == ["student: checkpoints/qwen3-1.7b not found",
                           "experts.0.teacher (math): checkpoints/qwen3-4b-math-rl not found",
                           "experts.0.reference (math): checkpoints/qwen3-4b is not a model folder (no config.json) or a .gguf file"]
    assert len(missing) == 4 and "no grader named 'nope'" in missing[3]


def test_adapter_folders_are_checked_as_adapters(tmp_path, monkeypatch):
    """An adapter expert's folder is a peft adapter (adapter_config.json), not a prompt file: one that is passes,
    one that is not is listed as such."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "checkpoints" / "qwen3-4b-math-lora").mkdir(parents=True)
    (tmp_path / "checkpoints" / "qwen3-4b-math-lora" / "adapter_config.json").write_text('{"r": 32}')
    (tmp_path / "checkpoints" / "qwen3-4b-code-lora").mkdir()
    _, missing = validate(ROOT / "recipes" / "qwen3_4b_math_code_lora.yaml")
    assert [x for x in missing if ".adapter " in x] == [
        "experts.1.teacher.adapter (code): checkpoints/qwen3-4b-code-lora is not a peft adapter (no adapter_config.json)"]


def test_only_the_missing_teacher_is_listed(tiny_world, tmp_path, write_recipe):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_world, tmp_path / "run")
    data = yaml.safe_load(recipe.read_text())
    data["experts"][1]["teacher"] = str(tmp_path / "nowhere")
    recipe.write_text(yaml.safe_dump(data))
    _, missing = validate(recipe)
    assert missing == [f"experts.1.teacher (code): {tmp_path / 'nowhere'} not found"]


def test_a_complete_recipe_still_validates(tiny_world, tmp_path, write_recipe):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_world, tmp_path / "run")
    result = runner.invoke(app, ["validate", str(recipe)])
    assert result.exit_code == 0, result.output
    assert "expert math: 300 prompts" in result.stdout and "backend" not in result.stdout
