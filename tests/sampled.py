"""Shared checks on `merge_distill.sampling.Rollouts` (imported by the sampler tests)."""

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
