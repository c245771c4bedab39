"""A run assembled from its parts: the edge between a recipe and the loop (`merge_distill.train`).

`build_run(recipe)` loads and checks everything a training run needs on this rank (the student in the recipe's
layout, its rollout engine, the frozen models, graders, prompts, optimizer, checkpoints); any part can be passed
in instead (`sampler=`, `frozen=`, `graders=`), e.g. a test's own engine or a spy on the frozen models.
`train_recipe(recipe)` is a whole run: one live run per output folder, build, resume, train, close.
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path

import torch

from merge_distill import adapters, distributed, parallel
from merge_distill.adapters import AdapterHost, check_adapter
from merge_distill.parallel import collectives
from merge_distill.checkpoint import Attributes, Checkpointer, check_manifest, holding
from merge_distill.data import DomainMixer, Prompt, load_records, render_prompt, user_message
from merge_distill.engines import Sampler, make_sampler
from merge_distill.errors import UserError
from merge_distill.frozen import ModelCache
from merge_distill.merging import write_merge
from merge_distill.methods import frozen_models, method_of, trains
from merge_distill.models import check_compatible, load_model, load_sharded, load_tokenizer, model_info
from merge_distill.recipe import STUDENT, TEACHER_BASE, AdapterModel, Recipe
from merge_distill.tracking import open_trackers
from merge_distill.train import Run, train


def train_recipe(recipe: Recipe, *, resume: bool = False, progress=None, on_eval=None, trackers=None,
                 **parts) -> Path:
    """Train (or resume) the recipe, or for a weight-space method write its merge (`merging.COMBINERS`); the final
    model's path. Under `torchrun` every rank calls this, in the process group the command joined
    (`run.start`). `trackers`: the run's experiment trackers (`tracking.Trackers`), left open for the caller to
    log its evaluation to; None: the recipe's `report_to`, opened here on rank 0 and closed after training.
    `parts`: passed to `build_run`."""
    with holding(recipe.output_dir):  # one live run per output_dir
        check_manifest(recipe, resume)
        if not trains(recipe):
            if distributed.is_main():
                check_models(recipe)
                write_merge(recipe)
            collectives.barrier()
            return Path(recipe.output_dir) / "final"
        with contextlib.ExitStack() as stack:
            if trackers is None:  # before the models load: a tracker that must start and cannot stops the run here
                trackers = stack.enter_context(open_trackers(recipe))
            run = build_run(recipe, eval_tokens=getattr(on_eval, "max_tokens", 0), **parts)
            stack.callback(run.close)
            start = run.checkpoints.resume() if resume else 0
            if start:
                run.sampler.sync_weights(run.student)
            return train(run, start=start, progress=progress, on_eval=on_eval, trackers=trackers)


def build_run(recipe: Recipe, *, sampler: Sampler | None = None, frozen: ModelCache | None = None,
              graders: dict | None = None, eval_tokens: int = 0) -> Run:
    """The parts of a run of `recipe` on this rank. `eval_tokens`: the most prompt + response tokens a periodic
    evaluation request takes (it sizes a vLLM engine's `max_model_len`, with the longest training prompt +
    `rollout.max_new_tokens`)."""
    method = method_of(recipe)
    world = distributed.world()
    if world.size > 1 and recipe.rollout.prompts_per_step < world.size:
        raise UserError(f"rollout.prompts_per_step ({recipe.rollout.prompts_per_step}) is smaller than the number of "
                        f"ranks ({world.size}): every rank needs at least one prompt per step")
    if recipe.budget.threads:
        torch.set_num_threads(recipe.budget.threads)
    device = distributed.device_for(recipe.device)
    if method.graded and graders is None:  # a grader that runs code needs its isolation before any model loads
        from merge_distill.graders import sandbox_level

        sandbox_level([e.grader_name for e in recipe.experts], recipe.isolation)
    check_models(recipe)
    tokenizer = load_tokenizer(recipe.student.path, what="student")
    if tokenizer.pad_token_id is None or tokenizer.eos_token_id is None:
        raise UserError(f"student '{recipe.student.path}': its tokenizer needs an eos_token and a pad_token")
    student, policy, host = load_student(recipe, device)
    pools = load_prompts(recipe, tokenizer)
    mixer = DomainMixer(pools, [e.weight for e in recipe.experts], recipe.seed)
    if sampler is None:
        longest = max((len(p.token_ids) for pool in pools for p in pool), default=0)
        sampler = make_sampler(recipe, student, device=device, wrapped=policy if parallel.is_sharded(policy) else None,
                               max_model_len=max(longest + recipe.rollout.max_new_tokens, eval_tokens))
    if frozen is None:
        frozen_device = recipe.placement.frozen_device
        frozen = ModelCache(dtype=getattr(torch, recipe.dtype),  # frozen models are stored in the recipe's dtype
                            device=distributed.device_for(frozen_device) if frozen_device else device,
                            offload=recipe.placement.offload, max_tokens=recipe.budget.max_tokens_per_micro_batch,
                            shard=parallel.shard_frozen if recipe.placement.shard_frozen and distributed.active()
                            else None)
    if host is not None:  # the LoRA student's base serves its reference and the adapter teachers of that base
        frozen.host(recipe.student.path, host)
    for e in recipe.experts:
        if isinstance(e.teacher, AdapterModel) and trains(recipe):
            frozen.hosts_adapters_of(e.teacher.base)
    if graders is None and method.graded:
        from merge_distill.graders import get_grader

        graders = {i: get_grader(e.grader_name, isolation=recipe.isolation) for i, e in enumerate(recipe.experts)}
    optimizer, scheduler = make_optimizer(recipe, student)
    run = Run(recipe, method, tokenizer, student, policy, sampler, frozen, graders or {}, mixer, torch.device(device),
              optimizer, scheduler)
    run.checkpoints = checkpointer(run)
    return run


def check_models(recipe: Recipe) -> None:
    """Every model the run loads exists, loads a tokenizer, and agrees with the student token for token."""
    infos = {"student": model_info(recipe.student.path, what="student")}
    for i, e in enumerate(recipe.experts):
        for role, ref in frozen_models(recipe, e).items():
            what = f"experts.{i}.{role} ({e.name})"
            if isinstance(ref, AdapterModel):
                check_adapter(ref, what=what)  # its tokenizer and vocabulary are its base's
                ref = ref.base
            if ref not in (STUDENT, TEACHER_BASE):
                infos[f"{role} of expert '{e.name}'"] = model_info(ref, what=what)
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


def load_student(recipe: Recipe, device: str) -> tuple[torch.nn.Module, torch.nn.Module, AdapterHost | None]:
    """The student (float32 weights on `device`), `ModelLogprobs(student)` in the recipe's layout
    (`parallel.wrap_student`), and for a LoRA student (`student.lora`) the `AdapterHost` its base serves from
    (None otherwise, and under fsdp). Under fsdp it is built on the meta device on every rank, sharded, and filled
    from rank 0's one copy (`models.load_sharded`); its shards live on the host with `placement.offload_optimizer`.

    A LoRA student is its base with a fresh peft adapter in its layers (`adapters.add_lora`, drawn with the run's
    seed): `student` is the base model object, whose adapter parameters alone require gradients."""
    lora = recipe.student.lora

    def with_lora(model):
        return adapters.add_lora(model, lora, recipe.seed) if lora else model

    def checkpointed(student):
        if recipe.budget.gradient_checkpointing:
            if hasattr(student, "activation_checkpointing_enable"):  # transformers >= 5.24's name
                student.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return student

    if recipe.parallel == "fsdp" and distributed.active():
        wrapped = load_sharded(recipe.student.path, lambda m, _: parallel.wrap_student(checkpointed(m), recipe, device),
                               what="student", trainable=True,
                               device="cpu" if recipe.placement.offload_optimizer else device,
                               transform=lambda m: with_lora(m).get_base_model() if lora else m)
        return parallel.root_of(wrapped).model, wrapped, None
    model = load_model(recipe.student.path, what="student", dtype=torch.float32, trainable=not lora).to(device)
    peft_model = with_lora(model)
    student = checkpointed(model)  # (with lora: the base model object, the adapter in its layers)
    host = (adapters.AdapterHost(student, peft_model, trainable=adapters.STUDENT_ADAPTER,
                                 dtype=getattr(torch, recipe.dtype)) if lora else None)
    return student, parallel.wrap_student(student, recipe, device), host


def make_optimizer(recipe: Recipe, student: torch.nn.Module):
    cfg, steps = recipe.optim, recipe.schedule.steps
    params = [p for p in student.parameters() if p.requires_grad]  # (a LoRA student: its adapter's alone)
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


def checkpointer(run: Run) -> Checkpointer:
    """What a checkpoint holds: everything a resumed run needs to continue as if it had not stopped."""
    checkpoints = Checkpointer(Path(run.recipe.output_dir), every=run.recipe.schedule.checkpoint_every,
                               keep=run.recipe.schedule.keep_checkpoints)
    checkpoints.register("model", parallel.ModelState(run.student))
    checkpoints.register("optimizer", parallel.OptimizerState(run.student, run.optimizer))
    checkpoints.register("scheduler", run.scheduler)
    checkpoints.register("mixer", run.mixer)
    checkpoints.register("trainer", Attributes(run, "skipped_steps"))
    return checkpoints
