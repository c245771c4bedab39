"""What a training method is, and the registry that names them.

A method turns a batch of prompts into an update of the student (or, for the weight-space methods, combines
the experts' weights without training). The trainer (`merge_distill.train`) is one loop for all of them:

    rows, rollouts = method.rollouts(run, batch, seeds)      # who answers the prompts
    targets        = method.targets(run, rows, rollouts, m)  # advantages, target distributions, or nothing
    loss, logprobs = method.loss(run, micro_batch, targets)  # per micro-batch, token mean over its real tokens

and every other part of the project asks the method, never its name: which frozen models it needs for each
expert (`frozen_models`: validation, model loading and memory planning), which recipes it accepts (`check`),
and which per-domain curves it logs (`curves`, `progress`). Adding an objective is one new file: a subclass
of `TrainingMethod` decorated with `@register_method("name")` (see `merge_distill/methods/sft.py`, the
shortest), imported before the recipe that names it is loaded.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import torch

if TYPE_CHECKING:
    from merge_distill.data import Prompt
    from merge_distill.recipe import Expert, Recipe
    from merge_distill.sampling import Rollouts
    from merge_distill.train import Setup

Tensor = torch.Tensor
_REGISTRY: dict[tuple[str, str], type[Method]] = {}


def register_method(name: str, *, objective: str = "sampled"):
    """Class decorator: the method a recipe selects with `method: name` (and `method.objective: objective`)."""

    def add(cls: type[Method]) -> type[Method]:
        cls.name, cls.objective = name, objective
        _REGISTRY[(name, objective)] = cls
        return cls

    return add


def available_methods() -> list[str]:
    return sorted({name for name, _ in _REGISTRY})


def get_method(name: str, objective: str = "sampled") -> Method:
    """The registered method; a ValueError that lists the registered ones for an unknown name."""
    if (name, objective) in _REGISTRY:
        return _REGISTRY[(name, objective)]()
    if name not in available_methods():
        raise ValueError(f"unknown method '{name}' (registered: {', '.join(available_methods())})")
    have = sorted(o for n, o in _REGISTRY if n == name)
    raise ValueError(f"method.objective {objective} is not available for method {name} (it has: {', '.join(have)})")


def method_of(recipe: Recipe) -> Method:
    return get_method(recipe.method.name, recipe.method.objective)


class Method:
    """Every method: its name, what it needs, what it accepts."""

    name: ClassVar[str]
    objective: ClassVar[str]
    trains: ClassVar[bool] = True           # False: a weight-space method (`combine`), no training loop
    needs_teachers: ClassVar[bool] = True   # every expert must name a teacher
    # True: frozen models are reached only through `Setup.score` (the recipe's scoring engine, e.g. vLLM), for
    # every expert on every rank, in the recipes' order, even with no rows (so they can be sharded over the ranks:
    # `placement.shard_frozen`); False: the method also loads them into the trainer (`Setup.frozen`), e.g. to
    # sample or for full distributions (memory planning counts them there)
    frozen_via_scorer: ClassVar[bool] = True
    curves: ClassVar[tuple[str, ...]] = ("loss", "response_length")  # training_curves.png, per domain if logged so
    progress: ClassVar[tuple[str, str] | None] = None  # (per-domain metric, label) for the progress line

    def check(self, recipe: Recipe) -> None:
        """Raise ValueError (one line, naming the recipe key) for a recipe this method cannot run."""
        if self.needs_teachers:
            for i, e in enumerate(recipe.experts):
                if not e.teacher:
                    raise ValueError(f"experts.{i} ({e.name}): teacher is required for method {self.name}")

    def frozen_models(self, recipe: Recipe, expert: Expert) -> dict[str, str]:
        """Role ('teacher', 'reference') -> model path of every frozen model the method loads for `expert`.
        A reference equal to `student` (its initial weights) is named so and not loaded again."""
        return {"teacher": expert.teacher} if self.needs_teachers else {}


class TrainingMethod(Method):
    """A method trained by the on-policy loop. Defaults: the student answers its own prompts."""

    def rollouts(self, run: Setup, batch: list[Prompt], seeds: list[int]) -> tuple[list[Prompt], Rollouts]:
        """(rows, rollouts): one response per row of `batch`, and the rows in the rollouts' order."""
        return batch, run.sample_student(batch, seeds)

    def targets(self, run: Setup, batch: list[Prompt], rollouts: Rollouts, metrics: dict) -> Tensor | None:
        """What the loss compares the student with, first axis over rows (None: nothing); logs into `metrics`."""
        return None

    def loss(self, run: Setup, rollouts: Rollouts, targets: Tensor | None) -> tuple[Tensor, Tensor]:
        """(loss, log-probs): the token-mean loss over the real tokens of `rollouts` (a micro-batch) and the
        student's detached log-probs of those tokens `[B, L]` (for the importance-ratio metrics)."""
        raise NotImplementedError


class WeightSpaceMethod(Method):
    """A method that combines the experts' weights (relative to the student) without training."""

    trains = False

    def combine(self, recipe: Recipe) -> str:
        """Write the combined model to `<output_dir>/final`; its path."""
        raise NotImplementedError
