"""`merge-distill plan`: memory per device from config.json alone (merge_distill/plan.py). No weights."""

import contextlib
import json
import re

import pytest
import torch
import yaml
from typer.testing import CliRunner

from merge_distill.cli import app
from merge_distill.plan import GiB, plan
from merge_distill.shapes import Shape, shipped_configs
from merge_distill.recipe import load_recipe

runner = CliRunner()
PAPER = ["recipes/qwen3_4b_math_code.yaml", "--assume-config", "qwen3-4b", "--gpus", "8", "--gpu-memory", "80"]
DDP = [*PAPER, "--set", "parallel=ddp", "--set", "train.gradient_checkpointing=false"]
VERDICT = re.compile(r"peak per device: \d+\.\d GiB of \d+\.\d GiB: (fits|does not fit)")


def cli(*args):
    result = runner.invoke(app, ["plan", *args])
    assert result.exit_code == 0, result.output
    return result.stdout


def plan_json(*args) -> dict:
    return json.loads(cli(*args, "--json"))


# ------------------------------------------------------------------------------------ the paper's setting


def test_paper_recipe_fits_with_its_own_settings_and_no_weights():
    """design.md section 7's layout, which the shipped recipe now uses (FSDP2, checkpointing, one 16k sequence a
    micro-batch, frozen models replicated in bf16 in the trainer): ~48 GiB in the update; the vLLM sampler's
    0.45 x 80 only while it samples (sleep mode), which makes sampling the peak at ~66 GiB.
    No checkpoint exists: each missing folder is planned with the shipped config its name starts with."""
    out = cli("recipes/qwen3_4b_math_code.yaml", "--gpus", "8", "--gpu-memory", "80")
    lines = out.strip().splitlines()
    assert VERDICT.fullmatch(lines[-1]) and lines[-1].endswith(": fits"), lines[-1]
    assert "checkpoints/qwen3-4b-math-rl not found: planned with the shipped qwen3-4b config, after its name" in lines
    peak = float(lines[-1].split()[3])
    assert 60 < peak < 72
    phases = plan_json(*PAPER)["phase_bytes"]
    assert max(phases, key=phases.get) == "sample"
    # without sleep mode the engine's 36 GiB stays through the update too
    awake = plan_json(*PAPER, "--set", "backend.sleep_level=0")["phase_bytes"]
    assert awake["update"] == phases["update"] + 36 * GiB and awake["sample"] == phases["sample"]
    assert plan_json(*PAPER)["peak_bytes"] == plan_json("recipes/qwen3_4b_math_code.yaml", "--gpus", "8",
                                                        "--gpu-memory", "80")["peak_bytes"]


def test_paper_recipe_does_not_fit_under_ddp_without_checkpointing():
    data = plan_json("recipes/qwen3_4b_math_code.yaml", "--gpus", "8", "--gpu-memory", "80",
                     "--set", "parallel=ddp", "--set", "train.gradient_checkpointing=false")
    assert not data["fits"] and data["peak_bytes"] > data["budget_bytes"] == 80 * GiB
    assert data["suggestions"]  # settings that would make it fit
    # design.md: ~108 GiB of activations for one 16k sequence alone (195,880 B/token/layer x 36 layers)
    one = plan_json(*PAPER, "--set", "train.gradient_checkpointing=false")
    act = next(v for k, v in one["components"].items() if k.startswith("activations"))
    assert 105 * GiB < act < 115 * GiB
    ckpt = plan_json(*PAPER)
    act = next(v for k, v in ckpt["components"].items() if k.startswith("activations"))
    assert 8.5 * GiB < act < 11 * GiB  # design.md: 9.2 (10,240 B/token/layer + one layer recomputed)


def test_paper_recipe_components():
    """Per GPU under ddp: fp32 weights 15, gradients 15, AdamW 30, bf16 autocast copies ~7, flat all-reduce 15 GiB;
    one vLLM engine (the sampler) takes gpu_memory_utilization 0.45 of the GPU; the two teachers and the reference
    (lam 1.25 scores the student's initial weights too) are the trainer's, in bf16."""
    c = plan_json(*DDP)["components"]
    assert round(c["student weights (fp32 master)"] / GiB, 1) == 15.0 == round(c["gradients (fp32)"] / GiB, 1)
    assert round(c["AdamW m + v (fp32)"] / GiB, 1) == 30.0
    assert round(c["all-reduce buffer (flat fp32 gradients)"] / GiB, 1) == 15.0
    assert 6.5 * GiB < c["bfloat16 autocast copies of the weights"] < 7.5 * GiB  # 192 MiB a layer, 36 layers
    assert [k for k in c if k.startswith("vLLM engine")] == ["vLLM engine: student rollouts (asleep after sampling)"]
    assert round(c["vLLM engine: student rollouts (asleep after sampling)"] / GiB, 1) == 36.0
    assert sorted(k for k in c if k.startswith("frozen")) == [
        "frozen reference math (student's initial weights) (bfloat16)", "frozen teacher code (bfloat16)",
        "frozen teacher math (bfloat16)"]
    fsdp = plan_json(*PAPER)["components"]
    assert round(fsdp["student weights (fp32 master)"] / GiB, 2) == 1.87 and "all-reduce buffer" not in str(fsdp)
    frozen = plan_json(*PAPER)["components"]
    assert sum(v for k, v in frozen.items() if k.startswith("frozen")) == 3 * 4_022_468_096 * 2  # 22.5 GiB


def test_last_line_and_json_keys():
    out = cli(*DDP)
    assert VERDICT.fullmatch(out.strip().splitlines()[-1])
    assert "would fit with:" in out
    data = plan_json(*PAPER)
    assert {"peak_bytes", "budget_bytes", "fits", "components", "phases", "suggestions"} <= set(data)
    assert data["peak_bytes"] == max(data["phase_bytes"].values())


# -------------------------------------------------------------------------------- parameters, from configs


@pytest.mark.parametrize("name,kwargs", [
    ("Qwen3Config", dict(num_key_value_heads=2, head_dim=24)),
    ("Qwen3Config", dict(num_key_value_heads=2, tie_word_embeddings=False)),
    ("LlamaConfig", dict(num_key_value_heads=2, tie_word_embeddings=False)),
    ("LlamaConfig", dict(num_key_value_heads=4, attention_bias=True, mlp_bias=True)),
    ("Qwen2Config", dict(num_key_value_heads=2)),
    ("MistralConfig", dict(num_key_value_heads=2, head_dim=16)),
    ("GemmaConfig", dict(num_key_value_heads=1, head_dim=32)),
    ("Gemma2Config", dict(num_key_value_heads=2, head_dim=16)),
    ("Gemma3TextConfig", dict(num_key_value_heads=2, head_dim=16)),
])
def test_parameter_count_is_exact(name, kwargs):
    import transformers

    config = getattr(transformers, name)(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                                         num_attention_heads=4, **kwargs)
    model = transformers.AutoModelForCausalLM.from_config(config)
    assert Shape.from_config(config.to_dict()).params() == sum(p.numel() for p in model.parameters())


def test_shipped_qwen3_configs():
    from transformers import AutoConfig

    expected = {"qwen3-0.6b": 596_049_920, "qwen3-1.7b": 1_720_574_976, "qwen3-4b": 4_022_468_096,
                "qwen3-8b": 8_190_735_360}
    assert shipped_configs() == sorted(expected)
    from merge_distill.shapes import CONFIGS

    for name, params in expected.items():
        config = AutoConfig.from_pretrained(CONFIGS / name)
        assert config.model_type == "qwen3" and config.vocab_size == 151_936
        assert Shape.from_config(config.to_dict()).params() == params
        with torch.device("meta"):
            from transformers import AutoModelForCausalLM

            assert sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters()) == params


# ------------------------------------------------------------------------------------------ activations


def _saved_bytes(config, rows: int, width: int, pad: int, dtype) -> int:
    """Bytes of the tensors autograd saves in a forward (parameters and autocast's weight copies excluded)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).train()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    weights = {s for p in model.parameters() if p.dim() == 2 for s in (tuple(p.shape), tuple(p.shape)[::-1])}
    seen = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in params and tuple(t.shape) not in weights:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    mask = torch.ones(rows, width, dtype=torch.long)
    mask[0, :pad] = 0
    ctx = torch.autocast("cpu", dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), ctx:
        model.model(input_ids=torch.randint(0, 320, (rows, width)), attention_mask=mask,
                    position_ids=(mask.cumsum(-1) - 1).clamp(min=0))
    return sum(seen.values())


@pytest.mark.parametrize("name", ["Qwen3Config", "LlamaConfig"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,pad", [(1, 0), (2, 5)])
def test_layer_bytes_match_the_saved_tensors(name, dtype, rows, pad):
    """What one decoder layer saves for backward, per token: the formula is exact (SDPA, transformers 5.24)."""
    import transformers

    width = 37
    configs = [getattr(transformers, name)(vocab_size=320, hidden_size=96, intermediate_size=160, num_hidden_layers=n,
                                           num_attention_heads=6, num_key_value_heads=2, head_dim=16)
               for n in (1, 2)]
    one, two = (_saved_bytes(c, rows, width, pad, dtype) for c in configs)
    c = 4 if dtype == torch.float32 else 2
    assert two - one == rows * width * Shape.from_config(configs[0].to_dict()).layer_bytes(c, width if pad else 0)


def test_qwen3_4b_layer_bytes_match_design_md():
    from merge_distill.shapes import CONFIGS

    shape = Shape.from_config(json.loads((CONFIGS / "qwen3-4b" / "config.json").read_text()))
    assert shape.layer_bytes(2) == 195_880  # measured (design.md section 7)
    assert shape.layers * shape.layer_linear_params() * 2 / shape.layers / 2**20 == pytest.approx(192.4, abs=0.1)


# ------------------------------------------------------------------------------- arithmetic on a tiny shape


@pytest.fixture
def tiny(tmp_path):
    """A recipe over a tiny Qwen3 config (no weights): hidden 64, 3 layers, 4 heads, 2 kv heads, head_dim 16."""
    config = {"model_type": "qwen3", "hidden_size": 64, "num_hidden_layers": 3, "num_attention_heads": 4,
              "num_key_value_heads": 2, "head_dim": 16, "intermediate_size": 128, "vocab_size": 1000,
              "tie_word_embeddings": True}
    for name in ("student", "teacher"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps(config))
    recipe = {"student": str(tmp_path / "student"), "reward_scale": 1.25,
              "experts": [{"name": "math", "teacher": str(tmp_path / "teacher"), "prompts": "x.jsonl"}],
              "train": {"prompts_per_step": 8, "max_new_tokens": 100}, "output_dir": str(tmp_path / "run")}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    return tmp_path / "r.yaml", Shape.from_config(config)


def test_component_arithmetic(tiny):
    path, shape = tiny
    P = 3 * (64 * 64 * 2 + 2 * 64 * 32 + 3 * 64 * 128 + 2 * 64 + 2 * 16) + 1000 * 64 + 64
    assert shape.params() == P
    p = plan(load_recipe(path), gpus=2, gpu_memory_bytes=GiB, device="cuda", prompt_tokens=28)
    c = p.components
    assert c["student weights (fp32 master)"] == c["gradients (fp32)"] == 4 * P
    assert c["AdamW m + v (fp32)"] == 8 * P
    assert c["all-reduce buffer (flat fp32 gradients)"] == 4 * P
    # 4 rows a rank x (28 + 100) tokens x 3 layers x K and V (2 kv heads x head_dim 16, float32)
    assert c["KV cache (4 rows x 128 tokens)"] == 4 * 128 * 3 * 2 * 2 * 16 * 4
    # lam 1.25: the teacher and the student's initial weights as the reference, float32
    assert c["frozen teacher math (float32)"] == c["frozen reference math (student's initial weights) (float32)"] == 4 * P
    assert set(p.phases) == {"sample", "score", "update", "backward end", "all-reduce"}
    fsdp = plan(load_recipe(path, ["parallel=fsdp"]), gpus=2, gpu_memory_bytes=GiB, device="cuda", prompt_tokens=28)
    assert fsdp.components["AdamW m + v (fp32)"] == 4 * P and "all-reduce" not in fsdp.phases
    shared = plan(load_recipe(path, ["parallel=fsdp", "placement.shard_frozen=true"]), gpus=2, gpu_memory_bytes=GiB,
                  device="cuda", prompt_tokens=28)
    assert shared.components["frozen teacher math (float32)"] == 4 * P // 2  # over the 2 GPUs
    capped = plan(load_recipe(path, ["train.max_rollout_tokens=256"]), gpus=2, gpu_memory_bytes=GiB, device="cuda",
                  prompt_tokens=28)
    assert capped.components["KV cache (2 rows x 128 tokens)"] == 2 * 128 * 3 * 2 * 2 * 16 * 4
    # backend.rollout paged: the budget is the cache's capacity, in float32, plus sdpa's mask over the cache
    paged = plan(load_recipe(path, ["backend.rollout=paged", "train.max_rollout_tokens=300"]), gpus=2,
                 gpu_memory_bytes=GiB, device="cuda", prompt_tokens=28).components
    assert paged["paged KV cache (300 tokens, float32)"] == 300 * 3 * 2 * 2 * 16 * 4
    assert paged["paged attention mask (256 x 556, float32)"] == 256 * 556 * 4
    assert not any(k.startswith("KV cache") for k in paged)
    ckpt = plan(load_recipe(path, ["train.gradient_checkpointing=true"]), gpus=2, gpu_memory_bytes=GiB,
                device="cuda", prompt_tokens=28)
    a = next(v for k, v in c.items() if k.startswith("activations"))
    assert next(v for k, v in ckpt.components.items() if k.startswith("activations")) < a


def test_cpu_plan_counts_the_process(tiny):
    path, _ = tiny
    p = plan(load_recipe(path), gpu_memory_bytes=64 * GiB, device="cpu", prompt_tokens=28)
    assert any(k.startswith("process baseline") for k in p.components) and "save" in p.phases
    assert p.fits and p.peak_bytes < GiB


# ------------------------------------------------------------------------------------------- errors


def one_line_error(args) -> str:
    result = runner.invoke(app, args)
    assert result.exit_code == 1, result.output
    err = result.stderr.strip()
    assert err.startswith("error:") and len(err.splitlines()) == 1, err
    return err


def test_missing_models_name_the_field(tiny, tmp_path):
    path, _ = tiny
    assert "student: checkpoints/mystery not found" in one_line_error(
        ["plan", "recipes/qwen3_4b_math_code.yaml", "--set", "student=checkpoints/mystery"])
    data = yaml.safe_load(path.read_text())
    data["experts"][0]["teacher"] = "checkpoints/x"
    path.write_text(yaml.safe_dump(data))
    assert "experts.0.teacher (math): checkpoints/x not found" in one_line_error(["plan", str(path)])


def test_bad_options_are_one_line(tiny):
    path, _ = tiny
    assert "--assume-config qwen9" in one_line_error(["plan", "recipes/qwen3_4b_math_code.yaml",
                                                      "--assume-config", "qwen9"])
    assert "parallel: Input should be 'ddp' or 'fsdp'" in one_line_error(["plan", str(path), "--set", "parallel=zero"])


def test_unbuilt_zoo_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("MERGE_DISTILL_CACHE", str(tmp_path / "cache"))
    assert "not built yet" in one_line_error(["plan", "recipes/smoke.yaml"])


def test_validate_shows_the_verdict(tiny_world, tmp_path, write_recipe):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_world, tmp_path / "run")
    result = runner.invoke(app, ["validate", str(recipe)])
    assert result.exit_code == 0, result.output
    line = next(x for x in result.stdout.splitlines() if x.startswith("memory plan"))
    assert VERDICT.search(line) and line.endswith(": fits")
