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
from merge_distill.validate import load_recipe

runner = CliRunner()
PAPER = ["recipes/qwen3_4b_math_code.yaml", "--assume-config", "qwen3-4b", "--gpus", "8", "--gpu-memory", "80"]
DDP = [*PAPER, "--set", "parallel=ddp", "--set", "budget.gradient_checkpointing=false"]
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
    micro-batch, frozen models replicated in bf16 in the trainer): ~51 GiB in the update; the vLLM sampler's
    0.45 x 80 only while it samples (sleep mode), which makes sampling the peak at ~PEAK GiB with the CUDA
    context, NCCL's buffers and the allocator's fragmentation margin.
    No checkpoint exists: each missing folder is planned with the shipped config its name starts with."""
    out = cli("recipes/qwen3_4b_math_code.yaml", "--gpus", "8", "--gpu-memory", "80")
    lines = out.strip().splitlines()
    assert VERDICT.fullmatch(lines[-1]) and lines[-1].endswith(": fits"), lines[-1]
    assert "checkpoints/qwen3-4b-math-rl not found: planned with the shipped qwen3-4b config, after its name" in lines
    peak = float(lines[-1].split()[3])
    assert 60 < peak < 72
    phases = plan_json(*PAPER)["phase_bytes"]
    assert max(phases, key=phases.get) == "sample"
    # without sleep mode the engine's 36 GiB stays through the update too, its CUDA graphs (1 GiB outside the
    # sleep pool while it sleeps) inside them
    awake = plan_json(*PAPER, "--set", "backend.sleep_level=0")["phase_bytes"]
    assert awake["update"] == phases["update"] + 36 * GiB - GiB and awake["sample"] == phases["sample"]
    assert plan_json(*PAPER)["peak_bytes"] == plan_json("recipes/qwen3_4b_math_code.yaml", "--gpus", "8",
                                                        "--gpu-memory", "80")["peak_bytes"]


def test_paper_recipe_does_not_fit_under_ddp_without_checkpointing():
    data = plan_json("recipes/qwen3_4b_math_code.yaml", "--gpus", "8", "--gpu-memory", "80",
                     "--set", "parallel=ddp", "--set", "budget.gradient_checkpointing=false")
    assert not data["fits"] and data["peak_bytes"] > data["budget_bytes"] == 80 * GiB
    assert data["suggestions"]  # settings that would make it fit
    # design.md: ~108 GiB of activations for one 16k sequence alone (195,880 B/token/layer x 36 layers) under
    # ddp's autocast (a float32 residual stream); fsdp computes in bf16 throughout: 170,280 B/token/layer
    ddp = plan_json(*DDP)
    act = next(v for k, v in ddp["components"].items() if k.startswith("activations"))
    assert 105 * GiB < act < 115 * GiB
    one = plan_json(*PAPER, "--set", "budget.gradient_checkpointing=false")
    act = next(v for k, v in one["components"].items() if k.startswith("activations"))
    assert 36 * 170_280 * 16_896 < act < 36 * 170_280 * 16_896 + 2 * GiB
    ckpt = plan_json(*PAPER)
    act = next(v for k, v in ckpt["components"].items() if k.startswith("activations"))
    # each layer's bf16 input (5,120 B/token/layer) + one layer recomputed; design.md's 9.2 was autocast's float32
    assert (36 * 5_120 + 170_280) * 16_896 < act < (36 * 5_120 + 170_280) * 16_896 + 1.5 * GiB


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


def _saved_bytes(config, rows: int, width: int, pad: int, dtype, pure: bool = False, lora: int = 0) -> int:
    """Bytes of the tensors autograd saves in a forward (parameters and autocast's weight copies excluded);
    `pure`: the model itself in dtype, no autocast (fsdp's MixedPrecisionPolicy computes so); `lora`: r of a
    peft adapter on every linear, the base frozen (a LoRA student)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).train()
    if lora:
        import peft

        model.requires_grad_(False)
        model = peft.get_peft_model(model, peft.LoraConfig(task_type="CAUSAL_LM", r=lora, target_modules="all-linear"))
        model = model.get_base_model().train()
    if pure:
        model, dtype = model.to(dtype), torch.float32  # float32: no autocast below
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


@pytest.mark.parametrize("name", ["Qwen3Config", "LlamaConfig"])
@pytest.mark.parametrize("hidden,heads", [(96, 6), (128, 4)])
@pytest.mark.parametrize("rows,pad", [(1, 0), (2, 5)])
def test_fsdp_layer_bytes_match_the_saved_tensors_in_bf16(name, hidden, heads, rows, pad):
    """Under fsdp the whole layer computes in bf16 (no autocast): the residual stream's five saved tensors are
    2 bytes, not 4 (`plan.layer_bytes` with stream 2), measured on the saved tensors of a bf16 model."""
    import transformers

    from merge_distill.plan import layer_bytes

    width = 37
    configs = [getattr(transformers, name)(vocab_size=320, hidden_size=hidden, intermediate_size=160,
                                           num_hidden_layers=n, num_attention_heads=heads, num_key_value_heads=2,
                                           head_dim=16) for n in (1, 2)]
    one, two = (_saved_bytes(c, rows, width, pad, torch.bfloat16, pure=True) for c in configs)
    shape = Shape.from_config(configs[0].to_dict())
    assert two - one == rows * width * layer_bytes(shape, 2, width if pad else 0, stream=2)
    assert layer_bytes(shape, 2, 0, stream=2) == shape.layer_bytes(2) - 10 * hidden  # 5 tensors x 2 bytes fewer


@pytest.mark.parametrize("name", ["Qwen3Config", "LlamaConfig"])
@pytest.mark.parametrize("dtype,pure", [(torch.float32, False), (torch.bfloat16, False), (torch.bfloat16, True)])
@pytest.mark.parametrize("rows,pad", [(1, 0), (2, 5)])
@pytest.mark.parametrize("r", [4, 8])
def test_lora_layer_bytes_match_the_saved_tensors(name, dtype, pure, rows, pad, r):
    """A LoRA student's decoder layer (base frozen, r on all-linear): in float32, under autocast and in pure bf16
    (fsdp), `plan.lora_layer_bytes` is exactly what autograd saves per token."""
    import transformers

    from merge_distill.plan import lora_layer_bytes

    width = 37
    configs = [getattr(transformers, name)(vocab_size=320, hidden_size=96, intermediate_size=160, num_hidden_layers=n,
                                           num_attention_heads=4, num_key_value_heads=2, head_dim=16) for n in (1, 2)]
    one, two = (_saved_bytes(c, rows, width, pad, dtype, pure=pure, lora=r) for c in configs)
    shape = Shape.from_config(configs[0].to_dict())
    c = 4 if dtype == torch.float32 else 2
    stream = c if pure else 4
    assert two - one == rows * width * lora_layer_bytes(shape, c, width if pad else 0, stream, 7 * r)


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
              "rollout": {"prompts_per_step": 8, "max_new_tokens": 100}, "output_dir": str(tmp_path / "run")}
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
    assert set(p.phases) == {"start-up", "sample", "score", "update", "backward end", "all-reduce"}
    fsdp = plan(load_recipe(path, ["parallel=fsdp"]), gpus=2, gpu_memory_bytes=GiB, device="cuda", prompt_tokens=28)
    assert fsdp.components["AdamW m + v (fp32)"] == 4 * P and "all-reduce" not in fsdp.phases
    shared = plan(load_recipe(path, ["parallel=fsdp", "placement.shard_frozen=true"]), gpus=2, gpu_memory_bytes=GiB,
                  device="cuda", prompt_tokens=28)
    assert shared.components["frozen teacher math (float32)"] == 4 * P // 2  # over the 2 GPUs
    capped = plan(load_recipe(path, ["budget.max_rollout_tokens=256"]), gpus=2, gpu_memory_bytes=GiB, device="cuda",
                  prompt_tokens=28)
    assert capped.components["KV cache (2 rows x 128 tokens)"] == 2 * 128 * 3 * 2 * 2 * 16 * 4
    # backend.rollout paged: the budget is the cache's capacity, in float32, plus sdpa's mask over the cache
    paged = plan(load_recipe(path, ["backend.rollout=paged", "budget.max_rollout_tokens=300"]), gpus=2,
                 gpu_memory_bytes=GiB, device="cuda", prompt_tokens=28).components
    assert paged["paged KV cache (300 tokens, float32)"] == 300 * 3 * 2 * 2 * 16 * 4
    assert paged["paged attention mask (256 x 556, float32)"] == 256 * 556 * 4
    assert not any(k.startswith("KV cache") for k in paged)
    ckpt = plan(load_recipe(path, ["budget.gradient_checkpointing=true"]), gpus=2, gpu_memory_bytes=GiB,
                device="cuda", prompt_tokens=28)
    a = next(v for k, v in c.items() if k.startswith("activations"))
    assert next(v for k, v in ckpt.components.items() if k.startswith("activations")) < a


def _act(p) -> int:
    return next(v for k, v in p.components.items() if k.startswith("activations"))


def test_gpu_components_by_hand(tiny):
    """The tiny shape on 2 GPUs under fsdp in bf16: every component a GPU run holds beside torch's tensors."""
    path, shape = tiny
    P = shape.params()
    fsdp = ["parallel=fsdp", "dtype=bfloat16"]
    p = plan(load_recipe(path, fsdp), gpus=2, gpu_memory_bytes=GiB, device="cuda", prompt_tokens=28, meta_init=False)
    c = p.components
    context = "CUDA context (per process; not measured here)"
    nccl = "NCCL buffers (1 communicator: 4 MiB x 32 channels x 2 x 2; not measured here)"
    assert c[context] == 512 * 2**20  # ~400 MB with lazy loading + cuBLAS handles and kernels
    assert c[nccl] == 4 * 2**20 * 32 * 2 * 2  # NCCL_BUFFSIZE x channels x ring connections x (Simple, LL128)
    assert all(context in names and nccl in names for names in p.phases.values())
    # start-up: the whole fp32 student on each rank before fully_shard (meta_init: its half)
    assert c["start-up: the student (fp32) before sharding"] == 4 * P
    assert p.phases["start-up"] == [context, nccl, "start-up: the student (fp32) before sharding",
                                    next(k for k in c if k.startswith("caching allocator fragmentation"))]
    meta = plan(load_recipe(path, fsdp), gpus=2, gpu_memory_bytes=GiB, device="cuda", prompt_tokens=28,
                meta_init=True)
    assert meta.components["start-up: the student (fp32) (meta device: this rank's share)"] == 4 * P // 2
    # the run loads on the meta device under fsdp (models.load_sharded): the default plan is that one
    default = plan(load_recipe(path, fsdp), gpus=2, gpu_memory_bytes=GiB, device="cuda", prompt_tokens=28)
    assert default.components == meta.components
    # fragmentation: 10% of the largest phase's allocations (context and NCCL are not the allocator's)
    margin = next(v for k, v in c.items() if k.startswith("caching allocator fragmentation (10% of its peak"))
    allocated = max(sum(c[x] for x in names if x not in (context, nccl) and not x.startswith("caching"))
                    for names in p.phases.values())
    assert margin == int(0.1 * allocated) and all(any(x.startswith("caching") for x in n) for n in p.phases.values())
    # one process: no communicator
    one = plan(load_recipe(path, fsdp), gpus=1, gpu_memory_bytes=GiB, device="cuda", prompt_tokens=28)
    assert not any(k.startswith("NCCL") for k in one.components) and context in one.components
    # none of these on the CPU
    cpu = plan(load_recipe(path, fsdp), gpus=1, gpu_memory_bytes=GiB, device="cpu", prompt_tokens=28)
    assert not any(k.startswith(("CUDA", "NCCL", "start-up", "caching")) for k in cpu.components)


def test_fsdp_bf16_activations_are_bf16_by_hand(tiny):
    """One 128-token row a micro-batch (2 GPUs, 4 rows each), tiny Qwen3 (hidden 64, 3 layers, intermediate 128,
    head_dim 16): a layer saves 3,696 B/token under autocast (float32 residual stream) and 3,056 in pure bf16
    (5 x 64 x 2 bytes fewer); per token besides: final norm 16 x 64, RoPE 8 x 16, 12, the MLP's gradient
    temporaries 2 x 2 x 128; and the 100 response tokens' hidden states in the stream's bytes."""
    path, _ = tiny
    one_row = ["budget.micro_batch_size=1", "dtype=bfloat16"]
    extras = 16 * 64 + 8 * 16 + 12 + 2 * 2 * 128
    fsdp = plan(load_recipe(path, [*one_row, "parallel=fsdp"]), gpus=2, gpu_memory_bytes=GiB, device="cuda",
                prompt_tokens=28)
    assert _act(fsdp) == 128 * (3 * 3_056 + extras) + 100 * 2 * 64 == 1_400_832
    assert "activations (1 row x 128 tokens, bfloat16 residual stream)" in fsdp.components
    ddp = plan(load_recipe(path, one_row), gpus=2, gpu_memory_bytes=GiB, device="cuda", prompt_tokens=28)
    assert _act(ddp) == 128 * (3 * 3_696 + extras) + 100 * 4 * 64  # autocast keeps the stream float32
    ckpt = plan(load_recipe(path, [*one_row, "parallel=fsdp", "budget.gradient_checkpointing=true"]), gpus=2,
                gpu_memory_bytes=GiB, device="cuda", prompt_tokens=28)
    assert _act(ckpt) == 128 * (3 * 2 * 64 + 3_056 + extras) + 100 * 2 * 64  # each layer's bf16 input + one layer
    # float32: no cast anywhere, the same activations in either layout
    fp32 = [plan(load_recipe(path, ["budget.micro_batch_size=1", f"parallel={layout}"]), gpus=2, gpu_memory_bytes=GiB,
                 device="cuda", prompt_tokens=28) for layout in ("fsdp", "ddp")]
    assert _act(fp32[0]) == _act(fp32[1]) > _act(ddp)


def test_vllm_memory_outside_its_sleep_pool(tiny):
    """Asleep (levels 1, 2) the engine keeps its CUDA graphs, 1 GiB, outside the pool it frees: counted in every
    phase but sampling (where gpu_memory_utilization covers them); awake (level 0) the whole share stays."""
    path, _ = tiny
    vllm = ["backend.rollout=vllm", "backend.gpu_memory_utilization=0.25"]
    outside = "vLLM outside its sleep pool: CUDA graphs (not measured here)"
    p = plan(load_recipe(path, [*vllm, "backend.sleep_level=2"]), gpus=2, gpu_memory_bytes=80 * GiB, device="cuda",
             prompt_tokens=28)
    assert p.components[outside] == GiB
    assert [ph for ph, names in p.phases.items() if outside in names] == ["score", "update", "backward end",
                                                                          "all-reduce"]
    assert "vLLM engine: student rollouts (asleep after sampling)" in p.phases["sample"]
    awake = plan(load_recipe(path, [*vllm, "backend.sleep_level=0"]), gpus=2, gpu_memory_bytes=80 * GiB,
                 device="cuda", prompt_tokens=28)
    assert outside not in awake.components
    assert all("vLLM engine: student rollouts" in names for ph, names in awake.phases.items() if ph != "start-up")
    # the transformers sampler: no engine at all (not even a component)
    assert not any(k.startswith("vLLM") for k in plan(load_recipe(path), gpus=2, gpu_memory_bytes=80 * GiB,
                                                      device="cuda", prompt_tokens=28).components)


def test_sharded_frozen_models_load_whole_first(tiny):
    """placement.shard_frozen, loaded whole on every rank and then sharded (meta_init False): the largest frozen
    model whole beside its own shard is the transient; built on the meta device (the run's loading): its share."""
    path, shape = tiny
    over = ["parallel=fsdp", "placement.shard_frozen=true", "dtype=bfloat16"]
    p = plan(load_recipe(path, over), gpus=4, gpu_memory_bytes=GiB, device="cuda", prompt_tokens=28, meta_init=False)
    label = "start-up: the largest frozen model (bfloat16) before sharding, beside its shard"
    assert p.components[label] == shape.params() * 2 * 3 // 4  # whole (2P bytes) but the quarter resident
    assert label in p.phases["frozen model loading"]
    assert p.components["frozen teacher math (bfloat16)"] == shape.params() * 2 // 4
    meta = plan(load_recipe(path, over), gpus=4, gpu_memory_bytes=GiB, device="cuda", prompt_tokens=28, meta_init=True)
    assert meta.components[label.replace("before sharding", "(meta device: this rank's share)")] == shape.params() // 2
    assert "frozen model loading" not in plan(load_recipe(path, over[:1] + over[2:]), gpus=4, gpu_memory_bytes=GiB,
                                              device="cuda", prompt_tokens=28).phases  # replicated: no transient


def test_memory_mapped_embedding_by_hand():
    """32 MiB of float32 embedding (16,384 x 512) in 512 windows of 64 KiB: 512 random lookups map
    512 x (1 - (511/512)^512) = 323.8 windows on average; none, nothing; a long run, all of it."""
    from merge_distill.plan import mapped_embedding_bytes

    shape = Shape("qwen3", 512, 2, 8, 2, 64, 1408, 16_384, tied=False)
    assert mapped_embedding_bytes(shape, 4, 512) == int(2**25 * (1 - (511 / 512) ** 512)) == 21_222_510
    assert mapped_embedding_bytes(shape, 4, 0) == 0 and mapped_embedding_bytes(shape, 4, 10**7) == 2**25


def test_cpu_frozen_models_in_their_files_dtype_are_memory_mapped(tiny):
    """On CPU transformers maps a float32 checkpoint for a float32 recipe: an untied frozen model's embedding
    counts only the rows looked up over the run (steps x rows x tokens); converted (bf16), tied (the head reads
    it all) or on a GPU (copied), it counts whole."""
    from merge_distill.plan import mapped_embedding_bytes

    path, _ = tiny
    for name in ("student", "teacher"):
        config = json.loads((path.parent / name / "config.json").read_text())
        config.update(vocab_size=131_072, tie_word_embeddings=False, dtype="float32")
        (path.parent / name / "config.json").write_text(json.dumps(config))
    shape = Shape.from_config(config)
    one = ["schedule.steps=1", "rollout.prompts_per_step=2"]
    p = plan(load_recipe(path, one), gpu_memory_bytes=64 * GiB, device="cpu", prompt_tokens=28)
    label = "frozen teacher math, memory-mapped: its embedding's rows as read (float32)"
    embedding = 131_072 * 64 * 4  # 32 MiB: 512 windows; 2 rows x 128 tokens read
    assert p.components[label] == shape.params() * 4 - embedding + mapped_embedding_bytes(shape, 4, 2 * 128)
    assert p.components[label] < shape.params() * 4 - embedding // 2
    assert label in p.phases["score"]
    bf16 = plan(load_recipe(path, [*one, "dtype=bfloat16"]), gpu_memory_bytes=64 * GiB, device="cpu",
                prompt_tokens=28)
    assert bf16.components["frozen teacher math (bfloat16)"] == shape.params() * 2
    gpu = plan(load_recipe(path, one), gpu_memory_bytes=64 * GiB, device="cuda", prompt_tokens=28)
    assert gpu.components["frozen teacher math (float32)"] == shape.params() * 4


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


# ------------------------------------------------------------------------- LoRA students, adapter experts


TINY2 = dict(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16)


@pytest.mark.parametrize("targets,by_hand", [
    # per layer: q 4 x (64 + 64), k and v 4 x (64 + 32), o 4 x (64 + 64), gate, up, down 4 x (64 + 96); 2 layers
    ("all-linear", 2 * (512 + 384 + 384 + 512 + 3 * 640)),
    (["q_proj", "v_proj"], 2 * (512 + 384)),
    (r".*\.mlp\..*_proj", 2 * 3 * 640),
    (["down_proj", "lm_head"], 2 * 640 + 4 * (64 + 320)),  # the head only when named
])
def test_lora_parameter_count_by_hand(targets, by_hand):
    """A 2-layer tiny Qwen3 (hidden 64, q 64, k and v 32, intermediate 96) with r 4: counted by hand, and as peft
    counts the adapter it injects."""
    import peft
    from transformers import AutoModelForCausalLM, Qwen3Config

    from merge_distill.shapes import lora_params

    config = Qwen3Config(**TINY2)
    assert lora_params(Shape.from_config(config.to_dict()), 4, targets) == by_hand
    model = peft.get_peft_model(AutoModelForCausalLM.from_config(config),
                                peft.LoraConfig(task_type="CAUSAL_LM", r=4, target_modules=targets))
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == by_hand


def test_adapter_folder_counts(tmp_path):
    """An adapter folder: its safetensors header's tensors (rank_pattern: q_proj at r 8, what its config's r
    alone would miss), else its config's r and target_modules (peft saves all-linear resolved to full names);
    missing, the LoRA student's spec, in a note; no adapter_config.json, one line."""
    import peft
    from transformers import AutoModelForCausalLM, Qwen3Config

    from merge_distill.errors import UserError
    from merge_distill.recipe import Lora
    from merge_distill.shapes import read_adapter

    config = Qwen3Config(**TINY2)
    shape = Shape.from_config(config.to_dict())
    model = peft.get_peft_model(AutoModelForCausalLM.from_config(config), peft.LoraConfig(
        task_type="CAUSAL_LM", r=4, target_modules=["q_proj", "v_proj"], rank_pattern={"q_proj": 8}))
    model.save_pretrained(tmp_path / "adapter")
    assert read_adapter(str(tmp_path / "adapter"), shape, what="x").params == 2 * (8 * 128 + 4 * 96) == 2816
    (tmp_path / "adapter" / "adapter_model.safetensors").unlink()
    assert read_adapter(str(tmp_path / "adapter"), shape, what="x").params == 2 * (4 * 128 + 4 * 96)
    peft.get_peft_model(AutoModelForCausalLM.from_config(config), peft.LoraConfig(
        task_type="CAUSAL_LM", r=2, target_modules="all-linear")).save_pretrained(tmp_path / "all")
    (tmp_path / "all" / "adapter_model.safetensors").unlink()
    assert read_adapter(str(tmp_path / "all"), shape, what="x").params == 2 * (512 + 384 + 384 + 512 + 3 * 640) // 2
    notes = []
    missing = read_adapter(str(tmp_path / "nowhere"), shape, what="x", assume=Lora(r=4, target_modules=["q_proj"]),
                           notes=notes)
    assert missing.params == 2 * 512 and notes == [f"{tmp_path / 'nowhere'} not found: planned as a LoRA adapter of "
                                                   "r 4 on ['q_proj'] (the student's lora:)"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="experts.0.teacher: .*empty is not a peft adapter"):
        read_adapter(str(tmp_path / "empty"), shape, what="experts.0.teacher")


def _adapter(folder, r: int, targets: list[str]):
    """An adapter folder as the plan reads it: adapter_config.json alone."""
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": r, "target_modules": targets}))
    return str(folder)


@pytest.fixture
def shared(tiny):
    """The tiny recipe with a LoRA student (r 4, all-linear: 3 layers x 4 x (128 + 96 + 96 + 128 + 3 x 192) =
    12,288 parameters), two experts, and adapter folders of r 8 on q_proj, v_proj (3 x 8 x (128 + 96) = 5,376)."""
    path, shape = tiny
    root = path.parent
    data = yaml.safe_load(path.read_text())
    data["student"] = {"path": data["student"], "lora": {"r": 4}}
    data["experts"].append({**data["experts"][0], "name": "code"})
    adapters = [_adapter(root / f"{name}-adapter", 8, ["q_proj", "v_proj"]) for name in ("math", "code")]
    path.write_text(yaml.safe_dump(data))
    return path, shape, adapters


def _with(path, **experts) -> str:
    """The recipe at `path` with these keys set on every expert (callables: of the expert's index), saved beside."""
    data = yaml.safe_load(path.read_text())
    for i, e in enumerate(data["experts"]):
        e.update({k: v(i) if callable(v) else v for k, v in experts.items()})
    out = path.parent / f"r{len(list(path.parent.glob('r*.yaml')))}.yaml"
    out.write_text(yaml.safe_dump(data))
    return str(out)


ADAPTER_PARAMS, STUDENT_ADAPTER_PARAMS = 5_376, 12_288


def test_lora_student_components_by_hand(shared):
    """A LoRA student: its base's P parameters frozen in float32, the adapter's 12,288 in float32 with gradients
    and AdamW's two moments for those alone, the all-reduce over them; no embedding or head gradient."""
    path, shape, _ = shared
    P, A = shape.params(), STUDENT_ADAPTER_PARAMS
    c = plan(load_recipe(path), gpus=2, gpu_memory_bytes=GiB, device="cuda", prompt_tokens=28).components
    assert c["student base weights (fp32, frozen)"] == 4 * P
    assert c["LoRA adapter (fp32 master; r 4, 12,288 parameters)"] == 4 * A
    assert c["gradients (fp32)"] == 4 * A and c["AdamW m + v (fp32)"] == 8 * A
    assert c["all-reduce buffer (flat fp32 gradients)"] == 4 * A
    assert not any(k.startswith("embedding and head gradients") for k in c)
    assert c["start-up: the student (fp32) before sharding"] == 4 * (P + A)
    fsdp = plan(load_recipe(path, ["parallel=fsdp"]), gpus=2, gpu_memory_bytes=GiB, device="cuda",
                prompt_tokens=28).components
    assert fsdp["student base weights (fp32, frozen)"] == 4 * P // 2 and fsdp["AdamW m + v (fp32)"] == 4 * A
    # the head is frozen: a chunk of logits (4 rows x 100 response tokens x 1000) and logsumexp's, no gradient
    assert c["output head: logit chunk and gradient"] == 8 * 400 * 1000


def test_adapter_teacher_of_the_students_base_is_not_a_whole_model(shared):
    """Adapter teachers of the LoRA student's own base and `reference: student` / `teacher_base`: the student's
    base serves them all, so they cost their adapters' float32 weights and nothing else, in every phase."""
    path, shape, adapters = shared
    student = str(path.parent / "student")
    for reference in ("student", "teacher_base"):
        two = ["rollout.rollouts_per_prompt=2"]  # (as grpo needs, below)
        recipe = load_recipe(_with(path, teacher=lambda i: {"base": student, "adapter": adapters[i]},
                                   reference=reference), two)
        p = plan(recipe, gpu_memory_bytes=64 * GiB, device="cpu", prompt_tokens=28)
        frozen = {k: v for k, v in p.components.items() if k.startswith("frozen")}
        assert frozen == {"frozen adapter of teacher math (fp32, loaded into the student)": 4 * ADAPTER_PARAMS,
                          "frozen adapter of teacher code (fp32, loaded into the student)": 4 * ADAPTER_PARAMS}
        alone = plan(load_recipe(_with(path, teacher=None), [*two, "method=grpo"]), gpu_memory_bytes=64 * GiB,
                     device="cpu", prompt_tokens=28)
        assert p.phase_bytes()["update"] == alone.phase_bytes()["update"] + 8 * ADAPTER_PARAMS  # grpo: no frozen model
        assert any("no frozen copy" in note for note in p.notes)


def test_shared_base_is_smaller_by_exactly_the_teacher_bases_and_reference(shared):
    """The same LoRA student and experts, bf16: full-model teachers (two folders) and a reference of its own
    folder (a copy of the base's config) against adapter teachers of the student's base and `teacher_base`: every
    phase is smaller by exactly two teachers and a reference (3 x 2P) less the two adapters (4 bytes each)."""
    path, shape, adapters = shared
    root, student = path.parent, str(path.parent / "student")
    for name in ("teacher2", "base-copy"):
        (root / name).mkdir()
        (root / name / "config.json").write_text((root / "teacher" / "config.json").read_text())
    full = _with(path, teacher=lambda i: str(root / ("teacher", "teacher2")[i]), reference=str(root / "base-copy"))
    lora = _with(path, teacher=lambda i: {"base": student, "adapter": adapters[i]}, reference="teacher_base")
    sizes = [plan(load_recipe(r, ["dtype=bfloat16"]), gpu_memory_bytes=64 * GiB, device="cpu",
                  prompt_tokens=28).phase_bytes() for r in (full, lora)]
    assert set(sizes[0]) == set(sizes[1]) == {"sample", "score", "update", "backward end", "save"}
    for phase in sizes[0]:
        assert sizes[0][phase] - sizes[1][phase] == 3 * 2 * shape.params() - 2 * 4 * ADAPTER_PARAMS, phase


def test_adapter_teachers_of_another_base_share_one_copy(shared):
    """Adapter teachers of a base that is not the student's: one copy of it in the recipe's dtype, their
    adapters in float32; the reference `teacher_base` is that copy too. Under fsdp over several GPUs the LoRA
    student's base serves nothing yet (`build.load_student`): its adapter teachers get one copy of it."""
    path, shape, adapters = shared
    root = path.parent
    other = _with(path, teacher=lambda i: {"base": str(root / "teacher"), "adapter": adapters[i]},
                  reference="teacher_base")
    c = plan(load_recipe(other, ["dtype=bfloat16"]), gpus=2, gpu_memory_bytes=GiB, device="cuda",
             prompt_tokens=28).components
    assert {k: v for k, v in c.items() if k.startswith("frozen")} == {
        "frozen base of teacher math, reference math, teacher code, reference code (bfloat16)": 2 * shape.params(),
        "frozen adapter of teacher math (fp32)": 4 * ADAPTER_PARAMS,
        "frozen adapter of teacher code (fp32)": 4 * ADAPTER_PARAMS}
    own = _with(path, teacher=lambda i: {"base": str(root / "student"), "adapter": adapters[i]})
    fsdp = plan(load_recipe(own, ["dtype=bfloat16", "parallel=fsdp"]), gpus=2, gpu_memory_bytes=GiB, device="cuda",
                prompt_tokens=28)
    assert sum(v for k, v in fsdp.components.items() if k.startswith("frozen")) == (2 * shape.params()
                                                                                  + 2 * 4 * ADAPTER_PARAMS)
    from merge_distill.errors import UserError

    with pytest.raises(UserError, match="placement.shard_frozen: adapter experts of base .*teacher"):
        plan(load_recipe(other, ["parallel=fsdp", "placement.shard_frozen=true"]), gpus=2, gpu_memory_bytes=GiB,
             device="cuda", prompt_tokens=28)


LORA_PAPER = ["recipes/qwen3_4b_math_code_lora.yaml", "--gpus", "8", "--gpu-memory", "80"]


def test_paper_lora_recipe_saves_against_the_full_one():
    """The 4B recipe with a LoRA student (r 32, all-linear: 66,060,288 parameters) and adapter experts of its
    base, no checkpoint present: under the shipped fsdp the teachers and references share one bf16 copy of the
    base (the student's shards do not serve them yet) and nothing of the base trains; under ddp the student's
    own base serves them all."""
    full, lora = plan_json(*PAPER), plan_json(*LORA_PAPER)
    assert lora["fits"] and lora["peak_bytes"] < full["peak_bytes"] - 20 * GiB
    c = lora["components"]
    base = "frozen base of teacher math, reference math, teacher code, reference code (bfloat16)"
    assert c[base] == 4_022_468_096 * 2
    assert c["LoRA adapter (fp32 master; r 32, 66,060,288 parameters)"] == 4 * 66_060_288 / 8
    assert c["frozen adapter of teacher math (fp32)"] == 4 * 66_060_288  # planned as the student's lora:, in a note
    ddp = plan_json(*LORA_PAPER, "--set", "parallel=ddp")["components"]
    assert [k for k in ddp if k.startswith("frozen")] == ["frozen adapter of teacher math (fp32, loaded into the "
                                                          "student)", "frozen adapter of teacher code (fp32, loaded "
                                                          "into the student)"]


def test_memory_plan_benchmark_builds_a_shared_base(tmp_path):
    """benchmarks/memory_plan.py's shared-base case, at a tiny size: a LoRA student of the base folder, two adapter
    experts of that folder with their own weights (r on all-linear, peft's files), references the base: the plan
    counts the two adapters loaded into the student and no frozen model."""
    import sys
    from pathlib import Path

    from safetensors.torch import load_file

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import memory_plan

    shape = memory_plan._shape("tiny-shared", vocab=512, hidden=64, layers=2, heads=4, kv_heads=2, intermediate=96,
                               batch=2, new_tokens=4, prompt=8, lora=4)
    path, longest = memory_plan.build(shape, tmp_path, "cpu")
    recipe = load_recipe(path)
    assert [e.reference for e in recipe.experts] == ["teacher_base", "student"]
    math, code = (load_file(tmp_path / name / "adapter_model.safetensors") for name in ("math", "code"))
    assert not torch.equal(math[next(k for k in math if "lora_B" in k)], code[next(k for k in code if "lora_B" in k)])
    per_layer = 4 * ((64 + 64) * 2 + (64 + 32) * 2 + 3 * (64 + 96))
    assert sum(t.numel() for t in math.values()) == 2 * per_layer
    c = plan(recipe, gpu_memory_bytes=64 * GiB, device="cpu", prompt_tokens=longest, checkpoints=False).components
    assert {k: v for k, v in c.items() if k.startswith("frozen")} == {
        "frozen adapter of teacher math (fp32, loaded into the student)": 4 * 2 * per_layer,
        "frozen adapter of teacher code (fp32, loaded into the student)": 4 * 2 * per_layer}
