"""LoRA students and adapter experts (peft), against hand computations.

The adapters here are peft's own, made with `init_lora_weights=False` (A and B both random), so that every
adapter moves the base's log-probs and two adapters are told apart. The expected log-probs are a plain forward
of each row alone (its real prompt and response tokens, no padding) through a model loaded separately: the base
folder, or the adapter merged into it by peft and saved as an ordinary folder. A crossed wire (the adapter
left on for the reference, another domain's adapter, the student's adapter on while a teacher scores) changes
them by far more than the tolerance.
"""

import json
from pathlib import Path

import pytest
import torch
import yaml
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from merge_distill.adapters import AdapterHost, model_folder
from merge_distill.build import build_run, train_recipe
from merge_distill.errors import UserError
from merge_distill.frozen import ModelCache
from merge_distill.models import load_model, load_tokenizer, save_model
from merge_distill.recipe import AdapterModel
from merge_distill.train import train_step
from merge_distill.validate import load_recipe

LORA = {"r": 4, "lora_alpha": 8}


def make_adapter(base: Path, out: Path, seed: int) -> Path:
    """A peft adapter of `base` on every linear layer, A and B random (seeded): a model unlike its base."""
    torch.manual_seed(seed)
    peft_model = get_peft_model(load_model(base), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                             init_lora_weights=False))
    peft_model.save_pretrained(out)
    return out


def merged_copy(base: Path, adapter: Path, out: Path) -> Path:
    """The adapter merged into its base by peft and saved as an ordinary model folder."""
    save_model(PeftModel.from_pretrained(load_model(base), adapter).merge_and_unload(), load_tokenizer(base), out)
    return out


@pytest.fixture(scope="module")
def adapters(tiny_world, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("adapters")
    for domain, seed in (("math", 1), ("code", 2)):
        make_adapter(tiny_world / "base", root / f"{domain}_adapter", seed)
        merged_copy(tiny_world / "base", root / f"{domain}_adapter", root / f"{domain}_merged")
    return root


def row_logprobs(folder: Path, rollouts) -> torch.Tensor:
    """`[B, L]` log-probs of each row's response tokens under the model at `folder`, one unpadded row at a time."""
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    out = torch.zeros(rollouts.response_ids.shape)
    with torch.no_grad():
        for b in range(len(rollouts.response_ids)):
            prompt = rollouts.prompt_ids[b][rollouts.prompt_mask[b].bool()]
            n = int(rollouts.response_mask[b].sum())
            ids = torch.cat([prompt, rollouts.response_ids[b, :n]])
            logp = torch.log_softmax(model(ids[None]).logits[0].float(), -1)
            out[b, :n] = logp[len(prompt) - 1:-1].gather(-1, ids[len(prompt):, None])[:, 0]
    return out


def recipe_file(path: Path, world: Path, adapters: Path, out: Path, *, lora=True, math_teacher=None,
                code_teacher=None, **sections) -> Path:
    base = str(world / "base")
    adapter = lambda d: {"base": base, "adapter": str(adapters / f"{d}_adapter")}  # noqa: E731
    data = {
        "student": {"path": base, "lora": LORA} if lora else base,
        "experts": [{"name": "math", "teacher": math_teacher or adapter("math"), "prompts": str(world / "math.jsonl")},
                    {"name": "code", "teacher": code_teacher or adapter("code"), "prompts": str(world / "code.jsonl")}],
        "rollout": {"prompts_per_step": 8, "max_new_tokens": 24},
        "optim": {"lr": 1e-2},
        "schedule": {"steps": 2},
        "output_dir": str(out),
        **sections,
    }
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def random_b(student: torch.nn.Module, seed: int) -> None:
    """Give the LoRA student's adapter a non-zero B (it starts at zero: the initial student is its base)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in student.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)


def lora_run(tmp_path, tiny_world, adapters, **keys):
    run = build_run(load_recipe(recipe_file(tmp_path / "r.yaml", tiny_world, adapters, tmp_path / "out", **keys)))
    random_b(run.student, 0)
    rows = [run.mixer.pools[0][0], run.mixer.pools[1][0], run.mixer.pools[0][1], run.mixer.pools[1][1]]
    return run, run.sample(rows, [11, 12, 13, 14])


# ------------------------------------------------------------------------------------- one base, many roles


def test_the_lora_students_base_scores_as_the_base_and_each_adapter_as_its_merged_expert(tmp_path, tiny_world,
                                                                                          adapters):
    """A LoRA student with a non-zero adapter hosts its base: the reference (adapter off) scores exactly as a
    separately loaded base; each adapter teacher equals the peft-merged expert (1e-5); no frozen copy is ever loaded."""
    run, batch = lora_run(tmp_path, tiny_world, adapters)
    rollouts = batch.rollouts
    base = run.frozen.score(str(tiny_world / "base"), rollouts)
    assert torch.equal(base, ModelCache().score(str(tiny_world / "base"), rollouts))  # a separately loaded base
    torch.testing.assert_close(base, row_logprobs(tiny_world / "base", rollouts), rtol=0, atol=1e-6)
    for domain in ("math", "code"):
        lp = run.frozen.score(AdapterModel(base=str(tiny_world / "base"), adapter=str(adapters / f"{domain}_adapter")),
                              rollouts)
        torch.testing.assert_close(lp, row_logprobs(adapters / f"{domain}_merged", rollouts), rtol=0, atol=1e-5)
    # the student itself still has its own adapter on, and trains it alone
    student = run.policy(rollouts, 1.0, False).detach() * rollouts.response_mask
    assert (student - base).abs().max() > 0.1
    assert run.frozen._models == {}  # served by the student's own base: one copy in memory
    trainable = {n for n, p in run.student.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A.default." in n or ".lora_B.default." in n for n in trainable)


def test_each_domains_rows_are_scored_with_their_own_adapter(tmp_path, tiny_world, adapters):
    """`Run.score`: math rows under the math adapter, code rows under the code adapter, every row's reference the
    base (the student's initial model), the student's adapter playing no part."""
    run, batch = lora_run(tmp_path, tiny_world, adapters, reward_scale=1.5)
    scores, _ = run.score(batch)
    math_rows = [i for i, p in enumerate(batch.prompts) if p.expert == 0]
    code_rows = [i for i, p in enumerate(batch.prompts) if p.expert == 1]
    assert math_rows and code_rows
    r = batch.rollouts
    for rows, domain in ((math_rows, "math"), (code_rows, "code")):
        torch.testing.assert_close(scores["teacher"][rows], row_logprobs(adapters / f"{domain}_merged", r)[rows],
                                   rtol=0, atol=1e-5)
    torch.testing.assert_close(scores["reference"], row_logprobs(tiny_world / "base", r), rtol=0, atol=1e-6)


def test_adapter_teachers_of_a_full_student_share_one_frozen_base(tmp_path, tiny_world, adapters):
    """A full student: the adapter teachers load one frozen copy of their base between them; a mixed recipe (a
    full-model teacher beside an adapter teacher) scores each with its own model."""
    path = recipe_file(tmp_path / "r.yaml", tiny_world, adapters, tmp_path / "out", lora=False,
                       code_teacher=str(tiny_world / "code_teacher"))
    run = build_run(load_recipe(path))
    batch = run.sample([run.mixer.pools[0][0], run.mixer.pools[1][0]], [1, 2])
    scores, _ = run.score(batch)
    r = batch.rollouts
    torch.testing.assert_close(scores["teacher"][0], row_logprobs(adapters / "math_merged", r)[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(scores["teacher"][1], row_logprobs(tiny_world / "code_teacher", r)[1], rtol=0, atol=1e-6)
    assert sorted(Path(k).name for k in run.frozen._models) == ["base", "code_teacher"]


def test_a_host_restores_the_students_adapter_and_its_training_mode(tiny_world, adapters):
    model = load_model(tiny_world / "base", trainable=True)
    from merge_distill.adapters import add_lora

    peft_model = add_lora(model, load_recipe_lora(), seed=0)
    host = AdapterHost(model, peft_model, trainable="default")
    model.train()
    with host.using(str(adapters / "math_adapter")):
        assert not model.training
        assert not any(p.requires_grad for p in model.parameters())
    assert model.training and peft_model.active_adapter == "default"
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".default." in n for n in trainable)


def load_recipe_lora():
    from merge_distill.recipe import Lora

    return Lora(**LORA)


# -------------------------------------------------------------------------------------------- training


def test_a_step_changes_the_students_adapter_alone(tmp_path, tiny_world, adapters):
    run, _ = lora_run(tmp_path, tiny_world, adapters)
    before = {n: p.detach().clone() for n, p in run.student.named_parameters()}
    adapter_params = [p for n, p in run.student.named_parameters() if ".default." in n]
    assert {id(p) for g in run.optimizer.param_groups for p in g["params"]} == {id(p) for p in adapter_params}
    train_step(run, 0)
    after = dict(run.student.named_parameters())
    changed = {n for n in before if not torch.equal(after[n], before[n])}
    assert changed and all(".lora_A.default." in n or ".lora_B.default." in n for n in changed)
    assert any(".lora_B." in n for n in changed)
    # the teachers' adapters, loaded into the student's base while scoring, stay frozen
    teachers = [n for n in after if n not in before]
    assert teachers and all(".expert" in n and not after[n].requires_grad for n in teachers)


def test_saving_the_final_folder_leaves_the_live_student_as_it_was(tmp_path, tiny_world, adapters):
    """The merge that writes final/ works on copies: the student in memory keeps its base and adapter."""
    from merge_distill.checkpoint import save_final

    run, _ = lora_run(tmp_path, tiny_world, adapters)
    before = {n: p.detach().clone() for n, p in run.student.named_parameters()}
    save_final(run, tmp_path / "final")
    assert all(torch.equal(p, before[n]) for n, p in run.student.named_parameters())
    merged = load_file(tmp_path / "final" / "model.safetensors")
    q = "model.layers.0.self_attn.q_proj."
    a, b = before[q + "lora_A.default.weight"], before[q + "lora_B.default.weight"]
    torch.testing.assert_close(merged[q + "weight"], before[q + "base_layer.weight"] + (8 / 4) * b @ a,
                               rtol=0, atol=1e-6)


@pytest.fixture(scope="module")
def trained(tiny_world, adapters, tmp_path_factory):
    """A LoRA student distilled 4 steps (checkpoints at 2 and 4)."""
    root = tmp_path_factory.mktemp("lora_run")
    recipe = load_recipe(recipe_file(root / "r.yaml", tiny_world, adapters, root / "run",
                                     schedule={"steps": 4, "checkpoint_every": 2, "keep_checkpoints": 4}))
    train_recipe(recipe)
    return root


def test_final_holds_the_adapter_and_the_merged_model_transformers_loads(trained, tiny_world):
    final = trained / "run" / "final"
    config = json.loads((final / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["base_model_name_or_path"] == str(tiny_world / "base")
    merged = AutoModelForCausalLM.from_pretrained(final, dtype=torch.float32).eval()
    via_peft = PeftModel.from_pretrained(load_model(tiny_world / "base"), final / "adapter").eval()
    ids = torch.tensor([[5, 17, 42, 99, 3, 64, 11]])
    with torch.no_grad():
        a, b = merged(ids).logits, via_peft(ids).logits
        base = load_model(tiny_world / "base")(ids).logits
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    assert (a - base).abs().max() > 1e-3  # the adapter trained: the merged model is not its base
    # checkpoints hold the adapter and its optimizer state only (the base is read from its folder on resume)
    from merge_distill.checkpoint import read_checkpoint

    state = read_checkpoint(trained / "run" / "checkpoints" / "step-2")
    assert state["model"] and all(".lora_" in k for k in state["model"])
    assert all(".lora_" in k for k in state["optimizer"]["state"])


def test_a_lora_run_resumed_from_its_checkpoint_ends_with_the_same_adapter(trained, tiny_world, adapters):
    import shutil

    cut = trained / "cut"
    shutil.copytree(trained / "run", cut)
    shutil.rmtree(cut / "final")
    shutil.rmtree(cut / "checkpoints" / "step-4")
    recipe = load_recipe(recipe_file(trained / "cut.yaml", tiny_world, adapters, cut,
                                     schedule={"steps": 4, "checkpoint_every": 2, "keep_checkpoints": 4}))
    train_recipe(recipe, resume=True)
    a = load_file(trained / "run" / "final" / "adapter" / "adapter_model.safetensors")
    b = load_file(cut / "final" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# -------------------------------------------------------------------------------------- whole-model uses


def test_an_adapter_expert_as_a_whole_model_is_the_peft_merge(tiny_world, adapters, tmp_path, monkeypatch):
    monkeypatch.setenv("MERGE_DISTILL_CACHE", str(tmp_path / "cache"))
    ref = AdapterModel(base=str(tiny_world / "base"), adapter=str(adapters / "math_adapter"))
    folder = Path(model_folder(ref))
    assert model_folder(ref) == str(folder)  # merged once
    a, b = load_file(folder / "model.safetensors"), load_file(adapters / "math_merged" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_weight_space_merges_take_adapter_experts(tiny_world, adapters, tmp_path, monkeypatch):
    """Task arithmetic of adapter experts = task arithmetic of their merged folders (MergeKit's semantics: task
    vectors of whole weights)."""
    monkeypatch.setenv("MERGE_DISTILL_CACHE", str(tmp_path / "cache"))
    from merge_distill.merging import write_merge

    path = recipe_file(tmp_path / "r.yaml", tiny_world, adapters, tmp_path / "merge", lora=False,
                       method="merge", merge={"technique": "task_arithmetic", "scale": 0.7})
    write_merge(load_recipe(path))
    got = load_file(tmp_path / "merge" / "final" / "model.safetensors")
    base = load_file(tiny_world / "base" / "model.safetensors")
    m, c = (load_file(adapters / f"{d}_merged" / "model.safetensors") for d in ("math", "code"))
    for k in base:
        torch.testing.assert_close(got[k], base[k] + 0.7 * ((m[k] - base[k]) + (c[k] - base[k])), rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------- recipes


def test_teacher_base_is_the_adapter_teachers_base_and_needs_one(tmp_path, tiny_world, adapters):
    path = recipe_file(tmp_path / "r.yaml", tiny_world, adapters, tmp_path / "out")
    data = yaml.safe_load(path.read_text())
    data["experts"][0]["reference"] = "teacher_base"
    path.write_text(yaml.safe_dump(data))
    recipe = load_recipe(path)
    assert recipe.frozen_ref(recipe.experts[0], "teacher_base") == str(tiny_world / "base")
    data["experts"][0]["teacher"] = str(tiny_world / "math_teacher")
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(UserError, match="teacher_base.*adapter teacher"):
        load_recipe(path)


def test_a_missing_adapter_folder_is_one_line_naming_it(tmp_path, tiny_world, adapters):
    path = recipe_file(tmp_path / "r.yaml", tiny_world, adapters, tmp_path / "out")
    data = yaml.safe_load(path.read_text())
    data["experts"][1]["teacher"]["adapter"] = str(tmp_path / "nowhere")
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(UserError, match=r"experts\.1\.teacher \(code\).*nowhere"):
        build_run(load_recipe(path))


# ------------------------------------------------------------------------------------------------- fsdp


@pytest.mark.slow
def test_a_lora_student_sharded_on_two_ranks_trains_the_adapter_of_one_process(tmp_path, tiny_world, adapters):
    """`parallel: fsdp` on two gloo ranks (the process group built as on CUDA): the base and the adapter sharded
    per decoder layer, the adapter alone trained; its update equals one process's (the tolerance of
    tests/test_distributed.py: rounding of a sum taken in another order) and the base is untouched."""
    from launch import torchrun

    sections = {"rollout": {"prompts_per_step": 8, "max_new_tokens": 16}, "budget": {"micro_batch_size": 3},
                "schedule": {"steps": 3}}
    one = recipe_file(tmp_path / "one.yaml", tiny_world, adapters, tmp_path / "one", **sections)
    train_recipe(load_recipe(one))
    two = recipe_file(tmp_path / "two.yaml", tiny_world, adapters, tmp_path / "two", parallel="fsdp", **sections)
    torchrun("run", str(two), "--no-eval")
    a = load_file(tmp_path / "one" / "final" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "two" / "final" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and len(a) > 0
    diff = sum(float(((a[k] - b[k]) ** 2).sum()) for k in a) ** 0.5
    size = sum(float((a[k] ** 2).sum()) for k in a if "lora_B" in k) ** 0.5  # B starts at zero: its norm is the update
    assert size > 0 and diff < 1e-3 * size, f"adapters differ by {diff / size:.2e} of the update"
