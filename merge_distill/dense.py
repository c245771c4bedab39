"""Dense G-OPD over the whole vocabulary, and a clipped log-ratio reward for studying reward hacking.

Per position, the G-OPD objective  E_pi[lam * (log T - log R)] - KL(pi || R)  equals
log Z - KL(pi || pi*) with pi* = T^lam R^(1-lam) / Z. Where the vocabulary is small enough to hold every
log-prob, the exact objective needs no sampling: minimise  KL(pi || pi*) = sum_v pi(v) (log pi(v) - log pi*(v)).
Its gradient in the student's logits z is  dKL/dz_v = pi(v) (log pi(v) - log pi*(v) - KL),  zero exactly at
pi = pi*, the closed-form optimum the sampled objective only reaches in expectation.

Shapes: `[batch, length, vocab]` for logits and full log-probs, `[batch, length]` for per-token values and
the mask (1 on real tokens). `reward_scale` (lam) is a float or a per-sequence tensor `[batch]`.
"""

from __future__ import annotations

import math

import torch

from merge_distill.objective import gopd_optimum_logprobs, masked_mean, per_sequence

Tensor = torch.Tensor


def target_logprobs(teacher_logprobs: Tensor, reference_logprobs: Tensor | None,
                    reward_scale: float | Tensor) -> Tensor:
    """log pi* = log_softmax(lam * T + (1 - lam) * R) over the last (vocab) axis, detached:
    `objective.gopd_optimum_logprobs` of the detached log-probs.

    lam is passed as a tensor of the log-probs' dtype (`objective.per_sequence`), as the dense loss has
    always computed it. `reference_logprobs` may be None only where every lam is 1.
    """
    t = teacher_logprobs.detach()
    r = None if reference_logprobs is None else reference_logprobs.detach()
    return gopd_optimum_logprobs(t, r, per_sequence(reward_scale, t))


def dense_kl(student_logits: Tensor, target_log_probs: Tensor) -> Tensor:
    """Per-position reverse KL(pi || q) = sum_v pi(v) (log pi(v) - log q(v)), pi = softmax(logits): `[B, L]`."""
    logp = torch.log_softmax(student_logits, dim=-1)
    return (logp.exp() * (logp - target_log_probs)).sum(dim=-1)


def dense_gopd_loss(student_logits: Tensor, teacher_logprobs: Tensor, reference_logprobs: Tensor | None,
                    reward_scale: float | Tensor, mask: Tensor) -> Tensor:
    """Exact dense G-OPD loss: token-mean over `mask` of KL(pi || pi*), pi* ∝ T^lam R^(1-lam).

        loss = sum_{b,t} mask_bt * sum_v pi_bt(v) (log pi_bt(v) - log pi*_bt(v)) / sum_{b,t} mask_bt

    `student_logits` `[B, L, V]` carry the gradient; teacher and reference full log-probs are treated as
    constants (finite values expected). Minimising this maximises the G-OPD objective at every position,
    up to the constant log Z; it is 0 exactly where pi = pi*.
    """
    target = target_logprobs(teacher_logprobs, reference_logprobs, reward_scale)
    return masked_mean(dense_kl(student_logits, target), mask)


def response_vocab_logprobs(model: torch.nn.Module, rollouts, *, temperature: float = 1.0) -> Tensor:
    """Full-vocabulary log-probs `[B, L, V]` at every response position (the trainer's dense objective;
    gradients flow outside `torch.no_grad()`). `[B, L, V]` floats: small vocabularies only."""
    from merge_distill.sampling import positions

    input_ids = torch.cat([rollouts.prompt_ids, rollouts.response_ids], dim=1)
    mask = torch.cat([rollouts.prompt_mask, rollouts.response_mask.long()], dim=1)
    L = rollouts.response_ids.shape[1]
    logits = model(input_ids=input_ids, attention_mask=mask, position_ids=positions(mask),
                   logits_to_keep=L + 1).logits[:, :-1]
    return torch.log_softmax(logits.float() / temperature, dim=-1)


def clip_log_ratio(teacher_logprobs: Tensor, reference_logprobs: Tensor, max_abs: float) -> Tensor:
    """The per-token log-ratio log T - log R clamped to [-c, c] (c = max_abs >= 0; inf clips nothing), detached.

    A cap on the implicit reward: with lam > 1 the student is paid lam * (T - R), so a few tokens with huge
    log-ratios can dominate (the reward hacking seen at lam = 1.5); clipping bounds each token's pay.
    """
    if not isinstance(max_abs, (int, float)) or math.isnan(max_abs) or max_abs < 0:
        raise ValueError(f"max_abs must be a number >= 0, got {max_abs!r}")
    return (teacher_logprobs.detach() - reference_logprobs.detach()).clamp(-max_abs, max_abs)


def gopd_advantages_clipped(student_logprobs: Tensor, teacher_logprobs: Tensor, reference_logprobs: Tensor,
                            reward_scale: float | Tensor, clip: float | None) -> Tensor:
    """G-OPD advantages with a clipped reward: lam * clip(T - R, -c, c) - (S - R), detached.

    `clip=None` is the unclipped `objective.gopd_advantages`. Unlike there, R never cancels (not even at
    lam = 1, as clipping acts on T - R), so `reference_logprobs` are required.
    """
    s, r = student_logprobs.detach(), reference_logprobs.detach()
    ratio = teacher_logprobs.detach() - r if clip is None else clip_log_ratio(teacher_logprobs, r, clip)
    return per_sequence(reward_scale, s) * ratio - (s - r)
