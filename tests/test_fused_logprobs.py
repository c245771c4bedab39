"""The chunked, recomputing token log-probs against the plain computation: values and gradients."""

import pytest
import torch

from merge_distill.fused import token_logprobs
from merge_distill.toyworld.models import tiny_qwen3
from merge_distill.sampling import Rollouts, positions, sample
from merge_distill.scoring import response_logprobs

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def plain_token_logprobs(h, w, b, targets, temperature=1.0, softcap=None):
    """The unfused computation, as a Gemma 2-style forward and the sampler do it: cap the logits, then divide."""
    logits = torch.nn.functional.linear(h, w, b).float()
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    logits = logits / temperature
    return logits.log_softmax(-1).gather(-1, targets[:, None]).squeeze(-1)


@pytest.mark.parametrize("softcap", [None, 1.5])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("chunk_rows", [1, 5, 64, None])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("device", DEVICES)
def test_values_and_gradients_match_autograd(temperature, chunk_rows, with_bias, device, softcap):
    g = torch.Generator().manual_seed(0)
    n, hdim, vocab = 37, 16, 301
    h = torch.randn(n, hdim, generator=g, dtype=torch.float64).to(device)
    w = (torch.randn(vocab, hdim, generator=g, dtype=torch.float64) * 0.5).to(device)
    b = torch.randn(vocab, generator=g, dtype=torch.float64).to(device) if with_bias else None
    y = torch.randint(0, vocab, (n,), generator=g).to(device)
    upstream = torch.randn(n, generator=g).to(device)

    leaves = [t.clone().requires_grad_() for t in (h, w) + ((b,) if with_bias else ())]
    ours = token_logprobs(leaves[0], leaves[1], leaves[2] if with_bias else None, y, temperature=temperature,
                          softcap=softcap, chunk_rows=chunk_rows)
    (ours * upstream).sum().backward()
    ref_leaves = [t.clone().requires_grad_() for t in (h, w) + ((b,) if with_bias else ())]
    ref = plain_token_logprobs(ref_leaves[0], ref_leaves[1], ref_leaves[2] if with_bias else None, y, temperature,
                               softcap)
    (ref * upstream).sum().backward()

    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6)
    for mine, theirs in zip(leaves, ref_leaves):
        torch.testing.assert_close(mine.grad, theirs.grad, rtol=1e-5, atol=1e-6)


def test_no_grad_path_returns_the_same_values_without_a_graph():
    g = torch.Generator().manual_seed(1)
    h, w = torch.randn(9, 8, generator=g), torch.randn(50, 8, generator=g, requires_grad=True)
    y = torch.randint(0, 50, (9,), generator=g)
    with torch.no_grad():
        out = token_logprobs(h, w, None, y, chunk_rows=4)
    assert not out.requires_grad
    torch.testing.assert_close(out, plain_token_logprobs(h, w.detach(), None, y))


def _plain_response_logprobs(model, ro: Rollouts, temperature=1.0):
    """The straightforward computation: the model's own logits at response positions, full log-softmax."""
    ids = torch.cat([ro.prompt_ids, ro.response_ids], 1)
    mask = torch.cat([ro.prompt_mask, ro.response_mask.long()], 1)
    L = ro.response_ids.shape[1]
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions(mask), logits_to_keep=L + 1).logits
    lp = (logits[:, :-1].float() / temperature).log_softmax(-1)
    return lp.gather(-1, ro.response_ids[..., None]).squeeze(-1) * ro.response_mask


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("temperature", [1.0, 0.8])
@pytest.mark.parametrize("device", DEVICES)
def test_response_logprobs_and_student_gradients_match_the_plain_computation(tied, temperature, device):
    model = tiny_qwen3(67, hidden=32, layers=1, heads=2, seed=3, eos_token_id=5, pad_token_id=6)
    if not tied:
        model.config.tie_word_embeddings = False
        model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone() * 1.5)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    model.to(device)
    prompts = [[1, 2, 3], [4, 7, 8, 9, 10], [11]]
    ro = sample(model, prompts, max_new_tokens=12, temperature=1.0, eos_token_id=5, pad_token_id=6, seeds=[0, 1, 2])
    ro = Rollouts(*(getattr(ro, f).to(device) for f in Rollouts.__dataclass_fields__))
    ro.response_mask[1, 7:] = 0  # a row that ended early: padding is neither scored nor differentiated
    ro.response_ids[1, 7:] = 6
    weights = torch.randn(ro.response_mask.shape, generator=torch.Generator().manual_seed(0)).to(device)

    ours = response_logprobs(model, ro, temperature=temperature, chunk_tokens=5)
    (ours * weights).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    ref = _plain_response_logprobs(model, ro, temperature)
    (ref * weights).sum().backward()

    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    assert bool((ours[1, 7:] == 0).all())
    for n, p in model.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, rtol=1e-4, atol=1e-6, msg=n)
    with torch.no_grad():
        torch.testing.assert_close(response_logprobs(model, ro, temperature=temperature), ours.detach())


@pytest.mark.parametrize("device", DEVICES)
def test_autocast_runs_the_projection_in_the_autocast_dtype(device):
    model = tiny_qwen3(67, hidden=32, layers=1, heads=2, seed=4, eos_token_id=5, pad_token_id=6).to(device)
    ro = sample(model, [[1, 2, 3], [4, 5]], max_new_tokens=6, temperature=1.0, eos_token_id=5, pad_token_id=6,
                seeds=[0, 1])
    ro = Rollouts(*(getattr(ro, f).to(device) for f in Rollouts.__dataclass_fields__))
    with torch.autocast(device, dtype=torch.bfloat16):
        ours = response_logprobs(model, ro, chunk_tokens=3)
        ref = _plain_response_logprobs(model, ro)
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-5)  # a float32 projection would differ by ~1e-2
    ours.sum().backward()
    assert model.lm_head.weight.grad.dtype == torch.float32
    assert torch.isfinite(model.lm_head.weight.grad).all()


def test_length_buckets_partition_the_rows_and_split_only_when_it_pays():
    from merge_distill.scoring import length_buckets

    assert length_buckets([15] * 8) == [list(range(8))]
    lengths = [5, 70, 5, 70, 7, 71, 6, 70]
    assert len(length_buckets(lengths)) == 1  # saves 256 padded positions: not more than a call costs
    groups = length_buckets(lengths, call_positions=16)
    assert len(groups) > 1
    assert sorted(r for g in groups for r in g) == list(range(8))
    assert set(groups[0]) == {0, 2, 4, 6}  # the short rows together


@pytest.mark.parametrize("device", DEVICES)
def test_bucketed_scoring_matches_the_plain_computation(device, monkeypatch):
    """Prompts and responses of very different lengths: packed, bucketed backbone calls give the plain values
    and gradients, whatever the rows' order."""
    import functools

    from merge_distill import scoring

    length_buckets = functools.partial(scoring.length_buckets, call_positions=0)
    monkeypatch.setattr(scoring, "length_buckets", length_buckets)
    model = tiny_qwen3(67, hidden=32, layers=2, heads=2, seed=5, eos_token_id=5, pad_token_id=6).to(device)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(7, 67, (n,), generator=g).tolist() for n in (2, 30, 3, 28, 4, 31, 2, 29, 17)]
    ro = sample(model, prompts, max_new_tokens=20, temperature=1.0, eos_token_id=5, pad_token_id=6,
                seeds=list(range(len(prompts))))
    ro = Rollouts(*(getattr(ro, f).to(device) for f in Rollouts.__dataclass_fields__))
    ends = [3, 20, 1, 18, 5, 20, 2, 19, 10]
    for row, end in enumerate(ends):  # responses that ended early, at very different lengths
        ro.response_mask[row, end:] = 0
        ro.response_ids[row, end:] = 6
    assert len(length_buckets([p + e for p, e in zip(ro.prompt_mask.sum(-1).tolist(), ends)])) > 1
    weights = torch.randn(ro.response_mask.shape, generator=g).to(device)

    ours = response_logprobs(model, ro, chunk_tokens=7)
    (ours * weights).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    ref = _plain_response_logprobs(model, ro)
    (ref * weights).sum().backward()
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    for n, p in model.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, rtol=1e-4, atol=1e-5, msg=n)
