"""The objective against closed forms: golden values, R cancelling at lam = 1, and convergence to T^lam R^(1-lam)."""

import math

import pytest
import torch

from merge_distill import objective as obj


def test_gopd_advantages_golden_values():
    s = torch.tensor([[-1.0, -2.0]])
    t = torch.tensor([[-0.5, -3.0]])
    r = torch.tensor([[-1.5, -1.0]])
    # lam*(T-R) - (S-R)
    expected = torch.tensor([[1.25 * 1.0 - 0.5, 1.25 * -2.0 - (-1.0)]])
    assert torch.allclose(obj.gopd_advantages(s, t, r, 1.25), expected)
    # per-sequence reward scales
    s2, t2, r2 = s.repeat(2, 1), t.repeat(2, 1), r.repeat(2, 1)
    out = obj.gopd_advantages(s2, t2, r2, torch.tensor([1.0, 2.0]))
    assert torch.allclose(out[0], t[0] - s[0])
    assert torch.allclose(out[1], 2 * (t[0] - r[0]) - (s[0] - r[0]))


def test_lam_one_ignores_the_reference():
    g = torch.Generator().manual_seed(0)
    s, t = -torch.rand(3, 7, generator=g), -torch.rand(3, 7, generator=g)
    without = obj.gopd_advantages(s, t, None, 1.0)
    for _ in range(3):
        r = -5 * torch.rand(3, 7, generator=g)
        assert torch.allclose(obj.gopd_advantages(s, t, r, 1.0), without, atol=1e-6)
    assert torch.allclose(without, t - s)
    with pytest.raises(ValueError):
        obj.gopd_advantages(s, t, None, 1.25)


def test_advantages_are_detached():
    s = torch.tensor([[-1.0]], requires_grad=True)
    assert not obj.gopd_advantages(s, torch.tensor([[-2.0]]), torch.tensor([[-1.0]]), 1.5).requires_grad


def test_grpo_advantages_group_normalised():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0])
    adv = obj.grpo_advantages(rewards, 4)
    first = rewards[:4] - 0.25
    assert torch.allclose(adv[:4], first / (rewards[:4].std() + 1e-6))
    assert torch.allclose(adv[4:], torch.zeros(4))  # all-correct groups carry no signal


def test_policy_gradient_loss_value_and_gradient():
    logp = torch.tensor([[-1.0, -2.0, -0.5]], requires_grad=True)
    sampler = torch.tensor([[-1.0, -2.0, -0.5]])
    adv = torch.tensor([[1.0, -2.0, 3.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    loss = obj.policy_gradient_loss(logp, sampler, adv, mask)
    assert math.isclose(float(loss.detach()), -(1.0 - 2.0) / 2)  # ratio 1, token mean over real tokens
    loss.backward()
    assert torch.allclose(logp.grad, torch.tensor([[-0.5, 1.0, 0.0]]))  # -A/n, padding gets nothing


def test_importance_ratio_truncated_in_value_and_gradient():
    logp = torch.tensor([[0.0, 0.0]], requires_grad=True)
    sampler = torch.tensor([[-math.log(10.0), -math.log(2.0)]])  # ratios 10 and 2
    adv, mask = torch.ones(1, 2), torch.ones(1, 2)
    loss = obj.policy_gradient_loss(logp, sampler, adv, mask, truncation=5.0)
    assert math.isclose(float(loss.detach()), -(5.0 + 2.0) / 2, rel_tol=1e-5)
    loss.backward()
    assert torch.allclose(logp.grad, torch.tensor([[-2.5, -1.0]]))
    untruncated = obj.policy_gradient_loss(logp.detach(), sampler, adv, mask, truncation=None)
    assert math.isclose(float(untruncated), -(10.0 + 2.0) / 2, rel_tol=1e-5)


def test_kl_estimators_unbiased_on_samples():
    g = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(6, generator=g), 0)
    q = torch.softmax(torch.randn(6, generator=g), 0)
    exact = float((p * (p.log() - q.log())).sum())
    y = torch.multinomial(p, 200_000, replacement=True, generator=g)
    for est in (obj.kl_k1, obj.kl_k3):
        assert abs(float(est(p.log()[y], q.log()[y]).mean()) - exact) < 0.01
    assert float(obj.kl_k3(p.log()[y], q.log()[y]).min()) >= 0


@pytest.mark.slow
@pytest.mark.parametrize("lam", [0.5, 1.0, 1.25, 2.0])
def test_free_policy_converges_to_closed_form(lam):
    """A free categorical policy trained on its own samples with the G-OPD advantage and loss
    reaches pi* ∝ T^lam R^(1-lam)."""
    g = torch.Generator().manual_seed(1)
    vocab = 6
    log_t = torch.log_softmax(torch.randn(vocab, generator=g), 0)
    log_r = torch.log_softmax(torch.randn(vocab, generator=g), 0)
    target = obj.gopd_optimum_logprobs(log_t, log_r, lam).exp()
    logits = torch.zeros(vocab, requires_grad=True)
    opt = torch.optim.Adam([logits], lr=0.05)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 if s < 300 else 0.2)
    for _ in range(600):
        logp_all = torch.log_softmax(logits, 0)
        y = torch.multinomial(logp_all.detach().exp(), 4096, replacement=True, generator=g)
        logp = logp_all[y][None]
        sampler = logp.detach()
        adv = obj.gopd_advantages(sampler, log_t[y][None], None if lam == 1.0 else log_r[y][None], lam)
        loss = obj.policy_gradient_loss(logp, sampler, adv, torch.ones_like(logp))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    pi = torch.softmax(logits.detach(), 0)
    tv = 0.5 * float((pi - target).abs().sum())
    assert tv < 0.02, f"lam={lam}: total variation {tv:.4f} from T^lam R^(1-lam)"
    if lam != 1.0:  # and it is not simply the teacher
        assert 0.5 * float((pi - log_t.exp()).abs().sum()) > 2 * tv


def _train_at_temperature(z_teacher, z_reference, lam, tau, *, score_at_tau=True, steps=1000, lr=0.2):
    """A free policy (its logits z) trained by the G-OPD estimator's exact expected gradient: it samples from
    softmax(z / tau), and teacher and reference score the sampled token at tau (or at 1: the old convention).
    The expectation over the sampled token is exact: every token is a row, weighted by its probability."""
    z = torch.zeros_like(z_teacher, requires_grad=True)
    opt = torch.optim.Adam([z], lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 if step < steps // 2 else 0.1)
    score_tau = tau if score_at_tau else 1.0
    log_t = torch.log_softmax(z_teacher / score_tau, 0)
    log_r = torch.log_softmax(z_reference / score_tau, 0)
    for _ in range(steps):
        logp = torch.log_softmax(z / tau, 0)  # the sampler's (and trainer's) log-probs at tau
        q = logp.detach().exp()
        adv = obj.gopd_advantages(logp.detach()[None], log_t[None], log_r[None], lam)
        loss = obj.policy_gradient_loss(logp[None], logp.detach()[None], adv, q[None])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return torch.softmax(z.detach(), 0)  # the student evaluated at temperature 1


@pytest.mark.parametrize("tau", [0.7, 1.3])
def test_training_at_temperature_tau_converges_at_temperature_one_to_the_closed_form(tau):
    """Teachers and references score at the rollout temperature: the student's logits then converge to
    lam z_T + (1 - lam) z_R, so at temperature 1 it is pi* ∝ T^lam R^(1-lam), whatever tau it trained at.
    Scoring them at temperature 1 instead ends at (pi*)^tau renormalised, far from pi*."""
    g = torch.Generator().manual_seed(3)
    z_t, z_r, lam = 2 * torch.randn(6, generator=g), 2 * torch.randn(6, generator=g), 1.25
    target = obj.gopd_optimum_logprobs(torch.log_softmax(z_t, 0), torch.log_softmax(z_r, 0), lam).exp()
    pi = _train_at_temperature(z_t, z_r, lam, tau)
    assert 0.5 * float((pi - target).abs().sum()) < 2e-3
    old = _train_at_temperature(z_t, z_r, lam, tau, score_at_tau=False)
    assert 0.5 * float((old - target).abs().sum()) > 0.05


def test_extreme_tokens_give_a_finite_loss_and_gradient():
    """A ratio that overflows (sampler log-prob -1e4) or underflows (student log-prob -1e4 below the sampler's)
    is truncated to c or 0, not 0/0 or inf/inf."""
    logp = torch.tensor([[-1.0, -1e4, -0.5, -2.0]], requires_grad=True)
    sampler = torch.tensor([[-1e4, -1.0, -0.5, -2.0 - math.log(3.0)]])  # ratios inf, 0, 1, 3
    adv = torch.tensor([[1.0, 1.0, 2.0, -1.0]])
    loss = obj.policy_gradient_loss(logp, sampler, adv, torch.ones(1, 4), truncation=5.0)
    assert math.isclose(float(loss.detach()), -(5.0 + 0.0 + 2.0 - 3.0) / 4, rel_tol=1e-5)
    loss.backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[-5.0, 0.0, -2.0, 3.0]]) / 4)
