"""Data parallelism for `merge-distill run` under `torchrun` (or `accelerate launch`): the process group,
ranks, and the few collectives the loop itself needs (counts, metrics).

Each step every rank draws the same global prompt batch from the (deterministic) mixer and keeps a contiguous
slice of its *prompts* (so GRPO's rollouts of one prompt stay on one rank), sampled with the row seeds of
their *global* rows: rank r samples exactly the responses one process would for those rows. The loss is the
token mean over the global batch, so each rank weights its tokens by 1 / (global token count) and the
gradients are summed across ranks by torch's engines, `DistributedDataParallel` or FSDP2's `fully_shard`, as
`Recipe.parallel` says (`merge_distill.parallel`); every rank then clips by the same global norm and takes the
same optimizer step. Rank 0 alone writes metrics and the final model; every rank writes its shards of each
checkpoint (`merge_distill.checkpoint`: a run resumes on any number of ranks and in either layout). The loop's
own collectives (counts, flags, metrics) are in `merge_distill.parallel.collectives`.

Without the launcher's environment (WORLD_SIZE unset or 1) everything here is a no-op for one process.
"""

from __future__ import annotations

import contextlib
import gc
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

# Rank 0 may build the CPU zoo or save a large checkpoint while the others wait in a collective.
TIMEOUT = timedelta(seconds=float(os.environ.get("MERGE_DISTILL_DIST_TIMEOUT_S", 3 * 3600)))


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


SINGLE = World()
_local_depth = 0  # > 0 inside `local()`: this process acts alone


def under_torchrun() -> bool:
    """Launched by torchrun (or `accelerate launch`, which runs it), with any number of processes."""
    return "TORCHELASTIC_RUN_ID" in os.environ


def launched() -> World:
    """The world the launcher describes in the environment (torchrun, accelerate launch, ...). One process under
    torchrun is a world of one that still builds its process group and layout (fsdp on one GPU, over NCCL)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1 and not under_torchrun():
        return SINGLE
    return World(int(os.environ.get("RANK", "0")), size, int(os.environ.get("LOCAL_RANK", "0")))


def world() -> World:
    """This process's rank and the number of ranks (one, outside a launcher or inside `local()`)."""
    if _local_depth:
        return SINGLE
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size(), launched().local_rank)
    return launched()


def is_main() -> bool:
    return world().main


def active() -> bool:
    """True when collectives run and layouts wrap: the process group up (under torchrun, even of one rank), not
    inside `local()`."""
    return not _local_depth and dist.is_available() and dist.is_initialized()


def device_for(device: str) -> str:
    """The device of this rank: `cuda` (or `cuda:N`) means this rank's GPU, `cuda:LOCAL_RANK`."""
    w = world()
    if (w.size > 1 or active()) and torch.device(device).type == "cuda":
        return f"cuda:{w.local_rank}"
    return device


# The group's backend for the accelerator's tensors, by device type. Host tensors and objects always go over gloo.
ACCELERATOR_BACKENDS = {"cuda": "nccl", "xpu": "xccl"}
# A CPU rehearsal of an accelerator's group: set to a device type (`cuda`), a CPU run builds the group that device's
# run would build, with gloo standing in for its backend (`cpu:gloo,cuda:gloo`): a collective on a device the
# group has no backend for then fails here as it fails on the GPU. The distributed tests run under it.
REHEARSE = "MERGE_DISTILL_REHEARSE_GROUP_OF"


def group_backends(device_type: str) -> str:
    """The process group's `device:backend` pairs for a run on `device_type`, as torchtitan builds them: `cpu:gloo`
    always (the loop's host-side counts and flags, pickled objects, shards offloaded to the host) and, on an
    accelerator, its own backend for its tensors (`cpu:gloo,cuda:nccl`)."""
    accelerator = ACCELERATOR_BACKENDS.get(device_type)
    return "cpu:gloo" + (f",{device_type}:{accelerator}" if accelerator else "")


def init(device: str = "cpu") -> World:
    """Join the launcher's process group (`group_backends`: gloo for host tensors, nccl for CUDA ones, bound to
    this rank's GPU); idempotent, a no-op alone."""
    w = launched()
    if _local_depth or (w.size <= 1 and not under_torchrun()) or dist.is_initialized():
        return world()
    kind = torch.device(device).type
    if kind == "cuda":
        torch.cuda.set_device(w.local_rank)
        dist.init_process_group(group_backends(kind), timeout=TIMEOUT, device_id=torch.device("cuda", w.local_rank))
    else:
        rehearsed = os.environ.get(REHEARSE)
        spec = group_backends(rehearsed).replace(f":{ACCELERATOR_BACKENDS[rehearsed]}", ":gloo") if rehearsed \
            else group_backends(kind)
        dist.init_process_group(spec, timeout=TIMEOUT)
    return world()


def shutdown() -> None:
    """Wait for every rank, then leave the process group (after training and the evaluation every rank takes part in)."""
    if active():
        gc.collect()  # sharded modules left in reference cycles go before the group they hold: destroying the group
        dist.barrier()  # under a live FSDP module once aborted a rank at exit ("terminate called without an
        dist.destroy_process_group()  # active exception")


@contextlib.contextmanager
def local():
    """Inside: this process acts as a world of one (no collectives), e.g. rank 0 building the zoo."""
    global _local_depth
    _local_depth += 1
    try:
        yield
    finally:
        _local_depth -= 1


@contextlib.contextmanager
def main_first():
    """Rank 0 runs the block alone (as a world of one) first, then the other ranks run it: for work
    that creates shared files (building the zoo), which the others then find in place."""
    if not active():
        yield
        return
    if is_main():
        with local():
            yield
        dist.barrier()  # on failure rank 0 exits instead, and the launcher stops the waiting ranks
    else:
        dist.barrier()
        yield


def shard(n: int, rank: int, size: int) -> tuple[int, int]:
    """The contiguous slice [lo, hi) of n items that `rank` of `size` owns (sizes differ by at most 1)."""
    base, extra = divmod(n, size)
    lo = rank * base + min(rank, extra)
    return lo, lo + base + (rank < extra)
