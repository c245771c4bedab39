"""The math of G-OPD / ExOPD and GRPO as small pure functions on tensors.

Shapes: per-token tensors are `[batch, response_len]`; `mask` is 1 on real response tokens (EOS
included) and 0 on padding. Log-probs are of the sampled token only.

G-OPD (arXiv 2602.12125) maximises  E_pi[lam * log(T/R)] - KL(pi || R),  whose optimum per token is
pi* ∝ T^lam * R^(1-lam). Its per-token advantage (discount 0, detached) is

    A_t = lam * (log T(y_t) - log R(y_t)) - (log pi_old(y_t) - log R(y_t))

lam = 1 is on-policy distillation (reverse KL to T; R cancels), lam > 1 extrapolates (ExOPD).
"""

from __future__ import annotations

import math

import torch

Tensor = torch.Tensor


def gopd_advantages(student_logprobs: Tensor, teacher_logprobs: Tensor,
                    reference_logprobs: Tensor | None, reward_scale: float | Tensor) -> Tensor:
    """Per-token G-OPD advantages `lam*(T - R) - (S - R)`, same shape as the inputs, detached.

    `reward_scale` (lam) is a float or a per-sequence tensor `[batch]`. `reference_logprobs` may be None
    only where every lam is 1, where R cancels out exactly.
    """
    lam = per_sequence(reward_scale, student_logprobs)
    s, t = student_logprobs.detach(), teacher_logprobs.detach()
    if reference_logprobs is None:
        _check_reference_unneeded(lam)
        return t - s
    r = reference_logprobs.detach()
    return lam * (t - r) - (s - r)


def per_sequence(value: float | Tensor, like: Tensor) -> Tensor:
    """lam as a tensor that broadcasts against `like` (a `[batch]` tensor becomes `[batch, 1, ...]`)."""
    return _per_sequence_shape(torch.as_tensor(value, dtype=like.dtype, device=like.device), like)


def _per_sequence_shape(v: Tensor, like: Tensor) -> Tensor:
    return v.reshape(-1, *([1] * (like.dim() - 1))) if v.dim() == 1 else v


def _check_reference_unneeded(reward_scale: float | Tensor) -> None:
    """Without reference log-probs only lam = 1 is defined (R cancels there)."""
    if not bool(torch.all(torch.as_tensor(reward_scale) == 1.0)):
        raise ValueError("reference_logprobs are needed where reward_scale != 1")


def grpo_advantages(rewards: Tensor, group_size: int, *, normalize_std: bool = True,
                    eps: float = 1e-6) -> Tensor:
    """Group-normalised outcome advantages `[batch]`: (r - mean_group) / (std_group + eps).

    Rewards are ordered so that each consecutive block of `group_size` shares a prompt.
    """
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    r = rewards.reshape(-1, group_size).float()
    centred = r - r.mean(dim=1, keepdim=True)
    if normalize_std and group_size > 1:
        centred = centred / (r.std(dim=1, keepdim=True, unbiased=True) + eps)
    return centred.reshape(-1)


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Token-mean over all real tokens of the batch (the paper's aggregation)."""
    return (x * mask).sum() / mask.sum().clamp(min=1)


def policy_gradient_loss(logprobs: Tensor, sampler_logprobs: Tensor, advantages: Tensor, mask: Tensor,
                         truncation: float | None = 5.0) -> Tensor:
    """Token-mean policy-gradient loss `-mean(w * A)`, w = pi_theta / pi_sampler, truncated at `truncation`.

    `logprobs` carry the gradient; `sampler_logprobs` are those of the policy that sampled. Where sampler and
    trainer compute slightly different probabilities (another engine, other kernels), the ratio is a
    token-level importance weight, truncated in value: each token contributes `min(ratio, c) * A` with
    gradient `min(ratio, c) * A * grad log pi`; `None` turns truncation off. With one update per batch the
    ratio is ~1 and this is REINFORCE on the advantages.

    The weight is computed in log space, `exp(min(log ratio, log c))`, so a ratio that over- or underflows
    gives c or 0, never the 0/0 or inf/inf of `clamp(r, max=c) / r` (one extreme token made a step NaN).
    """
    log_ratio = logprobs.detach() - sampler_logprobs.detach()
    if truncation is not None:
        log_ratio = log_ratio.clamp(max=math.log(truncation))
    # value exp(log_ratio); gradient exp(log_ratio) * grad log pi (the second term is 0 in value)
    weight = torch.exp(log_ratio + (logprobs - logprobs.detach()))
    return -masked_mean(weight * advantages.detach(), mask)


def sft_loss(logprobs: Tensor, mask: Tensor) -> Tensor:
    """Token-mean negative log-likelihood of given (e.g. teacher-sampled) tokens: the off-policy baseline."""
    return -masked_mean(logprobs, mask)


def gopd_optimum_logprobs(teacher_logprobs: Tensor, reference_logprobs: Tensor | None,
                          reward_scale: float | Tensor) -> Tensor:
    """log of the normalised closed-form optimum pi* ∝ T^lam R^(1-lam): log_softmax(lam * T + (1 - lam) * R)
    over the last (vocab) axis.

    `reward_scale` (lam) is a float or a per-sequence tensor `[batch]`, used as given (a `[batch]` tensor is
    only reshaped to broadcast). `reference_logprobs` may be None only where every lam is 1 (then pi* = T,
    renormalised).
    """
    if isinstance(reward_scale, Tensor):
        reward_scale = _per_sequence_shape(reward_scale, teacher_logprobs)
    if reference_logprobs is None:
        _check_reference_unneeded(reward_scale)
        return torch.log_softmax(teacher_logprobs, -1)
    return torch.log_softmax(reward_scale * teacher_logprobs + (1 - reward_scale) * reference_logprobs, -1)


# KL estimators on samples from the first distribution (Schulman's k1 and k3), per token.
def kl_k1(logp: Tensor, logq: Tensor) -> Tensor:
    """k1 = log p - log q: unbiased for KL(p||q) when the token was sampled from p."""
    return logp - logq


def kl_k3(logp: Tensor, logq: Tensor) -> Tensor:
    """k3 = (q/p - 1) - log(q/p): unbiased, non-negative, lower variance."""
    log_ratio = logq - logp
    return torch.expm1(log_ratio) - log_ratio
