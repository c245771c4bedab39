"""Optional inference backends. The default ("transformers") is built in: `merge_distill.sampling.sample`
and `merge_distill.scoring.ModelCache`. The vLLM backend (`pip install 'merge-distill[vllm]'`, CUDA only)
lives in `merge_distill.backends.vllm` and is imported only when a recipe asks for it.

The trainer asks these factories for a backend; `None` means "use the transformers path". Pass a recipe
whose `zoo:` paths are already resolved (`merge_distill.toyworld.zoo.resolve`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from merge_distill.backends.vllm import VLLMSampler, VLLMScorer
    from merge_distill.recipe import Recipe


def make_sampler(recipe: Recipe) -> VLLMSampler | None:
    """The student's rollout engine per `recipe.backend.rollout`; None for "transformers".

    The trainer calls `sampler.sync_weights(student)` after every optimizer step, then
    `sampler.sample(prompts, ..., seeds=...)` with one seed per row (`merge_distill.sampling.row_seeds`).
    """
    if recipe.backend.rollout == "transformers":
        return None
    from merge_distill.backends.vllm import VLLMSampler

    return VLLMSampler(recipe.student, dtype=recipe.dtype, seed=recipe.train.seed,
                       gpu_memory_utilization=recipe.backend.gpu_memory_utilization)


def make_scorer(recipe: Recipe, path: str) -> VLLMScorer | None:
    """A frozen scorer (teacher or reference at `path`) per `recipe.backend.scoring`; None for "transformers"."""
    if recipe.backend.scoring == "transformers":
        return None
    from merge_distill.backends.vllm import VLLMScorer

    return VLLMScorer(path, dtype=recipe.dtype, seed=recipe.train.seed,
                      gpu_memory_utilization=recipe.backend.gpu_memory_utilization)


__all__ = ["make_sampler", "make_scorer"]
