"""The paged sampler (transformers' continuous batching with our token choice): the padded sampler's rollouts,
row for row, whatever shares the batch or the cache; log-probs the scorer agrees with; training and evaluation
through it."""

import json

import pytest
import torch

from merge_distill.data import render_prompt
from merge_distill.models import load_model, load_tokenizer
from merge_distill.paged import PagedConfig, sample_paged
from merge_distill.sampling import row_seeds, sample
from merge_distill.scoring import response_logprobs

QUESTIONS = ("12+34=", "What is 5+7?", "1+1", "Compute 98-45 carefully.")


@pytest.fixture(scope="module")
def teacher(tiny_world):
    return load_model(tiny_world / "math_teacher"), load_tokenizer(tiny_world / "math_teacher")


def _kw(tok, **kw):
    return dict(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **kw)


def test_paged_rollouts_are_the_padded_samplers(teacher):
    """Same seeds, same rollouts: layout (left-padded prompts, right-padded responses), masks with the EOS
    inside, truncation flags, and the sampler's log-probs at tau."""
    model, tok = teacher
    prompts = [render_prompt(tok, q) for q in QUESTIONS] * 4
    kw = _kw(tok, max_new_tokens=16, temperature=0.7, seeds=row_seeds(5, len(prompts)))
    padded, paged = sample(model, prompts, **kw), sample_paged(model, prompts, **kw)
    for field in ("prompt_ids", "prompt_mask", "response_ids", "response_mask", "truncated"):
        assert torch.equal(getattr(paged, field), getattr(padded, field)), field
    assert paged.response_mask.dtype == torch.float32 and paged.truncated.dtype == torch.bool
    torch.testing.assert_close(paged.sampler_logprobs, padded.sampler_logprobs, rtol=1e-4, atol=1e-5)
    ended = ~paged.truncated
    assert 0 < int(ended.sum()) < len(prompts)  # some rows end by EOS, some by the cap
    for b in range(len(prompts)):
        n = int(paged.lengths[b])
        assert (paged.response_ids[b, n - 1] == tok.eos_token_id) == bool(ended[b])
        assert bool((paged.response_ids[b, n:] == tok.pad_token_id).all())
        assert bool((paged.sampler_logprobs[b, n:] == 0).all())


def test_recorded_logprobs_are_the_scorers_at_tau(teacher):
    model, tok = teacher
    prompts = [render_prompt(tok, q) for q in QUESTIONS] * 2
    tau = 0.6
    r = sample_paged(model, prompts, **_kw(tok, max_new_tokens=20, temperature=tau, seeds=row_seeds(9, 8)))
    with torch.no_grad():
        scored = response_logprobs(model, r, temperature=tau)
    mask = r.response_mask.bool()
    torch.testing.assert_close(r.sampler_logprobs[mask], scored[mask], rtol=1e-4, atol=1e-4)
    # not the log-probs at temperature 1
    with torch.no_grad():
        at_one = response_logprobs(model, r, temperature=1.0)
    assert (r.sampler_logprobs[mask] - at_one[mask]).abs().max() > 0.01


def test_a_row_samples_the_same_alone_in_any_batch_or_a_small_cache(teacher, monkeypatch):
    """Per-row seeds: a row's response depends only on its prompt and seed, also when the cache is too small
    for every row at once (rows wait for pages, or run out of them and are recomputed)."""
    from transformers.generation.continuous_batching.requests import RequestState

    recomputed = []
    original = RequestState.create_equivalent_initial_request
    monkeypatch.setattr(RequestState, "create_equivalent_initial_request",
                        lambda self: recomputed.append(self.request_id) or original(self))
    model, tok = teacher
    prompts = [render_prompt(tok, q) for q in QUESTIONS] * 3
    seeds = row_seeds(3, len(prompts))
    kw = _kw(tok, max_new_tokens=24, temperature=1.0)
    together = sample_paged(model, prompts, seeds=seeds, **kw)
    runs = [([2, 0], PagedConfig()), ([7], PagedConfig()), (list(range(12))[::-1], PagedConfig(page_size=8)),
            (list(range(12)), PagedConfig(page_size=8, max_cache_tokens=64, max_rows=3, max_batch_tokens=16))]
    for order, config in runs:
        apart = sample_paged(model, [prompts[i] for i in order], seeds=[seeds[i] for i in order], config=config, **kw)
        for j, i in enumerate(order):
            n = int(together.lengths[i])
            assert int(apart.lengths[j]) == n
            assert apart.response_ids[j, :n].tolist() == together.response_ids[i, :n].tolist()
            torch.testing.assert_close(apart.sampler_logprobs[j, :n], together.sampler_logprobs[i, :n],
                                       rtol=1e-4, atol=1e-5)
    assert recomputed  # the small cache evicted rows, and they sampled the same tokens again
    assert sample_paged(model, prompts, seeds=seeds, **kw).response_ids.tolist() == together.response_ids.tolist()
    other = sample_paged(model, prompts, seeds=row_seeds(4, len(prompts)), **kw)
    assert other.response_ids.tolist() != together.response_ids.tolist()


def test_per_row_caps_greedy_and_what_it_leaves_alone(teacher):
    """A cap per row ends that row there (truncated unless it drew EOS); greedy is the padded sampler's
    greedy; the model's mode, attention and the global RNG are as they were."""
    model, tok = teacher
    prompts = [render_prompt(tok, q) for q in QUESTIONS]
    caps = [3, 9, 1, 14]
    model.train()
    rng = torch.get_rng_state()
    r = sample_paged(model, prompts, **_kw(tok, max_new_tokens=caps, temperature=1.0, seeds=row_seeds(1, 4)))
    assert model.training and model.config._attn_implementation == "sdpa"
    assert torch.equal(torch.get_rng_state(), rng)
    model.eval()
    for b, cap in enumerate(caps):
        n = int(r.lengths[b])
        assert n == cap or (n < cap and r.response_ids[b, n - 1] == tok.eos_token_id)
    assert r.response_ids.shape[1] == max(int(n) for n in r.lengths)
    kw = _kw(tok, max_new_tokens=12, temperature=0.0, seeds=[0] * 4)
    greedy, padded = sample_paged(model, prompts, **kw), sample(model, prompts, **kw)
    assert torch.equal(greedy.response_ids, padded.response_ids)
    torch.testing.assert_close(greedy.sampler_logprobs, padded.sampler_logprobs, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="seeds"):
        sample_paged(model, prompts, **_kw(tok, max_new_tokens=4, temperature=1.0, seeds=[0]))
