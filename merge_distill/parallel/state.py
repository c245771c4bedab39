"""The student's state leaving and re-entering its layout: whole tensors streamed to a rollout engine, and the full
(unsharded) weights and optimizer state that checkpoints hold, gathered and restored through
`torch.distributed.checkpoint.state_dict`."""

from __future__ import annotations

from pathlib import Path

import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from merge_distill import distributed
from merge_distill.parallel.layout import is_sharded



def full_tensors(model: torch.nn.Module, *, dtype: torch.dtype | None = None, device=None):
    """(name, whole tensor) of each of the model's weights, one at a time, e.g. to stream them into a rollout
    engine: nothing is gathered or copied before it is asked for, so at most the tensors the consumer still
    holds exist besides the model. Each is first cast to `dtype` (floating point ones; under fsdp the shard, so
    the gather moves that dtype's bytes) and moved to `device` (shards offloaded to the host are gathered on the
    GPU). Under fsdp each is gathered (`full_tensor()`) as it is consumed, so every rank must consume all of
    them, in order."""
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach()
        if (dtype is not None and tensor.is_floating_point()) or device is not None:
            tensor = tensor.to(device=device, dtype=dtype if tensor.is_floating_point() else None)
        yield name, tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def save_student(student: torch.nn.Module, folder: Path | None) -> None:
    """The student's weights as an HF folder at `folder` (rank 0 passes it, the others None; every rank calls:
    under fsdp the shards are gathered, to rank 0's host memory)."""
    if not is_sharded(student):
        if folder is not None:
            student.save_pretrained(folder, safe_serialization=True)
        return
    state = get_model_state_dict(student, options=FULL)
    if folder is None:
        return
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):  # a twin without storage takes the gathered tensors, so transformers writes
        twin = AutoModelForCausalLM.from_config(student.config)  # the folder exactly as it writes any model
    twin.load_state_dict(state, assign=True)
    twin.tie_weights()
    twin.generation_config = student.generation_config
    twin.save_pretrained(folder, safe_serialization=True)


def load_student(student: torch.nn.Module, state: dict | None) -> None:
    """Load full weights (rank 0's `state`; the others pass None) into the student in whatever layout it is."""
    _set(set_model_state_dict, student, state)


def optimizer_state(student: torch.nn.Module, optimizer) -> dict:
    """The optimizer's full state keyed by parameter name (every rank calls; rank 0's copy is complete)."""
    return get_optimizer_state_dict(student, optimizer, options=FULL)


def load_optimizer_state(student: torch.nn.Module, optimizer, state: dict | None) -> None:
    """Load `optimizer_state`'s output (rank 0's; the others pass None) into any layout's optimizer."""
    _set(set_optimizer_state_dict, student, state, optimizer)


def _set(setter, student, state, *optimizer) -> None:
    several = distributed.active()
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=several)
    setter(student, *optimizer, (state or {}) if several and not distributed.is_main() else state, options=options)
