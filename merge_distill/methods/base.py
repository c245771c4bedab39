"""What a training method is, and the registry that names them.

A method is two functions of tensors and a few declarations (verl's `core_algos` shape). The trainer
(`merge_distill.train`) is one loop for all of them; it does everything that involves models, ranks and engines:

    batch   = rows sampled by the student (or, `samples_from = "teacher"`, by each domain's teacher)
    scores  = each domain's rows under that domain's own frozen models, as `frozen_models` declares them
              (`{"teacher": [B, L], "reference": [B, L]}`, `[B, L, V]` with `vocab = True`), and, with
              `graded = True`, `{"reward": [B]}` from each domain's grader
    targets, metrics = method.targets(batch, scores, cfg)        # advantages, target distributions, ...
    loss    = method.loss(logprobs, micro_batch, targets, cfg)   # token mean over the micro-batch's real tokens

`targets` is a tensor (first axis over rows), a tuple or dict of them, or None; the trainer cuts it into the
micro-batches' rows. `logprobs` are the student's log-probs of the sampled tokens `[B, L]` (`[B, L, V]` with
`vocab`), with gradients. Metrics are `merge_distill.step_metrics` values, which say how they combine over ranks.
A method knows nothing of ranks, engines or models: a new objective is one file, a subclass of `Method`
decorated with `@register_method("name")` (copy `merge_distill/methods/sft.py`, the shortest), imported before
a recipe names it, or shipped by another package under the `merge_distill.methods` entry-point group.
"""

from __future__ import annotations

from importlib import metadata
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch

from merge_distill import objective

if TYPE_CHECKING:
    from merge_distill.batch import Batch
    from merge_distill.recipe import Expert, ModelRef, Recipe

Tensor = torch.Tensor
ENTRY_POINT_GROUP = "merge_distill.methods"
_REGISTRY: dict[tuple[str, str], type[Method]] = {}
_entry_points_loaded = False


def register_method(name: str, *, objective: str = "sampled"):
    """Class decorator: the method a recipe selects with `method: name` (and `method.objective: objective`). A name
    (and objective) already taken by another class is refused."""

    def add(cls: type[Method]) -> type[Method]:
        taken = _REGISTRY.get((name, objective))
        if taken is not None and (taken.__module__, taken.__qualname__) != (cls.__module__, cls.__qualname__):
            # (the same class again is a module imported twice)
            raise ValueError(f"method '{name}' (objective {objective}) is already registered by "
                             f"{taken.__module__}.{taken.__qualname__}")
        cls.name, cls.objective = name, objective
        _REGISTRY[(name, objective)] = cls
        return cls

    return add


def _load_entry_points() -> None:
    """Import the methods other packages declare (`merge_distill.methods` entry points), once."""
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        loaded = ep.load()  # a module whose import registers, or a Method subclass
        if isinstance(loaded, type) and issubclass(loaded, Method) and loaded not in _REGISTRY.values():
            register_method(ep.name)(loaded)


def available_methods() -> list[str]:
    _load_entry_points()
    return sorted({name for name, _ in _REGISTRY})


def get_method(name: str, objective: str = "sampled") -> Method:
    """The registered method; a ValueError that lists the registered ones for an unknown name."""
    _load_entry_points()
    if (name, objective) in _REGISTRY:
        return _REGISTRY[(name, objective)]()
    if name not in available_methods():
        raise ValueError(f"unknown method '{name}' (registered: {', '.join(available_methods())})")
    have = sorted(o for n, o in _REGISTRY if n == name)
    raise ValueError(f"method.objective {objective} is not available for method {name} (it has: {', '.join(have)})")


def method_of(recipe: Recipe) -> Method:
    return get_method(recipe.method.name, recipe.method.objective)


class Method:
    """A training method: its declarations and its two tensor functions."""

    name: ClassVar[str]
    objective: ClassVar[str]
    needs_teachers: ClassVar[bool] = True   # every expert must name a teacher
    samples_from: ClassVar[Literal["student", "teacher"]] = "student"  # who answers the prompts
    vocab: ClassVar[bool] = False   # scores and the student's log-probs over the whole vocabulary `[B, L, V]`
    graded: ClassVar[bool] = False  # scores["reward"]: each row's grade from its domain's grader, `[B]`
    curves: ClassVar[tuple[str, ...]] = ("loss", "response_length")  # training_curves.png, per domain if logged so
    progress: ClassVar[tuple[str, str] | None] = None  # (per-domain metric, label) for the progress line

    @property
    def frozen_shardable(self) -> bool:
        """Frozen models only score sampled tokens (so they can be sharded over the ranks: `placement.shard_frozen`);
        not when teachers sample or give whole distributions."""
        return self.samples_from == "student" and not self.vocab

    def check(self, recipe: Recipe) -> None:
        """Raise ValueError (one line, naming the recipe key) for a recipe this method cannot run."""
        if self.needs_teachers:
            for i, e in enumerate(recipe.experts):
                if not e.teacher:
                    raise ValueError(f"experts.{i} ({e.name}): teacher is required for method {self.name}")

    def frozen_models(self, recipe: Recipe, expert: Expert) -> dict[str, ModelRef]:
        """Role ('teacher', 'reference') -> the model (a path, or a base with an adapter) of every frozen model that
        scores `expert`'s rows (the keys of `scores`). A reference `student` (its initial weights) or `teacher_base`
        is named so; the trainer resolves it (`Recipe.frozen_ref`) and does not load it again."""
        return {"teacher": expert.teacher} if self.needs_teachers else {}

    def targets(self, batch: Batch, scores: dict[str, Tensor], cfg: Recipe) -> tuple[Any, dict]:
        """(targets, metrics): what the loss compares the student with (first axis over rows; None: nothing),
        and this rank's metrics (`step_metrics` values)."""
        return None, {}

    def loss(self, logprobs: Tensor, batch: Batch, targets: Any, cfg: Recipe) -> Tensor:
        """The token-mean loss over the real tokens of `batch` (a micro-batch)."""
        raise NotImplementedError


class PolicyGradientMethod(Method):
    """Per-token advantages from `targets` (`[B, L]`), trained with the truncated importance-weighted
    policy-gradient loss (`objective.policy_gradient_loss`): G-OPD's estimator and GRPO share it."""

    def loss(self, logprobs: Tensor, batch: Batch, targets: Tensor, cfg: Recipe) -> Tensor:
        return objective.policy_gradient_loss(logprobs, batch.rollouts.sampler_logprobs, targets, batch.mask,
                                              truncation=cfg.method.importance_truncation)
