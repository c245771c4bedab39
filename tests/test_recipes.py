"""The shipped recipes: the smoke recipe end to end (zoo, distillation, evaluation, report), and every
recipe in recipes/ validates."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from merge_distill.errors import UserError
from merge_distill.toyworld.zoo import PRESETS, Zoo

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args, env=None, cwd=None):
    return subprocess.run([sys.executable, "-m", "merge_distill", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, cwd=cwd, timeout=600)


@pytest.mark.slow
def test_smoke_recipe_end_to_end(tmp_path, isolation):
    env = {"MERGE_DISTILL_CACHE": str(tmp_path / "cache")}
    out = tmp_path / "run"
    proc = run_cli("run", str(ROOT / "recipes" / "smoke.yaml"), "--set", f"output_dir={out}", "--isolation", isolation,
                   env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    rows = report["rows"]
    fields = {"model", "suite", "domain", "metric", "k", "score", "stderr", "n_problems", "n_samples"}
    assert all(fields <= set(r) for r in rows)
    headline = {(r["model"], r["suite"]) for r in rows if r["subset"] is None}
    for model in ("base", "math", "code", "student"):
        assert (model, "zoo-math") in headline and (model, "zoo-code") in headline
    # sharpened teachers on their own domain only
    assert ("math@greedy", "zoo-math") in headline and ("math@greedy", "zoo-code") not in headline
    assert ("code@greedy", "zoo-code") in headline and ("code@greedy", "zoo-math") not in headline
    assert all(0 <= r["score"] <= 1 for r in rows)
    assert all(r["n_problems"] == 64 for r in rows if r["subset"] is None)
    assert all(0 < r["n_problems"] < 64 for r in rows if r["subset"] is not None)
    assert {r["subset"] for r in rows} >= {None, "misconception", "plain"}
    assert report["sandbox_isolation"] == isolation  # the level the code suites ran under
    assert f"isolation: {isolation}" in proc.stdout and f"_isolation: {isolation}" in (out / "report.md").read_text()
    for name in ("report.md", "report.png", "training_curves.png", "metrics.jsonl", "manifest.json"):
        assert (out / name).is_file(), name
    assert (out / "report.png").read_bytes()[:4] == b"\x89PNG"
    assert load_file(out / "final" / "model.safetensors")
    # the zoo is cached: a second run reuses it (and a finished run is not silently overwritten)
    again = run_cli("run", str(ROOT / "recipes" / "smoke.yaml"), "--no-eval", "--set", f"output_dir={tmp_path / 'run2'}",
                    "--isolation", isolation, env=env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "zoo: built" not in again.stdout
    clash = run_cli("run", str(ROOT / "recipes" / "smoke.yaml"), "--no-eval", "--set", f"output_dir={out}",
                    "--isolation", isolation, env=env)
    assert clash.returncode == 1 and "already holds a run" in clash.stderr

    # a lam sweep on the same zoo: one student per value, sweep.json with a point per value and suite, the plot
    sweep_dir = tmp_path / "sweep"
    proc = run_cli("sweep", str(ROOT / "recipes" / "smoke.yaml"), "--set", "reward_scale=1.0,1.5",
                   "--set", "schedule.steps=2", "--set", f"output_dir={sweep_dir}", "--isolation", isolation, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads((sweep_dir / "sweep" / "sweep.json").read_text())
    assert data["swept"] == ["reward_scale"]
    points = {(p["reward_scale"], p["suite"]) for p in data["points"]}
    assert points == {(lam, s) for lam in (1.0, 1.5) for s in ("zoo-math", "zoo-code")}
    assert all(p["n_problems"] == 64 and p["response_length"] > 0 and 0 <= p["score"] <= 1 for p in data["points"])
    assert {b["model"] for b in data["baselines"]} == {"base", "math", "code"}
    # every trained model has its card: the run's (with its evaluation) and each sweep point's
    assert "model-index:" in (out / "final" / "README.md").read_text()
    for lam in ("1.0", "1.5"):
        card = (sweep_dir / "sweep" / f"reward_scale={lam}" / "final" / "README.md").read_text()
        assert card.startswith("---\nbase_model: base\n") and f"| math | {'OPD' if lam == '1.0' else 'ExOPD'} |" in card
    # each point minus each baseline, paired on its suite: on the same problems the mean difference is the
    # difference of the scores
    base_score = {(b["model"], b["suite"]): b["score"] for b in data["baselines"] if b["k"] == 1 or b["metric"] == "avg"}
    for p in data["points"]:
        assert set(p["minus"]) == {"base", "math", "code"}
        for m, d in p["minus"].items():
            if (m, p["suite"]) in base_score and p["metric"] == "avg":
                assert d["diff"] == pytest.approx(p["score"] - base_score[(m, p["suite"])], abs=1e-9)
                assert d["n_problems"] == 64 and d["stderr"] >= 0
    assert (sweep_dir / "sweep" / "sweep.png").read_bytes()[:4] == b"\x89PNG"
    assert (sweep_dir / "sweep" / "reward_scale=1.5" / "final" / "model.safetensors").is_file()


@pytest.mark.slow
def test_zoo_is_deterministic(tmp_path):
    a = Zoo("smoke", 3, str(tmp_path / "a"), log=lambda *_: None).ensure(["base"])
    b = Zoo("smoke", 3, str(tmp_path / "b"), log=lambda *_: None).ensure(["base"])
    assert (a / "data" / "math_test.jsonl").read_text() == (b / "data" / "math_test.jsonl").read_text()
    wa, wb = load_file(a / "base" / "model.safetensors"), load_file(b / "base" / "model.safetensors")
    assert all((wa[k] == wb[k]).all() for k in wa)
    # disjoint held-out problems
    train = {json.loads(l)["prompt"] for l in (a / "data" / "code_train.jsonl").read_text().splitlines()}
    test = {json.loads(l)["prompt"] for l in (a / "data" / "code_test.jsonl").read_text().splitlines()}
    assert not train & test


@pytest.mark.slow
@pytest.mark.parametrize("recipe", sorted(p.name for p in (ROOT / "recipes").glob("*.yaml")))
def test_shipped_recipes_validate(recipe, tmp_path):
    from merge_distill.graders import available_graders

    proc = run_cli("validate", str(ROOT / "recipes" / recipe), env={"MERGE_DISTILL_CACHE": str(tmp_path)}, cwd=tmp_path)
    if recipe.startswith("qwen3_"):
        # paper scale: the user supplies weights and prompts (tests/test_validate_missing.py checks the listing)
        assert proc.returncode == 1 and "not found" in proc.stderr and "Traceback" not in proc.stderr
        return
    if recipe == "three_experts.yaml" and "units" not in available_graders():
        # its third grader comes from the example plugin (tests/test_plugin.py installs it and checks this recipe)
        assert proc.returncode == 1 and "no grader named 'units'" in proc.stderr
        return
    assert proc.returncode == 0, proc.stderr
    assert "ok" in proc.stdout and "not built yet" in proc.stdout


@pytest.mark.slow
def test_large_expert_keeps_its_rl_checkpoints_as_members(tmp_path, monkeypatch):
    """`large_math_expert@N`: the large expert's GRPO after N of its steps, saved by the same run (a quarter,
    half and three quarters): weaker teachers of one lineage, each a model folder transformers loads."""
    from dataclasses import replace

    from transformers import AutoModelForCausalLM

    from merge_distill.errors import UserError
    from merge_distill.toyworld import zoo as zoo_module

    monkeypatch.setitem(zoo_module.PRESETS, "tiny4", replace(zoo_module.PRESETS["smoke"], domains=("math",),
                                                             grpo_steps=4))
    z = zoo_module.Zoo("tiny4", 0, str(tmp_path / "z"), log=lambda *_: None)
    assert z.graders_to_build(["large_math_expert@2"]) == {"math"}
    z.ensure(["large_math_expert@2"])
    assert sorted(p.name for p in z.dir.glob("large_math_expert*")) == [
        "large_math_expert", "large_math_expert@1", "large_math_expert@2", "large_math_expert@3"]
    # (which step each holds is the trainer's checkpointing, tested with resumption; a smoke-sized expert
    # gets no reward to move on, so its weights cannot tell the steps apart here)
    AutoModelForCausalLM.from_pretrained(z.path("large_math_expert@2"))
    assert not (z.path("large_math_expert@2") / "trainer_state.pt").exists()
    with pytest.raises(UserError, match="no member 'large_math_expert@7'.*large_math_expert@1, large_math_expert@2"):
        z.ensure(["large_math_expert@7"])


def test_a_zoo_built_by_another_version_of_its_preset_is_refused_in_one_line(tmp_path):
    """The smoke preset's heads changed (2 of 16 dimensions -> 1 of 32, for vLLM's CPU attention): a folder built by
    the old one is not reused silently, whatever members it has; a record that predates a key is not compared."""
    from dataclasses import asdict

    old = json.loads(json.dumps(asdict(PRESETS["smoke"])))
    old["size"]["heads"] = 2
    del old["check_rate"]  # a key this record predates
    (tmp_path / "zoo.json").write_text(json.dumps({"preset": "smoke", "seed": 0, "config": old, "stages": {}}))
    with pytest.raises(UserError, match=r"^zoo 'smoke' in .* was built by another version of the preset \(size: "
                                        r"\{'hidden': 32, 'layers': 1, 'heads': 2\} then, \{'hidden': 32, 'layers': 1, "
                                        r"'heads': 1\} now\); remove that folder") as e:
        Zoo("smoke", 0, str(tmp_path), log=lambda *_: None).ensure(["data"])
    assert "\n" not in str(e.value) and not (tmp_path / "data").exists()
    old["size"]["heads"] = 1
    (tmp_path / "zoo.json").write_text(json.dumps({"preset": "smoke", "seed": 0, "config": old, "stages": {}}))
    Zoo("smoke", 0, str(tmp_path), log=lambda *_: None).ensure(["data"])  # the same configuration: built on
    assert (tmp_path / "data" / "math_train.jsonl").is_file()
