"""What the memory plan (`merge_distill.plan`) needs of a causal LM, read from its `config.json` alone: its
`Shape`, for the models a recipe loads, or for a shipped config (`merge_distill/configs`: Qwen3-0.6B, 1.7B,
4B and 8B) when a checkpoint is not there yet; and the parameters of a LoRA adapter of it, from a `lora:` spec
or an adapter folder's `adapter_config.json` (its safetensors header when present), no weights read."""

from __future__ import annotations

import json
import math
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path

from merge_distill.errors import UserError

CONFIGS = Path(__file__).parent / "configs"  # shipped shapes: qwen3-0.6b, qwen3-1.7b, qwen3-4b, qwen3-8b
QK_NORM = {"qwen3", "gemma3", "gemma3_text", "olmo2"}
FOUR_NORMS = {"gemma2", "gemma3", "gemma3_text"}  # pre/post norms around attention and MLP


@dataclass(frozen=True)
class Shape:
    """What the plan needs of a causal LM, read from its config.json."""

    model_type: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied: bool
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False

    @classmethod
    def from_config(cls, cfg: dict) -> Shape:
        text = {**cfg, **(cfg.get("text_config") or {})}
        if any(text.get(k) for k in ("num_experts", "num_local_experts", "n_routed_experts")):
            raise ValueError("mixture-of-experts layers are not planned")
        kind, h, heads = text.get("model_type", "llama"), text["hidden_size"], text["num_attention_heads"]
        bias = bool(text.get("attention_bias", False))
        return cls(kind, h, text["num_hidden_layers"], heads, text.get("num_key_value_heads") or heads,
                   text.get("head_dim") or h // heads, text["intermediate_size"], text["vocab_size"],
                   bool(cfg.get("tie_word_embeddings", text.get("tie_word_embeddings", True))),
                   qkv_bias=bias or kind == "qwen2", o_bias=bias, mlp_bias=bool(text.get("mlp_bias", False)))

    def layer_linear_params(self) -> int:
        """Parameters of one decoder layer's linear maps (what autocast copies)."""
        h, i, q, kv = self.hidden, self.intermediate, self.heads * self.head_dim, self.kv_heads * self.head_dim
        biases = self.qkv_bias * (q + 2 * kv) + self.o_bias * h + self.mlp_bias * (2 * i + h)
        return 2 * h * (q + kv) + 3 * h * i + biases

    def layer_params(self) -> int:
        norms = (4 if self.model_type in FOUR_NORMS else 2) * self.hidden
        return self.layer_linear_params() + norms + (2 * self.head_dim if self.model_type in QK_NORM else 0)

    def root_params(self) -> int:
        """Embedding, final norm and an untied output head: FSDP's root group."""
        return self.vocab * self.hidden * (1 if self.tied else 2) + self.hidden

    def params(self) -> int:
        return self.layers * self.layer_params() + self.root_params()

    def linear_modules(self) -> list[tuple[str, int, int]]:
        """(module name, in features, out features) of every `nn.Linear`, named as transformers' Llama-family
        models name them (`model.layers.0.self_attn.q_proj`, ..., `lm_head`): what a LoRA adapter can wrap."""
        h, i, q, kv = self.hidden, self.intermediate, self.heads * self.head_dim, self.kv_heads * self.head_dim
        layer = [("self_attn.q_proj", h, q), ("self_attn.k_proj", h, kv), ("self_attn.v_proj", h, kv),
                 ("self_attn.o_proj", q, h), ("mlp.gate_proj", h, i), ("mlp.up_proj", h, i), ("mlp.down_proj", i, h)]
        return ([(f"model.layers.{n}.{name}", a, b) for n in range(self.layers) for name, a, b in layer]
                + [("lm_head", h, self.vocab)])

    def layer_bytes(self, c: int, width: int = 0) -> int:
        """Bytes saved for backward per token by one decoder layer under autocast to c bytes (4: none), with a
        float32 residual stream; `width` > 0: a padded batch of that width (k, v repeated for grouped-query
        attention, the mask as a c-byte bias). Derived from the saved tensors of transformers 5.24's Qwen3 and
        Llama layers with SDPA (exact on CPU for both: tests/test_plan.py); Qwen3-4B in bf16: 195,880."""
        h, q, kv = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim
        b = 16 * h + (5 * c if c < 4 else 8) * h + 4 * c * self.intermediate + 4 * self.heads + 8
        if self.model_type in QK_NORM:
            b += (4 + 3 * c) * (q + kv) + 4 * (self.heads + self.kv_heads)
        else:
            b += 2 * c * (q + kv)
        if self.model_type in FOUR_NORMS:
            b += 8 * h
        return b + (2 * c * (q - kv) + c * width if width else 0)


def lora_targets(shape: Shape, target_modules: list[str] | str) -> list[tuple[str, int, int]]:
    """The linear modules of `shape` a LoRA adapter with peft's `target_modules` wraps: 'all-linear', every one but
    the output head; a list, those whose name is one of them or ends with `.` + one; another string, those whose
    whole name the regular expression matches (peft's own rules)."""
    linears = shape.linear_modules()
    if target_modules == "all-linear":
        return [x for x in linears if x[0] != "lm_head"]
    if isinstance(target_modules, str):
        return [x for x in linears if re.fullmatch(target_modules, x[0])]
    return [x for x in linears if any(x[0] == t or x[0].endswith("." + t) for t in target_modules)]


def lora_params(shape: Shape, r: int, target_modules: list[str] | str) -> int:
    """Parameters of a LoRA adapter of rank `r` on `shape`: A (r x in) and B (out x r) for each wrapped linear."""
    return sum(r * (a + b) for _, a, b in lora_targets(shape, target_modules))


@dataclass(frozen=True)
class Adapter:
    """A LoRA adapter as the plan counts it: its parameters (held in float32 whatever their file's dtype: peft
    loads adapters so) and, over one decoder layer's wrapped linears, the sum of their ranks and of their output
    features (what a LoRA student's forward saves and frees per token: `plan.lora_layer_bytes`)."""

    params: int
    layer_ranks: int = 0
    layer_outputs: int = 0

    @classmethod
    def of(cls, shape: Shape, r: int, target_modules: list[str] | str) -> Adapter:
        targets = lora_targets(shape, target_modules)
        first = [out for name, _, out in targets if name.startswith("model.layers.0.")]
        return cls(sum(r * (a + b) for _, a, b in targets), r * len(first), sum(first))


def safetensors_params(path: Path) -> int:
    """Elements of every tensor in a safetensors file, from its header alone (8 bytes of length, then JSON)."""
    with open(path, "rb") as f:
        header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
    return sum(math.prod(t["shape"]) for name, t in header.items() if name != "__metadata__")


def read_adapter(path: str, base: Shape, *, what: str, assume=None, notes: list[str] | None = None) -> Adapter:
    """The adapter folder at `path` on `base`: its parameters from its `adapter_model.safetensors` header when
    present (exact, whatever `rank_pattern` or extra modules it has), else from `adapter_config.json`'s `r` and
    `target_modules`. A missing folder is planned as `assume` (a `recipe.Lora`: the LoRA student's, else peft's
    defaults in the recipe's names), said in `notes`."""
    from merge_distill.recipe import Lora

    p = Path(path)
    if not p.exists():
        spec = assume or Lora()
        if notes is not None:
            notes.append(f"{path} not found: planned as a LoRA adapter of r {spec.r} on {spec.target_modules}"
                         + (" (the student's lora:)" if assume else ""))
        return Adapter.of(base, spec.r, spec.target_modules)
    config = p / "adapter_config.json"
    if not config.is_file():
        raise UserError(f"{what}: {path} is not a peft adapter (no adapter_config.json)")
    try:
        raw = json.loads(config.read_text())
        one = Adapter.of(base, int(raw["r"]), raw["target_modules"])
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{what}: {config}: not a LoRA adapter config plan understands ({e})") from None
    weights = p / "adapter_model.safetensors"
    return Adapter(safetensors_params(weights), one.layer_ranks, one.layer_outputs) if weights.is_file() else one


def shipped_configs() -> list[str]:
    return sorted(p.parent.name for p in CONFIGS.glob("*/config.json"))


def read_shape(path: str, *, what: str, assume: str | None = None, notes: list[str] | None = None) -> Shape:
    """The shape of the model at `path` (a model folder). A missing one takes the shipped config `assume`, else
    the shipped config its folder's name starts with (`checkpoints/qwen3-4b-math-rl`: qwen3-4b), said in `notes`."""
    p = Path(path)
    if not p.exists():
        named = sorted((n for n in shipped_configs() if p.name.lower().startswith(n)), key=len)
        if assume is None and not named:
            raise UserError(f"{what}: {path} not found (or plan with --assume-config, one of: "
                            f"{', '.join(shipped_configs())})")
        if assume is None:
            assume = named[-1]
            if notes is not None:
                notes.append(f"{path} not found: planned with the shipped {assume} config, after its name")
        p = CONFIGS / assume
        if not (p / "config.json").is_file():
            raise UserError(f"--assume-config {assume}: no such shipped config (have: {', '.join(shipped_configs())})")
    if p.is_file():
        raise UserError(f"{what}: {path}: plan reads a model folder's config.json (a .gguf file has none)")
    if not (p / "config.json").is_file():
        raise UserError(f"{what}: {path} is not a model folder (no config.json)")
    try:
        return Shape.from_config(_with_defaults(json.loads((p / "config.json").read_text())))
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{what}: {p / 'config.json'}: not a decoder config plan understands ({e})") from None


def _with_defaults(raw: dict) -> dict:
    """The config with its class's defaults for the keys the file leaves out (save_pretrained omits them)."""
    from transformers import AutoConfig

    try:
        return AutoConfig.for_model(**raw).to_dict()
    except (ValueError, TypeError, KeyError):  # a model type transformers does not know: the file as it is
        return raw


@dataclass
class Frozen:
    """One frozen copy of a model (a model folder, or a base that adapters load into) and the adapters it serves
    (`adapters`: resolved adapter folder -> (label, `Adapter`); one folder loads once). `hosted`: the LoRA
    student's own base, which serves them with no frozen copy (`frozen.ModelCache.host`)."""

    label: str
    shape: Shape
    path: str
    hosted: bool = False
    adapters: dict[str, tuple[str, Adapter]] = field(default_factory=dict)
    serves: list[str] = field(default_factory=list)  # the roles scored through it, e.g. 'teacher math'


def model_shapes(recipe, assume: str | None = None, notes: list[str] | None = None, *,
                 student_hosts: bool = False) -> tuple[Shape, dict[str, Frozen]]:
    """(student shape, {resolved base path: `Frozen`} of the frozen models the method loads, one per path, as
    `frozen.ModelCache` loads them): a checkpoint several experts share is one copy; adapter experts of one base
    share that base; `student_hosts` (a LoRA student serving its own base: `build.load_student`'s host) makes the
    student's base path `hosted`. A `reference: student` of a full student is one more copy, of its initial
    weights."""
    from merge_distill.methods import frozen_models
    from merge_distill.recipe import STUDENT, TEACHER_BASE, AdapterModel, model_label

    student = read_shape(recipe.student.path, what="student", assume=assume, notes=notes)
    student_key = str(Path(recipe.student.path).resolve())
    frozen: dict[str, Frozen] = {}
    for i, e in enumerate(recipe.experts):
        for role, named in frozen_models(recipe, e).items():
            ref = recipe.frozen_ref(e, named)
            base = ref.base if isinstance(ref, AdapterModel) else ref
            key = str(Path(base).resolve())  # as `frozen.ModelCache`: a checkpoint shared by experts loads once
            what = f"experts.{i}.{role} ({e.name})"
            if key not in frozen:
                label = f"{role} {e.name}" + (" (student's initial weights)" if named == STUDENT else
                                              " (its teacher's base)" if named == TEACHER_BASE else "")
                shape = student if key == student_key else read_shape(
                    base, what=what + " base" * isinstance(ref, AdapterModel), assume=assume, notes=notes)
                frozen[key] = Frozen(label, shape, base, hosted=student_hosts and key == student_key)
            frozen[key].serves.append(f"{role} {e.name}")
            adapter = str(Path(ref.adapter).resolve()) if isinstance(ref, AdapterModel) else None
            if adapter is not None and adapter not in frozen[key].adapters:
                frozen[key].adapters[adapter] = (f"{role} {e.name}", read_adapter(
                    ref.adapter, frozen[key].shape, what=f"{what} adapter ({model_label(ref)})",
                    assume=recipe.student.lora, notes=notes))
    for f in frozen.values():  # a base that adapters load into: named after everything it scores
        if f.adapters:
            f.label = "base of " + ", ".join(f.serves)
    return student, frozen
