"""The ``math`` toy domain: :class:`ArithmeticTasks` (grader ``math``).

Prompt ``"47+38="``; correct response ``"\\boxed{85}"``.  Two-operand addition and
subtraction of 2-digit numbers (10..99; subtraction with a >= b).  Misconception:
forgotten carry (each column's digit sum mod 10, the leftmost column written in
full: 47+38 -> 75, 67+58 -> 115) and forgotten borrow (each column's absolute
difference: 52-38 -> 26).  It bites when some non-leading column carries/borrows,
i.e. ~43% of the 12195 problems.  Option ``hard=True``: 3-digit operands (100..999;
1215450 problems, ~68% misconception-prone).  ``hard`` only widens the numbers: the
harder world where the base's greedy answer is the misconception comes from the
:class:`NoiseMix` (misconception share above the correct share).
"""

from __future__ import annotations

import random

from merge_distill.toyworld.tasks.family import CHECK_MARK, NoiseMix, TaskFamily


def _digits(n: int, width: int) -> list[int]:
    """Digits of n, least significant first, padded to width."""
    return [(n // 10**i) % 10 for i in range(width)]


def _no_carry_add(a: int, b: int, width: int) -> int:
    da, db = _digits(a, width), _digits(b, width)
    total = 0
    for i in range(width):
        s = da[i] + db[i]
        if i < width - 1:
            s %= 10
        total += s * 10**i
    return total


def _no_borrow_sub(a: int, b: int, width: int) -> int:
    da, db = _digits(a, width), _digits(b, width)
    return sum(abs(da[i] - db[i]) * 10**i for i in range(width))


class ArithmeticTasks(TaskFamily):
    """``a+b=`` / ``a-b=`` with 2-digit operands (``hard=True``: 3-digit); answers are
    ``\\boxed{N}``.  Space: every ordered addition pair plus every subtraction pair with
    a >= b (2-digit: 8100 + 4095 = 12195 problems; 3-digit: 810000 + 405450 = 1215450)."""

    domain = "math"
    grader = "math"

    def __init__(self, hard: bool = False):
        self.hard = bool(hard)
        self.width = 3 if self.hard else 2
        self.lo, self.hi = 10 ** (self.width - 1), 10**self.width - 1
        n = self.hi - self.lo + 1
        self._n_add = n * n
        self._n_sub = n * (n + 1) // 2

    def space_size(self) -> int:
        return self._n_add + self._n_sub

    def _sample_key(self, rng: random.Random) -> tuple[str, int, int]:
        i = rng.randrange(self.space_size())
        n = self.hi - self.lo + 1
        if i < self._n_add:
            return ("+", self.lo + i // n, self.lo + i % n)
        i -= self._n_add
        # i-th pair (a, b) with a >= b, row-major over a: row r (a = lo + r) has r + 1 entries
        r = int(((8 * i + 1) ** 0.5 - 1) / 2)
        while r * (r + 1) // 2 > i:
            r -= 1
        while (r + 1) * (r + 2) // 2 <= i:
            r += 1
        return ("-", self.lo + r, self.lo + i - r * (r + 1) // 2)

    def _all_keys(self) -> list | None:
        if self.hard:
            return None
        r = range(self.lo, self.hi + 1)
        return [("+", a, b) for a in r for b in r] + [("-", a, b) for a in r for b in r if a >= b]

    def key_of(self, record: dict) -> tuple[str, int, int]:
        return (record["op"], record["a"], record["b"])

    @staticmethod
    def _value(op: str, a: int, b: int) -> int:
        return a + b if op == "+" else a - b

    def _misconceived_value(self, op: str, a: int, b: int) -> int:
        return _no_carry_add(a, b, self.width) if op == "+" else _no_borrow_sub(a, b, self.width)

    def _record(self, key: tuple[str, int, int]) -> dict:
        op, a, b = key
        prompt = f"{a}{op}{b}="
        answer = self._value(op, a, b)
        subset = "misconception" if self._misconceived_value(op, a, b) != answer else "plain"
        return {
            **self._base(key),
            "prompt": prompt,
            "subset": subset,
            "problem": prompt,
            "answer": str(answer),
            "op": op,
            "a": a,
            "b": b,
        }

    def _worked(self, record: dict, mode: str | list[str], rng: random.Random | None = None,
                marks: list[int] | None = None) -> str:
        """Column-by-column working, least significant digit first, then the boxed answer.

        ``mode`` is ``correct``, ``misconception`` (no carry / no borrow) or ``random`` (one column's
        fact is wrong; later columns follow from it). Working makes each step a local, learnable
        fact for a tiny model, and gives the misconception a visible step (``4+3=7`` for ``4+3+1=8``).
        ``mode`` may also be one mode per column, and ``marks`` a number of check marks before each column's fact.
        """
        op, a, b = self.key_of(record)
        da, db = _digits(a, self.width), _digits(b, self.width)
        if isinstance(mode, str):
            wrong_col = rng.randrange(self.width) if mode == "random" else -1
            modes = ["random" if i == wrong_col else mode if mode == "misconception" else "correct"
                     for i in range(self.width)]
        else:
            modes = list(mode)
        marks = marks or [0] * self.width
        steps, value, carry = [], 0, 0
        for i in range(self.width):
            last = i == self.width - 1
            if op == "+":
                c = 0 if modes[i] == "misconception" else carry
                r = da[i] + db[i] + c
                fact = f"{da[i]}+{db[i]}{'+1' if c else ''}"
            else:
                if modes[i] == "misconception":
                    top, bottom = max(da[i], db[i]), min(da[i], db[i])
                    borrow = 0
                else:
                    top, bottom = da[i] - carry, db[i]
                    borrow = int(top < bottom and not last)
                    top += 10 * borrow
                r = top - bottom
                fact = f"{top}-{bottom}"
            if modes[i] == "random":
                r = max(0, r + rng.choice((-3, -2, -1, 1, 2, 3)))
            steps.append(CHECK_MARK * marks[i] + f"{fact}={r}")
            if op == "+":
                carry = r // 10 if not last else 0
                value += (r if last else r % 10) * 10**i
            else:
                carry = borrow
                value += (r if last else r % 10) * 10**i
        return " ".join(steps) + f" \\boxed{{{value}}}"

    def marked_response(self, record: dict, rng: random.Random, mix: NoiseMix) -> str:
        """A pretraining response with check marks: before each column's fact k marks (k geometric, rate
        ``mix.check_rate``), and that column is misconceived / randomly wrong with the mix's shares x gain^k.
        The math grader reads the last \\boxed{} only, so marks never change a verdict."""
        modes, marks = [], []
        for _ in range(self.width):
            k = 0
            while k < mix.max_checks and rng.random() < mix.check_rate:
                k += 1
            scale, u = mix.check_gain ** k, rng.random()
            modes.append("misconception" if u < mix.misconception * scale else
                         "random" if u < (mix.misconception + mix.random_error) * scale else "correct")
            marks.append(k)
        return self._worked(record, modes, rng, marks)

    def solution(self, record: dict) -> str:
        return self._worked(record, "correct")

    def misconception(self, record: dict) -> str:
        return self._worked(record, "misconception")

    def random_error(self, record: dict, rng: random.Random) -> str:
        avoid = {record["answer"], str(self._misconceived_value(*self.key_of(record)))}
        while True:
            text = self._worked(record, "random", rng)
            if _boxed(text) not in avoid and int(_boxed(text)) >= 0:
                return text


def _boxed(text: str) -> str:
    return text[text.rindex("\\boxed{") + 7: -1]
