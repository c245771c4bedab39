"""Evaluation statistics: avg@k, pass@k, standard errors and paired differences.

Correctness is given per problem as a list of per-sample values in [0, 1]
(1.0 = the sample passed). Everything here is a pure function of those lists.

* avg@k  -- per problem, the mean correctness of its k samples; the suite score is
  the mean of those over problems.
* pass@k -- per problem, the unbiased estimator of Chen et al. (2021),
  ``1 - C(n-c, k) / C(n, k)`` with n samples of which c are correct; the suite
  score is its mean over problems.

Standard errors are taken over problems: ``std(per_problem, ddof=1) / sqrt(n_problems)``
(0 for a single problem).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Literal

import numpy as np

Metric = Literal["avg", "pass"]
METRICS: tuple[str, ...] = ("avg", "pass")

#: A sample counts as correct for pass@k when its value is at least this.
CORRECT_THRESHOLD = 0.5

_HF_METRICS_DIR = Path(__file__).resolve().parent / "hf_metrics"
HF_METRIC_NAMES: tuple[str, ...] = ("avg_at_k", "pass_at_k")


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k estimate for one problem with ``n`` samples, ``c`` of them correct.

    Computes ``1 - C(n-c, k) / C(n, k)`` in the numerically stable product form
    ``1 - prod_{i=n-c+1}^{n} (1 - k / i)``.
    """
    if n < 1:
        raise ValueError(f"pass@k needs at least one sample (n={n})")
    if not 0 <= c <= n:
        raise ValueError(f"number correct c={c} must be between 0 and n={n}")
    if not 1 <= k <= n:
        raise ValueError(f"k={k} must be between 1 and the number of samples n={n}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def avg_at_k(correct: Sequence[Sequence[float]]) -> list[float]:
    """Per-problem mean correctness over that problem's samples."""
    means = []
    for i, samples in enumerate(correct):
        if len(samples) == 0:
            raise ValueError(f"problem {i} has no samples")
        means.append(float(np.mean(np.asarray(samples, dtype=float))))
    return means


def per_problem_estimates(
    per_problem_correct: Sequence[Sequence[float]], metric: Metric, k: int | None = None
) -> list[float]:
    """The per-problem estimate of avg@k or pass@k.

    For ``avg``, ``k`` (when given) uses the first k samples of each problem; ``None``
    uses all of them. For ``pass``, ``k`` defaults to 1 and each problem's
    n is its number of samples.
    """
    if metric == "avg":
        if k is None:
            return avg_at_k(per_problem_correct)
        short = [i for i, s in enumerate(per_problem_correct) if len(s) < k]
        if short:
            raise ValueError(f"avg@{k} needs {k} samples per problem; problem {short[0]} has fewer")
        return avg_at_k([list(s)[:k] for s in per_problem_correct])
    if metric == "pass":
        k = 1 if k is None else k
        out = []
        for samples in per_problem_correct:
            arr = np.asarray(samples, dtype=float)
            out.append(pass_at_k(len(arr), int(np.sum(arr >= CORRECT_THRESHOLD)), k))
        return out
    raise ValueError(f"unknown metric {metric!r} (expected one of {', '.join(METRICS)})")


def mean_and_stderr(values: Sequence[float]) -> tuple[float, float]:
    """Mean and standard error of the mean (ddof=1; 0 for a single value)."""
    arr = np.asarray(values, dtype=float)
    if arr.size == 0:
        raise ValueError("no values to average")
    stderr = float(np.std(arr, ddof=1) / np.sqrt(arr.size)) if arr.size > 1 else 0.0
    return float(np.mean(arr)), stderr


@dataclass(frozen=True)
class Score:
    """A suite-level score: mean over problems with its standard error.

    ``n_samples`` is the number of samples per problem (the smallest, if they vary).
    """

    score: float
    stderr: float
    n_problems: int
    n_samples: int


def suite_score(
    per_problem_correct: Sequence[Sequence[float]], metric: Metric, k: int | None = None
) -> Score:
    """Score a suite from per-problem correctness lists (see :func:`per_problem_estimates`)."""
    if len(per_problem_correct) == 0:
        raise ValueError("cannot score a suite with no problems")
    estimates = per_problem_estimates(per_problem_correct, metric, k)
    score, stderr = mean_and_stderr(estimates)
    n_samples = min(len(s) for s in per_problem_correct)
    return Score(score=score, stderr=stderr, n_problems=len(estimates), n_samples=n_samples)


def paired_difference(
    a_per_problem: Mapping[str, float], b_per_problem: Mapping[str, float]
) -> tuple[float, float, int]:
    """Mean of per-problem differences ``a - b`` with its standard error, and n.

    Both mappings go from task id to that problem's estimate (e.g. avg@k) and must
    cover the same problems; pairing removes between-problem variance.
    """
    if set(a_per_problem) != set(b_per_problem):
        only_a = sorted(set(a_per_problem) - set(b_per_problem))
        only_b = sorted(set(b_per_problem) - set(a_per_problem))
        raise ValueError(
            "paired difference needs the same problems on both sides "
            f"(only in a: {only_a[:3]}; only in b: {only_b[:3]})"
        )
    ids = sorted(a_per_problem)
    diffs = [float(a_per_problem[i]) - float(b_per_problem[i]) for i in ids]
    diff, stderr = mean_and_stderr(diffs)
    return diff, stderr, len(diffs)


@dataclass
class ResultRow:
    """One (model, suite[, subset]) result; ``score`` and ``stderr`` are fractions in [0, 1]."""

    model: str
    suite: str
    domain: str
    metric: Metric
    k: int
    score: float
    stderr: float
    n_problems: int
    n_samples: int
    subset: str | None = None
    temperature: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ResultRow:
        """Build from a dict, ignoring unknown keys."""
        names = {f.name for f in fields(cls)}
        return cls(**{key: value for key, value in d.items() if key in names})

    @property
    def label(self) -> str:
        """Metric label such as ``avg@16`` or ``pass@1``."""
        return f"{self.metric}@{self.k}"


def hf_metric_path(name: str) -> str:
    """Directory of a bundled HF ``evaluate`` metric module (``avg_at_k`` or ``pass_at_k``).

    Load it with ``evaluate.load(hf_metric_path("pass_at_k"))``.
    """
    normalized = name.replace("@", "_at_")
    if normalized not in HF_METRIC_NAMES:
        raise ValueError(f"unknown HF metric {name!r} (expected one of {', '.join(HF_METRIC_NAMES)})")
    return str(_HF_METRICS_DIR / normalized)
