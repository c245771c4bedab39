"""Recipes: validated YAML describing a distillation run. One meaning per key; unknown keys are errors.

Relative paths are relative to the current working directory. Sections and path schemes that extensions
register (`merge_distill.extensions`, e.g. the toy world's `zoo:`) are resolved on the raw data when it loads
(`validate.load_recipe`): the schema sees plain paths.

This module is the schema alone: each section checks its own keys. Loading a file, `--set` overrides and the
checks that span sections or ask a registry (the method's own) are `merge_distill.validate`'s.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

STUDENT = "student"  # `reference: student` = the student's initial weights

# Where each key of the former `train:` section lives now (`seed` is top level).
TRAIN_KEYS_MOVED = {
    "objective": "method.objective", "importance_truncation": "method.importance_truncation",
    "log_ratio_clip": "method.log_ratio_clip", "seed": "seed",
    **{k: f"rollout.{k}" for k in ("prompts_per_step", "rollouts_per_prompt", "max_new_tokens", "temperature")},
    **{k: f"optim.{k}" for k in ("lr", "lr_schedule", "warmup_steps", "weight_decay", "grad_clip")},
    **{k: f"budget.{k}" for k in ("micro_batch_size", "max_tokens_per_micro_batch", "max_rollout_tokens",
                                  "gradient_checkpointing", "threads")},
    **{k: f"schedule.{k}" for k in ("steps", "eval_every", "checkpoint_every", "keep_checkpoints",
                                    "max_consecutive_skips")},
}
SCORING_REMOVED = ("backend.scoring was removed: teachers and references always score through the trainer's "
                   "chunked scorer; delete the line")


def train_keys_moved(keys: list[str]) -> str:
    """One line for recipe data that still has a `train:` section with these keys: where each went."""
    moved = [f"train.{k} moved to {TRAIN_KEYS_MOVED[k]}" if k in TRAIN_KEYS_MOVED else f"train.{k} is an unknown key"
             for k in keys]
    return (f"{'; '.join(moved) or 'train: is not a section any more'} (the train: section was split into "
            "method, optim, rollout, budget, schedule)")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DatasetSpec(Strict):
    """Prompts from the `datasets` library (a hub name when a hub is reachable, or a local folder)."""

    dataset: str
    split: str = "train"
    config: str | None = None


class Expert(Strict):
    name: str = Field(description="the domain, e.g. math; prompts of this domain are scored by this teacher only")
    teacher: str | None = Field(None, description="the domain's expert; required by every method but grpo")
    reference: str = Field(STUDENT, description="'student' (initial weights) or a model path, e.g. the teacher's pre-RL base (reward correction)")
    reward_scale: Annotated[float, Field(ge=0)] | None = Field(None, description="lam for this domain; defaults to the recipe's reward_scale")
    prompts: str | DatasetSpec
    weight: Annotated[float, Field(gt=0)] = Field(1.0, description="share of each batch (normalised over experts)")
    grader: str | None = Field(None, description="grader used to evaluate (and for GRPO, reward) this domain; defaults to the name")
    prompt_template: str = Field("{prompt}", description="Python format string over the record's fields; the user message")
    system_prompt: str | None = None
    eval_suite: str | None = Field(None, description="held-out suite for this domain (default: zoo-<name> when the recipe uses a zoo)")

    @property
    def grader_name(self) -> str:
        return self.grader or self.name


class MethodSpec(Strict):
    """What is trained and with which loss. `method: grpo` is short for `method: {name: grpo}`."""

    name: str = Field(
        "gopd", description="a registered method (`merge_distill.methods`): gopd: G-OPD/ExOPD; grpo: outcome-reward "
                            "RL; sft: fine-tune on teacher samples; expo: weight extrapolation; merge: weight-space merging")
    objective: Literal["sampled", "dense"] = Field(
        "sampled", description="sampled: the paper's per-token estimator on the sampled tokens; dense: the exact "
                               "reverse KL to normalised T^lam R^(1-lam) over the whole vocabulary at every "
                               "response position (method gopd, small vocabularies)")
    importance_truncation: Annotated[float, Field(gt=0)] | None = Field(5.0, description="truncate ratio pi_theta/pi_sampler at this value; null = off")
    log_ratio_clip: Annotated[float, Field(gt=0)] | None = Field(
        None, description="clip the per-token log T/R to [-c, c] (to study the reward hacking seen at lam 1.5); off by default")


class Rollout(Strict):
    """The student's samples each step."""

    prompts_per_step: Annotated[int, Field(ge=1)] = 64
    rollouts_per_prompt: Annotated[int, Field(ge=1)] = 1
    max_new_tokens: Annotated[int, Field(ge=1)] = 256
    temperature: Annotated[float, Field(gt=0)] = Field(
        1.0, description="rollout temperature tau. The student samples from softmax(logits / tau), and teachers and "
                         "references score the sampled tokens at the same tau (as the official G-OPD code does), so "
                         "the student's logits converge to lam * teacher + (1 - lam) * reference whatever tau is: "
                         "sampled at temperature 1 it is pi* = T^lam R^(1-lam) / Z. The paper used 1")


class Optim(Strict):
    """The student's optimizer (AdamW) and learning-rate schedule."""

    lr: Annotated[float, Field(gt=0)] = 1e-5
    lr_schedule: Literal["constant", "linear", "cosine"] = "constant"
    warmup_steps: Annotated[int, Field(ge=0)] = 0
    weight_decay: Annotated[float, Field(ge=0)] = 0.0
    grad_clip: Annotated[float, Field(gt=0)] | None = 1.0


class Budget(Strict):
    """Memory and compute limits: how one step's work is cut into passes, and the CPU threads it runs on."""

    micro_batch_size: Annotated[int, Field(ge=1)] | None = Field(None, description="sequences per forward/backward (gradient accumulation); default all")
    max_tokens_per_micro_batch: Annotated[int, Field(ge=1)] | None = Field(
        None, description="token budget of one forward: the update's micro-batches and frozen scoring take rows (by "
                          "length) while rows x their longest prompt + response stays within it (a longer row goes "
                          "alone); default no budget")
    max_rollout_tokens: Annotated[int, Field(ge=1)] | None = Field(
        None, description="KV-cache budget of one sampling call, in tokens: rollouts are sampled in row chunks of at "
                          "most this / (longest prompt + max_new_tokens) rows (per-row seeds: the same responses); "
                          "with backend.rollout paged, the paged cache's capacity (rows wait for free pages)")
    gradient_checkpointing: bool = Field(
        False, description="recompute each decoder layer's activations in the backward pass (non-reentrant): "
                           "activation memory per token per layer falls ~20x for ~1/3 more update compute")
    threads: Annotated[int, Field(ge=1)] | None = None


class Schedule(Strict):
    """How long the run trains and what it does on the way."""

    steps: Annotated[int, Field(ge=0)] = 50
    eval_every: Annotated[int, Field(ge=0)] = 0
    checkpoint_every: Annotated[int, Field(ge=0)] = Field(0, description="steps between checkpoints; 0 = only the final one")
    keep_checkpoints: Annotated[int, Field(ge=1)] = 2
    max_consecutive_skips: Annotated[int, Field(ge=1)] = Field(
        3, description="a step whose loss or gradients are not finite is skipped (the weights, optimizer state and "
                       "checkpoints never see it; counted in metrics.jsonl); this many skips in a row stop the run")


class Eval(Strict):
    suites: list[str] | None = Field(None, description="default: each expert's eval_suite")
    samples: Annotated[int, Field(ge=1)] = 1
    temperature: Annotated[float, Field(ge=0)] = 1.0
    max_new_tokens: Annotated[int, Field(ge=1)] | None = None
    max_problems: Annotated[int, Field(ge=1)] | None = None
    baselines: bool = Field(True, description="also evaluate the student's initial weights ('base') and each teacher")
    teacher_temperatures: list[Annotated[float, Field(ge=0)]] = Field(
        default_factory=list, description="extra decoding temperatures for the teachers (e.g. 0.8 = 1/lam, 0 = greedy)")
    seed: int = 1234
    closed_form: bool = Field(False, description="also evaluate each domain's training-free closed-form sampler "
                                                 "(decode from lam*log T + (1-lam)*log R) as model 'closed_form'")


class Placement(Strict):
    """Where the frozen models (teachers, references) live."""

    frozen_device: str | None = Field(None, description="device of teachers and references; default: the recipe's device")
    offload: bool = Field(False, description="keep frozen models on the CPU between uses, moving each to "
                                             "frozen_device only while it scores")
    shard_frozen: bool = Field(False, description="under torchrun: shard each teacher and reference over the ranks "
                                                  "(FSDP2, per decoder layer) instead of a whole copy on every rank")
    offload_optimizer: bool = Field(False, description="parallel fsdp: keep the student's sharded fp32 weights, "
                                                       "gradients and AdamW state in host memory; the optimizer "
                                                       "steps on the CPU (torch's CPUOffloadPolicy)")


class Variant(Strict):
    """One arm of a comparison: a name for the tables and recipe overrides (dotted keys)."""

    name: str
    set: dict[str, Any] = Field(default_factory=dict)

    @field_validator("set")
    @classmethod
    def _no_train_keys(cls, sets: dict[str, Any]) -> dict[str, Any]:
        old = [k for k in sets if k.split(".")[0] == "train"]
        if old:
            raise ValueError(train_keys_moved([k.removeprefix("train.") for k in old if k != "train"]))
        return sets


class Merge(Strict):
    """Weight-space baselines (method expo or merge): no training, the experts' weights are combined."""

    technique: Literal["linear", "task_arithmetic", "ties", "dare"] = "task_arithmetic"
    scale: float = 1.0
    density: Annotated[float, Field(gt=0, le=1)] | None = Field(None, description="ties/dare: share of each task vector kept")
    alpha: float = Field(0.3, description="expo: theta = avg + alpha * (avg - student)")
    seed: int = 0


class Backend(Strict):
    """Inference engines for the student's rollouts and the frozen scorers. "vllm" is the optional extra
    `pip install 'merge-distill[vllm]'` (CUDA only); the trainer gets its engines from
    `merge_distill.engines.make_sampler(recipe, student)`. Teachers and references always score through the
    trainer's own chunked scorer (`merge_distill.scoring`)."""

    rollout: Literal["transformers", "paged", "vllm"] = Field(
        "transformers", description="transformers: padded KV-cached batches (every row stays until the longest "
                                    "ends); paged: transformers' continuous batching over a paged KV cache (a "
                                    "finished row frees its pages for a waiting one; the same responses from the "
                                    "same seeds; also used for evaluation and for sampling frozen teachers); "
                                    "vllm: the optional vLLM engine")
    gpu_memory_utilization: Annotated[float, Field(gt=0, le=1)] = Field(
        0.5, description="share of each GPU's memory the vLLM sampler takes while it samples (vLLM's own key): its "
                         "weights, activations and KV cache; the rest of the GPU must hold the trainer's sample "
                         "phase (`merge-distill plan`)")
    max_num_seqs: Annotated[int, Field(ge=1)] | None = Field(
        None, description="the vLLM sampler's most rows decoding at once (vLLM's key; None: vLLM's default). Rows "
                          "beyond what its KV cache holds are preempted and recomputed: size it to the KV cache's "
                          "tokens over a row's mean length")
    max_num_batched_tokens: Annotated[int, Field(ge=1)] | None = Field(
        None, description="the vLLM sampler's most tokens in one forward, prompt chunks included (vLLM's key; None: "
                          "vLLM's default); its activations at this size come out of gpu_memory_utilization")
    batch_invariant: bool = Field(
        False, description="run the vLLM sampler with VLLM_BATCH_INVARIANT=1 (set, or 0, by the adapter before the "
                           "engine is built): a row's tokens then do not depend on the rows sharing its batch, at the "
                           "cost of slower kernels process-wide (docs/scale_out.md). Off: the per-row seed fixes a "
                           "row's draws, the logits they are drawn from vary with the batch in the last bits")
    check_sync_every: Annotated[int, Field(ge=0)] = Field(
        10, description="every this many steps (and after the first), an engine with its own copy of the weights "
                        "(vLLM) samples a probe after the update and the trainer scores it: log-probs that differ "
                        "beyond the dtype's tolerance (stale or lost weights) stop the run. 0: never")
    sleep_level: Literal[0, 1, 2] = Field(
        2, description="the vLLM sampler between rollouts (vLLM's sleep mode, as TRL and verl colocate it): 2 frees "
                       "its weights and KV cache (it reloads the trainer's weights at each wake); 1 frees the KV "
                       "cache and offloads the weights to host memory; 0 keeps both on the GPU")

    @model_validator(mode="after")
    def _vllm_keys_need_vllm(self) -> "Backend":
        """The vLLM sampler's settings mean nothing to the transformers engines: set, they must not be ignored."""
        given = [k for k in ("max_num_seqs", "max_num_batched_tokens") if getattr(self, k) is not None]
        given += ["batch_invariant"] * self.batch_invariant
        if given and self.rollout != "vllm":
            raise ValueError(f"backend.{given[0]} sets the vLLM sampler, but backend.rollout is {self.rollout}")
        return self


class Recipe(Strict):
    method: MethodSpec = Field(default_factory=MethodSpec)
    student: str
    reward_scale: Annotated[float, Field(ge=0)] = 1.25
    experts: list[Expert] = Field(min_length=1)
    seed: int = Field(0, description="the run's seed: the domain mixer's draws and each rollout's per-row seeds")
    rollout: Rollout = Field(default_factory=Rollout)
    optim: Optim = Field(default_factory=Optim)
    budget: Budget = Field(default_factory=Budget)
    schedule: Schedule = Field(default_factory=Schedule)
    eval: Eval | None = None
    merge: Merge = Field(default_factory=Merge)
    compare: list[Variant] | None = Field(None, description="run these variants of the recipe and evaluate them "
                                                             "side by side (e.g. sft, expo, ties, opd, exopd)")
    compare_against: str | None = Field(
        None, description="a compare: variant's name: every other variant is also reported minus it (paired, on "
                          "every suite), e.g. exopd - opd")
    output_dir: str
    allow_chat_template_mismatch: bool = False
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="teachers and references are stored in it and the student computes in it "
                               "(autocast; under fsdp its MixedPrecisionPolicy); the student's weights and "
                               "optimizer stay float32")
    export_dtype: Literal["float32", "bfloat16", "float16"] | None = Field(
        None, description="dtype of the final model folder (final/); default: `dtype`. Checkpoints keep the float32 "
                          "weights and optimizer state whatever it is")
    device: str = Field("cpu", description="torch device of the student and frozen models, e.g. cpu, cuda, cuda:1")
    parallel: Literal["ddp", "fsdp"] = Field(
        "ddp", description="under torchrun: ddp replicates the student on every rank (torch's DistributedDataParallel); "
                           "fsdp shards its weights, gradients and optimizer state per decoder layer (torch's "
                           "fully_shard), computing in `dtype` (MixedPrecisionPolicy). One process: no effect")
    placement: Placement = Field(default_factory=Placement)
    backend: Backend = Field(default_factory=Backend)
    report_to: list[Literal["tensorboard", "wandb", "trackio", "mlflow"]] = Field(
        default_factory=list, description="experiment trackers that also get the recipe, each step's metrics and "
                                          "the final evaluation tables and figures, each through its own library "
                                          "(the extra of its name: pip install 'merge-distill[wandb]'); "
                                          "metrics.jsonl is written whatever this is (merge_distill.tracking)")
    tracker_required: bool = Field(
        True, description="a report_to tracker that fails to start (package missing, no login) stops the run before "
                          "training; false: one warning line and the run goes on without it")
    isolation: Literal["bubblewrap", "rlimits"] = Field(
        "bubblewrap", description="how model-written code is isolated wherever this run grades it: GRPO's rewards, "
                                  "periodic and final evaluation, building the zoo's experts. bubblewrap: namespaces "
                                  "(the run stops before it starts where bubblewrap is missing); rlimits: the opt-out, "
                                  "resource limits alone (programs can read this user's files and reach the network). "
                                  "`--isolation` on the command line overrides it")

    @model_validator(mode="before")
    @classmethod
    def _removed_keys(cls, data):
        """Keys of earlier versions, refused with where they went (one line, not a list of unknown keys)."""
        if isinstance(data, dict) and "train" in data:
            raise ValueError(train_keys_moved(list(data["train"]) if isinstance(data["train"], dict) else []))
        if isinstance(data, dict) and isinstance(data.get("backend"), dict) and "scoring" in data["backend"]:
            raise ValueError(SCORING_REMOVED)
        return data

    @field_validator("method", mode="before")
    @classmethod
    def _method_by_name(cls, value):
        """`method: grpo` is `method: {name: grpo}`."""
        return {"name": value} if isinstance(value, str) else value

    @field_validator("experts")
    @classmethod
    def _unique_names(cls, experts: list[Expert]) -> list[Expert]:
        seen = set()
        for e in experts:
            if e.name in seen:
                raise ValueError(f"two experts are named '{e.name}'; each domain needs one expert")
            seen.add(e.name)
        return experts

    @model_validator(mode="after")
    def _compare_against_a_variant(self) -> "Recipe":
        names = [v.name for v in self.compare or []]
        if self.compare_against is not None and self.compare_against not in names:
            raise ValueError(f"compare_against '{self.compare_against}' is not a compare: variant "
                             f"({', '.join(names) or 'there are none'})")
        return self

    def scale_of(self, expert: Expert) -> float:
        return self.reward_scale if expert.reward_scale is None else expert.reward_scale

    def model_paths(self) -> list[str]:
        paths = [self.student]
        for e in self.experts:
            if e.teacher:
                paths.append(e.teacher)
            if e.reference != STUDENT:
                paths.append(e.reference)
        return paths

    def manifest(self) -> dict[str, Any]:
        """What must not change when a run resumes."""
        return {
            "student": self.student,
            "method": self.method.name,
            "experts": [{"name": e.name, "teacher": e.teacher, "reference": e.reference,
                         "reward_scale": self.scale_of(e)} for e in self.experts],
        }
