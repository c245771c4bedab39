"""Every collective the run itself sends (beyond what DDP, FSDP2 and torch.distributed.checkpoint send inside
their own engines), in one place: agreed counts, sums and maxima, picklable objects, barriers.

The process group is device-keyed (`merge_distill.distributed.group_backends`): `cpu:gloo` for host tensors and
objects, and the accelerator's own backend (`cuda:nccl`) for device tensors, as torchtitan builds it. NCCL has no
CPU backend (torch's `Backend.backend_capability["nccl"] == ["cuda"]`), so a group of NCCL alone fails every
collective on a host tensor with "No backend type associated with device type cpu". Small host-side values (a
micro-batch count, a flag, a token count) therefore go over gloo, on the host, where they already are; nothing
here moves a tensor to another device.

Outside a launcher (one process) or inside `distributed.local()`, each of these returns its input as it is.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from merge_distill import distributed

Tensor = torch.Tensor


def all_reduce_sum(value: Tensor) -> Tensor:
    """The sum over ranks (on a copy); the value itself alone."""
    return _all_reduce(value, dist.ReduceOp.SUM)


def all_reduce_max(value: Tensor) -> Tensor:
    """The largest value over ranks (on a copy); the value itself alone."""
    return _all_reduce(value, dist.ReduceOp.MAX)


def _all_reduce(value: Tensor, op) -> Tensor:
    if not distributed.active():
        return value
    out = value.detach().clone()
    dist.all_reduce(out, op=op)
    return out


def gather(obj) -> list:
    """Every rank's `obj` (picklable), in rank order; `[obj]` alone. Objects travel over the group's CPU backend."""
    if not distributed.active():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast(obj):
    """Rank 0's `obj` (picklable) on every rank; `obj` alone. What rank 0 decides (which checkpoint to resume, say)
    every rank then does, even where the ranks' file systems differ."""
    if not distributed.active():
        return obj
    box = [obj if distributed.is_main() else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    if distributed.active():
        dist.barrier()


def any_rank(flag: bool) -> bool:
    """True on every rank when `flag` is true on any rank (e.g. a non-finite loss: then no rank steps)."""
    return bool(all_reduce_max(torch.tensor(int(flag))) > 0)


def agreed_count(n: int) -> int:
    """The largest `n` over ranks: how many collective passes (forwards under fsdp) every rank must run."""
    return int(all_reduce_max(torch.tensor(n)))


def agreed_chunks(chunks: list[list[int]]) -> list[tuple[list[int], bool]]:
    """(rows, real) for each forward pass of a step's micro-batches: this rank's `chunks`, then, up to the largest
    count on any rank, passes over its first row (no row: `[]`, the caller's placeholder) that must weigh nothing
    (`real` False), so that every rank runs the same number of forwards and backwards (under fsdp each is a
    collective)."""
    n = agreed_count(len(chunks))
    return [(rows, True) for rows in chunks] + [(chunks[0][:1] if chunks else [], False)] * (n - len(chunks))
