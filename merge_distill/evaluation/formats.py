"""Record formats of evaluation data, and normalising records of each into suite records.

A format names the shape of a data file's records: ``aime`` (``problem``/``question`` and
``answer``), ``humaneval`` (``prompt``, ``test``, ``entry_point``), ``mbpp`` (``text`` and a
``test_list``) or ``prompt`` (a ``prompt`` string); ``auto`` detects it from the first record's keys.
Normalising gives each record a string ``task_id`` and the model-facing ``prompt`` and keeps
every original field for the grader. Suites (:mod:`merge_distill.evaluation.suites`) are built
from normalised records.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal

from merge_distill.errors import UserError

Format = Literal["auto", "aime", "humaneval", "mbpp", "prompt"]


def _get(record: dict[str, Any], *keys: str) -> Any:
    """First present value among ``keys``, matching keys case-insensitively."""
    lowered = {str(k).lower(): v for k, v in record.items()}
    for key in keys:
        if lowered.get(key) is not None:
            return lowered[key]
    return None


def detect_format(record: dict[str, Any]) -> str:
    """Guess a record's format from its keys (``auto`` resolution)."""
    keys = {str(k).lower() for k in record}
    if "test_list" in keys:
        return "mbpp"
    if {"prompt", "test", "entry_point"} <= keys:
        return "humaneval"
    if keys & {"problem", "question"} and "answer" in keys:
        return "aime"
    if "prompt" in keys:
        return "prompt"
    raise ValueError(f"cannot tell the format from keys {sorted(keys)}")


def mbpp_prompt(text: str, test_list: list[str]) -> str:
    """MBPP-style prompt: the task text plus the first test as an example of the interface."""
    prompt = text.strip()
    if test_list:
        prompt += "\nYour code should pass these tests:\n" + test_list[0]
    return prompt


def normalize_record(record: dict[str, Any], fmt: str, index: int, suite_name: str) -> dict[str, Any]:
    """Return a copy of ``record`` with a string ``task_id`` and the model-facing ``prompt``."""
    out = dict(record)
    task_id = _get(record, "task_id", "id")
    out["task_id"] = str(task_id) if task_id is not None else f"{suite_name}/{index}"
    if fmt == "aime":
        problem, answer = _get(record, "problem", "question"), _get(record, "answer")
        if problem is None or answer is None:
            raise ValueError("an aime-format record needs 'problem' and 'answer'")
        out.update(problem=str(problem), answer=str(answer), prompt=str(problem))
    elif fmt == "humaneval":
        missing = [k for k in ("prompt", "test", "entry_point") if k not in record]
        if missing:
            raise ValueError(f"a humaneval-format record needs {missing}")
    elif fmt == "mbpp":
        text, tests = _get(record, "text", "prompt"), record.get("test_list")
        if text is None or not isinstance(tests, list):
            raise ValueError("an mbpp-format record needs 'text' (or 'prompt') and a 'test_list'")
        out["text"] = str(text)
        out["prompt"] = mbpp_prompt(str(text), [str(t) for t in tests])
    elif fmt == "prompt":
        if not isinstance(record.get("prompt"), str):
            raise ValueError("a prompt-format record needs a 'prompt' string")
    else:
        raise ValueError(f"unknown format '{fmt}'")
    return out


def normalize_records(
    records: Iterable[dict[str, Any]], fmt: str, suite_name: str, where: str
) -> tuple[list[dict[str, Any]], str]:
    """Normalise all records; returns them and the resolved format. Errors name ``where``."""
    records = list(records)
    if fmt == "auto":
        try:
            fmt = detect_format(records[0])
        except ValueError as e:
            raise UserError(f"{where}: {e}; set 'format' in a suite YAML") from None
    out = []
    for i, record in enumerate(records):
        try:
            out.append(normalize_record(record, fmt, i, suite_name))
        except ValueError as e:
            raise UserError(f"{where}: record {i}: {e}") from None
    return out, fmt
