"""Code grader: run a completion against its tests in the sandbox.

Two record shapes:

* HumanEval: ``{"task_id", "prompt", "test", "entry_point"}``; the program is
  ``prompt + code + "\\n" + test + "\\ncheck(<entry_point>)\\n"``.
* MBPP: ``{"task_id", "prompt", "test_list": [assert ...], "test_setup_code"?}``; the prompt is
  natural language and not part of the program, which is ``code + setup + asserts``.

``code`` is the completion itself, or, when the completion contains fenced blocks, the **last**
``python``/``py``/``python3`` block (the last bare block if none is tagged). The last block is the
one chat and reasoning models put their final answer in; earlier blocks tend to be drafts or the
restated signature. An unterminated fence (a truncated generation) runs to the end of the text.

Verdicts: every test ran and passed -> "pass"; an assertion failed -> "fail"; the program did not
compile -> "syntax_error"; any other exception, an early exit or a fatal signal ->
"runtime_error"; the wall/CPU limit -> "timeout"; MemoryError under the address-space limit ->
"memory"; the sandbox itself failed -> "sandbox_error".
"""

from __future__ import annotations

import re

from merge_distill.errors import UserError
from merge_distill.graders.base import GraderBase, Verdict
from merge_distill.sandbox import RunResult, Sandbox

_FENCE = re.compile(r"^[ \t]*```[ \t]*([\w+.-]*)[^\n]*\n(.*?)(?:^[ \t]*```|\Z)", re.S | re.M)
_PYTHON_TAGS = {"python", "py", "python3", "py3"}


def extract_code(completion: str) -> str:
    """The code to run from a completion (see the module docstring for the fence rule)."""
    blocks = [(m.group(1).lower(), m.group(2)) for m in _FENCE.finditer(completion)]
    tagged = [body for tag, body in blocks if tag in _PYTHON_TAGS]
    bare = [body for tag, body in blocks if not tag]
    if tagged:
        return tagged[-1]
    if bare:
        return bare[-1]
    return completion


def task_shape(record: dict) -> str:
    """ "mbpp" or "humaneval"; UserError naming the task when it is neither."""
    if "test_list" in record:
        tests = record["test_list"]
        if not isinstance(tests, list) or not all(isinstance(t, str) for t in tests):
            raise UserError(f"code task {record.get('task_id')!r}: 'test_list' must be a list of strings")
        return "mbpp"
    if "test" in record and "entry_point" in record:
        if not isinstance(record["test"], str) or not isinstance(record["entry_point"], str):
            raise UserError(f"code task {record.get('task_id')!r}: 'test' and 'entry_point' must be strings")
        return "humaneval"
    raise UserError(
        f"code task {record.get('task_id')!r}: needs 'test_list' (MBPP shape) or 'test' and "
        f"'entry_point' (HumanEval shape)"
    )


def build_program(record: dict, completion: str) -> str:
    """The full program that passes only if the completion is correct."""
    code = extract_code(completion)
    if task_shape(record) == "mbpp":
        setup = record.get("test_setup_code") or ""
        return "\n".join([code, setup, *record["test_list"], ""])
    return f"{record.get('prompt', '')}{code}\n{record['test']}\ncheck({record['entry_point']})\n"


def _last_line(text: str) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip() and not ln.startswith("[")]
    return lines[-1].strip() if lines else ""


def verdict_from_run(result: RunResult) -> Verdict:
    """Map a sandbox outcome to a grading verdict."""
    if result.status == "ok":
        return Verdict.of("pass")
    if result.status == "error":
        if result.phase == "compile":
            return Verdict.of("syntax_error", _last_line(result.stderr) or result.exception)
        if result.exception == "AssertionError":
            return Verdict.of("fail", _last_line(result.stderr) or "AssertionError")
        if result.exception == "EarlyExit":
            return Verdict.of("runtime_error", f"exited with status {result.returncode} before the tests finished")
        return Verdict.of("runtime_error", _last_line(result.stderr) or result.exception)
    if result.status == "timeout":
        return Verdict.of("timeout", f"exceeded the time limit ({result.duration:.1f} s)")
    if result.status == "memory":
        return Verdict.of("memory", "exceeded the memory limit")
    if result.status == "killed":
        return Verdict.of("runtime_error", f"killed by {result.exception or 'a signal'}; {_last_line(result.stderr)}")
    return Verdict.of("sandbox_error", _last_line(result.stderr))


class CodeGrader(GraderBase):
    """Grade code completions by running their tests in a :class:`~merge_distill.sandbox.Sandbox`.

    Options: ``timeout_s`` wall-clock seconds per program (3 s suits zoo-sized tasks and
    HumanEval), ``memory_mb`` address space per program, ``workers`` sandbox workers (default: CPU
    count), ``isolation`` ("bubblewrap", the default, or "rlimits" when the user asks for it; see
    :func:`merge_distill.sandbox.require_isolation`). The sandbox starts on first use and is reused across
    calls; ``close()`` (or ``with``) stops it, and it is stopped at exit anyway.
    """

    name = "code"
    metric = "pass"  # suites of code tasks report pass@k unless they say otherwise
    runs_code = True  # get_grader passes it the run's isolation level

    def __init__(self, timeout_s: float = 3.0, memory_mb: int = 1024, workers: int | None = None,
                 isolation: str = "bubblewrap"):
        if timeout_s <= 0:
            raise UserError(f"code grader: timeout_s must be positive, got {timeout_s}")
        if isolation not in ("bubblewrap", "rlimits", "auto"):
            raise UserError(f"code grader: isolation must be bubblewrap or rlimits, got {isolation!r}")
        self.timeout_s = float(timeout_s)
        self.memory_mb = int(memory_mb)
        self.sandbox = Sandbox(workers, isolation=isolation)

    @property
    def isolation(self) -> str:
        return self.sandbox.isolation

    def check_record(self, record: dict) -> None:
        task_shape(record)

    def grade_many(self, records: list[dict], completions: list[str]) -> list[Verdict]:
        self._check_lengths(records, completions)
        programs = [build_program(r, c) for r, c in zip(records, completions)]
        results = self.sandbox.run(programs, timeout_s=self.timeout_s, memory_mb=self.memory_mb)
        return [verdict_from_run(r) for r in results]

    def close(self) -> None:
        self.sandbox.close()

    def __repr__(self) -> str:
        return f"CodeGrader(timeout_s={self.timeout_s}, memory_mb={self.memory_mb})"


__all__ = ["CodeGrader", "build_program", "extract_code", "task_shape", "verdict_from_run"]
