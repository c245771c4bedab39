"""What every toy task family shares: the :class:`TaskFamily` base (a problem space and its
correct, misconceived and randomly wrong responses) and :class:`NoiseMix` (how pretraining
responses are corrupted)."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, ClassVar

from merge_distill.errors import UserError

# ----------------------------------------------------------------------------- noise

CHECK_MARK = "~"  # one byte, one token: a "verification" mark that carries no answer


@dataclass(frozen=True)
class NoiseMix:
    """How pretraining responses are corrupted: each response is independently the
    misconception (share ``misconception``; equal to the correct response on prompts
    where the misconception does not bite), a random plausible error (share
    ``random_error``; always graded wrong), or else correct."""

    misconception: float = 0.35
    random_error: float = 0.25
    # Check marks, a length to exploit: before each step of a response k marks (`CHECK_MARK`), k geometric (each
    # one more with probability `check_rate`, at most `max_checks`), and each mark scales both error shares of
    # that step by `check_gain`: in the corpus, longer "verification" goes with right steps. 0 = none (the default)
    check_rate: float = 0.0
    check_gain: float = 1.0
    max_checks: int = 16

    def __post_init__(self) -> None:
        for name in ("misconception", "random_error", "check_rate", "check_gain"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise UserError(f"NoiseMix.{name} must be in [0, 1], got {v}")
        if self.misconception + self.random_error > 1.0 + 1e-9:
            raise UserError(
                f"NoiseMix shares add up to more than 1 "
                f"(misconception={self.misconception} + random_error={self.random_error})"
            )

    @property
    def correct(self) -> float:
        """Share of responses written correctly (as written; the misconception share
        is also correct on 'plain' prompts)."""
        return max(0.0, 1.0 - self.misconception - self.random_error)


# ----------------------------------------------------------------------------- base


class TaskFamily:
    """A family of synthetic problems in one domain.

    Subclasses define the problem space through ``_sample_key`` (uniform over the
    space), ``_all_keys`` (the whole space, for small spaces; else ``None``),
    ``space_size`` and ``_record`` (the record for a key, without ``task_id``)."""

    domain: ClassVar[str]
    grader: ClassVar[str]

    # ---- problem space (identity keys) ------------------------------------------
    def _sample_key(self, rng: random.Random) -> Any:
        raise NotImplementedError

    def _all_keys(self) -> list | None:
        return None

    def space_size(self) -> int:
        """Number of distinct problems in the family's space."""
        raise NotImplementedError

    def _record(self, key: Any) -> dict:
        raise NotImplementedError

    def key_of(self, record: dict) -> Any:
        """The problem identity of a record (hashable)."""
        raise NotImplementedError

    # ---- public API --------------------------------------------------------------
    def sample_problem(self, rng: random.Random) -> dict:
        """A uniformly random problem record (no ``task_id`` yet)."""
        return self._record(self._sample_key(rng))

    def solution(self, record: dict) -> str:
        """The correct response text."""
        raise NotImplementedError

    def misconception(self, record: dict) -> str:
        """The systematically wrong response (== solution on 'plain' prompts)."""
        raise NotImplementedError

    def random_error(self, record: dict, rng: random.Random) -> str:
        """A plausible wrong response: graded wrong, and never equal to the misconception."""
        raise NotImplementedError

    def noisy_response(self, record: dict, rng: random.Random, mix: NoiseMix) -> str:
        """A pretraining response: misconception / random error / correct, per ``mix``; with
        ``mix.check_rate``, the family's ``marked_response`` (check marks that make errors rarer)."""
        if mix.check_rate:
            return self.marked_response(record, rng, mix)
        u = rng.random()
        if u < mix.misconception:
            return self.misconception(record)
        if u < mix.misconception + mix.random_error:
            return self.random_error(record, rng)
        return self.solution(record)

    def marked_response(self, record: dict, rng: random.Random, mix: NoiseMix) -> str:
        """A response carrying check marks: only families whose grader skips them define it (math)."""
        raise UserError(f"the {self.domain} domain's responses cannot carry check marks (its grader reads the "
                        "whole response); check_rate is for math")

    def _base(self, key: Any) -> dict:
        return {"domain": self.domain, "grader": self.grader}
