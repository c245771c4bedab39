"""vLLM backend (optional extra: `pip install 'merge-distill[vllm]'`, CUDA only): student rollouts, returning
the same tensors as the transformers backend. Teachers and references score through the trainer's own chunked
scorer (`merge_distill.scoring`), not through vLLM.

Written against the source of vLLM 0.33.0 (`vllm-0.33.0-cp38-abi3-manylinux_2_28_x86_64.whl`); the calls:

- `vllm.LLM(model, tokenizer, dtype, seed, gpu_memory_utilization, logprobs_mode="processed_logprobs",
  max_model_len)`. `processed_logprobs` makes the sampled token's log-prob that of the distribution sampled
  from (after temperature), as `merge_distill.sampling` records it for the importance ratio.
- `LLM.generate([TokensPrompt(prompt_token_ids=...)], [SamplingParams(...) per row], use_tqdm=False)`:
  outputs come back in input order. Rollouts: `n=1, seed=<row's seed>, temperature, top_p=1, top_k=0,
  max_tokens, logprobs=0` (0 = only the sampled token's log-prob), `ignore_eos=True,
  stop_token_ids=[eos]` (only our EOS stops, as in the transformers backend, not also the extra EOS ids
  of the model's generation_config), `detokenize=False`, `flat_logprobs=True`. A stop token is kept as
  the last element of `CompletionOutput.token_ids`.
- Log-probs come as `list[dict[int, Logprob]]` or, with `flat_logprobs=True`, as `FlatLogprobs`
  (fields `start_indices, end_indices, token_ids, logprobs, ...`); both are read here.
- Weight sync (colocated, one GPU, tensor_parallel_size 1): `LLM.collective_rpc("reload_weights",
  kwargs={"weights_iterator": ..., "is_checkpoint_format": True})` (the GPU worker's in-place reload
  through the model's own `load_weights`, so HF parameter names work), then `LLM.reset_prefix_cache()`
  so no KV block computed with the old weights is reused. Passing tensors through `collective_rpc`
  requires the engine core in this process: `VLLM_ENABLE_V1_MULTIPROCESSING=0` is set before the first
  engine is built (vLLM caches its environment after that, so it holds for every engine in the process).

What is exercised by tests (tests/test_vllm_adapter.py, on CPU, without vLLM installed): the pure helpers
`token_logprobs`, `rollouts_from_outputs` (padding, masks, EOS, truncation, log-prob selection, both log-prob
layouts) on fake objects with the attribute names of vLLM 0.33's `RequestOutput`/`CompletionOutput`/`Logprob`/
`FlatLogprobs`, and the missing-vLLM error. What is NOT exercised anywhere: everything that touches a real
engine (construction, `generate`, `collective_rpc("reload_weights")`, `reset_prefix_cache`). No real vLLM has
run this code.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from merge_distill.errors import UserError
from merge_distill.sampling import Rollouts, left_pad

Tensor = torch.Tensor
VLLM_VERSION = "0.33"  # the API this adapter was written against (see pyproject's `vllm` extra)


def import_vllm():
    """The vllm module, imported on first use; a one-line UserError when it is not installed."""
    try:
        import vllm
    except ImportError as e:
        raise UserError(f"backend 'vllm' needs vLLM {VLLM_VERSION} (CUDA only): pip install 'merge-distill[vllm]' "
                        f"({type(e).__name__}: {e})") from None
    return vllm


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


def rollouts_from_outputs(prompts: Sequence[Sequence[int]], outputs: Sequence[Any], *, eos_token_id: int,
                          pad_token_id: int) -> Rollouts:
    """`Rollouts` from `LLM.generate` outputs (one `RequestOutput` per prompt, `n=1`, `logprobs=0`).

    Prompts left-padded, responses right-padded with `pad_token_id`; the mask covers every generated token,
    EOS included; `truncated` = the response does not end with EOS (it hit max_tokens or max_model_len).
    """
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
        truncated.append(not ids or ids[-1] != eos_token_id)
    prompt_ids, prompt_mask = left_pad([list(p) for p in prompts], pad_token_id)
    width = max(1, max(len(r) for r in responses))
    response_ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    response_mask = torch.zeros((len(prompts), width))
    sampler_logprobs = torch.zeros((len(prompts), width))
    for b, (ids, lp) in enumerate(zip(responses, lps)):
        n = len(ids)
        response_ids[b, :n] = torch.tensor(ids, dtype=torch.long)
        response_mask[b, :n] = 1.0
        sampler_logprobs[b, :n] = torch.tensor(lp)
    return Rollouts(prompt_ids=prompt_ids, prompt_mask=prompt_mask, response_ids=response_ids,
                    response_mask=response_mask, sampler_logprobs=sampler_logprobs,
                    truncated=torch.tensor(truncated, dtype=torch.bool))


# ------------------------------------------------------------------------- engines (not exercised)


def _engine(model: str, *, dtype: str, seed: int, gpu_memory_utilization: float, max_model_len: int | None,
            **kwargs):
    vllm = import_vllm()
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # see the module docstring (weight sync)
    extra = {"max_model_len": max_model_len} if max_model_len else {}
    return vllm.LLM(model=str(model), tokenizer=str(model), dtype=dtype, seed=seed,
                    gpu_memory_utilization=gpu_memory_utilization, logprobs_mode="processed_logprobs",
                    **extra, **kwargs)


class VLLMSampler:
    """Student rollouts from a vLLM engine that holds a copy of the student's weights (`engines.Sampler`).
    Its log-probs come from other kernels in bf16: the trainer recomputes pi_old for the advantage."""

    trainer_logprobs = False

    def __init__(self, model: str, *, dtype: str = "bfloat16", seed: int = 0, gpu_memory_utilization: float = 0.5,
                 max_model_len: int | None = None, **llm_kwargs):
        self.llm = _engine(model, dtype=dtype, seed=seed, gpu_memory_utilization=gpu_memory_utilization,
                           max_model_len=max_model_len, **llm_kwargs)

    def sample(self, prompts: list[list[int]], *, max_new_tokens: int, temperature: float, eos_token_id: int,
               pad_token_id: int, seeds: list[int]) -> Rollouts:
        """One response per prompt (repeat prompts for several rollouts), row b sampled with seeds[b] (e.g.
        `merge_distill.sampling.row_seeds`), so a row's response does not depend on the rest of the batch
        (vLLM keeps one generator per seeded request). temperature 0 is greedy. Tensors are on the CPU.
        The draws differ from the transformers backend's for the same seed; the distribution is the same."""
        if len(seeds) != len(prompts):
            raise ValueError(f"{len(seeds)} seeds for {len(prompts)} prompts; give one seed per row")
        vllm = import_vllm()
        params = [vllm.SamplingParams(n=1, seed=int(s), temperature=temperature, top_p=1.0, top_k=0,
                                      max_tokens=max_new_tokens, logprobs=0, ignore_eos=True,
                                      stop_token_ids=[eos_token_id], detokenize=False, flat_logprobs=True)
                  for s in seeds]
        requests = [vllm.TokensPrompt(prompt_token_ids=list(p)) for p in prompts]
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        return rollouts_from_outputs(prompts, outputs, eos_token_id=eos_token_id, pad_token_id=pad_token_id)

    @torch.no_grad()
    def sync_weights(self, model: torch.nn.Module) -> None:
        """Load the trainer's current weights (HF names) into the engine, in place; call after each update."""
        from merge_distill.parallel import full_tensors

        weights = full_tensors(model)  # one tensor at a time; under fsdp each gathered as the engine takes it
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights, "is_checkpoint_format": True})
        self.llm.reset_prefix_cache()
