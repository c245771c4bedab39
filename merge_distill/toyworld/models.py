"""The toy world's models: a byte-level tokenizer and small Qwen3-architecture LMs built from scratch.

Used by the zoo (`merge_distill.toyworld.zoo`) and by tests and benchmarks that need a model in seconds; saved
with `merge_distill.models.save_model`, they are ordinary Hugging Face model folders.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedTokenizerBase

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
