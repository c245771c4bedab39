"""The toy world's third domain, ``units`` (unit conversions), graded by the example plugin's grader."""

from __future__ import annotations

import random
import sys
from collections import Counter
from pathlib import Path

import pytest

from merge_distill.toyworld.tasks import (
    FAMILIES,
    MAX_UNITS_PROMPT_CHARS,
    MAX_UNITS_RESPONSE_CHARS,
    NoiseMix,
    UnitConversionTasks,
    make_family,
    make_splits,
    pretraining_corpus,
)

# the plugin's grader, imported from its source tree (no installation needed here; test_plugin installs it)
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples" / "merge-distill-units"))
from md_units.grader import UnitsGrader, canonical_unit  # noqa: E402


@pytest.fixture(scope="module")
def family():
    return make_family("units")


@pytest.fixture(scope="module")
def space(family):
    return [family._record(k) for k in family._all_keys()]


def test_registered():
    assert FAMILIES["units"] is UnitConversionTasks
    assert UnitConversionTasks.domain == UnitConversionTasks.grader == "units"


def test_examples(family, space):
    rec = {r["prompt"]: r for r in space}
    km = rec["3 km to m"]
    assert {k: km[k] for k in ("domain", "grader", "subset", "answer", "unit")} == {
        "domain": "units", "grader": "units", "subset": "plain", "answer": "3000", "unit": "m"}
    assert family.solution(km) == family.misconception(km) == "3*1000=3000 \\answer{3000 m}"
    assert family.solution(rec["250 cm to m"]) == "250/100=2.5 \\answer{2.5 m}"
    hours = rec["2 h to min"]
    assert hours["subset"] == "misconception" and hours["answer"] == "120"
    assert family.solution(hours) == "2*60=120 \\answer{120 min}"
    assert family.misconception(hours) == "2*100=200 \\answer{200 min}"
    assert family.misconception(rec["90 min to h"]) == "90/100=0.9 \\answer{0.9 h}"


def test_splits_deterministic_and_disjoint(family):
    train, test = make_splits("units", 5000, 1000, seed=7)
    assert (train, test) == make_splits("units", 5000, 1000, seed=7)
    assert make_splits("units", 5000, 1000, seed=8)[1] != test
    assert len(train) == 5000 and len(test) == 1000
    keys_train, keys_test = {family.key_of(r) for r in train}, {family.key_of(r) for r in test}
    assert len(keys_train) == 5000 and len(keys_test) == 1000 and not keys_train & keys_test
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in test}
    assert train[0]["task_id"] == "units/train/000000" and test[0]["task_id"] == "units/test/000000"


def test_space_and_misconception_share(family, space):
    assert family.space_size() == len(space) == len({family.key_of(r) for r in space}) == 13986
    assert len({r["prompt"] for r in space}) == len(space)
    share = Counter(r["subset"] for r in space)["misconception"] / len(space)
    assert 0.40 <= share <= 0.50  # the time conversions: 6 of 14
    rng = random.Random(0)
    sample = [family.sample_problem(rng) for _ in range(2000)]
    assert 0.35 <= Counter(r["subset"] for r in sample)["misconception"] / len(sample) <= 0.50


def test_misconception_and_random_errors_are_graded_right(family, space):
    grader, rng = UnitsGrader(), random.Random(0)
    records, completions, expected = [], [], []
    for r in space:
        right, mis, err = family.solution(r), family.misconception(r), family.random_error(r, rng)
        assert r["prompt"].isascii() and len(r["prompt"]) <= MAX_UNITS_PROMPT_CHARS
        assert max(len(right), len(mis), len(err)) <= MAX_UNITS_RESPONSE_CHARS
        assert (mis == right) == (r["subset"] == "plain")
        assert err not in (right, mis)
        records += [r, r, r]
        completions += [right, mis, err]
        expected += ["pass", "pass" if r["subset"] == "plain" else "fail", "fail"]
    assert [v.verdict for v in grader.grade_many(records, completions)] == expected


def test_noisy_corpus_includes_units():
    pairs = pretraining_corpus(["math", "units"], 200, 0, NoiseMix(), n_test=100)
    units = [(p, r) for p, r in pairs if " to " in p]
    assert len(units) == 200 and all("\\answer{" in r for _, r in units)


@pytest.mark.parametrize("completion, verdict", [
    ("3*1000=3000 \\answer{3000 m}", "pass"),
    ("\\answer{3,000 meters}", "pass"),
    ("\\answer{3e3 Metres}", "pass"),
    ("\\answer{3000.0000000001 m}", "pass"),  # within 1e-9 relative
    ("\\answer{1 m} then \\answer{3000 m}", "pass"),  # the last one counts
    ("\\answer{3000 m} then \\answer{1 m}", "fail"),
    ("\\answer{3001 m}", "fail"),
    ("\\answer{3000 cm}", "fail"),
    ("\\answer{3000}", "fail"),
    ("3000 m", "fail"),
    ("\\answer{lots of m}", "fail"),
])
def test_grader_cases(completion, verdict):
    v = UnitsGrader().grade({"answer": "3000", "unit": "m"}, completion)
    assert v.verdict == verdict and v.score == (verdict == "pass")
    assert (v.detail == "") == (verdict == "pass") and "\n" not in v.detail


def test_grader_aliases_and_record_check():
    assert canonical_unit("Hours") == canonical_unit("hr") == "h"
    assert canonical_unit("mL") == canonical_unit("milliliters") == "ml" != canonical_unit("m")
    assert UnitsGrader().grade({"answer": "1.4", "unit": "h"}, "\\answer{1.4 hours}").passed
    from merge_distill.errors import UserError

    with pytest.raises(UserError, match="lacks unit"):
        UnitsGrader().grade({"task_id": "t", "answer": "1"}, "\\answer{1 m}")
