"""The zoo's adapter experts (`<domain>_adapter`: GRPO through a LoRA adapter of the zoo's base) and a recipe
that distills them into a LoRA student of the same base, on the smoke zoo (8 s on 2 cores: its base's
pretraining, two 2-step GRPO runs, a 1-step distillation)."""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from merge_distill.recipe import AdapterModel

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def adapter_zoo(tmp_path_factory):
    """The smoke zoo with its base and both adapter experts built (and no full-model expert)."""
    from merge_distill.toyworld.zoo import Zoo

    zoo = Zoo("smoke", 0, str(tmp_path_factory.mktemp("zoo")), log=lambda *_: None, isolation="rlimits")
    assert zoo.graders_to_build(["math_adapter", "code_adapter"]) == {"math", "code"}
    zoo.ensure(["math_adapter", "code_adapter"])
    return zoo


def test_adapter_members_are_peft_adapters_of_the_zoos_own_base(adapter_zoo):
    """Each adapter member is the GRPO run's peft adapter (not its merged model), of the preset's rank and alpha,
    recorded against the zoo's `base` (one pretraining: no base of its own), with its run's reward curve."""
    from peft import PeftConfig

    zoo, p = adapter_zoo, adapter_zoo.preset
    for domain in ("math", "code"):
        member = zoo.path(f"{domain}_adapter")
        assert (member / "adapter_config.json").is_file() and not (member / "model.safetensors").exists()
        config = PeftConfig.from_pretrained(str(member))
        assert (config.r, config.lora_alpha) == (p.adapter_r, p.adapter_alpha)
        assert config.base_model_name_or_path == str(zoo.path("base"))
        rows = [json.loads(line) for line in (member / "grpo_metrics.jsonl").open()]
        assert [r["step"] for r in rows] == list(range(1, p.adapter_steps + 1))
        assert all(f"{domain}/accuracy" in r and r["lr"] == p.adapter_lr for r in rows)
    assert sorted(p.name for p in zoo.dir.iterdir() if p.name != "runs") == [
        "base", "code_adapter", "data", "math_adapter", "zoo.json"]
    stages = json.loads((zoo.dir / "zoo.json").read_text())["stages"]
    assert set(stages) == {"data", "base", "math_adapter", "code_adapter"}
    assert zoo.graders_to_build(["math_adapter", "code_adapter"]) == set()  # built: cached


def test_the_math_adapter_is_its_grpo_run_on_the_base(adapter_zoo):
    """GRPO moved the math adapter (the smoke base gets some math reward; B starts at zero), and the base with
    it on, as peft loads it, is another model than the base: the member is a trained adapter of that base."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    zoo = adapter_zoo
    rewards = [json.loads(line)["math/accuracy"] for line in (zoo.path("math_adapter") / "grpo_metrics.jsonl").open()]
    assert any(r > 0 for r in rewards)
    b = [t for k, t in load_file(zoo.path("math_adapter") / "adapter_model.safetensors").items() if "lora_B" in k]
    assert b and any(t.abs().max() > 0 for t in b)
    ids = torch.tensor([[5, 40, 41, 42, 43, 44]])
    base = AutoModelForCausalLM.from_pretrained(zoo.path("base"))
    with torch.no_grad():
        plain = base(ids).logits
        expert = PeftModel.from_pretrained(base, str(zoo.path("math_adapter")))(ids).logits
    assert not torch.allclose(plain, expert)


def test_a_lora_recipe_of_the_adapter_experts_trains_and_evaluates(adapter_zoo, tmp_path, monkeypatch):
    """A tiny LoRA student distilled from both adapter experts (the recipe's paths `zoo:` members, the zoo found
    built): it trains its adapter, and its evaluation scores each adapter teacher as its merged model."""
    from merge_distill.build import train_recipe
    from merge_distill.run import closed_form_spec, model_specs
    from merge_distill.validate import load_recipe

    monkeypatch.setenv("MERGE_DISTILL_CACHE", str(tmp_path / "cache"))  # the merged teachers' cache
    recipe_file = tmp_path / "lora.yaml"
    recipe_file.write_text(f"""
zoo: {{preset: smoke, dir: {adapter_zoo.dir}}}
student: {{path: zoo:base, lora: {{r: 4, lora_alpha: 8}}}}
experts:
  - {{name: math, teacher: {{base: zoo:base, adapter: zoo:math_adapter}}, prompts: zoo:data/math_train.jsonl}}
  - {{name: code, teacher: {{base: zoo:base, adapter: zoo:code_adapter}}, prompts: zoo:data/code_train.jsonl}}
rollout: {{prompts_per_step: 4, max_new_tokens: 8}}
optim: {{lr: 1.0e-3}}
schedule: {{steps: 1}}
eval: {{samples: 1, teacher_temperatures: [0]}}
isolation: rlimits
output_dir: {tmp_path / 'run'}
""")
    recipe = load_recipe(recipe_file, [])
    assert recipe.experts[0].teacher == AdapterModel(base=str(adapter_zoo.path("base")),
                                                     adapter=str(adapter_zoo.path("math_adapter")))
    final = train_recipe(recipe)
    assert (final / "adapter" / "adapter_config.json").is_file() and (final / "model.safetensors").is_file()

    specs = {s.name: s for s in model_specs(recipe, {"student": str(final)}, suites=[])}
    assert specs["base"].path == str(adapter_zoo.path("base"))
    for domain in ("math", "code"):
        merged = Path(specs[domain].path)
        assert merged.parent == tmp_path / "cache" / "merged" and merged.name.startswith(f"{domain}_adapter-")
        assert json.loads((merged / "merged_from.json").read_text())["adapter"] == str(adapter_zoo.path(f"{domain}_adapter"))
        assert specs[f"{domain}@greedy"].path == str(merged)
    # the closed form decodes from the merged teacher and the reference it names (`teacher_base`: the adapter's base)
    recipe.experts[0].reference = "teacher_base"
    closed = closed_form_spec(recipe, [SimpleNamespace(name="zoo-math", domain="math")]).suite_paths["zoo-math"]
    assert closed == (f"closed-form:lam={recipe.scale_of(recipe.experts[0])},teacher={specs['math'].path},"
                      f"reference={adapter_zoo.path('base')}")


def test_the_shipped_lora_recipe_loads_with_adapter_teachers_of_its_students_base(tmp_path, monkeypatch):
    """recipes/math_code_lora.yaml: a LoRA student of the default zoo's base, each teacher that base with its
    domain's adapter member, the eval settings of recipes/math_code.yaml."""
    from merge_distill.validate import load_recipe

    monkeypatch.setenv("MERGE_DISTILL_CACHE", str(tmp_path))
    lora = load_recipe(ROOT / "recipes" / "math_code_lora.yaml", [])
    full = load_recipe(ROOT / "recipes" / "math_code.yaml", [])
    zoo = tmp_path / "zoo" / "default-seed0"
    assert lora.student.path == str(zoo / "base") and lora.student.lora is not None
    assert [e.teacher for e in lora.experts] == [AdapterModel(base=str(zoo / "base"), adapter=str(zoo / f"{d}_adapter"))
                                                 for d in ("math", "code")]
    assert [e.reference for e in lora.experts] == ["student", "student"]
    assert lora.eval == full.eval and lora.rollout == full.rollout and lora.reward_scale == full.reward_scale
    assert lora.schedule == full.schedule
