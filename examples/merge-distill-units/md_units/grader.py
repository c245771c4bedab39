"""Grade unit conversions: the last ``\\answer{<number> <unit>}`` against the record's
``answer`` (a number, as a string) and ``unit``.

Pass iff the number equals the answer (relative tolerance 1e-9) and the unit is the same
after aliases (``m`` = ``meters`` = ``metre``, ``h`` = ``hours``, ...; case-insensitive).
Everything else is "fail" with a short detail.  Pure Python and in-process: it never
executes model text, so it needs no sandbox.
"""

from __future__ import annotations

import math
import re

from merge_distill.errors import UserError
from merge_distill.graders.base import GraderBase, Verdict

_ALIASES = {
    "m": ("meter", "meters", "metre", "metres"),
    "km": ("kilometer", "kilometers", "kilometre", "kilometres"),
    "cm": ("centimeter", "centimeters", "centimetre", "centimetres"),
    "mm": ("millimeter", "millimeters", "millimetre", "millimetres"),
    "g": ("gram", "grams", "gr"),
    "kg": ("kilogram", "kilograms", "kilo", "kilos"),
    "mg": ("milligram", "milligrams"),
    "l": ("liter", "liters", "litre", "litres"),
    "ml": ("milliliter", "milliliters", "millilitre", "millilitres"),
    "h": ("hr", "hrs", "hour", "hours"),
    "min": ("mins", "minute", "minutes"),
    "s": ("sec", "secs", "second", "seconds"),
}
_CANONICAL = {alias: unit for unit, aliases in _ALIASES.items() for alias in (unit, *aliases)}

_ANSWER = re.compile(r"\\answer\{([^{}]*)\}")
_QUANTITY = re.compile(r"^([-+]?(?:\d+(?:,\d{3})*(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?)\s*([A-Za-z]*)\.?$")


def canonical_unit(unit: str) -> str:
    """The canonical spelling of a unit (lower case); unknown units are just lower-cased."""
    u = unit.strip().lower()
    return _CANONICAL.get(u, u)


def extract_answer(text: str) -> str | None:
    """The content of the last ``\\answer{...}``, stripped; None if there is none."""
    matches = _ANSWER.findall(text)
    return matches[-1].strip() if matches else None


def parse_quantity(text: str) -> tuple[float, str] | None:
    """``"3,000 m"`` -> ``(3000.0, "m")``; the unit may be empty; None if it does not parse."""
    match = _QUANTITY.match(text.strip())
    if not match:
        return None
    return float(match.group(1).replace(",", "")), match.group(2)


class UnitsGrader(GraderBase):
    """Grader ``units``: records need ``answer`` and ``unit``."""

    name = "units"

    def __init__(self, rel_tol: float = 1e-9):
        self.rel_tol = float(rel_tol)

    def check_record(self, record: dict) -> None:
        missing = [k for k in ("answer", "unit") if k not in record]
        if missing:
            raise UserError(f"units grader: record {record.get('task_id', '?')} lacks {', '.join(missing)}")

    def grade_many(self, records: list[dict], completions: list[str]) -> list[Verdict]:
        self._check_lengths(records, completions)
        return [self._grade_one(r, c) for r, c in zip(records, completions)]

    def _grade_one(self, record: dict, completion: str) -> Verdict:
        self.check_record(record)
        content = extract_answer(completion)
        if content is None:
            return Verdict.of("fail", "no \\answer{...} found")
        quantity = parse_quantity(content)
        if quantity is None:
            return Verdict.of("fail", f"cannot parse {content!r} as '<number> <unit>'")
        number, unit = quantity
        expected = float(record["answer"])
        if not math.isclose(number, expected, rel_tol=self.rel_tol, abs_tol=0.0):
            return Verdict.of("fail", f"wrong number: got {content!r}, expected {record['answer']}")
        if canonical_unit(unit) != canonical_unit(record["unit"]):
            detail = f"wrong unit: got {unit!r}, expected {record['unit']!r}" if unit else "no unit given"
            return Verdict.of("fail", detail)
        return Verdict.of("pass")
