"""One training step against a hand computation, with frozen scorers stubbed by distinguishable tables.

Everything the trainer computes is recomputed here independently, row by row, from the rollouts it sampled:
which domain a row belongs to (from its prompt text), which teacher and reference score it, the response mask
(every token up to and including the first EOS), pi_old (a plain full-logits forward of the initial student at
the rollout temperature), the advantage `lam_d (T - R) - (S - R)`, the token-mean loss over the real tokens of
the whole batch, and its gradient. A crossed wire anywhere (another domain's teacher, EOS out of the mask,
padding in the denominator, a term scaled, teachers scored at the wrong temperature) changes the loss or the
gradient.
"""

import json
import math
import shutil
import zlib
from pathlib import Path

import pytest
import torch
from merge_distill.data import render_prompt
from merge_distill.errors import TrainingDiverged
from merge_distill.frozen import ModelCache
from merge_distill.models import load_model, load_tokenizer
from merge_distill.build import train_recipe
from merge_distill.validate import load_recipe

LAM = {"math": 1.25, "code": 1.5}


def table_logprobs(path, rollouts, temperature):
    """A frozen model's stand-in: a fixed per-token table, one per model folder name, divided by tau."""
    g = torch.Generator().manual_seed(zlib.crc32(Path(path).name.encode()))
    table = -4 * torch.rand(512, generator=g, dtype=torch.float64).float()
    return table[rollouts.response_ids] / temperature * rollouts.response_mask


class TableScorer(ModelCache):
    """Frozen models whose scores are `table_logprobs`, passed to the run (`build_run(frozen=...)`); records
    (model name, rollouts, temperature) per call."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def score(self, path, rollouts, *, temperature=1.0):
        self.calls.append((Path(path).name, rollouts, temperature))
        return table_logprobs(path, rollouts, temperature)


class ScoresChanged(ModelCache):
    """The real frozen models with `change(path, log-probs)` applied to what they score."""

    def __init__(self, change):
        super().__init__()
        self.change = change

    def score(self, path, rollouts, **kw):
        return self.change(path, super().score(path, rollouts, **kw))


def domain_of_prompts(world: Path, tok) -> dict[tuple, str]:
    out = {}
    for domain in ("math", "code"):
        for line in (world / f"{domain}.jsonl").read_text().splitlines():
            out[tuple(render_prompt(tok, json.loads(line)["prompt"]))] = domain
    return out


def real_tokens(response_ids: torch.Tensor, eos: int, pad: int) -> list[int]:
    """A response's tokens up to and including its first EOS (all of them when it never ends)."""
    ids = response_ids.tolist()
    if eos in ids:
        return ids[: ids.index(eos) + 1]
    while ids and ids[-1] == pad:  # a truncated row is as long as the batch's longest
        ids.pop()
    return ids


def recipe_for(world: Path, tmp_path: Path, tau: float, write_recipe, **train_overrides):
    code_reference = tmp_path / "code_reference"  # a reference of its own, told apart by its folder name
    if not code_reference.exists():
        shutil.copytree(world / "base", code_reference)
    path = write_recipe(tmp_path / "r.yaml", world, tmp_path / "run", steps=1, prompts_per_step=16,
                        max_new_tokens=12, lr=1e-3, temperature=tau, grad_clip=None, micro_batch_size=5,
                        **train_overrides)
    return load_recipe(path, ["experts.math.weight=3", f"experts.math.reward_scale={LAM['math']}",
                              f"experts.code.reward_scale={LAM['code']}", f"experts.code.reference={code_reference}"])


@pytest.mark.parametrize("tau", [1.0, 0.7])
def test_one_step_matches_a_hand_computation(tiny_world, tmp_path, monkeypatch, tau, write_recipe):
    recipe = recipe_for(tiny_world, tmp_path, tau, write_recipe=write_recipe)
    grads = []
    original_step = torch.optim.AdamW.step

    def recording_step(self, *args, **kwargs):
        grads.append([p.grad.detach().clone() for group in self.param_groups for p in group["params"]])
        return original_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", recording_step)
    scorer = TableScorer()
    train_recipe(recipe, frozen=scorer)
    stubbed = scorer.calls

    tok = load_tokenizer(tiny_world / "base")
    eos, pad = tok.eos_token_id, tok.pad_token_id
    domains = domain_of_prompts(tiny_world, tok)
    teacher_of = {"math": "math_teacher", "code": "code_teacher"}
    reference_of = {"math": "base", "code": "code_reference"}

    # routing: each teacher and each reference scored exactly its own domain's rows, at the rollout temperature
    rows = []  # (prompt ids, response ids, sampler log-probs, domain), one per sampled row
    for name, ro, temperature in stubbed:
        assert temperature == tau, f"{name} scored at temperature {temperature}, the student sampled at {tau}"
        for b in range(ro.prompt_ids.shape[0]):
            prompt = tuple(ro.prompt_ids[b][ro.prompt_mask[b].bool()].tolist())
            domain = domains[prompt]
            assert name in (teacher_of[domain], reference_of[domain]), f"{name} scored a {domain} prompt"
            if name == teacher_of[domain]:
                rows.append((prompt, ro.response_ids[b], ro.sampler_logprobs[b], domain))
    assert len(rows) == 16
    n_math = sum(d == "math" for *_, d in rows)
    scored = sorted(name for name, ro, _ in stubbed for _ in range(ro.prompt_ids.shape[0]))
    assert scored == sorted(["math_teacher"] * n_math + ["base"] * n_math + ["code_teacher"] * (16 - n_math)
                            + ["code_reference"] * (16 - n_math))
    assert n_math > 16 - n_math > 0  # weights 3:1: a swap of the two domains' teachers changes the counts

    # the hand computation, row by row, with a plain forward of the initial student
    student = load_model(tiny_world / "base", trainable=True)
    n_tokens = 0
    terms = []
    ended = 0
    for prompt, response_ids, sampler_lp, domain in rows:
        response = real_tokens(response_ids, eos, pad)
        ended += response[-1] == eos
        ids = torch.tensor([list(prompt) + response])
        logits = student(input_ids=ids).logits[0, len(prompt) - 1:-1].float() / tau
        lp = torch.log_softmax(logits, -1).gather(-1, torch.tensor(response)[:, None]).squeeze(-1)
        n = len(response)
        # the sampler recorded the log-probs of the distribution it sampled from (logits / tau), EOS included
        torch.testing.assert_close(sampler_lp[:n], lp.detach(), rtol=1e-4, atol=1e-5)
        assert bool((sampler_lp[n:] == 0).all())
        one = type("R", (), {"response_ids": torch.tensor([response]), "response_mask": torch.ones(1, n)})
        t = table_logprobs(teacher_of[domain], one, tau)[0]
        r = table_logprobs(reference_of[domain], one, tau)[0]
        s = lp.detach()
        advantage = LAM[domain] * (t - r) - (s - r)
        terms.append((advantage * torch.exp(lp - lp.detach())).sum())
        n_tokens += n
    assert ended > 0, "no sampled row ended in EOS: the test would not cover EOS"
    assert n_tokens < 16 * 12, "every row is full length: the test would not cover padding"
    loss = -torch.stack(terms).sum() / n_tokens
    loss.backward()

    metrics = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert math.isclose(metrics["loss"], float(loss.detach()), rel_tol=1e-4, abs_tol=1e-6)
    (got,) = grads
    for g, p in zip(got, student.parameters()):
        torch.testing.assert_close(g, p.grad, rtol=1e-3, atol=1e-6)


@pytest.mark.slow
def test_a_non_finite_step_is_skipped(tiny_world, tmp_path, monkeypatch, write_recipe):
    """A NaN log-prob from a teacher on step 2: that step leaves weights and optimizer state alone, is counted
    in metrics.jsonl, and training goes on from the weights of step 1."""
    calls = {"n": 0}

    def second_code_teacher_score_nan(path, out):
        if Path(path).name == "code_teacher":
            calls["n"] += 1
            if calls["n"] == 2:
                out = out.clone()
                out[0, 0] = float("nan")
        return out

    path = write_recipe(tmp_path / "r.yaml", tiny_world, tmp_path / "run", steps=4, prompts_per_step=8,
                        max_new_tokens=8, checkpoint_every=1, keep_checkpoints=10)
    train_recipe(load_recipe(path), frozen=ScoresChanged(second_code_teacher_score_nan))
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped"] for r in rows] == [0, 1, 0, 0]
    assert [r["skipped_steps"] for r in rows] == [0, 1, 1, 1]
    from merge_distill.checkpoint import read_checkpoint

    state = {k: read_checkpoint(tmp_path / "run" / "checkpoints" / f"step-{k}") for k in (1, 2, 3)}
    ckpt = {k: state[k]["model"] for k in state}
    assert all(torch.equal(ckpt[1][k], ckpt[2][k]) for k in ckpt[1])
    assert any(not torch.equal(ckpt[2][k], ckpt[3][k]) for k in ckpt[2])
    assert all(bool(torch.isfinite(v).all()) for v in ckpt[3].values())
    assert state[3]["trainer"]["skipped_steps"] == 1


@pytest.mark.slow
def test_consecutive_non_finite_steps_stop_the_run(tiny_world, tmp_path, monkeypatch, write_recipe):
    path = write_recipe(tmp_path / "r.yaml", tiny_world, tmp_path / "run", steps=5, prompts_per_step=4,
                        max_new_tokens=6, max_consecutive_skips=2)
    with pytest.raises(TrainingDiverged) as e:
        train_recipe(load_recipe(path), frozen=ScoresChanged(lambda path, out: torch.full_like(out, float("nan"))))
    assert "stopped at step 2" in str(e.value) and len(str(e.value).splitlines()) == 1
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped"] for r in rows] == [1, 1]
    assert not (tmp_path / "run" / "final").exists()


def test_progress_line_names_each_domains_metric():
    from merge_distill.methods import method_of
    from merge_distill.recipe import MethodSpec, Recipe
    from merge_distill.train import describe

    def line(r, m):
        return describe(method_of(r), r, m)

    experts = [{"name": "math", "teacher": "t", "prompts": "p"}, {"name": "code_reverse", "teacher": "t", "prompts": "p"}]
    recipe = Recipe.model_validate({"student": "s", "output_dir": "o", "experts": experts})
    assert line(recipe, {"math/reverse_kl_teacher": 0.1234, "code_reverse/reverse_kl_teacher": 0.5, "loss": 1.0}) == \
        "train (gopd) math KL to teacher 0.123, code_reverse KL to teacher 0.500"
    grpo = recipe.model_copy(update={"method": MethodSpec(name="grpo")})
    assert line(grpo, {"math/accuracy": 0.25}) == "train (grpo) math accuracy 0.250"
    sft = recipe.model_copy(update={"method": MethodSpec(name="sft")})
    assert line(sft, {"loss": 2.0}) == "train (sft) loss 2.000"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_grpo_trains_on_cuda(tiny_world, tmp_path, write_recipe, isolation):
    """Rewards are graded on the CPU and the advantages live on the rollouts' device."""
    path = write_recipe(tmp_path / "r.yaml", tiny_world, tmp_path / "run", steps=2, prompts_per_step=4,
                        max_new_tokens=12, rollouts_per_prompt=4)
    final = train_recipe(load_recipe(path, ["method=grpo", "device=cuda", f"isolation={isolation}"]))
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(0 <= r["math/accuracy"] <= 1 for r in rows)
    assert (final / "model.safetensors").is_file()
