"""The student's rollout engines, behind one protocol that training and evaluation share.

`Sampler`: responses to prompts, one seed per row (a row's draws depend only on its prompt, its seed and the
model; the logits they are drawn from round a little differently in another batch shape, and in vLLM they depend
on the batch unless `backend.batch_invariant`), with the log-prob of each sampled token under the distribution it
was drawn from; `sync_weights(model)` after each optimizer step; `decoding(fn)` around each sampling phase; and
`close()`.

Built in: `TransformersSampler` (padded, KV-cached batches; `RowChunks` keeps its KV cache within
`budget.max_rollout_tokens`), `PagedSampler` (continuous batching over a paged KV cache, `merge_distill.paged`),
and the vLLM sampler (`merge_distill.backends.vllm`, the `vllm` extra), chosen by a recipe's `backend.rollout`
through `make_sampler`. Teachers and references score through `merge_distill.frozen.ModelCache`. To add an
engine: a class with the protocol's members (copy `TransformersSampler`) and a `backend.rollout` value in
`make_sampler`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

import torch

from merge_distill.sampling import LogitsSource, Rollouts, concat_rollouts, sample

if TYPE_CHECKING:
    from merge_distill.recipe import Recipe

Tensor = torch.Tensor


class Sampler(Protocol):
    """What the trainer and the evaluation ask of a rollout engine; every member is required."""

    # True when the recorded log-probs are the trainer's own (same model, same code): they can then serve as
    # pi_old in the advantage; otherwise the trainer recomputes pi_old (`train.Trainer.old_logprobs`)
    trainer_logprobs: bool

    # `eos_token_id`: every id that ends a response (one id or several: `sampling.eos_token_ids` gives a model's);
    # the row's last token, inside its mask, whichever it was, and the row is not truncated
    def sample(self, prompts: list[list[int]], *, max_new_tokens: int, temperature: float,
               eos_token_id: int | Sequence[int], pad_token_id: int, seeds: list[int]) -> Rollouts: ...

    def sync_weights(self, model: torch.nn.Module) -> None:
        """After each optimizer step: the engine samples from `model`'s new weights next."""

    def decoding(self, fn):
        """`fn()` with the engine ready to decode the trainer's current weights; every rank calls it together (the
        trainer wraps each sampling phase and periodic evaluation in it): the student's shards gathered (fsdp), or
        an engine with its own copy of the weights (vLLM) awake with them."""

    def close(self) -> None:
        """After the run (an engine with its own resources shuts them down)."""


class TransformersSampler:
    """KV-cached batched sampling (`merge_distill.sampling.sample`) from an HF model or a `LogitsSource`.

    Built on the student module itself, it shares the trainer's weights: there is nothing to sync. `wrapped`: the
    trainer's data-parallel module around it, whose shards `decoding` gathers (fsdp)."""

    trainer_logprobs = True

    def __init__(self, model: torch.nn.Module | LogitsSource, *, wrapped: torch.nn.Module | None = None):
        self.model, self.wrapped = model, wrapped

    def sample(self, prompts, *, max_new_tokens, temperature, eos_token_id, pad_token_id, seeds) -> Rollouts:
        return sample(self.model, prompts, max_new_tokens=max_new_tokens, temperature=temperature,
                      eos_token_id=eos_token_id, pad_token_id=pad_token_id, seeds=seeds)

    def sync_weights(self, model: torch.nn.Module) -> None:
        if model is not self.model:
            self.model.load_state_dict(model.state_dict())

    def decoding(self, fn):
        if self.wrapped is None:
            return fn()
        from merge_distill.parallel import decoding

        return decoding(self.wrapped, lambda _: fn())

    def close(self) -> None:
        pass


class PagedSampler(TransformersSampler):
    """Continuous batching over a paged KV cache (`merge_distill.paged.sample_paged`): finished rows free their
    pages, waiting rows take them, and no forward carries a finished row. The same rollouts as
    `TransformersSampler` from the same seeds (up to the rounding of the logits).

    Built on the student module itself, it shares the trainer's weights (`sync_weights` as the padded one's) and,
    as the padded one, computes in the caller's autocast dtype (the trainer's `Run.autocast`), so its log-probs
    are the trainer's own. `max_cache_tokens` bounds the KV cache (rows wait for pages instead of being chunked by
    the caller)."""

    def __init__(self, model: torch.nn.Module, *, trainer_logprobs: bool = True, max_cache_tokens: int | None = None,
                 config=None):
        try:
            from merge_distill.paged import PagedConfig
        except ImportError as e:  # the engine's API as of transformers 5.24
            import transformers

            from merge_distill.errors import UserError

            raise UserError(f"backend.rollout paged needs transformers' continuous batching as in transformers 5.24; "
                            f"this is transformers {transformers.__version__} ({e})") from None
        self.model, self.wrapped, self.trainer_logprobs = model, None, trainer_logprobs
        self.config = config or PagedConfig(max_cache_tokens=max_cache_tokens)

    def sample(self, prompts, *, max_new_tokens, temperature, eos_token_id, pad_token_id, seeds) -> Rollouts:
        from merge_distill.paged import sample_paged

        return sample_paged(self.model, prompts, max_new_tokens=max_new_tokens, temperature=temperature,
                            eos_token_id=eos_token_id, pad_token_id=pad_token_id, seeds=seeds, config=self.config)


class RowChunks:
    """A padded engine's rows in chunks whose KV cache stays within `max_tokens` (prompt + response tokens of the
    longest row x rows): the engines that page their own cache (paged, vLLM) take every row at once instead. Per-row
    seeds: the same responses whatever the chunking."""

    def __init__(self, engine: Sampler, max_tokens: int):
        self.engine, self.max_tokens = engine, max_tokens
        self.trainer_logprobs = engine.trainer_logprobs

    def sample(self, prompts, *, max_new_tokens, temperature, eos_token_id, pad_token_id, seeds) -> Rollouts:
        rows = max(1, self.max_tokens // (max((len(p) for p in prompts), default=0) + max_new_tokens))
        parts = [self.engine.sample(prompts[lo:lo + rows], max_new_tokens=max_new_tokens, temperature=temperature,
                                    eos_token_id=eos_token_id, pad_token_id=pad_token_id, seeds=seeds[lo:lo + rows])
                 for lo in range(0, max(len(prompts), 1), rows)]
        return parts[0] if len(parts) == 1 else concat_rollouts(parts, pad_token_id)

    def sync_weights(self, model: torch.nn.Module) -> None:
        self.engine.sync_weights(model)

    def decoding(self, fn):
        return self.engine.decoding(fn)

    def close(self) -> None:
        self.engine.close()


def make_sampler(recipe: Recipe, student: torch.nn.Module, *, device: str | None = None,
                 wrapped: torch.nn.Module | None = None, max_model_len: int | None = None) -> Sampler:
    """The student's rollout engine per `recipe.backend.rollout`, on `device` (this rank's; default the recipe's).
    The trainer calls `sample(..., seeds=...)` with one seed per row (`merge_distill.sampling.row_seeds`) and
    `sync_weights(student)` after every update. `wrapped`: the trainer's data-parallel module around `student`.
    vLLM needs `max_model_len`: the most prompt + response tokens one request of the run takes; for a LoRA student
    (`student.lora`) its engine holds the base and runs the student's adapter (`backends.vllm.LoRAVLLMSampler`)."""
    if recipe.backend.rollout == "transformers":
        return _within_budget(recipe, TransformersSampler(student, wrapped=wrapped))
    if recipe.backend.rollout == "paged":  # in the trainer's autocast, as the padded one
        return PagedSampler(student, max_cache_tokens=recipe.budget.max_rollout_tokens)
    from merge_distill.backends.vllm import LoRAVLLMSampler, VLLMSampler, import_vllm

    import_vllm()  # the missing extra first
    if max_model_len is None:
        raise ValueError("backend.rollout vllm: make_sampler needs max_model_len (longest prompt + max_new_tokens)")
    b, lora = recipe.backend, recipe.student.lora
    engine, adapter = (LoRAVLLMSampler, {"lora": lora}) if lora else (VLLMSampler, {})  # LoRA: the adapter syncs
    return engine(recipe.student.path, student, max_model_len=max_model_len, device=device or recipe.device,
                  dtype=recipe.dtype, seed=recipe.seed, sleep_level=b.sleep_level,
                  gpu_memory_utilization=b.gpu_memory_utilization, max_num_seqs=b.max_num_seqs,
                  max_num_batched_tokens=b.max_num_batched_tokens, batch_invariant=b.batch_invariant, **adapter)


def frozen_sampler(recipe: Recipe, model: torch.nn.Module) -> Sampler:
    """The engine that samples from a frozen model (e.g. SFT's teachers): paged when the student's rollouts are,
    else padded (a vLLM recipe's frozen samplers stay in transformers)."""
    if recipe.backend.rollout == "paged":
        return PagedSampler(model, trainer_logprobs=False, max_cache_tokens=recipe.budget.max_rollout_tokens)
    return _within_budget(recipe, TransformersSampler(model))


def _within_budget(recipe: Recipe, engine: Sampler) -> Sampler:
    budget = recipe.budget.max_rollout_tokens
    return engine if budget is None else RowChunks(engine, budget)
