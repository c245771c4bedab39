"""GRPO (Shao et al. 2024, DeepSeekMath): outcome-reward RL, how the CPU zoo's experts are made.

Each prompt gets `rollout.rollouts_per_prompt` >= 2 responses; the domain's grader scores each response 0/1
(`scores["reward"]`, in [0, 1]), and every token of response i in group g gets the group-normalised advantage

    A_i = (r_i - mean_g r) / (std_g r + eps)        [B] -> broadcast over the response's real tokens

(`objective.grpo_advantages`), trained with the same truncated importance-weighted policy-gradient loss as
G-OPD. No teachers, no frozen models.
"""

from __future__ import annotations

from merge_distill import objective
from merge_distill.methods.base import PolicyGradientMethod, register_method
from merge_distill.step_metrics import row_mean


@register_method("grpo")
class GRPO(PolicyGradientMethod):
    needs_teachers = False
    graded = True
    curves = ("accuracy", "response_length")
    progress = ("accuracy", "accuracy")

    def check(self, recipe):
        if recipe.rollout.rollouts_per_prompt < 2:
            raise ValueError(f"rollout.rollouts_per_prompt is {recipe.rollout.rollouts_per_prompt}: GRPO normalises "
                             "rewards within each prompt's group of rollouts, so it needs at least 2 (one trains "
                             "nothing)")

    def targets(self, batch, scores, cfg):
        """`[B, L]`: each row's group-normalised 0/1 reward on its real tokens."""
        rewards = scores["reward"]
        metrics = {f"{cfg.experts[i].name}/accuracy": row_mean(rewards[rows]) for i, rows in batch.by_expert() if rows}
        seq_adv = objective.grpo_advantages(rewards.to(batch.mask.device), cfg.rollout.rollouts_per_prompt)
        return seq_adv[:, None] * batch.mask, metrics
