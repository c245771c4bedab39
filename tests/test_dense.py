"""Dense G-OPD against its closed form on a toy categorical, and the clipped log-ratio's golden values."""

import math

import pytest
import torch

from merge_distill import dense
from merge_distill import objective as obj

V = 6


def toy(seed=0):
    g = torch.Generator().manual_seed(seed)
    t = torch.log_softmax(2 * torch.randn(1, 1, V, generator=g, dtype=torch.float64), -1)
    r = torch.log_softmax(2 * torch.randn(1, 1, V, generator=g, dtype=torch.float64), -1)
    return t, r


def optimum(t, r, lam):
    return torch.softmax(lam * t + (1 - lam) * r, -1)


@pytest.mark.parametrize("lam", [0.5, 1.0, 1.25, 2.0])
def test_gradient_descent_reaches_the_closed_form_optimum(lam):
    t, r = toy()
    mask = torch.ones(1, 1, dtype=torch.float64)
    z = torch.zeros(1, 1, V, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([z], lr=0.1)
    for _ in range(1500):
        opt.zero_grad()
        dense.dense_gopd_loss(z, t, r, lam, mask).backward()
        opt.step()
    tv = 0.5 * (torch.softmax(z.detach(), -1) - optimum(t, r, lam)).abs().sum()
    assert tv < 1e-3, tv


@pytest.mark.parametrize("lam", [0.5, 1.0, 1.25, 2.0])
def test_loss_is_zero_exactly_at_the_optimum_and_positive_elsewhere(lam):
    t, r = toy(1)
    mask = torch.ones(1, 1, dtype=torch.float64)
    at_opt = dense.dense_gopd_loss(lam * t + (1 - lam) * r, t, r, lam, mask)
    assert at_opt.item() == 0.0
    # shifting all logits by a constant is the same distribution
    assert dense.dense_gopd_loss(lam * t + (1 - lam) * r + 3.0, t, r, lam, mask).abs().item() < 1e-12
    g = torch.Generator().manual_seed(2)
    for _ in range(5):
        z = torch.randn(1, 1, V, generator=g, dtype=torch.float64)
        assert dense.dense_gopd_loss(z, t, r, lam, mask).item() > 0
    # and it is the G-OPD objective up to log Z: KL(pi||pi*) = log Z - E_pi[lam (T - R) - (log pi - R)]
    z = torch.randn(1, 1, V, generator=g, dtype=torch.float64)
    logp = torch.log_softmax(z, -1)
    objective = (logp.exp() * (lam * (t - r) - (logp - r))).sum(-1)
    log_z = torch.logsumexp(lam * t + (1 - lam) * r, -1)
    assert torch.allclose(dense.dense_gopd_loss(z, t, r, lam, mask), (log_z - objective).squeeze())


def test_gradient_is_the_analytic_kl_gradient_and_the_mask_applies():
    g = torch.Generator().manual_seed(3)
    B, L = 2, 3
    t = torch.log_softmax(torch.randn(B, L, V, generator=g, dtype=torch.float64), -1)
    r = torch.log_softmax(torch.randn(B, L, V, generator=g, dtype=torch.float64), -1)
    z = torch.randn(B, L, V, generator=g, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]], dtype=torch.float64)
    lam = torch.tensor([1.5, 0.5], dtype=torch.float64)  # per-sequence reward scales
    dense.dense_gopd_loss(z, t, r, lam, mask).backward()
    logq = torch.log_softmax(lam[:, None, None] * t + (1 - lam[:, None, None]) * r, -1)
    logp = torch.log_softmax(z.detach(), -1)
    p = logp.exp()
    kl = (p * (logp - logq)).sum(-1, keepdim=True)
    analytic = p * (logp - logq - kl) * mask[..., None] / mask.sum()
    assert torch.allclose(z.grad, analytic, atol=1e-12)
    assert torch.all(z.grad[0, 2] == 0) and torch.all(z.grad[1, 1:] == 0)
    # padded positions do not change the value either
    z2 = z.detach().clone()
    z2[0, 2] += 10.0
    assert torch.allclose(dense.dense_gopd_loss(z2, t, r, lam, mask), dense.dense_gopd_loss(z, t, r, lam, mask))


def test_lam_one_needs_no_reference_and_ignores_it():
    t, r = toy(4)
    z = torch.randn(1, 1, V, dtype=torch.float64)
    mask = torch.ones(1, 1)
    without = dense.dense_gopd_loss(z, t, None, 1.0, mask)
    assert torch.allclose(without, dense.dense_gopd_loss(z, t, r, 1.0, mask))
    assert torch.allclose(without, dense.dense_gopd_loss(z, t, r - 7.0, 1.0, mask))
    with pytest.raises(ValueError):
        dense.dense_gopd_loss(z, t, None, 1.25, mask)
    # the target matches objective.gopd_optimum_logprobs
    assert torch.allclose(dense.target_logprobs(t, r, 1.25), obj.gopd_optimum_logprobs(t, r, 1.25))


def test_clip_log_ratio_golden_values():
    t = torch.tensor([[-0.1, -5.0, -2.0]])
    r = torch.tensor([[-3.0, -1.0, -2.5]])
    # T - R = [2.9, -4.0, 0.5]
    assert torch.allclose(dense.clip_log_ratio(t, r, 1.0), torch.tensor([[1.0, -1.0, 0.5]]))
    assert torch.allclose(dense.clip_log_ratio(t, r, 3.0), torch.tensor([[2.9, -3.0, 0.5]]))
    assert torch.allclose(dense.clip_log_ratio(t, r, math.inf), t - r)
    assert torch.equal(dense.clip_log_ratio(t, r, 0.0), torch.zeros(1, 3))
    for bad in (-1.0, float("nan")):
        with pytest.raises(ValueError):
            dense.clip_log_ratio(t, r, bad)
    s = torch.tensor([[-1.0, -2.0, -0.5]], requires_grad=True)
    # S - R = [2, -1, 2]; 1.5 * [1, -1, 0.5] - [2, -1, 2]
    adv = dense.gopd_advantages_clipped(s, t, r, 1.5, 1.0)
    assert torch.allclose(adv, torch.tensor([[-0.5, -0.5, -1.25]]))
    assert not adv.requires_grad
    # no clip (or a wide one) is the plain G-OPD advantage, per-sequence lam included
    lam = torch.tensor([1.0, 2.0])
    s2, t2, r2 = s.detach().repeat(2, 1), t.repeat(2, 1), r.repeat(2, 1)
    plain = obj.gopd_advantages(s2, t2, r2, lam)
    assert torch.allclose(dense.gopd_advantages_clipped(s2, t2, r2, lam, None), plain)
    assert torch.allclose(dense.gopd_advantages_clipped(s2, t2, r2, lam, 10.0), plain)


def _dense_gap(student_path, teacher_path, reference_path, prompts_file, lam, n=64) -> float:
    """Exact token-mean KL(student || pi*) at the positions the student visits on held-out prompts."""
    import json
    from pathlib import Path

    from merge_distill.data import render_prompt
    from merge_distill.models import load_model, load_tokenizer
    from merge_distill.sampling import row_seeds, sample

    tok = load_tokenizer(student_path)
    student, teacher, ref = (load_model(p) for p in (student_path, teacher_path, reference_path))
    ids = [render_prompt(tok, json.loads(l)["prompt"]) for l in Path(prompts_file).read_text().splitlines()[:n]]
    ro = sample(student, ids, max_new_tokens=40, temperature=1.0, eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id, seeds=row_seeds(0, len(ids)))
    with torch.no_grad():
        s, t, r = (dense.response_vocab_logprobs(m, ro) for m in (student, teacher, ref))
    return float(dense.dense_gopd_loss(s, t, r, lam, ro.response_mask))


@pytest.mark.slow
def test_dense_training_closes_the_gap_to_the_closed_form(tiny_world, tmp_path, write_recipe):
    from merge_distill.build import train_recipe
    from merge_distill.validate import load_recipe

    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", tiny_world, tmp_path / "run", steps=12, lr=5e-3,
                                      prompts_per_step=32), ["method.objective=dense"])
    final = train_recipe(recipe)
    for domain in ("math", "code"):
        args = (tiny_world / f"{domain}_teacher", tiny_world / "base", tiny_world / f"{domain}_test.jsonl", 1.25)
        before, after = _dense_gap(tiny_world / "base", *args), _dense_gap(final, *args)
        assert after < 0.8 * before, f"{domain}: KL(student || pi*) {before:.3f} -> {after:.3f}"


def test_dense_needs_gopd_and_no_clip(tiny_world, tmp_path, write_recipe):
    from merge_distill.errors import UserError
    from merge_distill.validate import load_recipe

    path = write_recipe(tmp_path / "r.yaml", tiny_world, tmp_path / "run")
    with pytest.raises(UserError, match="dense"):
        load_recipe(path, ["method.objective=dense", "method=sft"])
    with pytest.raises(UserError, match="log_ratio_clip"):
        load_recipe(path, ["method.objective=dense", "method.log_ratio_clip=1.0"])
