"""SFT on teacher samples (the off-policy baseline of the paper's Table 2).

Each domain's teacher answers that domain's prompts (at `rollout.temperature`, as many responses as G-OPD
samples), and the student minimises the token-mean negative log-likelihood of those responses over the
global batch (`objective.sft_loss`): forward KL to the teacher, on the teacher's own samples.
"""

from __future__ import annotations

from merge_distill import objective
from merge_distill.methods.base import TrainingMethod, register_method
from merge_distill.sampling import concat_rollouts


@register_method("sft")
class SFT(TrainingMethod):
    frozen_via_scorer = False  # teachers sample from `Setup.frozen`

    def rollouts(self, run, batch, seeds):
        """Rows grouped by domain, each group sampled by its domain's teacher."""
        order = sorted(range(len(batch)), key=lambda r: batch[r].expert)
        batch, seeds = [batch[r] for r in order], [seeds[r] for r in order]
        parts = []
        for i, e in enumerate(run.recipe.experts):
            rows = [r for r, p in enumerate(batch) if p.expert == i]
            if rows:
                part = run.sample_frozen(e.teacher, [batch[r] for r in rows], [seeds[r] for r in rows],
                                         what=f"teacher of {e.name}")
                parts.append(part.to(run.student.device))
        return batch, concat_rollouts(parts, run.tokenizer.pad_token_id)

    def loss(self, run, rollouts, targets):
        logprobs = run.policy(rollouts)
        return objective.sft_loss(logprobs, rollouts.response_mask), logprobs.detach()
