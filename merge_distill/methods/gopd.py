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

from merge_distill import objective
from merge_distill.dense import gopd_advantages_clipped
from merge_distill.methods.base import PolicyGradientMethod, register_method
from merge_distill.step_metrics import token_mean


def needs_reference(recipe, expert) -> bool:
    """R enters the reward unless lam = 1 with an unclipped log-ratio (where it cancels exactly)."""
    return recipe.scale_of(expert) != 1.0 or recipe.method.log_ratio_clip is not None


@register_method("gopd")
class GOPD(PolicyGradientMethod):
    curves = ("reward", "reverse_kl_teacher", "kl_reference", "response_length")
    progress = ("reverse_kl_teacher", "KL to teacher")

    def frozen_models(self, recipe, expert):
        models = {"teacher": expert.teacher}
        if needs_reference(recipe, expert):
            models["reference"] = expert.reference
        return models

    def targets(self, batch, scores, cfg):
        """`[B, L]` advantages, each domain's rows from its own lam and its own teacher's and reference's scores."""
        adv = batch.old_logprobs.new_zeros(batch.old_logprobs.shape)
        metrics = {}
        for i, rows in batch.by_expert():
            if not rows:
                continue
            expert, mask = cfg.experts[i], batch.mask[rows]
            student, teacher = batch.old_logprobs[rows], scores["teacher"][rows]
            reference = scores["reference"][rows] if needs_reference(cfg, expert) else None
            lam, clip = cfg.scale_of(expert), cfg.method.log_ratio_clip
            a = (objective.gopd_advantages(student, teacher, reference, lam) if clip is None
                 else gopd_advantages_clipped(student, teacher, reference, lam, clip)) * mask
            adv[rows] = a
            metrics[f"{expert.name}/reward"] = token_mean(a, mask)
            metrics[f"{expert.name}/reverse_kl_teacher"] = token_mean(objective.kl_k1(student, teacher), mask)
            if reference is not None:
                metrics[f"{expert.name}/kl_reference"] = token_mean(objective.kl_k1(student, reference), mask)
        return adv, metrics
