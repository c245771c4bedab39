"""Synthetic toy-world task families: determinism, splits, misconceptions, noise."""

from __future__ import annotations

import importlib.util
import random
import re

import pytest

from merge_distill.errors import UserError
from merge_distill.toyworld.tasks import (
    FAMILIES,
    MAX_PROMPT_CHARS,
    MAX_RESPONSE_CHARS,
    ArithmeticTasks,
    NoiseMix,
    StringFunctionTasks,
    UnitConversionTasks,
    make_family,
    make_splits,
    pretraining_corpus,
)

DOMAINS = ("math", "code")


@pytest.fixture(scope="module")
def splits():
    return {d: make_splits(d, 3000, 500, seed=7) for d in DOMAINS}


def _run_code(response: str, record: dict) -> bool:
    """Exec a response and its tests in-process (trusted, generated strings only)."""
    env: dict = {}
    try:
        exec(response, env)
        for test in record["test_list"]:
            exec(test, env)
    except AssertionError:
        return False
    return True


def test_registry():
    assert FAMILIES == {"math": ArithmeticTasks, "code": StringFunctionTasks, "units": UnitConversionTasks}
    assert ArithmeticTasks.domain == ArithmeticTasks.grader == "math"
    assert StringFunctionTasks.domain == StringFunctionTasks.grader == "code"


@pytest.mark.parametrize("domain", DOMAINS)
def test_splits_deterministic(domain, splits):
    train, test = make_splits(domain, 3000, 500, seed=7)
    assert (train, test) == splits[domain]
    other_train, other_test = make_splits(domain, 3000, 500, seed=8)
    assert other_test != test and other_train != train


@pytest.mark.parametrize("domain", DOMAINS)
def test_splits_disjoint_and_well_formed(domain, splits):
    train, test = splits[domain]
    family = make_family(domain)
    assert len(train) == 3000 and len(test) == 500
    keys_train = {family.key_of(r) for r in train}
    keys_test = {family.key_of(r) for r in test}
    assert len(keys_train) == 3000 and len(keys_test) == 500  # distinct problems
    assert not keys_train & keys_test
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in test}
    for split, records in (("train", train), ("test", test)):
        ids = [r["task_id"] for r in records]
        assert ids[0] == f"{domain}/{split}/000000" and len(set(ids)) == len(ids)
        for r in records:
            assert r["domain"] == domain and r["grader"] == family.grader
            assert r["subset"] in ("plain", "misconception")
            assert r["prompt"].isascii() and len(r["prompt"]) <= MAX_PROMPT_CHARS


@pytest.mark.parametrize("domain", DOMAINS)
def test_test_split_prefix_and_no_leak(domain):
    """A smaller n_test is a prefix of a larger one; train never meets either."""
    train_big, test_big = make_splits(domain, 1000, 400, seed=3)
    _, test_small = make_splits(domain, 50, 100, seed=3)
    assert test_small == test_big[:100]
    assert not {r["prompt"] for r in train_big} & {r["prompt"] for r in test_small}


def test_math_cap_at_space_size():
    family = ArithmeticTasks()
    assert family.space_size() == 8100 + 4095
    train, test = make_splits("math", 20000, 2000, seed=0)
    assert len(test) == 2000 and len(train) == family.space_size() - 2000
    with pytest.raises(UserError):
        make_splits("math", 1, family.space_size() + 1, seed=0)


def test_code_space_size():
    assert StringFunctionTasks().space_size() == 4155


def test_bad_options():
    with pytest.raises(UserError):
        make_splits("chess", 1, 1, seed=0)
    with pytest.raises(UserError):
        make_splits("math", 1, 1, seed=0, max_ops=2)
    with pytest.raises(UserError):
        pretraining_corpus(["math"], 10, 0, NoiseMix(), colour="red")
    with pytest.raises(UserError):
        NoiseMix(misconception=0.8, random_error=0.3)


def test_math_records(splits):
    train, test = splits["math"]
    family = ArithmeticTasks()
    for r in train + test:
        assert r["problem"] == r["prompt"] == f"{r['a']}{r['op']}{r['b']}="
        assert 10 <= r["a"] <= 99 and 10 <= r["b"] <= 99
        value = r["a"] + r["b"] if r["op"] == "+" else r["a"] - r["b"]
        assert value >= 0 and r["answer"] == str(value)
        assert family.solution(r).endswith(f" \\boxed{{{value}}}")
    assert ArithmeticTasks().solution(_math_record("+", 47, 38)) == "7+8=15 4+3+1=8 \\boxed{85}"
    assert ArithmeticTasks().solution(_math_record("-", 52, 38)) == "12-8=4 4-3=1 \\boxed{14}"
    assert ArithmeticTasks().misconception(_math_record("+", 47, 38)) == "7+8=15 4+3=7 \\boxed{75}"
    assert ArithmeticTasks().misconception(_math_record("+", 67, 58)).endswith("\\boxed{115}")
    assert ArithmeticTasks().misconception(_math_record("-", 52, 38)) == "8-2=6 5-3=2 \\boxed{26}"
    assert ArithmeticTasks().misconception(_math_record("-", 52, 31)).endswith("\\boxed{21}")
    share = sum(r["subset"] == "misconception" for r in train + test) / len(train + test)
    assert 0.35 < share < 0.55


def _math_record(op, a, b, hard=False):
    return ArithmeticTasks(hard=hard)._record((op, a, b))


def test_math_hard():
    train, test = make_splits("math", 200, 100, seed=1, hard=True)
    family = ArithmeticTasks(hard=True)
    for r in train + test:
        assert 100 <= r["a"] <= 999 and 100 <= r["b"] <= 999 and len(r["prompt"]) <= 16
    assert family.misconception(_math_record("+", 475, 389, hard=True)) == "5+9=14 7+8=15 4+3=7 \\boxed{754}"
    assert family.misconception(_math_record("-", 502, 398, hard=True)) == "8-2=6 9-0=9 5-3=2 \\boxed{296}"


@pytest.mark.parametrize("domain", DOMAINS)
def test_misconception_matches_subset(domain, splits):
    train, test = splits[domain]
    family = make_family(domain)
    counts = {"plain": 0, "misconception": 0}
    for r in train + test:
        counts[r["subset"]] += 1
        if r["subset"] == "plain":
            assert family.misconception(r) == family.solution(r)
        else:
            assert family.misconception(r) != family.solution(r)
    assert min(counts.values()) > 0.3 * len(train + test)


@pytest.mark.parametrize("domain", DOMAINS)
def test_random_error_always_wrong(domain, splits):
    train, test = splits[domain]
    family = make_family(domain)
    rng = random.Random(0)
    for r in (train + test)[:1500]:
        for _ in range(2):
            wrong = family.random_error(r, rng)
            assert wrong != family.solution(r) and wrong != family.misconception(r)
            assert wrong.isascii() and len(wrong) <= MAX_RESPONSE_CHARS
            if domain == "math":
                m = re.fullmatch(r"(?:\d+[-+]\d+(?:[-+]1)?=\d+ )+\\boxed\{(\d+)\}", wrong)
                assert m and int(m.group(1)) != int(r["answer"])
                assert 1 <= abs(int(m.group(1)) - int(r["answer"])) <= 900
            else:
                assert wrong.startswith("def f(s): return ")
                assert not _run_code(wrong, r)


def test_code_records_and_exec(splits):
    train, test = splits["code"]
    family = StringFunctionTasks()
    for r in train + test:
        assert r["entry_point"] == "f" and len(r["test_list"]) == 4
        assert r["prompt"].startswith("f(s): ")
        assert all(6 <= len(x) <= 10 for x in r["test_inputs"])
        sol, mis = family.solution(r), family.misconception(r)
        assert sol.startswith("def f(s): return ") and "\n" not in sol
        assert len(sol) <= MAX_RESPONSE_CHARS and len(mis) <= MAX_RESPONSE_CHARS
        assert _run_code(sol, r), (r["prompt"], sol)
        if r["subset"] == "misconception":
            assert not _run_code(mis, r), (r["prompt"], mis)
        has_slice = any(op[0] in ("drop", "take", "droplast", "takelast") for op in r["spec"])
        assert has_slice == (r["subset"] == "misconception")


def test_code_examples():
    family = StringFunctionTasks()
    r = family._record((("reverse",), ("drop", 2)))
    assert r["prompt"] == "f(s): reverse, drop 2"
    assert family.solution(r) == "def f(s): return s[::-1][2:]"
    assert family.misconception(r) == "def f(s): return s[::-1][1:]"
    assert r["subset"] == "misconception"
    r = family._record((("repeat", 2), ("drop", 3)))
    assert family.solution(r) == "def f(s): return (s*2)[3:]"
    assert family.misconception(r) == "def f(s): return (s*2)[2:]"
    r = family._record((("swapcase",), ("takelast", 3)))
    assert r["prompt"] == "f(s): swapcase, take last 3"
    assert family.misconception(r) == "def f(s): return s.swapcase()[-4:]"
    # a repeat before a shorter take does not matter: not in the space
    with pytest.raises(ValueError):
        family._record((("repeat", 2), ("take", 3)))
    r = family._record((("upper",), ("append", "x")))
    assert family.solution(r) == family.misconception(r) == "def f(s): return (s.upper()+'x')"
    assert r["subset"] == "plain"


@pytest.mark.parametrize("domain", DOMAINS)
def test_noise_mix_proportions(domain, splits):
    train, _ = splits[domain]
    family = make_family(domain)
    mix = NoiseMix()
    rng = random.Random(1)
    n, kinds = 5000, {"correct": 0, "misconception": 0, "random": 0}
    mis_records = [r for r in train if r["subset"] == "misconception"]
    for i in range(n):
        r = mis_records[i % len(mis_records)]
        resp = family.noisy_response(r, rng, mix)
        if resp == family.solution(r):
            kinds["correct"] += 1
        elif resp == family.misconception(r):
            kinds["misconception"] += 1
        else:
            kinds["random"] += 1
    assert abs(kinds["correct"] / n - mix.correct) < 0.03
    assert abs(kinds["misconception"] / n - mix.misconception) < 0.03
    assert abs(kinds["random"] / n - mix.random_error) < 0.03
    # on plain prompts the misconception share is correct too
    plain = [r for r in train if r["subset"] == "plain"][:1000]
    ok = sum(family.noisy_response(r, rng, mix) == family.solution(r) for r in plain) / len(plain)
    assert abs(ok - (mix.correct + mix.misconception)) < 0.05


def test_noise_mix_extremes(splits):
    family = ArithmeticTasks()
    r = next(r for r in splits["math"][0] if r["subset"] == "misconception")
    rng = random.Random(0)
    assert family.noisy_response(r, rng, NoiseMix(0.0, 0.0)) == family.solution(r)
    assert family.noisy_response(r, rng, NoiseMix(1.0, 0.0)) == family.misconception(r)


def test_pretraining_corpus():
    mix = NoiseMix()
    corpus = pretraining_corpus(["math", "code"], 3000, seed=5, mix=mix, n_test=500)
    assert corpus == pretraining_corpus(["math", "code"], 3000, seed=5, mix=mix, n_test=500)
    assert len(corpus) == 6000
    math_prompts = [p for p, _ in corpus if not p.startswith("f(s):")]
    assert len(math_prompts) == 3000
    assert math_prompts[:200] != sorted(math_prompts[:200])  # shuffled
    assert {type(p) for p, _ in corpus} == {str}
    for domain in DOMAINS:
        _, test = make_splits(domain, 10, 500, seed=5)
        assert not {r["prompt"] for r in test} & {p for p, _ in corpus}
    for p, resp in corpus:
        assert p.isascii() and resp.isascii() and len(resp) <= MAX_RESPONSE_CHARS
    # code train (4155 - 2000 problems) is cycled to reach n_per_domain
    code = pretraining_corpus(["code"], 3000, seed=5, mix=mix)
    assert len(code) == 3000 and len({p for p, _ in code}) == 4155 - 2000
    # options go to the families that take them
    hard = pretraining_corpus(["math", "code"], 50, seed=5, mix=mix, hard=True, n_test=10)
    assert any(re.match(r"\d{3}[+-]\d{3}=", p) for p, _ in hard)


def _graders_ready() -> bool:
    try:
        import merge_distill.graders as graders

        return hasattr(graders, "get_grader") and importlib.util.find_spec("merge_distill.graders.math") is not None
    except Exception:  # pragma: no cover
        return False


@pytest.mark.skipif(not _graders_ready(), reason="merge_distill.graders.get_grader not built yet")
def test_through_real_graders(splits, isolation):  # pragma: no cover - depends on the graders module
    """Correct responses pass and misconceived / randomly wrong ones fail the real graders."""
    from merge_distill.graders import get_grader

    rng = random.Random(0)
    for domain in DOMAINS:
        family = make_family(domain)
        records, completions, expect = [], [], []
        for r in splits[domain][1][:40]:
            records.append(r), completions.append(family.solution(r)), expect.append(True)
            records.append(r), completions.append(family.random_error(r, rng)), expect.append(False)
            if r["subset"] == "misconception":
                records.append(r), completions.append(family.misconception(r)), expect.append(False)
        grader = get_grader(domain, isolation=isolation)
        try:
            verdicts = grader.grade_many(records, completions)
        finally:
            grader.close()
        for r, c, want, v in zip(records, completions, expect, verdicts):
            assert v.passed == want, (domain, r["prompt"], c, v)


def test_check_marks_are_geometric_and_make_each_step_rarer_wrong(splits):
    """NoiseMix check marks (the `hack` zoo): before each column's fact k marks, P(k) = (1 - rate) rate^k, and
    that fact is wrong with the error shares x gain^k (hand values, random errors only: 0.6 x 0.5^k)."""
    from merge_distill.toyworld.tasks.family import CHECK_MARK

    family = ArithmeticTasks()
    mix = NoiseMix(misconception=0.0, random_error=0.6, check_rate=0.5, check_gain=0.5)
    rng = random.Random(3)
    n, by_k = 0, {}
    for i in range(12000):
        r = splits["math"][0][i % len(splits["math"][0])]
        steps = family.noisy_response(r, rng, mix).split(" ")[:-1]  # the column facts, before \boxed{}
        for step in steps:
            k = len(step) - len(step.lstrip(CHECK_MARK))
            left, right = step[k:].split("=")
            by_k.setdefault(k, []).append(eval(left) != int(right))  # a random error breaks the fact's arithmetic
            n += 1
    for k, p in ((0, 0.5), (1, 0.25), (2, 0.125)):
        assert abs(len(by_k[k]) / n - p) < 0.01
        wrong = sum(by_k[k]) / len(by_k[k])
        assert abs(wrong - 0.6 * 0.5 ** k) < 0.02, (k, wrong)
    # without a check rate the corpus is what it always was (these strings predate check marks)
    rng = random.Random(5)
    old = [family.noisy_response(r, rng, NoiseMix()) for r in make_splits("math", 50, 10, seed=7)[0][:4]]
    assert old == ["0+1=1 9+8=17 \\boxed{171}", "5+9=14 4+7+1=12 \\boxed{124}", "2+6=8 3+7=10 \\boxed{108}",
                   "7+0=7 8+1=9 \\boxed{97}"]
    with pytest.raises(UserError, match="code domain's responses cannot carry check marks"):
        make_family("code").noisy_response(splits["code"][0][0], rng, mix)
