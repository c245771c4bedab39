"""Dense G-OPD (`method: gopd`, `method.objective: dense`): the exact objective over the whole vocabulary.

Per visited response position, G-OPD's objective equals log Z - KL(pi || pi*) with

    log pi* = log_softmax(lam * log T + (1 - lam) * log R)        [B, L, V]

so instead of the sampled single-token estimate the loss is the exact reverse KL from the student to pi*
at every real response position (`dense.dense_kl`), token mean over the global batch; no importance ratio.
Teacher and reference are scored at the rollout temperature, as in the sampled estimator. Holds `[B, L, V]`
log-probs: for small vocabularies (the CPU zoo).
"""

from __future__ import annotations

import torch

from merge_distill import objective
from merge_distill.dense import dense_kl, response_vocab_logprobs, target_logprobs
from merge_distill.methods.base import TrainingMethod, register_method


@register_method("gopd", objective="dense")
class DenseGOPD(TrainingMethod):
    frozen_via_scorer = False  # full distributions from `Setup.frozen`
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

    @torch.no_grad()
    def targets(self, run, batch, rollouts, metrics):
        """`[B, L, V]` log pi* at every response position, each domain's rows from its own teacher and reference."""
        recipe, frozen = run.recipe, run.frozen
        tau = recipe.rollout.temperature  # the student's logits then converge to lam log T + (1 - lam) log R
        target = None
        for i, expert in enumerate(recipe.experts):
            rows = [r for r, p in enumerate(batch) if p.expert == i]
            if not rows:
                continue
            sub, lam = rollouts.select(rows), recipe.scale_of(expert)
            with frozen.using(expert.teacher) as model:
                teacher = response_vocab_logprobs(model, sub.to(frozen.device), temperature=tau).to(sub.response_ids.device)
            reference = None
            if lam != 1.0:
                with frozen.using(run.reference_path(expert)) as model:
                    reference = response_vocab_logprobs(model, sub.to(frozen.device),
                                                        temperature=tau).to(sub.response_ids.device)
            t = target_logprobs(teacher, reference, lam)
            if target is None:
                target = t.new_zeros(*rollouts.response_ids.shape, t.shape[-1])
            target[rows] = t
            metrics[f"{expert.name}/reverse_kl_teacher"] = float(objective.masked_mean(
                objective.kl_k1(sub.sampler_logprobs, teacher.gather(-1, sub.response_ids[..., None]).squeeze(-1)),
                sub.response_mask))
        return target

    def loss(self, run, rollouts, targets):
        vocab_logprobs = run.policy(rollouts, vocab=True)
        logprobs = vocab_logprobs.gather(-1, rollouts.response_ids[..., None]).squeeze(-1)
        loss = objective.masked_mean(dense_kl(vocab_logprobs, targets), rollouts.response_mask)
        return loss, logprobs.detach()
