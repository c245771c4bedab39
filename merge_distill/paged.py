"""Student rollouts by continuous batching over a paged KV cache: transformers' own engine
(`ContinuousBatchingManager`, transformers 5.24), with our token choice.

The engine keeps a pool of fixed-size KV pages. A row takes pages as its response grows and frees them when it
ends; a row still waiting takes them at once, so every forward carries only rows that are still generating,
and each forward packs their tokens into one sequence (no padding). The padded sampler
(`merge_distill.sampling.sample`) instead keeps every row in the batch until the longest one ends.

The rollouts are those of `sampling.sample`, in the same layout: prompts left-padded, responses right-padded, the
stop token (whichever of the EOS ids) inside the response mask, the log-prob of each sampled token at the sampling
temperature, truncation flags. So is the randomness: per row, never the global RNG. The engine's own sampling
(`torch.multinomial` on a global generator it reseeds) is not used. Our continuous-batching logits processor
(`_RowDraws`) is told, for every row that gets a token in a forward, which row and which response position that
token is; the slot `row * width + position` reaches it through the engine's per-request argument tensor. It draws
the token by inverse CDF from that row's own uniform for that position (`sampling.row_uniforms`, `sampling.draw`),
records the token and its log-prob, and hands the engine back the logits with that token's set to +inf, so that the
engine's argmax takes it. A row's response therefore depends only on its prompt, its seed and the model, also when
rows wait for pages or are evicted and recomputed: data-parallel ranks, chunkings and resumed runs sample what one
uninterrupted batch would. The padded sampler and this one give the same responses for the same seeds. Any two batch
shapes, in either engine, round the logits a little differently; a draw can change only when its uniform falls
within that rounding of a CDF boundary.

Where it departs from the engine's defaults, and what that costs:
- It computes in the caller's dtype, as the padded sampler does: under the trainer's autocast (recipe `dtype:
  bfloat16` over float32 master weights) every projection, the attention and the logits are in bfloat16, so the
  recorded log-probs are the trainer's own (up to bf16 rounding) and both samplers draw the same tokens (up to
  the rounding above, coarser in bf16: a random-weight model, whose distributions are near uniform, shows it). The
  engine sizes its KV cache and attention mask in the weights' dtype: float32 pages hold the keys and values as
  autocast computed them and the attention casts them to bf16 again, so the arithmetic is the padded sampler's
  (whose cache keeps the tensors as computed), at up to twice a bf16 cache's bytes per token.
- It runs the engine's loop in the calling thread, not in the engine's background thread. The loop then sees
  the caller's no_grad, autocast and device, and an error raises here. This uses the private
  `ContinuousBatchingManager._run_generation_loop`, and `_create_batch_processor` to reach the cache (see
  `_cache_takes_autocast_states`). The processor reads `RequestState._true_initial_tokens` (the
  original prompt's length, once an evicted row's tokens have been folded into its prompt). `_check` fails loudly if a transformers version no longer
  keeps the tokens drawn.
- It saves and restores the global RNG. The engine reseeds it each time it starts.
- Each call builds and drops an engine: about 0.2-0.3 s on a CPU, most of it the `gc.collect()` in the engine's
  teardown, so short rollouts stay faster padded. Without flash attention (on the CPU), sdpa attends over the
  KV of every live row at once under a block-diagonal mask (`[tokens in the forward, cached tokens]`): per
  token it costs the live rows' total length, where the padded batch costs its longest row's length.
  `benchmarks/rollouts.py` measures the net effect.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import GenerationConfig
from transformers.generation.configuration_utils import ContinuousBatchingConfig
from transformers.generation.continuous_batching.cb_logits_processors import (
    ContinuousBatchingLogitsProcessor,
    ContinuousBatchingLogitsProcessorList,
)
from transformers.generation.logits_process import LogitsProcessorList

from merge_distill.sampling import Rollouts, draw, left_pad, row_uniforms, stop_ids


def _engine_internals_missing() -> str | None:
    """What of the engine's private API this module drives (transformers 5.24's) this transformers lacks, or None.
    Checked at import: `engines.PagedSampler` then refuses `backend.rollout: paged` in one line."""
    import inspect

    from transformers.generation.continuous_batching import ContinuousBatchingManager

    loop = getattr(ContinuousBatchingManager, "_run_generation_loop", None)
    if loop is None or "use_inference_mode" not in inspect.signature(loop).parameters:
        return "ContinuousBatchingManager._run_generation_loop(use_inference_mode)"
    if not hasattr(ContinuousBatchingManager, "_create_batch_processor"):
        return "ContinuousBatchingManager._create_batch_processor"
    return None


if missing := _engine_internals_missing():
    raise ImportError(f"transformers has no {missing}")

Tensor = torch.Tensor

DEFAULT_PAGE_SIZE = 64  # tokens per page. Short rows waste less of their last page than at the engine's 256


@dataclass(frozen=True)
class PagedConfig:
    """How the engine is sized for one `sample_paged` call. Each field defaults from the call's rows."""

    page_size: int = DEFAULT_PAGE_SIZE
    # The KV cache's capacity, in tokens. Default: every row's prompt + cap, so that no row ever waits or is evicted.
    # With less, rows wait for free pages. A row that runs out of pages is evicted and recomputed later. Its draws
    # are keyed by position, so it samples the same tokens again.
    max_cache_tokens: int | None = None
    max_rows: int | None = None          # rows per forward (default all)
    max_batch_tokens: int | None = None  # tokens per forward, prefill chunks included (default max(rows, 256))


class _RowDraws(ContinuousBatchingLogitsProcessor):
    """The token choice. Slot `row * width + t` is the t-th response token of row `row`. The engine passes one
    slot per row that gets a token in this forward, in the order of its logits rows. The uniforms, and the
    recorded tokens and log-probs, are flat `[rows * width + 1]`. The last slot is scratch: rows that carry no new
    token write there."""

    supported_kwargs: dict = {}
    ignored_kwargs: tuple = ()

    def __init__(self, rows: dict[str, int], width: int, seeds: list[int], temperature: float,
                 device: torch.device):
        self.rows, self.width, self.temperature = rows, width, temperature
        n = len(seeds) * width + 1
        self.uniforms = None
        if temperature > 0:  # float32: what `draw` compares them in (the padded sampler casts them the same way)
            u = row_uniforms(seeds, width).to(torch.float32).reshape(-1)
            self.uniforms = torch.cat([u, u.new_full((1,), 0.5)]).to(device)
        self.tokens = torch.full((n,), -1, dtype=torch.long, device=device)
        self.logprobs = torch.zeros(n, dtype=torch.float32, device=device)

    def fill_defaults(self, int32_tensor: Tensor) -> None:
        int32_tensor.fill_(-1)

    def prepare_tensor_args(self, requests_with_new_token) -> Tensor:
        slots = []
        for future in requests_with_new_token:
            state = future.state
            done = state.generated_len()
            if state._true_initial_tokens:  # evicted and recomputed: its earlier tokens now sit in its prompt
                done += len(state.initial_tokens) - state._true_initial_tokens
            slots.append(self.rows[state.request_id] * self.width + done)
        return torch.tensor(slots, dtype=torch.int32)

    def __call__(self, scores: Tensor, tensor_arg: Tensor) -> Tensor:
        """`scores` `[N, V]` float32 logits, one row per request in the forward. The first of them got a new
        token, in the order of the slots. The rest are requests mid-prefill: their slots are stale entries
        from an earlier forward, whose slots are already written, so they are sent to the scratch slot."""
        slot = tensor_arg[: scores.shape[0]].long()
        scratch = self.tokens.numel() - 1
        fresh = (slot >= 0) & (self.tokens[slot.clamp(min=0)] < 0)
        slot = torch.where(fresh, slot, scratch)
        # the padded sampler's arithmetic, step for step: log_softmax, then the tempered log_softmax
        logprobs = torch.log_softmax(scores, dim=-1)
        if self.temperature > 0:
            scaled = logprobs if self.temperature == 1.0 else torch.log_softmax(logprobs / self.temperature, -1)
            tok = draw(scaled, self.uniforms[slot])
        else:  # greedy; the log-probs recorded are at temperature 1, as the padded sampler's
            scaled = logprobs
            tok = scaled.argmax(-1)
        self.tokens[slot] = tok
        self.logprobs[slot] = scaled.gather(1, tok[:, None]).squeeze(1)
        return scores.scatter_(1, tok[:, None], math.inf)  # the only +inf: the engine's argmax takes it


def _cache_takes_autocast_states(manager) -> None:
    """Build the engine's batch processor now (its generation loop reuses the one it finds) and have its KV cache
    cast the keys and values it is given to its own dtype: under autocast a value is bf16 (and a Qwen3 key float32,
    after k_norm's float32 weight), which the cache's `index_copy_` into pages of the weights' dtype refuses."""
    processor = manager._create_batch_processor()
    manager.batch_processor = processor
    cache = processor.cache
    update = cache.update

    def update_in_cache_dtype(key_states: Tensor, value_states: Tensor, layer_idx: int, kwargs: dict):
        return update(key_states.to(cache.dtype), value_states.to(cache.dtype), layer_idx, kwargs)

    cache.update = update_in_cache_dtype


class _QuietCPUMemoryProbe(logging.Filter):
    """On the CPU the engine logs an error for each cache it sizes when psutil is missing. Its sizing does not need
    psutil when the capacity is given, as it is here."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "psutil" not in record.getMessage()


@torch.no_grad()
def sample_paged(model: torch.nn.Module, prompts: list[list[int]], *, max_new_tokens: int | list[int],
                 temperature: float, eos_token_id: int | Sequence[int], pad_token_id: int, seeds: list[int],
                 config: PagedConfig = PagedConfig()) -> Rollouts:
    """One response per prompt, as `merge_distill.sampling.sample` (same layout, same per-row randomness, the same
    stop ids, the caller's autocast), by continuous batching. `max_new_tokens` may be one cap per row: a capped row
    ends there, truncated, and frees its pages. Tensors of the result live on the model's device."""
    if len(seeds) != len(prompts):
        raise ValueError(f"sample_paged: {len(seeds)} seeds for {len(prompts)} prompts")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("sample_paged: every prompt needs at least one token")
    caps = [max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int) else list(max_new_tokens)
    if len(caps) != len(prompts) or min(caps) < 1:
        raise ValueError("sample_paged: max_new_tokens is one cap >= 1, or one per prompt")
    device = next(model.parameters()).device
    stops = list(stop_ids(eos_token_id))
    width = max(caps)
    draws = _RowDraws({str(r): r for r in range(len(prompts))}, width, seeds, temperature, device)

    page = config.page_size
    need = sum(-(-(len(p) + c) // page) for p, c in zip(prompts, caps))  # pages for every row at once
    longest = max(-(-(len(p) + c) // page) for p, c in zip(prompts, caps))
    pages = need if config.max_cache_tokens is None else max(longest, min(need, config.max_cache_tokens // page))
    rows = min(len(prompts), config.max_rows or len(prompts))
    cb = ContinuousBatchingConfig(
        page_size=page, num_blocks=pages, max_requests_per_batch=rows,
        max_batch_tokens=config.max_batch_tokens or max(rows, 256),
        use_async_batching=False, use_cuda_graph=False, return_logprobs=False,
        auto_switch_to_flash=False, scheduler_type="fifo",
        disable_nccl_graph_mixing=False)  # else, under torchrun, it sets NCCL_GRAPH_MIXING_SUPPORT=0 for the process
    gen = GenerationConfig(do_sample=False, max_new_tokens=width, eos_token_id=stops,
                           pad_token_id=pad_token_id)

    was_training, attn = model.training, model.config._attn_implementation
    quiet = _QuietCPUMemoryProbe()
    cb_logger = logging.getLogger("ContinuousBatchingLogger")
    cb_logger.addFilter(quiet)
    rng_devices = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=rng_devices):
            manager = model.init_continuous_batching(generation_config=gen, continuous_batching_config=cb)
            processors = ContinuousBatchingLogitsProcessorList(LogitsProcessorList([draws]))
            processors.tensors_required = 1  # one int32 argument row: the slots
            manager.logit_processor = processors
            _cache_takes_autocast_states(manager)
            for r, (ids, cap) in enumerate(zip(prompts, caps)):
                manager.add_request(list(ids), request_id=str(r), max_new_tokens=cap, eos_token_id=stops)
            status = manager.background_thread_status
            status.request_stop(status.FLUSH_AND_STOP, 0)  # the loop ends when every request has
            manager._run_generation_loop(use_inference_mode=False)
            outputs = {}
            while (out := manager.get_result(timeout=0)) is not None:
                outputs[out.request_id] = out
            manager.destroy()
    finally:
        cb_logger.removeFilter(quiet)
        if model.config._attn_implementation != attn:
            model.set_attn_implementation(attn)
        model.train(was_training)

    tokens = draws.tokens[:-1].view(len(prompts), width)
    logprobs = draws.logprobs[:-1].view(len(prompts), width)
    _check(outputs, tokens, caps, stops, status.fatal_error)
    alive = tokens >= 0
    length = int(alive.sum(1).max())
    tokens, logprobs, alive = tokens[:, :length], logprobs[:, :length], alive[:, :length]
    lengths = alive.sum(1)
    last = tokens.gather(1, (lengths - 1).clamp(min=0)[:, None]).squeeze(1)
    prompt_ids, prompt_mask = left_pad(prompts, pad_token_id, device)
    return Rollouts(
        prompt_ids=prompt_ids, prompt_mask=prompt_mask,
        response_ids=torch.where(alive, tokens, pad_token_id), response_mask=alive,
        sampler_logprobs=torch.where(alive, logprobs, 0.0),
        truncated=~torch.isin(last, torch.tensor(stops, device=device)),
    )


def _check(outputs: dict, tokens: Tensor, caps: list[int], stops: list[int], fatal: Exception | None) -> None:
    """Every request finished, and the tokens the engine kept are the ones drawn, in order: a prefix of each row's
    slots, ending at a stop id or at the row's cap."""
    failed = [o for o in outputs.values() if o.error is not None]
    if fatal is not None or failed or len(outputs) != len(caps):
        why = fatal or (failed[0].error if failed else f"{len(caps) - len(outputs)} requests never finished")
        raise RuntimeError(f"paged sampler: transformers' continuous batching failed ({why})")
    tokens = tokens.cpu()
    for r, cap in enumerate(caps):
        kept = outputs[str(r)].generated_tokens
        drawn = tokens[r]
        n = len(kept)
        ends = n == cap or (n > 0 and kept[-1] in stops)
        if not ends or drawn[:n].tolist() != kept or bool((drawn[n:] >= 0).any()):
            raise RuntimeError(f"paged sampler: row {r}'s tokens are not the ones drawn for it; this transformers "
                               "version's continuous batching does not call the token choice as expected")
