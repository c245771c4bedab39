"""Graders end to end: math equivalence, code in the real sandbox, HumanEval, grade_file, registry."""

from __future__ import annotations

import json
import pickle
import sys
import textwrap
import time
from collections import Counter

import pytest
from rich.console import Console

from merge_distill.errors import UserError
from merge_distill.graders import available_graders, get_grader, register_grader
from merge_distill.graders.base import VERDICTS, Grader, GraderBase, Verdict
from merge_distill.graders.code import CodeGrader, build_program, extract_code
from merge_distill.graders.grade_file import grade_file, summary_table
from merge_distill.graders.humaneval import load_humaneval
from merge_distill.graders.math import MathGrader, extract_answer, fast_compare


@pytest.fixture(scope="module")
def math_grader():
    with MathGrader(timeout_s=2.0) as g:
        yield g


@pytest.fixture(scope="module")
def code_grader(isolation):
    with CodeGrader(timeout_s=3.0, isolation=isolation) as g:
        yield g


# ------------------------------------------------------------------------------------------ math


@pytest.mark.parametrize("text, expected", [
    (r"so the total is \boxed{85}.", "85"),
    (r"first \boxed{1} then \boxed{\frac{1}{2}}", r"\frac{1}{2}"),
    (r"\boxed{\{1, 2\}}", r"\{1, 2\}"),
    (r"\boxed{x^{2}+\frac{a}{b}} done", r"x^{2}+\frac{a}{b}"),
    (r"\fbox{42}", "42"),
    (r"hence \boxed 7 is it", "7"),
    (r"truncated \boxed{3 + ", "3"),  # an unclosed box is no box: the last-number fallback applies
    ("The answer is 12.", "12"),
    ("**Final answer:** $\\frac{3}{4}$", r"\frac{3}{4}"),
    ("Answer: 1,000", "1,000"),
    ("we get 3 apples and then 17 pears", "17"),
    ("no digits here", None),
])
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


@pytest.mark.parametrize("gold, completion", [
    ("85", r"\boxed{85}"),
    ("85", r"\boxed{85.0}"),
    ("1000", r"\boxed{1,000}"),
    ("1/2", r"\boxed{0.5}"),
    ("0.5", r"\boxed{\frac{1}{2}}"),
    (r"\frac{1}{2}", r"\boxed{\dfrac{1}{2}}"),
    (r"\frac{1}{2}", "The answer is 1/2."),
    ("50%", r"\boxed{50\%}"),
    ("50%", r"\boxed{0.5}"),
    (r"\{1,2\}", r"\boxed{\{2, 1\}}"),
    ("{1,2}", r"\boxed{\{1,2\}}"),
    (r"\sqrt{2}/2", r"\boxed{\frac{\sqrt{2}}{2}}"),
    ("x^2+2x+1", r"\boxed{(x+1)^2}"),
    ("-3", r"\boxed{-3}"),
])
def test_math_equivalent_forms_pass(math_grader, gold, completion):
    v = math_grader.grade({"task_id": "t", "answer": gold}, completion)
    assert v == Verdict("pass", 1.0, v.detail)


@pytest.mark.parametrize("gold, completion", [
    ("85", r"\boxed{84}"),
    ("1/2", r"\boxed{0.25}"),
    (r"\frac{1}{2}", r"\boxed{\frac{1}{3}}"),
    ("50%", r"\boxed{5}"),
    (r"\{1,2\}", r"\boxed{\{1,3\}}"),
    (r"\sqrt{2}", r"\boxed{2}"),
    ("x^2+2x+1", r"\boxed{(x-1)^2}"),
    ("7", "I have no idea."),
])
def test_math_wrong_answers_fail(math_grader, gold, completion):
    v = math_grader.grade({"task_id": "t", "answer": gold}, completion)
    assert v.verdict == "fail" and v.score == 0.0


def test_math_fast_path_needs_no_worker():
    with MathGrader() as g:
        start = time.monotonic()
        verdicts = g.grade_many([{"task_id": i, "answer": "85"} for i in range(512)],
                                [r"... so \boxed{85}" if i % 2 else r"\boxed{84}" for i in range(512)])
        assert time.monotonic() - start < 0.5
        assert g._pool is None  # decided in-process
        assert Counter(v.verdict for v in verdicts) == {"pass": 256, "fail": 256}
    assert fast_compare("0.50", r"\frac{1}{2}") is True
    assert fast_compare("x+1", "1+x") is None  # left to math-verify


def test_math_pathological_answer_times_out_without_blocking_the_batch(math_grader):
    towers = [r"\boxed{9^{9^{9^{9}}}}", r"\boxed{(10^{10^{8}})!}"]
    normal = [(r"\sqrt{2}/2", r"\boxed{\frac{\sqrt 2}{2}}"), ("x^2-1", r"\boxed{(x-1)(x+1)}")] * 10
    records = [{"task_id": "tower", "answer": "3"}] * 2 + [{"task_id": i, "answer": a} for i, (a, _) in enumerate(normal)]
    completions = towers + [c for _, c in normal]
    start = time.monotonic()
    verdicts = math_grader.grade_many(records, completions)
    elapsed = time.monotonic() - start
    assert [v.verdict for v in verdicts[:2]] == ["timeout", "timeout"]
    assert all(v.verdict == "pass" for v in verdicts[2:])
    assert elapsed < 2 * math_grader.timeout_s + 3
    # and the pool still works afterwards
    assert math_grader.grade({"task_id": "x", "answer": "x+1"}, r"\boxed{1+x}").verdict == "pass"


def test_math_record_without_answer_is_a_user_error(math_grader):
    with pytest.raises(UserError, match="'p7'"):
        math_grader.grade({"task_id": "p7", "problem": "?"}, r"\boxed{1}")


# ------------------------------------------------------------------------------------------ code

MBPP = {
    "task_id": "mbpp/1",
    "prompt": "Write a function add(a, b) that returns the sum.",
    "test_setup_code": "OFFSET = 0",
    "test_list": ["assert add(1, 2) == 3 + OFFSET", "assert add(-1, 1) == 0"],
}
HUMANEVAL = {
    "task_id": "he/1",
    "prompt": 'def add(a, b):\n    """Sum of a and b."""\n',
    "test": "def check(candidate):\n    assert candidate(1, 2) == 3\n    assert candidate(0, 0) == 0\n",
    "entry_point": "add",
}


def test_extract_code_takes_the_last_python_block():
    text = "Draft:\n```python\ndef add(a, b): return 0\n```\nFinal:\n```python\ndef add(a, b):\n    return a + b\n```\nDone."
    assert extract_code(text) == "def add(a, b):\n    return a + b\n"
    assert extract_code("```\nx = 1\n```") == "x = 1\n"
    assert extract_code("```py\nx = 2\n") == "x = 2\n"  # truncated generation
    assert extract_code("    return a + b\n") == "    return a + b\n"


def test_programs_for_both_shapes():
    assert build_program(MBPP, "def add(a, b): return a + b") == (
        "def add(a, b): return a + b\nOFFSET = 0\nassert add(1, 2) == 3 + OFFSET\nassert add(-1, 1) == 0\n")
    assert build_program(HUMANEVAL, "    return a + b\n").endswith("check(add)\n")
    assert "Write a function" not in build_program(MBPP, "pass")
    with pytest.raises(UserError, match="'bad/3'"):
        build_program({"task_id": "bad/3", "prompt": "x"}, "pass")


def test_code_verdicts(code_grader):
    cases = [
        (MBPP, "def add(a, b):\n    return a + b", "pass"),
        (MBPP, "Here you go:\n```python\ndef add(a, b):\n    return a + b\n```", "pass"),
        (MBPP, "def add(a, b):\n    return a - b", "fail"),
        (MBPP, "def add(a, b) return a + b", "syntax_error"),
        (MBPP, "def add(a, b):\n    return undefined_name", "runtime_error"),
        (MBPP, "def add(a, b):\n    while True: pass", "timeout"),
        (MBPP, "def add(a, b):\n    return len(bytearray(8 * 1024 ** 3))", "memory"),
        (MBPP, "import os\ndef add(a, b):\n    os._exit(0)", "runtime_error"),
        (MBPP, "def add(a, b):\n    raise SystemExit(0)", "runtime_error"),
        (HUMANEVAL, "    return a + b\n", "pass"),
        (HUMANEVAL, "    return a * b\n", "fail"),
        # a completion that defines its own always-passing check: the test's check comes later
        (HUMANEVAL, "    return 0\n\ndef check(candidate):\n    pass\n", "fail"),
        (HUMANEVAL, "```python\ndef add(a, b):\n    return b + a\n```", "pass"),
    ]
    start = time.monotonic()
    verdicts = code_grader.grade_many([c[0] for c in cases], [c[1] for c in cases])
    assert time.monotonic() - start < 10
    assert [v.verdict for v in verdicts] == [c[2] for c in cases], verdicts
    assert all(v.score == (1.0 if v.verdict == "pass" else 0.0) for v in verdicts)
    assert all(v.verdict in VERDICTS and len(v.detail) <= 200 for v in verdicts)
    assert "NameError" in verdicts[4].detail


def test_humaneval_canonical_solutions_all_pass_and_wrong_ones_fail(code_grader):
    records = load_humaneval()
    assert len(records) == 164 and all(r["domain"] == "code" for r in records)
    verdicts = code_grader.grade_many(records, [r["canonical_solution"] for r in records])
    failed = [(r["task_id"], v) for r, v in zip(records, verdicts) if v.verdict != "pass"]
    assert not failed
    for wrong in ("    return None\n", "    pass\n"):
        verdicts = code_grader.grade_many(records, [wrong] * len(records))
        assert not [r["task_id"] for r, v in zip(records, verdicts) if v.verdict == "pass"]


# ------------------------------------------------------------------------------------ grade_file


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_grade_file_round_trip_and_resume(tmp_path, isolation):
    rows = [
        {"task_id": "m1", "answer": "85", "completion": r"\boxed{85}"},
        {"task_id": "m1", "answer": "85", "completion": r"\boxed{86}"},  # a second sample, same task
        dict(MBPP, completion="def add(a, b):\n    return a + b"),
        dict(HUMANEVAL, completion="    return a - b\n", domain="code"),
        {"task_id": "m2", "answer": r"\frac{1}{2}", "completion": "The answer is 0.5", "domain": "math"},
    ]
    src, out = tmp_path / "in.jsonl", tmp_path / "out" / "verdicts.jsonl"
    _write_jsonl(src, rows[:2] + [{}][:0] + rows[2:])
    src.write_text(src.read_text().replace("\n", "\n\n", 1))  # a blank line is skipped, numbering kept

    summary = grade_file(src, out, timeout_s=3, workers=1, isolation=isolation)
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert [(x["line"], x["task_id"], x["domain"], x["verdict"]) for x in lines] == [
        (1, "m1", "math", "pass"), (3, "m1", "math", "fail"), (4, "mbpp/1", "code", "pass"),
        (5, "he/1", "code", "fail"), (6, "m2", "math", "pass")]
    # code lines say what they ran under; math lines ran no code
    assert [x.get("isolation") for x in lines] == [None, None, isolation, isolation, None]
    assert summary["total"] == 5 and summary["graded"] == 5 and summary["resumed"] == 0
    assert summary["isolation"] == isolation
    assert summary["domains"]["math"] == {"n": 3, "pass": 2, "pass_rate": 2 / 3, "verdicts": {"pass": 2, "fail": 1}}
    assert summary["domains"]["code"]["verdicts"] == {"pass": 1, "fail": 1}

    # Interrupted run: two lines kept and a torn third; the rerun grades only what is missing.
    kept = out.read_text().splitlines(True)[:2]
    out.write_text("".join(kept) + '{"line": 4, "task_')
    summary2 = grade_file(src, out, isolation=isolation)
    assert summary2["resumed"] == 2 and summary2["graded"] == 3
    assert [json.loads(x) for x in out.read_text().splitlines()] == lines
    assert {k: v for k, v in summary2.items() if k not in ("graded", "resumed")} == \
           {k: v for k, v in summary.items() if k not in ("graded", "resumed")}

    # Nothing left to do.
    assert grade_file(src, out)["graded"] == 0

    console = Console(record=True, width=120)
    console.print(summary_table(summary))
    text = console.export_text()
    assert "math" in text and "code" in text and "66.7%" in text and "all" in text


@pytest.mark.parametrize("line, message", [
    ("{not json", "in.jsonl:2: invalid JSON"),
    ('["a list"]', "in.jsonl:2: expected a JSON object"),
    ('{"task_id": "x", "answer": "1"}', "in.jsonl:2: missing 'completion'"),
    ('{"task_id": "x", "completion": "hi"}', "in.jsonl:2: cannot tell the domain"),
    ('{"task_id": "x", "completion": "hi", "domain": "poetry"}', "in.jsonl:2: unknown domain 'poetry'"),
    ('{"task_id": "x9", "completion": "hi", "domain": "code", "prompt": "p"}', "in.jsonl:2: code task 'x9'"),
])
def test_grade_file_bad_lines_name_file_and_line(tmp_path, line, message):
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"task_id": "ok", "answer": "1", "completion": r"\boxed{1}"}) + "\n" + line + "\n")
    with pytest.raises(UserError, match=message.replace("(", r"\(")):
        grade_file(src, tmp_path / "out.jsonl")
    assert not (tmp_path / "out.jsonl").exists()


def test_grade_file_domain_names_any_registered_grader(tmp_path, monkeypatch):
    """A record's 'domain' may be any registered grader, not only math and code; an unknown one is a
    one-line error that lists the registered graders."""
    import merge_distill.graders as graders

    monkeypatch.setattr(graders, "_REGISTERED", dict(graders._REGISTERED))  # undone after the test

    class Shout(GraderBase):
        name = "shout"

        def grade_many(self, records, completions):
            return [Verdict.of("pass" if c.isupper() else "fail", "shouted" if c.isupper() else "") for c in completions]

    register_grader("shout", Shout)
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    rows = [{"task_id": "s1", "domain": "shout", "completion": "HELLO"},
            {"task_id": "s2", "domain": "shout", "completion": "hello", "answer": "ignored: domain wins"},
            {"task_id": "m1", "answer": "2", "completion": r"\boxed{2}"}]
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = grade_file(src, out)
    graded = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["task_id"], r["domain"], r["verdict"]) for r in graded] == [
        ("s1", "shout", "pass"), ("s2", "shout", "fail"), ("m1", "math", "pass")]
    assert summary["domains"]["shout"]["n"] == 2 and summary["domains"]["math"]["pass"] == 1

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"task_id": "x", "domain": "whisper", "completion": "hi"}) + "\n")
    with pytest.raises(UserError, match=r"bad.jsonl:1: unknown domain 'whisper' \(registered graders: .*code.*math.*shout"
                       ) as err:
        grade_file(bad, tmp_path / "bad_out.jsonl")
    assert "\n" not in str(err.value)


# -------------------------------------------------------------------------------------- registry


def test_registry_builtins_and_unknown_names():
    assert {"math", "code"} <= set(available_graders())
    math_grader, code_grader = get_grader("math"), get_grader("code", timeout_s=5)
    assert isinstance(math_grader, MathGrader) and isinstance(code_grader, CodeGrader)
    assert code_grader.timeout_s == 5.0 and isinstance(math_grader, Grader)
    with pytest.raises(UserError, match=r"unknown grader 'poetry'; known graders: .*code.*math"):
        get_grader("poetry")
    with pytest.raises(UserError, match="bad options"):
        get_grader("math", nonsense=1)


def test_builtins_need_no_entry_point(monkeypatch):
    """math and code are registered in code (merge_distill.graders._BUILTINS), not through the package's entry
    points: a source tree with no installed distribution has them too."""
    import merge_distill.graders as graders

    monkeypatch.setattr(graders, "_entry_points", lambda: {})
    assert {"math", "code"} <= set(available_graders())
    assert isinstance(get_grader("math"), MathGrader) and isinstance(get_grader("code"), CodeGrader)


def test_register_grader_programmatically():
    class Always:
        name = "always"

        def grade_many(self, records, completions):
            return [Verdict.of("pass") for _ in records]

        def grade(self, record, completion):
            return self.grade_many([record], [completion])[0]

    register_grader("always", Always)
    assert "always" in available_graders()
    assert get_grader("always").grade({}, "x").verdict == "pass"


def test_entry_point_graders_are_discovered(tmp_path, monkeypatch):
    (tmp_path / "poetry_grader.py").write_text(textwrap.dedent("""
        from merge_distill.graders.base import GraderBase, Verdict
        class PoetryGrader(GraderBase):
            name = "poetry"
            def __init__(self, rhyme="moon"):
                self.rhyme = rhyme
            def grade_many(self, records, completions):
                return [Verdict.of("pass" if c.endswith(self.rhyme) else "fail") for c in completions]
    """))
    dist = tmp_path / "poetry_grader-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: poetry-grader\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[merge_distill.graders]\npoetry = poetry_grader:PoetryGrader\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert "poetry" in available_graders()
    grader = get_grader("poetry", rhyme="June")
    assert [v.verdict for v in grader.grade_many([{}, {}], ["in June", "at noon"])] == ["pass", "fail"]
    monkeypatch.delitem(sys.modules, "poetry_grader", raising=False)


def test_graders_pickle_and_verdicts_validate():
    for grader in (MathGrader(timeout_s=3), CodeGrader(timeout_s=2, isolation="rlimits")):
        clone = pickle.loads(pickle.dumps(grader))
        assert clone.timeout_s == grader.timeout_s
        clone.close()
    assert clone.sandbox.requested_isolation == "rlimits"  # the opt-out travels with the grader
    with pytest.raises(ValueError):
        Verdict("great", 1.0)
    assert Verdict.of("timeout", "x" * 500).detail.endswith("...")
