"""Synthetic task families for the toy world: small, deterministic, pure Python.

Three families, one per domain, each with a *systematic misconception* (a wrong procedure
that only changes the answer on some prompts) and *random errors* (plausible wrong
answers).  A pretraining corpus mixes correct, misconceived and randomly wrong responses
(:class:`NoiseMix`), so a base model pretrained on it is mediocre, and RL with a 0/1
grader reward has something to fix.

``math`` -- :class:`ArithmeticTasks` (grader ``math``)
    Prompt ``"47+38="``; correct response ``"\\boxed{85}"``.  Two-operand addition and
    subtraction of 2-digit numbers (10..99; subtraction with a >= b).  Misconception:
    forgotten carry (each column's digit sum mod 10, the leftmost column written in
    full: 47+38 -> 75, 67+58 -> 115) and forgotten borrow (each column's absolute
    difference: 52-38 -> 26).  It bites when some non-leading column carries/borrows,
    i.e. ~43% of the 12195 problems.  Option ``hard=True``: 3-digit operands (100..999;
    1215450 problems, ~68% misconception-prone).  ``hard`` only widens the numbers: the
    harder world where the base's greedy answer is the misconception comes from the
    :class:`NoiseMix` (misconception share above the correct share).

``code`` -- :class:`StringFunctionTasks` (grader ``code``, MBPP-shaped records)
    Prompt ``"f(s): reverse, drop 2"``; correct response ``"def f(s): return s[::-1][2:]"``
    (always this one-line format; prompt <= 40 chars, response <= 48).  A spec is a
    left-to-right composition of 1..max_ops (default 2) string ops of distinct kinds, at
    most one of them a slicing op (see :data:`OP_KINDS`).  Misconception: off-by-one
    slicing (``drop k`` -> ``[k-1:]``, ``take k`` -> ``[:k+1]``, ``drop last k`` ->
    ``[:-(k-1)]``, ``take last k`` -> ``[-(k+1):]``); it bites exactly on specs with a
    slicing op (~48% of the space).  Space: 4155 sound specs with max_ops=2 (79 with one
    op); ``max_ops=3`` gives a much larger space (~70% misconception-prone).

``units`` -- :class:`UnitConversionTasks` (grader ``units``, shipped as the example plugin
    ``examples/merge-distill-units``)
    Prompt ``"3 km to m"``; correct response ``"3*1000=3000 \\answer{3000 m}"`` (or
    ``"250/100=2.5 \\answer{2.5 m}"`` towards the larger unit; prompt <= 24 chars, response
    <= 40).  Misconception: decimal time (100 min in an hour, 100 s in a minute, 10000 s in
    an hour); it bites exactly on the time conversions, 6 of the 14 conversions, ~43% of
    the 13986 problems.

Problem identity and splits: a problem is identified by its operands (math), its
spec (code) or its (from unit, to unit, value) (units); records are a pure function of
the identity (the code tests' input strings are seeded by the spec).  :func:`make_splits`
draws a simple random sample (without replacement, uniform over the family's problem
space) for test first, then for train from what is left, so train and test are disjoint
and identically distributed.  The test draw does not depend on ``n_train``, and test(n)
is a prefix of test(m) for n <= m: a train split made with ``n_test=m`` never contains a
problem of a test split made with the same seed and ``n_test <= m``.  If the space is
too small, ``n_train`` is capped at what is left (see :meth:`TaskFamily.space_size`).
"""

from __future__ import annotations

import functools
import inspect
import random
import string
from dataclasses import dataclass
from decimal import Decimal
from fractions import Fraction
from typing import Any, ClassVar

from merge_distill.errors import UserError

# ----------------------------------------------------------------------------- noise


@dataclass(frozen=True)
class NoiseMix:
    """How pretraining responses are corrupted: each response is independently the
    misconception (share ``misconception``; equal to the correct response on prompts
    where the misconception does not bite), a random plausible error (share
    ``random_error``; always graded wrong), or else correct."""

    misconception: float = 0.35
    random_error: float = 0.25

    def __post_init__(self) -> None:
        for name in ("misconception", "random_error"):
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
        """A pretraining response: misconception / random error / correct, per ``mix``."""
        u = rng.random()
        if u < mix.misconception:
            return self.misconception(record)
        if u < mix.misconception + mix.random_error:
            return self.random_error(record, rng)
        return self.solution(record)

    def _base(self, key: Any) -> dict:
        return {"domain": self.domain, "grader": self.grader}


# ----------------------------------------------------------------------------- math


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

    def _worked(self, record: dict, mode: str, rng: random.Random | None = None) -> str:
        """Column-by-column working, least significant digit first, then the boxed answer.

        ``mode`` is ``correct``, ``misconception`` (no carry / no borrow) or ``random`` (one column's
        fact is wrong; later columns follow from it). Working makes each step a local, learnable
        fact for a tiny model, and gives the misconception a visible step (``4+3=7`` for ``4+3+1=8``).
        """
        op, a, b = self.key_of(record)
        da, db = _digits(a, self.width), _digits(b, self.width)
        wrong_col = rng.randrange(self.width) if mode == "random" else -1
        steps, value, carry = [], 0, 0
        for i in range(self.width):
            last = i == self.width - 1
            if op == "+":
                c = 0 if mode == "misconception" else carry
                r = da[i] + db[i] + c
                fact = f"{da[i]}+{db[i]}{'+1' if c else ''}"
            else:
                if mode == "misconception":
                    top, bottom = max(da[i], db[i]), min(da[i], db[i])
                    borrow = 0
                else:
                    top, bottom = da[i] - carry, db[i]
                    borrow = int(top < bottom and not last)
                    top += 10 * borrow
                r = top - bottom
                fact = f"{top}-{bottom}"
            if i == wrong_col:
                r = max(0, r + rng.choice((-3, -2, -1, 1, 2, 3)))
            steps.append(f"{fact}={r}")
            if op == "+":
                carry = r // 10 if not last else 0
                value += (r if last else r % 10) * 10**i
            else:
                carry = borrow
                value += (r if last else r % 10) * 10**i
        return " ".join(steps) + f" \\boxed{{{value}}}"

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


# ----------------------------------------------------------------------------- code

# Op kinds, in prompt order.  An op is a tuple (kind,) or (kind, param).
#   kind       prompt            code (e = expression so far)
#   reverse    reverse           e[::-1]
#   upper      upper             e.upper()
#   lower      lower             e.lower()
#   swapcase   swapcase          e.swapcase()
#   repeat k   repeat k          (e*k)          k in 2..4
#   append c   append c          (e+'c')        c in a..z
#   prepend c  prepend c         ('c'+e)        c in a..z
#   drop k     drop k            e[k:]          k in 1..5   misconception e[k-1:]
#   take k     take k            e[:k]          k in 1..5   misconception e[:k+1]
#   droplast k drop last k       e[:-k]         k in 1..5   misconception e[:-(k-1)]
#   takelast k take last k       e[-k:]         k in 1..5   misconception e[-(k+1):]
_LETTERS = string.ascii_lowercase
OP_KINDS: dict[str, tuple] = {
    "reverse": (None,),
    "upper": (None,),
    "lower": (None,),
    "swapcase": (None,),
    "repeat": (2, 3, 4),
    "append": tuple(_LETTERS),
    "prepend": tuple(_LETTERS),
    "drop": (1, 2, 3, 4, 5),
    "take": (1, 2, 3, 4, 5),
    "droplast": (1, 2, 3, 4, 5),
    "takelast": (1, 2, 3, 4, 5),
}
SLICING_KINDS = frozenset({"drop", "take", "droplast", "takelast"})
_ALL_OPS: tuple[tuple, ...] = tuple(
    (kind,) if p is None else (kind, p) for kind, params in OP_KINDS.items() for p in params
)

MAX_PROMPT_CHARS = 40
MAX_RESPONSE_CHARS = 48


def _op_prompt(op: tuple) -> str:
    kind = op[0]
    if kind == "droplast":
        return f"drop last {op[1]}"
    if kind == "takelast":
        return f"take last {op[1]}"
    return kind if len(op) == 1 else f"{kind} {op[1]}"


def _op_code(op: tuple, e: str) -> str:
    kind = op[0]
    p = op[1] if len(op) > 1 else None
    if kind == "reverse":
        return f"{e}[::-1]"
    if kind in ("upper", "lower", "swapcase"):
        return f"{e}.{kind}()"
    if kind == "repeat":
        return f"({e}*{p})"
    if kind == "append":
        return f"({e}+'{p}')"
    if kind == "prepend":
        return f"('{p}'+{e})"
    if kind == "drop":
        return f"{e}[{p}:]"
    if kind == "take":
        return f"{e}[:{p}]"
    if kind == "droplast":
        return f"{e}[:-{p}]"
    if kind == "takelast":
        return f"{e}[-{p}:]"
    raise ValueError(f"unknown op kind {kind!r}")


def _op_apply(op: tuple, x: str) -> str:
    kind = op[0]
    p = op[1] if len(op) > 1 else None
    if kind == "reverse":
        return x[::-1]
    if kind == "upper":
        return x.upper()
    if kind == "lower":
        return x.lower()
    if kind == "swapcase":
        return x.swapcase()
    if kind == "repeat":
        return x * p
    if kind == "append":
        return x + p
    if kind == "prepend":
        return p + x
    if kind == "drop":
        return x[p:]
    if kind == "take":
        return x[:p]
    if kind == "droplast":
        return x[:-p]  # p == 0 (misconceived 'drop last 1') gives x[:0] == '', as [:-0] does
    if kind == "takelast":
        return x[-p:]
    raise ValueError(f"unknown op kind {kind!r}")


def _misconceive(op: tuple) -> tuple:
    kind = op[0]
    if kind in ("drop", "droplast"):
        return (kind, op[1] - 1)
    if kind in ("take", "takelast"):
        return (kind, op[1] + 1)
    return op


def spec_prompt(spec: tuple) -> str:
    return "f(s): " + ", ".join(_op_prompt(op) for op in spec)


def spec_code(spec: tuple) -> str:
    e = "s"
    for op in spec:
        e = _op_code(op, e)
    return f"def f(s): return {e}"


def spec_apply(spec: tuple, x: str) -> str:
    for op in spec:
        x = _op_apply(op, x)
    return x


def _outputs(spec: tuple, inputs: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(spec_apply(spec, x) for x in inputs)


def _test_inputs(spec: tuple, rng: random.Random) -> tuple[str, ...]:
    """4 mixed-case strings of distinct lengths in 6..10, each with both cases."""
    lengths = rng.sample(range(6, 11), 4)
    out = []
    for n in lengths:
        while True:
            s = "".join(rng.choice(string.ascii_letters) for _ in range(n))
            if any(c.islower() for c in s) and any(c.isupper() for c in s):
                break
        out.append(s)
    return tuple(out)


def _spec_ok(spec: tuple, inputs: tuple[str, ...]) -> bool:
    """Whether a spec is a sound problem on these test inputs: non-empty, non-constant
    outputs, not the identity, every op matters, and the misconception fails."""
    outs = _outputs(spec, inputs)
    if any(o == "" for o in outs) or len(set(outs)) == 1 or outs == inputs:
        return False
    for i in range(len(spec)):
        if _outputs(spec[:i] + spec[i + 1 :], inputs) == outs:
            return False
    mis = tuple(_misconceive(op) for op in spec)
    if mis != spec and _outputs(mis, inputs) == outs:
        return False
    return len(spec_prompt(spec)) <= MAX_PROMPT_CHARS and len(spec_code(spec)) <= MAX_RESPONSE_CHARS


@functools.lru_cache(maxsize=1 << 18)
def _spec_inputs(spec: tuple) -> tuple[str, ...] | None:
    """The test inputs for a spec (seeded by the spec), or None if the spec is not in the
    space: ops of distinct kinds, at most one slicing op, and sound (:func:`_spec_ok`)."""
    kinds = [op[0] for op in spec]
    if len(set(kinds)) != len(kinds) or sum(k in SLICING_KINDS for k in kinds) > 1:
        return None
    rng = random.Random("toyworld-code-tests:" + repr(spec))
    for _ in range(8):
        inputs = _test_inputs(spec, rng)
        if _spec_ok(spec, inputs):
            return inputs
    return None


def _count_raw(max_ops: int) -> list[int]:
    """Number of ordered specs of k ops of distinct kinds, for k = 1..max_ops."""
    e = [1] + [0] * max_ops  # elementary symmetric sums of the kinds' param counts
    for params in OP_KINDS.values():
        for k in range(max_ops, 0, -1):
            e[k] += e[k - 1] * len(params)
    out, fact = [], 1
    for k in range(1, max_ops + 1):
        fact *= k
        out.append(e[k] * fact)
    return out


@functools.lru_cache(maxsize=4)
def _code_space(max_ops: int) -> tuple[tuple, ...]:
    """Every sound spec of 1..max_ops ops, in a fixed order."""
    specs: list[tuple] = []

    def extend(prefix: tuple, kinds: frozenset) -> None:
        if prefix and _spec_inputs(prefix) is not None:
            specs.append(prefix)
        if len(prefix) == max_ops:
            return
        for op in _ALL_OPS:
            if op[0] not in kinds:
                extend(prefix + (op,), kinds | {op[0]})

    extend((), frozenset())
    return tuple(specs)


class StringFunctionTasks(TaskFamily):
    """Write ``def f(s): return ...`` for a composition of 1..``max_ops`` string ops.

    Records are MBPP-shaped: ``entry_point`` ``"f"``, ``test_list`` of 4 asserts on
    mixed-case strings of distinct lengths in 6..10 (``test_inputs``), plus ``spec``
    (list of [kind] / [kind, param]).  The space is every sound spec of 1..max_ops ops
    of distinct kinds with at most one slicing op (sound: on the spec's tests every op
    matters, outputs are non-empty, non-constant and not the input, and the
    misconception fails)."""

    domain = "code"
    grader = "code"

    def __init__(self, max_ops: int = 2):
        if max_ops not in (1, 2, 3):
            raise UserError(f"StringFunctionTasks max_ops must be 1, 2 or 3, got {max_ops}")
        self.max_ops = max_ops
        self._raw_by_len = _count_raw(max_ops)

    def _sample_raw(self, rng: random.Random) -> tuple:
        """Uniform over ordered specs of 1..max_ops ops of distinct kinds."""
        n = rng.choices(range(1, self.max_ops + 1), weights=self._raw_by_len)[0]
        while True:
            ops = tuple(rng.choice(_ALL_OPS) for _ in range(n))
            if len({op[0] for op in ops}) == n:
                return ops

    def _sample_key(self, rng: random.Random) -> tuple:
        while True:
            spec = self._sample_raw(rng)
            if _spec_inputs(spec) is not None:
                return spec

    def _all_keys(self) -> list | None:
        return list(_code_space(self.max_ops)) if self.max_ops <= 2 else None

    def space_size(self) -> int:
        """Number of sound specs (max_ops=3 enumerates ~200k specs: tens of seconds)."""
        return len(_code_space(self.max_ops))

    def key_of(self, record: dict) -> tuple:
        return tuple(tuple(op) for op in record["spec"])

    def _record(self, spec: tuple) -> dict:
        inputs = _spec_inputs(spec)
        if inputs is None:
            raise ValueError(f"unsound spec {spec!r}")
        prompt = spec_prompt(spec)
        test_list = [f"assert f({x!r}) == {spec_apply(spec, x)!r}" for x in inputs]
        subset = "misconception" if any(op[0] in SLICING_KINDS for op in spec) else "plain"
        return {
            **self._base(spec),
            "prompt": prompt,
            "subset": subset,
            "entry_point": "f",
            "test_list": test_list,
            "test_setup_code": "",
            "spec": [list(op) for op in spec],
            "test_inputs": list(inputs),
        }

    def solution(self, record: dict) -> str:
        return spec_code(self.key_of(record))

    def misconception(self, record: dict) -> str:
        return spec_code(tuple(_misconceive(op) for op in self.key_of(record)))

    def random_error(self, record: dict, rng: random.Random) -> str:
        spec = self.key_of(record)
        inputs = tuple(record["test_inputs"])
        right = _outputs(spec, inputs)
        avoid = {self.solution(record), self.misconception(record)}
        for _ in range(200):
            i = rng.randrange(len(spec))
            kind = spec[i][0]
            if len(OP_KINDS[kind]) > 1 and rng.random() < 0.5:
                new = (kind, rng.choice([p for p in OP_KINDS[kind] if p != spec[i][1]]))
            else:
                others = {op[0] for j, op in enumerate(spec) if j != i}
                new = rng.choice([op for op in _ALL_OPS if op[0] != kind and op[0] not in others])
            wrong = spec[:i] + (new,) + spec[i + 1 :]
            code = spec_code(wrong)
            if code not in avoid and len(code) <= MAX_RESPONSE_CHARS and _outputs(wrong, inputs) != right:
                return code
        raise RuntimeError(f"no random error found for {spec!r}")  # pragma: no cover


# ----------------------------------------------------------------------------- units

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


# ----------------------------------------------------------------------------- splits

FAMILIES: dict[str, type[TaskFamily]] = {
    "math": ArithmeticTasks,
    "code": StringFunctionTasks,
    "units": UnitConversionTasks,
}

DEFAULT_N_TEST = 2000


def make_family(domain: str, **family_options: Any) -> TaskFamily:
    if domain not in FAMILIES:
        raise UserError(f"unknown toy domain {domain!r} (known: {', '.join(FAMILIES)})")
    cls = FAMILIES[domain]
    allowed = _family_option_names(cls)
    unknown = set(family_options) - allowed
    if unknown:
        raise UserError(f"toy domain {domain!r}: unknown option(s) {sorted(unknown)} (allowed: {sorted(allowed)})")
    return cls(**family_options)


def _family_option_names(cls: type[TaskFamily]) -> set[str]:
    return set(inspect.signature(cls.__init__).parameters) - {"self"}


def _draw_keys(family: TaskFamily, rng: random.Random, n_test: int, n_train: int) -> tuple[list, list]:
    """(test keys, train keys): a uniform random sample without replacement, test first."""
    keys = family._all_keys()
    if keys is not None:  # small space: a seeded random permutation of the whole space
        if n_test > len(keys):
            raise UserError(f"toy domain {family.domain!r}: n_test={n_test} exceeds its {len(keys)} problems")
        rng.shuffle(keys)
        return keys[:n_test], keys[n_test : n_test + n_train]
    seen: set = set()
    out: list[list] = [[], []]
    for which, n in ((0, n_test), (1, n_train)):
        budget = 50 * n + 1000
        while len(out[which]) < n and budget > 0:
            budget -= 1
            key = family._sample_key(rng)
            if key not in seen:
                seen.add(key)
                out[which].append(key)
        if which == 0 and len(out[0]) < n_test:  # pragma: no cover - only for tiny spaces
            raise UserError(f"toy domain {family.domain!r}: could not draw {n_test} distinct test problems")
    return out[0], out[1]


def make_splits(
    domain: str, n_train: int, n_test: int, seed: int, **family_options: Any
) -> tuple[list[dict], list[dict]]:
    """Disjoint (train, test) record lists for ``domain``, deterministic given ``seed``.

    Test is a uniform random sample of ``n_test`` problems of the family's space (it does
    not depend on ``n_train``, and a smaller ``n_test`` gives a prefix of a larger one);
    train is a uniform random sample of ``n_train`` of the *remaining* problems, so no
    test problem (by identity: operands / spec) appears in train.  When the space is too
    small, train is capped at the ``space_size - n_test`` problems left (e.g. math:
    12195 problems, so n_test=2000 leaves at most 10195 train; code (max_ops=2): 4155,
    leaving 2155); ``n_test`` larger than the space is an error.  ``task_id``\\ s are
    ``"<domain>/<split>/<index:06d>"``.  ``family_options`` go to the family
    (math: ``hard``; code: ``max_ops``; units: none)."""
    if n_train < 0 or n_test < 0:
        raise UserError(f"make_splits: n_train and n_test must be >= 0 (got {n_train}, {n_test})")
    family = make_family(domain, **family_options)
    rng = random.Random(f"toyworld-splits:{domain}:{seed}")
    test_keys, train_keys = _draw_keys(family, rng, n_test, n_train)

    def records(keys: list, split: str) -> list[dict]:
        width = max(6, len(str(max(len(keys) - 1, 0))))
        return [{"task_id": f"{domain}/{split}/{i:0{width}d}", **family._record(k)} for i, k in enumerate(keys)]

    return records(train_keys, "train"), records(test_keys, "test")


def pretraining_corpus(
    domains: list[str],
    n_per_domain: int,
    seed: int,
    mix: NoiseMix,
    *,
    n_test: int = DEFAULT_N_TEST,
    **family_options: Any,
) -> list[tuple[str, str]]:
    """Shuffled (prompt, noisy response) pairs, ``n_per_domain`` per domain, from TRAIN
    problems only: ``make_splits(domain, n_per_domain, n_test, seed)``'s train split, so
    no problem of a test split made with the same seed and any ``n_test`` up to this one
    (default 2000) leaks.  If train has fewer problems than ``n_per_domain`` it is cycled
    (each occurrence gets an independent noisy response).  ``family_options`` go to the
    families that accept them (``hard`` -> math, ``max_ops`` -> code); an option no
    requested family accepts is an error."""
    if n_per_domain < 0:
        raise UserError(f"pretraining_corpus: n_per_domain must be >= 0 (got {n_per_domain})")
    for d in domains:
        if d not in FAMILIES:
            raise UserError(f"unknown toy domain {d!r} (known: {', '.join(FAMILIES)})")
    accepted = set().union(*(_family_option_names(FAMILIES[d]) for d in domains)) if domains else set()
    unknown = set(family_options) - accepted
    if unknown:
        raise UserError(f"pretraining_corpus: option(s) {sorted(unknown)} accepted by none of {list(domains)}")
    pairs: list[tuple[str, str]] = []
    for domain in domains:
        opts = {k: v for k, v in family_options.items() if k in _family_option_names(FAMILIES[domain])}
        family = make_family(domain, **opts)
        train, _ = make_splits(domain, n_per_domain, n_test, seed, **opts)
        if not train:
            if n_per_domain:
                raise UserError(f"pretraining_corpus: no train problems left for {domain!r} (n_test={n_test})")
            continue
        rng = random.Random(f"toyworld-corpus:{domain}:{seed}")
        for i in range(n_per_domain):
            record = train[i % len(train)]
            pairs.append((record["prompt"], family.noisy_response(record, rng, mix)))
    random.Random(f"toyworld-corpus-shuffle:{seed}").shuffle(pairs)
    return pairs
