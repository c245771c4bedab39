"""Student rollouts: batched, KV-cached sampling that records the sampler's log-prob of each token.

Layout of a batch: prompts are left-padded to a common length P, responses right-padded to L, so the
sequence for row b is `prompt_ids[b] ++ response_ids[b]` and every response starts at column P.
Randomness is per row: each row has its own integer seed, which fixes the uniform numbers its tokens are
drawn with (inverse-CDF sampling). A row's response therefore depends only on its prompt, its seed and the
model, never on which other rows share the batch: data-parallel ranks, micro-batches or length buckets
sample exactly what one big batch would, evaluation cannot disturb training's data order, and a resumed
run samples exactly what an uninterrupted one would. The global RNG is never used.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import DynamicCache

Tensor = torch.Tensor


@dataclass
class Rollouts:
    prompt_ids: Tensor        # [B, P] long, left-padded
    prompt_mask: Tensor       # [B, P] long
    response_ids: Tensor      # [B, L] long, right-padded with pad_token_id
    response_mask: Tensor     # [B, L] bool, True on real response tokens (EOS included)
    sampler_logprobs: Tensor  # [B, L] float, log-prob of each sampled token under the sampler, 0 on pads
    truncated: Tensor         # [B] bool, the response hit max_new_tokens without EOS

    @property
    def lengths(self) -> Tensor:
        """`[B]` long: each row's response tokens, counted as integers (exact at any length, in any dtype policy)."""
        return self.response_mask.sum(-1, dtype=torch.long)

    def select(self, rows: Tensor | list[int]) -> "Rollouts":
        idx = torch.as_tensor(rows, dtype=torch.long, device=self.prompt_ids.device)
        return Rollouts(*(getattr(self, f)[idx] for f in self.__dataclass_fields__))

    def to(self, device: str | torch.device) -> "Rollouts":
        return Rollouts(*(getattr(self, f).to(device) for f in self.__dataclass_fields__))

    def response_token_lists(self) -> list[list[int]]:
        return [ids[: int(n)].tolist() for ids, n in zip(self.response_ids, self.lengths)]


def concat_rollouts(parts: list[Rollouts], pad_token_id: int) -> Rollouts:
    """Stack rollouts of different widths: prompts re-left-padded, responses re-right-padded."""
    P = max(r.prompt_ids.shape[1] for r in parts)
    L = max(r.response_ids.shape[1] for r in parts)

    def pad(t: Tensor, width: int, value, left: bool) -> Tensor:
        extra = width - t.shape[1]
        fill = torch.full((t.shape[0], extra), value, dtype=t.dtype, device=t.device)
        return torch.cat([fill, t] if left else [t, fill], dim=1)

    return Rollouts(
        prompt_ids=torch.cat([pad(r.prompt_ids, P, pad_token_id, True) for r in parts]),
        prompt_mask=torch.cat([pad(r.prompt_mask, P, 0, True) for r in parts]),
        response_ids=torch.cat([pad(r.response_ids, L, pad_token_id, False) for r in parts]),
        response_mask=torch.cat([pad(r.response_mask, L, False, False) for r in parts]),
        sampler_logprobs=torch.cat([pad(r.sampler_logprobs, L, 0.0, False) for r in parts]),
        truncated=torch.cat([r.truncated for r in parts]),
    )


def stop_ids(eos_token_id: int | Sequence[int]) -> tuple[int, ...]:
    """The ids that end a response, from a sampler's `eos_token_id`: one id, or several (as in HF's
    `GenerationConfig.eos_token_id`)."""
    ids = (eos_token_id,) if isinstance(eos_token_id, int) else tuple(int(i) for i in eos_token_id)
    if not ids:
        raise ValueError("a sampler needs at least one eos_token_id")
    return ids


def eos_token_ids(tokenizer, model=None) -> tuple[int, ...]:
    """Every id that ends a response of `model` (what training and evaluation pass the samplers as `eos_token_id`):
    the tokenizer's EOS, then each EOS of the model's generation config (`generation_config.eos_token_id`, one id or
    a list: Qwen3 instruct models end a turn at `<|im_end|>` or `<|endoftext|>`), without repeats. A model without a
    generation config (a `LogitsSource`, or None) stops at the tokenizer's EOS alone."""
    config = getattr(model, "generation_config", None)
    extra = getattr(config, "eos_token_id", None)
    extra = [] if extra is None else [extra] if isinstance(extra, int) else list(extra)
    return tuple(dict.fromkeys(int(i) for i in [tokenizer.eos_token_id, *extra] if i is not None))


def left_pad(sequences: list[list[int]], pad_token_id: int, device=None) -> tuple[Tensor, Tensor]:
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, s in enumerate(sequences):
        if s:
            ids[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
            mask[i, width - len(s):] = 1
    return ids.to(device), mask.to(device)


def row_seeds(base: int, count: int, offset: int = 0) -> list[int]:
    """Seeds of rows `offset .. offset+count-1` of a batch whose randomness is keyed by `base`
    (training uses base = f(seed, step), so global row r of a step has the same seed on any rank)."""
    return [(base * 1_000_003 + offset + r) % (2**63 - 1) for r in range(count)]


def row_uniforms(seeds: list[int], count: int) -> Tensor:
    """`[B, count]` float64 uniforms in (0, 1), row b drawn from its own generator seeded with seeds[b]."""
    u = torch.empty(len(seeds), count, dtype=torch.float64)
    for b, seed in enumerate(seeds):
        u[b] = torch.rand(count, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return u.clamp_(min=1e-12)


def draw(logprobs: Tensor, u: Tensor) -> Tensor:
    """Inverse-CDF draw of one token per row from `logprobs` `[B, V]` with uniforms `u` `[B]`."""
    cdf = logprobs.exp().cumsum(-1)
    x = (u.to(cdf.dtype) * cdf[:, -1]).unsqueeze(1)
    return torch.searchsorted(cdf, x).squeeze(1).clamp_(max=logprobs.shape[-1] - 1)


def positions(attention_mask: Tensor) -> Tensor:
    """Position ids that start at 0 on each row's first real token (left padding)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


class LogitsSource:
    """What `sample` draws from: anything that maps (new ids, masks, positions, state) to next-token
    log-probs. The default wraps one HF causal LM; `merge_distill.closed_form` mixes several."""

    device = torch.device("cpu")

    def start(self, batch_size: int):  # -> opaque per-batch state (e.g. KV caches)
        raise NotImplementedError

    def next_logprobs(self, state, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor) -> Tensor:
        raise NotImplementedError


class ModelLogits(LogitsSource):
    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.device = next(model.parameters()).device
        # transformers renamed `past_key_values` to `cache`; accept both generations of the API.
        params = inspect.signature(model.forward).parameters
        self.cache_kw = "cache" if "cache" in params else "past_key_values"

    def start(self, batch_size: int):
        return DynamicCache()

    def next_logprobs(self, cache, input_ids, attention_mask, position_ids):
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         use_cache=True, logits_to_keep=1, **{self.cache_kw: cache})
        return torch.log_softmax(out.logits[:, -1].float(), dim=-1)


@torch.no_grad()
def sample(model: torch.nn.Module | LogitsSource, prompts: list[list[int]], *, max_new_tokens: int,
           temperature: float, eos_token_id: int | Sequence[int], pad_token_id: int, seeds: list[int] | None = None,
           generator: torch.Generator | None = None) -> Rollouts:
    """Sample one response per prompt (repeat prompts for several rollouts).

    `seeds` (one per row) fix each row's randomness; without them, row seeds are drawn from `generator`.
    A row ends at any of the ids `eos_token_id` gives (`stop_ids`). temperature 0 is greedy. The recorded
    log-probs are those of the distribution actually sampled from (logits / temperature), i.e. the sampler's,
    for the importance ratio. Tensors of the result live on the model's device.
    """
    if seeds is None:
        seeds = torch.randint(0, 2**62, (len(prompts),), generator=generator).tolist()
    elif len(seeds) != len(prompts):
        raise ValueError(f"sample: {len(seeds)} seeds for {len(prompts)} prompts")
    source = model if isinstance(model, LogitsSource) else ModelLogits(model)
    stops = stop_ids(eos_token_id)
    was_training = getattr(model, "training", False)
    if isinstance(model, torch.nn.Module):
        model.eval()
    try:
        return _sample(source, prompts, max_new_tokens, temperature, stops, pad_token_id, seeds)
    finally:
        if was_training:
            model.train()


def _sample(source: LogitsSource, prompts, max_new_tokens, temperature, stops, pad_token_id, seeds):
    prompt_ids, prompt_mask = left_pad(prompts, pad_token_id, source.device)
    stops = torch.tensor(stops, device=source.device)
    batch = prompt_ids.shape[0]
    uniforms = row_uniforms(seeds, max_new_tokens).to(source.device) if temperature > 0 else None
    state = source.start(batch)
    mask = prompt_mask.clone()
    pos = positions(mask)
    logprobs = source.next_logprobs(state, prompt_ids, mask, pos)
    next_pos = pos[:, -1] + 1

    tokens, token_logprobs, alive_cols = [], [], []
    finished = torch.zeros(batch, dtype=torch.bool, device=prompt_ids.device)
    for t in range(max_new_tokens):
        if temperature > 0:
            scaled = logprobs if temperature == 1.0 else torch.log_softmax(logprobs / temperature, -1)
            tok = draw(scaled, uniforms[:, t])
        else:
            scaled = logprobs
            tok = scaled.argmax(-1)
        lp = scaled.gather(1, tok[:, None]).squeeze(1)
        alive = ~finished
        tokens.append(torch.where(alive, tok, pad_token_id))
        token_logprobs.append(torch.where(alive, lp, 0.0))
        alive_cols.append(alive)
        finished = finished | torch.isin(tok, stops)
        if bool(finished.all()):
            break
        mask = torch.cat([mask, alive.long()[:, None]], dim=1)
        logprobs = source.next_logprobs(state, tokens[-1][:, None], mask, next_pos[:, None])
        next_pos = next_pos + 1

    return Rollouts(
        prompt_ids=prompt_ids, prompt_mask=prompt_mask,
        response_ids=torch.stack(tokens, 1), response_mask=torch.stack(alive_cols, 1),
        sampler_logprobs=torch.stack(token_logprobs, 1), truncated=~finished,
    )
