"""Training methods as a registry (`base.py` says what a method is). Built in: `gopd` (G-OPD / ExOPD, the
sampled estimator, and `method.objective: dense`), `grpo` and `sft`. The weight-space baselines (`expo`, `merge`)
train nothing and are not methods here: `merge_distill.merging.COMBINERS`."""

from merge_distill.methods.base import Method, available_methods, get_method, method_of, register_method
from merge_distill.methods import gopd, gopd_dense, grpo, sft  # noqa: E402,F401  (registration)


def trains(recipe) -> bool:
    """Whether the recipe's method is a training method (else a weight-space merge, `merging.COMBINERS`)."""
    return recipe.method.name in available_methods()


def frozen_models(recipe, expert) -> dict[str, str]:
    """Role -> path of every model besides the student that a run of `recipe` loads for `expert`: the training
    method's (`Method.frozen_models`), or the teacher a weight-space merge combines."""
    return method_of(recipe).frozen_models(recipe, expert) if trains(recipe) else {"teacher": expert.teacher}


__all__ = ["Method", "available_methods", "frozen_models", "get_method", "method_of", "register_method", "trains"]
