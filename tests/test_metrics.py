import math
from math import comb

import pytest

from merge_distill.evaluation.metrics import (
    ResultRow,
    Score,
    avg_at_k,
    hf_metric_path,
    paired_difference,
    pass_at_k,
    per_problem_estimates,
    suite_score,
)


def test_pass_at_k_hand_values():
    assert pass_at_k(5, 2, 1) == pytest.approx(0.4)
    assert pass_at_k(5, 2, 2) == pytest.approx(0.7)  # 1 - C(3,2)/C(5,2) = 1 - 3/10
    assert pass_at_k(5, 0, 3) == 0.0
    assert pass_at_k(5, 5, 1) == 1.0
    assert pass_at_k(5, 3, 3) == 1.0  # n - c < k: every k-subset has a correct sample


def test_pass_at_k_matches_binomial_formula():
    for n, c, k in [(10, 3, 1), (10, 3, 5), (20, 1, 10), (200, 17, 100)]:
        assert pass_at_k(n, c, k) == pytest.approx(1 - comb(n - c, k) / comb(n, k))


@pytest.mark.parametrize("n,c,k", [(5, 2, 6), (5, 2, 0), (5, 6, 1), (0, 0, 1)])
def test_pass_at_k_rejects_bad_arguments(n, c, k):
    with pytest.raises(ValueError):
        pass_at_k(n, c, k)


def test_avg_at_k():
    assert avg_at_k([[1, 0, 1, 1], [0, 0], [1.0]]) == [0.75, 0.0, 1.0]
    with pytest.raises(ValueError):
        avg_at_k([[1], []])


def test_per_problem_estimates():
    data = [[1, 0, 0, 0, 1], [0, 0, 0, 0, 0]]
    assert per_problem_estimates(data, "pass", 1) == pytest.approx([0.4, 0.0])
    assert per_problem_estimates(data, "pass", 2) == pytest.approx([0.7, 0.0])
    assert per_problem_estimates(data, "avg") == pytest.approx([0.4, 0.0])
    assert per_problem_estimates(data, "avg", 2) == pytest.approx([0.5, 0.0])  # first k samples
    with pytest.raises(ValueError):
        per_problem_estimates(data, "avg", 6)
    with pytest.raises(ValueError):
        per_problem_estimates(data, "best", 1)  # type: ignore[arg-type]


def test_suite_score_avg_with_stderr():
    # per-problem means 1, 0, 0.5 -> mean 0.5; sample std (ddof=1) = 0.5; stderr = 0.5/sqrt(3)
    s = suite_score([[1, 1], [0, 0], [1, 0]], "avg", 2)
    assert s == Score(score=pytest.approx(0.5), stderr=pytest.approx(0.5 / math.sqrt(3)), n_problems=3, n_samples=2)


def test_suite_score_pass():
    # pass@2 per problem: 0.7 and 0.0 -> mean 0.35, std = 0.7/sqrt(2), stderr = 0.35
    s = suite_score([[1, 0, 0, 0, 1], [0, 0, 0, 0, 0]], "pass", 2)
    assert s.score == pytest.approx(0.35)
    assert s.stderr == pytest.approx(0.35)
    assert (s.n_problems, s.n_samples) == (2, 5)


def test_suite_score_single_problem_has_zero_stderr():
    s = suite_score([[1, 0, 1, 0]], "avg")
    assert (s.score, s.stderr, s.n_problems, s.n_samples) == (0.5, 0.0, 1, 4)


def test_suite_score_empty_suite():
    with pytest.raises(ValueError):
        suite_score([], "avg")


def test_paired_difference():
    a = {"x": 1.0, "y": 0.5, "z": 0.0}
    b = {"z": 0.5, "y": 0.5, "x": 0.5}  # order does not matter, ids do
    diff, stderr, n = paired_difference(a, b)
    assert diff == pytest.approx(0.0)
    assert stderr == pytest.approx(0.5 / math.sqrt(3))  # diffs 0.5, 0, -0.5
    assert n == 3

    diff, stderr, n = paired_difference({"x": 1.0, "y": 1.0}, {"x": 0.0, "y": 0.5})
    assert (diff, n) == (pytest.approx(0.75), 2)
    assert stderr == pytest.approx(0.25)  # diffs 1, 0.5: std 0.3536 / sqrt(2)


def test_paired_difference_requires_same_ids():
    with pytest.raises(ValueError, match="same problems"):
        paired_difference({"x": 1.0}, {"y": 1.0})


def test_result_row_round_trip():
    row = ResultRow("m", "champ", "math", "avg", 4, 0.5, 0.1, 10, 4, subset="Sequence")
    d = row.to_dict()
    assert list(d) == [
        "model", "suite", "domain", "metric", "k", "score", "stderr",
        "n_problems", "n_samples", "subset", "temperature",
    ]
    assert ResultRow.from_dict({**d, "extra": 1}) == row
    assert row.label == "avg@4"


def test_hf_metric_path():
    for name in ("avg_at_k", "pass_at_k"):
        path = hf_metric_path(name)
        assert path.endswith(name)
        assert (__import__("pathlib").Path(path) / f"{name}.py").is_file()
    assert hf_metric_path("pass@k") == hf_metric_path("pass_at_k")
    with pytest.raises(ValueError):
        hf_metric_path("bleu")


@pytest.mark.parametrize(
    "name,kwargs,key,expected",
    [
        ("avg_at_k", {}, "avg_at_k", 0.5),  # means 0.75, 0.25
        ("pass_at_k", {"k": 1}, "pass_at_k", 0.5),
        ("pass_at_k", {"k": 2}, "pass_at_k", 0.75),  # 1.0 and 1 - C(3,2)/C(4,2) = 0.5
    ],
)
def test_hf_evaluate_modules_load_offline(name, kwargs, key, expected, monkeypatch):
    evaluate = pytest.importorskip("evaluate")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    metric = evaluate.load(hf_metric_path(name))
    out = metric.compute(predictions=[[1, 1, 1, 0], [0, 1, 0, 0]], **kwargs)
    assert out[key] == pytest.approx(expected)
    assert out["n_problems"] == 2
    assert out["stderr"] >= 0
