"""The ``units`` toy domain: :class:`UnitConversionTasks` (grader ``units``, shipped as the
example plugin ``examples/merge-distill-units``).

Prompt ``"3 km to m"``; correct response ``"3*1000=3000 \\answer{3000 m}"`` (or
``"250/100=2.5 \\answer{2.5 m}"`` towards the larger unit; prompt <= 24 chars, response
<= 40).  Misconception: decimal time (100 min in an hour, 100 s in a minute, 10000 s in
an hour); it bites exactly on the time conversions, 6 of the 14 conversions, ~43% of
the 13986 problems.
"""

from __future__ import annotations

import random
from decimal import Decimal
from fractions import Fraction

from merge_distill.toyworld.tasks.family import TaskFamily

# (larger unit, smaller unit, factor, misconceived factor).  The misconception is decimal time.
UNIT_PAIRS: tuple[tuple[str, str, int, int], ...] = (
    ("km", "m", 1000, 1000),
    ("m", "cm", 100, 100),
    ("kg", "g", 1000, 1000),
    ("L", "mL", 1000, 1000),
    ("h", "min", 60, 100),
    ("min", "s", 60, 100),
    ("h", "s", 3600, 10000),
)
UNITS_N = 999  # values per conversion (see UnitConversionTasks)
MAX_UNITS_PROMPT_CHARS = 24
MAX_UNITS_RESPONSE_CHARS = 40


def _terminates(x: Fraction) -> bool:
    d = x.denominator
    for p in (2, 5):
        while d % p == 0:
            d //= p
    return d == 1


def _fmt_number(x: Fraction) -> str:
    """Exact, shortest decimal for a terminating fraction: 3000, 2.5, 0.036."""
    if not _terminates(x):
        raise ValueError(f"{x} has no finite decimal form")
    return format((Decimal(x.numerator) / Decimal(x.denominator)).normalize(), "f")


def _units_response(value: int, op: str, factor: int, result: Fraction, unit: str) -> str:
    return f"{value}{op}{factor}={_fmt_number(result)} \\answer{{{_fmt_number(result)} {unit}}}"


class UnitConversionTasks(TaskFamily):
    """``"<value> <unit> to <unit>"`` over :data:`UNIT_PAIRS`, both directions; answers are
    ``\\answer{<number> <unit>}`` after one worked step (``3*1000=3000`` / ``250/100=2.5``).

    Towards the smaller unit the value is ``n`` (1..999, integer answers); towards the
    larger unit it is ``n * factor / 10`` so the answer is ``n / 10`` (0.1..99.9).  Space:
    7 pairs x 2 directions x 999 = 13986 problems; the misconception (decimal time) bites on
    the 3 time pairs, 6/14 ~ 43%."""

    domain = "units"
    grader = "units"

    _PAIRS = {(big, small): (factor, mis) for big, small, factor, mis in UNIT_PAIRS}

    @staticmethod
    def _conversions() -> list[tuple[str, str]]:
        return [c for big, small, _, _ in UNIT_PAIRS for c in ((big, small), (small, big))]

    @classmethod
    def _value(cls, src: str, dst: str, n: int) -> int:
        if (src, dst) in cls._PAIRS:  # to the smaller unit: multiply
            return n
        return n * cls._PAIRS[(dst, src)][0] // 10

    def space_size(self) -> int:
        return len(UNIT_PAIRS) * 2 * UNITS_N

    def _sample_key(self, rng: random.Random) -> tuple[str, str, int]:
        src, dst = rng.choice(self._conversions())
        return (src, dst, self._value(src, dst, rng.randint(1, UNITS_N)))

    def _all_keys(self) -> list | None:
        return [(src, dst, self._value(src, dst, n)) for src, dst in self._conversions() for n in range(1, UNITS_N + 1)]

    def key_of(self, record: dict) -> tuple[str, str, int]:
        return (record["from_unit"], record["unit"], record["value"])

    def _step(self, key: tuple[str, str, int], misconceived: bool = False) -> tuple[str, int, Fraction]:
        """(op, factor, result) of the one worked step."""
        src, dst, value = key
        if (src, dst) in self._PAIRS:
            factor = self._PAIRS[(src, dst)][misconceived]
            return "*", factor, Fraction(value * factor)
        factor = self._PAIRS[(dst, src)][misconceived]
        return "/", factor, Fraction(value, factor)

    def _record(self, key: tuple[str, str, int]) -> dict:
        src, dst, value = key
        answer = self._step(key)[2]
        subset = "misconception" if self._step(key, True)[2] != answer else "plain"
        return {
            **self._base(key),
            "prompt": f"{value} {src} to {dst}",
            "subset": subset,
            "answer": _fmt_number(answer),
            "unit": dst,
            "value": value,
            "from_unit": src,
        }

    def _response(self, record: dict, misconceived: bool) -> str:
        key = self.key_of(record)
        op, factor, result = self._step(key, misconceived)
        return _units_response(key[2], op, factor, result, key[1])

    def solution(self, record: dict) -> str:
        return self._response(record, False)

    def misconception(self, record: dict) -> str:
        return self._response(record, True)

    def random_error(self, record: dict, rng: random.Random) -> str:
        """A wrong factor (x10 or /10), the wrong direction, or a slip in the result (one
        digit off, or a zero too many / too few) -- never the answer or the misconception's."""
        key = self.key_of(record)
        value, unit = key[2], key[1]
        op, factor, result = self._step(key)
        avoid = {result, self._step(key, True)[2]}

        def apply(o: str, f: int) -> Fraction:
            return Fraction(value * f) if o == "*" else Fraction(value, f)

        other = "/" if op == "*" else "*"
        candidates = [(op, factor * 10, apply(op, factor * 10)), (other, factor, apply(other, factor))]
        if factor % 100 == 0:
            candidates.append((op, factor // 10, apply(op, factor // 10)))
        for _ in range(3):
            k = rng.randrange(-1, len(str(int(result))))
            slip = result + rng.choice((-1, 1)) * Fraction(10) ** k
            candidates.append((op, factor, slip))
        candidates += [(op, factor, result * 10), (op, factor, result / 10)]
        rng.shuffle(candidates)
        for o, f, r in candidates:
            if r > 0 and r not in avoid and _terminates(r):
                text = _units_response(value, o, f, r, unit)
                if len(text) <= MAX_UNITS_RESPONSE_CHARS:
                    return text
        raise RuntimeError(f"no random error found for {key!r}")  # pragma: no cover
