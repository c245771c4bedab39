"""Memory controls change where memory goes, never what is trained: token-budgeted micro-batches and scoring,
rollouts in row chunks under a KV-cache budget, gradient checkpointing."""

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers.models.qwen3 import modeling_qwen3

from merge_distill.scoring import token_budget_chunks
from merge_distill.build import train_recipe
from merge_distill.validate import load_recipe

LR = 3e-3
STEPS = dict(steps=2, prompts_per_step=12, max_new_tokens=16, lr=LR)


def test_token_budget_chunks_by_hand():
    lengths = [5, 20, 7, 9, 30, 6]
    # shortest first: 5, 6, 7, 9 | 20 | 30 (over budget alone); 4 rows x 9 = 36 <= 40, 2 x 20 = 40 would need 9 too
    assert token_budget_chunks(lengths, 40) == [[0, 5, 2, 3], [1], [4]]
    assert token_budget_chunks(lengths, 40, max_rows=2) == [[0, 5], [2, 3], [1], [4]]
    assert token_budget_chunks(lengths, None, max_rows=4) == [[0, 1, 2, 3], [4, 5]]
    assert token_budget_chunks(lengths, None) == [list(range(6))]
    for budget in (1, 13, 50, 1000):
        chunks = token_budget_chunks(lengths, budget, max_rows=3)
        assert sorted(r for c in chunks for r in c) == list(range(6))
        assert all(len(c) == 1 or len(c) * max(lengths[r] for r in c) <= budget for c in chunks)
        assert all(len(c) <= 3 for c in chunks)


@pytest.fixture(scope="module")
def plain(tiny_world, tmp_path_factory, write_recipe):
    root = tmp_path_factory.mktemp("plain")
    train_recipe(load_recipe(write_recipe(root / "r.yaml", tiny_world, root / "run", **STEPS)))
    return root / "run"


def _layer_forwards(monkeypatch) -> list[int]:
    """Counts the decoder layers' MLP forwards that run with autograd on (the update's forwards and their
    recomputations; the layer itself is left alone, as transformers wraps its forward for checkpointing)."""
    calls = []
    original = modeling_qwen3.Qwen3MLP.forward

    def counting(self, *args, **kwargs):
        if torch.is_grad_enabled():
            calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(modeling_qwen3.Qwen3MLP, "forward", counting)
    return calls


@pytest.mark.slow
def test_budgets_and_checkpointing_train_the_same_weights(plain, tiny_world, tmp_path, write_recipe, monkeypatch):
    calls = _layer_forwards(monkeypatch)
    controls = dict(max_tokens_per_micro_batch=200, max_rollout_tokens=150, gradient_checkpointing=True)
    train_recipe(load_recipe(write_recipe(tmp_path / "r.yaml", tiny_world, tmp_path / "run", **STEPS, **controls)))
    first_plain = json.loads((plain / "metrics.jsonl").read_text().splitlines()[0])
    first = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    # the same responses (per-row seeds), the same rewards, the same loss
    for key in ("response_length", "math/reward", "code/reverse_kl_teacher", "loss"):
        assert first[key] == pytest.approx(first_plain[key], rel=1e-5, abs=1e-7), key
    w0 = load_file(tiny_world / "base" / "model.safetensors")
    x, y = load_file(plain / "final" / "model.safetensors"), load_file(tmp_path / "run" / "final" / "model.safetensors")
    diff = sum(float(((y[k] - x[k]) ** 2).sum()) for k in x) ** 0.5
    update = sum(float(((x[k] - w0[k]) ** 2).sum()) for k in x) ** 0.5
    assert diff < 1e-3 * update, f"updates differ by {diff / update:.2e} of their norm"
    # several micro-batches a step, and each layer's forward recomputed in the backward (checkpointing)
    n_micro = len(calls) // 2
    assert len(calls) % 2 == 0 and n_micro >= 2 * STEPS["steps"], len(calls)


@pytest.mark.slow
def test_gradient_checkpointing_recomputes_each_layer(tiny_world, tmp_path, write_recipe, monkeypatch):
    counts = {}
    for on in (False, True):
        calls = _layer_forwards(monkeypatch)
        path = write_recipe(tmp_path / f"{on}.yaml", tiny_world, tmp_path / f"run-{on}", steps=1, prompts_per_step=6,
                            max_new_tokens=8, micro_batch_size=2, gradient_checkpointing=on)
        train_recipe(load_recipe(path))
        counts[on] = len(calls)
    assert counts[False] == 3 and counts[True] == 6  # 3 micro-batches x 1 layer, twice with recomputation
