"""The zoo's pretraining loop: supervised fine-tuning on (prompt, response) pairs, loss on response tokens only.

Pretrains the CPU zoo's base models (and the tests' tiny world); the off-policy SFT baseline of a recipe is the
method `sft` (`merge_distill.methods`), which trains through the trainer like every other method.
"""

from __future__ import annotations

import math
import random

import torch

from merge_distill.data import render_prompt


def encode_pairs(tokenizer, pairs: list[tuple[str, str]]) -> list[tuple[list[int], list[int]]]:
    """(prompt ids ending at the assistant turn, response ids + EOS) for each pair."""
    eos = tokenizer.eos_token_id
    cache: dict[str, list[int]] = {}
    out = []
    for prompt, response in pairs:
        if prompt not in cache:
            cache[prompt] = render_prompt(tokenizer, prompt)
        out.append((cache[prompt], tokenizer(response, add_special_tokens=False)["input_ids"] + [eos]))
    return out


def collate(examples: list[tuple[list[int], list[int]]], pad_token_id: int):
    width = max(len(p) + len(r) for p, r in examples)
    ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for i, (p, r) in enumerate(examples):
        seq = p + r
        ids[i, : len(seq)] = torch.tensor(seq)
        mask[i, : len(seq)] = 1
        labels[i, len(p): len(seq)] = torch.tensor(r)
    return ids, mask, labels


def supervised_train(model: torch.nn.Module, tokenizer, pairs: list[tuple[str, str]], *, steps: int,
                     batch_size: int, lr: float, seed: int = 0, warmup: int = 20,
                     on_step=None) -> list[float]:
    """AdamW with warmup and cosine decay; returns the per-step losses."""
    examples = encode_pairs(tokenizer, pairs)
    rng = random.Random(seed)
    order: list[int] = []
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))))
    model.train()
    losses = []
    for step in range(steps):
        if len(order) < batch_size:
            fresh = list(range(len(examples)))
            rng.shuffle(fresh)
            order += fresh
        idx, order = order[:batch_size], order[batch_size:]
        ids, mask, labels = collate([examples[i] for i in idx], tokenizer.pad_token_id)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(float(loss.detach()))
        if on_step:
            on_step(step + 1, losses[-1])
    model.eval()
    return losses
