"""Training methods as a registry (`base.py` says what a method is). Built in: `gopd` (G-OPD / ExOPD, the
sampled estimator, and `method.objective: dense`), `grpo`, `sft`, and the weight-space `expo` and `merge`."""

from merge_distill.methods.base import (
    Method,
    TrainingMethod,
    WeightSpaceMethod,
    available_methods,
    get_method,
    method_of,
    register_method,
)
from merge_distill.methods import gopd, gopd_dense, grpo, sft, weight_space  # noqa: E402,F401  (registration)

__all__ = ["Method", "TrainingMethod", "WeightSpaceMethod", "available_methods", "get_method", "method_of",
           "register_method"]
