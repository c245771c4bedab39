"""Methods are a registry: a method defined here, in the test module, trains through the same loop, and every
question about which frozen models a run needs is answered by the method."""

import json

import pytest

from merge_distill import objective
from merge_distill.errors import UserError
from merge_distill.frozen import ModelCache
from merge_distill.methods import TrainingMethod, available_methods, method_of, register_method
from merge_distill.scoring import response_logprobs
from merge_distill.train import train
from merge_distill.validate import load_recipe


@register_method("toy_self_training")
class SelfTraining(TrainingMethod):
    """Raise the likelihood of the student's own samples (sharpening): loss = -mean log pi(y_t); no teachers."""

    needs_teachers = False
    curves = ("own_logprob", "response_length")
    progress = ("own_logprob", "own log-prob")

    def targets(self, run, batch, rollouts, metrics):
        for i, e in enumerate(run.recipe.experts):
            rows = [r for r, p in enumerate(batch) if p.expert == i]
            sub = rollouts.select(rows)
            metrics[f"{e.name}/own_logprob"] = float(objective.masked_mean(sub.sampler_logprobs, sub.response_mask))
        return None

    def loss(self, run, rollouts, targets):
        logprobs = response_logprobs(run.student, rollouts, temperature=run.recipe.rollout.temperature)
        return -objective.masked_mean(logprobs, rollouts.response_mask), logprobs.detach()


@pytest.mark.slow
def test_a_method_registered_in_a_test_trains(tiny_world, tmp_path, write_recipe, monkeypatch):
    assert "toy_self_training" in available_methods()
    scored = []
    monkeypatch.setattr(ModelCache, "score", lambda self, path, *a, **k: scored.append(path))
    path = write_recipe(tmp_path / "r.yaml", tiny_world, tmp_path / "run", steps=6, prompts_per_step=16,
                        max_new_tokens=16, lr=1e-2)
    recipe = load_recipe(path, ["method=toy_self_training"])
    assert method_of(recipe).frozen_models(recipe, recipe.experts[0]) == {}
    train(recipe)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 7)) and not scored  # no frozen model was ever asked
    for domain in ("math", "code"):
        first, last = rows[0][f"{domain}/own_logprob"], rows[-1][f"{domain}/own_logprob"]
        assert last > first + 0.1, f"{domain}: own log-prob {first:.3f} -> {last:.3f}"
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["method"] == "toy_self_training"


def test_an_unknown_method_lists_the_registered_ones(tiny_world, tmp_path, write_recipe):
    path = write_recipe(tmp_path / "r.yaml", tiny_world, tmp_path / "run")
    with pytest.raises(UserError) as e:
        load_recipe(path, ["method=gopdd"])
    message = str(e.value)
    assert "unknown method 'gopdd'" in message and all(m in message for m in ("gopd", "grpo", "sft", "expo", "merge"))
    assert len(message.splitlines()) == 1


@pytest.mark.parametrize("sets, expected", [
    ([], {"math": {"teacher", "reference"}, "code": {"teacher", "reference"}}),         # lam 1.25: T and R
    (["reward_scale=1.0"], {"math": {"teacher"}, "code": {"teacher"}}),                 # OPD: R cancels
    (["reward_scale=1.0", "method.log_ratio_clip=2.0"],
     {"math": {"teacher", "reference"}, "code": {"teacher", "reference"}}),              # a clip keeps R
    (["method.objective=dense", "experts.code.reward_scale=1.0"], {"math": {"teacher", "reference"}, "code": {"teacher"}}),
    (["method=grpo", "rollout.rollouts_per_prompt=2"], {"math": set(), "code": set()}),   # graders, no models
    (["method=sft"], {"math": {"teacher"}, "code": {"teacher"}}),
    (["method=merge"], {"math": {"teacher"}, "code": {"teacher"}}),
])
def test_each_method_names_the_frozen_models_it_loads(tiny_world, tmp_path, write_recipe, sets, expected):
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", tiny_world, tmp_path / "run"), sets)
    method = method_of(recipe)
    assert {e.name: set(method.frozen_models(recipe, e)) for e in recipe.experts} == expected


def test_objective_dense_is_only_for_gopd(tiny_world, tmp_path, write_recipe):
    path = write_recipe(tmp_path / "r.yaml", tiny_world, tmp_path / "run")
    with pytest.raises(UserError, match="method.objective dense is not available for method sft"):
        load_recipe(path, ["method=sft", "method.objective=dense"])
