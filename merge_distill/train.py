"""The on-policy loop, one for every training method (`merge_distill.methods`):

    prompts of every domain -> rollouts -> each domain's rows scored by that domain's frozen models (or graded)
    -> the method's targets -> micro-batched loss, token mean over the global batch -> one optimizer step

A `Run` holds the parts, assembled at the edge (`merge_distill.build.build_run`) and passed in; this module
knows ranks only through `merge_distill.parallel` (layout, collectives) and the method knows none of them.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from merge_distill import distributed, parallel
from merge_distill.batch import Batch, select_rows
from merge_distill.checkpoint import Checkpointer, MetricsLog, save_final
from merge_distill.data import DomainMixer, Prompt
from merge_distill.engines import Sampler, frozen_sampler
from merge_distill.errors import TrainingDiverged
from merge_distill.frozen import ModelCache
from merge_distill.methods import Method
from merge_distill.parallel import collectives
from merge_distill.recipe import Recipe
from merge_distill.sampling import Rollouts, concat_rollouts, eos_token_ids, row_seeds
from merge_distill.scoring import row_lengths, token_budget_chunks
from merge_distill.step_metrics import Max, Mean, Min, Sum, reduce, row_mean


def train(run: Run, *, start: int = 0, progress=None, on_eval=None, trackers=None) -> Path:
    """Steps `start` to `schedule.steps` of `run` (every rank calls it: the ranks share each step's prompts), then
    the final export; its path. `on_eval(sampler, step)`: the periodic evaluation, which every rank takes part in.
    `trackers`: where each step's metrics also go, `log_metrics(step, metrics)` (`tracking.Trackers`, opened and
    closed by the caller). Rank 0 alone logs and shows progress (`merge_distill.distributed`)."""
    recipe, cfg = run.recipe, run.recipe.schedule
    log = MetricsLog(Path(recipe.output_dir), start) if distributed.is_main() else None
    trackers = trackers if distributed.is_main() else None

    def record(metrics: dict) -> None:  # rank 0: metrics.jsonl, then the same line to the trackers
        if log:
            log.write(metrics)
        if trackers:
            trackers.log_metrics(metrics["step"], metrics)

    progress = progress if distributed.is_main() else None
    task = progress.add_task(f"train ({run.method.name})", total=cfg.steps, completed=start) if progress else None
    in_a_row = 0  # consecutive skipped steps
    try:
        for step in range(start, cfg.steps):
            metrics = train_step(run, step)
            done = step + 1
            in_a_row = in_a_row + 1 if metrics["skipped"] else 0
            if in_a_row >= cfg.max_consecutive_skips:
                record(metrics)
                raise TrainingDiverged(
                    f"stopped at step {done}: {in_a_row} steps in a row had a non-finite loss or gradient and were "
                    f"skipped (schedule.max_consecutive_skips {cfg.max_consecutive_skips}); the weights are those of step "
                    f"{done - in_a_row}; see {Path(recipe.output_dir) / 'metrics.jsonl'}, lower optim.lr or keep "
                    "method.importance_truncation on")
            if on_eval and cfg.eval_every and done % cfg.eval_every == 0 and done < cfg.steps:
                metrics.update(run.sampler.decoding(lambda: on_eval(run.sampler, done)))
            record(metrics)
            run.checkpoints.step_done(done, cfg.steps)
            if progress:
                progress.update(task, completed=done, description=describe(run.method, recipe, metrics))
        save_final(run, Path(recipe.output_dir) / "final")
    finally:
        if log:
            log.close()
    return Path(recipe.output_dir) / "final"


def train_step(run: Run, step: int) -> dict:
    recipe, cfg, method = run.recipe, run.recipe.rollout, run.method
    if run.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(run.device)
    t0 = time.perf_counter()
    world = distributed.world()
    prompts = run.mixer.next_batch(cfg.prompts_per_step)  # the global batch, the same on every rank
    own = slice(*distributed.shard(len(prompts), world.rank, world.size))  # this rank's prompts, all their rollouts
    rows = [p for p in prompts[own] for _ in range(cfg.rollouts_per_prompt)]
    # global row r's randomness, wherever it is sampled
    seeds = row_seeds(recipe.seed * 1_000_003 + step, len(rows), offset=own.start * cfg.rollouts_per_prompt)

    batch = run.sample(rows, seeds)
    _sync(run)
    t1 = time.perf_counter()
    scores, grade_s = run.score(batch)
    with torch.no_grad():
        targets, target_metrics = method.targets(batch, scores, recipe)
    metrics = {"step": step + 1, **target_metrics}
    _sync(run)
    t2 = time.perf_counter()

    loss_sum, ratios, grad_norm, skipped = run.update(batch, targets)
    _sync(run)
    t3 = time.perf_counter()
    gap = check_engine_weights(run, step)

    rollouts, lengths = batch.rollouts, batch.rollouts.lengths
    for i, expert_rows in batch.by_expert():
        if expert_rows:
            name = recipe.experts[i].name
            metrics[f"{name}/response_length"] = row_mean(lengths[expert_rows])
            metrics[f"{name}/truncation_rate"] = row_mean(rollouts.truncated[expert_rows])
            metrics[f"{name}/n_sequences"] = Sum(len(expert_rows))
    ratio = torch.cat(ratios) if ratios else torch.ones(1)
    metrics.update({
        "loss": Sum(loss_sum), "grad_norm": float(grad_norm), "lr": run.scheduler.get_last_lr()[0],
        "skipped": int(skipped), "skipped_steps": run.skipped_steps,
        "response_length": row_mean(lengths), "truncation_rate": row_mean(rollouts.truncated),
        "importance_ratio/mean": Mean(float(ratio.sum()), ratio.numel()),
        "importance_ratio/min": Min(float(ratio.min())), "importance_ratio/max": Max(float(ratio.max())),
        "time/sample_s": Max(t1 - t0), "time/score_s": Max(t2 - t1 - grade_s), "time/update_s": Max(t3 - t2),
        "time/step_s": Max(t3 - t0),
    })
    if method.graded:
        metrics["time/grade_s"] = Max(grade_s)
    if gap is not None:
        metrics["sync_gap"] = Max(gap)
    if run.device.type == "cuda":  # this step's peaks (reset at the step's start): allocated, and what the caching
        metrics["memory/gpu_peak_gib"] = Max(torch.cuda.max_memory_allocated(run.device) / 2**30)  # allocator
        metrics["memory/gpu_reserved_peak_gib"] = Max(torch.cuda.max_memory_reserved(run.device) / 2**30)  # reserved
    return reduce(collectives.gather(metrics))


def _sync(run: Run) -> None:
    """Wait for queued GPU work, so the phase timings are honest."""
    if run.device.type == "cuda":
        torch.cuda.synchronize(run.device)


@dataclass
class Run:
    """Everything a run needs, loaded and checked once (`build.build_run`), and the phases of its step."""

    recipe: Recipe
    method: Method
    tokenizer: object
    student: torch.nn.Module
    policy: torch.nn.Module    # `ModelLogprobs(student)` in the recipe's layout (`merge_distill.parallel`)
    sampler: Sampler           # the student's rollout engine
    frozen: ModelCache         # teachers and references, each checkpoint loaded once
    graders: dict              # expert index -> grader, where the method is graded
    mixer: DomainMixer
    device: torch.device       # this rank's compute device: rollouts and forwards (not the student's parameters'
    optimizer: torch.optim.Optimizer  # device: with `placement.offload_optimizer` those are shards on the host)
    scheduler: torch.optim.lr_scheduler.LRScheduler
    checkpoints: Checkpointer | None = None  # registered with the run's state (`build.checkpointer`)
    skipped_steps: int = 0     # steps skipped for a non-finite loss or gradient, over the whole run

    # ------------------------------------------------------------------------------------------- sample
    def sample(self, rows: list[Prompt], seeds: list[int]) -> Batch:
        """One response per row, by the student (or each domain's teacher, `Method.samples_from`)."""
        if self.method.samples_from == "teacher":
            rows, rollouts = self.sample_teachers(rows, seeds)
            return Batch(rows, rollouts, None, self.expert_names)
        rollouts = self.sample_student(rows, seeds)
        return Batch(rows, rollouts, self.old_logprobs(rollouts), self.expert_names)

    def sample_student(self, rows: list[Prompt], seeds: list[int]) -> Rollouts:
        with self.autocast():
            return self.sampler.decoding(lambda: self._sample(self.sampler, rows, seeds)).to(self.device)

    def sample_teachers(self, rows: list[Prompt], seeds: list[int]) -> tuple[list[Prompt], Rollouts]:
        """Rows grouped by domain, each group sampled by its domain's teacher; (rows, rollouts) in that order."""
        order = sorted(range(len(rows)), key=lambda r: rows[r].expert)
        rows, seeds = [rows[r] for r in order], [seeds[r] for r in order]
        parts = []
        for i, e in enumerate(self.recipe.experts):
            mine = [r for r, p in enumerate(rows) if p.expert == i]
            if mine:
                with self.frozen.using(e.teacher, what=f"teacher of {e.name}") as model:
                    part = self._sample(frozen_sampler(self.recipe, model), [rows[r] for r in mine],
                                        [seeds[r] for r in mine])
                parts.append(part.to(self.device))
        return rows, concat_rollouts(parts, self.tokenizer.pad_token_id)

    def _sample(self, engine: Sampler, rows: list[Prompt], seeds: list[int]) -> Rollouts:
        cfg = self.recipe.rollout
        return engine.sample([list(p.token_ids) for p in rows], max_new_tokens=cfg.max_new_tokens,
                             temperature=cfg.temperature, eos_token_id=eos_token_ids(self.tokenizer, self.student),
                             pad_token_id=self.tokenizer.pad_token_id, seeds=seeds)

    def old_logprobs(self, rollouts: Rollouts) -> torch.Tensor:
        """log pi_old of the sampled tokens, `[B, L]`: the pi_old term of the advantage.

        When the trainer's own model sampled (the transformers engines), these are the sampler's log-probs.
        Another engine's (vLLM, bf16, its own kernels) would bring its numerical noise into the reward, so
        then they are recomputed by the trainer, as the official G-OPD code does; the engine's log-probs
        serve only in the importance weight (`objective.policy_gradient_loss`).
        """
        if self.sampler.trainer_logprobs:
            return rollouts.sampler_logprobs
        with self.autocast():
            return parallel.logprobs_in_passes(self.policy, rollouts, self.recipe.rollout.temperature,
                                               self.recipe.budget.max_tokens_per_micro_batch)

    # -------------------------------------------------------------------------------------------- score
    def score(self, batch: Batch) -> tuple[dict[str, torch.Tensor], float]:
        """(scores, seconds spent grading): each domain's rows under that domain's own frozen models, by role
        (`Method.frozen_models`; `[B, L]`, `[B, L, V]` for `Method.vocab`, 0 on other domains' rows), at the rollout
        temperature (teachers and references score at the tau the student sampled at, see `Rollout.temperature`),
        and `reward` `[B]` from each domain's grader for a graded method. Every expert's models, in recipe order,
        on every rank, even with no rows here: a model sharded over the ranks takes part in every pass."""
        scores: dict[str, torch.Tensor] = {}
        rollouts, tau = batch.rollouts, self.recipe.rollout.temperature
        for i, rows in batch.by_expert():
            expert = self.recipe.experts[i]
            for role, path in self.method.frozen_models(self.recipe, expert).items():
                path = self.recipe.frozen_ref(expert, path)
                if not rows and not self.frozen.shard:
                    continue
                sub = rollouts.select(rows)
                lp = (self.frozen.vocab_logprobs(path, sub, temperature=tau) if self.method.vocab
                      else self.frozen.score(path, sub, temperature=tau))
                if role not in scores:
                    scores[role] = lp.new_zeros(*rollouts.response_ids.shape, *lp.shape[2:])
                scores[role][rows] = lp
        grade_s = 0.0
        if self.method.graded:
            t0 = time.perf_counter()
            scores["reward"] = self.grade(batch)
            grade_s = time.perf_counter() - t0
        return scores, grade_s

    def grade(self, batch: Batch) -> torch.Tensor:
        """`[B]` each row's grade (`Verdict.score` in [0, 1]) from its domain's grader, graded on the CPU."""
        rewards = torch.zeros(len(batch))
        texts = self.tokenizer.batch_decode(batch.rollouts.response_token_lists(), skip_special_tokens=True)
        for i, rows in batch.by_expert():
            if rows:
                verdicts = self.graders[i].grade_many([batch.prompts[r].record for r in rows], [texts[r] for r in rows])
                rewards[rows] = torch.tensor([float(v.score) for v in verdicts])
        return rewards

    # ------------------------------------------------------------------------------------------- update
    def update(self, batch: Batch, targets) -> tuple[float, list[torch.Tensor], torch.Tensor, bool]:
        """One optimizer step on the token mean of the method's loss over the global batch: (this rank's share of
        the loss, the importance ratios of its tokens, the gradient norm, whether the step was skipped)."""
        budget, rollouts = self.recipe.budget, batch.rollouts
        self.student.train()
        self.optimizer.zero_grad(set_to_none=True)
        # the token mean over the global batch: every rank divides by the global count, gradients are summed
        total_tokens = int(collectives.all_reduce_sum(rollouts.lengths.sum()).clamp(min=1))
        loss_sum, ratios = 0.0, []
        # the same number of passes on every rank (a rank with fewer rows runs some that weigh nothing)
        chunks = collectives.agreed_chunks(token_budget_chunks(row_lengths(rollouts), budget.max_tokens_per_micro_batch,
                                                            budget.micro_batch_size))
        for j, (rows, real) in enumerate(chunks):
            micro = batch.select(rows)
            with self.no_sync() if j < len(chunks) - 1 else contextlib.nullcontext():  # gradients sync in the last
                with self.autocast():
                    logprobs = self.policy(micro.rollouts, self.recipe.rollout.temperature, self.method.vocab)
                loss = self.method.loss(logprobs, micro, select_rows(targets, rows), self.recipe)
                loss = loss * (int(micro.rollouts.lengths.sum()) / total_tokens if real else 0.0)
                # the global token mean is the sum of every rank's share (`parallel.gradient_scale`: DDP averages)
                (loss * parallel.gradient_scale(self.policy)).backward()
            if real:
                if self.method.vocab:
                    logprobs = logprobs.gather(-1, micro.rollouts.response_ids[..., None]).squeeze(-1)
                loss_sum += float(loss.detach())
                ratios.append(torch.exp(logprobs.detach() - micro.rollouts.sampler_logprobs)[micro.mask])
        # every rank now holds the same summed gradients (or its shard of them), so all clip by the same global norm
        grad_norm = parallel.total_norm(torch.nn.utils.clip_grad_norm_(self.student.parameters(),
                                                                       self.recipe.optim.grad_clip or float("inf")))
        # a non-finite loss or gradient on any rank: no rank steps, so weights and optimizer state stay finite
        skipped = collectives.any_rank(not (math.isfinite(loss_sum) and bool(torch.isfinite(grad_norm))))
        if skipped:  # the step only moves the data on
            self.optimizer.zero_grad(set_to_none=True)
        else:
            self.optimizer.step()
            self.scheduler.step()
            self.sampler.sync_weights(self.student)  # the next rollouts come from the updated weights
        self.skipped_steps += skipped
        return loss_sum, ratios, grad_norm, skipped

    def no_sync(self):
        """Within: backward passes accumulate gradients on this rank only (all but a step's last micro-batch)."""
        return getattr(self.policy, "no_sync", contextlib.nullcontext)()

    def autocast(self):
        """The student's forward passes in the recipe's dtype (mixed precision; its weights stay float32). Under
        fsdp the sharding's MixedPrecisionPolicy does this instead."""
        dtype = getattr(torch, self.recipe.dtype)
        if dtype == torch.float32 or parallel.is_sharded(self.policy):
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    @property
    def expert_names(self) -> tuple[str, ...]:
        return tuple(e.name for e in self.recipe.experts)

    def close(self) -> None:
        for part in (*self.graders.values(), self.sampler):  # (a vLLM sampler shuts its engine down)
            getattr(part, "close", lambda: None)()


def check_engine_weights(run: Run, step: int) -> float | None:
    """After the first update and every `backend.check_sync_every` steps, for an engine with its own copy of the
    weights (vLLM): it samples a fixed probe (the first prompt of the first pool) and the trainer scores those
    tokens; log-probs further apart than the dtype's tolerance stop the run (`backends.vllm.check_sync`). Their
    mean gap, or None when not checked."""
    every = run.recipe.backend.check_sync_every
    if run.sampler.trainer_logprobs or not every or (step and (step + 1) % every):
        return None
    from merge_distill.backends.vllm import check_sync

    probe = run.sample_student([run.mixer.pools[0][0]], [run.recipe.seed])
    return check_sync(probe.sampler_logprobs, run.old_logprobs(probe), probe.response_mask, dtype=run.recipe.dtype,
                      step=step + 1)


def describe(method: Method, recipe: Recipe, m: dict) -> str:
    """The progress line: each domain's metric that the method names (`Method.progress`), else the loss."""
    parts = []
    if method.progress:
        key, label = method.progress
        parts = [f"{e.name} {label} {m[f'{e.name}/{key}']:.3f}" for e in recipe.experts if f"{e.name}/{key}" in m]
    if not parts and "loss" in m:
        parts = [f"loss {m['loss']:.3f}"]
    return f"train ({method.name}) " + ", ".join(parts)
