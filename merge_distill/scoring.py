"""Exact-token log-probs of sampled responses under a model, and a cache of frozen scorers.

Only real response positions are projected to the vocabulary, in row chunks, with log-sum-exp: no model
(frozen, or the student under autograd) ever holds `[batch, length, vocab]` float32 logits or log-probs, and
prompt and padding positions are never scored.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch

from merge_distill.fused import token_logprobs
from merge_distill.sampling import Rollouts, positions

Tensor = torch.Tensor


def response_logprobs(model: torch.nn.Module, rollouts: Rollouts, *, temperature: float = 1.0,
                      chunk_tokens: int | None = None) -> Tensor:
    """log p(y_t | x, y_<t) of every sampled response token, `[B, L]`, 0 on padding.

    Gradients flow when called outside `torch.no_grad()` (the student's update uses this too), through
    `merge_distill.fused.token_logprobs`, which recomputes logits chunk by chunk in the backward pass instead
    of keeping `[tokens, vocab]` of them for autograd. Only real response tokens are projected (not the
    prompt, not the padding after EOS), `chunk_tokens` rows at a time (default: about
    `fused.CHUNK_ELEMENTS` logits per chunk, 4x that on CUDA, so memory stays flat in vocabulary and length).
    """
    input_ids = torch.cat([rollouts.prompt_ids, rollouts.response_ids], dim=1)
    mask = torch.cat([rollouts.prompt_mask, rollouts.response_mask.long()], dim=1)
    P, L = rollouts.prompt_ids.shape[1], rollouts.response_ids.shape[1]
    backbone, head = _split(model)
    if backbone is None:  # an architecture we cannot split: fall back to the model's own logits
        logits = model(input_ids=input_ids, attention_mask=mask, position_ids=positions(mask),
                       logits_to_keep=L + 1).logits[:, :-1]
        return _gather_logprobs(logits.float() / temperature, rollouts.response_ids) * rollouts.response_mask
    hidden = backbone(input_ids=input_ids, attention_mask=mask, position_ids=positions(mask)).last_hidden_state
    hidden = hidden[:, P - 1:P + L - 1]  # the position before each response token predicts it
    real = rollouts.response_mask.bool()
    flat_h, flat_t = hidden[real], rollouts.response_ids[real]
    lp = token_logprobs(flat_h, head.weight, head.bias, flat_t, temperature=temperature, chunk_rows=chunk_tokens)
    out = torch.zeros(real.shape, dtype=lp.dtype, device=lp.device)
    return out.masked_scatter(real, lp)


def _gather_logprobs(logits: Tensor, targets: Tensor) -> Tensor:
    picked = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def _split(model: torch.nn.Module):
    """(backbone returning hidden states, output projection) of an HF causal LM, or (None, None)."""
    backbone = getattr(model, "model", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if (backbone is None or not isinstance(head, torch.nn.Linear)
            or getattr(model.config, "final_logit_softcapping", None)):
        return None, None
    return backbone, head


class ModelCache:
    """Frozen models by resolved path: a checkpoint several experts share is loaded once.

    With `offload`, models rest on the CPU and visit `device` only while they score (less device memory,
    one host-to-device copy per use)."""

    def __init__(self, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", offload: bool = False):
        self.dtype, self.device, self.offload = dtype, torch.device(device), offload
        self._models: dict[str, torch.nn.Module] = {}

    @staticmethod
    def key(path: str | os.PathLike) -> str:
        return str(Path(path).resolve())

    def get(self, path: str | os.PathLike, *, what: str = "model") -> torch.nn.Module:
        from merge_distill.models import load_model

        k = self.key(path)
        if k not in self._models:
            self._models[k] = load_model(path, what=what, dtype=self.dtype).to("cpu" if self.offload else self.device)
        return self._models[k]

    @contextlib.contextmanager
    def using(self, path: str | os.PathLike, *, what: str = "model"):
        """The model at `path`, on `device` for the duration of the block (back to the CPU after, with offload)."""
        model = self.get(path, what=what)
        if self.offload:
            model.to(self.device)
        try:
            yield model
        finally:
            if self.offload:
                model.to("cpu")

    @torch.no_grad()
    def score(self, path: str | os.PathLike, rollouts: Rollouts) -> Tensor:
        with self.using(path) as model:
            return response_logprobs(model, rollouts.to(self.device)).to(rollouts.response_ids.device)
