"""The model card, `<output_dir>/final/README.md`: Hub metadata that parses, and every number in it read back equal
to report.json's and metrics.jsonl's; written after every run and rewritten identically by `merge-distill card`."""

import json
import re

import pytest
import yaml
from typer.testing import CliRunner

from merge_distill.cli import app
from merge_distill.evaluation.card import base_model, record_run, render_card, run_dirs, tags, trained, write_card
from merge_distill.provenance import provenance
from merge_distill.recipe import Recipe
from merge_distill.validate import load_recipe
from test_eval_ranks import digits_suite

# ------------------------------------------------------------------------------------------------ reading a card


def split_card(text: str) -> tuple[dict, str]:
    """(the YAML metadata, the markdown body)."""
    assert text.startswith("---\n")
    meta, body = text[4:].split("\n---\n", 1)
    return yaml.safe_load(meta), body


def table_cells(body: str) -> dict[tuple[str, str, str], str]:
    """The evaluation table's cells, `(row label, metric, model) -> "45.3 ± 6.2"` (bold removed)."""
    lines = body.split("## Evaluation\n", 1)[1].strip().split("\n\n")[0].splitlines()
    models = [c.strip() for c in lines[0].strip("|").split("|")][2:]
    cells = {}
    for line in lines[2:]:
        label, metric, *values = [c.strip() for c in line.strip("|").split("|")]
        cells.update({(label, metric, m): v.strip("*") for m, v in zip(models, values)})
    return cells


PAIRED = re.compile(r"- (\S+) (\S+): (\S+) - (\S+) = ([+-][\d.]+) ± ([\d.]+) points \(paired over (\d+) problems\)")


def paired_lines(body: str) -> list[tuple]:
    return [m.groups() for m in PAIRED.finditer(body)]


def expected_cells(report: dict) -> dict[tuple[str, str, str], str]:
    return {(r["suite"] if r["subset"] is None else f"{r['suite']} / {r['subset']}", f"{r['metric']}@{r['k']}",
             r["model"]): f"{100 * r['score']:.1f} ± {100 * r['stderr']:.1f}" for r in report["rows"]}


def expected_paired(report: dict) -> list[tuple]:
    return [(d["suite"], f"{d['metric']}@{d['k']}", d["a"], d["b"], f"{100 * d['diff']:+.1f}",
             f"{100 * d['stderr']:.1f}", str(d["n_problems"])) for d in report["paired_differences"]]


def assert_numbers_are_the_reports(card: str, report: dict, model: str = "student") -> None:
    """Every cell and paired row of the card is report.json's (at the precision report.md shows), nothing else;
    the model-index holds the model's scores exactly."""
    meta, body = split_card(card)
    assert table_cells(body) == expected_cells(report)
    assert paired_lines(body) == expected_paired(report)
    (index,) = meta["model-index"]
    scores = {(r["dataset"]["name"], r["dataset"].get("config"), r["metrics"][0]["type"]): r["metrics"][0]["value"]
              for r in index["results"]}
    assert scores == {(r["suite"], r["subset"], f"{r['metric']}@{r['k']}"): r["score"]
                      for r in report["rows"] if r["model"] == model}


# ----------------------------------------------------------------------------------------- rendering, by hand


def row(model, suite, score, stderr, subset=None, metric="avg", k=2):
    return {"model": model, "suite": suite, "domain": suite, "metric": metric, "k": k, "score": score,
            "stderr": stderr, "n_problems": 64, "n_samples": 2, "subset": subset, "temperature": None}


REPORT = {
    "rows": [row("base", "zoo-math", 0.453125, 0.0622), row("student", "zoo-math", 0.6171875, 0.0581),
             row("base", "zoo-math", 0.25, 0.071, subset="plain"), row("student", "zoo-math", 0.375, 0.0833, "plain"),
             row("base", "zoo-code", 0.1875, 0.0491, metric="pass", k=1),
             row("student", "zoo-code", 0.21875, 0.0519, metric="pass", k=1)],
    "paired_differences": [
        {"suite": "zoo-math", "a": "student", "b": "base", "metric": "avg", "k": 2, "diff": 0.1640625,
         "stderr": 0.0415, "n_problems": 64},
        {"suite": "zoo-code", "a": "student", "b": "base", "metric": "pass", "k": 1, "diff": 0.03125,
         "stderr": 0.0214, "n_problems": 64}],
}
RECIPE = {"student": "/models/base", "reward_scale": 1.25, "output_dir": "runs/mine",
          "experts": [{"name": "math", "teacher": "/models/math", "prompts": "math.jsonl"},
                      {"name": "code", "teacher": "/models/code", "prompts": {"dataset": "org/code-prompts"},
                       "reward_scale": 1.0, "reference": "/models/code_base"}]}
METRICS = [  # step 2 was skipped: its tokens changed nothing
    {"step": 1, "skipped": 0, "math/response_length": 10.5, "math/n_sequences": 4, "code/response_length": 20.0,
     "code/n_sequences": 2},
    {"step": 2, "skipped": 1, "math/response_length": 99.0, "math/n_sequences": 4},
    {"step": 3, "skipped": 0, "math/response_length": 12.25, "math/n_sequences": 4, "code/response_length": 7.0,
     "code/n_sequences": 3}]
RUN = {"model": "student", "command": ["merge-distill", "run", "r.yaml", "--set", "seed=3"], "report": "report.json",
       "provenance": {"python": "3.11.7", "torch": "2.13.0+cpu", "cpu": "AMD EPYC", "cpu_instruction_set": "AVX2"}}


def test_the_card_shows_the_reports_numbers_and_the_runs_experts_steps_and_tokens():
    recipe_yaml = yaml.safe_dump(Recipe(**RECIPE).model_dump(mode="json"), sort_keys=False)
    card = render_card(recipe_yaml, RUN, METRICS, REPORT)
    meta, body = split_card(card)
    assert meta["base_model"] == "base" and meta["library_name"] == "transformers"
    assert meta["tags"] == ["merge-distill", "distillation", "g-opd", "exopd", "math", "code"]
    assert meta["datasets"] == ["org/code-prompts"]
    cells = table_cells(body)  # by hand: 45.3125 -> 45.3, 6.22 -> 6.2
    assert cells[("zoo-math", "avg@2", "base")] == "45.3 ± 6.2"
    assert cells[("zoo-math / plain", "avg@2", "student")] == "37.5 ± 8.3"
    assert cells[("zoo-code", "pass@1", "student")] == "21.9 ± 5.2"
    assert paired_lines(body)[0] == ("zoo-math", "avg@2", "student", "base", "+16.4", "4.2", "64")
    assert_numbers_are_the_reports(card, REPORT)
    # each expert's method, lam, teacher and reference
    assert "| math | ExOPD | 1.25 | `/models/math` | the student's initial weights | `math.jsonl` |" in body
    assert "| code | OPD | 1 | `/models/code` | `/models/code_base` | `org/code-prompts` |" in body
    # steps 1 and 3 trained: math 10.5 x 4 + 12.25 x 4 = 91, code 20 x 2 + 7 x 3 = 61
    assert "- steps: 3 of 50 (1 skipped)" in body and "- response tokens trained: 152 (math 91, code 61)" in body
    assert "merge-distill run r.yaml --set seed=3" in body and "| cpu_instruction_set | AVX2 |" in body
    recipe_block = body.split("```yaml\n", 1)[1].split("```", 1)[0]
    assert yaml.safe_load(recipe_block) == yaml.safe_load(recipe_yaml)


def test_trained_counts_the_response_tokens_of_the_steps_that_were_not_skipped():
    assert trained(METRICS, ["math", "code"]) == {"steps": 3, "skipped": 1, "tokens": {"math": 91, "code": 61}}


def test_base_model_is_a_hub_id_or_the_students_folder_name(tmp_path, monkeypatch):
    assert base_model("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert base_model("/home/me/.cache/merge-distill/zoo/smoke-0/base") == "base"
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "local").mkdir(parents=True)
    assert base_model("runs/local") == "local"  # shaped like a hub id, but a folder here


def test_tags_name_exopd_only_where_some_lam_extrapolates():
    experts = [{**e, "reward_scale": 1.0} for e in RECIPE["experts"]]
    assert tags(Recipe(**{**RECIPE, "experts": experts}))[2:] == ["g-opd", "math", "code"]
    assert tags(Recipe(**{**RECIPE, "method": "sft"}))[2:] == ["sft", "math", "code"]


# -------------------------------------------------------------------------------------------- after a real run


@pytest.fixture(scope="module")
def finished(tiny_world, tmp_path_factory, write_recipe):
    """A smoke-sized run of the tiny world, evaluated (baselines and student, on math problems with one-digit
    answers, which its models hit now and then: scores that differ), and the same run not evaluated."""
    root = tmp_path_factory.mktemp("card")
    path = write_recipe(root / "r.yaml", tiny_world, root / "run", steps=2, prompts_per_step=4, max_new_tokens=12)
    recipe = yaml.safe_load(path.read_text())
    recipe["eval"] = {"suites": [str(digits_suite(tiny_world, root / "digits_test.jsonl"))], "samples": 4,
                      "max_new_tokens": 24}
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    result = CliRunner().invoke(app, ["run", str(path), "--set", "seed=1"])
    assert result.exit_code == 0, result.output
    plain = write_recipe(root / "p.yaml", tiny_world, root / "plain", steps=1, prompts_per_step=2, max_new_tokens=8)
    result = CliRunner().invoke(app, ["run", str(plain), "--no-eval"])
    assert result.exit_code == 0, result.output
    return root


def test_a_run_writes_a_hub_card_whose_numbers_are_its_reports(finished):
    run = finished / "run"
    card = (run / "final" / "README.md").read_text()
    report = json.loads((run / "report.json").read_text())
    meta, body = split_card(card)
    assert meta["base_model"] == "base" and meta["tags"][:4] == ["merge-distill", "distillation", "g-opd", "exopd"]
    assert_numbers_are_the_reports(card, report)
    assert {r["model"] for r in report["rows"]} == {"base", "math", "code", "student"}
    assert f"merge-distill run {finished / 'r.yaml'} --set seed=1\n" in body
    assert "- steps: 2 of 2 (0 skipped)" in body
    recipe_block = body.split("```yaml\n", 1)[1].split("```", 1)[0]  # every key, as the run resolved it
    assert yaml.safe_load(recipe_block) == load_recipe(finished / "r.yaml", ["seed=1"]).model_dump(mode="json")
    assert report["provenance"] == provenance()
    assert json.loads((run / "run.json").read_text())["provenance"] == provenance()
    hub = pytest.importorskip("huggingface_hub")
    parsed = hub.ModelCard(card)
    assert parsed.data.base_model == "base" and parsed.data.library_name == "transformers"
    assert [r.metric_value for r in parsed.data.eval_results] == [
        r["score"] for r in report["rows"] if r["model"] == "student"]


def test_a_run_without_evaluation_has_a_card_too(finished):
    meta, body = split_card((finished / "plain" / "final" / "README.md").read_text())
    assert "model-index" not in meta and "No report" in body and "- steps: 1 of 1 (0 skipped)" in body
    assert f"merge-distill run {finished / 'p.yaml'} --no-eval\n" in body


def test_merge_distill_card_rewrites_the_same_file(finished):
    for run in (finished / "run", finished / "plain"):
        card = run / "final" / "README.md"
        before = card.read_text()
        card.write_text("stale")
        result = CliRunner().invoke(app, ["card", str(run)])
        assert result.exit_code == 0, result.output
        assert card.read_text() == before


def test_merge_distill_card_on_a_folder_that_is_no_run_is_one_line(tmp_path):
    result = CliRunner().invoke(app, ["card", str(tmp_path)])
    assert result.exit_code == 1 and "no run.json" in result.output and len(result.output.strip().splitlines()) == 1


def test_the_card_command_finds_each_compare_variants_run(tmp_path):
    for name in ("opd", "exopd"):
        (tmp_path / "variants" / name).mkdir(parents=True)
        (tmp_path / "variants" / name / "run.json").write_text("{}")
    (tmp_path / "variants" / "eval").mkdir()  # a folder that is no run
    assert run_dirs(tmp_path) == [tmp_path / "variants" / "exopd", tmp_path / "variants" / "opd"]
    assert run_dirs(tmp_path / "variants" / "opd") == [tmp_path / "variants" / "opd"]


def test_a_compare_variants_card_reads_the_report_of_the_whole_run(tmp_path):
    """A `compare:` variant trains in `variants/NAME/` and is the report's model NAME; the report is the run's."""
    renamed = {"rows": [{**r, "model": r["model"].replace("student", "exopd")} for r in REPORT["rows"]],
               "paired_differences": [{**d, "a": "exopd"} for d in REPORT["paired_differences"]]}
    (tmp_path / "report.json").write_text(json.dumps(renamed))
    variant = Recipe(**{**RECIPE, "output_dir": str(tmp_path / "variants" / "exopd")})
    (tmp_path / "variants" / "exopd" / "final").mkdir(parents=True)
    record_run(variant, "exopd", None, tmp_path / "report.json")
    assert json.loads((tmp_path / "variants" / "exopd" / "run.json").read_text())["report"] == "../../report.json"
    assert_numbers_are_the_reports(write_card(tmp_path / "variants" / "exopd").read_text(), renamed, "exopd")


def test_a_weight_space_merge_has_a_card(tiny_world, tmp_path, write_recipe):
    path = write_recipe(tmp_path / "r.yaml", tiny_world, tmp_path / "merged")
    result = CliRunner().invoke(app, ["run", str(path), "--set", "method=merge", "--no-eval"])
    assert result.exit_code == 0, result.output
    meta, body = split_card((tmp_path / "merged" / "final" / "README.md").read_text())
    assert meta["tags"][:3] == ["merge-distill", "distillation", "merge"]
    assert "No training: a weight-space merge of the teachers (`merge`)." in body


def test_a_card_names_no_report_until_this_runs_report_is_written(tiny_world, tmp_path, write_recipe, monkeypatch):
    """An evaluation that fails after training leaves the card of the trained model, not one showing the
    report.json an earlier run left in the folder."""
    from merge_distill import run as pipeline
    from merge_distill.errors import UserError

    path = write_recipe(tmp_path / "r.yaml", tiny_world, tmp_path / "run", steps=1, prompts_per_step=2,
                        max_new_tokens=8)
    recipe = yaml.safe_load(path.read_text())
    recipe["eval"] = {"suites": [str(tiny_world / "math_test.jsonl")], "max_problems": 2}
    path.write_text(yaml.safe_dump(recipe))
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "report.json").write_text(json.dumps(REPORT))  # an earlier run's

    def failing(*args, **kwargs):
        raise UserError("evaluation failed")

    monkeypatch.setattr(pipeline, "evaluate_recipe", failing)
    result = CliRunner().invoke(app, ["run", str(path)])
    assert result.exit_code == 1 and "evaluation failed" in result.output
    meta, body = split_card((tmp_path / "run" / "final" / "README.md").read_text())
    assert "model-index" not in meta and "No report" in body
