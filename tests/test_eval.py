"""`merge-distill eval`: two models on two suites end to end, resuming an interrupted eval, bad input."""

import json

import pytest
from typer.testing import CliRunner

from merge_distill.cli import app
from merge_distill.provenance import provenance

runner = CliRunner()


def _eval_args(world, out, *extra):
    return ["eval", "--model", f"base={world / 'base'}", "--model", f"math={world / 'math_teacher'}",
            "--suite", str(world / "math_test.jsonl"), "--suite", str(world / "code_test.jsonl"),
            "--samples", "2", "--max-new-tokens", "40", "--max-problems", "12", "--out", str(out), *extra]


@pytest.mark.slow
def test_two_models_on_two_suites(tiny_world, tmp_path, isolation):
    out = tmp_path / "ev"
    result = runner.invoke(app, _eval_args(tiny_world, out, "--isolation", isolation))
    assert result.exit_code == 0, result.output
    assert "base" in result.output and "math" in result.output and "samples/s" in result.output
    # the table has code results: the level they ran under is printed right under it, and recorded
    lines = result.output.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith(f"isolation: {isolation}"))
    assert "score ± stderr" in "".join(lines[at - 3: at]), result.output  # right after the table's caption
    assert json.loads((out / "results.json").read_text())["sandbox_isolation"] == isolation
    assert json.loads((out / "results.json").read_text())["provenance"] == provenance()  # what scored them
    assert f"_isolation: {isolation}" in (out / "results.md").read_text()
    rows = json.loads((out / "results.json").read_text())["rows"]
    whole = [r for r in rows if r["subset"] is None]
    assert {(r["model"], r["suite"]) for r in whole} == {
        (m, s) for m in ("base", "math") for s in ("math_test", "code_test")}
    assert all(r["n_problems"] == 12 and r["n_samples"] == 2 for r in whole)
    assert {r["metric"] for r in whole} == {"avg", "pass"}
    assert (out / "results.md").read_text().startswith("#")
    assert (out / "results.png").read_bytes()[:4] == b"\x89PNG"
    lines = (out / "generations" / "math__math_test.jsonl").read_text().splitlines()
    assert len(lines) == 24 and {"completion", "verdict", "score"} <= set(json.loads(lines[0]))


@pytest.mark.slow
def test_interrupted_eval_resumes_without_regenerating(tiny_world, tmp_path, sampled_rows, isolation):
    out = tmp_path / "ev"
    assert runner.invoke(app, _eval_args(tiny_world, out, "--isolation", isolation)).exit_code == 0
    gen = out / "generations" / "base__math_test.jsonl"
    lines = gen.read_text().splitlines()
    # a kill mid-write: 10 finished samples and half a line
    gen.write_text("\n".join(lines[:10]) + "\n" + lines[10][: len(lines[10]) // 2])
    sampled_rows.clear()
    assert runner.invoke(app, _eval_args(tiny_world, out, "--isolation", isolation)).exit_code == 0
    assert sampled_rows == [14]  # only the missing samples of the one cut file, nothing else
    resumed = [json.loads(l) for l in gen.read_text().splitlines() if l.strip().endswith("}")]
    assert [json.dumps(r) for r in resumed[:10]] == [json.dumps(json.loads(l)) for l in lines[:10]]
    assert sorted((r["task_id"], r["sample"]) for r in resumed) == sorted(
        (json.loads(l)["task_id"], json.loads(l)["sample"]) for l in lines)


def _error(args) -> str:
    result = runner.invoke(app, args)
    assert result.exit_code == 1, result.output
    err = result.stderr.strip()
    assert err.startswith("error:") and len(err.splitlines()) == 1, err
    return err


def test_bad_input(tiny_world, tmp_path):
    base = f"base={tiny_world / 'base'}"
    assert "unknown suite 'aime2099'" in _error(["eval", "--model", base, "--suite", "aime2099"])
    err = _error(["eval", "--model", f"x={tiny_world / 'math.jsonl'}", "--suite", "humaneval"])
    assert "--model x" in err and "not a model" in err
    assert "--samples must be at least 1" in _error(
        ["eval", "--model", base, "--suite", str(tiny_world / "math_test.jsonl"), "--samples", "0",
         "--out", str(tmp_path)])
    assert "expected NAME=PATH" in _error(["eval", "--model", str(tiny_world / "base"), "--suite", "humaneval"])


@pytest.mark.slow
def test_generations_do_not_depend_on_chunking(tiny_world, tmp_path):
    """Each (problem, sample) has its own seed: any batch size, with grading overlapped, gives the same file."""
    from merge_distill.evaluation.runner import ModelSpec, evaluate
    from merge_distill.evaluation.suites import load_suite

    suite = load_suite(str(tiny_world / "math_test.jsonl"))
    texts = {}
    for batch_size in (5, 256):
        out = tmp_path / f"b{batch_size}"
        evaluate([ModelSpec("base", str(tiny_world / "base"))], [suite], samples=2, max_new_tokens=24,
                 out_dir=out, batch_size=batch_size)
        rows = [json.loads(l) for l in (out / "generations" / "base__math_test.jsonl").read_text().splitlines()]
        texts[batch_size] = {(r["task_id"], r["sample"]): (r["completion"], r["verdict"]) for r in rows}
    assert len(texts[5]) == 2 * len(suite.records)
    assert texts[5] == texts[256]
