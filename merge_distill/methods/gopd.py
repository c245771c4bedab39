"""G-OPD / ExOPD, the paper's sampled per-token estimator (arXiv 2602.12125, "Learning beyond Teacher").

For a prompt of domain d the student samples y ~ pi_old at temperature tau; teacher T_d and reference R_d
score the sampled tokens at the same tau. Each real token (EOS included) gets the detached advantage

    A_t = lam_d * (log T_d(y_t) - log R_d(y_t)) - (log pi_old(y_t) - log R_d(y_t))        [B, L]

(no discount, no baseline, no normalisation; `objective.gopd_advantages`), and the loss is the token mean
over the global batch of `-min(pi_theta / pi_sampler, c) * A_t` (`objective.policy_gradient_loss`). lam = 1
is on-policy distillation (reverse KL to T; R cancels and is not computed), lam > 1 extrapolates (ExOPD);
the per-token optimum is pi* ∝ T^lam R^(1-lam). With `method.log_ratio_clip: c` the log-ratio log T - log R
is clipped to [-c, c] (then R is needed at lam = 1 too).
"""

from __future__ import annotations

from collections import defaultdict

from merge_distill import objective
from merge_distill.dense import gopd_advantages_clipped
from merge_distill.methods.base import TrainingMethod, register_method


def needs_reference(recipe, expert) -> bool:
    """R enters the reward unless lam = 1 with an unclipped log-ratio (where it cancels exactly)."""
    return recipe.scale_of(expert) != 1.0 or recipe.method.log_ratio_clip is not None


class PolicyGradientMethod(TrainingMethod):
    """Per-token advantages from `targets`, the truncated importance-weighted policy-gradient loss."""

    def loss(self, run, rollouts, targets):
        logprobs = run.policy(rollouts)
        loss = objective.policy_gradient_loss(logprobs, rollouts.sampler_logprobs, targets, rollouts.response_mask,
                                              truncation=run.recipe.method.importance_truncation)
        return loss, logprobs.detach()


@register_method("gopd")
class GOPD(PolicyGradientMethod):
    curves = ("reward", "reverse_kl_teacher", "kl_reference", "response_length")
    progress = ("reverse_kl_teacher", "KL to teacher")

    def frozen_models(self, recipe, expert):
        models = {"teacher": expert.teacher}
        if needs_reference(recipe, expert):
            models["reference"] = expert.reference
        return models

    def targets(self, run, batch, rollouts, metrics):
        """`[B, L]` advantages; each domain's rows scored by that domain's teacher and reference only."""
        recipe = run.recipe
        adv = rollouts.sampler_logprobs.new_zeros(rollouts.sampler_logprobs.shape)
        by_expert = defaultdict(list)
        for row, p in enumerate(batch):
            by_expert[p.expert].append(row)
        old_logprobs = run.old_logprobs(rollouts)
        for i, expert in enumerate(recipe.experts):  # every expert, in order, on every rank (`frozen_via_scorer`)
            rows = by_expert.get(i, [])
            sub = rollouts.select(rows)
            lam = recipe.scale_of(expert)
            student_lp = old_logprobs[rows]
            teacher_lp = run.score(expert.teacher, sub)
            clip = recipe.method.log_ratio_clip
            reference_lp = run.score(run.reference_path(expert), sub) if needs_reference(recipe, expert) else None
            if clip is None:
                a = objective.gopd_advantages(student_lp, teacher_lp, reference_lp, lam)
            else:
                a = gopd_advantages_clipped(student_lp, teacher_lp, reference_lp, lam, clip)
            a = a * sub.response_mask
            adv[rows] = a
            if not rows:
                continue
            m, name = sub.response_mask, expert.name
            metrics[f"{name}/reward"] = float(objective.masked_mean(a, m))
            metrics[f"{name}/reverse_kl_teacher"] = float(objective.masked_mean(objective.kl_k1(student_lp, teacher_lp), m))
            if reference_lp is not None:
                metrics[f"{name}/kl_reference"] = float(objective.masked_mean(objective.kl_k1(student_lp, reference_lp), m))
        return adv
