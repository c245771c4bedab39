"""Recipes: validated YAML describing a distillation run. One meaning per key; unknown keys are errors.

Relative paths are relative to the current working directory. Sections and path schemes that extensions
register (`merge_distill.extensions`, e.g. the toy world's `zoo:`) are resolved on the raw data when it loads.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from merge_distill import extensions
from merge_distill.errors import UserError

STUDENT = "student"  # `reference: student` = the student's initial weights


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


class Train(Strict):
    steps: Annotated[int, Field(ge=0)] = 50
    prompts_per_step: Annotated[int, Field(ge=1)] = 64
    rollouts_per_prompt: Annotated[int, Field(ge=1)] = 1
    max_new_tokens: Annotated[int, Field(ge=1)] = 256
    temperature: Annotated[float, Field(gt=0)] = Field(
        1.0, description="rollout temperature tau. The student samples from softmax(logits / tau), and teachers and "
                         "references score the sampled tokens at the same tau (as the official G-OPD code does), so "
                         "the student's logits converge to lam * teacher + (1 - lam) * reference whatever tau is: "
                         "sampled at temperature 1 it is pi* = T^lam R^(1-lam) / Z. The paper used 1")
    lr: Annotated[float, Field(gt=0)] = 1e-5
    lr_schedule: Literal["constant", "linear", "cosine"] = "constant"
    warmup_steps: Annotated[int, Field(ge=0)] = 0
    weight_decay: Annotated[float, Field(ge=0)] = 0.0
    grad_clip: Annotated[float, Field(gt=0)] | None = 1.0
    importance_truncation: Annotated[float, Field(gt=0)] | None = Field(5.0, description="truncate ratio pi_theta/pi_sampler at this value; null = off")
    objective: Literal["sampled", "dense"] = Field(
        "sampled", description="sampled: the paper's per-token estimator on the sampled tokens; dense: the exact "
                               "reverse KL to normalised T^lam R^(1-lam) over the whole vocabulary at every "
                               "response position (method gopd, small vocabularies)")
    log_ratio_clip: Annotated[float, Field(gt=0)] | None = Field(
        None, description="clip the per-token log T/R to [-c, c] (to study the reward hacking seen at lam 1.5); off by default")
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
    seed: int = 0
    checkpoint_every: Annotated[int, Field(ge=0)] = Field(0, description="steps between checkpoints; 0 = only the final one")
    keep_checkpoints: Annotated[int, Field(ge=1)] = 2
    eval_every: Annotated[int, Field(ge=0)] = 0
    threads: Annotated[int, Field(ge=1)] | None = None
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
    `merge_distill.engines.make_sampler(recipe, student)`. Teachers and
    references always score through the trainer's own chunked scorer (`merge_distill.scoring`)."""

    rollout: Literal["transformers", "paged", "vllm"] = Field(
        "transformers", description="transformers: padded KV-cached batches (every row stays until the longest "
                                    "ends); paged: transformers' continuous batching over a paged KV cache (a "
                                    "finished row frees its pages for a waiting one; the same responses from the "
                                    "same seeds; also used for evaluation and for sampling frozen teachers); "
                                    "vllm: the optional vLLM engine")
    scoring: Literal["transformers"] = Field(
        "transformers", description="teachers and references: the trainer's chunked scorer (the only one)")
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

    @field_validator("scoring", mode="before")
    @classmethod
    def _scoring_vllm_removed(cls, value):
        if value == "vllm":
            raise ValueError("backend.scoring vllm was removed: teachers and references score through the trainer's "
                             "chunked scorer (extra vLLM engines held their own share of the GPU, and prompt "
                             "log-probs materialise [tokens, vocab] logits vLLM's memory profiling leaves out); "
                             "delete the line (docs/scale_out.md)")
        return value

    @model_validator(mode="after")
    def _vllm_keys_need_vllm(self) -> "Backend":
        """The vLLM sampler's settings mean nothing to the transformers engines: set, they must not be ignored."""
        given = [k for k in ("max_num_seqs", "max_num_batched_tokens") if getattr(self, k) is not None]
        given += ["batch_invariant"] * self.batch_invariant
        if given and self.rollout != "vllm":
            raise ValueError(f"backend.{given[0]} sets the vLLM sampler, but backend.rollout is {self.rollout}")
        return self


class Recipe(Strict):
    method: str = Field(
        "gopd", description="a registered method (`merge_distill.methods`): gopd: G-OPD/ExOPD; grpo: outcome-reward "
                            "RL; sft: fine-tune on teacher samples; expo: weight extrapolation; merge: weight-space merging")
    student: str
    reward_scale: Annotated[float, Field(ge=0)] = 1.25
    experts: list[Expert] = Field(min_length=1)
    train: Train = Field(default_factory=Train)
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
    isolation: Literal["bubblewrap", "rlimits"] = Field(
        "bubblewrap", description="how model-written code is isolated wherever this run grades it: GRPO's rewards, "
                                  "periodic and final evaluation, building the zoo's experts. bubblewrap: namespaces "
                                  "(the run stops before it starts where bubblewrap is missing); rlimits: the opt-out, "
                                  "resource limits alone (programs can read this user's files and reach the network). "
                                  "`--isolation` on the command line overrides it")

    @field_validator("experts")
    @classmethod
    def _unique_names(cls, experts: list[Expert]) -> list[Expert]:
        seen = set()
        for e in experts:
            if e.name in seen:
                raise ValueError(f"two experts are named '{e.name}'; each domain needs one expert")
            seen.add(e.name)
        return experts

    @field_validator("method")
    @classmethod
    def _registered_method(cls, name: str) -> str:
        from merge_distill.merging import COMBINERS
        from merge_distill.methods import available_methods

        if name not in available_methods() and name not in COMBINERS:
            known = sorted([*available_methods(), *COMBINERS])
            raise ValueError(f"unknown method '{name}' (registered: {', '.join(known)})")
        return name

    @model_validator(mode="after")
    def _method_accepts_recipe(self) -> "Recipe":
        """The method's own checks (e.g. GRPO's groups, teachers where they are needed)."""
        from merge_distill.methods import method_of, trains

        if trains(self):
            method_of(self).check(self)
        elif any(not e.teacher for e in self.experts):
            raise ValueError(f"every expert needs a teacher: method {self.method} merges the teachers' weights")
        return self

    @model_validator(mode="after")
    def _paged_without_fsdp(self) -> "Recipe":
        if self.backend.rollout == "paged" and self.parallel == "fsdp":
            raise ValueError("backend.rollout paged runs transformers' continuous batching, which does not take "
                             "FSDP-sharded models (and its cache takes the weights' dtype, not fsdp's param_dtype); "
                             "use parallel: ddp or backend.rollout: transformers")
        return self

    @model_validator(mode="after")
    def _sharding_options(self) -> "Recipe":
        if self.placement.shard_frozen:
            from merge_distill.methods import method_of, trains

            if trains(self) and not method_of(self).frozen_shardable:
                raise ValueError(f"placement.shard_frozen: method {self.method} loads its frozen models into the "
                                 "trainer whole (it samples from them or takes full distributions)")
            if self.placement.offload:
                raise ValueError("placement.shard_frozen does not combine with placement.offload")
        if self.placement.offload_optimizer and (self.parallel != "fsdp" or not self.device.startswith("cuda")):
            raise ValueError(f"placement.offload_optimizer moves fsdp's shards from the GPU to the host: it needs "
                             f"parallel: fsdp and a cuda device (parallel is {self.parallel}, device {self.device})")
        return self

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
            "method": self.method,
            "experts": [{"name": e.name, "teacher": e.teacher, "reference": e.reference,
                         "reward_scale": self.scale_of(e)} for e in self.experts],
        }


def _format_error(err: ValidationError, source: str) -> str:
    parts = []
    for e in err.errors()[:3]:
        loc = ".".join(str(x) for x in e["loc"])
        if e["type"] == "extra_forbidden":
            parts.append(f"{loc}: unknown key")
        elif e["type"] == "missing":
            parts.append(f"{loc}: required key is missing")
        else:
            msg = e["msg"].removeprefix("Value error, ")
            parts.append(f"{loc}: {msg} (got {e.get('input')!r})" if loc else msg)
    more = f" (+{len(err.errors()) - 3} more)" if len(err.errors()) > 3 else ""
    return f"{source}: " + "; ".join(parts) + more


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise UserError(f"--set '{text}': expected KEY=VALUE, e.g. train.steps=10")
    key, value = text.split("=", 1)
    return key.strip().split("."), yaml.safe_load(value)


def apply_override(data: dict, path: list[str], value: Any, text: str) -> None:
    """Set a dotted key in raw recipe data. `experts.math.reward_scale` picks the expert by name."""
    node: Any = data
    for i, part in enumerate(path):
        last = i == len(path) - 1
        if isinstance(node, list):
            idx = next((j for j, x in enumerate(node) if isinstance(x, dict) and x.get("name") == part), None)
            if idx is None and part.isdigit() and int(part) < len(node):
                idx = int(part)
            if idx is None:
                raise UserError(f"--set '{text}': no list item named '{part}'")
            if last:
                node[idx] = value
            else:
                node = node[idx]
        elif isinstance(node, dict):
            if last:
                node[part] = value
            else:
                node = node.setdefault(part, {})
        else:
            raise UserError(f"--set '{text}': '{part}' is not inside a section")


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"recipe '{path}' does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}" if mark else ""
        raise UserError(f"{path}{where}: not valid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: a recipe is a YAML mapping (student:, experts:, ...)")
    for text in overrides or []:
        apply_override(data, *parse_override(text), text)
    data = extensions.resolve_recipe_data(data, str(path))
    try:
        return Recipe.model_validate(data)
    except ValidationError as e:
        raise UserError(_format_error(e, str(path))) from None
