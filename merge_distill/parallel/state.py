"""The student's state leaving and re-entering its layout, through `torch.distributed.checkpoint.state_dict`:

- `full_tensors`: whole tensors, one at a time, streamed to a rollout engine or the final export.
- `ModelState`, `OptimizerState`: torch.distributed.checkpoint's `Stateful` protocol over the model's and the
  optimizer's *sharded* state dicts (each rank its own shards; parameters by name), as torchtitan's
  `ModelWrapper` and `OptimizersContainer`: what `merge_distill.checkpoint.Checkpointer` saves and loads, so no
  rank ever holds more than its share, and a checkpoint written by one layout loads into another (DCP reshards).
- `materialize` and `load_full_weights`: a model built on the meta device and sharded is given storage, then
  its weights from rank 0's one full copy (`broadcast_from_rank0`: each rank keeps its shard of each tensor).
"""

from __future__ import annotations

from collections.abc import Container

import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.checkpoint.stateful import Stateful

from merge_distill import distributed


def full_tensors(model: torch.nn.Module, *, dtype: torch.dtype | None = None, device=None,
                 names: Container[str] | None = None):
    """(name, whole tensor) of each of the model's weights (of those in `names`, when given), one at a time, e.g.
    to stream them into a rollout engine: nothing is gathered or copied before it is asked for, so at most the
    tensors the consumer still holds exist besides the model. Each is first cast to `dtype` (floating point ones;
    under fsdp the shard, so the gather moves that dtype's bytes) and moved to `device` (shards offloaded to the
    host are gathered on the GPU). Under fsdp each is gathered (`full_tensor()`) as it is consumed, so every rank
    must consume all of them, in order."""
    for name, tensor in model.state_dict().items():
        if names is not None and name not in names:
            continue
        tensor = tensor.detach()
        if (dtype is not None and tensor.is_floating_point()) or device is not None:
            tensor = tensor.to(device=device, dtype=dtype if tensor.is_floating_point() else None)
        yield name, tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


class ModelState(Stateful):
    """The model's trained weights by parameter name, each rank's shards (DTensors under fsdp, whole tensors
    otherwise). Frozen parameters (a LoRA student's base) are left out: they are the base's, read from its folder
    when the run resumes."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        # every name of each trained parameter (a tied weight has two; a frozen one tied to nothing trained is out)
        self.trained = {n for n, p in model.named_parameters(remove_duplicate=False) if p.requires_grad}
        frozen = any(not p.requires_grad for p in model.parameters())
        self.options = StateDictOptions(ignore_frozen_params=True, strict=not frozen)

    def state_dict(self) -> dict:
        state = get_model_state_dict(self.model, options=self.options)
        return state if self.options.strict else {k: v for k, v in state.items() if k in self.trained}

    def load_state_dict(self, state: dict) -> None:
        set_model_state_dict(self.model, state, options=self.options)


class OptimizerState(Stateful):
    """The optimizer's state keyed by parameter name (not position), each rank's shards of its moments."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer):
        self.model, self.optimizer = model, optimizer

    def state_dict(self) -> dict:
        return get_optimizer_state_dict(self.model, self.optimizer)

    def load_state_dict(self, state: dict) -> None:
        set_optimizer_state_dict(self.model, self.optimizer, state)


def non_persistent_buffers(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The buffers a state dict leaves out (e.g. rotary embeddings' `inv_freq`): computed when a model is built,
    so a model built on the meta device has none and must receive them (`materialize`)."""
    return {f"{name}.{b}" if name else b: getattr(module, b) for name, module in model.named_modules()
            for b in module._non_persistent_buffers_set if getattr(module, b, None) is not None}


def materialize(wrapped: torch.nn.Module, device, buffers: dict[str, torch.Tensor], model: torch.nn.Module) -> None:
    """Give a model built on the meta device (and sharded: `wrapped` is the outermost module, so FSDP re-registers
    every shard) uninitialised storage on `device`, and `model`'s non-persistent buffers their values. Its weights
    come next (`load_full_weights` or a checkpoint); tied weights stay one tensor."""
    wrapped.to_empty(device=device)
    with torch.no_grad():
        for name, value in buffers.items():
            module, _, attr = name.rpartition(".")
            owner = model.get_submodule(module)
            setattr(owner, attr, value.to(device=device, dtype=getattr(owner, attr).dtype))


def load_full_weights(model: torch.nn.Module, state: dict | None) -> None:
    """Load full weights (rank 0's `state`; the others pass None) into the model in whatever layout it is: under
    several ranks rank 0's tensors are broadcast, each rank keeping its shard."""
    several = distributed.active()
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=several)
    set_model_state_dict(model, (state or {}) if several and not distributed.is_main() else state, options=options)
