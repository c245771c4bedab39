"""Programs the tests run on several gloo ranks under torchrun (`python tests/on_ranks.py NAME OUT_DIR`), each
building the process group as a CUDA run builds it (`distributed.REHEARSE`, set by the tests' launcher). Rank 0
writes what the test checks to OUT_DIR; the tests compare it against one process and against hand computations.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

from merge_distill import distributed
from merge_distill.toyworld.models import tiny_qwen3
from merge_distill.parallel import collectives, layout
from merge_distill.sampling import Rollouts, left_pad

VOCAB, EOS, PAD = 61, 1, 0
LONG_LENGTHS = [257, 258, 259, 263, 271, 284, 299, 300]  # past bf16's exact integers (256), all distinguishable


def long_model() -> torch.nn.Module:
    """A random-weight two-layer Qwen3, the same on every rank (seeded)."""
    return tiny_qwen3(VOCAB, hidden=32, layers=2, heads=2, seed=7, eos_token_id=EOS, pad_token_id=PAD)


def long_rollouts() -> Rollouts:
    """Rows whose responses are `LONG_LENGTHS` tokens, EOS last, pad after; prompts of 2-5 tokens."""
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(2, VOCAB, (2 + r % 4,), generator=g).tolist() for r in range(len(LONG_LENGTHS))]
    prompt_ids, prompt_mask = left_pad(prompts, PAD)
    width = max(LONG_LENGTHS)
    response_ids = torch.full((len(prompts), width), PAD)
    for r, n in enumerate(LONG_LENGTHS):
        response_ids[r, : n - 1] = torch.randint(2, VOCAB, (n - 1,), generator=g)
        response_ids[r, n - 1] = EOS
    mask = torch.arange(width)[None, :] < torch.tensor(LONG_LENGTHS)[:, None]
    return Rollouts(prompt_ids, prompt_mask, response_ids, mask, torch.zeros(mask.shape), torch.zeros(len(prompts), dtype=torch.bool))


def bf16_long_rows(out: Path) -> None:
    """The student sharded (fsdp, bf16 compute) scores rows of 257-300 tokens, each rank its share; then a
    training backward and an optimizer step on the same rows. Rank 0 writes the gathered log-probs and the
    lengths each rank counted."""
    world = distributed.init("cpu")
    recipe = SimpleNamespace(device="cpu", parallel="fsdp", dtype="bfloat16",
                             student=SimpleNamespace(path="random two-layer Qwen3"),
                             placement=SimpleNamespace(offload_optimizer=False))
    wrapped = layout.wrap_student(long_model(), recipe, "cpu")
    rollouts = long_rollouts()
    rows = list(range(*distributed.shard(len(LONG_LENGTHS), world.rank, world.size)))
    mine = rollouts.select(rows)
    # the same rows with a float mask, as an engine may build one: the root must not round it to bf16
    floats = Rollouts(**{**vars(mine), "response_mask": mine.response_mask.float()})
    with torch.no_grad():
        lp, lp_float_mask = wrapped(mine, 1.0).float(), wrapped(floats, 1.0).float()
    loss = -(wrapped(mine, 1.0) * mine.response_mask).sum() / int(collectives.all_reduce_sum(mine.lengths.sum()))
    loss.backward()
    parts = collectives.gather({"rows": rows, "logprobs": lp.tolist(), "logprobs_float_mask": lp_float_mask.tolist(),
                                "lengths": mine.lengths.tolist()})
    if world.main:
        (out / "result.json").write_text(json.dumps(parts))


def offload_step(out: Path) -> None:
    """One fsdp training step with the shards, gradients and AdamW state on the host (`offload_optimizer`), and the
    same step with them beside the compute: gradient clipping over the ranks' host shards, the optimizer step and
    the gathered optimizer state must agree. Rank 0 writes both runs' full weights and AdamW moments."""
    from merge_distill.parallel import state

    world = distributed.init("cpu")
    rollouts = long_rollouts()
    mine = rollouts.select(list(range(*distributed.shard(len(LONG_LENGTHS), world.rank, world.size))))
    results = {}
    for offload in (False, True):
        recipe = SimpleNamespace(device="cpu", parallel="fsdp", dtype="float32",
                                 student=SimpleNamespace(path="random two-layer Qwen3"),
                                 placement=SimpleNamespace(offload_optimizer=offload))
        model = long_model()
        wrapped = layout.wrap_student(model, recipe, "cpu")
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        total = int(collectives.all_reduce_sum(mine.lengths.sum()))
        (-(wrapped(mine, 1.0) * mine.response_mask).sum() / total).backward()
        norm = layout.total_norm(torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05))
        optimizer.step()
        weights = {k: v.full_tensor() for k, v in model.state_dict().items()}
        moments = state.OptimizerState(wrapped, optimizer).state_dict()["state"]  # each rank's shards, by name
        results[offload] = {"norm": float(norm), "device": str(next(model.parameters()).device),
                            "weights": {k: v.tolist() for k, v in weights.items()},
                            "exp_avg": {k: v["exp_avg"].full_tensor().tolist() for k, v in moments.items()}}
    if world.main:
        (out / "result.json").write_text(json.dumps({"plain": results[False], "offload": results[True]}))


def group_rehearsal(out: Path) -> None:
    """The run's process group (`distributed.init`, rehearsed as on CUDA) carries every loop collective; a group
    keyed to the accelerator alone (what `init_process_group("nccl")` gives) refuses a host tensor."""
    import torch.distributed as dist

    world = distributed.init("cpu")
    result = {"backend": str(dist.get_backend_config())}
    accelerator_only = dist.new_group(backend="cuda:gloo")
    try:
        dist.all_reduce(torch.ones(1), group=accelerator_only)
        result["accelerator_only_error"] = ""
    except RuntimeError as e:
        result["accelerator_only_error"] = str(e)
    result.update(sum=int(collectives.all_reduce_sum(torch.tensor(world.rank + 1))),
                  max=int(collectives.all_reduce_max(torch.tensor(world.rank + 1))),
                  any=collectives.any_rank(world.rank == 1),
                  chunks=collectives.agreed_chunks([[0]] * (world.rank + 1)),
                  gathered=collectives.gather(world.rank),
                  broadcast=collectives.broadcast(f"from rank {world.rank}"))
    collectives.barrier()
    if world.main:
        (out / "result.json").write_text(json.dumps(result))


if __name__ == "__main__":
    {"bf16_long_rows": bf16_long_rows, "group_rehearsal": group_rehearsal, "offload_step": offload_step}[sys.argv[1]](Path(sys.argv[2]))
    distributed.shutdown()  # after the program's sharded modules are gone (distributed.shutdown collects them)
