"""The example grader plugin (examples/merge-distill-units), installed for real and found by entry point."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import sysconfig
import textwrap
from importlib import metadata
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from merge_distill.cli import app
from merge_distill.toyworld.tasks import make_splits

PLUGIN = Path(__file__).resolve().parents[1] / "examples" / "merge-distill-units"
DIST = "merge-distill-units"


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


@pytest.fixture(scope="module")
def units_plugin(tmp_path_factory) -> str:
    """The python of a throwaway venv with the plugin installed (offline: no index, no build isolation, from a
    copy, so the build leaves nothing in the source tree). The venv sees this environment's packages through a
    .pth file, and the environment running the tests never sees the plugin."""
    root = tmp_path_factory.mktemp("plugin")
    venv = root / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    python = str(venv / "bin" / "python")
    purelib = _run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip()
    here = sysconfig.get_paths()["purelib"]
    (Path(purelib) / "_merge_distill_parent.pth").write_text(f"import site; site.addsitedir({here!r})\n")
    src = root / "merge-distill-units"
    shutil.copytree(PLUGIN, src, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    _run([sys.executable, "-m", "pip", "--python", python, "install", "-q", "--disable-pip-version-check",
          "--no-deps", "--no-build-isolation", "--no-index", str(src)])
    return python


def _python(python: str, code: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([python, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300, **kw)


def test_the_plugin_stays_out_of_this_environment(units_plugin):
    with pytest.raises(metadata.PackageNotFoundError):
        metadata.distribution(DIST)


def test_entry_point_resolves_and_grades(units_plugin):
    result = _python(units_plugin, """
        import json
        from importlib import metadata
        from merge_distill.graders import available_graders, get_grader
        eps = {ep.name: ep.value for ep in metadata.entry_points(group="merge_distill.graders")}
        record = {"task_id": "units/test/0", "answer": "2.5", "unit": "m"}
        grader = get_grader("units")
        completions = ["250/100=2.5 \\\\answer{2.5 m}", "\\\\answer{2.5 meters}", "250*100=25000 \\\\answer{25000 m}",
                       "\\\\answer{2.5 cm}", "no answer"]
        verdicts = grader.grade_many([record] * len(completions), completions)
        print(json.dumps({"available": available_graders(), "ep": eps.get("units"), "name": grader.name,
                          "class": type(grader).__module__ + "." + type(grader).__name__,
                          "verdicts": [v.verdict for v in verdicts]}))
    """)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert "units" in out["available"] and {"math", "code"} <= set(out["available"])
    assert out["ep"] == "md_units.grader:UnitsGrader"
    assert out["name"] == "units" and out["class"] == "md_units.grader.UnitsGrader"
    assert out["verdicts"] == ["pass", "pass", "fail", "fail", "fail"]


@pytest.fixture
def units_recipe(tiny_world, tmp_path, write_recipe):
    """A recipe with one expert, units, whose teacher and student are tiny_world's base."""
    train, _ = make_splits("units", 40, 10, 0)
    prompts = tmp_path / "units.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in train))
    path = write_recipe(tmp_path / "units.yaml", tiny_world, tmp_path / "run")
    recipe = yaml.safe_load(path.read_text())
    recipe["experts"] = [{"name": "units", "teacher": str(tiny_world / "base"), "prompts": str(prompts),
                          "grader": "units"}]
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def test_validate_accepts_a_units_expert(units_plugin, units_recipe):
    result = subprocess.run([units_plugin, "-m", "merge_distill", "validate", str(units_recipe)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "expert units: 40 prompts" in result.stdout and "grader units" in result.stdout


def test_validate_rejects_a_missing_grader_in_one_line(units_recipe):
    recipe = yaml.safe_load(units_recipe.read_text())
    recipe["experts"][0]["grader"] = "units_missing"
    units_recipe.write_text(yaml.safe_dump(recipe))
    result = CliRunner().invoke(app, ["validate", str(units_recipe)])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    err = result.stderr.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in result.output, err
    assert err.startswith("error: experts.0 (units): no grader named 'units_missing'"), err


def test_a_recipe_runs_with_the_plugin_grader(units_plugin, units_recipe, tmp_path):
    """The real CLI in a fresh process: trains the units expert's recipe and evaluates it with the grader
    that only the plugin's entry point provides."""
    _, test = make_splits("units", 40, 12, 0)
    (tmp_path / "units_test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in test))
    (tmp_path / "units_suite.yaml").write_text(yaml.safe_dump({
        "name": "units_test", "domain": "units", "grader": "units", "source": "units_test.jsonl",
        "format": "prompt", "metric": "avg"}))
    recipe = yaml.safe_load(units_recipe.read_text())
    recipe["experts"][0]["eval_suite"] = str(tmp_path / "units_suite.yaml")
    recipe["schedule"].update({"steps": 2})
    recipe["rollout"].update({"prompts_per_step": 4, "max_new_tokens": 16})
    recipe["eval"] = {"samples": 1, "baselines": False, "max_new_tokens": 16}
    units_recipe.write_text(yaml.safe_dump(recipe, sort_keys=False))
    result = subprocess.run([units_plugin, "-m", "merge_distill", "run", str(units_recipe)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    report = json.loads((Path(recipe["output_dir"]) / "report.json").read_text())
    assert report["sandbox_isolation"] is None and "isolation:" not in result.stdout  # no code ran, none isolated
    rows = [r for r in report["rows"] if r["suite"] == "units_test" and r["subset"] is None]
    assert rows and rows[0]["model"] == "student" and rows[0]["n_problems"] == 12
    graded = (Path(recipe["output_dir"]) / "eval" / "generations" / "student__units_test.jsonl").read_text()
    verdicts = {json.loads(l)["verdict"] for l in graded.splitlines()}
    assert verdicts <= {"pass", "fail"} and verdicts  # graded by the plugin, not an error
