"""The two inference engines a run uses, behind two small protocols that training and evaluation share.

- `Sampler`: responses to prompts, one seed per row (a row's draws depend only on its prompt, its seed and the
  model; the logits they are drawn from round a little differently in another batch shape, and in vLLM they
  depend on the batch unless `backend.batch_invariant`), with the log-prob of each sampled token under the
  distribution it was drawn from; and
  `sync_weights(model)`, after each optimizer step, for an engine that holds its own copy of the student.
- `Scorer`: exact log-probs of given responses under one frozen model (a teacher or a reference).

The transformers implementations are built in: `TransformersSampler` (padded, KV-cached batches),
`PagedSampler` (continuous batching over a paged KV cache, `merge_distill.paged`) and `TransformersScorer`. The
vLLM sampler (`merge_distill.backends.vllm`, `pip install 'merge-distill[vllm]'`, CUDA only) is chosen by a
recipe's `backend.rollout` through `make_sampler`; frozen models always score through `TransformersScorer`. Pass
recipes whose `zoo:` paths are resolved.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

import torch

from merge_distill.sampling import LogitsSource, Rollouts, sample

if TYPE_CHECKING:
    from merge_distill.recipe import Recipe
    from merge_distill.frozen import ModelCache

Tensor = torch.Tensor


class Sampler(Protocol):
    # True when the recorded log-probs are the trainer's own (same model, same code): they can then serve as
    # pi_old in the advantage; otherwise the trainer recomputes pi_old (see `train.Setup.old_logprobs`)
    trainer_logprobs: bool

    # `eos_token_id`: every id that ends a response (one id or several: `sampling.eos_token_ids` gives a model's);
    # the row's last token, inside its mask, whichever it was, and the row is not truncated
    def sample(self, prompts: list[list[int]], *, max_new_tokens: int, temperature: float,
               eos_token_id: int | Sequence[int], pad_token_id: int, seeds: list[int]) -> Rollouts: ...

    def sync_weights(self, model: torch.nn.Module) -> None: ...

    # Optional, for an engine with its own copy of the weights (vLLM): `awake()`, a context in which it holds
    # its memory and the trainer's current weights, entered by every rank together; the trainer wraps each
    # sampling phase and periodic evaluation in it (`train.Setup.decoding`). And `schedules_rows = True` for an
    # engine that schedules rows within its own memory (continuous batching): the trainer then passes every
    # row at once instead of chunks within `budget.max_rollout_tokens`.


class Scorer(Protocol):
    def score(self, rollouts: Rollouts, *, temperature: float) -> Tensor:
        """`[B, L]` log p(y_t | x, y_<t) of each response token with the logits divided by `temperature`,
        0 on padding."""
        ...


class TransformersSampler:
    """KV-cached batched sampling (`merge_distill.sampling.sample`) from an HF model or a `LogitsSource`.

    Built on the student module itself, it shares the trainer's weights: there is nothing to sync."""

    trainer_logprobs = True

    def __init__(self, model: torch.nn.Module | LogitsSource):
        self.model = model

    def sample(self, prompts, *, max_new_tokens, temperature, eos_token_id, pad_token_id, seeds) -> Rollouts:
        return sample(self.model, prompts, max_new_tokens=max_new_tokens, temperature=temperature,
                      eos_token_id=eos_token_id, pad_token_id=pad_token_id, seeds=seeds)

    def sync_weights(self, model: torch.nn.Module) -> None:
        if model is not self.model:
            self.model.load_state_dict(model.state_dict())


class PagedSampler(TransformersSampler):
    """Continuous batching over a paged KV cache (`merge_distill.paged.sample_paged`): finished rows free their
    pages, waiting rows take them, and no forward carries a finished row. The same rollouts as
    `TransformersSampler` from the same seeds (up to the rounding of the logits).

    Built on the student module itself, it shares the trainer's weights (`sync_weights` as the padded one's) and,
    as the padded one, computes in the caller's autocast dtype (the trainer's `Setup.autocast`), so its log-probs
    are the trainer's own. `max_cache_tokens` bounds the KV cache (rows wait for pages instead of being chunked by
    the caller)."""

    schedules_rows = True  # rows wait for free pages: the trainer passes every row at once

    def __init__(self, model: torch.nn.Module, *, trainer_logprobs: bool = True, max_cache_tokens: int | None = None,
                 config=None):
        try:
            from merge_distill.paged import PagedConfig
        except ImportError as e:  # the engine's API as of transformers 5.24
            import transformers

            from merge_distill.errors import UserError

            raise UserError(f"backend.rollout paged needs transformers' continuous batching as in transformers 5.24; "
                            f"this is transformers {transformers.__version__} ({e})") from None
        self.model, self.trainer_logprobs = model, trainer_logprobs
        self.config = config or PagedConfig(max_cache_tokens=max_cache_tokens)

    def sample(self, prompts, *, max_new_tokens, temperature, eos_token_id, pad_token_id, seeds) -> Rollouts:
        from merge_distill.paged import sample_paged

        return sample_paged(self.model, prompts, max_new_tokens=max_new_tokens, temperature=temperature,
                            eos_token_id=eos_token_id, pad_token_id=pad_token_id, seeds=seeds, config=self.config)


class TransformersScorer:
    """A frozen model of a `ModelCache` (loaded once per checkpoint, offloaded between uses if asked)."""

    def __init__(self, cache: ModelCache, path: str):
        self.cache, self.path = cache, path

    def score(self, rollouts: Rollouts, *, temperature: float) -> Tensor:
        return self.cache.score(self.path, rollouts, temperature=temperature)


def make_sampler(recipe: Recipe, student: torch.nn.Module, *, max_model_len: int | None = None) -> Sampler:
    """The student's rollout engine per `recipe.backend.rollout`. The trainer calls `sample(..., seeds=...)`
    with one seed per row (`merge_distill.sampling.row_seeds`) and `sync_weights(student)` after every update.
    vLLM needs `max_model_len`: the most prompt + response tokens one request of the run takes."""
    if recipe.backend.rollout == "transformers":
        return TransformersSampler(student)
    if recipe.backend.rollout == "paged":  # in the trainer's autocast, as the padded one
        return PagedSampler(student, max_cache_tokens=recipe.budget.max_rollout_tokens)
    from merge_distill.backends.vllm import VLLMSampler, import_vllm

    import_vllm()  # the missing extra first
    if max_model_len is None:
        raise ValueError("backend.rollout vllm: make_sampler needs max_model_len (longest prompt + max_new_tokens)")
    b = recipe.backend
    return VLLMSampler(recipe.student, student, max_model_len=max_model_len, device=recipe.device,
                       dtype=recipe.dtype, seed=recipe.seed, sleep_level=b.sleep_level,
                       gpu_memory_utilization=b.gpu_memory_utilization, max_num_seqs=b.max_num_seqs,
                       max_num_batched_tokens=b.max_num_batched_tokens, batch_invariant=b.batch_invariant)


def frozen_sampler(recipe: Recipe, model: torch.nn.Module) -> Sampler:
    """The engine that samples from a frozen model (e.g. SFT's teachers): paged when the student's rollouts are,
    else padded (a vLLM recipe's frozen samplers stay in transformers)."""
    if recipe.backend.rollout == "paged":
        return PagedSampler(model, trainer_logprobs=False, max_cache_tokens=recipe.budget.max_rollout_tokens)
    return TransformersSampler(model)


def make_scorer(recipe: Recipe, path: str, cache: ModelCache) -> Scorer:
    """A frozen scorer (a teacher or reference at `path`): the trainer's chunked scorer, whatever samples the
    student (one vLLM engine per rank is the most a run builds: see docs/scale_out.md)."""
    return TransformersScorer(cache, path)
