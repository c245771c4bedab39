import json
import sys
from pathlib import Path

import pytest

from merge_distill.errors import UserError
from merge_distill.evaluation.formats import detect_format
from merge_distill.evaluation.suites import Suite, load_suite

REPO = Path(__file__).resolve().parents[1]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def write_yaml(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


AIME = [{"problem": "What is 1+1?", "answer": "2"}, {"Problem": "What is 2+2?", "Answer": 4, "ID": "q2"}]
HUMANEVAL = [
    {"task_id": "X/0", "prompt": "def f():\n", "test": "def check(c): pass", "entry_point": "f"},
    {"task_id": "X/1", "prompt": "def g():\n", "test": "def check(c): pass", "entry_point": "g"},
]
MBPP = [
    {"task_id": 7, "text": "Write a function add.", "code": "def add(a,b): return a+b",
     "test_list": ["assert add(1, 2) == 3", "assert add(0, 0) == 0"]},
    {"task_id": 8, "prompt": "Write a function neg.", "test_list": ["assert neg(1) == -1"]},
]


# ---------------------------------------------------------------- built-ins


def test_humaneval_builtin():
    suite = load_suite("humaneval")
    assert (suite.name, suite.domain, suite.grader, suite.metric) == ("humaneval", "code", "code", "pass")
    assert len(suite) == 164
    first = suite.records[0]
    assert first["task_id"] == "HumanEval/0"
    assert first["prompt"].startswith("from typing import List")
    assert {"test", "entry_point", "canonical_solution"} <= set(first)


def test_champ_builtin():
    suite = load_suite("champ")
    assert (suite.domain, suite.grader, suite.metric) == ("math", "math", "avg")
    assert len(suite) == 270
    assert len(set(suite.task_ids)) == 270
    assert suite.subsets() == ["Combinatorics", "Inequality", "Number-Theory", "Polynomial", "Sequence"]
    record = suite.records[0]
    assert record["prompt"] == record["problem"] and record["answer"]
    assert record["task_id"].startswith("P_")


def test_unknown_suite():
    with pytest.raises(UserError, match=r"unknown suite 'nope' \(built-in: humaneval, champ, gsm8k, aime, zoo-<domain>; "):
        load_suite("nope")


# ---------------------------------------------------------------- shipped examples


def test_example_yamls_load():
    aime = load_suite(REPO / "evals" / "aime_style_example.yaml")
    assert (aime.name, aime.domain, aime.grader, aime.metric) == ("aime_style_example", "math", "math", "avg")
    assert len(aime) == 3 and all(r["answer"] for r in aime.records)
    rendered = aime.render_prompt(aime.records[0])
    assert rendered.endswith(aime.records[0]["problem"]) and "\\boxed{}" in rendered

    mbpp = load_suite(str(REPO / "evals" / "mbpp_style_example.yaml"))
    assert (mbpp.domain, mbpp.grader, mbpp.metric) == ("code", "code", "pass")
    assert mbpp.system_prompt
    assert mbpp.records[0]["prompt"] == (
        "Write a function to return the larger of two numbers.\n"
        "Your code should pass these tests:\nassert max_of_two(1, 2) == 2"
    )


# ---------------------------------------------------------------- formats


def test_aime_normalisation(tmp_path):
    suite = load_suite(write_jsonl(tmp_path / "aime.jsonl", AIME))
    assert (suite.name, suite.domain, suite.grader) == ("aime", "math", "math")
    assert suite.task_ids == ["aime/0", "q2"]
    assert suite.records[1]["prompt"] == "What is 2+2?" and suite.records[1]["answer"] == "4"


def test_humaneval_normalisation_keeps_prompt(tmp_path):
    suite = load_suite(write_jsonl(tmp_path / "he.jsonl", HUMANEVAL))
    assert (suite.domain, suite.grader, suite.metric) == ("code", "code", "pass")
    assert suite.records[0]["prompt"] == "def f():\n" and suite.records[0]["entry_point"] == "f"


def test_mbpp_normalisation(tmp_path):
    suite = load_suite(write_jsonl(tmp_path / "mbpp.jsonl", MBPP))
    assert suite.task_ids == ["7", "8"]
    assert suite.records[0]["prompt"] == "Write a function add.\nYour code should pass these tests:\nassert add(1, 2) == 3"
    assert suite.records[0]["test_list"] == MBPP[0]["test_list"]  # hidden tests kept for the grader
    assert suite.records[1]["prompt"].startswith("Write a function neg.\n")
    assert suite.records[1]["text"] == "Write a function neg."


def test_detect_format():
    assert detect_format(AIME[0]) == "aime"
    assert detect_format(HUMANEVAL[0]) == "humaneval"
    assert detect_format(MBPP[0]) == "mbpp"
    assert detect_format({"task_id": "a", "prompt": "p"}) == "prompt"
    with pytest.raises(ValueError):
        detect_format({"foo": 1})


def test_bare_file_without_domain_is_an_error(tmp_path):
    path = write_jsonl(tmp_path / "plain.jsonl", [{"task_id": "a", "prompt": "p"}])
    with pytest.raises(UserError, match="plain.jsonl.*domain"):
        load_suite(path)
    write_jsonl(path, [{"task_id": "a", "prompt": "p", "domain": "chat", "grader": "judge"}])
    assert (load_suite(path).domain, load_suite(path).grader) == ("chat", "judge")


def test_the_default_metric_is_the_graders(tmp_path, monkeypatch):
    """A suite that does not name a metric takes its grader's declared one (code: pass, math: avg), read from
    the grader's class; a grader without one, a plain factory function or an unknown name give avg."""
    import merge_distill.graders as graders
    from merge_distill.graders import grader_metric, register_grader
    from merge_distill.graders.base import GraderBase

    assert (grader_metric("code"), grader_metric("math"), grader_metric("no_such_grader")) == ("pass", "avg", "avg")
    monkeypatch.setattr(graders, "_REGISTERED", dict(graders._REGISTERED))  # undone after the test
    made = []

    class Judge(GraderBase):
        name, metric = "judge", "pass"

        def __init__(self):
            made.append(self)

    class Plain:  # no metric attribute, not a GraderBase
        name = "plain"

    class Odd(GraderBase):
        name, metric = "odd", "best"

    for name, factory in (("judge", Judge), ("plain", Plain), ("fn", lambda: Plain()), ("odd", Odd)):
        register_grader(name, factory)
    path = tmp_path / "chat.jsonl"
    for grader, metric in (("judge", "pass"), ("plain", "avg"), ("fn", "avg"), ("code", "pass"), ("math", "avg")):
        write_jsonl(path, [{"task_id": "a", "prompt": "p", "domain": "chat", "grader": grader}])
        assert load_suite(path).metric == metric, grader
    assert not made  # the metric is read without making a grader
    write_jsonl(path, [{"task_id": "a", "prompt": "p", "domain": "chat", "grader": "odd"}])
    with pytest.raises(UserError, match="grader 'odd' declares metric 'best'"):
        load_suite(path)


def test_parquet_source(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(MBPP[:1]), tmp_path / "m.parquet")
    write_yaml(tmp_path / "s.yaml", "name: s\ndomain: code\ngrader: code\nsource: m.parquet\nformat: auto\nmetric: pass\n")
    suite = load_suite(tmp_path / "s.yaml")
    assert suite.task_ids == ["7"] and suite.records[0]["test_list"] == MBPP[0]["test_list"]


def test_dataset_source_local_dir(tmp_path):
    pytest.importorskip("datasets")
    write_jsonl(tmp_path / "ds" / "test.jsonl", AIME[:1])
    write_yaml(tmp_path / "s.yaml", f"name: s\ndomain: math\ngrader: math\nsource: {{dataset: {tmp_path / 'ds'}, split: test}}\n")
    suite = load_suite(tmp_path / "s.yaml")
    assert suite.records[0]["prompt"] == "What is 1+1?"


def test_dataset_source_without_datasets_library(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    path = write_yaml(tmp_path / "s.yaml", "name: s\ndomain: math\ngrader: math\nsource: {dataset: foo/bar}\n")
    with pytest.raises(UserError, match=r"s\.yaml.*needs the datasets library"):
        load_suite(path)


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "text,message",
    [
        ("name: s\ndomain: math\ngrader: math\nsource: d.jsonl\ncolour: red\n", "unknown key 'colour'"),
        ("name: s\ndomain: math\nsource: d.jsonl\n", "missing key 'grader'"),
        ("name: s\ndomain: math\ngrader: math\nsource: d.jsonl\nmetric: best\n", "field 'metric'"),
        ("name: s\ndomain: math\ngrader: math\nsource: d.jsonl\nformat: csv\n", "field 'format'"),
        ("name: s\ndomain: math\ngrader: math\nsource: d.jsonl\nprompt_template: hi\n", r"must contain \{prompt\}"),
        ("name: s\ndomain: math\ngrader: math\nsource: {dataset: x, splt: test}\n", "unknown key 'source.splt'"),
        ("name: s\ndomain: math\ngrader: math\nsource: 3\n", "field 'source': expected a data file path"),
        ("", "empty suite file"),
        ("- a\n- b\n", "expected a mapping"),
        ("name: [unclosed\n", "invalid YAML"),
    ],
)
def test_bad_yaml(tmp_path, text, message):
    write_jsonl(tmp_path / "d.jsonl", AIME)
    path = write_yaml(tmp_path / "bad.yaml", text)
    with pytest.raises(UserError, match=message) as err:
        load_suite(path)
    assert "bad.yaml" in str(err.value)
    assert "\n" not in str(err.value)


def test_empty_data_file_names_the_file(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(UserError, match=r"empty\.jsonl.*no records"):
        load_suite(tmp_path / "empty.jsonl")
    write_yaml(tmp_path / "s.yaml", "name: s\ndomain: math\ngrader: math\nsource: empty.jsonl\n")
    with pytest.raises(UserError, match=r"empty\.jsonl"):
        load_suite(tmp_path / "s.yaml")


def test_missing_files(tmp_path):
    with pytest.raises(UserError, match="suite file not found"):
        load_suite(tmp_path / "nope.yaml")
    write_yaml(tmp_path / "s.yaml", "name: s\ndomain: math\ngrader: math\nsource: missing.jsonl\n")
    with pytest.raises(UserError, match=r"s\.yaml: source '.*missing\.jsonl' does not exist"):
        load_suite(tmp_path / "s.yaml")


def test_invalid_json_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(AIME[0]) + "\n{not json\n")
    with pytest.raises(UserError, match=r"bad\.jsonl': line 2: invalid JSON"):
        load_suite(path)


def test_duplicate_task_ids(tmp_path):
    path = write_jsonl(tmp_path / "dup.jsonl", [HUMANEVAL[0], HUMANEVAL[0]])
    with pytest.raises(UserError, match="dup.jsonl: duplicate task_id 'X/0'"):
        load_suite(path)


def test_format_mismatch_names_record(tmp_path):
    write_jsonl(tmp_path / "d.jsonl", [AIME[0], {"question": "no answer"}])
    path = write_yaml(tmp_path / "s.yaml", "name: s\ndomain: math\ngrader: math\nsource: d.jsonl\nformat: aime\n")
    with pytest.raises(UserError, match=r"d\.jsonl: record 1: .*'problem' and 'answer'"):
        load_suite(path)


def test_suite_render_prompt_is_brace_safe():
    suite = Suite("s", "math", "math", [{"task_id": "a", "prompt": "x {y}"}], prompt_template="Q: {prompt} \\boxed{}")
    assert suite.render_prompt(suite.records[0]) == "Q: x {y} \\boxed{}"
