"""What the memory plan (`merge_distill.plan`) needs of a causal LM, read from its `config.json` alone: its
`Shape`, for the models a recipe loads, or for a shipped config (`merge_distill/configs`: Qwen3-0.6B, 1.7B,
4B and 8B) when a checkpoint is not there yet."""

from __future__ import annotations

import json
from dataclasses import dataclass
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


def model_shapes(recipe, assume: str | None = None,
                 notes: list[str] | None = None) -> tuple[Shape, dict[str, tuple[str, Shape]]]:
    """(student shape, {path: (label, shape)} of each frozen model the method loads, once per path)."""
    from merge_distill.methods import frozen_models
    from merge_distill.recipe import STUDENT

    student = read_shape(recipe.student.path, what="student", assume=assume, notes=notes)
    frozen: dict[str, tuple[str, Shape]] = {}
    for i, e in enumerate(recipe.experts):
        for role, path in frozen_models(recipe, e).items():
            where = recipe.student.path if path == STUDENT else path
            key = str(Path(where).resolve())  # as `frozen.ModelCache`: a checkpoint shared by experts loads once
            if key not in frozen:
                label = f"{role} {e.name}" + (" (student's initial weights)" if path == STUDENT else "")
                frozen[key] = (label, student if where == recipe.student.path else
                               read_shape(where, what=f"experts.{i}.{role} ({e.name})", assume=assume, notes=notes))
    return student, frozen
