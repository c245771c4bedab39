"""End to end on tiny models: distillation pulls the student toward each domain's teacher, and an
interrupted run resumed from its checkpoint ends with the same weights as an uninterrupted one."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from merge_distill.data import render_prompt
from merge_distill.models import load_model, load_tokenizer
from merge_distill.sampling import sample
from merge_distill.scoring import response_logprobs
from merge_distill.build import train_recipe
from merge_distill.validate import load_recipe


def reverse_kl(student_path, teacher_path, prompts_file, n=96, seed=0) -> float:
    """Monte-Carlo KL(student || teacher) per sequence on the domain's prompts (summed over tokens)."""
    tok = load_tokenizer(student_path)
    student, teacher = load_model(student_path), load_model(teacher_path)
    records = [json.loads(l) for l in Path(prompts_file).read_text().splitlines()][:n]
    ids = [render_prompt(tok, r["prompt"]) for r in records]
    ro = sample(student, ids, max_new_tokens=40, temperature=1.0, eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        s, t = response_logprobs(student, ro), response_logprobs(teacher, ro)
    return float(((s - t) * ro.response_mask).sum(-1).mean())


@pytest.mark.slow
def test_reverse_kl_to_each_teacher_falls_on_its_domain(tiny_world, tmp_path, write_recipe):
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", tiny_world, tmp_path / "run", steps=12, lr=5e-3,
                                      prompts_per_step=32))
    final = train_recipe(recipe)
    for domain in ("math", "code"):
        teacher, prompts = tiny_world / f"{domain}_teacher", tiny_world / f"{domain}_test.jsonl"
        before = reverse_kl(tiny_world / "base", teacher, prompts)
        after = reverse_kl(final, teacher, prompts)
        assert after < 0.8 * before, f"{domain}: KL(student||teacher) {before:.3f} -> {after:.3f}"
    rows = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 13))
    for key in ("math/reward", "math/reverse_kl_teacher", "math/kl_reference", "code/truncation_rate",
                "importance_ratio/max", "time/sample_s", "time/score_s", "time/update_s"):
        assert key in rows[0]
    # the importance ratio between sampler and trainer is 1 up to float error in this backend
    assert all(abs(r["importance_ratio/max"] - 1) < 1e-3 for r in rows)
    # a checkpoint transformers loads as is
    from transformers import AutoModelForCausalLM

    assert isinstance(AutoModelForCausalLM.from_pretrained(final), torch.nn.Module)


def test_only_a_domains_teacher_scores_its_prompts(tiny_world, tmp_path, monkeypatch, write_recipe):
    from merge_distill.frozen import ModelCache

    seen = []

    class Spy(ModelCache):
        def score(self, path, rollouts, **kw):
            seen.append((Path(path).name, rollouts.prompt_ids.shape[0]))
            return super().score(path, rollouts, **kw)

    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", tiny_world, tmp_path / "run", steps=1,
                                      prompts_per_step=12), ["experts.code.reward_scale=1.0"])
    train_recipe(recipe, frozen=Spy())
    # math (lam 1.25) needs teacher and reference (the student's initial weights); code (lam 1) only its teacher
    assert sorted(seen) == sorted([("math_teacher", 6), ("base", 6), ("code_teacher", 6)])


def test_log_ratio_clip_bounds_the_reward(tiny_world, tmp_path, monkeypatch, write_recipe):
    """With a clip c, lam*(log T - log R) is bounded by lam*c, so |reward + (S - R)| <= lam*c per token."""
    from merge_distill.methods import gopd as gopd_method

    seen = []
    original = gopd_method.gopd_advantages_clipped

    def spy(s, t, r, lam, clip):
        out = original(s, t, r, lam, clip)
        seen.append(float((out + (s - r)).abs().max()) / lam)
        return out

    monkeypatch.setattr(gopd_method, "gopd_advantages_clipped", spy)
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", tiny_world, tmp_path / "run", steps=1, prompts_per_step=8),
                         ["method.log_ratio_clip=0.05", "experts.code.reward_scale=1.0"])
    train_recipe(recipe)
    assert len(seen) == 2  # both domains, lam 1 included: a clipped log-ratio no longer cancels R
    assert all(v <= 0.05 + 1e-6 for v in seen)


def _run_cli(*args, cwd=None):
    return subprocess.Popen([sys.executable, "-m", "merge_distill", *args], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_weights(tiny_world, tmp_path, write_recipe):
    steps = dict(steps=8, checkpoint_every=2, prompts_per_step=8, max_new_tokens=24)
    full = write_recipe(tmp_path / "full.yaml", tiny_world, tmp_path / "full", **steps)
    cut = write_recipe(tmp_path / "cut.yaml", tiny_world, tmp_path / "cut", **steps)
    train_recipe(load_recipe(full))

    proc = _run_cli("run", str(cut), "--no-eval")
    ckpt = tmp_path / "cut" / "checkpoints" / "step-2" / "checksums.json"  # there once renamed into place
    deadline = time.time() + 120
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert ckpt.exists(), proc.stderr.read()
    assert not (tmp_path / "cut" / "final").exists(), "the run finished before it could be killed"

    resumed = _run_cli("run", str(cut), "--no-eval", "--resume")
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    a = load_file(tmp_path / "full" / "final" / "model.safetensors")
    b = load_file(tmp_path / "cut" / "final" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    steps_logged = [json.loads(l)["step"] for l in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert steps_logged == list(range(1, 9))


@pytest.mark.slow
def test_resume_with_other_teachers_is_an_error(tiny_world, tmp_path, write_recipe):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_world, tmp_path / "run", steps=2, checkpoint_every=1,
                          prompts_per_step=4, max_new_tokens=8)
    train_recipe(load_recipe(recipe))
    proc = _run_cli("run", str(recipe), "--no-eval", "--resume", "--set", "reward_scale=1.5")
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 1
    assert "experts differ from the run being resumed" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


@pytest.mark.slow
def test_offloaded_frozen_models_give_the_same_run(tiny_world, tmp_path, write_recipe):
    """placement.offload keeps teachers and references on the CPU between uses: same metrics, same weights."""
    from merge_distill.frozen import ModelCache

    class Spy(ModelCache):
        def score(self, path, rollouts, **kw):
            out = super().score(path, rollouts, **kw)
            self.seen.append({p.device.type for m in self._models.values() for p in m.parameters()})
            return out

    runs = {}
    for name, sets in (("plain", []), ("offload", ["placement.offload=true", "placement.frozen_device=cpu"])):
        recipe = load_recipe(write_recipe(tmp_path / f"{name}.yaml", tiny_world, tmp_path / name, steps=2,
                                          prompts_per_step=8, max_new_tokens=16), sets)
        frozen = Spy(device="cpu", offload=recipe.placement.offload)
        frozen.seen = []
        runs[name] = load_file(train_recipe(recipe, frozen=frozen) / "model.safetensors")
        assert frozen.seen and all(s == {"cpu"} for s in frozen.seen)
    assert all(torch.equal(runs["plain"][k], runs["offload"][k]) for k in runs["plain"])


@pytest.mark.slow
def test_periodic_evaluation_scores_the_live_student(tiny_world, tmp_path, write_recipe):
    """schedule.eval_every: the run's own sampler generates for the held-out suite every N steps (not after the
    last, which the final evaluation covers), and the score lands in metrics.jsonl."""
    import yaml
    from typer.testing import CliRunner

    from merge_distill.cli import app

    path = write_recipe(tmp_path / "r.yaml", tiny_world, tmp_path / "run", steps=3, prompts_per_step=4,
                        max_new_tokens=8, eval_every=1)
    recipe = yaml.safe_load(path.read_text())
    recipe["eval"] = {"suites": [str(tiny_world / "math_test.jsonl")], "max_problems": 6, "max_new_tokens": 8}
    path.write_text(yaml.safe_dump(recipe))
    result = CliRunner().invoke(app, ["run", str(path), "--no-eval"])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [{k: v for k, v in r.items() if k.startswith("eval/")} for r in rows]
    assert [len(e) for e in evals] == [1, 1, 0]
    assert all(0 <= v <= 1 for e in evals for v in e.values())
    generated = sorted(p.parent.parent.name for p in (tmp_path / "run" / "evals").glob("step-*/generations/*.jsonl"))
    assert generated == ["step-1", "step-2"]
