"""Methods are a registry of functions of tensors: a method defined here, in the test module, with no knowledge of
ranks, engines or models, trains through the same loop (on one process and on two ranks alike), and every question
about which frozen models a run needs is answered by the method.

Run as a program (`python tests/test_methods_registry.py ARGS`), this module registers its methods and runs
`merge-distill ARGS`: how the rank tests put the test's own objective on every rank."""

import json
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from merge_distill import objective
from merge_distill.build import train_recipe
from merge_distill.errors import UserError
from merge_distill.frozen import ModelCache
from merge_distill.methods import Method, available_methods, get_method, method_of, register_method
from merge_distill.methods import base as registry
from merge_distill.validate import load_recipe
from merge_distill.step_metrics import token_mean


@register_method("toy_self_training")
class SelfTraining(Method):
    """Raise the likelihood of the student's own samples (sharpening): loss = -mean log pi(y_t); no teachers."""

    needs_teachers = False
    curves = ("own_logprob", "response_length")
    progress = ("own_logprob", "own log-prob")

    def targets(self, batch, scores, cfg):
        return None, {f"{cfg.experts[i].name}/own_logprob": token_mean(batch.old_logprobs[rows], batch.mask[rows])
                      for i, rows in batch.by_expert() if rows}

    def loss(self, logprobs, batch, targets, cfg):
        return -objective.masked_mean(logprobs, batch.mask)


@register_method("toy_midpoint")
class Midpoint(Method):
    """Two targets, a loss: pull the student's log-prob of each sampled token towards the midpoint of its domain's
    teacher's and reference's, squared error, token mean."""

    def frozen_models(self, recipe, expert):
        return {"teacher": expert.teacher, "reference": expert.reference}

    def targets(self, batch, scores, cfg):
        gap = scores["teacher"] - scores["reference"]
        return (scores["teacher"], scores["reference"]), {
            f"{cfg.experts[i].name}/teacher_minus_reference": token_mean(gap[rows], batch.mask[rows])
            for i, rows in batch.by_expert() if rows}

    def loss(self, logprobs, batch, targets, cfg):
        teacher, reference = targets
        return objective.masked_mean((logprobs - 0.5 * (teacher + reference)) ** 2, batch.mask)


class RecordingCache(ModelCache):
    """The run's real frozen models, with a record of every (path, rows) scored."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.scored = []

    def score(self, path, rollouts, **kw):
        self.scored.append((Path(path).name, len(rollouts.response_ids)))
        return super().score(path, rollouts, **kw)


@pytest.mark.slow
def test_a_method_registered_in_a_test_trains(tiny_world, tmp_path, write_recipe):
    assert "toy_self_training" in available_methods()
    path = write_recipe(tmp_path / "r.yaml", tiny_world, tmp_path / "run", steps=6, prompts_per_step=16,
                        max_new_tokens=16, lr=1e-2)
    recipe = load_recipe(path, ["method=toy_self_training"])
    assert method_of(recipe).frozen_models(recipe, recipe.experts[0]) == {}
    frozen = RecordingCache()
    train_recipe(recipe, frozen=frozen)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 7)) and not frozen.scored  # no frozen model was ever asked
    for domain in ("math", "code"):
        first, last = rows[0][f"{domain}/own_logprob"], rows[-1][f"{domain}/own_logprob"]
        assert last > first + 0.1, f"{domain}: own log-prob {first:.3f} -> {last:.3f}"
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["method"] == "toy_self_training"


def test_each_domain_is_scored_by_its_own_models_and_the_targets_come_cut_per_micro_batch(tiny_world, tmp_path,
                                                                                          write_recipe):
    """One step of the two-target method with micro-batches of 3 rows: its loss receives, for every row, the
    log-probs of that row's own domain's teacher and reference (a crossed wire gives another domain's), at the
    rows of its micro-batch."""
    seen = []

    class Checked(Midpoint):
        def loss(self, logprobs, batch, targets, cfg):
            seen.append((batch, targets))
            return super().loss(logprobs, batch, targets, cfg)

    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", tiny_world, tmp_path / "run", steps=1, prompts_per_step=8,
                                      max_new_tokens=12, micro_batch_size=3),
                         ["method=toy_midpoint", f"experts.math.reference={tiny_world / 'code_teacher'}"])
    frozen = RecordingCache()
    from merge_distill.build import build_run
    from merge_distill.train import train_step

    run = build_run(recipe, frozen=frozen)
    run.method = Checked()
    train_step(run, 0)
    # math: teacher math_teacher, reference code_teacher; code: teacher code_teacher, reference the student (base)
    assert [name for name, _ in frozen.scored] == ["math_teacher", "code_teacher", "code_teacher", "base"]
    own = {"math": (tiny_world / "math_teacher", tiny_world / "code_teacher"),
           "code": (tiny_world / "code_teacher", tiny_world / "base")}
    fresh = ModelCache()
    assert sum(len(b) for b, _ in seen) == 8 and all(len(b) <= 3 for b, _ in seen)
    for batch, (teacher, reference) in seen:
        for r, prompt in enumerate(batch.prompts):
            row = batch.rollouts.select([r])
            t_path, r_path = own[recipe.experts[prompt.expert].name]
            torch.testing.assert_close(teacher[r:r + 1], fresh.score(t_path, row), rtol=0, atol=1e-5)
            torch.testing.assert_close(reference[r:r + 1], fresh.score(r_path, row), rtol=0, atol=1e-5)


def _two_rank_run(tiny_world, root, write_recipe, layout):
    from launch import torchrun

    path = write_recipe(root / f"{layout}.yaml", tiny_world, root / layout, **MIDPOINT_STEPS)
    torchrun(str(path), "--no-eval", "--set", "method=toy_midpoint", "--set", f"parallel={layout}", script=__file__)
    return root / layout / "final"


MIDPOINT_STEPS = dict(steps=3, prompts_per_step=6, max_new_tokens=16, micro_batch_size=2, lr=3e-3)


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["ddp", "fsdp"])
def test_a_method_defined_in_a_test_trains_on_two_ranks_to_the_weights_of_one_process(layout, tiny_world,
                                                                                       tmp_path, write_recipe):
    """The method above knows nothing of ranks: on 2 gloo ranks (process group built as on CUDA) under ddp and
    fsdp it trains the weights one process trains, to the tolerance of the layouts' reduction order."""
    one = load_recipe(write_recipe(tmp_path / "one.yaml", tiny_world, tmp_path / "one", **MIDPOINT_STEPS),
                      ["method=toy_midpoint"])
    train_recipe(one)
    two = _two_rank_run(tiny_world, tmp_path, write_recipe, layout)
    w0, a, b = (load_file(p / "model.safetensors") for p in (tiny_world / "base", tmp_path / "one" / "final", two))
    diff = sum(float(((b[k] - a[k]) ** 2).sum()) for k in a) ** 0.5
    update = sum(float(((a[k] - w0[k]) ** 2).sum()) for k in a) ** 0.5
    assert update > 0 and diff < 1e-3 * update, f"updates differ by {diff / update:.2e} of their norm"


def test_a_taken_name_is_refused():
    with pytest.raises(ValueError, match="method 'gopd' .* is already registered by merge_distill.methods.gopd.GOPD"):
        @register_method("gopd")
        class Another(Method):
            pass
    assert type(get_method("gopd")).__name__ == "GOPD"


def test_methods_come_from_entry_points(tmp_path, monkeypatch):
    """Another package declares a method under the `merge_distill.methods` entry-point group, as graders do."""
    (tmp_path / "plugin_method.py").write_text(textwrap.dedent("""
        from merge_distill.methods import Method

        class Echo(Method):
            needs_teachers = False
    """))
    dist = tmp_path / "plugin_method-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: plugin-method\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[merge_distill.methods]\necho = plugin_method:Echo\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(registry, "_entry_points_loaded", False)
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    assert "echo" in available_methods()
    assert type(get_method("echo")).__name__ == "Echo"


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
    (["method=merge"], {"math": {"teacher"}, "code": {"teacher"}}),                    # a weight-space merge
])
def test_each_method_names_the_frozen_models_it_loads(tiny_world, tmp_path, write_recipe, sets, expected):
    from merge_distill.methods import frozen_models

    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", tiny_world, tmp_path / "run"), sets)
    assert {e.name: set(frozen_models(recipe, e)) for e in recipe.experts} == expected


def test_objective_dense_is_only_for_gopd(tiny_world, tmp_path, write_recipe):
    path = write_recipe(tmp_path / "r.yaml", tiny_world, tmp_path / "run")
    with pytest.raises(UserError, match="method.objective dense is not available for method sft"):
        load_recipe(path, ["method=sft", "method.objective=dense"])


if __name__ == "__main__":  # on the ranks: this module's methods registered, then `merge-distill run ARGS`
    from merge_distill.cli import main

    sys.argv = ["merge-distill", "run", *sys.argv[1:]]
    main()
