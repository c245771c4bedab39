"""What every grader returns and promises."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

VERDICTS = ("pass", "fail", "timeout", "runtime_error", "memory", "syntax_error", "sandbox_error")


@dataclass(frozen=True)
class Verdict:
    """The grade of one completion. ``verdict`` is "pass" only when every test ran and passed."""

    verdict: str
    score: float
    detail: str = ""

    def __post_init__(self):
        if self.verdict not in VERDICTS:
            raise ValueError(f"unknown verdict {self.verdict!r}; expected one of {', '.join(VERDICTS)}")

    @property
    def passed(self) -> bool:
        return self.verdict == "pass"

    @classmethod
    def of(cls, verdict: str, detail: str = "") -> "Verdict":
        """A verdict with its score (1.0 for pass, else 0.0) and a detail cut to one short line."""
        return cls(verdict, 1.0 if verdict == "pass" else 0.0, short(detail))


def short(text: str, limit: int = 200) -> str:
    """One line, at most `limit` characters."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


@runtime_checkable
class Grader(Protocol):
    """What callers may rely on. Graders holding processes also offer ``close()`` and ``with``
    (GraderBase provides both); callers should use ``getattr(g, "close", None)``.

    Optional: a class attribute ``metric``, "avg" (avg@k, the default where absent) or "pass" (pass@k):
    the metric of suites graded by it that do not name one (``merge_distill.graders.grader_metric``).
    Not a protocol member, so graders without it still satisfy ``isinstance(g, Grader)``.

    Optional: a class attribute ``runs_code = True`` for a grader that runs model-written code. Such a
    grader's factory takes an ``isolation`` option ("bubblewrap" or "rlimits"), which ``get_grader`` fills in
    with the run's level, and the commands check that level before anything runs
    (``merge_distill.graders.sandbox_level``)."""

    name: str

    def grade_many(self, records: list[dict], completions: list[str]) -> list[Verdict]: ...

    def grade(self, record: dict, completion: str) -> Verdict: ...


class GraderBase:
    """Shared conveniences: grade(), close(), context manager; the default ``metric`` "avg"."""

    name = "base"
    metric = "avg"
    runs_code = False

    def grade_many(self, records: list[dict], completions: list[str]) -> list[Verdict]:  # pragma: no cover
        raise NotImplementedError

    def grade(self, record: dict, completion: str) -> Verdict:
        return self.grade_many([record], [completion])[0]

    def check_record(self, record: dict) -> None:
        """Raise UserError if `record` lacks what this grader needs."""

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @staticmethod
    def _check_lengths(records: list, completions: list) -> None:
        if len(records) != len(completions):
            raise ValueError(f"{len(records)} records but {len(completions)} completions")
