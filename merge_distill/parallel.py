"""How the student (and optionally the frozen models) is laid out over the ranks (`Recipe.parallel`), and how its state leaves and re-enters it.

The trainer sees one module, `ModelLogprobs(student)`: its forward is the whole loss-side computation
(backbone and fused output head), so a wrapper's hooks see all of it, and its `decode(fn)` runs the rollouts.

- One process: that module as it is (`parallel` has no effect).
- `ddp`: torch's `DistributedDataParallel` around it. Every rank holds the whole student and its optimizer
  state; gradients are all-reduced in buckets during each step's last backward.
- `fsdp`: torch's `fully_shard` (FSDP2) on each decoder layer (the classes the model names in
  `_no_split_modules`, as transformers' own FSDP integration does), then on that module as the root (the
  embeddings, final norm and head). Weights, gradients and AdamW state are sharded over the ranks. A
  `MixedPrecisionPolicy` (compute in the recipe's `dtype`, gradients reduced in float32, float32 master
  weights) replaces autocast; `placement.offload_optimizer` keeps the shards on the host (`CPUOffloadPolicy`).
  Frozen teachers and references are whole on every rank, unless `placement.shard_frozen` shards them the
  same way (`shard_frozen`; for methods that only score with them, `Method.frozen_via_scorer`).

Under fsdp every forward of a sharded module is a collective (an all-gather), so every rank must run the same
number of them: the trainer agrees micro-batch counts across ranks (`agreed_chunks`; a rank with fewer runs
zero-weight ones), each micro-batch is one backbone forward (no per-rank length buckets), and decoding gathers
every shard once before the first token and frees them after the last (`ModelLogprobs.decode`), so ranks
whose responses end at different lengths never wait for each other inside the decode loop.

Checkpoints hold full (unsharded) state, gathered and restored through `torch.distributed.checkpoint.state_dict`:
the weights as an HF folder, the optimizer state keyed by parameter name. They load into any layout and any
number of ranks (fsdp on 2 ranks resumes as one process; ddp resumes as fsdp).
"""

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
from merge_distill.errors import UserError
from merge_distill.sampling import Rollouts
from merge_distill.scoring import (
    ModelLogprobs,
    _split,
    check_reproduces_logits,
    row_lengths,
    token_budget_chunks,
)

Tensor = torch.Tensor


def wrap_student(student: torch.nn.Module, recipe) -> torch.nn.Module:
    """`ModelLogprobs(student)`, inside the recipe's data-parallel layout when several ranks train.
    Build the optimizer after this: under fsdp the student's parameters become sharded DTensors."""
    if not distributed.active():
        return ModelLogprobs(student)
    device = torch.device(recipe.device)
    if recipe.parallel == "ddp":
        return torch.nn.parallel.DistributedDataParallel(
            ModelLogprobs(student), device_ids=[device] if device.type == "cuda" else None,
            broadcast_buffers=False)  # buffers are the same everywhere
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy

    dtype = getattr(torch, recipe.dtype)
    return sharded(student, f"student '{recipe.student}'",
                   mp_policy=MixedPrecisionPolicy(param_dtype=None if dtype == torch.float32 else dtype,
                                                  reduce_dtype=torch.float32),
                   offload_policy=CPUOffloadPolicy() if recipe.placement.offload_optimizer else OffloadPolicy())


def shard_frozen(model: torch.nn.Module, what: str) -> ModelLogprobs:
    """A frozen model (already in its dtype) sharded over the ranks (`placement.shard_frozen`): only scored, so
    the root frees its shards after each forward too."""
    return sharded(model, what, reshard_root=True)


def sharded(model: torch.nn.Module, what: str, *, reshard_root: bool = False, **policy) -> ModelLogprobs:
    """`ModelLogprobs(model)` with `fully_shard` on each decoder layer, then on it as the root."""
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    layers = decoder_layers(model)
    if not layers:
        raise UserError(f"{what}: fsdp shards per decoder layer, but {type(model).__name__} names none in "
                        "_no_split_modules; use parallel: ddp (and placement.shard_frozen: false)")
    backbone, head = _split(model)
    if backbone is not None:  # probe the head on the whole model, before its parameters become shards
        check_reproduces_logits(model, backbone, head)
    root = ModelLogprobs(model)
    for layer in layers:
        fully_shard(layer, **policy)
    fully_shard(root, reshard_after_forward=True if reshard_root else None, **policy)
    register_fsdp_forward_method(root, "decode")  # the root's hooks run around rollouts too
    root.max_buckets = 1  # one backbone forward per pass on every rank
    return root


def decoding(wrapped: torch.nn.Module, fn):
    """`fn(student)` through `ModelLogprobs.decode` (every rank calls it under fsdp), then the root's shards
    freed too, so that between steps every parameter is the shard the optimizer and the state dicts know."""
    root = root_of(wrapped)
    try:
        return root.decode(fn)
    finally:
        if is_sharded(root):
            root.reshard()


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's repeated blocks: instances of the classes it lists in `_no_split_modules`."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    return [m for m in model.modules() if type(m).__name__ in names]


def root_of(wrapped: torch.nn.Module) -> ModelLogprobs:
    """The `ModelLogprobs` inside a data-parallel wrapper (fsdp's root is that module itself)."""
    return getattr(wrapped, "module", wrapped)


def is_sharded(module: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in module.modules())


def agreed_chunks(chunks: list[list[int]]) -> list[tuple[list[int], bool]]:
    """(rows, real) for each forward pass of a step's micro-batches: this rank's `chunks`, then, up to the largest
    count on any rank, passes over its first row (no row: `[]`, the caller's placeholder) that must weigh nothing
    (`real` False), so that every rank runs the same number of forwards and backwards (under fsdp each is a
    collective)."""
    n = int(distributed.all_reduce_max(torch.tensor(len(chunks))))
    return [(rows, True) for rows in chunks] + [(chunks[0][:1] if chunks else [], False)] * (n - len(chunks))


def logprobs_in_passes(module: torch.nn.Module, rollouts: Rollouts, temperature: float,
                       max_tokens: int | None) -> Tensor:
    """`[B, L]` log-probs of `rollouts` through `module` (a `ModelLogprobs` in any layout: the student inside DDP or
    FSDP, a frozen model sharded over the ranks), without gradients, in passes of at most `max_tokens` padded
    tokens (`scoring.token_budget_chunks`), as many on every rank (`agreed_chunks`; a rank without a row passes a
    placeholder)."""
    out = torch.zeros(rollouts.response_ids.shape, device=rollouts.response_ids.device)
    with torch.no_grad():
        for rows, real in agreed_chunks(token_budget_chunks(row_lengths(rollouts), max_tokens)):
            lp = module(rollouts.select(rows) if rows else _placeholder(out.device), temperature)
            if real:
                out[rows] = lp.float()
    return out


def _placeholder(device: torch.device) -> Rollouts:
    """One row of one prompt token and one response token: a pass of a rank that has no row to score."""
    one = torch.ones(1, 1, dtype=torch.long, device=device)
    return Rollouts(one * 0, one, one * 0, one.float(), one.float() * 0, torch.zeros(1, dtype=torch.bool, device=device))


def total_norm(norm: torch.Tensor) -> torch.Tensor:
    """`clip_grad_norm_`'s result as a plain tensor (under fsdp it is a DTensor over the ranks' shards)."""
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


# ------------------------------------------------------------------------------------------ state


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
