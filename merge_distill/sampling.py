"""Student rollouts: batched, KV-cached sampling that records the sampler's log-prob of each token.

Layout of a batch: prompts are left-padded to a common length P, responses right-padded to L, so the
sequence for row b is `prompt_ids[b] ++ response_ids[b]` and every response starts at column P.
Randomness comes from an explicit `torch.Generator`, never the global RNG, so evaluation cannot disturb
training's data order and a resumed run samples exactly what an uninterrupted one would.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from transformers import DynamicCache

Tensor = torch.Tensor


@dataclass
class Rollouts:
    prompt_ids: Tensor        # [B, P] long, left-padded
    prompt_mask: Tensor       # [B, P] long
    response_ids: Tensor      # [B, L] long, right-padded with pad_token_id
    response_mask: Tensor     # [B, L] float, 1 on real response tokens (EOS included)
    sampler_logprobs: Tensor  # [B, L] float, log-prob of each sampled token under the sampler, 0 on pads
    truncated: Tensor         # [B] bool, the response hit max_new_tokens without EOS

    @property
    def lengths(self) -> Tensor:
        return self.response_mask.sum(-1)

    def select(self, rows: Tensor | list[int]) -> "Rollouts":
        idx = torch.as_tensor(rows, dtype=torch.long)
        return Rollouts(*(getattr(self, f)[idx] for f in self.__dataclass_fields__))

    def response_token_lists(self) -> list[list[int]]:
        return [ids[: int(n)].tolist() for ids, n in zip(self.response_ids, self.lengths)]


def concat_rollouts(parts: list[Rollouts], pad_token_id: int) -> Rollouts:
    """Stack rollouts of different widths: prompts re-left-padded, responses re-right-padded."""
    P = max(r.prompt_ids.shape[1] for r in parts)
    L = max(r.response_ids.shape[1] for r in parts)

    def pad(t: Tensor, width: int, value, left: bool) -> Tensor:
        extra = width - t.shape[1]
        fill = torch.full((t.shape[0], extra), value, dtype=t.dtype)
        return torch.cat([fill, t] if left else [t, fill], dim=1)

    return Rollouts(
        prompt_ids=torch.cat([pad(r.prompt_ids, P, pad_token_id, True) for r in parts]),
        prompt_mask=torch.cat([pad(r.prompt_mask, P, 0, True) for r in parts]),
        response_ids=torch.cat([pad(r.response_ids, L, pad_token_id, False) for r in parts]),
        response_mask=torch.cat([pad(r.response_mask, L, 0.0, False) for r in parts]),
        sampler_logprobs=torch.cat([pad(r.sampler_logprobs, L, 0.0, False) for r in parts]),
        truncated=torch.cat([r.truncated for r in parts]),
    )


def left_pad(sequences: list[list[int]], pad_token_id: int) -> tuple[Tensor, Tensor]:
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, s in enumerate(sequences):
        if s:
            ids[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
            mask[i, width - len(s):] = 1
    return ids, mask


def positions(attention_mask: Tensor) -> Tensor:
    """Position ids that start at 0 on each row's first real token (left padding)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


class LogitsSource:
    """What `sample` draws from: anything that maps (new ids, masks, positions, state) to next-token
    log-probs. The default wraps one HF causal LM; `merge_distill.closed_form` mixes several."""

    def start(self, batch_size: int):  # -> opaque per-batch state (e.g. KV caches)
        raise NotImplementedError

    def next_logprobs(self, state, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor) -> Tensor:
        raise NotImplementedError


class ModelLogits(LogitsSource):
    def __init__(self, model: torch.nn.Module):
        self.model = model
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
           temperature: float, eos_token_id: int, pad_token_id: int,
           generator: torch.Generator | None = None) -> Rollouts:
    """Sample one response per prompt (repeat prompts for several rollouts).

    temperature 0 is greedy. The recorded log-probs are those of the distribution actually sampled
    from (logits / temperature), i.e. the sampler's, for the importance ratio.
    """
    source = model if isinstance(model, LogitsSource) else ModelLogits(model)
    was_training = getattr(model, "training", False)
    if isinstance(model, torch.nn.Module):
        model.eval()
    try:
        return _sample(source, prompts, max_new_tokens, temperature, eos_token_id, pad_token_id, generator)
    finally:
        if was_training:
            model.train()


def _sample(source: LogitsSource, prompts, max_new_tokens, temperature, eos_token_id, pad_token_id, generator):
    prompt_ids, prompt_mask = left_pad(prompts, pad_token_id)
    batch = prompt_ids.shape[0]
    state = source.start(batch)
    mask = prompt_mask.clone()
    pos = positions(mask)
    logprobs = source.next_logprobs(state, prompt_ids, mask, pos)
    next_pos = pos[:, -1] + 1

    tokens, token_logprobs, alive_cols = [], [], []
    finished = torch.zeros(batch, dtype=torch.bool)
    for _ in range(max_new_tokens):
        if temperature > 0:
            scaled = logprobs if temperature == 1.0 else torch.log_softmax(logprobs / temperature, -1)
            tok = torch.multinomial(scaled.exp(), 1, generator=generator).squeeze(1)
        else:
            scaled = logprobs
            tok = scaled.argmax(-1)
        lp = scaled.gather(1, tok[:, None]).squeeze(1)
        alive = ~finished
        tokens.append(torch.where(alive, tok, pad_token_id))
        token_logprobs.append(torch.where(alive, lp, 0.0))
        alive_cols.append(alive)
        finished = finished | (tok == eos_token_id)
        if bool(finished.all()):
            break
        mask = torch.cat([mask, alive.long()[:, None]], dim=1)
        logprobs = source.next_logprobs(state, tokens[-1][:, None], mask, next_pos[:, None])
        next_pos = next_pos + 1

    return Rollouts(
        prompt_ids=prompt_ids, prompt_mask=prompt_mask,
        response_ids=torch.stack(tokens, 1), response_mask=torch.stack(alive_cols, 1).float(),
        sampler_logprobs=torch.stack(token_logprobs, 1), truncated=~finished,
    )
