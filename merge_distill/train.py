"""The on-policy loop: sample -> score with each domain's teacher and reference -> advantages -> update.

One loop serves G-OPD (teacher log-ratio rewards, per token) and GRPO (grader 0/1 rewards, group-
normalised); the difference is one function, `_advantages`.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch

from merge_distill import distributed, objective
from merge_distill.data import (
    DomainMixer,
    Prompt,
    load_records,
    render_prompt,
    user_message,
)
from merge_distill.dense import (
    dense_kl,
    gopd_advantages_clipped,
    response_vocab_logprobs,
    target_logprobs,
)
from merge_distill.errors import TrainingDiverged, UserError
from merge_distill.io import atomic_dir, atomic_write_json
from merge_distill.models import (
    check_compatible,
    load_model,
    load_tokenizer,
    model_info,
)
from merge_distill.recipe import STUDENT, Recipe
from merge_distill.sampling import Rollouts, concat_rollouts, row_seeds, sample
from merge_distill.scoring import ModelCache, response_logprobs

TRAINER_STATE = "trainer_state.pt"


@dataclass
class Setup:
    """Everything a run needs, loaded and checked once."""

    recipe: Recipe
    tokenizer: object
    student: torch.nn.Module
    frozen: ModelCache
    mixer: DomainMixer
    graders: dict[int, object] = field(default_factory=dict)
    sampler: object | None = None  # the student's rollout engine when not transformers (backend.rollout: vllm)
    scorers: dict[str, object] = field(default_factory=dict)  # frozen vLLM scorers by path (backend.scoring: vllm)
    skipped_steps: int = 0  # steps skipped for a non-finite loss or gradient, over the whole run

    def score(self, path: str, rollouts: Rollouts) -> torch.Tensor:
        """Log-probs of the sampled response tokens under the frozen model at `path`, `[B, L]`, at the rollout
        temperature: teachers and references score at the tau the student sampled at (`Train.temperature`)."""
        if self.recipe.backend.scoring == "transformers":
            return self.frozen.score(path, rollouts, temperature=self.recipe.train.temperature)
        from merge_distill.backends import make_scorer

        key = self.frozen.key(path)
        if key not in self.scorers:
            self.scorers[key] = make_scorer(self.recipe, path)
        return self.scorers[key].score(rollouts).to(rollouts.response_ids.device)  # tau 1 (recipe validation)

    def old_logprobs(self, rollouts: Rollouts) -> torch.Tensor:
        """log pi_old of the sampled tokens, `[B, L]`: the pi_old term of the advantage.

        When the trainer's own model sampled (the transformers backend), these are the sampler's log-probs.
        Another engine's (vLLM, bf16, its own kernels) would bring its numerical noise into the reward, so
        then they are recomputed by the trainer, as the official G-OPD code does; the engine's log-probs
        serve only in the importance weight (`objective.policy_gradient_loss`).
        """
        if self.sampler is None:
            return rollouts.sampler_logprobs
        with torch.no_grad(), self.autocast():
            return response_logprobs(self.student, rollouts, temperature=self.recipe.train.temperature)

    def autocast(self):
        """The student's forward passes in the recipe's dtype (mixed precision; its weights stay float32)."""
        dtype = getattr(torch, self.recipe.dtype)
        if dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=torch.device(self.recipe.device).type, dtype=dtype)


def check_models(recipe: Recipe) -> None:
    """Every model exists, loads a tokenizer, and agrees with the student token for token."""
    infos = {"student": model_info(recipe.student, what="student")}
    for i, e in enumerate(recipe.experts):
        if recipe.method != "grpo":
            infos[f"teacher of expert '{e.name}'"] = model_info(e.teacher, what=f"experts.{i}.teacher ({e.name})")
            scored = recipe.scale_of(e) != 1.0 or recipe.train.log_ratio_clip is not None
            if recipe.method == "gopd" and e.reference != STUDENT and scored:
                infos[f"reference of expert '{e.name}'"] = model_info(e.reference, what=f"experts.{i}.reference ({e.name})")
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


def setup(recipe: Recipe) -> Setup:
    check_models(recipe)
    tokenizer = load_tokenizer(recipe.student, what="student")
    if tokenizer.pad_token_id is None or tokenizer.eos_token_id is None:
        raise UserError(f"student '{recipe.student}': its tokenizer needs an eos_token and a pad_token")
    dtype = getattr(torch, recipe.dtype)  # frozen models are stored in it; the student computes in it
    student = load_model(recipe.student, what="student", dtype=torch.float32, trainable=True).to(recipe.device)
    mixer = DomainMixer(load_prompts(recipe, tokenizer), [e.weight for e in recipe.experts], recipe.train.seed)
    s = Setup(recipe, tokenizer, student, ModelCache(dtype=dtype, device=recipe.placement.frozen_device or recipe.device,
                                                  offload=recipe.placement.offload), mixer)
    if recipe.method != "sft":
        from merge_distill.backends import make_sampler

        s.sampler = make_sampler(recipe)  # loads the student's initial weights itself
    if recipe.method == "grpo":
        from merge_distill.graders import get_grader

        s.graders = {i: get_grader(e.grader_name) for i, e in enumerate(recipe.experts)}
    return s


def reference_path(recipe: Recipe, expert) -> str:
    return recipe.student if expert.reference == STUDENT else expert.reference


# ----------------------------------------------------------------------------------------------- step


def _advantages(s: Setup, batch: list[Prompt], rollouts: Rollouts, metrics: dict) -> torch.Tensor:
    """Per-token advantages [B, L] for the rows of `batch` (already expanded to rollouts)."""
    recipe, mask = s.recipe, rollouts.response_mask
    adv = torch.zeros_like(rollouts.sampler_logprobs)
    by_expert = defaultdict(list)
    for row, p in enumerate(batch):
        by_expert[p.expert].append(row)
    if recipe.method == "grpo":
        rewards = torch.zeros(len(batch))  # graded on the CPU, then moved to the rollouts' device
        texts = s.tokenizer.batch_decode(rollouts.response_token_lists(), skip_special_tokens=True)
        t0 = time.perf_counter()
        for i, rows in by_expert.items():
            verdicts = s.graders[i].grade_many([batch[r].record for r in rows], [texts[r] for r in rows])
            rewards[rows] = torch.tensor([float(v.score) for v in verdicts])
            metrics[f"{recipe.experts[i].name}/accuracy"] = float(rewards[rows].mean())
        metrics["time/grade_s"] = time.perf_counter() - t0
        seq_adv = objective.grpo_advantages(rewards.to(mask.device), recipe.train.rollouts_per_prompt)
        return seq_adv[:, None] * mask
    old_logprobs = s.old_logprobs(rollouts)
    for i, rows in by_expert.items():
        expert = recipe.experts[i]
        sub = rollouts.select(rows)
        lam = recipe.scale_of(expert)
        student_lp = old_logprobs[rows]
        teacher_lp = s.score(expert.teacher, sub)
        clip = recipe.train.log_ratio_clip
        needs_reference = lam != 1.0 or clip is not None  # a clipped log T/R no longer cancels R at lam 1
        reference_lp = s.score(reference_path(recipe, expert), sub) if needs_reference else None
        if clip is None:
            a = objective.gopd_advantages(student_lp, teacher_lp, reference_lp, lam)
        else:
            a = gopd_advantages_clipped(student_lp, teacher_lp, reference_lp, lam, clip)
        a = a * sub.response_mask
        adv[rows] = a
        m, name = sub.response_mask, expert.name
        metrics[f"{name}/reward"] = float(objective.masked_mean(a, m))
        metrics[f"{name}/reverse_kl_teacher"] = float(objective.masked_mean(objective.kl_k1(student_lp, teacher_lp), m))
        if reference_lp is not None:
            metrics[f"{name}/kl_reference"] = float(objective.masked_mean(objective.kl_k1(student_lp, reference_lp), m))
    return adv


@torch.no_grad()
def _dense_targets(s: Setup, batch: list[Prompt], rollouts: Rollouts, metrics: dict) -> torch.Tensor:
    """Dense G-OPD: log pi* = log_softmax(lam log T + (1 - lam) log R) `[B, L, V]` at every response position."""
    recipe = s.recipe
    target = None
    for i, expert in enumerate(recipe.experts):
        rows = [r for r, p in enumerate(batch) if p.expert == i]
        if not rows:
            continue
        sub, lam = rollouts.select(rows), recipe.scale_of(expert)
        tau = recipe.train.temperature  # the student's logits then converge to lam log T + (1 - lam) log R
        with s.frozen.using(expert.teacher) as model:
            teacher = response_vocab_logprobs(model, sub.to(s.frozen.device), temperature=tau).to(sub.response_ids.device)
        reference = None
        if lam != 1.0:
            with s.frozen.using(reference_path(recipe, expert)) as model:
                reference = response_vocab_logprobs(model, sub.to(s.frozen.device),
                                                    temperature=tau).to(sub.response_ids.device)
        t = target_logprobs(teacher, reference, lam)
        if target is None:
            target = t.new_zeros(*rollouts.response_ids.shape, t.shape[-1])
        target[rows] = t
        metrics[f"{expert.name}/reverse_kl_teacher"] = float(objective.masked_mean(
            objective.kl_k1(sub.sampler_logprobs, teacher.gather(-1, sub.response_ids[..., None]).squeeze(-1)),
            sub.response_mask))
    return target


def _sample(s: Setup, model, batch: list[Prompt], seeds: list[int]) -> Rollouts:
    cfg = s.recipe.train
    if model is s.student and s.sampler is not None:
        return s.sampler.sample([list(p.token_ids) for p in batch], max_new_tokens=cfg.max_new_tokens,
                                temperature=cfg.temperature, eos_token_id=s.tokenizer.eos_token_id,
                                pad_token_id=s.tokenizer.pad_token_id, seeds=seeds).to(s.student.device)
    return sample(model, [list(p.token_ids) for p in batch], max_new_tokens=cfg.max_new_tokens,
                  temperature=cfg.temperature, eos_token_id=s.tokenizer.eos_token_id,
                  pad_token_id=s.tokenizer.pad_token_id, seeds=seeds)


def _teacher_samples(s: Setup, batch: list[Prompt], seeds: list[int]) -> Rollouts:
    """SFT baseline: each domain's teacher answers its own prompts (as many trajectories as G-OPD uses)."""
    parts = []
    for i, e in enumerate(s.recipe.experts):
        rows = [r for r, p in enumerate(batch) if p.expert == i]
        if rows:
            with s.frozen.using(e.teacher, what=f"teacher of {e.name}") as teacher:
                part = _sample(s, teacher, [batch[r] for r in rows], [seeds[r] for r in rows])
            parts.append(part.to(s.student.device))
    return concat_rollouts(parts, s.tokenizer.pad_token_id)


def _sync(s: Setup) -> None:
    """Wait for queued GPU work, so the phase timings are honest."""
    if s.student.device.type == "cuda":
        torch.cuda.synchronize(s.student.device)


def train_step(s: Setup, optimizer, scheduler, step: int) -> dict:
    recipe, cfg = s.recipe, s.recipe.train
    metrics: dict = {"step": step + 1}
    t0 = time.perf_counter()
    world = distributed.world()
    prompts = s.mixer.next_batch(cfg.prompts_per_step)  # the global batch, the same on every rank
    own = slice(*distributed.shard(len(prompts), world.rank, world.size))  # this rank's prompts, all their rollouts
    batch = [p for p in prompts[own] for _ in range(cfg.rollouts_per_prompt)]
    # global row r's randomness, wherever it is sampled
    seeds = row_seeds(cfg.seed * 1_000_003 + step, len(batch), offset=own.start * cfg.rollouts_per_prompt)
    if recipe.method == "sft":
        order = sorted(range(len(batch)), key=lambda r: batch[r].expert)  # grouped by domain, as teachers sample
        batch, seeds = [batch[r] for r in order], [seeds[r] for r in order]
        rollouts = _teacher_samples(s, batch, seeds)
    else:
        with s.autocast():
            rollouts = _sample(s, s.student, batch, seeds)
    _sync(s)
    t1 = time.perf_counter()
    dense = cfg.objective == "dense"
    adv = target = None
    if dense:
        target = _dense_targets(s, batch, rollouts, metrics)
    elif recipe.method != "sft":
        adv = _advantages(s, batch, rollouts, metrics)
    _sync(s)
    t2 = time.perf_counter()

    s.student.train()
    optimizer.zero_grad(set_to_none=True)
    # the token mean over the global batch: every rank divides by the global count, gradients are summed
    total_tokens = distributed.all_reduce_sum(rollouts.response_mask.sum()).clamp(min=1)
    micro = cfg.micro_batch_size or len(batch)
    loss_sum, ratios = 0.0, []
    for lo in range(0, len(batch), micro):
        rows = list(range(lo, min(lo + micro, len(batch))))
        sub = rollouts.select(rows)
        share = sub.response_mask.sum() / total_tokens
        with s.autocast():
            if dense:  # exact reverse KL to pi* at every visited position; no sampled estimate, no ratio
                vocab_logprobs = response_vocab_logprobs(s.student, sub, temperature=cfg.temperature)
                logprobs = vocab_logprobs.gather(-1, sub.response_ids[..., None]).squeeze(-1)
            else:
                logprobs = response_logprobs(s.student, sub, temperature=cfg.temperature)
        if dense:
            loss = objective.masked_mean(dense_kl(vocab_logprobs, target[rows]), sub.response_mask) * share
        elif adv is None:
            loss = objective.sft_loss(logprobs, sub.response_mask) * share
        else:
            loss = objective.policy_gradient_loss(logprobs, sub.sampler_logprobs, adv[rows], sub.response_mask,
                                                  truncation=cfg.importance_truncation) * share
        loss.backward()
        loss_sum += float(loss.detach())
        ratios.append(torch.exp(logprobs.detach() - sub.sampler_logprobs)[sub.response_mask.bool()])
    distributed.all_reduce_grads(s.student.parameters())  # then every rank clips by the global norm
    grad_norm = torch.nn.utils.clip_grad_norm_(s.student.parameters(), cfg.grad_clip or float("inf"))
    # a non-finite loss or gradient on any rank: no rank steps, so weights and optimizer state stay finite
    nonfinite = torch.tensor(float(not (math.isfinite(loss_sum) and bool(torch.isfinite(grad_norm)))))
    skipped = bool(distributed.all_reduce_sum(nonfinite) > 0)
    if skipped:  # the step only moves the data on
        optimizer.zero_grad(set_to_none=True)
    else:
        optimizer.step()
        scheduler.step()
        if s.sampler is not None:
            s.sampler.sync_weights(s.student)  # the next rollouts come from the updated weights
    s.skipped_steps += skipped
    _sync(s)
    t3 = time.perf_counter()

    ratio = torch.cat(ratios) if ratios else torch.ones(1)
    lengths = rollouts.lengths
    weights = {"tokens": float(lengths.sum()), "sequences": len(batch)}  # for the reduction over ranks
    for i, e in enumerate(recipe.experts):
        rows = [r for r, p in enumerate(batch) if p.expert == i]
        if rows:
            metrics[f"{e.name}/response_length"] = float(lengths[rows].mean())
            metrics[f"{e.name}/truncation_rate"] = float(rollouts.truncated[rows].float().mean())
            metrics[f"{e.name}/n_sequences"] = len(rows)
            weights.update({f"{e.name}/tokens": float(lengths[rows].sum()), f"{e.name}/sequences": len(rows)})
    metrics.update({
        "loss": loss_sum, "grad_norm": float(grad_norm), "lr": scheduler.get_last_lr()[0],
        "skipped": int(skipped), "skipped_steps": s.skipped_steps,
        "response_length": float(lengths.mean()), "truncation_rate": float(rollouts.truncated.float().mean()),
        "importance_ratio/mean": float(ratio.mean()), "importance_ratio/min": float(ratio.min()),
        "importance_ratio/max": float(ratio.max()),
        "time/sample_s": t1 - t0, "time/score_s": t2 - t1 - metrics.get("time/grade_s", 0.0),
        "time/update_s": t3 - t2, "time/step_s": t3 - t0,
    })
    if torch.cuda.is_available() and s.student.device.type == "cuda":
        metrics["memory/gpu_peak_gib"] = torch.cuda.max_memory_allocated(s.student.device) / 2**30
    return distributed.reduce_metrics(distributed.gather((metrics, weights)))


# ------------------------------------------------------------------------------------ optimisation


def make_optimizer(s: Setup):
    cfg = s.recipe.train
    params = list(s.student.parameters())
    # the fused kernel: one pass over each tensor, no temporaries the size of the model
    # (`python benchmarks/optimizer_step.py`: faster and lighter than the for-loop and foreach forms)
    fused = all(p.device.type in ("cpu", "cuda") for p in params)
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.999),
                                  eps=1e-8, fused=fused)

    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.lr_schedule == "constant" or cfg.steps <= cfg.warmup_steps:
            return 1.0
        progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return 1.0 - progress if cfg.lr_schedule == "linear" else 0.5 * (1 + math.cos(math.pi * progress))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# ---------------------------------------------------------------------------------- checkpoints


def checkpoint_dirs(output_dir: Path) -> list[tuple[int, Path]]:
    root = output_dir / "checkpoints"
    found = []
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith("step-") and (p / TRAINER_STATE).is_file():
                found.append((int(p.name.removeprefix("step-")), p))
    return sorted(found)


def save_checkpoint(s: Setup, optimizer, scheduler, step: int) -> Path:
    """Rank 0 writes the full state (every rank holds all of it), so a run resumes on any number of ranks."""
    out = Path(s.recipe.output_dir) / "checkpoints" / f"step-{step}"
    if distributed.is_main():
        with atomic_dir(out) as tmp:
            s.student.save_pretrained(tmp, safe_serialization=True)
            s.tokenizer.save_pretrained(tmp)
            torch.save({"step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                        "mixer": s.mixer.state_dict(), "skipped_steps": s.skipped_steps}, tmp / TRAINER_STATE)
        for _, old in checkpoint_dirs(Path(s.recipe.output_dir))[: -s.recipe.train.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
    distributed.barrier()
    return out


def resume_from(s: Setup, optimizer, scheduler) -> int:
    found = checkpoint_dirs(Path(s.recipe.output_dir))
    if not found:
        return 0
    step, path = found[-1]
    state_dict = load_model(path, what="checkpoint").state_dict()
    s.student.load_state_dict(state_dict)
    state = torch.load(path / TRAINER_STATE, weights_only=False, map_location="cpu")
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    s.mixer.load_state_dict(state["mixer"])
    s.skipped_steps = state.get("skipped_steps", 0)
    if s.sampler is not None:
        s.sampler.sync_weights(s.student)
    return step


def check_manifest(recipe: Recipe, resume: bool) -> None:
    """A run's teachers, references and reward scales are fixed: resuming with others is an error."""
    path = Path(recipe.output_dir) / "manifest.json"
    manifest = recipe.manifest()
    if path.exists() and resume:
        old = json.loads(path.read_text())
        if old != manifest:
            changed = [k for k in manifest if old.get(k) != manifest[k]]
            raise UserError(f"{path}: the recipe's {', '.join(changed)} differ from the run being resumed; "
                            "use a new output_dir, or restore the original recipe")
    elif path.exists() and checkpoint_dirs(Path(recipe.output_dir)):
        raise UserError(f"output_dir '{recipe.output_dir}' already holds a run; pass --resume to continue it, "
                        "or choose another output_dir")
    if distributed.is_main():
        atomic_write_json(path, manifest)


# ------------------------------------------------------------------------------------------ loop


class MetricsLog:
    """metrics.jsonl (and TensorBoard when installed); on resume, lines past the checkpoint are dropped."""

    def __init__(self, output_dir: Path, start_step: int):
        self.path = output_dir / "metrics.jsonl"
        if self.path.exists():
            kept = [l for l in self.path.read_text().splitlines() if l.strip() and json.loads(l).get("step", 0) <= start_step]
            self.path.write_text("".join(l + "\n" for l in kept))
        self.file = open(self.path, "a")
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(output_dir / "tensorboard"))
        except ImportError:
            self.tb = None

    def write(self, metrics: dict) -> None:
        self.file.write(json.dumps(metrics) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in metrics.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, metrics["step"])

    def close(self) -> None:
        self.file.close()
        if self.tb is not None:
            self.tb.close()


def merge_weights(recipe: Recipe) -> Path:
    """Methods expo and merge: combine the experts' weights (relative to the student), no training."""
    from merge_distill.merging import merge_models

    m, out = recipe.merge, Path(recipe.output_dir) / "final"
    teachers = [e.teacher for e in recipe.experts]
    if recipe.method == "expo":
        return merge_models("expo", recipe.student, teachers, out, alpha=m.alpha)
    params = {"scale": m.scale} if m.technique != "linear" else {}
    if m.technique in ("ties", "dare") and m.density is not None:
        params["density"] = m.density
    if m.technique == "dare":
        params["seed"] = m.seed
    return merge_models(m.technique, recipe.student, teachers, out, **params)


def train(recipe: Recipe, *, resume: bool = False, progress=None, on_eval=None) -> Path:
    """Run (or resume) the recipe's training; returns the path of the final checkpoint.

    Under `torchrun` every rank calls this: the ranks share each step's prompts (data parallel), and rank 0
    alone logs, evaluates periodically (`on_eval`) and writes checkpoints (see `merge_distill.distributed`).
    """
    world = distributed.init(recipe.device)
    if world.size > 1:
        if recipe.method in ("gopd", "grpo", "sft") and recipe.train.prompts_per_step < world.size:
            raise UserError(f"train.prompts_per_step ({recipe.train.prompts_per_step}) is smaller than the "
                            f"number of ranks ({world.size}): every rank needs at least one prompt per step")
        frozen = recipe.placement.frozen_device
        placement = recipe.placement.model_copy(update={"frozen_device": frozen and distributed.device_for(frozen)})
        recipe = recipe.model_copy(update={"device": distributed.device_for(recipe.device), "placement": placement})
        progress, on_eval = (progress, on_eval) if world.main else (None, None)
    output_dir = Path(recipe.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    check_manifest(recipe, resume)
    if recipe.method in ("expo", "merge"):
        final = output_dir / "final"
        if world.main:
            check_models(recipe)
            final = merge_weights(recipe)
        distributed.barrier()
        return final
    if recipe.train.threads:
        torch.set_num_threads(recipe.train.threads)
    s = setup(recipe)
    optimizer, scheduler = make_optimizer(s)
    start = resume_from(s, optimizer, scheduler) if resume else 0
    log = MetricsLog(output_dir, start) if world.main else None
    cfg = recipe.train
    task = progress.add_task(f"train ({recipe.method})", total=cfg.steps, completed=start) if progress else None
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
                    f"skipped (train.max_consecutive_skips {cfg.max_consecutive_skips}); the weights are those of step "
                    f"{done - in_a_row}; see {output_dir / 'metrics.jsonl'}, lower train.lr or keep "
                    "train.importance_truncation on")
            if cfg.eval_every and done % cfg.eval_every == 0 and done < cfg.steps and on_eval:
                metrics.update(on_eval(s.student, done))
            if log:
                log.write(metrics)
            if cfg.checkpoint_every and done % cfg.checkpoint_every == 0 and done < cfg.steps:
                save_checkpoint(s, optimizer, scheduler, done)
            if progress:
                progress.update(task, completed=done, description=_describe(recipe, metrics))
        save_checkpoint(s, optimizer, scheduler, cfg.steps)
        if world.main:
            with atomic_dir(output_dir / "final") as tmp:
                s.student.save_pretrained(tmp, safe_serialization=True)
                s.tokenizer.save_pretrained(tmp)
        distributed.barrier()
    finally:
        if log:
            log.close()
        for g in s.graders.values():
            getattr(g, "close", lambda: None)()
    return output_dir / "final"


def _describe(recipe: Recipe, m: dict) -> str:
    """The progress bar's line: each domain's accuracy (GRPO) or reverse KL to its teacher, else the loss."""
    key, label = ("accuracy", "accuracy") if recipe.method == "grpo" else ("reverse_kl_teacher", "KL to teacher")
    parts = [f"{e.name} {label} {m[f'{e.name}/{key}']:.3f}" for e in recipe.experts if f"{e.name}/{key}" in m]
    if not parts and "loss" in m:
        parts = [f"loss {m['loss']:.3f}"]
    return f"train ({recipe.method}) " + ", ".join(parts)
