"""Exact-token log-probs of sampled responses under a model: log-prob math alone (frozen models are cached in
`merge_distill.frozen`, laid out over ranks in `merge_distill.parallel`).

Only real response positions are projected to the vocabulary, in row chunks, with log-sum-exp: no model
(frozen, or the student under autograd) ever holds `[batch, length, vocab]` float32 logits or log-probs, and
prompt and padding positions are never scored. The projection reproduces what the model's own forward does
after its head (Granite's and Cohere's logit scales, Gemma's final soft-cap: `OutputHead`), and each model is
checked once against its own logits, so the rewards and the importance ratio to the sampler (which reads
`model(...).logits`) are those of the model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from merge_distill.errors import UserError
from merge_distill.fused import compute_dtype, token_logprobs
from merge_distill.sampling import Rollouts, positions

Tensor = torch.Tensor

# What transformers' (5.24) causal-LM forwards do to `lm_head(h)` before returning it as `.logits`, by class:
# (operation, config attribute). A subclass inherits its base's entry; any other class is checked to do nothing.
_LOGIT_POSTPROCESSING = {
    **dict.fromkeys(["GraniteForCausalLM", "GraniteMoeForCausalLM", "GraniteMoeHybridForCausalLM",
                     "GraniteMoeSharedForCausalLM", "GraniteSWAForCausalLM", "GraniteMoeSWAForCausalLM"],
                    ("divide", "logits_scaling")),
    **dict.fromkeys(["CohereForCausalLM", "Cohere2ForCausalLM", "Cohere2MoeForCausalLM", "CohereCompassForCausalLM"],
                    ("multiply", "logit_scale")),
    "HyperCLOVAXForCausalLM": ("multiply", "logits_scaling"),  # the same key as Granite's, the other way round
    "FalconH1ForCausalLM": ("multiply", "lm_head_multiplier"),
    **dict.fromkeys(["Gemma2ForCausalLM", "Gemma3ForCausalLM", "Gemma3nForCausalLM", "Gemma3nForConditionalGeneration",
                     "Gemma4ForCausalLM", "Gemma4ForConditionalGeneration", "Gemma4UnifiedForCausalLM",
                     "Gemma4UnifiedForConditionalGeneration", "VaultGemmaForCausalLM", "NanoChatForCausalLM",
                     "BeamForCausalLM", "Inkling2ForCausalLM", "Inkling2LoopForCausalLM"],
                    ("softcap", "final_logit_softcapping")),
    "RecurrentGemmaForCausalLM": ("softcap", "logits_soft_cap"),
    "xLSTMForCausalLM": ("softcap", "output_logit_soft_cap"),
}
_VERIFIED = "_merge_distill_scorer_verified"  # set on a model once its probe matched its own logits


@dataclass(frozen=True)
class OutputHead:
    """How a causal LM turns its final hidden states into the logits its forward returns:

        logits = cap(scale * (h @ weight.T + bias)),    cap(x) = softcap * tanh(x / softcap)  (identity if None)
    """

    weight: Tensor
    bias: Tensor | None
    scale: float = 1.0
    softcap: float | None = None

    def fused_args(self, temperature: float) -> dict:
        """`token_logprobs`'s temperature and softcap for `logits / temperature`. The scale folds into both:
        cap_c(s x) / T = cap_{c/s}(x) / (T/s)."""
        return {"temperature": temperature / self.scale,
                "softcap": None if self.softcap is None else self.softcap / self.scale}


def output_head(model: torch.nn.Module, linear: torch.nn.Linear) -> OutputHead:
    """The model's output projection `linear` and the post-processing its class applies (`_LOGIT_POSTPROCESSING`,
    read from the text config; an unset value does nothing)."""
    operation, key = next((_LOGIT_POSTPROCESSING[c.__name__] for c in type(model).__mro__
                           if c.__name__ in _LOGIT_POSTPROCESSING), (None, None))
    value = getattr(model.config.get_text_config(), key, None) if key else None
    if value is None:
        return OutputHead(linear.weight, linear.bias)
    if operation == "softcap":
        return OutputHead(linear.weight, linear.bias, softcap=float(value))
    return OutputHead(linear.weight, linear.bias, scale=float(value) if operation == "multiply" else 1 / float(value))


def response_logprobs(model: torch.nn.Module, rollouts: Rollouts, *, temperature: float = 1.0,
                      chunk_tokens: int | None = None, max_buckets: int = 4) -> Tensor:
    """log p(y_t | x, y_<t) of every sampled response token, `[B, L]`, 0 on padding.

    Gradients flow when called outside `torch.no_grad()` (the student's update uses this too), through
    `merge_distill.fused.token_logprobs`, which recomputes logits chunk by chunk in the backward pass instead
    of keeping `[tokens, vocab]` of them for autograd. Only real response tokens are projected (not the
    prompt, not the padding after EOS), `chunk_tokens` rows at a time (default: about
    `fused.CHUNK_ELEMENTS` logits per chunk, 4x that on CUDA, so memory stays flat in vocabulary and length).
    The backbone sees each row as prompt ++ response with no padding between them, and rows of very
    different lengths in up to `max_buckets` length buckets (`length_buckets`), so short prompts and early-ended
    responses do not pay for the batch's longest. A row's prompt must have at least one token. The head's
    post-processing (`OutputHead`) is applied as the model's forward applies it; a model whose logits this
    does not reproduce is refused (`check_reproduces_logits`).
    """
    L = rollouts.response_ids.shape[1]
    backbone, head = _split(model)
    if backbone is None:  # an architecture we cannot split: fall back to the model's own logits
        input_ids = torch.cat([rollouts.prompt_ids, rollouts.response_ids], dim=1)
        mask = torch.cat([rollouts.prompt_mask, rollouts.response_mask.long()], dim=1)
        logits = model(input_ids=input_ids, attention_mask=mask, position_ids=positions(mask),
                       logits_to_keep=L + 1).logits[:, :-1]
        return _gather_logprobs(logits.float() / temperature, rollouts.response_ids) * rollouts.response_mask
    check_reproduces_logits(model, backbone, head)
    prompt_lens = rollouts.prompt_mask.sum(-1).long()
    response_lens = rollouts.lengths
    hs, ts, where = [], [], []
    for rows in length_buckets((prompt_lens + response_lens).tolist(), max_buckets=max_buckets):
        idx = torch.as_tensor(rows, device=rollouts.prompt_ids.device)
        ids, mask, before, real = _packed(rollouts, idx, prompt_lens[idx], response_lens[idx])
        hidden = _hidden_states(backbone, ids, mask)
        hidden = hidden.gather(1, before[..., None].expand(-1, -1, hidden.shape[-1]))
        hs.append(hidden[real])
        ts.append(rollouts.response_ids[idx, :real.shape[1]][real])
        i, j = torch.nonzero(real, as_tuple=True)  # in the order of `hidden[real]`
        where.append((idx[i], j))
    lp = token_logprobs(torch.cat(hs), head.weight, head.bias, torch.cat(ts), chunk_rows=chunk_tokens,
                        **head.fused_args(temperature))
    out = torch.zeros(rollouts.response_ids.shape, dtype=lp.dtype, device=lp.device)
    rows, cols = (torch.cat(x) for x in zip(*where))
    return out.index_put((rows, cols), lp)


def _packed(rollouts: Rollouts, idx: Tensor, prompt_lens: Tensor, response_lens: Tensor):
    """Rows `idx` re-laid as `prompt ++ response` without the padding between them, left-padded to the longest.

    In a batch the real tokens of a row are contiguous (`prompt_ids` are left-padded, `response_ids` right-
    padded), so each row is shifted right until its last real token sits in the last column: the width is the
    longest prompt + response of these rows, not the longest prompt plus the longest response. Returns
    (ids, mask) `[g, W]`, `before` `[g, n]`: the column of the token before each response token (the one that
    predicts it), and `real` `[g, n]`: which of those response tokens exist (n = the longest response, >= 1).
    """
    P = rollouts.prompt_ids.shape[1]
    full = torch.cat([rollouts.prompt_ids[idx], rollouts.response_ids[idx]], dim=1)
    width = int((prompt_lens + response_lens).max())
    cols = torch.arange(width, device=full.device)
    src = (P + response_lens)[:, None] - width + cols  # column of `full` that lands in each packed column
    keep = src >= (P - prompt_lens)[:, None]
    ids = full.gather(1, src.clamp(min=0)).masked_fill(~keep, 0)
    n = max(1, int(response_lens.max()))
    j = torch.arange(n, device=full.device)
    before = ((width - response_lens - 1)[:, None] + j).clamp(0, width - 1)
    return ids, keep.long(), before, j < response_lens[:, None]


def length_buckets(lengths: list[int], *, max_buckets: int = 4, call_positions: int = 256,
                   call_share: float = 0.05) -> list[list[int]]:
    """Rows split by length into up to `max_buckets` groups, each padded only to its own longest row.

    A split must pay for its extra forward call: it must save more padded positions than the larger of
    `call_positions` and `call_share` of the whole batch's area (measured: two buckets of 16 rows did not
    beat one of 32 at vocab 260, hidden 128 on 2 CPU threads). One group (all rows) when lengths are alike.
    """
    n = len(lengths)
    order = sorted(range(n), key=lambda r: lengths[r])

    def area(groups):
        return sum(len(g) * max(lengths[r] for r in g) for g in groups)

    full = area([order])
    per_call = max(call_positions, call_share * full)
    best, best_cost = [order], float(full)
    for k in range(2, min(max_buckets, n) + 1):
        groups = [order[i * n // k:(i + 1) * n // k] for i in range(k)]
        cost = area(groups) + (k - 1) * per_call
        if cost < best_cost:
            best, best_cost = groups, cost
    return best


def token_budget_chunks(lengths: list[int], max_tokens: int | None, max_rows: int | None = None) -> list[list[int]]:
    """Rows grouped for forward passes of at most `max_tokens` padded tokens (rows x the group's longest row) and
    at most `max_rows` rows. With a token budget, rows are taken shortest first, greedily (similar lengths
    share a group, so little goes to padding); a row longer than the budget goes alone. Without one, the rows
    in order, `max_rows` at a time (all of them when `max_rows` is None too)."""
    n = len(lengths)
    if max_tokens is None:
        size = max_rows or max(1, n)
        return [list(range(lo, min(lo + size, n))) for lo in range(0, n, size)]
    groups, current, longest = [], [], 0
    for r in sorted(range(n), key=lambda r: lengths[r]):
        wider = max(longest, lengths[r])
        if current and (wider * (len(current) + 1) > max_tokens or (max_rows and len(current) == max_rows)):
            groups.append(current)
            current, wider = [], lengths[r]
        current.append(r)
        longest = wider
    return groups + ([current] if current else [])


def response_logprobs_chunked(model: torch.nn.Module, rollouts: Rollouts, *, temperature: float = 1.0,
                              max_tokens: int | None = None) -> Tensor:
    """`response_logprobs` in forward passes of at most `max_tokens` padded tokens each (no gradient needed)."""
    chunks = token_budget_chunks(row_lengths(rollouts), max_tokens)
    if len(chunks) == 1:
        return response_logprobs(model, rollouts, temperature=temperature)
    out = torch.zeros(rollouts.response_ids.shape, dtype=torch.float32, device=rollouts.response_ids.device)
    for rows in chunks:
        out[rows] = response_logprobs(model, rollouts.select(rows), temperature=temperature)
    return out


def row_lengths(rollouts: Rollouts) -> list[int]:
    """Each row's prompt + response length: the tokens a forward pass over it computes (see `_packed`)."""
    return (rollouts.prompt_mask.sum(-1) + rollouts.lengths).tolist()


def _gather_logprobs(logits: Tensor, targets: Tensor) -> Tensor:
    picked = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def _hidden_states(backbone: torch.nn.Module, ids: Tensor, mask: Tensor) -> Tensor:
    """The final hidden states; no KV cache is built (nothing decodes after scoring)."""
    return backbone(input_ids=ids, attention_mask=mask, position_ids=positions(mask), use_cache=False).last_hidden_state


def _split(model: torch.nn.Module) -> tuple[torch.nn.Module | None, OutputHead | None]:
    """(backbone returning hidden states, OutputHead) of an HF causal LM, or (None, None).

    The backbone is `model.base_model` (the attribute named by `base_model_prefix`: `model` for Llama-likes,
    `transformer` for GPT-2), the projection `get_output_embeddings()`, which must be a plain linear layer."""
    backbone = getattr(model, "base_model", model)
    linear = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if backbone is model or not isinstance(linear, torch.nn.Linear):
        return None, None
    return backbone, output_head(model, linear)


def check_reproduces_logits(model: torch.nn.Module, backbone: torch.nn.Module, head: OutputHead) -> None:
    """Raise a one-line UserError unless backbone + `head` through `token_logprobs` give the log-probs of the
    model's own logits (`_probe`): a head whose post-processing `_LOGIT_POSTPROCESSING` does not know, or a
    transform between the backbone and the output embeddings, would score other log-probs than the sampler's.
    Probes once per model: the verdict is kept on the model object."""
    if getattr(model, _VERIFIED, False):
        return
    difference, tolerance = _probe(model, backbone, head)
    if not difference <= tolerance:
        raise UserError(
            f"{type(model).__name__} (model_type '{model.config.model_type}') is not supported by the scorer: its "
            f"logits are not its output embeddings on its base model's hidden states with a post-processing "
            f"merge_distill.scoring knows (log-probs differ by up to {difference:.3g} on a probe input, tolerance "
            f"{tolerance:.2g})")
    setattr(model, _VERIFIED, True)


def _probe(model: torch.nn.Module, backbone: torch.nn.Module, head: OutputHead) -> tuple[float, float]:
    """(largest difference, tolerance) between the scorer's log-probs and the log-softmax of `model(...).logits`
    on 3 left-padded rows of 8 seeded random tokens (eval mode, no grad), at each real position's most and least
    likely token and one at random. The tolerance is rounding in the logits' or the projection's dtype: 4 eps
    times the largest logit (float32: ~1e-5; bf16: ~3% of it), plus 1e-4."""
    vocab = min(head.weight.shape[0], model.get_input_embeddings().weight.shape[0])
    gen = torch.Generator().manual_seed(0)
    mask = (torch.arange(8) >= torch.tensor([[0], [3], [6]])).long().to(head.weight.device)
    ids = torch.randint(vocab, mask.shape, generator=gen).to(mask.device) * mask
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask, position_ids=positions(mask)).logits[mask.bool()]
            hidden = _hidden_states(backbone, ids, mask)[mask.bool()]
            targets = torch.stack([logits.argmax(-1), logits.argmin(-1),
                                   torch.randint(vocab, logits.shape[:1], generator=gen).to(mask.device)], -1)
            expected = logits.float().log_softmax(-1).gather(-1, targets)
            ours = token_logprobs(hidden.repeat_interleave(3, 0), head.weight, head.bias, targets.flatten(),
                                  **head.fused_args(1.0)).view_as(expected)
    finally:
        model.train(was_training)
    eps = max(torch.finfo(logits.dtype).eps, torch.finfo(compute_dtype(hidden)).eps)
    return float((ours - expected).abs().max()), 1e-4 + 4 * eps * float(logits.float().abs().max())
