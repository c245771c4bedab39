"""The on-policy loop, one for every training method (`merge_distill.methods`):

    prompts of every domain -> rollouts -> targets (e.g. G-OPD advantages from each domain's teacher and
    reference) -> micro-batched loss, token mean over the global batch -> one optimizer step

What differs between methods lives in the method; checkpoints, the manifest and the metrics log in
`merge_distill.checkpoint`; the engines behind `merge_distill.engines`.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from merge_distill import distributed, parallel
from merge_distill.checkpoint import Attributes, Checkpointer, MetricsLog, check_manifest, holding, save_final
from merge_distill.data import DomainMixer, Prompt, load_records, render_prompt, user_message
from merge_distill.engines import Sampler, Scorer, frozen_sampler, make_sampler, make_scorer
from merge_distill.errors import TrainingDiverged, UserError
from merge_distill.frozen import ModelCache
from merge_distill.methods import Method, method_of
from merge_distill.models import check_compatible, load_model, load_sharded, load_tokenizer, model_info
from merge_distill.parallel import collectives
from merge_distill.recipe import STUDENT, Recipe
from merge_distill.sampling import Rollouts, concat_rollouts, eos_token_ids, row_seeds
from merge_distill.scoring import row_lengths, token_budget_chunks


@dataclass
class Setup:
    """Everything a run needs, loaded and checked once."""

    recipe: Recipe
    method: Method
    tokenizer: object
    student: torch.nn.Module
    student_logprobs: torch.nn.Module  # `ModelLogprobs(student)` in the recipe's layout (`merge_distill.parallel`)
    sampler: Sampler           # the student's rollout engine
    frozen: ModelCache         # teachers and references, each checkpoint loaded once
    mixer: DomainMixer
    graders: dict[int, object] = field(default_factory=dict)
    scorers: dict[str, Scorer] = field(default_factory=dict)  # by resolved path
    skipped_steps: int = 0     # steps skipped for a non-finite loss or gradient, over the whole run

    def policy(self, rollouts: Rollouts, *, vocab: bool = False) -> torch.Tensor:
        """The student's log-probs of `rollouts` at the rollout temperature, with gradients (`[B, L]`, or
        `[B, L, V]` with `vocab`), in the recipe's compute dtype, through the data-parallel wrapper."""
        with self.autocast():
            return self.student_logprobs(rollouts, self.recipe.rollout.temperature, vocab)

    def no_sync(self):
        """Within: backward passes accumulate gradients on this rank only (all but a step's last micro-batch)."""
        return getattr(self.student_logprobs, "no_sync", contextlib.nullcontext)()

    def decoding(self, fn):
        """`fn()` with the student's weights in place for decoding (under fsdp every rank calls this): the
        student's shards gathered, or, for an engine with its own copy of the weights (vLLM), that engine awake
        with the trainer's current weights (the student stays sharded)."""
        awake = getattr(self.sampler, "awake", None)
        if awake is not None:
            with awake():
                return fn()
        return parallel.decoding(self.student_logprobs, lambda _: fn())

    @property
    def device(self) -> torch.device:
        """This rank's compute device, the recipe's: where rollouts live and the forward runs. Not the student's
        parameters' device: with `placement.offload_optimizer` those are shards on the host."""
        return torch.device(self.recipe.device)

    def sample_student(self, batch: list[Prompt], seeds: list[int]) -> Rollouts:
        with self.autocast():
            return self.decoding(lambda: self._sample(self.sampler, batch, seeds)).to(self.device)

    def sample_frozen(self, path: str, batch: list[Prompt], seeds: list[int], *, what: str) -> Rollouts:
        with self.frozen.using(path, what=what) as model:
            return self._sample(frozen_sampler(self.recipe, model), batch, seeds)

    def _sample(self, sampler: Sampler, batch: list[Prompt], seeds: list[int]) -> Rollouts:
        """One response per row, in row chunks whose KV cache stays within `budget.max_rollout_tokens` (per-row
        seeds: the same responses whatever the chunking). An engine that schedules rows itself (paged, vLLM)
        takes every row at once: rows wait for free pages of its cache."""
        cfg, budget, pad = self.recipe.rollout, self.recipe.budget, self.tokenizer.pad_token_id
        rows = len(batch)
        if budget.max_rollout_tokens is not None and not getattr(sampler, "schedules_rows", False):
            rows = max(1, budget.max_rollout_tokens // (max(len(p.token_ids) for p in batch) + cfg.max_new_tokens))
        parts = [sampler.sample([list(p.token_ids) for p in batch[lo:lo + rows]], max_new_tokens=cfg.max_new_tokens,
                                temperature=cfg.temperature, eos_token_id=eos_token_ids(self.tokenizer, self.student),
                                pad_token_id=pad, seeds=seeds[lo:lo + rows])
                 for lo in range(0, len(batch), rows)]
        return parts[0] if len(parts) == 1 else concat_rollouts(parts, pad)

    def score(self, path: str, rollouts: Rollouts) -> torch.Tensor:
        """`[B, L]` log-probs of the sampled tokens under the frozen model at `path`, at the rollout temperature:
        teachers and references score at the tau the student sampled at (see `Rollout.temperature`)."""
        if not len(rollouts.response_ids) and not self.frozen.shard:  # no rows (a sharded model still takes part)
            return rollouts.sampler_logprobs.new_zeros(rollouts.response_ids.shape)
        key = self.frozen.key(path)
        if key not in self.scorers:
            self.scorers[key] = make_scorer(self.recipe, path, self.frozen)
        lp = self.scorers[key].score(rollouts, temperature=self.recipe.rollout.temperature)
        return lp.to(rollouts.response_ids.device)

    def old_logprobs(self, rollouts: Rollouts) -> torch.Tensor:
        """log pi_old of the sampled tokens, `[B, L]`: the pi_old term of the advantage.

        When the trainer's own model sampled (the transformers engine), these are the sampler's log-probs.
        Another engine's (vLLM, bf16, its own kernels) would bring its numerical noise into the reward, so
        then they are recomputed by the trainer, as the official G-OPD code does; the engine's log-probs
        serve only in the importance weight (`objective.policy_gradient_loss`).
        """
        if self.sampler.trainer_logprobs:
            return rollouts.sampler_logprobs
        with self.autocast():
            return parallel.logprobs_in_passes(self.student_logprobs, rollouts, self.recipe.rollout.temperature,
                                               self.recipe.budget.max_tokens_per_micro_batch)

    def reference_path(self, expert) -> str:
        return reference_path(self.recipe, expert)

    def autocast(self):
        """The student's forward passes in the recipe's dtype (mixed precision; its weights stay float32). Under
        fsdp the sharding's MixedPrecisionPolicy does this instead."""
        dtype = getattr(torch, self.recipe.dtype)
        if dtype == torch.float32 or parallel.is_sharded(self.student_logprobs):
            return contextlib.nullcontext()
        return torch.autocast(device_type=torch.device(self.recipe.device).type, dtype=dtype)


def reference_path(recipe: Recipe, expert) -> str:
    return recipe.student if expert.reference == STUDENT else expert.reference


def check_models(recipe: Recipe) -> None:
    """Every model the method loads exists, loads a tokenizer, and agrees with the student token for token."""
    method = method_of(recipe)
    infos = {"student": model_info(recipe.student, what="student")}
    for i, e in enumerate(recipe.experts):
        for role, path in method.frozen_models(recipe, e).items():
            if path != STUDENT:
                infos[f"{role} of expert '{e.name}'"] = model_info(path, what=f"experts.{i}.{role} ({e.name})")
    check_compatible(infos, allow_chat_template_mismatch=recipe.allow_chat_template_mismatch)


def load_prompts(recipe: Recipe, tokenizer) -> list[list[Prompt]]:
    pools = []
    for i, e in enumerate(recipe.experts):
        what = f"experts.{i}.prompts ({e.name})"
        records = load_records(e.prompts, what=what)
        template = None if e.prompt_template == "{prompt}" else e.prompt_template
        pools.append([Prompt(i, r, tuple(render_prompt(tokenizer, user_message(r, template, what=what), e.system_prompt)))
                      for r in records])
    return pools


def setup(recipe: Recipe, *, eval_tokens: int = 0) -> Setup:
    """`eval_tokens`: the most prompt + response tokens a periodic evaluation request takes (it sizes a vLLM
    engine's `max_model_len`, with the longest training prompt + `rollout.max_new_tokens`)."""
    rewarded = not method_of(recipe).needs_teachers  # rewarded by graders instead of teachers
    if rewarded:  # a grader that runs code needs its isolation before any model loads
        from merge_distill.graders import sandbox_level

        sandbox_level([e.grader_name for e in recipe.experts], recipe.isolation)
    check_models(recipe)
    tokenizer = load_tokenizer(recipe.student, what="student")
    if tokenizer.pad_token_id is None or tokenizer.eos_token_id is None:
        raise UserError(f"student '{recipe.student}': its tokenizer needs an eos_token and a pad_token")
    dtype = getattr(torch, recipe.dtype)  # frozen models are stored in it; the student computes in it
    student, student_logprobs = load_student(recipe)
    pools = load_prompts(recipe, tokenizer)
    mixer = DomainMixer(pools, [e.weight for e in recipe.experts], recipe.seed)
    longest = max((len(p.token_ids) for pool in pools for p in pool), default=0)
    max_model_len = max(longest + recipe.rollout.max_new_tokens, eval_tokens)
    frozen = ModelCache(dtype=dtype, device=recipe.placement.frozen_device or recipe.device,
                        offload=recipe.placement.offload, max_tokens=recipe.budget.max_tokens_per_micro_batch,
                        shard=parallel.shard_frozen if recipe.placement.shard_frozen and distributed.active() else None)
    graders = {}
    if rewarded:
        from merge_distill.graders import get_grader

        graders = {i: get_grader(e.grader_name, isolation=recipe.isolation) for i, e in enumerate(recipe.experts)}
    return Setup(recipe, method_of(recipe), tokenizer, student, student_logprobs,
                 make_sampler(recipe, student, max_model_len=max_model_len), frozen, mixer, graders)


def load_student(recipe: Recipe) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The student (float32 weights on the recipe's device) and `ModelLogprobs(student)` in the recipe's layout
    (`parallel.wrap_student`). Under fsdp it is built on the meta device on every rank, sharded, and filled from
    rank 0's one copy (`models.load_sharded`); its shards live on the host with `placement.offload_optimizer`."""

    def checkpointed(student):
        if recipe.budget.gradient_checkpointing:
            if hasattr(student, "activation_checkpointing_enable"):  # transformers >= 5.24's name
                student.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return student

    if recipe.parallel == "fsdp" and distributed.active():
        wrapped = load_sharded(recipe.student, lambda m, _: parallel.wrap_student(checkpointed(m), recipe),
                               what="student", trainable=True,
                               device="cpu" if recipe.placement.offload_optimizer else recipe.device)
        return parallel.root_of(wrapped).model, wrapped
    student = checkpointed(load_model(recipe.student, what="student", dtype=torch.float32, trainable=True)
                           .to(recipe.device))
    return student, parallel.wrap_student(student, recipe)


# ----------------------------------------------------------------------------------------------- step


def _sync(s: Setup) -> None:
    """Wait for queued GPU work, so the phase timings are honest."""
    if s.device.type == "cuda":
        torch.cuda.synchronize(s.device)


def train_step(s: Setup, optimizer, scheduler, step: int) -> dict:
    cfg, budget, method = s.recipe.rollout, s.recipe.budget, s.method
    metrics: dict = {"step": step + 1}
    if s.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(s.device)
    t0 = time.perf_counter()
    world = distributed.world()
    prompts = s.mixer.next_batch(cfg.prompts_per_step)  # the global batch, the same on every rank
    own = slice(*distributed.shard(len(prompts), world.rank, world.size))  # this rank's prompts, all their rollouts
    batch = [p for p in prompts[own] for _ in range(cfg.rollouts_per_prompt)]
    # global row r's randomness, wherever it is sampled
    seeds = row_seeds(s.recipe.seed * 1_000_003 + step, len(batch), offset=own.start * cfg.rollouts_per_prompt)

    batch, rollouts = method.rollouts(s, batch, seeds)
    _sync(s)
    t1 = time.perf_counter()
    targets = method.targets(s, batch, rollouts, metrics)
    _sync(s)
    t2 = time.perf_counter()

    s.student.train()
    optimizer.zero_grad(set_to_none=True)
    # the token mean over the global batch: every rank divides by the global count, gradients are summed
    total_tokens = int(collectives.all_reduce_sum(rollouts.lengths.sum()).clamp(min=1))
    loss_sum, ratios = 0.0, []
    # the same number of passes on every rank (a rank with fewer rows runs some that weigh nothing)
    chunks = collectives.agreed_chunks(token_budget_chunks(row_lengths(rollouts), budget.max_tokens_per_micro_batch,
                                                        budget.micro_batch_size))
    for j, (rows, real) in enumerate(chunks):
        sub = rollouts.select(rows)
        with s.no_sync() if j < len(chunks) - 1 else contextlib.nullcontext():  # gradients sync in the last one
            loss, logprobs = method.loss(s, sub, None if targets is None else targets[rows])
            loss = loss * (int(sub.lengths.sum()) / total_tokens if real else 0.0)
            # the global token mean is the sum of every rank's share (`parallel.gradient_scale`: DDP averages)
            (loss * parallel.gradient_scale(s.student_logprobs)).backward()
        if real:
            loss_sum += float(loss.detach())
            ratios.append(torch.exp(logprobs - sub.sampler_logprobs)[sub.response_mask])
    # every rank now holds the same summed gradients (or its shard of them), so all clip by the same global norm
    grad_norm = parallel.total_norm(torch.nn.utils.clip_grad_norm_(s.student.parameters(),
                                                                   s.recipe.optim.grad_clip or float("inf")))
    # a non-finite loss or gradient on any rank: no rank steps, so weights and optimizer state stay finite
    skipped = collectives.any_rank(not (math.isfinite(loss_sum) and bool(torch.isfinite(grad_norm))))
    if skipped:  # the step only moves the data on
        optimizer.zero_grad(set_to_none=True)
    else:
        optimizer.step()
        scheduler.step()
        s.sampler.sync_weights(s.student)  # the next rollouts come from the updated weights
    s.skipped_steps += skipped
    _sync(s)
    t3 = time.perf_counter()
    gap = check_engine_weights(s, step)
    if gap is not None:
        metrics["sync_gap"] = gap

    ratio = torch.cat(ratios) if ratios else torch.ones(1)
    lengths = rollouts.lengths
    weights = {"tokens": float(lengths.sum()), "sequences": len(batch)}  # for the reduction over ranks
    for i, e in enumerate(s.recipe.experts):
        rows = [r for r, p in enumerate(batch) if p.expert == i]
        if rows:
            metrics[f"{e.name}/response_length"] = float(lengths[rows].float().mean())
            metrics[f"{e.name}/truncation_rate"] = float(rollouts.truncated[rows].float().mean())
            metrics[f"{e.name}/n_sequences"] = len(rows)
            weights.update({f"{e.name}/tokens": float(lengths[rows].sum()), f"{e.name}/sequences": len(rows)})
    metrics.update({
        "loss": loss_sum, "grad_norm": float(grad_norm), "lr": scheduler.get_last_lr()[0],
        "skipped": int(skipped), "skipped_steps": s.skipped_steps,
        "response_length": float(lengths.float().mean()), "truncation_rate": float(rollouts.truncated.float().mean()),
        "importance_ratio/mean": float(ratio.mean()), "importance_ratio/min": float(ratio.min()),
        "importance_ratio/max": float(ratio.max()),
        "time/sample_s": t1 - t0, "time/score_s": t2 - t1 - metrics.get("time/grade_s", 0.0),
        "time/update_s": t3 - t2, "time/step_s": t3 - t0,
    })
    if s.device.type == "cuda":  # this step's peaks (reset at the step's start): allocated, and what the caching
        metrics["memory/gpu_peak_gib"] = torch.cuda.max_memory_allocated(s.device) / 2**30  # allocator reserved
        metrics["memory/gpu_reserved_peak_gib"] = torch.cuda.max_memory_reserved(s.device) / 2**30
    return distributed.reduce_metrics(collectives.gather((metrics, weights)))


def check_engine_weights(s: Setup, step: int) -> float | None:
    """After the first update and every `backend.check_sync_every` steps, for an engine with its own copy of the
    weights (vLLM): it samples a fixed probe (the first prompt of the first pool) and the trainer scores those
    tokens; log-probs further apart than the dtype's tolerance stop the run (`backends.vllm.check_sync`). Their
    mean gap, or None when not checked."""
    every = s.recipe.backend.check_sync_every
    if s.sampler.trainer_logprobs or not every or (step and (step + 1) % every):
        return None
    from merge_distill.backends.vllm import check_sync

    probe = s.sample_student([s.mixer.pools[0][0]], [s.recipe.seed])
    return check_sync(probe.sampler_logprobs, s.old_logprobs(probe), probe.response_mask, dtype=s.recipe.dtype,
                      step=step + 1)


def make_optimizer(s: Setup):
    cfg, steps = s.recipe.optim, s.recipe.schedule.steps
    params = list(s.student.parameters())
    # the fused kernel: one pass over each tensor, no temporaries the size of the model
    # (`python benchmarks/optimizer_step.py`: faster and lighter than the for-loop and foreach forms)
    fused = all(p.device.type in ("cpu", "cuda") for p in params)
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.999),
                                  eps=1e-8, fused=fused)

    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.lr_schedule == "constant" or steps <= cfg.warmup_steps:
            return 1.0
        progress = (step - cfg.warmup_steps) / max(1, steps - cfg.warmup_steps)
        return 1.0 - progress if cfg.lr_schedule == "linear" else 0.5 * (1 + math.cos(math.pi * progress))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# ------------------------------------------------------------------------------------------ loop


def train(recipe: Recipe, *, resume: bool = False, progress=None, on_eval=None) -> Path:
    """Run (or resume) the recipe's training; returns the path of the final checkpoint.

    Under `torchrun` every rank calls this: the ranks share each step's prompts (data parallel), and rank 0
    alone logs (see `merge_distill.distributed`); every rank writes its shards of each checkpoint
    (`merge_distill.checkpoint`) and evaluates periodically (`on_eval`, each its share of the problems).
    """
    method = method_of(recipe)
    world = distributed.init(recipe.device)
    if distributed.active():
        if method.trains and recipe.rollout.prompts_per_step < world.size:
            raise UserError(f"rollout.prompts_per_step ({recipe.rollout.prompts_per_step}) is smaller than the "
                            f"number of ranks ({world.size}): every rank needs at least one prompt per step")
        frozen = recipe.placement.frozen_device
        placement = recipe.placement.model_copy(update={"frozen_device": frozen and distributed.device_for(frozen)})
        recipe = recipe.model_copy(update={"device": distributed.device_for(recipe.device), "placement": placement})
        progress = progress if world.main else None
    with holding(recipe.output_dir):  # one live run per output_dir
        return _train(recipe, method, world, resume, progress, on_eval)


def _train(recipe: Recipe, method: Method, world, resume: bool, progress, on_eval) -> Path:
    output_dir = Path(recipe.output_dir)
    check_manifest(recipe, resume)
    if not method.trains:
        final = output_dir / "final"
        if world.main:
            check_models(recipe)
            final = Path(method.combine(recipe))
        collectives.barrier()
        return final
    if recipe.budget.threads:
        torch.set_num_threads(recipe.budget.threads)
    s = setup(recipe, eval_tokens=getattr(on_eval, "max_tokens", 0))
    optimizer, scheduler = make_optimizer(s)
    checkpoints = checkpointer(s, optimizer, scheduler)
    start = checkpoints.resume() if resume else 0
    if start:
        s.sampler.sync_weights(s.student)
    log = MetricsLog(output_dir, start) if world.main else None
    cfg = recipe.schedule
    task = progress.add_task(f"train ({method.name})", total=cfg.steps, completed=start) if progress else None
    in_a_row = 0  # consecutive skipped steps
    try:
        for step in range(start, cfg.steps):
            metrics = train_step(s, optimizer, scheduler, step)
            done = step + 1
            in_a_row = in_a_row + 1 if metrics["skipped"] else 0
            if in_a_row >= cfg.max_consecutive_skips:
                if log:
                    log.write(metrics)
                raise TrainingDiverged(
                    f"stopped at step {done}: {in_a_row} steps in a row had a non-finite loss or gradient and were "
                    f"skipped (schedule.max_consecutive_skips {cfg.max_consecutive_skips}); the weights are those of "
                    f"step {done - in_a_row}; see {output_dir / 'metrics.jsonl'}, lower optim.lr or keep "
                    "method.importance_truncation on")
            if cfg.eval_every and done % cfg.eval_every == 0 and done < cfg.steps:  # every rank evaluates
                metrics.update(s.decoding(lambda: on_eval(s.sampler, done) if on_eval else {}))
            if log:
                log.write(metrics)
            checkpoints.step_done(done, cfg.steps)
            if progress:
                progress.update(task, completed=done, description=describe(recipe, metrics))
        save_final(s, output_dir / "final")
    finally:
        if log:
            log.close()
        for g in (*s.graders.values(), s.sampler):  # (a vLLM sampler shuts its engine down)
            getattr(g, "close", lambda: None)()
    return output_dir / "final"


def checkpointer(s: Setup, optimizer, scheduler) -> Checkpointer:
    """What a checkpoint holds: everything a resumed run needs to continue as if it had not stopped."""
    checkpoints = Checkpointer(Path(s.recipe.output_dir), every=s.recipe.schedule.checkpoint_every,
                               keep=s.recipe.schedule.keep_checkpoints)
    checkpoints.register("model", parallel.ModelState(s.student))
    checkpoints.register("optimizer", parallel.OptimizerState(s.student, optimizer))
    checkpoints.register("scheduler", scheduler)
    checkpoints.register("mixer", s.mixer)
    checkpoints.register("trainer", Attributes(s, "skipped_steps"))
    return checkpoints


def describe(recipe: Recipe, m: dict) -> str:
    """The progress line: each domain's metric that the method names (`Method.progress`), else the loss."""
    method = method_of(recipe)
    parts = []
    if method.progress:
        key, label = method.progress
        parts = [f"{e.name} {label} {m[f'{e.name}/{key}']:.3f}" for e in recipe.experts if f"{e.name}/{key}" in m]
    if not parts and "loss" in m:
        parts = [f"loss {m['loss']:.3f}"]
    return f"train ({method.name}) " + ", ".join(parts)
