"""Sampling: per-row randomness (a row's response does not depend on its batch) and exact draws."""

import torch

from merge_distill.data import render_prompt
from merge_distill.models import load_model, load_tokenizer
from merge_distill.sampling import draw, row_seeds, row_uniforms, sample
from sampled import assert_same_rows


def test_draw_matches_the_distribution():
    probs = torch.tensor([0.1, 0.0, 0.6, 0.3])
    u = torch.rand(200_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    toks = draw(probs.log().expand(len(u), -1), u)
    freq = torch.bincount(toks, minlength=4).double() / len(u)
    assert freq[1] == 0  # a zero-probability token is never drawn
    assert torch.allclose(freq, probs.double(), atol=0.005)


def test_row_uniforms_depend_only_on_the_row_seed():
    seeds = row_seeds(7, 6)
    assert seeds == row_seeds(7, 4) + row_seeds(7, 2, offset=4)
    u = row_uniforms(seeds, 5)
    assert torch.equal(u[4:], row_uniforms(seeds[4:], 5))
    assert ((u > 0) & (u < 1)).all() and not torch.equal(u[0], u[1])


def test_a_row_samples_the_same_response_alone_or_in_any_batch(tiny_world):
    model, tok = load_model(tiny_world / "math_teacher"), load_tokenizer(tiny_world / "math_teacher")
    prompts = [render_prompt(tok, q) for q in ("12+34=", "What is 5+7?", "1+1", "Compute 98-45 carefully.")]
    seeds = row_seeds(3, len(prompts))
    kw = dict(max_new_tokens=24, temperature=1.0, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    together = sample(model, prompts, seeds=seeds, **kw)
    for order in ([2, 0], [3], [1, 3, 0, 2]):
        apart = sample(model, [prompts[i] for i in order], seeds=[seeds[i] for i in order], **kw)
        assert_same_rows(apart, together, order)
    other = sample(model, prompts, seeds=row_seeds(4, len(prompts)), **kw)
    assert other.response_ids.tolist() != together.response_ids.tolist()


def test_eos_ends_a_response_inside_its_mask_and_tempered_logprobs_are_recorded(tiny_world):
    """A response that stops before max_new_tokens ends in EOS, and that EOS is a real token (mask 1, its
    sampler log-prob recorded): the student is rewarded for when it stops. The recorded log-probs are those
    of softmax(logits / tau), what a plain forward at tau gives."""
    model, tok = load_model(tiny_world / "math_teacher"), load_tokenizer(tiny_world / "math_teacher")
    prompts = [render_prompt(tok, q) for q in ("12+34=", "What is 5+7?", "1+1", "Compute 98-45 carefully.")] * 4
    eos, tau, max_new = tok.eos_token_id, 0.7, 16
    r = sample(model, prompts, seeds=row_seeds(5, len(prompts)), max_new_tokens=max_new, temperature=tau,
               eos_token_id=eos, pad_token_id=tok.pad_token_id)
    ended = 0
    for b, prompt in enumerate(prompts):
        ids = r.response_ids[b].tolist()
        n = ids.index(eos) + 1 if eos in ids else max_new
        assert r.response_mask[b].tolist() == [True] * n + [False] * (len(ids) - n)
        assert bool(r.truncated[b]) == (eos not in ids)
        ended += eos in ids
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([prompt + ids[:n]])).logits[0, len(prompt) - 1:-1]
        expected = torch.log_softmax(logits / tau, -1).gather(-1, torch.tensor(ids[:n])[:, None]).squeeze(-1)
        torch.testing.assert_close(r.sampler_logprobs[b, :n], expected, rtol=1e-4, atol=1e-5)
        assert bool((r.sampler_logprobs[b, n:] == 0).all())
    assert 0 < ended < len(prompts)
