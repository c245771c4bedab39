"""One step's rows on a rank, as a method sees them: each row's prompt and the response sampled for it."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from merge_distill.data import Prompt
from merge_distill.sampling import Rollouts

Tensor = torch.Tensor


@dataclass
class Batch:
    """`prompts[r]` is row r's prompt (its `expert` the index of its domain in the recipe); `rollouts` the
    responses; `old_logprobs` log pi_old of the sampled tokens `[B, L]` (the policy that sampled, as the trainer
    computes it: see `train.Trainer.old_logprobs`); `experts` the domains' names in recipe order."""

    prompts: list[Prompt]
    rollouts: Rollouts
    old_logprobs: Tensor | None
    experts: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def mask(self) -> Tensor:
        """`[B, L]` bool: the real response tokens (EOS included)."""
        return self.rollouts.response_mask

    def by_expert(self) -> list[tuple[int, list[int]]]:
        """(expert index, its rows) for every expert in recipe order, rows possibly empty."""
        rows: list[list[int]] = [[] for _ in self.experts]
        for r, p in enumerate(self.prompts):
            rows[p.expert].append(r)
        return list(enumerate(rows))

    def select(self, rows: list[int]) -> "Batch":
        old = None if self.old_logprobs is None else self.old_logprobs[rows]
        return Batch([self.prompts[r] for r in rows], self.rollouts.select(rows), old, self.experts)


def select_rows(targets, rows: list[int]):
    """A method's targets (a tensor with rows first, a tuple, list or dict of them, or None) at `rows`."""
    if targets is None:
        return None
    if isinstance(targets, Tensor):
        return targets[rows]
    if isinstance(targets, dict):
        return {k: select_rows(v, rows) for k, v in targets.items()}
    return type(targets)(select_rows(v, rows) for v in targets)
