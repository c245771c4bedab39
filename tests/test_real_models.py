"""benchmarks/real_models.py's base-model path: plain-text prompts, and completions cut at the harnesses' stop
sequences before the suite's own grader sees them (a base model writes on past its answer)."""

import importlib.util
from pathlib import Path

import pytest

from merge_distill.evaluation.suites import Suite

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "real_models.py"


@pytest.fixture(scope="module")
def real_models():
    spec = importlib.util.spec_from_file_location("real_models", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cut_at_the_first_stop_of_any(real_models):
    assert real_models.cut_at_stops("  return x\n\ndef g():\n#", ("\n#", "\ndef")) == "  return x\n"
    assert real_models.cut_at_stops("no stop here", ("\ndef",)) == "no stop here"


def test_a_base_model_gsm8k_answer_is_graded_up_to_the_next_question(real_models):
    record = {"task_id": "t", "prompt": "How many?", "problem": "How many?", "answer": "18"}
    suite = real_models.base_suite(Suite("gsm8k", "math", "math", [record], prompt_template="unused {prompt}",
                                         system_prompt="unused"))
    assert suite.render_prompt(record) == "Question: How many?\nAnswer:" and suite.system_prompt is None
    from merge_distill.graders import get_grader

    completion = " 9 + 9 = 18\n\nQuestion: A farmer has 99 cows"  # the last number before the cut is the answer
    with get_grader(suite.grader) as grader:
        assert [v.verdict for v in grader.grade_many([record], [completion])] == ["pass"]


def test_a_base_model_humaneval_prompt_is_the_function_itself(real_models, isolation):
    record = {"task_id": "t", "prompt": "def f(x):\n", "test": "def check(f):\n    assert f(2) == 4\n",
              "entry_point": "f"}
    suite = real_models.base_suite(Suite("humaneval", "code", "code", [record], metric="pass",
                                         prompt_template="Complete:\n```python\n{prompt}```"))
    assert suite.render_prompt(record) == "def f(x):\n" and suite.metric == "pass"
    from merge_distill.graders import get_grader

    completion = "    return 2 * x\n\nprint(f(3))\nThe function doubles x."  # prose after it: a syntax error uncut
    with get_grader(suite.grader, isolation=isolation) as grader:
        assert grader.runs_code and grader.metric == "pass"
        assert [v.verdict for v in grader.grade_many([record], [completion])] == ["pass"]
