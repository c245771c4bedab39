"""The ``code`` toy domain: :class:`StringFunctionTasks` (grader ``code``, MBPP-shaped records).

Prompt ``"f(s): reverse, drop 2"``; correct response ``"def f(s): return s[::-1][2:]"``
(always this one-line format; prompt <= 40 chars, response <= 48).  A spec is a
left-to-right composition of 1..max_ops (default 2) string ops of distinct kinds, at
most one of them a slicing op (see :data:`OP_KINDS`).  Misconception: off-by-one
slicing (``drop k`` -> ``[k-1:]``, ``take k`` -> ``[:k+1]``, ``drop last k`` ->
``[:-(k-1)]``, ``take last k`` -> ``[-(k+1):]``); it bites exactly on specs with a
slicing op (~48% of the space).  Space: 4155 sound specs with max_ops=2 (79 with one
op); ``max_ops=3`` gives a much larger space (~70% misconception-prone).
"""

from __future__ import annotations

import functools
import random
import string

from merge_distill.errors import UserError
from merge_distill.toyworld.tasks.family import TaskFamily

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
