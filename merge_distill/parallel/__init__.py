"""How the student (and optionally the frozen models) is laid out over the ranks (`Recipe.parallel`), the
collectives the loop itself sends, and how the student's state leaves and re-enters its layout. torchtitan's
shape: `layout` (wrapping and sharding, FSDP decoding, agreed passes), `collectives` (the one place a loop
collective is sent), `state` (whole tensors out of any layout, sharded state dicts as checkpoints' `Stateful`s,
full weights broadcast into a model built on the meta device).

The trainer sees one module, `ModelLogprobs(student)`: its forward is the whole loss-side computation
(backbone and fused output head), so a wrapper's hooks see all of it, and its `decode(fn)` runs the rollouts.

- One process: that module as it is (`parallel` has no effect).
- `ddp`: torch's `DistributedDataParallel` around it. Every rank holds the whole student and its optimizer
  state; gradients are all-reduced (averaged) in buckets during each step's last backward, so each rank's share
  of the loss is scaled by the world size (`gradient_scale`).
- `fsdp`: torch's `fully_shard` (FSDP2) on each decoder layer (the classes the model names in
  `_no_split_modules`, as transformers' own FSDP integration does), then on that module as the root (the
  embeddings, final norm and head). Weights, gradients and AdamW state are sharded over the ranks. A
  `MixedPrecisionPolicy` (compute in the recipe's `dtype`, gradients reduced in float32, float32 master
  weights) replaces autocast; the root casts none of its inputs (the rollouts' masks and log-probs stay as they
  are); gradients are summed over the ranks (divide factor 1: the loss is already the global token mean);
  `placement.offload_optimizer` keeps the shards on the host (`CPUOffloadPolicy`). Frozen teachers and
  references are whole on every rank, unless `placement.shard_frozen` shards them the same way (`shard_frozen`;
  for methods whose frozen models only score sampled tokens, `Method.frozen_shardable`).

Under fsdp every forward of a sharded module is a collective (an all-gather), so every rank must run the same
number of them: the trainer agrees micro-batch counts across ranks (`collectives.agreed_chunks`; a rank with
fewer runs zero-weight ones), each micro-batch is one backbone forward (no per-rank length buckets), and
decoding gathers every shard once before the first token and frees them after the last
(`ModelLogprobs.decode`), so ranks whose responses end at different lengths never wait for each other inside
the decode loop.
"""

from merge_distill.parallel.collectives import agreed_chunks
from merge_distill.parallel.layout import (
    ModelLogprobs,
    decoder_layers,
    decoding,
    gradient_scale,
    is_sharded,
    logprobs_in_passes,
    root_of,
    shard_frozen,
    sharded,
    total_norm,
    wrap_student,
)
from merge_distill.parallel.state import (
    ModelState,
    OptimizerState,
    full_tensors,
    load_full_weights,
    materialize,
    non_persistent_buffers,
)

__all__ = ["ModelLogprobs", "ModelState", "OptimizerState", "agreed_chunks", "decoder_layers", "decoding",
           "full_tensors", "gradient_scale", "is_sharded", "load_full_weights", "logprobs_in_passes", "materialize",
           "non_persistent_buffers", "root_of", "shard_frozen", "sharded", "total_norm", "wrap_student"]
