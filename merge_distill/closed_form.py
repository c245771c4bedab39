"""The training-free closed-form G-OPD sampler: decode from `lam * log T + (1 - lam) * log R` per token.

This is the per-token optimum a G-OPD student converges to, so it previews a lam sweep in seconds and is a
baseline a trained student should match within its standard error. In `eval`, name it as a model with
`closed-form:lam=1.25,teacher=PATH,reference=PATH`.
"""

from __future__ import annotations

import torch

from merge_distill.errors import UserError
from merge_distill.objective import gopd_optimum_logprobs
from merge_distill.sampling import LogitsSource, ModelLogits

PREFIX = "closed-form:"


class ClosedFormLogits(LogitsSource):
    """Next-token log-probs of the normalised T^lam R^(1-lam), each model with its own KV cache."""

    def __init__(self, teacher: torch.nn.Module, reference: torch.nn.Module, reward_scale: float):
        self.teacher, self.reference = ModelLogits(teacher), ModelLogits(reference)
        self.reward_scale = reward_scale
        self.device = self.teacher.device
        self.training = False

    def start(self, batch_size: int):
        return self.teacher.start(batch_size), self.reference.start(batch_size)

    def next_logprobs(self, state, input_ids, attention_mask, position_ids):
        t = self.teacher.next_logprobs(state[0], input_ids, attention_mask, position_ids)
        r = self.reference.next_logprobs(state[1], input_ids, attention_mask, position_ids)
        return gopd_optimum_logprobs(t, r, self.reward_scale)


def parse_spec(spec: str) -> dict:
    """`closed-form:lam=1.25,teacher=PATH,reference=PATH` -> {"lam": 1.25, "teacher": ..., "reference": ...}."""
    body = spec.removeprefix(PREFIX)
    try:
        fields = dict(part.split("=", 1) for part in body.split(","))
        return {"lam": float(fields["lam"]), "teacher": fields["teacher"], "reference": fields["reference"]}
    except (ValueError, KeyError):
        raise UserError(f"'{spec}': expected {PREFIX}lam=1.25,teacher=PATH,reference=PATH") from None


def is_spec(path: str) -> bool:
    return str(path).startswith(PREFIX)


def load(spec: str, device: str = "cpu"):
    """(LogitsSource, tokenizer) for a closed-form spec; the two models must share a vocabulary."""
    from merge_distill.models import (
        check_compatible,
        load_model,
        load_tokenizer,
        model_info,
    )

    f = parse_spec(spec)
    check_compatible({"teacher": model_info(f["teacher"], what="closed-form teacher"),
                      "reference": model_info(f["reference"], what="closed-form reference")})
    teacher = load_model(f["teacher"], what="closed-form teacher").to(device)
    reference = load_model(f["reference"], what="closed-form reference").to(device)
    return ClosedFormLogits(teacher, reference, f["lam"]), load_tokenizer(f["teacher"])
