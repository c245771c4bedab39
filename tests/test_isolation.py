"""No model-written code runs without isolation unless the user asks.

Bubblewrap is simulated away, not uninstalled: the `no_bwrap` fixture gives this process (and the subprocesses it
starts) a PATH without `bwrap` and a fresh probe, so the sandbox's own detection finds nothing. Where bubblewrap is
missing or fails its self-test, `grade`, `eval`, `run`, `sweep` and `zoo build` stop with one line, before any
program runs (or any model trains) whenever code would be graded; `--isolation rlimits` (or `isolation: rlimits` in
a recipe) is the opt-out, and the level is printed under every table with code results."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from merge_distill.cli import app
from merge_distill.errors import UserError
from merge_distill.sandbox import IsolationUnavailable, Sandbox, isolation_level, policy, require_isolation

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()

CODE = [  # MBPP-shaped: one right, one wrong
    {"task_id": "add", "prompt": "add", "test_list": ["assert add(1, 2) == 3"],
     "completion": "def add(a, b):\n    return a + b"},
    {"task_id": "sub", "prompt": "sub", "test_list": ["assert sub(3, 1) == 2"],
     "completion": "def sub(a, b):\n    return b - a"},
]
MATH = [{"task_id": "m", "answer": "4", "completion": r"\boxed{4}"}]
# a program that would escape rlimits' lack of namespaces: it must never run when bubblewrap was asked for
ESCAPE = "open({path!r}, 'w').write('escaped')"


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def one_line_error(result) -> str:
    """A CliRunner result that failed as the CLI promises: exit 1, one `error:` line, no traceback."""
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit), result.exception
    err = result.stderr.strip()
    assert err.startswith("error:") and len(err.splitlines()) == 1, err
    assert "Traceback" not in result.output
    return err


def assert_says_how(err: str) -> None:
    assert "bubblewrap" in err and "apt-get install -y bubblewrap" in err  # how to install it
    assert "--isolation rlimits" in err and "isolation: rlimits" in err  # how to opt out, on the CLI and in a recipe


def assert_under_table(output: str, note: str) -> None:
    """`note` starts the first line after the table (its bottom border and its caption, if any)."""
    lines = output.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith(note))
    border = max(i for i, line in enumerate(lines[:at]) if line.lstrip().startswith("└"))
    assert all("│" not in line and "isolation" not in line for line in lines[border + 1: at]), output


def grade_process(path: str, *args) -> subprocess.CompletedProcess:
    """`merge-distill grade` in a fresh process whose PATH is `path`."""
    env = {**os.environ, "PATH": path, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "merge_distill", "grade", *args], capture_output=True, text=True,
                          env=env, timeout=300)


# ----------------------------------------------------------------------------------------------- the policy


def test_without_bwrap_bubblewrap_is_refused_in_one_line_and_rlimits_only_when_asked(no_bwrap):
    assert isolation_level() == "rlimits"
    with pytest.raises(IsolationUnavailable) as e:
        require_isolation("bubblewrap")
    err = str(e.value)
    assert "\n" not in err and "bwrap not found" in err, err
    assert_says_how(err)
    assert isinstance(e.value, UserError)  # the CLI prints it as one line
    assert require_isolation("rlimits") == "rlimits"
    with pytest.raises(ValueError):
        require_isolation("auto")  # not a level a user asks for


def test_a_bwrap_that_fails_its_self_test_counts_as_missing(tmp_path, monkeypatch):
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "bwrap").write_text("#!/bin/sh\necho 'bwrap: setting up uid map: Permission denied' >&2\nexit 1\n")
    (fake / "bwrap").chmod(0o755)
    monkeypatch.setenv("PATH", str(fake))
    monkeypatch.setattr(policy, "_LEVEL_CACHE", {})
    assert isolation_level() == "rlimits"
    with pytest.raises(IsolationUnavailable) as e:
        require_isolation("bubblewrap")
    err = str(e.value)
    assert "\n" not in err and "self-test failed" in err and "uid map: Permission denied" in err, err
    assert_says_how(err)


def test_the_sandbox_and_the_code_grader_refuse_by_default(no_bwrap, tmp_path):
    from merge_distill.graders import get_grader

    target = tmp_path / "escaped.txt"
    sandbox = Sandbox(1)
    assert sandbox.requested_isolation == "bubblewrap"
    with pytest.raises(IsolationUnavailable):
        sandbox.run([ESCAPE.format(path=str(target))])
    assert sandbox._pool is None and not target.exists()  # no worker started, nothing ran
    grader = get_grader("code")
    with pytest.raises(IsolationUnavailable):
        grader.grade_many(CODE, [r["completion"] for r in CODE])
    # the opt-out reaches graders that run code, and is dropped for those that do not
    assert get_grader("code", isolation="rlimits").sandbox.requested_isolation == "rlimits"
    assert get_grader("math", isolation="rlimits").name == "math"


def test_sandbox_level_asks_for_bubblewrap_only_where_code_runs(no_bwrap, monkeypatch):
    import merge_distill.graders as graders
    from merge_distill.graders import sandbox_level
    from merge_distill.graders.base import GraderBase

    assert sandbox_level(["math"], "bubblewrap") is None  # no code: nothing to isolate, nothing refused
    with pytest.raises(IsolationUnavailable):
        sandbox_level(["math", "code"], "bubblewrap")
    assert sandbox_level(["code"], "rlimits") == "rlimits"

    class Runner(GraderBase):  # a plugin's grader that runs code declares it, and gets the level
        name, runs_code = "runner", True

        def __init__(self, isolation="bubblewrap"):
            self.isolation = isolation

    monkeypatch.setattr(graders, "_REGISTERED", dict(graders._REGISTERED))
    graders.register_grader("runner", Runner)
    with pytest.raises(IsolationUnavailable):
        sandbox_level(["runner"], "bubblewrap")
    assert graders.get_grader("runner", isolation="rlimits").isolation == "rlimits"


# ---------------------------------------------------------------------------------------------------- grade


def test_grade_without_bwrap_exits_with_one_line_and_grades_nothing(no_bwrap, tmp_path):
    src, out = write_jsonl(tmp_path / "code.jsonl", CODE), tmp_path / "verdicts.jsonl"
    proc = grade_process(no_bwrap, str(src), "--out", str(out))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in proc.stderr, proc.stderr
    assert_says_how(lines[0])
    assert not out.exists()  # not one line graded


@pytest.mark.slow
def test_grade_with_isolation_rlimits_runs_and_prints_the_level(no_bwrap, tmp_path):
    src, out = write_jsonl(tmp_path / "code.jsonl", CODE), tmp_path / "verdicts.jsonl"
    proc = grade_process(no_bwrap, str(src), "--out", str(out), "--isolation", "rlimits")
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["verdict"], r["isolation"]) for r in rows] == [("pass", "rlimits"), ("fail", "rlimits")]
    assert_under_table(proc.stdout, "isolation: rlimits (asked for")


@pytest.mark.slow
def test_grade_needs_no_bwrap_for_records_that_run_no_code(no_bwrap, tmp_path):
    src, out = write_jsonl(tmp_path / "math.jsonl", MATH), tmp_path / "verdicts.jsonl"
    proc = grade_process(no_bwrap, str(src), "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "isolation:" not in proc.stdout and json.loads(out.read_text())["verdict"] == "pass"


@pytest.mark.slow
def test_grade_prints_bubblewrap_under_its_table(tmp_path, isolation):
    if isolation != "bubblewrap":
        pytest.skip("bubblewrap does not work on this machine (test_sandbox covers the level it has)")
    src, out = write_jsonl(tmp_path / "code.jsonl", CODE), tmp_path / "verdicts.jsonl"
    result = runner.invoke(app, ["grade", str(src), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert_under_table(result.output, "isolation: bubblewrap")
    assert {json.loads(line)["isolation"] for line in out.read_text().splitlines()} == {"bubblewrap"}


def test_an_unknown_isolation_is_one_line(tmp_path):
    src = write_jsonl(tmp_path / "code.jsonl", CODE)
    err = one_line_error(runner.invoke(app, ["grade", str(src), "--isolation", "none"]))
    assert "--isolation 'none': expected bubblewrap or rlimits" in err


# ----------------------------------------------------------------------------------------------------- eval


def eval_args(world: Path, out: Path, *suites: str) -> list[str]:
    return ["eval", "--model", f"base={world / 'base'}", *[a for s in suites for a in ("--suite", str(world / s))],
            "--max-problems", "3", "--max-new-tokens", "8", "--out", str(out)]


def test_eval_without_bwrap_refuses_a_code_suite_before_loading_a_model(no_bwrap, tiny_world, tmp_path,
                                                                         monkeypatch):
    import merge_distill.evaluation.runner as runner_module

    def load(*_, **__):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(runner_module, "_load", load)
    out = tmp_path / "ev"
    err = one_line_error(runner.invoke(app, eval_args(tiny_world, out, "math_test.jsonl", "code_test.jsonl")))
    assert_says_how(err)
    assert not (out / "generations").exists()


@pytest.mark.slow
def test_eval_with_isolation_rlimits_prints_the_level_under_its_table(no_bwrap, tiny_world, tmp_path):
    out = tmp_path / "ev"
    result = runner.invoke(app, [*eval_args(tiny_world, out, "code_test.jsonl"), "--isolation", "rlimits"])
    assert result.exit_code == 0, result.output
    assert_under_table(result.output, "isolation: rlimits")
    assert json.loads((out / "results.json").read_text())["sandbox_isolation"] == "rlimits"
    md = (out / "results.md").read_text().splitlines()
    assert md[md.index(next(line for line in md if line.startswith("_score"))) + 2].startswith("_isolation: rlimits")


@pytest.mark.slow
def test_eval_of_a_math_suite_needs_no_bwrap_and_records_no_level(no_bwrap, tiny_world, tmp_path):
    out = tmp_path / "ev"
    result = runner.invoke(app, eval_args(tiny_world, out, "math_test.jsonl"))
    assert result.exit_code == 0, result.output
    assert "isolation:" not in result.output
    assert json.loads((out / "results.json").read_text())["sandbox_isolation"] is None


# ---------------------------------------------------------------------------------------------- the recipe


def test_the_recipe_key_is_validated(tiny_world, tmp_path, write_recipe):
    from merge_distill.validate import load_recipe

    path = write_recipe(tmp_path / "r.yaml", tiny_world, tmp_path / "run")
    assert load_recipe(path).isolation == "bubblewrap"  # the default
    assert load_recipe(path, ["isolation=rlimits"]).isolation == "rlimits"
    with pytest.raises(UserError) as e:
        load_recipe(path, ["isolation=none"])
    assert "isolation:" in str(e.value) and "'bubblewrap' or 'rlimits'" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(UserError, match="eval.isolation: unknown key"):  # one key, at the top: it is not only eval's
        load_recipe(path, ["eval.isolation=rlimits"])
    err = one_line_error(runner.invoke(app, ["run", str(path), "--isolation", "namespaces"]))
    assert "--isolation 'namespaces'" in err


def test_the_graders_a_run_uses(tiny_world, tmp_path, write_recipe):
    from merge_distill.run import graders_to_run
    from merge_distill.validate import load_recipe

    path = write_recipe(tmp_path / "r.yaml", tiny_world, tmp_path / "run")
    code_suite, math_suite = str(tiny_world / "code_test.jsonl"), str(tiny_world / "math_test.jsonl")

    def graders(*sets, evaluate_after=True):
        return graders_to_run(load_recipe(path, list(sets)), evaluate_after=evaluate_after)

    assert graders() == set()  # gopd rewards with teachers; no eval section
    assert graders("method=grpo", "rollout.rollouts_per_prompt=2") == {"math", "code"}  # GRPO rewards with graders
    assert graders(f"eval.suites=[{math_suite}]") == {"math"}
    assert graders(f"eval.suites=[{math_suite}, {code_suite}]") == {"math", "code"}
    assert graders(f"eval.suites=[{code_suite}]", evaluate_after=False) == set()  # --no-eval
    assert graders(f"eval.suites=[{code_suite}]", "schedule.eval_every=2", evaluate_after=False) == {"code"}  # periodic
    # the smoke recipe, its zoo not built: building the code expert is GRPO on code, and the zoo-code suite is code
    smoke = load_recipe(ROOT / "recipes" / "smoke.yaml", [f"zoo.dir={tmp_path / 'zoo'}"])
    assert graders_to_run(smoke, evaluate_after=False) == {"math", "code"}


@pytest.mark.parametrize("sets, args", [
    (["method=grpo", "rollout.rollouts_per_prompt=2"], ["--no-eval"]),  # GRPO's code reward
    (["eval.suites=[CODE]", "eval.max_problems=2"], []),  # the final evaluation
    (["eval.suites=[CODE]", "schedule.eval_every=1"], ["--no-eval"]),  # periodic evaluation
], ids=["grpo", "final-eval", "periodic-eval"])
def test_run_without_bwrap_refuses_before_training(no_bwrap, tiny_world, tmp_path, write_recipe, monkeypatch,
                                                    sets, args):
    import merge_distill.build as build

    def train(*_, **__):
        raise AssertionError("training started")

    monkeypatch.setattr(build, "train", train)
    monkeypatch.setattr(build, "build_run", train)
    out = tmp_path / "run"
    path = write_recipe(tmp_path / "r.yaml", tiny_world, out)
    sets = [s.replace("CODE", str(tiny_world / "code_test.jsonl")) for s in sets]
    err = one_line_error(runner.invoke(app, ["run", str(path), *args, *[a for s in sets for a in ("--set", s)]]))
    assert_says_how(err)
    assert not out.exists()


def test_run_and_sweep_without_bwrap_refuse_before_building_the_zoo(no_bwrap, tmp_path, monkeypatch):
    monkeypatch.setenv("MERGE_DISTILL_CACHE", str(tmp_path / "cache"))
    smoke = str(ROOT / "recipes" / "smoke.yaml")
    for args in (["run", smoke, "--no-eval"], ["sweep", smoke, "--set", "reward_scale=1.0,1.5"],
                 ["zoo", "build", "--preset", "smoke"]):
        assert_says_how(one_line_error(runner.invoke(app, [*args, "--set", f"output_dir={tmp_path / 'run'}"]
                                                     if args[0] != "zoo" else args)))
    assert not (tmp_path / "cache").exists() and not (tmp_path / "run").exists()  # no zoo member, no run


@pytest.mark.slow
def test_a_run_with_isolation_rlimits_prints_the_level_under_its_tables(no_bwrap, tiny_world, tmp_path,
                                                                        write_recipe):
    out = tmp_path / "run"
    path = write_recipe(tmp_path / "r.yaml", tiny_world, out, steps=1, prompts_per_step=2, max_new_tokens=8)
    recipe = yaml.safe_load(path.read_text())
    recipe["eval"] = {"suites": [str(tiny_world / "code_test.jsonl")], "max_problems": 3, "baselines": False}
    path.write_text(yaml.safe_dump(recipe))
    result = runner.invoke(app, ["run", str(path), "--isolation", "rlimits"])
    assert result.exit_code == 0, result.output
    assert_under_table(result.output, "isolation: rlimits")
    assert json.loads((out / "report.json").read_text())["sandbox_isolation"] == "rlimits"
    assert "_isolation: rlimits (asked for" in (out / "report.md").read_text()
