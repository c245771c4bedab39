"""The frozen models of a run (teachers and references), each checkpoint loaded once, scored through
`merge_distill.scoring`'s log-prob math (or, sharded over the ranks, through the layout's agreed passes)."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch

from merge_distill.sampling import Rollouts
from merge_distill.scoring import response_logprobs_chunked

Tensor = torch.Tensor


class ModelCache:
    """Frozen models by resolved path: a checkpoint several experts share is loaded once.

    With `offload`, models rest on the CPU and visit `device` only while they score (less device memory,
    one host-to-device copy per use); `max_tokens` bounds each scoring forward (`token_budget_chunks`). With
    `shard(model, what)` (`parallel.shard_frozen`) each model is sharded over the ranks as it loads (built on the
    meta device, filled from rank 0's copy: `models.load_sharded`); every rank
    must then score with each model the same number of times (an empty batch too): the sharded model's own
    `score(rollouts, temperature, max_tokens)` agrees the passes (`parallel.layout.ModelLogprobs.score`)."""

    def __init__(self, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", offload: bool = False,
                 max_tokens: int | None = None, shard=None):
        self.dtype, self.device, self.offload, self.max_tokens = dtype, torch.device(device), offload, max_tokens
        self.shard = shard
        self._models: dict[str, torch.nn.Module] = {}

    @staticmethod
    def key(path: str | os.PathLike) -> str:
        return str(Path(path).resolve())

    def get(self, path: str | os.PathLike, *, what: str = "model") -> torch.nn.Module:
        from merge_distill.models import load_model, load_sharded

        k = self.key(path)
        if k not in self._models:
            device = "cpu" if self.offload else self.device
            self._models[k] = (load_sharded(path, self.shard, what=what, dtype=self.dtype, device=device) if self.shard
                               else load_model(path, what=what, dtype=self.dtype).to(device))
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
    def score(self, path: str | os.PathLike, rollouts: Rollouts, *, temperature: float = 1.0) -> Tensor:
        """`[B, L]` log-probs of the response tokens under the model at `path`, its logits divided by `temperature`."""
        with self.using(path) as model:
            if self.shard:  # sharded over the ranks: the same passes on every rank
                lp = model.score(rollouts.to(self.device), temperature, self.max_tokens)
            else:
                lp = response_logprobs_chunked(model, rollouts.to(self.device), temperature=temperature,
                                               max_tokens=self.max_tokens)
            return lp.to(rollouts.response_ids.device)


    @torch.no_grad()
    def vocab_logprobs(self, path: str | os.PathLike, rollouts: Rollouts, *, temperature: float = 1.0) -> Tensor:
        """`[B, L, V]` log-probs over the whole vocabulary at each response position (the dense objective)."""
        from merge_distill.dense import response_vocab_logprobs

        with self.using(path) as model:
            lp = response_vocab_logprobs(model, rollouts.to(self.device), temperature=temperature)
            return lp.to(rollouts.response_ids.device)
