"""The frozen models of a run (teachers and references), each checkpoint loaded once, scored through
`merge_distill.scoring`'s log-prob math (or, sharded over the ranks, through the layout's agreed passes)."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch

from merge_distill.adapters import AdapterHost
from merge_distill.errors import UserError
from merge_distill.recipe import AdapterModel, ModelRef
from merge_distill.sampling import Rollouts
from merge_distill.scoring import response_logprobs_chunked

Tensor = torch.Tensor


class ModelCache:
    """Frozen models by resolved path: a checkpoint several experts share is loaded once.

    An adapter model (`recipe.AdapterModel`) is its base with the adapter on, through the base's `AdapterHost`
    (`merge_distill.adapters`): one copy of each base, its adapters loaded into it by name; a plain path that is
    such a base is the host with every adapter off. `host(path, host)` makes a model already in memory (a LoRA
    student, its adapter trainable) the host of its base path: then no frozen copy of that base is loaded at all.

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
        self._hosts: dict[str, AdapterHost] = {}  # base path -> the host of its adapters
        self._lent: set[str] = set()  # hosts that are models in use elsewhere (a LoRA student): never offloaded

    @staticmethod
    def key(path: str | os.PathLike) -> str:
        return str(Path(path).resolve())

    def host(self, path: str | os.PathLike, host: AdapterHost) -> None:
        """`host` (a model in memory, e.g. the LoRA student) serves the base at `path` and its adapters."""
        self._hosts[self.key(path)] = host
        self._lent.add(self.key(path))

    def hosts_adapters_of(self, path: str | os.PathLike) -> None:
        """The base at `path` will serve adapters: it loads as their host (plain, for now), so that scoring the base
        itself and its adapters share one copy, whichever comes first."""
        if self.shard:
            raise UserError(f"adapter experts of base '{path}' cannot be scored sharded over the ranks yet "
                            "(placement.shard_frozen): load them whole")
        self._hosts.setdefault(self.key(path), None)

    def get(self, path: str | os.PathLike, *, what: str = "model") -> torch.nn.Module:
        from merge_distill.models import load_model, load_sharded

        k = self.key(path)
        if k not in self._models:
            device = "cpu" if self.offload else self.device
            self._models[k] = (load_sharded(path, self.shard, what=what, dtype=self.dtype, device=device) if self.shard
                               else load_model(path, what=what, dtype=self.dtype).to(device))
        return self._models[k]

    @contextlib.contextmanager
    def using(self, ref: ModelRef, *, what: str = "model"):
        """The model `ref` names, on `device` for the duration of the block (back to the CPU after, with offload):
        a path's model, or an adapter model's base with its adapter on."""
        base, adapter = (ref.base, ref.adapter) if isinstance(ref, AdapterModel) else (ref, None)
        k = self.key(base)
        if adapter is not None and k not in self._hosts:
            self.hosts_adapters_of(base)
        if k in self._hosts:
            if self._hosts[k] is None:
                self._hosts[k] = AdapterHost(self.get(base, what=what), dtype=self.dtype)
            with self._placed(self._hosts[k].model, lent=k in self._lent), self._hosts[k].using(adapter) as model:
                yield model
            return
        with self._placed(self.get(base, what=what)) as model:
            yield model

    @contextlib.contextmanager
    def _placed(self, model: torch.nn.Module, lent: bool = False):
        offload = self.offload and not lent
        if offload:
            model.to(self.device)
        try:
            yield model
        finally:
            if offload:
                model.to("cpu")

    @torch.no_grad()
    def score(self, path: ModelRef, rollouts: Rollouts, *, temperature: float = 1.0) -> Tensor:
        """`[B, L]` log-probs of the response tokens under the model `path` names, its logits divided by
        `temperature`."""
        with self.using(path) as model:
            if self.shard:  # sharded over the ranks: the same passes on every rank
                lp = model.score(rollouts.to(self.device), temperature, self.max_tokens)
            else:
                lp = response_logprobs_chunked(model, rollouts.to(self.device), temperature=temperature,
                                               max_tokens=self.max_tokens)
            return lp.to(rollouts.response_ids.device)


    @torch.no_grad()
    def vocab_logprobs(self, path: ModelRef, rollouts: Rollouts, *, temperature: float = 1.0) -> Tensor:
        """`[B, L, V]` log-probs over the whole vocabulary at each response position (the dense objective)."""
        from merge_distill.dense import response_vocab_logprobs

        with self.using(path) as model:
            lp = response_vocab_logprobs(model, rollouts.to(self.device), temperature=temperature)
            return lp.to(rollouts.response_ids.device)
