"""Training prompts from a reasoning-gym task (`prompts: {reasoning_gym: NAME, size: N, seed: S}`): seeded, each
record carrying the task's own answer as the math grader's ground truth; the recipe's schema and one-line errors.
Skipped where reasoning-gym is not installed (but the missing-package error is tested everywhere)."""

import importlib.util
import re
import sys

import pytest
import yaml

from merge_distill.data import load_records, reasoning_gym_records
from merge_distill.errors import UserError
from merge_distill.graders.math import MathGrader
from merge_distill.recipe import Expert, ReasoningGymSpec
from merge_distill.validate import load_recipe

WHAT = "experts.0.prompts (math)"
needs_reasoning_gym = pytest.mark.skipif(importlib.util.find_spec("reasoning_gym") is None,
                                         reason="pip install 'merge-distill[reasoning-gym]'")


def gsm_symbolic(size: int, seed: int) -> list[dict]:
    return load_records(ReasoningGymSpec(reasoning_gym="gsm_symbolic", size=size, seed=seed), what=WHAT)


@needs_reasoning_gym
def test_the_same_seed_gives_the_same_problems_and_another_seed_others():
    first, again, other = gsm_symbolic(12, 0), gsm_symbolic(12, 0), gsm_symbolic(12, 1)
    assert len(first) == 12 and first == again
    assert [r["task_id"] for r in first] == [f"gsm_symbolic/0/{i}" for i in range(12)]
    assert not {r["prompt"] for r in first} & {r["prompt"] for r in other}
    assert all(isinstance(r["prompt"], str) and r["prompt"] and r["answer"] for r in first + other)


@needs_reasoning_gym
def test_records_carry_the_tasks_own_question_and_answer():
    import reasoning_gym

    entries = list(reasoning_gym.create_dataset("basic_arithmetic", size=5, seed=3))
    records = load_records(ReasoningGymSpec(reasoning_gym="basic_arithmetic", size=5, seed=3), what=WHAT)
    assert [(r["prompt"], r["answer"]) for r in records] == [(e["question"], str(e["answer"])) for e in entries]
    # the task's own check agrees: its answer scores 1 by reasoning-gym's scorer
    dataset = reasoning_gym.create_dataset("basic_arithmetic", size=5, seed=3)
    assert all(dataset.score_answer(r["answer"], e) == 1.0 for r, e in zip(records, entries))


@needs_reasoning_gym
@pytest.mark.parametrize("task", ["gsm_symbolic", "basic_arithmetic"])
def test_math_grader_passes_the_tasks_answer_given_back_and_fails_another(task):
    records = load_records(ReasoningGymSpec(reasoning_gym=task, size=20, seed=0), what=WHAT)
    with MathGrader() as grader:
        right = grader.grade_many(records, [f"Working it out... the answer is {r['answer']}" for r in records])
        wrong = grader.grade_many(records, [f"\\boxed{{{int(r['answer']) + 1}}}" for r in records])
    assert [v.score for v in right] == [1.0] * 20
    assert [v.score for v in wrong] == [0.0] * 20


def test_a_missing_package_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "reasoning_gym", None)  # `import reasoning_gym` raises ImportError
    with pytest.raises(UserError) as err:
        gsm_symbolic(3, 0)
    assert str(err.value) == (f"{WHAT}: reasoning_gym sources need the reasoning-gym package "
                              "(pip install 'merge-distill[reasoning-gym]')")


@needs_reasoning_gym
def test_an_unknown_task_or_option_is_one_line():
    with pytest.raises(UserError, match=rf"^{re.escape(WHAT)}: reasoning_gym task 'no_such_task': .*not registered$"):
        load_records(ReasoningGymSpec(reasoning_gym="no_such_task", size=3), what=WHAT)
    with pytest.raises(UserError, match=rf"^{re.escape(WHAT)}: reasoning_gym task 'gsm_symbolic': .*'colour'$"):
        load_records(ReasoningGymSpec(reasoning_gym="gsm_symbolic", size=3, config={"colour": 1}), what=WHAT)


def test_the_schema_tells_the_three_kinds_of_source_apart():
    assert Expert(name="m", prompts="data/math.jsonl").prompts == "data/math.jsonl"
    assert Expert(name="m", prompts={"dataset": "gsm8k"}).prompts.split == "train"
    spec = Expert(name="m", prompts={"reasoning_gym": "gsm_symbolic", "size": 2000, "seed": 7}).prompts
    assert spec == ReasoningGymSpec(reasoning_gym="gsm_symbolic", size=2000, seed=7)


def test_a_wrong_key_names_the_reasoning_gym_source(tiny_world, tmp_path, write_recipe):
    path = write_recipe(tmp_path / "r.yaml", tiny_world, tmp_path / "out")
    data = yaml.safe_load(path.read_text())
    data["experts"][0]["prompts"] = {"reasoning_gym": "gsm_symbolic", "sizes": 20}
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(UserError) as err:
        load_recipe(path)
    assert str(err.value) == f"{path}: experts.0.prompts.reasoning_gym.sizes: unknown key"


@needs_reasoning_gym
def test_a_recipe_trains_on_the_generated_prompts(tiny_world, tmp_path, write_recipe):
    from merge_distill.build import load_prompts
    from merge_distill.models import load_tokenizer

    path = write_recipe(tmp_path / "r.yaml", tiny_world, tmp_path / "out")
    data = yaml.safe_load(path.read_text())
    data["experts"][0]["prompts"] = {"reasoning_gym": "gsm_symbolic", "size": 6, "seed": 5}
    path.write_text(yaml.safe_dump(data))
    recipe = load_recipe(path)
    tokenizer = load_tokenizer(recipe.student.path)
    pools = load_prompts(recipe, tokenizer)
    assert [p.record for p in pools[0]] == gsm_symbolic(6, 5)
    assert all(p.expert == 0 for p in pools[0])
    assert pools[0][0].record["prompt"] in tokenizer.decode(list(pools[0][0].token_ids))
