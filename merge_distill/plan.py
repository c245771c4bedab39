"""Memory plan of a recipe, per device, from each model's config.json alone: `merge-distill plan`.

Bytes per device; P = student parameters; s = shards (the GPU count under `fsdp`, else 1); c = bytes of the
recipe's dtype; rows = the rank's share of a step; T = longest prompt + max_new_tokens (every response is
assumed to run to max_new_tokens). The phases of a step do not coexist; the peak is the largest of:
(A: a LoRA student's adapter parameters, `shapes.Adapter`: r x (in + out) of each linear it wraps; what it
changes is said at each phase below.)

- start-up (cuda): the student read whole in float32 on each rank before it is sharded (`meta_init`: each
  rank's share); with `shard_frozen`, the largest frozen model whole beside its shard at its first scoring.
- every phase: on cuda the CUDA context and, with several GPUs, NCCL's buffers (`CUDA_CONTEXT`, `nccl_bytes`;
  figures from PyTorch's and NCCL's issues, not measured: no GPU has checked them yet); student weights 4P/s
  (float32 master) and AdamW m, v 8P/s (LoRA: the base 4P/s frozen in float32, the adapter 4A/s and AdamW 8A/s);
  each frozen model the method loads, once per path as `frozen.ModelCache` loads it (`Method.frozen_models`; a
  reference that is a full student's initial weights is one more copy) in c bytes (offloaded: the largest, with
  its adapters, while it scores; on another device: none; `shard_frozen`: over the GPUs); adapter experts
  (`teacher: {base, adapter}`) of one base share one copy of it, each adapter beside it in float32 (peft loads
  adapters so); the LoRA student's own base serves its reference and the adapter experts of that base (its
  adapters loaded into the student: `frozen.ModelCache.host`), which then cost their adapters alone (not under
  fsdp over several ranks, where `build.load_student` hosts nothing yet: `student_hosts`); each vLLM engine
  `gpu_memory_utilization` x the device (asleep after sampling: its CUDA graphs, `VLLM_OUTSIDE_POOL`, stay);
  on CPU the process's baseline (Python, torch, tokenizer), and a frozen model stored in the recipe's dtype is
  memory-mapped: its untied embedding resident only at the rows the run looks up (`mapped_embedding_bytes`).
- sample: gradients 4P/s (LoRA: 4A/s; kept from the last update until the next zero_grad); the KV cache of one sampling
  call, rows (or `max_rollout_tokens` // T) x T x layers x kv_heads x head_dim x (K + V bytes; under autocast
  K is float32: the q/k norms and RoPE promote it); the step's logits; the autocast copies of the linear
  weights (ddp below float32; the cache fills in no-grad forwards too; it caches only weights that train, so a
  LoRA student's frozen base is cast a layer at a time) or every module unsharded (fsdp).
- score: gradients; one forward without grad over the rows scored at once (an expert's rows, all rows for
  pi_old when vLLM sampled; at most `max_tokens_per_micro_batch` // T): a layer's working set, the mask, the
  response hidden states, a chunk of logits (`fused.CHUNK_ELEMENTS`).
- update: one micro-batch's saved activations (`Shape.layer_bytes` per token and layer, calibrated exactly on
  the saved tensors; under fsdp in the compute dtype throughout, `layer_bytes`; with `gradient_checkpointing`
  each layer's input, 4 x hidden under autocast, c x hidden under fsdp, and one layer recomputed), the head's
  logit chunk and float32 weight gradient, autocast copies (one layer's when checkpointed) or, under fsdp, two
  layers and the root unsharded with their float32 gradients; gradients only when several micro-batches
  accumulate (zero_grad drops them first). A LoRA student's layers save what `lora_layer_bytes` says (calibrated
  exactly too), its frozen head has no weight gradient, its frozen base's autocast copies are saved for the
  backward instead of cached (the same bytes), under fsdp only the adapter has gradients; on CPU the outputs
  peft's forward frees between saved tensors stay in the heap (`CPU_LORA_SLACK`, measured).
- backward end: gradients and the embedding's dense float32 gradient beside the head's (tied: autograd sums
  the two into a third before accumulating); LoRA: gradients alone.
- all-reduce (ddp, gpus > 1): DDP's gradient buckets, a flat float32 copy of every gradient (4P; LoRA 4A).
- save (cpu): the safetensors serialisation of the weights (a bytes copy, 4P); a LoRA student's checkpoints
  hold its adapter, its final/ the merged model in `export_dtype` (and its cast copy below float32).

On CUDA the peak is the device memory the process holds: what torch allocates (`max_memory_allocated`), a
fragmentation margin of `FRAGMENTATION` x the largest phase's allocations on every phase, the CUDA context,
NCCL's buffers and vLLM's memory; on CPU it is the process's peak resident memory (VmHWM), with glibc's
heap slack on the activations (`CPU_HEAP_SLACK`; `python benchmarks/memory_plan.py` checks it against
real runs). The layout is the recipe's (`parallel`; one device: ddp's); under fsdp with
`placement.offload_optimizer` the sharded weights, gradients and AdamW state live on the host.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from merge_distill.errors import UserError
from merge_distill.fused import CHUNK_ELEMENTS, CHUNK_ELEMENTS_CUDA
from merge_distill.recipe import AdapterModel
from merge_distill.shapes import FOUR_NORMS, QK_NORM, Adapter, Shape, model_shapes

GiB = 2**30
CPU_BASELINE = 350 * 2**20  # Python, torch, transformers, a model class and the trainer, imported (measured)
CPU_PER_VOCAB = 360         # a loaded fast tokenizer, bytes per vocabulary entry (measured: 52 MiB at 151,936)
CPU_HEAP_SLACK = 0.2        # x the activations: resident after a forward is 1.06-1.33x the saved tensors
CPU_LORA_SLACK = 1.5        # x a LoRA student's wrapped linears' float32 outputs over its layers: what peft's
                            # forward frees between the saved tensors (base output, B's, scaled) stays resident
FAULT_AROUND = 64 * 2**10   # Linux's fault_around_bytes: a read of a memory-mapped file maps this much around it
BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}

# What a GPU run holds besides the tensors torch allocates. None of these can be measured on this CPU machine
# (no GPU has been lent to this project's checks yet): each is a figure from the sources named beside it, to be
# checked against `nvidia-smi` / `torch.cuda.mem_get_info` by `benchmarks/gpu_4b_check.py` when a GPU is there.
# - The CUDA context of each process: ~300-400 MB on CUDA >= 11.7 with lazy module loading, which torch 2.x
#   enables (pytorch/pytorch#109888 and #107667, ptrblck: "around 400MB if CUDA >= 11.7"); the cuBLAS/cuDNN
#   handles and the kernels a training step loads lazily come on top: 512 MiB.
CUDA_CONTEXT = 512 * 2**20
# - NCCL's buffers, per communicator: each channel has its own buffer of NCCL_BUFFSIZE (default 4 MiB) per
#   connection for collectives (NVIDIA/nccl#1450, #285); a ring keeps 2 connections per channel whatever the
#   scale, and memory grows linearly with the channels (NVIDIA/nccl#986); NCCL opens up to 32 channels between
#   NVLink-connected H100s (NVIDIA/nccl#1685). The LL128 protocol's buffers of about the same size come beside
#   the Simple protocol's: 4 MiB x 32 channels x 2 connections x 2 protocols.
NCCL_BUFFSIZE, NCCL_CHANNELS, NCCL_RING_CONNECTIONS, NCCL_PROTOCOLS = 4 * 2**20, 32, 2, 2
NCCL_COMMUNICATORS = 1  # the default group: FSDP2's all-gathers and reduce-scatters, DDP's all-reduce, the loop's
# - vLLM's sleep mode frees only what its CuMemAllocator pool holds, the weights and the KV cache (vLLM's
#   sleep-mode docs); CUDA graphs and NCCL buffers stay resident while it sleeps (vllm-project/vllm#45623, which
#   proposed offloading them too, was closed). Graphs "can take additional 1~3 GiB memory per GPU" (vLLM's own
#   capture warning); since vLLM 0.21 their memory is profiled inside gpu_memory_utilization (0.36 GiB estimated
#   for 16 piecewise sizes in one log), so they count beside the engine's share only while it sleeps. The
#   sampler's logits and the profile run's activations are torch allocations freed after sampling. 1 GiB.
VLLM_OUTSIDE_POOL = 2**30
# - The caching allocator's fragmentation: blocks reserved from the driver but split or rounded so that a request
#   does not fit (pytorch/devlogs "When does fragmentation occur in the CUDA caching allocator?"): a margin of
#   10% of the largest phase's allocations, until `max_memory_reserved` on a GPU says otherwise.
FRAGMENTATION = 0.10


def device_memory(device: str) -> int:
    """Bytes of one device: the first GPU's (80 GiB when none is visible), or this machine's memory on cpu."""
    if device == "cpu":
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    import torch

    return torch.cuda.get_device_properties(0).total_memory if torch.cuda.is_available() else 80 * GiB


@dataclass
class Plan:
    device: str
    parallel: str
    gpus: int
    budget_bytes: int
    components: dict[str, int]        # name -> bytes per device
    phases: dict[str, list[str]]      # phase -> the components it holds at once
    suggestions: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def phase_bytes(self) -> dict[str, int]:
        return {p: sum(self.components[c] for c in names) for p, names in self.phases.items()}

    @property
    def peak_phase(self) -> str:
        sizes = self.phase_bytes()
        return max(sizes, key=sizes.get)

    @property
    def peak_bytes(self) -> int:
        return max(self.phase_bytes().values())

    @property
    def fits(self) -> bool:
        return self.peak_bytes <= self.budget_bytes

    def verdict(self) -> str:
        return (f"peak per device: {self.peak_bytes / GiB:.1f} GiB of {self.budget_bytes / GiB:.1f} GiB: "
                + ("fits" if self.fits else "does not fit"))

    def to_json(self) -> dict:
        return {"peak_bytes": self.peak_bytes, "fits": self.fits, "peak_phase": self.peak_phase, **asdict(self),
                "phase_bytes": self.phase_bytes()}


def chunk_bytes(m: Shape, c: int, tokens: int, chunk: int) -> int:
    """One chunk of logits (`fused.token_logprobs`): the projection in c bytes, its float32 copy, logsumexp's."""
    return min(tokens, max(1, chunk // m.vocab)) * m.vocab * (8 + (c if c < 4 else 0))


def scoring_bytes(m: Shape, c: int, rows: int, width: int, response: int, chunk: int) -> int:
    """A forward without grad in c bytes over `rows` x `width` tokens: one layer's working set (the MLP's three
    `[tokens, intermediate]` tensors, the norms' float32 temporaries), the mask (a bool and a c-byte bias), the
    gathered response hidden states (three copies) and one chunk of logits."""
    mask = rows * width * width * (1 + c) if rows > 1 else 0
    return (rows * width * (3 * c * m.intermediate + 16 * m.hidden) + mask + 3 * rows * response * m.hidden * c
            + chunk_bytes(m, c, rows * response, chunk))


def layer_bytes(m: Shape, c: int, width: int, stream: int) -> int:
    """`Shape.layer_bytes` with the residual stream in `stream` bytes: 4 under autocast and in float32; c under
    fsdp's `MixedPrecisionPolicy(param_dtype)`, where the embedding's output and every layer compute in c bytes,
    so the five hidden-sized tensors a layer saves in float32 under autocast (the two norms' inputs, the
    attention and MLP outputs, the residual sum) are c bytes (measured on transformers 5.24's Qwen3 and Llama
    layers: tests/test_plan.py). The norms' float32 internals stay float32 either way."""
    return m.layer_bytes(c, width) - (4 - stream) * 5 * m.hidden


def lora_layer_bytes(m: Shape, c: int, width: int, stream: int, layer_ranks: int) -> int:
    """`layer_bytes` of a LoRA student's decoder layer: its base frozen, an adapter on every linear ('all-linear';
    `layer_ranks`: the sum of r over the layer's wrapped linears). A frozen norm weight's product saves not its
    normalised input (the two norms' in `stream` bytes, Qwen3's q/k norms' in c); each adapter saves its A's
    output (r, in c bytes); under autocast (c < 4, a float32 stream) peft casts o_proj's c-byte input to the
    adapter's float32 and autocast back, a copy its A saves (q in c bytes). Exact on transformers 5.24's Qwen3 and
    Llama layers with peft 0.21 in float32, under autocast and in pure c bytes (tests/test_plan.py)."""
    q, kv = m.heads * m.head_dim, m.kv_heads * m.head_dim
    norms = (4 if m.model_type in FOUR_NORMS else 2) * stream * m.hidden
    qk_norms = c * (q + kv) if m.model_type in QK_NORM else 0
    recast = c * q if c < 4 and stream == 4 else 0
    return layer_bytes(m, c, width, stream) - norms - qk_norms + recast + c * layer_ranks


def update_bytes(m: Shape, c: int, rows: int, width: int, response: int, ckpt: bool, chunk: int,
                 stream: int = 4, lora: Adapter | None = None) -> tuple[int, int]:
    """(activations, output head) of one micro-batch's forward and backward. Activations: every layer's saved
    tensors (`layer_bytes`, or a LoRA student's `lora_layer_bytes`; checkpointed, each layer's input in `stream`
    bytes and one layer recomputed), the final norm and RoPE tables, the bool mask, the response hidden states
    kept for the head, and the backward's gradient temporaries. `stream`: bytes of the residual stream (4, or c
    under fsdp: `layer_bytes`). Head: its float32 weight gradient, a chunk of logits, and with c < 4 the
    weight's c-byte cast and the chunk gradient's product before its float32 copy; a LoRA student's head is
    frozen: a chunk of logits and the weight's cast, no gradient."""
    tokens, pad = rows * width, width if rows > 1 else 0
    one = (layer_bytes(m, c, pad, stream) if lora is None
           else lora_layer_bytes(m, c, pad, stream, lora.layer_ranks))
    layers = m.layers * stream * m.hidden + one if ckpt else m.layers * one
    per_token = layers + 16 * m.hidden + 8 * m.head_dim + 12 + 2 * c * m.intermediate
    act = tokens * per_token + rows * response * stream * m.hidden + rows * pad * pad
    vh, n = m.vocab * m.hidden, min(rows * response, max(1, chunk // m.vocab)) * m.vocab
    if lora is not None:  # no weight gradient: the forward's chunk (and the weight's cast) is the most
        return act, 8 * n if c == 4 else c * vh + (8 + c) * n
    if c == 4:  # forward: logits and logsumexp's temporary; backward: the weight gradient and one chunk
        return act, max(8 * n, 4 * vh + 4 * n)
    # + the weight's cast; backward: the product dz^T h in c bytes and its float32 copy beside the gradient
    return act, max(2 * vh + (8 + c) * n, 6 * vh + (4 + c) * n, 12 * vh + c * n)


def stored_dtype(folder: str) -> str | None:
    """The dtype a model folder's weights are stored in, as its config.json says (`dtype`, or `torch_dtype`)."""
    config = Path(folder) / "config.json"
    if not config.is_file():
        return None
    raw = json.loads(config.read_text())
    return raw.get("dtype") or raw.get("torch_dtype")


def mapped_embedding_bytes(m: Shape, c: int, lookups: int) -> int:
    """Resident bytes of an input embedding memory-mapped from its file after `lookups` row reads. Each read maps
    the `FAULT_AROUND` window around its row; of W windows, n reads of uniformly random ids map W (1 - (1 - 1/W)^n)
    on average, the most any n reads can (real text repeats its frequent tokens); a long run maps them all."""
    total = m.vocab * m.hidden * c
    windows = max(1, total // FAULT_AROUND)
    return int(min(total, total * (1 - (1 - 1 / windows) ** lookups)))


def frozen_bytes(m: Shape, folder: str, dtype: str, device: str, lookups: int) -> tuple[str, int]:
    """(label suffix, bytes) of a model held frozen in `dtype`: whole; on CPU, where its files are already in that
    dtype, transformers memory-maps them and an untied input embedding is resident only where rows were looked
    up (`lookups`, at most every token of the run's rows: `mapped_embedding_bytes`)."""
    c = BYTES[dtype]
    if device != "cpu" or m.tied or stored_dtype(folder) != dtype:
        return "", m.params() * c
    embedding = m.vocab * m.hidden * c
    return (", memory-mapped: its embedding's rows as read",
            m.params() * c - embedding + mapped_embedding_bytes(m, c, lookups))


def student_hosts(recipe, parallel: str, gpus: int) -> bool:
    """Whether the LoRA student's base serves the frozen models of that base (its reference, adapter teachers of
    it) with no frozen copy, as `build.load_student` hosts it: one process or ddp; not under fsdp over several
    ranks (its host is None there)."""
    return recipe.student.lora is not None and not (parallel == "fsdp" and gpus > 1)


def nccl_bytes(communicators: int = NCCL_COMMUNICATORS) -> int:
    """NCCL's buffers on each GPU: NCCL_BUFFSIZE x channels x a ring's connections x protocols, per communicator."""
    return communicators * NCCL_BUFFSIZE * NCCL_CHANNELS * NCCL_RING_CONNECTIONS * NCCL_PROTOCOLS


def _rows(n: int, width: int) -> str:
    return f"{n} row{'s' * (n != 1)} x {width} tokens"


def plan(recipe, *, gpus: int = 1, gpu_memory_bytes: int, device: str | None = None,
         assume_config: str | None = None, prompt_tokens: int = 512, suggest: bool = True,
         checkpoints: bool = True, meta_init: bool | None = None) -> Plan:
    """The memory plan of `recipe` (model paths resolved) on `gpus` devices of `gpu_memory_bytes` each, in the
    recipe's layout (`parallel`, `placement.offload_optimizer`). `checkpoints` False: a run that writes none (no
    save phase; `benchmarks/memory_plan.py`). `meta_init`: models are built on the meta device and receive only
    their shard, so the start-up transient is each rank's share instead of every model whole (False: the whole
    model on each rank, then sharded). Default: as the run loads, on the meta device under fsdp
    (`models.load_sharded`: rank 0 alone reads the files, into host memory)."""
    from merge_distill.methods import trains

    options = dict(gpus=gpus, gpu_memory_bytes=gpu_memory_bytes, device=device, assume_config=assume_config,
                   prompt_tokens=prompt_tokens, checkpoints=checkpoints, meta_init=meta_init)
    device = (device or recipe.device).split(":")[0]
    parallel = recipe.parallel if gpus > 1 else "ddp"  # one process: the student as it is
    if meta_init is None:
        meta_init = parallel == "fsdp"
    if device not in ("cpu", "cuda"):
        raise UserError(f"--device {device}: expected cuda or cpu")
    if not trains(recipe):
        raise UserError(f"method {recipe.method.name} combines weights without training: no training memory to plan")
    notes: list[str] = []
    lora = recipe.student.lora
    hosts = student_hosts(recipe, parallel, gpus)
    m, frozen = model_shapes(recipe, assume_config, notes, student_hosts=hosts)
    cfg, budget = recipe.rollout, recipe.budget
    c, chunk = BYTES[recipe.dtype], CHUNK_ELEMENTS_CUDA if device == "cuda" else CHUNK_ELEMENTS
    P, width, new = m.params(), prompt_tokens + cfg.max_new_tokens, cfg.max_new_tokens
    adapter = Adapter.of(m, lora.r, lora.target_modules) if lora else None
    T = adapter.params if lora else P  # parameters that train: a LoRA student's adapter alone
    S = P + T if lora else P  # the student's parameters (a LoRA student's: its base's and its adapter's)
    s = gpus if parallel == "fsdp" else 1  # shards of the student's weights, gradients and optimizer state
    rows = math.ceil(cfg.prompts_per_step / gpus) * cfg.rollouts_per_prompt
    lookups = recipe.schedule.steps * rows * width  # token ids the run's embeddings look up, at most
    comp: dict[str, int] = {}
    outside_allocator: set[str] = set()  # what the fragmentation margin is not a fraction of

    def rows_within(tokens: int | None) -> int:
        return rows if tokens is None else max(1, min(rows, tokens // width))

    def add(name: str, nbytes: float, allocator: bool = True) -> str:
        comp[name] = int(nbytes)
        if not allocator:
            outside_allocator.add(name)
        return name

    fixed = []  # held from start-up to the end, whatever the phase
    if device == "cpu":
        fixed.append(add("process baseline (python, torch, tokenizer)", CPU_BASELINE + CPU_PER_VOCAB * m.vocab))
    else:
        fixed.append(add("CUDA context (per process; not measured here)", CUDA_CONTEXT, allocator=False))
        if gpus > 1:
            fixed.append(add(f"NCCL buffers ({NCCL_COMMUNICATORS} communicator: {NCCL_BUFFSIZE >> 20} MiB x "
                             f"{NCCL_CHANNELS} channels x {NCCL_RING_CONNECTIONS} x {NCCL_PROTOCOLS}; not measured "
                             "here)", nccl_bytes(), allocator=False))
    if parallel == "fsdp" and recipe.placement.offload_optimizer and device != "cpu":  # shards on the host
        student, grads = [], add("gradients (fp32): on the host (offload_optimizer)", 0)
    elif lora:  # the base frozen in float32 (memory-mapped on CPU like a frozen model), the adapter trains
        label, base = frozen_bytes(m, recipe.student.path, "float32", device, lookups)
        student = [add(f"student base weights (fp32, frozen{label})", base / s),
                   add(f"LoRA adapter (fp32 master; r {lora.r}, {T:,} parameters)", 4 * T / s),
                   add("AdamW m + v (fp32)", 8 * T / s)]
        grads = add("gradients (fp32)", 4 * T / s)
    else:
        student = [add("student weights (fp32 master)", 4 * P / s), add("AdamW m + v (fp32)", 8 * P / s)]
        grads = add("gradients (fp32)", 4 * P / s)
    vllm_rollout = recipe.backend.rollout == "vllm"
    engine = recipe.backend.gpu_memory_utilization * gpu_memory_bytes
    asleep = recipe.backend.sleep_level > 0  # the engine frees its memory after sampling (vLLM's sleep mode)
    engine_label = "vLLM engine: student rollouts" + (" (asleep after sampling)" if asleep else "")
    engine_all, engine_sampling, engine_asleep = [], [], []
    if vllm_rollout:
        engine_sampling = [add(engine_label, engine, allocator=False)]
        if not asleep:
            engine_all = engine_sampling
        elif device == "cuda":
            engine_asleep = [add("vLLM outside its sleep pool: CUDA graphs (not measured here)", VLLM_OUTSIDE_POOL,
                                 allocator=False)]
    resident = fixed + student + engine_all
    here = (recipe.placement.frozen_device or device).split(":")[0] == device or device == "cpu"
    shards = gpus if recipe.placement.shard_frozen else 1  # each frozen model sharded over the ranks
    copies_of = [f for f in frozen.values() if not f.hosted]  # frozen copies of their own (hosted: the student's)
    adapter_bases = [e.teacher.base for e in recipe.experts if isinstance(e.teacher, AdapterModel)]
    if shards > 1 and adapter_bases:  # as `frozen.ModelCache.hosts_adapters_of` refuses them
        raise UserError(f"placement.shard_frozen: adapter experts of base '{adapter_bases[0]}' cannot be scored "
                        "sharded over the ranks yet: load them whole")
    groups = []  # each frozen copy with the adapters loaded into it: {component: bytes}, visiting together
    for f in copies_of if here else []:  # the recipe's dtype, adapters float32 (peft loads them so)
        label, base = frozen_bytes(f.shape, f.path, recipe.dtype, device, lookups)
        groups.append({f"frozen {f.label}{label} ({recipe.dtype})": base / shards}
                      | {f"frozen adapter of {name} (fp32)": 4 * a.params for name, a in f.adapters.values()})
    # the LoRA student's base serves these with its own weights, wherever the frozen models are placed
    in_student = {f"frozen adapter of {name} (fp32, loaded into the student)": 4 * a.params
                  for f in frozen.values() if f.hosted for name, a in f.adapters.values()}
    visiting, frozen_resident = [], [add(label, b) for label, b in in_student.items()]
    if recipe.placement.offload and device != "cpu" and groups:
        visiting = [add("frozen model visiting from the host (offload)", max(sum(g.values()) for g in groups))]
    else:
        frozen_resident += [add(label, b) for g in groups for label, b in g.items()]
    resident += frozen_resident
    autocast, copies = c < 4 and parallel == "ddp", m.layers * m.layer_linear_params() * c
    phases: dict[str, list[str]] = {}

    if device == "cuda":  # models are read whole on each rank, then sharded (meta_init: each rank its share)
        share = " (meta device: this rank's share)" if meta_init else " before sharding"
        phases["start-up"] = fixed + [add(f"start-up: the student (fp32){share}",
                                          4 * S / (s if meta_init else 1))]
        if groups and not visiting and shards > 1:  # a frozen model loads whole at its first scoring, then shards
            whole = max(f.shape.params() for f in copies_of) * c
            phases["frozen model loading"] = (fixed + student[:1] + engine_all + engine_asleep + frozen_resident + [
                add(f"start-up: the largest frozen model ({recipe.dtype}){share}, beside its shard",
                    whole / shards if meta_init else whole * (1 - 1 / shards))])

    sample = [grads] + engine_sampling * (vllm_rollout and asleep)  # vLLM: the KV cache is inside
    if recipe.backend.rollout == "paged":  # merge_distill.paged: the engine computes in the weights' float32
        tokens = rows * width if budget.max_rollout_tokens is None else max(width, min(rows * width,
                                                                                 budget.max_rollout_tokens))
        forward = max(rows, 256)  # tokens per forward (PagedConfig.max_batch_tokens)
        sample += [add(f"paged KV cache ({tokens:,} tokens, float32)",
                       tokens * m.layers * m.kv_heads * m.head_dim * 4 * 2),
                   add(f"paged attention mask ({forward} x {tokens + forward:,}, float32)",
                       forward * (tokens + forward) * 4),
                   add("sampling logits and prefill chunk", rows * m.vocab * 16 + scoring_bytes(m, 4, 1, forward, 1,
                                                                                              chunk))]
    elif not vllm_rollout:
        n = rows_within(budget.max_rollout_tokens)
        kv = n * width * m.layers * m.kv_heads * m.head_dim * ((4 if autocast else c) + c)
        sample += [add(f"KV cache ({_rows(n, width)})", kv), add("sampling logits and prefill",
                   n * m.vocab * 16 + scoring_bytes(m, c, n, prompt_tokens, 1, chunk))]
        if autocast and lora:  # autocast caches casts of weights that train: a frozen base's are cast per use
            sample.append(add(f"{recipe.dtype} autocast copies of one layer (frozen base: not cached)",
                              copies / m.layers))
        elif autocast or parallel == "fsdp":
            sample.append(add(f"{recipe.dtype} autocast copies of the weights", copies) if autocast
                          else add(f"fsdp: every module unsharded ({recipe.dtype})", S * c))
    phases["sample"] = resident + sample
    resident += engine_asleep  # from here on the engine sleeps: what it keeps outside its pool

    share = max(e.weight for e in recipe.experts) / sum(e.weight for e in recipe.experts)
    n = min(rows if vllm_rollout else math.ceil(rows * share), rows_within(budget.max_tokens_per_micro_batch))
    scorers = [f.shape for f in frozen.values() if f.hosted or here] + [m] * vllm_rollout  # pi_old: the student
    score = [add(f"scoring working set ({_rows(n, width)})",
                 max(scoring_bytes(sh, c, n, width, new, chunk) for sh in scorers))] if scorers else []
    phases["score"] = resident + [grads] + visiting + score

    mb = min(budget.micro_batch_size or rows, rows_within(budget.max_tokens_per_micro_batch), rows)
    ckpt = budget.gradient_checkpointing
    stream = c if parallel == "fsdp" else 4  # fsdp computes in the recipe's dtype throughout, autocast does not
    act, head = update_bytes(m, c, mb, width, new, ckpt, chunk, stream, adapter)
    update = [add(f"activations ({_rows(mb, width)}{', checkpointed' if ckpt else ''}"
                  f"{f', {recipe.dtype} residual stream' if stream < 4 else ''})", act),
              add("output head: logit chunk and gradient", head)] + [grads] * (mb < rows)
    if device == "cpu":  # glibc's heap keeps freed blocks; with several micro-batches (of other widths, which
        # do not fit the freed blocks) also the previous one's (measured: benchmarks/memory_plan.py); a LoRA
        # student's adapters free a [tokens, out] float32 output or two per wrapped linear between saved tensors
        freed = CPU_LORA_SLACK * mb * width * m.layers * adapter.layer_outputs * 4 if lora else 0
        update.append(add("heap slack (glibc)", act * (CPU_HEAP_SLACK + (mb < rows)) + freed * (1 + (mb < rows))))
    if autocast:
        update.append(add(f"{recipe.dtype} autocast copies of one layer (recomputed)", copies / m.layers) if ckpt
                      else add(f"{recipe.dtype} autocast copies of the weights", copies))
    elif parallel == "fsdp":  # a LoRA student: its adapter's gradients alone
        in_layer = T // m.layers if lora else 0  # one layer's adapter
        unsharded = 2 * (m.layer_params() + in_layer) + m.root_params()
        update.append(add("fsdp: unsharded layers and root, their fp32 gradients",
                          unsharded * c + (2 * in_layer if lora else unsharded) * 4))
    phases["update"] = resident + visiting + update
    phases["backward end"] = resident + visiting + [grads] + ([] if lora else [add(
        "embedding and head gradients, before accumulation", (8 if m.tied else 4) * m.vocab * m.hidden)])
    if parallel == "ddp" and gpus > 1:
        phases["all-reduce"] = resident + [grads, add("all-reduce buffer (flat fp32 gradients)", 4 * T)]
    if device == "cpu" and checkpoints and lora:  # checkpoints hold the adapter; final/ the merged model, cast
        e = BYTES[recipe.export_dtype or recipe.dtype]
        phases["save"] = resident + [grads, add("final/: the merged model's serialisation (safetensors)",
                                                P * e * (2 if e < 4 else 1))]
    elif device == "cpu" and checkpoints:
        phases["save"] = resident + [grads, add("checkpoint serialisation (safetensors)", 4 * P)]
    if device == "cuda":  # the caching allocator's fragmentation, over what it allocates at its peak
        allocated = max(sum(comp[x] for x in names if x not in outside_allocator) for names in phases.values())
        margin = add(f"caching allocator fragmentation ({FRAGMENTATION:.0%} of its peak; not measured here)",
                     FRAGMENTATION * allocated)
        phases = {phase: names + [margin] for phase, names in phases.items()}

    result = Plan(device, parallel, gpus, int(gpu_memory_bytes), comp, phases, notes=notes)
    if lora:
        result.notes.append(f"LoRA student: its base's {P:,} parameters frozen in float32, an adapter of {T:,} "
                            f"(r {lora.r} on {lora.target_modules}) trains: gradients and AdamW state for those alone")
    for f in frozen.values():
        if f.hosted:
            result.notes.append(f"{', '.join(f.serves)}: the LoRA student's own base (adapters switched on and off), "
                                "no frozen copy")
        elif lora and Path(f.path).resolve() == Path(recipe.student.path).resolve():
            result.notes.append(f"{', '.join(f.serves)}: one frozen copy of the student's base (under fsdp over "
                                "several ranks the LoRA student serves no frozen model yet: build.load_student)")
    if not here:
        result.notes.append(f"frozen models on {recipe.placement.frozen_device}: not counted on {device}")
    if vllm_rollout:
        result.notes.append(f"the vLLM sampler takes gpu_memory_utilization {recipe.backend.gpu_memory_utilization} "
                            "of the device (its weights and KV cache)"
                            + (" while it samples; sleep level " f"{recipe.backend.sleep_level} frees it for scoring and "
                               "the update" if asleep else ", in every phase (sleep_level 0)")
                            + ("; too small for the student's weights" if m.params() * c > engine else ""))
    if device == "cuda":
        result.notes.append("the CUDA context, NCCL's buffers, vLLM's memory outside its sleep pool and the "
                            "fragmentation margin are figures from PyTorch's, NCCL's and vLLM's documentation and "
                            "issues (merge_distill/plan.py), not measured: no GPU has checked them yet")
    if suggest and not result.fits:
        result.suggestions = suggestions(recipe, options, rows, width)
    return result


def suggestions(recipe, options: dict, rows: int, width: int) -> list[str]:
    """Settings that make the plan fit: each that does alone, else the changes that lower the peak most, one
    after the other, until it fits ([] when nothing tried does)."""
    from merge_distill.methods import method_of

    budget, vllm = recipe.budget, recipe.backend.rollout == "vllm"

    def peak(changes) -> tuple[int, bool]:
        r, opts = recipe, dict(options, suggest=False)
        for where, kw in changes:
            if where == "option":
                opts.update(kw)
            elif where == "recipe":
                r = r.model_copy(update=kw)
            else:
                r = r.model_copy(update={where: getattr(r, where).model_copy(update=kw)})
        p = plan(r, **opts)
        return p.peak_bytes, p.fits

    def tokens(key: str):  # the most rows that fit (a power of two, x width tokens), else one row
        def change(done):
            n = next((2**k for k in range(int(math.log2(rows)), 0, -1)
                      if peak(done + [("budget", {key: 2**k * width})])[1]), 1)
            return f"budget.{key}={n * width}", ("budget", {key: n * width})
        return change

    fixed = {"budget.gradient_checkpointing=true": (not budget.gradient_checkpointing, "budget",
                                                   {"gradient_checkpointing": True}),
             "parallel=fsdp": (recipe.parallel == "ddp" and options["gpus"] > 1, "recipe", {"parallel": "fsdp"}),
             "placement.shard_frozen=true": (
                 not recipe.placement.shard_frozen and options["gpus"] > 1 and method_of(recipe).frozen_shardable
                 and not recipe.placement.offload and not any(isinstance(e.teacher, AdapterModel)
                                                              for e in recipe.experts), "placement",
                 {"shard_frozen": True}),
             "parallel=fsdp + placement.offload_optimizer=true": (
                 not recipe.placement.offload_optimizer and options["gpus"] > 1 and (options["device"] or recipe.device)
                 != "cpu", "recipe",
                 {"parallel": "fsdp", "placement": recipe.placement.model_copy(update={"offload_optimizer": True})}),
             "placement.offload=true": (not recipe.placement.offload, "placement", {"offload": True}),
             f"--gpus {2 * options['gpus']}": (True, "option", {"gpus": 2 * options["gpus"]})}
    candidates = [(lambda done, k=k, v=v: (k, v[1:])) for k, v in fixed.items() if v[0]]
    candidates[1:1] = [tokens("max_tokens_per_micro_batch")] + [tokens("max_rollout_tokens")] * (not vllm)
    alone = [label for label, change in (make([]) for make in candidates) if peak([change])[1]]
    if alone:
        return [x for x in alone if not (x.startswith("parallel=fsdp +") and "parallel=fsdp" in alone)]
    labels, done, now = [], [], peak([])[0]
    while candidates:
        make, (label, change) = min(((mk, mk(done)) for mk in candidates), key=lambda x: peak(done + [x[1][1]])[0])
        size, fits = peak(done + [change])
        if size >= now:
            return []
        candidates.remove(make)
        labels, done, now = labels + [label], done + [change], size
        if fits:
            return [" + ".join(labels)]
    return []
