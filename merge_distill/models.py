"""Loading models and tokenizers, building tiny ones, and checking that a set of models can be mixed.

Every model is an ordinary Hugging Face causal LM folder (config + safetensors + tokenizer), so what
this project saves `AutoModelForCausalLM.from_pretrained` loads, and what users bring we load the same way.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from merge_distill.errors import UserError

# The chat template of the tiny world: Qwen's markers, each one token.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]


def byte_tokenizer() -> PreTrainedTokenizerBase:
    """A byte-level tokenizer with 256 byte tokens and 4 specials (vocab 260), no merges.

    Byte-level so any text (math, code, unicode) round-trips exactly; tiny so CPU models stay tiny.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_chars = pre_tokenizers.ByteLevel.alphabet()
    # Order bytes by their code point in the byte-level alphabet, so ids are stable across versions.
    vocab = {ch: i for i, ch in enumerate(sorted(byte_chars))}
    for tok in SPECIAL_TOKENS:
        vocab[tok] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|pad|>",
        bos_token=None,
        additional_special_tokens=["<|endoftext|>", "<|im_start|>"],
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_qwen3(vocab_size: int, *, hidden: int = 128, layers: int = 3, heads: int = 4,
               intermediate: int | None = None, max_positions: int = 256, seed: int = 0,
               eos_token_id: int | None = None, pad_token_id: int | None = None):
    """A small Qwen3-architecture causal LM, randomly initialised (deterministic by seed)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(
        vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=max(1, heads // 2), head_dim=hidden // heads,
        intermediate_size=intermediate or 3 * hidden, max_position_embeddings=max_positions,
        tie_word_embeddings=True, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
        bos_token_id=None,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return Qwen3ForCausalLM(config)


def is_model_dir(path: str | os.PathLike) -> bool:
    p = Path(path)
    return p.is_dir() and (p / "config.json").is_file() or p.is_file() and p.suffix == ".gguf"


def _source(path: str | os.PathLike) -> tuple[str, dict]:
    """(from_pretrained location, extra kwargs): a model folder, or a single GGUF file (dequantised on load)."""
    p = Path(path)
    if p.suffix == ".gguf":
        return str(p.parent), {"gguf_file": p.name}
    return str(p), {}


def load_tokenizer(path: str | os.PathLike, *, what: str = "model") -> PreTrainedTokenizerBase:
    check_model_dir(path, what=what)
    try:
        where, extra = _source(path)
        return AutoTokenizer.from_pretrained(where, **extra)
    except Exception as e:  # noqa: BLE001 - surfaced as a one-line user error
        raise UserError(f"{what} '{path}': cannot load its tokenizer ({type(e).__name__}: {e})") from e


def load_model(path: str | os.PathLike, *, what: str = "model", dtype: torch.dtype = torch.float32,
               trainable: bool = False) -> torch.nn.Module:
    check_model_dir(path, what=what)
    try:
        where, extra = _source(path)
        model = AutoModelForCausalLM.from_pretrained(where, dtype=dtype, **extra)
    except Exception as e:  # noqa: BLE001
        raise UserError(f"{what} '{path}': cannot load as a causal LM ({type(e).__name__}: {e})") from e
    model.train(trainable)
    if not trainable:
        model.requires_grad_(False)
    return model


def check_model_dir(path: str | os.PathLike, *, what: str = "model") -> None:
    p = Path(path)
    if not p.exists():
        raise UserError(f"{what} '{path}' does not exist")
    if not is_model_dir(p):
        raise UserError(f"{what} '{path}' is not a model folder (no config.json) or a .gguf file")


@dataclass(frozen=True)
class ModelInfo:
    """What the compatibility check compares, read without loading weights."""

    path: str
    vocab: dict[str, int]
    vocab_size: int  # rows of the embedding matrix
    chat_template: str | None


def model_info(path: str | os.PathLike, *, what: str = "model") -> ModelInfo:
    tok = load_tokenizer(path, what=what)
    if Path(path).suffix == ".gguf":
        from transformers import AutoConfig

        where, extra = _source(path)
        config = AutoConfig.from_pretrained(where, **extra).to_dict()
    else:
        with open(Path(path) / "config.json") as f:
            config = json.load(f)
    vocab_size = config.get("vocab_size") or config.get("text_config", {}).get("vocab_size")
    return ModelInfo(str(path), tok.get_vocab(), int(vocab_size or len(tok)), tok.chat_template)


def check_compatible(infos: dict[str, ModelInfo], *, allow_chat_template_mismatch: bool = False) -> None:
    """Student, teachers and references must agree token for token, or the rewards score the wrong tokens.

    `infos` maps a role name ("student", "teacher of math", ...) to its ModelInfo.
    """
    (first_role, first), *rest = infos.items()
    for role, info in rest:
        if info.vocab != first.vocab:
            diff = len(set(info.vocab.items()) ^ set(first.vocab.items()))
            raise UserError(
                f"{role} '{info.path}' has a different vocabulary from {first_role} '{first.path}' "
                f"({len(info.vocab)} vs {len(first.vocab)} tokens, {diff} token-id pairs differ)")
        if info.vocab_size != first.vocab_size:
            raise UserError(
                f"{role} '{info.path}' has vocab_size {info.vocab_size}, {first_role} '{first.path}' has "
                f"{first.vocab_size}")
        if info.chat_template != first.chat_template and not allow_chat_template_mismatch:
            raise UserError(
                f"{role} '{info.path}' has a different chat template from {first_role} '{first.path}' "
                "(set allow_chat_template_mismatch: true in the recipe to accept this)")


def save_model(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, path: str | os.PathLike) -> None:
    """Save an HF model folder atomically: written beside, then renamed into place."""
    from merge_distill.io import atomic_dir

    with atomic_dir(path) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
