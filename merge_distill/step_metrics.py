"""A training step's metrics as values that say how they combine over ranks.

Every rank computes its metrics from its own rows; the step's logged value is what one process holding the whole
global batch would log. Each value carries its own reduction, so nothing parses metric names:

    Mean(total, weight)   a mean over tokens or rows: totals and weights are summed over ranks, then divided
    Sum(value)            counts and the loss (each rank holds its share of the global token mean)
    Max(value), Min(value) extremes, slowest phase times, peak memory
    anything else         the same on every rank (step, lr, grad_norm): rank 0's

`reduce(per_rank)` combines a list of per-rank dicts; `values(metrics)` reads one process's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

Tensor = torch.Tensor


@dataclass(frozen=True)
class Mean:
    total: float
    weight: float

    @property
    def value(self) -> float:
        return self.total / self.weight if self.weight else 0.0

    def combine(self, other: "Mean") -> "Mean":
        return Mean(self.total + other.total, self.weight + other.weight)


@dataclass(frozen=True)
class Sum:
    value: float

    def combine(self, other: "Sum") -> "Sum":
        return Sum(self.value + other.value)


@dataclass(frozen=True)
class Max:
    value: float

    def combine(self, other: "Max") -> "Max":
        return Max(max(self.value, other.value))


@dataclass(frozen=True)
class Min:
    value: float

    def combine(self, other: "Min") -> "Min":
        return Min(min(self.value, other.value))


REDUCED = (Mean, Sum, Max, Min)


def token_mean(x: Tensor, mask: Tensor) -> Mean:
    """The mean of `x` over the real tokens of `mask` (the paper's token mean)."""
    return Mean(float((x * mask).sum()), float(mask.sum()))


def row_mean(x: Tensor) -> Mean:
    """The mean of a per-row quantity `[B]` (lengths, accuracies, truncation)."""
    return Mean(float(x.float().sum()), float(x.numel()))


def reduce(per_rank: list[dict]) -> dict:
    """One step's metrics from every rank's dict (in rank order), as plain numbers. A key some ranks lack (a
    domain with no rows there) combines over the ranks that have it."""
    keys = list(dict.fromkeys(k for m in per_rank for k in m))
    out = {}
    for key in keys:
        have = [m[key] for m in per_rank if key in m]
        first = have[0]
        if isinstance(first, REDUCED):
            for other in have[1:]:
                first = first.combine(other)
            out[key] = first.value
        else:
            out[key] = first
    return out


def values(metrics: dict) -> dict:
    """One process's metrics as plain numbers."""
    return reduce([metrics])
