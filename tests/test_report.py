import json
import math

import pytest
from rich.console import Console

from merge_distill.evaluation.metrics import ResultRow
from merge_distill.evaluation.report import (
    PairedDifference,
    format_cell,
    markdown_table,
    paired_rows,
    pairwise_differences,
    rich_table,
    write_results,
)

BOLD = "\x1b[1m"


def make_rows():
    return [
        ResultRow("base", "champ", "math", "avg", 4, 0.5, 0.02, 270, 4),
        ResultRow("student", "champ", "math", "avg", 4, 0.804, 0.012, 270, 4),
        ResultRow("base", "humaneval", "code", "pass", 1, 0.7, 0.03, 164, 1),
        ResultRow("student", "humaneval", "code", "pass", 1, 0.6, 0.03, 164, 1),
        # a subset row listed first still goes below its suite's overall row
        ResultRow("base", "champ", "math", "avg", 4, 0.25, 0.05, 40, 4, subset="Combinatorics").to_dict(),
    ]


def render(table) -> str:
    console = Console(record=True, width=140, force_terminal=True, color_system="standard")
    console.print(table)
    return console.export_text(styles=True)


def test_format_cell():
    assert format_cell(ResultRow("m", "s", "d", "avg", 1, 0.804, 0.012, 10, 1)) == "80.4 ± 1.2"


def test_rich_table_layout_and_bold_best():
    rows = make_rows()
    text = render(rich_table(rows))
    plain = Console(record=True, width=140)
    plain.print(rich_table(rows))
    plain_text = plain.export_text()
    header = next(line for line in plain_text.splitlines() if "suite" in line)
    assert header.index("base") < header.index("student")  # models are columns
    lines = plain_text.splitlines()
    champ = next(i for i, line in enumerate(lines) if "│ champ " in line)
    assert "Combinatorics" in lines[champ + 1] and "—" in lines[champ + 1]  # subset row, student missing
    assert "humaneval" in lines[champ + 2]
    assert f"{BOLD}80.4 ± 1.2" in text  # student best on champ
    assert f"{BOLD}70.0 ± 3.0" in text  # base best on humaneval
    assert f"{BOLD}50.0 ± 2.0" not in text and f"{BOLD}60.0 ± 3.0" not in text
    assert "champ 270×4" in plain_text and "humaneval 164×1" in plain_text  # caption


def test_markdown_table():
    md = markdown_table(make_rows())
    lines = md.splitlines()
    assert lines[0] == "| suite | metric | base | student |"
    assert lines[2] == "| champ | avg@4 | 50.0 ± 2.0 | **80.4 ± 1.2** |"
    assert lines[3] == "| champ / Combinatorics | avg@4 | 25.0 ± 5.0 | — |"
    assert lines[4] == "| humaneval | pass@1 | **70.0 ± 3.0** | 60.0 ± 3.0 |"


def test_paired_rows():
    per_problem = {
        "student": {"champ": {"p1": [1, 1], "p2": [1, 0], "p3": [0, 0]}, "humaneval": {"h": 1.0}},
        "base": {"champ": {"p1": [1, 0], "p2": [1, 0], "p3": [0, 0]}},
    }
    (d,) = paired_rows(per_problem, [("student", "base")], metrics={"champ": ("avg", 2)})
    assert (d.suite, d.a, d.b, d.n_problems) == ("champ", "student", "base", 3)
    assert d.diff == pytest.approx(0.5 / 3)  # diffs 0.5, 0, 0
    assert d.stderr == pytest.approx(math.sqrt(1 / 12) / math.sqrt(3))
    assert d.format() == "champ avg@2: student - base = +16.7 ± 16.7 points (paired over 3 problems)"

    (p,) = paired_rows(per_problem, [("student", "base")], metrics={"champ": ("pass", 2)})
    assert p.diff == pytest.approx(0.0)  # pass@2 is 1, 1, 0 for both

    with pytest.raises(ValueError, match="model 'teacher'"):
        paired_rows(per_problem, [("student", "teacher")])
    per_problem["base"]["champ"] = {"p1": [1]}
    with pytest.raises(ValueError, match="suite 'champ'.*same problems"):
        paired_rows(per_problem, [("student", "base")])


def test_pairwise_differences_compare_each_model_with_each_later_one():
    """`merge-distill eval`'s analysis: pairs in the order the models were given, on every suite both have, each
    suite labelled with the metric of its first row (per-problem estimates as `EvalResult.per_problem` holds them)."""
    rows = [ResultRow("a", "m", "math", "avg", 2, 0.5, 0.1, 2, 2), ResultRow("a", "m", "math", "avg", 1, 0.5, 0.1, 2, 1),
            ResultRow("a", "h", "code", "pass", 1, 0.5, 0.1, 2, 1).to_dict()]
    per_problem = {("a", "m"): {"p": 0.9, "q": 0.5}, ("b", "m"): {"p": 0.4, "q": 0.3}, ("c", "m"): {"p": 0.1, "q": 0.2},
                   ("a", "h"): {"x": 1.0, "y": 0.0}, ("b", "h"): {"x": 0.0, "y": 0.0}}  # c was not scored on h
    got = pairwise_differences(rows, per_problem, ["a", "b", "c"], ["m", "h"])
    assert [(d.suite, d.a, d.b, d.metric, d.k, d.n_problems) for d in got] == [
        ("m", "a", "b", "avg", None, 2), ("h", "a", "b", "pass", None, 2), ("m", "a", "c", "avg", None, 2),
        ("m", "b", "c", "avg", None, 2)]
    assert [d.diff for d in got] == pytest.approx([0.35, 0.5, 0.55, 0.2])  # mean of (0.5, 0.2), (1, 0), ...
    assert got[0].stderr == pytest.approx(0.15)  # differences 0.5 and 0.2: sd 0.212 over sqrt(2)
    assert pairwise_differences(rows, per_problem, ["a"], ["m", "h"]) == []


def test_write_results(tmp_path):
    rows = make_rows()
    paired = [PairedDifference("champ", "student", "base", "avg", 4, 0.304, 0.02, 270)]
    paths = write_results(rows, tmp_path / "out", extra={"paired_differences": paired, "isolation": "process"})
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["results.json", "results.md", "results.png"]

    data = json.loads(paths["json"].read_text())
    assert data["rows"] == [r if isinstance(r, dict) else r.to_dict() for r in rows]
    assert [ResultRow.from_dict(r) for r in data["rows"]][0] == rows[0]
    assert data["isolation"] == "process"
    assert data["paired_differences"][0]["diff"] == pytest.approx(0.304)

    md = paths["md"].read_text()
    assert "| champ | avg@4 | 50.0 ± 2.0 | **80.4 ± 1.2** |" in md
    assert "champ avg@4: student - base = +30.4 ± 2.0 points (paired over 270 problems)" in md
    assert "isolation: process" in md

    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_write_results_overwrites_atomically(tmp_path):
    write_results(make_rows(), tmp_path)
    write_results(make_rows()[:2], tmp_path)
    assert len(json.loads((tmp_path / "results.json").read_text())["rows"]) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json", "results.md", "results.png"]  # no tmp left


def test_write_results_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError, match="no result rows"):
        write_results([], tmp_path)
    with pytest.raises(ValueError, match="reserved"):
        write_results(make_rows(), tmp_path, extra={"rows": []})


def test_students_are_scored_and_paired_at_the_teachers_temperatures(tmp_path):
    """Every temperature the teachers get, the student gets too (`student@T0.8`, `student@greedy`, on every
    suite), and each is paired with each expert at the same temperature on that expert's own suite."""
    from types import SimpleNamespace

    from merge_distill.evaluation.metrics import ResultRow
    from merge_distill.evaluation.runner import EvalResult
    from merge_distill.recipe import Recipe
    from merge_distill.run import model_specs, paired_differences

    recipe = Recipe.model_validate({
        "student": "base", "output_dir": str(tmp_path),
        "experts": [{"name": "math", "teacher": "m", "prompts": "m.jsonl"}, {"name": "code", "teacher": "c", "prompts": "c.jsonl"}],
        "eval": {"teacher_temperatures": [0.8, 0]}})
    suites = [SimpleNamespace(name="zoo-math", domain="math"), SimpleNamespace(name="zoo-code", domain="code")]
    specs = {s.name: s for s in model_specs(recipe, {"student": "out/final"}, suites)}
    assert specs["student@T0.8"].temperature == 0.8 and specs["student@greedy"].temperature == 0
    assert specs["student@greedy"].path == "out/final" and specs["student@greedy"].only_suites is None
    assert specs["math@greedy"].only_suites == ("zoo-math",)

    # per-problem scores that tell every pairing apart: model m on suite s, problem i
    value = {"base": 0.0, "math": 0.1, "code": 0.2, "math@T0.8": 0.3, "code@T0.8": 0.4, "math@greedy": 0.5,
             "code@greedy": 0.6, "student": 1.0, "student@T0.8": 2.0, "student@greedy": 3.0}
    per_problem, rows = {}, []
    for m, v in value.items():
        for s in ("zoo-math", "zoo-code"):
            if "@" in m and not m.startswith("student") and not s.endswith(m.split("@")[0]):
                continue  # sharpened teachers on their own suite only
            per_problem[(m, s)] = {f"p{i}": v + (0.01 * i if s == "zoo-code" else 0) for i in range(4)}
            rows.append(ResultRow(m, s, s[4:], "avg", 1, v, 0.0, 4, 4))
    paired = paired_differences(recipe, EvalResult(rows, per_problem), suites)
    diffs = {(d.suite, d.a, d.b): round(d.diff, 6) for d in paired}
    # in evaluation order, the same in every process
    assert [(d.a, d.b) for d in paired if d.suite == "zoo-math"] == [
        ("student", "math"), ("student", "math@T0.8"), ("student", "math@greedy"), ("student", "base"),
        ("student@T0.8", "math@T0.8"), ("student@greedy", "math@greedy")]
    assert diffs[("zoo-math", "student@T0.8", "math@T0.8")] == 1.7
    assert diffs[("zoo-code", "student@greedy", "code@greedy")] == 2.4
    assert diffs[("zoo-math", "student", "math")] == 0.9 and diffs[("zoo-code", "student", "base")] == 1.0
    # matched pairs only: no student@T0.8 against the T=1 expert or against greedy, none on the other suite
    assert ("zoo-math", "student@T0.8", "math") not in diffs and ("zoo-math", "student@T0.8", "math@greedy") not in diffs
    assert not any(k[1] != "student" and k[2] in ("base", "code@T0.8") and k[0] == "zoo-math" for k in diffs)


def test_compare_against_pairs_each_variant_with_the_named_one(tmp_path):
    """`compare_against: opd`: exopd - opd and corrected - opd on every suite, paired per problem (the
    per-problem differences vary, so a crossed pair or a wrong sign gives another mean and standard error)."""
    from merge_distill.evaluation.runner import EvalResult
    from merge_distill.recipe import Recipe
    from merge_distill.run import paired_differences

    recipe = Recipe.model_validate({
        "student": "base", "output_dir": str(tmp_path), "eval": {},
        "experts": [{"name": "math", "teacher": "m", "prompts": "m.jsonl"}],
        "compare": [{"name": "opd"}, {"name": "exopd"}, {"name": "corrected"}], "compare_against": "opd"})
    suites = [type("S", (), {"name": n, "domain": d}) for n, d in (("zoo-math", "math"), ("zoo-code", "code"))]
    base = {"opd": [0, 0, 1, 1], "exopd": [1, 0, 1, 1], "corrected": [1, 1, 1, 0], "math": [0, 1, 0, 1]}
    per_problem, rows = {}, []
    for m, v in base.items():
        for s in ("zoo-math", "zoo-code"):
            per_problem[(m, s)] = {f"p{i}": x for i, x in enumerate(v)}
            rows.append(ResultRow(m, s, s[4:], "avg", 1, sum(v) / 4, 0.0, 4, 1))
    paired = paired_differences(recipe, EvalResult(rows, per_problem), suites, ("opd", "exopd", "corrected"))
    between = {(d.suite, d.a): (d.diff, round(d.stderr, 6), d.n_problems) for d in paired if d.b == "opd"}
    se_exopd = round(math.sqrt(((1 - 0.25) ** 2 + 3 * 0.25 ** 2) / 3 / 4), 6)  # differences 1, 0, 0, 0
    se_corr = round(math.sqrt((2 * 0.75 ** 2 + 0.25 ** 2 + 1.25 ** 2) / 3 / 4), 6)  # differences 1, 1, 0, -1
    assert between == {("zoo-math", "exopd"): (0.25, se_exopd, 4), ("zoo-code", "exopd"): (0.25, se_exopd, 4),
                       ("zoo-math", "corrected"): (0.25, se_corr, 4), ("zoo-code", "corrected"): (0.25, se_corr, 4)}
    with pytest.raises(ValueError, match="compare_against 'sft' is not a compare: variant"):
        Recipe.model_validate({**recipe.model_dump(), "compare_against": "sft"})


def test_sweep_plot_draws_one_line_per_value_of_the_other_keys(tmp_path):
    """reward_scale x method.log_ratio_clip: score and length against lam, a line per clip value."""
    import matplotlib

    matplotlib.use("Agg")
    from unittest import mock

    from merge_distill.sweep import plot

    points = [{"reward_scale": lam, "method.log_ratio_clip": clip, "suite": "zoo-math", "k": 2, "metric": "avg",
               "score": 0.5 + 0.1 * lam, "stderr": 0.01, "response_length": 30 + 10 * lam * (clip == "null")}
              for lam in (1.5, 1.0, 1.25) for clip in ("null", 0.5)]
    baselines = [{"model": "math", "suite": "zoo-math", "k": 2, "score": 0.7, "response_length": 33.0}]
    import matplotlib.axes

    with mock.patch.object(matplotlib.axes.Axes, "plot", autospec=True, side_effect=matplotlib.axes.Axes.plot) as p:
        plot(points, baselines, ["reward_scale", "method.log_ratio_clip"], tmp_path / "sweep.png")
    lines = {c.kwargs["label"]: (list(c.args[1]), list(c.args[2])) for c in p.call_args_list if "label" in c.kwargs}
    assert lines == {"log_ratio_clip=null": ([1.0, 1.25, 1.5], [40.0, 42.5, 45.0]),
                     "log_ratio_clip=0.5": ([1.0, 1.25, 1.5], [30.0, 30.0, 30.0])}
    assert (tmp_path / "sweep.png").read_bytes()[:4] == b"\x89PNG"
