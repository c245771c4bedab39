"""SFT on teacher samples (the off-policy baseline of the paper's Table 2).

Each domain's teacher answers that domain's prompts (`samples_from = "teacher"`: at `rollout.temperature`, as
many responses as G-OPD samples), and the student minimises the token-mean negative log-likelihood of those
responses over the global batch (`objective.sft_loss`): forward KL to the teacher, on the teacher's own samples.
"""

from __future__ import annotations

from merge_distill import objective
from merge_distill.methods.base import Method, register_method


@register_method("sft")
class SFT(Method):
    samples_from = "teacher"

    def loss(self, logprobs, batch, targets, cfg):
        return objective.sft_loss(logprobs, batch.mask)
