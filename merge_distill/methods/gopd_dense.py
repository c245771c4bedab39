"""Dense G-OPD (`method: gopd`, `method.objective: dense`): the exact objective over the whole vocabulary.

Per visited response position, G-OPD's objective equals log Z - KL(pi || pi*) with

    log pi* = log_softmax(lam * log T + (1 - lam) * log R)        [B, L, V]

so instead of the sampled single-token estimate the loss is the exact reverse KL from the student to pi*
at every real response position (`dense.dense_kl`), token mean over the global batch; no importance ratio.
Teacher and reference are scored at the rollout temperature, as in the sampled estimator. Holds `[B, L, V]`
log-probs: for small vocabularies (the CPU zoo).
"""

from __future__ import annotations

from merge_distill import objective
from merge_distill.dense import dense_kl, target_logprobs
from merge_distill.methods.base import Method, register_method
from merge_distill.step_metrics import token_mean


@register_method("gopd", objective="dense")
class DenseGOPD(Method):
    vocab = True  # full distributions of the teachers, references and student
    curves = ("reverse_kl_teacher", "response_length")
    progress = ("reverse_kl_teacher", "KL to teacher")

    def check(self, recipe):
        super().check(recipe)
        if recipe.method.log_ratio_clip is not None:
            raise ValueError("method.log_ratio_clip clips the sampled estimator's reward; it does not apply to "
                             "method.objective dense")

    def frozen_models(self, recipe, expert):
        models = {"teacher": expert.teacher}
        if recipe.scale_of(expert) != 1.0:
            models["reference"] = expert.reference
        return models

    def targets(self, batch, scores, cfg):
        """`[B, L, V]` log pi* at every response position, each domain's rows from its own teacher and reference
        (scored at the rollout temperature: the student's logits then converge to lam log T + (1 - lam) log R)."""
        target, metrics = None, {}
        for i, rows in batch.by_expert():
            if not rows:
                continue
            expert, lam = cfg.experts[i], cfg.scale_of(cfg.experts[i])
            teacher = scores["teacher"][rows]
            t = target_logprobs(teacher, scores["reference"][rows] if lam != 1.0 else None, lam)
            if target is None:
                target = t.new_zeros(*batch.rollouts.response_ids.shape, t.shape[-1])
            target[rows] = t
            sub = batch.rollouts.select(rows)
            sampled = teacher.gather(-1, sub.response_ids[..., None]).squeeze(-1)
            metrics[f"{expert.name}/reverse_kl_teacher"] = token_mean(objective.kl_k1(sub.sampler_logprobs, sampled),
                                                                      sub.response_mask)
        return target, metrics

    def loss(self, logprobs, batch, targets, cfg):
        return objective.masked_mean(dense_kl(logprobs, targets), batch.mask)
