"""The paper's stack rehearsed on this CPU with a real model: SmolLM2-135M-Instruct (the `[gguf]` extra: its
own tokenizer and chat template, 30 layers, grouped-query attention) as the student, a sharpened copy as the
teacher and the student's start as the reference (lam 1.25, so the reference is scored), on 2 fsdp ranks in
bf16 with the process group built as on CUDA: 2 ExOPD steps whose responses run past 256 tokens (where bf16
stops counting integers exactly), a sharded checkpoint after each, evaluation on both ranks; then the run cut
back to its first checkpoint and resumed in one process, and the final model exported in bf16.

About 5-6 minutes on 2 cores (bf16 has no native kernels on AVX2: decoding is the cost)."""

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open

from launch import torchrun

PROMPTS = ["Print the multiplication table of 7 from 7 x 1 to 7 x 100, one line each.",
           "Print the multiplication table of 8 from 8 x 1 to 8 x 100, one line each."]
MAX_NEW_TOKENS = 264


@torch.no_grad()
def never_ends(model, eos_ids: list[int], channel: int = 0, k: float = 1e4):
    """SmolLM2 that never samples its stop tokens, so every row runs to max_new_tokens (on its own it stops
    after 11-190 tokens of a long answer one time in three): residual channel `channel` carries 1 at every
    position (every embedding row has 1 there, no layer reads it, as their input norms give it weight 0, nor
    writes it, as its rows of o_proj and down_proj are 0), and an untied head reads it only into the stop
    tokens' logits, with weight -k. Every other logit is the model's but for that one channel's share of the
    norms' scale; the prompts' own <|im_end|> are read as before (the input embeddings keep their rows)."""
    head = model.get_input_embeddings().weight.detach().clone()
    model.config.tie_word_embeddings = False
    model.lm_head.weight = torch.nn.Parameter(head)
    model.model.embed_tokens.weight[:, channel] = 1.0
    for layer in model.model.layers:
        layer.input_layernorm.weight[channel] = 0
        layer.post_attention_layernorm.weight[channel] = 0
        layer.self_attn.o_proj.weight[channel] = 0
        layer.mlp.down_proj.weight[channel] = 0
    model.model.norm.weight[channel] = 1.0
    model.lm_head.weight[:, channel] = 0
    model.lm_head.weight[eos_ids, channel] = -k
    return model


@pytest.fixture
def long_answering_smollm2(smollm2_files, tmp_path, monkeypatch) -> Path:
    """`never_ends(SmolLM2)` as an HF folder, with the GGUF's own tokenizer and chat template."""
    from merge_distill.models import load_model, load_tokenizer, save_model
    from merge_distill.sampling import eos_token_ids

    root, gguf, _ = smollm2_files
    monkeypatch.setenv("MERGE_DISTILL_CACHE", str(root))  # the dequantised conversions, kept beside the files
    folder = tmp_path / "never_ends"
    model, tok = load_model(gguf), load_tokenizer(gguf)
    save_model(never_ends(model, eos_token_ids(tok, model)), tok, folder)
    return folder


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_smollm2_on_two_fsdp_ranks_in_bf16_past_256_tokens_resumes_alone_and_exports_bf16(
        smollm2_files, long_answering_smollm2, tmp_path, monkeypatch):
    from merge_distill.build import train_recipe
    from merge_distill.validate import load_recipe

    _, _, teacher = smollm2_files
    (tmp_path / "count.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    run = tmp_path / "run"
    recipe = {
        "student": str(long_answering_smollm2),
        "reward_scale": 1.25,
        "experts": [{"name": "code", "teacher": str(teacher), "reference": "student",
                     "prompts": str(tmp_path / "count.jsonl"), "eval_suite": "humaneval"}],
        "rollout": {"prompts_per_step": 2, "max_new_tokens": MAX_NEW_TOKENS, "temperature": 0.5},
        "optim": {"lr": 1e-5},
        "schedule": {"steps": 2, "checkpoint_every": 1, "keep_checkpoints": 2},
        "eval": {"max_problems": 2, "samples": 1, "max_new_tokens": 24, "baselines": False},
        "dtype": "bfloat16", "parallel": "fsdp", "output_dir": str(run),
    }
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    torchrun("run", str(tmp_path / "r.yaml"), timeout=900)

    two = metrics(run)
    assert [m["step"] for m in two] == [1, 2]
    for m in two:  # every row ran into max_new_tokens: lengths past 256 on both ranks, in bf16
        assert m["truncation_rate"] == 1.0 and m["response_length"] == MAX_NEW_TOKENS, m
        assert abs(m["code/kl_reference"]) < 0.5 and abs(m["code/reverse_kl_teacher"]) > 1e-3
    report = json.loads((run / "report.json").read_text())
    rows = [r for r in report["rows"] if r["model"] == "student" and r.get("subset") is None]
    assert [(r["suite"], r["n_problems"], r["n_samples"]) for r in rows] == [("humaneval", 2, 1)]
    assert report["eval_sampled_by_rank"] == [1, 1]  # each rank sampled its problem

    # each rank wrote its own shard of each checkpoint (torch.distributed.checkpoint)
    for step in (1, 2):
        shards = sorted(p.name for p in (run / "checkpoints" / f"step-{step}").glob("*.distcp"))
        assert shards == ["__0_0.distcp", "__1_0.distcp"], shards

    # cut back to the step-1 checkpoint, as if killed after it, and finish in one process
    import shutil

    shutil.rmtree(run / "final")
    shutil.rmtree(run / "checkpoints" / "step-2")
    train_recipe(load_recipe(tmp_path / "r.yaml"), resume=True)
    one = metrics(run)
    assert [m["step"] for m in one] == [1, 2] and one[0] == two[0]  # step 1 kept as the two ranks logged it
    assert one[1]["truncation_rate"] == 1.0

    # the final model: an HF folder in the recipe's dtype that transformers loads
    from transformers import AutoModelForCausalLM

    final = run / "final"
    with safe_open(final / "model.safetensors", "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    model = AutoModelForCausalLM.from_pretrained(final)
    assert type(model).__name__ == "LlamaForCausalLM" and len(model.model.layers) == 30
    assert model.config.num_key_value_heads < model.config.num_attention_heads  # grouped-query attention
