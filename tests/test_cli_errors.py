"""Bad input, tried as a new user would: one clear line naming the culprit, a non-zero exit, no traceback."""

import json
import subprocess
import sys

import pytest
import yaml
from typer.testing import CliRunner

from merge_distill.cli import app

runner = CliRunner()


def one_line_error(args) -> str:
    result = runner.invoke(app, args)
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit), result.exception
    err = result.stderr.strip()
    assert err.startswith("error:") and len(err.splitlines()) == 1, err
    assert "Traceback" not in result.output
    return err


@pytest.fixture
def recipe(tiny_world, tmp_path, write_recipe):
    return write_recipe(tmp_path / "r.yaml", tiny_world, tmp_path / "run")


def edit(path, fn):
    data = yaml.safe_load(path.read_text())
    fn(data)
    path.write_text(yaml.safe_dump(data))
    return path


def test_validate_accepts_a_good_recipe(recipe):
    result = runner.invoke(app, ["validate", str(recipe)])
    assert result.exit_code == 0, result.output
    assert "expert math: 300 prompts" in result.output and "ok" in result.output


def test_missing_recipe(tmp_path):
    assert "recipe 'nope.yaml' does not exist" in one_line_error(["validate", "nope.yaml"])


def test_misspelt_key(recipe):
    edit(recipe, lambda d: d.__setitem__("optmi", d.pop("optim")))
    assert "optmi: unknown key" in one_line_error(["validate", str(recipe)])


def test_misspelt_nested_key(recipe):
    edit(recipe, lambda d: d["schedule"].__setitem__("stesp", 3))
    assert "schedule.stesp: unknown key" in one_line_error(["validate", str(recipe)])


def test_wrong_type(recipe):
    edit(recipe, lambda d: d["schedule"].__setitem__("steps", "ten"))
    err = one_line_error(["validate", str(recipe)])
    assert "schedule.steps" in err and "'ten'" in err


def test_bad_override(recipe):
    assert "schedule.steps" in one_line_error(["validate", str(recipe), "--set", "schedule.steps=-3"])


def test_missing_teacher(recipe, tmp_path):
    edit(recipe, lambda d: d["experts"][0].__setitem__("teacher", str(tmp_path / "nowhere")))
    assert "experts.0.teacher (math)" in one_line_error(["validate", str(recipe)])


def test_teacher_with_another_vocabulary(recipe, tmp_path):
    from merge_distill.models import save_model
    from merge_distill.toyworld.models import byte_tokenizer, tiny_qwen3

    tok = byte_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<|tool|>"]})
    save_model(tiny_qwen3(len(tok), hidden=16, layers=1, heads=2), tok, tmp_path / "alien")
    edit(recipe, lambda d: d["experts"][1].__setitem__("teacher", str(tmp_path / "alien")))
    err = one_line_error(["validate", str(recipe)])
    assert "teacher of expert 'code'" in err and "different vocabulary" in err and "alien" in err


def test_empty_prompt_file(recipe, tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    edit(recipe, lambda d: d["experts"][0].__setitem__("prompts", str(tmp_path / "empty.jsonl")))
    err = one_line_error(["validate", str(recipe)])
    assert "experts.0.prompts (math)" in err and "is empty" in err


def test_json_list_prompt_file(recipe, tiny_world, tmp_path):
    """A .json prompt file is a JSON list of objects, as an eval suite's .json file is; JSONL content in a
    .json file is a one-line error naming the field, the file, and the fix."""
    records = [json.loads(line) for line in (tiny_world / "math.jsonl").read_text().splitlines()]
    (tmp_path / "math.json").write_text(json.dumps(records))
    edit(recipe, lambda d: d["experts"][0].__setitem__("prompts", str(tmp_path / "math.json")))
    result = runner.invoke(app, ["validate", str(recipe)])
    assert result.exit_code == 0, result.output
    assert f"expert math: {len(records)} prompts" in result.output
    (tmp_path / "math.json").write_text((tiny_world / "math.jsonl").read_text())
    err = one_line_error(["validate", str(recipe)])
    assert f"experts.0.prompts (math) '{tmp_path / 'math.json'}': invalid JSON" in err and "name the file .jsonl" in err


def test_duplicate_expert_and_zero_weight(recipe):
    edit(recipe, lambda d: d["experts"][1].__setitem__("name", "math"))
    assert "two experts are named 'math'" in one_line_error(["validate", str(recipe)])
    edit(recipe, lambda d: (d["experts"][1].__setitem__("name", "code"), d["experts"][1].__setitem__("weight", 0)))
    assert "experts.1.weight" in one_line_error(["validate", str(recipe)])
    edit(recipe, lambda d: (d["experts"][1].__setitem__("weight", 1), d["experts"][1].__setitem__("reward_scale", -1)))
    assert "experts.1.reward_scale" in one_line_error(["validate", str(recipe)])


def test_expert_without_a_grader(recipe):
    edit(recipe, lambda d: d["experts"][1].__setitem__("name", "chemistry"))
    err = one_line_error(["validate", str(recipe)])
    assert "experts.1 (chemistry): no grader named 'chemistry'" in err


@pytest.mark.slow
def test_real_process_prints_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "merge_distill", "run", str(tmp_path / "missing.yaml")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [f"error: recipe '{tmp_path / 'missing.yaml'}' does not exist"]


def test_grpo_with_one_rollout_per_prompt(recipe):
    """Group-normalised advantages of a group of one are all 0: such a run would train nothing."""
    path = edit(recipe, lambda d: d.update(method="grpo") or d["rollout"].update(rollouts_per_prompt=1))
    err = one_line_error(["validate", str(path)])
    assert "rollout.rollouts_per_prompt" in err and "GRPO" in err
    assert one_line_error(["run", str(path), "--no-eval"]) == err


@pytest.mark.parametrize("change,expected", [
    (lambda d: d.update(method="sft") or d.setdefault("placement", {}).update(shard_frozen=True),
     "placement.shard_frozen: method sft loads its frozen models into the trainer whole"),
    (lambda d: d.setdefault("placement", {}).update(shard_frozen=True, offload=True),
     "placement.shard_frozen does not combine with placement.offload"),
    (lambda d: d.setdefault("placement", {}).update(offload_optimizer=True),
     "placement.offload_optimizer moves fsdp's shards from the GPU to the host: it needs parallel: fsdp and a "
     "cuda device (parallel is ddp, device cpu)"),
    (lambda d: d.update(parallel="zero"), "parallel: Input should be 'ddp' or 'fsdp'"),
])
def test_layout_options_that_cannot_run(recipe, change, expected):
    assert expected in one_line_error(["validate", str(edit(recipe, change))])
