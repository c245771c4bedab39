"""Shared checks on `merge_distill.sampling.Rollouts` and models built for them (imported by the sampler tests)."""

import torch


def assert_same_rows(apart, together, order) -> None:
    """Row j of `apart` (sampled from the prompts `order` picks, with their seeds) is row order[j] of `together`:
    the same length, tokens and sampler log-probs."""
    for j, i in enumerate(order):
        n = int(together.lengths[i])
        assert int(apart.lengths[j]) == n
        assert apart.response_ids[j, :n].tolist() == together.response_ids[i, :n].tolist()
        torch.testing.assert_close(apart.sampler_logprobs[j, :n], together.sampler_logprobs[i, :n],
                                   rtol=1e-4, atol=1e-5)


def biased_model(tok, token: int, bias: float, *, seed: int = 0):
    """A random-weight one-layer Qwen3 over `tok`'s vocabulary whose output head adds `bias` to `token`'s logit
    (its other logits are near zero: `token` has probability about e^bias / (e^bias + vocab - 1) at every step;
    a large bias makes it certain). The model's config and generation config name `tok`'s EOS alone."""
    from merge_distill.toyworld.models import tiny_qwen3

    model = tiny_qwen3(len(tok), hidden=32, layers=1, heads=2, seed=seed, eos_token_id=tok.eos_token_id,
                       pad_token_id=tok.pad_token_id)
    head = torch.nn.Linear(32, len(tok), bias=True)
    with torch.no_grad():
        head.weight.copy_(model.lm_head.weight)
        head.bias.zero_()
        head.bias[token] = bias
    model.lm_head = head
    return model.eval()
