"""Evaluation on every rank: `merge-distill run` on two gloo ranks evaluates (periodically during training and at
the end) with each rank sampling and grading its share of the problems, and writes the report, the generations
files and the periodic metrics of one process.

The student is frozen (lr 1e-30: every Adam step is far below one ulp of every weight), so both runs evaluate
bit-identical students and any difference is the evaluation's. The two-rank run is sharded (fsdp): its periodic
evaluation samples inside the trainer's decoding section, its final one loads `final/` whole on every rank.
"""

import json
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

from merge_distill.cli import app
from merge_distill.distributed import shard
from launch import torchrun
from test_vllm_adapter import launcher_env, trainer_engines  # noqa: F401 (a fixture)

PROBLEMS, SAMPLES = 7, 4  # rank 0 takes 4 problems, rank 1 takes 3
MODELS = ("base", "math", "code", "student")  # the baselines, then the student
SUITES = ("digits_test", "code_test")         # graded by the math grader and in the sandbox (each rank its own)


def digits_suite(world: Path, path: Path) -> Path:
    """The tiny world's math problems with one-digit answers (problem i: i mod 10), which its models, far from
    solving them, still hit now and then (a completion's last number is a digit ~8% of the time): scores that
    differ from problem to problem and from model to model."""
    records = [json.loads(line) for line in (world / "math_test.jsonl").read_text().splitlines()[:PROBLEMS]]
    path.write_text("".join(json.dumps({**r, "answer": str(i % 10)}) + "\n" for i, r in enumerate(records)))
    return path


def eval_recipe(path: Path, world: Path, out: Path, write_recipe, isolation: str) -> Path:
    write_recipe(path, world, out, steps=2, prompts_per_step=4, max_new_tokens=16, lr=1e-30, eval_every=1)
    recipe = yaml.safe_load(path.read_text())
    recipe["isolation"] = isolation
    suites = [digits_suite(world, path.parent / "digits_test.jsonl"), world / "code_test.jsonl"]
    recipe["eval"] = {"suites": [str(s) for s in suites], "max_problems": PROBLEMS, "samples": SAMPLES,
                      "max_new_tokens": 24}
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def evaluated(tiny_world, tmp_path_factory, write_recipe, isolation):
    """The same recipe run in one process (in-process CLI) and on two fsdp ranks (torchrun)."""
    root = tmp_path_factory.mktemp("eval_ranks")
    one = eval_recipe(root / "one.yaml", tiny_world, root / "one", write_recipe, isolation)
    result = CliRunner().invoke(app, ["run", str(one)])
    assert result.exit_code == 0, result.output
    two = eval_recipe(root / "two.yaml", tiny_world, root / "two", write_recipe, isolation)
    torchrun("run", str(two), "--set", "parallel=fsdp", timeout=300)
    return root


def report(run: Path) -> dict:
    return json.loads((run / "report.json").read_text())


def generations(folder: Path) -> dict[str, list[dict]]:
    return {p.name: [json.loads(line) for line in p.read_text().splitlines()]
            for p in sorted(folder.glob("*.jsonl"))}


@pytest.mark.slow
def test_two_ranks_evaluate_as_one_process(evaluated):
    one, two = evaluated / "one", evaluated / "two"
    w1, w2 = (load_file(run / "final" / "model.safetensors") for run in (one, two))
    assert all((w1[k] == w2[k]).all() for k in w1), "the students differ: the comparison would not isolate evaluation"

    a, b = report(one), report(two)
    assert a["rows"] == b["rows"]  # every score, stderr and count, per model, suite, subset and k
    assert a["paired_differences"] == b["paired_differences"]  # built from the per-problem estimates
    assert {(r["model"], r["suite"]) for r in a["rows"]} == {(m, s) for m in MODELS for s in SUITES}
    # the per-problem files: every sample's completion and verdict, in one process's (problem) order
    gen1, gen2 = generations(one / "eval" / "generations"), generations(two / "eval" / "generations")
    assert list(gen2) == [f"{m}__{s}.jsonl" for m in sorted(MODELS) for s in sorted(SUITES)]
    assert gen1 == gen2
    assert all(len(rows) == PROBLEMS * SAMPLES for rows in gen2.values())
    # scores that a crossed wire would change: some samples pass, models and problems differ
    whole = [r for r in b["rows"] if r["subset"] is None and r["suite"] == "digits_test"]
    assert len({r["score"] for r in whole}) > 1
    assert len({r["score"] for r in gen2["student__digits_test.jsonl"]}) > 1


@pytest.mark.slow
def test_each_rank_samples_its_share(evaluated):
    """Each rank drew the samples of its contiguous share of every suite's problems (not rank 0 all of them,
    as when rank 0 evaluated alone after the process group was gone)."""
    per_pair = len(MODELS) * len(SUITES) * SAMPLES
    shares = [hi - lo for lo, hi in (shard(PROBLEMS, r, 2) for r in range(2))]
    assert shares == [4, 3]
    assert report(evaluated / "one")["eval_sampled_by_rank"] == [per_pair * PROBLEMS]
    assert report(evaluated / "two")["eval_sampled_by_rank"] == [per_pair * n for n in shares]


@pytest.mark.slow
def test_periodic_evaluation_on_two_ranks_logs_the_metrics_of_one_process(evaluated):
    one, two = ([json.loads(l) for l in (evaluated / run / "metrics.jsonl").read_text().splitlines()]
                for run in ("one", "two"))
    assert [sorted(k for k in m if k.startswith("eval/")) for m in two] == [[f"eval/{s}" for s in sorted(SUITES)], []]
    for key in (f"eval/{s}" for s in SUITES):
        assert two[0][key] == one[0][key], key
    step = Path("evals") / "step-1" / "generations"
    assert generations(evaluated / "one" / step) == generations(evaluated / "two" / step)
    # the ranks' own files became the one file
    assert not list((evaluated / "two").rglob("*.rank-*.jsonl"))


@pytest.mark.slow
def test_eval_command_on_two_ranks_writes_the_results_of_one_process(tiny_world, tmp_path, isolation):
    """`merge-distill eval` under torchrun: each rank its share, rank 0 the files (and the table)."""
    suite = digits_suite(tiny_world, tmp_path / "digits_test.jsonl")
    args = ["eval", "--model", f"base={tiny_world / 'base'}", "--model", f"math={tiny_world / 'math_teacher'}",
            "--suite", str(suite), "--suite", str(tiny_world / "code_test.jsonl"), "--samples", str(SAMPLES),
            "--max-new-tokens", "24", "--max-problems", str(PROBLEMS), "--isolation", isolation]
    result = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "one")])
    assert result.exit_code == 0, result.output
    two = torchrun(*args, "--out", str(tmp_path / "two"))
    assert two.stdout.count("samples/s; wrote") == 1  # rank 0 alone prints
    a, b = (json.loads((tmp_path / run / "results.json").read_text()) for run in ("one", "two"))
    assert a["rows"] == b["rows"] and a["paired_differences"] == b["paired_differences"]
    assert generations(tmp_path / "one" / "generations") == generations(tmp_path / "two" / "generations")
    per_pair = 2 * len(SUITES) * SAMPLES
    assert (a["sampled_by_rank"], b["sampled_by_rank"]) == ([per_pair * PROBLEMS], [per_pair * 4, per_pair * 3])


def test_an_evaluation_cut_on_two_ranks_resumes_in_one_process(tiny_world, tmp_path, sampled_rows):
    """The ranks' files of a killed two-rank evaluation (rank 1's last line cut in half): one process samples only
    what they lack and writes the file of an uninterrupted evaluation, in problem order, without the ranks' files."""
    from merge_distill.evaluation.runner import ModelSpec, evaluate, generations_path, rank_part, rank_parts
    from merge_distill.evaluation.suites import load_suite

    suite = load_suite(digits_suite(tiny_world, tmp_path / "digits_test.jsonl"))
    models, options = [ModelSpec("base", str(tiny_world / "base"))], dict(samples=2, max_new_tokens=24)
    evaluate(models, [suite], out_dir=tmp_path / "whole", **options)
    whole = generations_path(tmp_path / "whole", "base", suite.name).read_text().splitlines()
    assert len(whole) == 2 * PROBLEMS
    path = generations_path(tmp_path / "cut", "base", suite.name)
    path.parent.mkdir(parents=True)
    rank_part(path, 0).write_text("\n".join(whole[:8]) + "\n")  # problems 0-3
    rank_part(path, 1).write_text("\n".join(whole[8:11]) + "\n" + whole[11][:30])  # 4, 5 (sample 0), half of 5/1
    sampled_rows.clear()
    result = evaluate(models, [suite], out_dir=tmp_path / "cut", **options)
    assert sampled_rows == [3] and result.sampled_by_rank == [3]  # problem 5's second sample, problem 6's two
    assert path.read_text().splitlines() == whole
    assert not rank_parts(path)


def test_a_vllm_recipe_evaluates_each_model_in_a_vllm_engine(monkeypatch, launcher_env, tiny_world, tmp_path,
                                                             write_recipe):
    """backend.rollout vllm (vLLM 0.33's names over fakes: no real vLLM here): after training, each model of the
    report samples in a vLLM engine built from its folder, resident (no sleep mode, nothing to reload), sized for
    the longest evaluation request, with the recipe's engine settings, stopping at every EOS id of that folder's
    generation config (the student here has a second one, as Qwen3 instruct models do; the teachers do not)."""
    import shutil

    from merge_distill.data import render_prompt
    from merge_distill.evaluation.suites import load_suite
    from merge_distill.models import load_tokenizer
    from test_vllm_adapter import FakeLLM

    class StopsSeen(FakeLLM):
        def generate(self, prompts, params, use_tqdm=True, lora_request=None):
            self.stops = {tuple(p.stop_token_ids) for p in params}
            return super().generate(prompts, params, use_tqdm, lora_request=lora_request)

    engines = trainer_engines(monkeypatch, StopsSeen)
    student = shutil.copytree(tiny_world / "base", tmp_path / "student")
    config = json.loads((student / "generation_config.json").read_text())
    eos = config["eos_token_id"]
    (student / "generation_config.json").write_text(json.dumps({**config, "eos_token_id": [eos, 7]}))
    path = write_recipe(tmp_path / "r.yaml", tiny_world, tmp_path / "run", steps=1, prompts_per_step=2,
                        max_new_tokens=4)
    recipe = yaml.safe_load(path.read_text())
    suite = str(tiny_world / "math_test.jsonl")
    recipe["student"] = str(student)
    recipe["eval"] = {"suites": [suite], "max_problems": 3, "max_new_tokens": 6}
    recipe["backend"] = {"rollout": "vllm", "gpu_memory_utilization": 0.3, "max_num_seqs": 5}
    path.write_text(yaml.safe_dump(recipe))
    result = CliRunner().invoke(app, ["run", str(path)])
    assert result.exit_code == 0, result.output

    trainer, *evaluating = engines
    assert trainer.kwargs["model"] == str(student) and trainer.kwargs["enable_sleep_mode"]
    assert [e.kwargs["model"] for e in evaluating] == [
        str(student), *(str(tiny_world / m) for m in ("math_teacher", "code_teacher")), str(tmp_path / "run" / "final")]
    assert [e.stops for e in evaluating] == [{(eos, 7)}, {(eos,)}, {(eos,)}, {(eos, 7)}]
    tokenizer, loaded = load_tokenizer(student), load_suite(suite)
    longest = max(len(render_prompt(tokenizer, loaded.render_prompt(r), loaded.system_prompt))
                  for r in loaded.records[:3])
    for e in evaluating:
        assert e.kwargs["max_model_len"] == longest + 6
        assert (e.kwargs["dtype"], e.kwargs["gpu_memory_utilization"], e.kwargs["max_num_seqs"]) == ("float32", 0.3, 5)
        assert not e.kwargs["enable_sleep_mode"] and [what for what, _ in e.calls] == ["generate"]
    rows = (tmp_path / "run" / "eval" / "generations" / "student__math_test.jsonl").read_text().splitlines()
    assert len(rows) == 3
