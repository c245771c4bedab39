"""How the student (and optionally the frozen models) is laid out over the ranks (`Recipe.parallel`): the module
the trainer sees (`ModelLogprobs`), DDP or FSDP2 around it, FSDP decoding, and passes agreed across ranks.
The package docstring (`merge_distill.parallel`) describes the layouts.
"""

from __future__ import annotations

import torch
from torch.distributed.fsdp import FSDPModule

from merge_distill import distributed
from merge_distill.errors import UserError
from merge_distill.parallel.collectives import agreed_chunks
from merge_distill.sampling import Rollouts
from merge_distill.scoring import (
    _split,
    check_reproduces_logits,
    response_logprobs,
    row_lengths,
    token_budget_chunks,
)

Tensor = torch.Tensor


class ModelLogprobs(torch.nn.Module):
    """A causal LM as one module whose `forward` gives its log-probs of given responses (`[B, L]` at the sampled
    tokens, or `[B, L, V]` with `vocab=True`, the dense objective) and whose `decode(fn)` runs rollouts: the
    student as the trainer uses it, or a frozen model sharded across ranks. A data-parallel wrapper around it
    sees the whole computation, backbone and fused head alike, so its hooks run. `max_buckets`: backbone forwards
    per call at most (`scoring.length_buckets`)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model
        self.max_buckets = 4

    def forward(self, rollouts: Rollouts, temperature: float, vocab: bool = False) -> Tensor:
        if vocab:
            from merge_distill.dense import response_vocab_logprobs

            return response_vocab_logprobs(self.model, rollouts, temperature=temperature)
        return response_logprobs(self.model, rollouts, temperature=temperature, max_buckets=self.max_buckets)

    def decode(self, fn):
        """`fn(model)`, e.g. sampling. When this module is FSDP-sharded, every rank calls it: it is registered as
        an FSDP forward method, so the root's hooks gather the root's own shards (embeddings, final norm, head)
        around it, and each layer's shards are gathered here once and freed at the end, so the ranks' decode loops
        run no collective and may stop after different numbers of tokens. The root's own shards stay gathered
        after it (as after any root forward): `decoding` frees them."""
        from torch.distributed.fsdp import FSDPModule

        if not isinstance(self, FSDPModule):
            return fn(self.model)
        layers = [m for m in self.model.modules() if isinstance(m, FSDPModule)]
        for m in layers:
            m.set_reshard_after_forward(False, recurse=False)
            m.unshard()
        try:
            return fn(self.model)
        finally:
            for m in layers:
                m.reshard()
                m.set_reshard_after_forward(True, recurse=False)

    def score(self, rollouts: Rollouts, temperature: float, max_tokens: int | None) -> Tensor:
        """`[B, L]` log-probs of a frozen model's responses in agreed passes (`logprobs_in_passes`): the scorer of a
        frozen model sharded over the ranks (`shard_frozen`, `frozen.ModelCache`)."""
        return logprobs_in_passes(self, rollouts, temperature, max_tokens)


def wrap_student(student: torch.nn.Module, recipe, device: str) -> torch.nn.Module:
    """`ModelLogprobs(student)`, inside the recipe's data-parallel layout when several ranks train (`device`: this
    rank's). Build the optimizer after this: under fsdp the student's parameters become sharded DTensors."""
    if not distributed.active():
        return ModelLogprobs(student)
    device = torch.device(device)
    if recipe.parallel == "ddp":
        return torch.nn.parallel.DistributedDataParallel(
            ModelLogprobs(student), device_ids=[device] if device.type == "cuda" else None,
            broadcast_buffers=False)  # buffers are the same everywhere
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy

    dtype = getattr(torch, recipe.dtype)
    root = sharded(student, f"student '{recipe.student.path}'",
                   mp_policy=MixedPrecisionPolicy(param_dtype=None if dtype == torch.float32 else dtype,
                                                  reduce_dtype=torch.float32),
                   offload_policy=CPUOffloadPolicy(pin_memory=device.type == "cuda") if recipe.placement.offload_optimizer
                   else OffloadPolicy())
    for module in root.modules():  # gradients summed over the ranks, not averaged: the loss is already the global
        if isinstance(module, FSDPModule):  # token mean (each rank divides by the global token count). A plain
            module.set_gradient_divide_factor(1.0)  # SUM (no PREMUL_SUM, which gloo lacks), and nothing divides
            module.set_force_sum_reduction_for_comms(True)
    return root


def gradient_scale(wrapped: torch.nn.Module) -> float:
    """What a rank's share of the global loss is multiplied by before its backward so that the gradients the layout
    reduces are the global batch's: DDP averages gradients over the ranks (it has no divide factor to set), so its
    ranks' shares are scaled by the world size; FSDP sums them (`wrap_student` sets its divide factor to 1)."""
    if isinstance(wrapped, torch.nn.parallel.DistributedDataParallel):
        return float(distributed.world().size)
    return 1.0


def shard_frozen(model: torch.nn.Module, what: str) -> ModelLogprobs:
    """A frozen model (already in its dtype) sharded over the ranks (`placement.shard_frozen`): only scored, so
    the root frees its shards after each forward too."""
    return sharded(model, what, reshard_root=True)


def sharded(model: torch.nn.Module, what: str, *, reshard_root: bool = False, **policy) -> ModelLogprobs:
    """`ModelLogprobs(model)` with `fully_shard` on each decoder layer, then on it as the root. The root takes
    the layers' policy, except that it never casts its inputs: `Rollouts` holds masks and log-probs that a cast to
    bf16 would round (a float mask's sum of 257 is 256 in bf16), and its forward casts nothing it needs."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

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
    mp = policy.get("mp_policy") or MixedPrecisionPolicy()
    root_policy = {**policy, "mp_policy": MixedPrecisionPolicy(
        param_dtype=mp.param_dtype, reduce_dtype=mp.reduce_dtype, output_dtype=mp.output_dtype,
        cast_forward_inputs=False)}
    fully_shard(root, reshard_after_forward=True if reshard_root else None, **root_policy)
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
    return any(isinstance(m, FSDPModule) for m in module.modules())


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
    return Rollouts(one * 0, one, one * 0, one.bool(), one.float() * 0, torch.zeros(1, dtype=torch.bool, device=device))


def total_norm(norm: torch.Tensor) -> torch.Tensor:
    """`clip_grad_norm_`'s result as a plain tensor (under fsdp it is a DTensor over the ranks' shards)."""
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm
