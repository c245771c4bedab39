"""GRPO (Shao et al. 2024, DeepSeekMath): outcome-reward RL, how the CPU zoo's experts are made.

Each prompt gets `rollout.rollouts_per_prompt` >= 2 responses; the domain's grader scores each response 0/1
(`score` in [0, 1]), and every token of response i in group g gets the group-normalised advantage

    A_i = (r_i - mean_g r) / (std_g r + eps)        [B] -> broadcast over the response's real tokens

(`objective.grpo_advantages`), trained with the same truncated importance-weighted policy-gradient loss as
G-OPD. No teachers, no frozen models.
"""

from __future__ import annotations

import time
from collections import defaultdict

import torch

from merge_distill import objective
from merge_distill.methods.base import register_method
from merge_distill.methods.gopd import PolicyGradientMethod


@register_method("grpo")
class GRPO(PolicyGradientMethod):
    needs_teachers = False
    curves = ("accuracy", "response_length")
    progress = ("accuracy", "accuracy")

    def check(self, recipe):
        if recipe.rollout.rollouts_per_prompt < 2:
            raise ValueError(f"rollout.rollouts_per_prompt is {recipe.rollout.rollouts_per_prompt}: GRPO normalises "
                             "rewards within each prompt's group of rollouts, so it needs at least 2 (one trains "
                             "nothing)")

    def targets(self, run, batch, rollouts, metrics):
        """`[B, L]`: each row's group-normalised 0/1 reward on its real tokens."""
        recipe, mask = run.recipe, rollouts.response_mask
        by_expert = defaultdict(list)
        for row, p in enumerate(batch):
            by_expert[p.expert].append(row)
        rewards = torch.zeros(len(batch))  # graded on the CPU, then moved to the rollouts' device
        texts = run.tokenizer.batch_decode(rollouts.response_token_lists(), skip_special_tokens=True)
        t0 = time.perf_counter()
        for i, rows in by_expert.items():
            verdicts = run.graders[i].grade_many([batch[r].record for r in rows], [texts[r] for r in rows])
            rewards[rows] = torch.tensor([float(v.score) for v in verdicts])
            metrics[f"{recipe.experts[i].name}/accuracy"] = float(rewards[rows].mean())
        metrics["time/grade_s"] = time.perf_counter() - t0
        seq_adv = objective.grpo_advantages(rewards.to(mask.device), recipe.rollout.rollouts_per_prompt)
        return seq_adv[:, None] * mask
