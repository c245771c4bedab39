"""Weight-space baselines: the experts' weights combined relative to the student's, no training.

- `expo` (ExPO, Zheng et al. 2024, weight extrapolation): theta = avg + alpha * (avg - theta_student),
  avg = the mean of the experts' weights (`merge.alpha`).
- `merge`: MergeKit's techniques written in torch (`merge_distill.merging`), with task vectors
  tau_i = theta_i - theta_student: `linear` (the mean of the experts), `task_arithmetic` (theta_student +
  scale * sum_i tau_i), `ties` (trim to `density`, elect signs, disjoint mean) and `dare` (drop at random to
  `density`, rescale); `merge.scale`, `merge.density`, `merge.seed`.
"""

from __future__ import annotations

from pathlib import Path

from merge_distill.methods.base import WeightSpaceMethod, register_method


def _teachers(recipe) -> list[str]:
    return [e.teacher for e in recipe.experts]


@register_method("expo")
class ExPO(WeightSpaceMethod):
    def combine(self, recipe):
        from merge_distill.merging import merge_models

        out = Path(recipe.output_dir) / "final"
        return merge_models("expo", recipe.student, _teachers(recipe), out, alpha=recipe.merge.alpha)


@register_method("merge")
class Merge(WeightSpaceMethod):
    def combine(self, recipe):
        from merge_distill.merging import merge_models

        m, out = recipe.merge, Path(recipe.output_dir) / "final"
        params = {"scale": m.scale} if m.technique != "linear" else {}
        if m.technique in ("ties", "dare") and m.density is not None:
            params["density"] = m.density
        if m.technique == "dare":
            params["seed"] = m.seed
        return merge_models(m.technique, recipe.student, _teachers(recipe), out, **params)
