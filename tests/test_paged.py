"""The paged sampler (transformers' continuous batching with our token choice): the padded sampler's rollouts,
row for row, whatever shares the batch or the cache; log-probs the scorer agrees with; training and evaluation
through it."""

import json

import pytest
import torch

from merge_distill.data import render_prompt
from merge_distill.models import load_model, load_tokenizer
from merge_distill.toyworld.models import byte_tokenizer, tiny_qwen3

# transformers before 5.24 lacks the engine internals the paged sampler drives: there it is refused
# (tests/test_transformers_versions.py), and these tests skip
pytest.importorskip("merge_distill.paged", reason="the paged sampler needs transformers 5.24's continuous batching",
                    exc_type=ImportError)
from merge_distill.paged import PagedConfig, sample_paged  # noqa: E402
from merge_distill.sampling import row_seeds, sample
from merge_distill.scoring import response_logprobs
from sampled import assert_same_rows, biased_model

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
    assert paged.response_mask.dtype == torch.bool and paged.truncated.dtype == torch.bool
    torch.testing.assert_close(paged.sampler_logprobs, padded.sampler_logprobs, rtol=1e-4, atol=1e-5)
    ended = ~paged.truncated
    assert 0 < int(ended.sum()) < len(prompts)  # some rows end by EOS, some by the cap
    for b in range(len(prompts)):
        n = int(paged.lengths[b])
        assert (paged.response_ids[b, n - 1] == tok.eos_token_id) == bool(ended[b])
        assert bool((paged.response_ids[b, n:] == tok.pad_token_id).all())
        assert bool((paged.sampler_logprobs[b, n:] == 0).all())


def test_every_eos_id_ends_a_paged_row_as_a_padded_one():
    """Two stop ids, a model whose head favours the second: the paged rows are the padded ones, row for row
    (lengths, the stop token inside the mask, truncation flags), whichever id ended them."""
    tok = byte_tokenizer()
    second = tok.convert_tokens_to_ids("<|endoftext|>")
    model = biased_model(tok, second, 2.5)
    prompts = [[5 + i, 17, 40 + i, 9][: 1 + i % 4] for i in range(12)]
    kw = dict(max_new_tokens=24, temperature=1.0, eos_token_id=(tok.eos_token_id, second),
              pad_token_id=tok.pad_token_id, seeds=row_seeds(2, 12))
    padded, paged = sample(model, prompts, **kw), sample_paged(model, prompts, **kw)
    assert_same_rows(paged, padded, range(12))
    assert torch.equal(paged.response_mask, padded.response_mask) and torch.equal(paged.truncated, padded.truncated)
    last = [ids[-1] for ids, cut in zip(paged.response_token_lists(), paged.truncated) if not cut]
    assert last.count(second) >= 3 and tok.eos_token_id in last and bool(paged.truncated.any())


BF16 = dict(device_type="cpu", dtype=torch.bfloat16)  # what `train.Run.autocast` enters for `dtype: bfloat16`


@pytest.fixture(scope="module")
def bf16_rollouts():
    """A random-weight Qwen3 over the byte vocabulary (EOS about once in 260 tokens: rows run long), eight
    prompts of one length, sampled by both engines under the trainer's bfloat16 autocast. One row a forward
    (`max_rows=1`) and no left padding: both engines then do the same arithmetic on each row. Packed forwards
    and padding round differently, which in bf16 moves a log-prob by ~2e-3 and can move a near-boundary draw."""
    tok = byte_tokenizer()
    model = tiny_qwen3(len(tok), hidden=32, layers=2, heads=2, max_positions=512, seed=1,
                       eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id).eval()
    prompts = [[5 + i, 17, 40 + i, 9] for i in range(8)]
    kw = dict(max_new_tokens=300, temperature=1.0, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
              seeds=row_seeds(7, 8))
    with torch.autocast(**BF16):
        padded = sample(model, prompts, **kw)
        paged = sample_paged(model, prompts, config=PagedConfig(max_rows=1), **kw)
    return model, padded, paged


def test_paged_and_padded_sample_the_same_in_bf16(bf16_rollouts):
    """Under a bfloat16 recipe's autocast, the same tokens from the same seeds, past 256 tokens on several rows,
    and the same log-probs."""
    _, padded, paged = bf16_rollouts
    assert sum(int(n) > 256 for n in padded.lengths) >= 3 and 0 < int(padded.truncated.sum()) < 8
    assert torch.equal(paged.response_ids, padded.response_ids)
    assert torch.equal(paged.response_mask, padded.response_mask) and torch.equal(paged.truncated, padded.truncated)
    torch.testing.assert_close(paged.sampler_logprobs, padded.sampler_logprobs, rtol=0, atol=1e-2)  # bf16 tolerance


def test_paged_logprobs_are_bf16_computed(bf16_rollouts):
    """The paged engine's log-probs are the bf16 forward's: off the float32 forward's by far more than float32
    rounding, and as close to the trainer's own bf16 scoring as the padded engine's are."""
    model, padded, paged = bf16_rollouts
    mask = paged.response_mask.bool()
    with torch.no_grad():
        fp32 = response_logprobs(model, paged, temperature=1.0)
        with torch.autocast(**BF16):
            bf16 = response_logprobs(model, paged, temperature=1.0)
    assert (paged.sampler_logprobs - fp32)[mask].abs().max() > 1e-3  # float32 would be within ~1e-5
    off = (paged.sampler_logprobs - bf16)[mask].abs().max()
    assert off < 2e-2 and off <= (padded.sampler_logprobs - bf16)[mask].abs().max() + 1e-6


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
        assert_same_rows(apart, together, order)
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


def test_recipe_picks_the_paged_engine(tiny_world, tmp_path, write_recipe):
    from merge_distill.engines import PagedSampler, make_sampler
    from merge_distill.errors import UserError
    from merge_distill.validate import load_recipe

    path = write_recipe(tmp_path / "r.yaml", tiny_world, tmp_path / "run")
    student = load_model(tiny_world / "base")
    sampler = make_sampler(load_recipe(path, ["backend.rollout=paged", "budget.max_rollout_tokens=512"]), student)
    assert isinstance(sampler, PagedSampler) and sampler.trainer_logprobs
    assert sampler.config.max_cache_tokens == 512
    # it samples in the trainer's autocast, as the padded engine: its log-probs serve as pi_old in bfloat16 too
    assert make_sampler(load_recipe(path, ["backend.rollout=paged", "dtype=bfloat16"]), student).trainer_logprobs
    with pytest.raises(UserError, match="backend.rollout"):
        load_recipe(path, ["backend.rollout=paged", "parallel=fsdp"])
    with pytest.raises(UserError, match="backend.rollout"):
        load_recipe(path, ["backend.rollout=pages"])


def test_training_through_the_paged_sampler_is_the_padded_run(tiny_world, tmp_path, write_recipe):
    """A short run with backend.rollout paged samples what the padded engine samples: the same response lengths
    every step, and weights equal up to float error; the sampler's log-probs serve as pi_old (ratio 1)."""
    from merge_distill.build import train_recipe
    from merge_distill.validate import load_recipe

    runs = {}
    for engine in ("transformers", "paged"):
        recipe = load_recipe(write_recipe(tmp_path / f"{engine}.yaml", tiny_world, tmp_path / engine, steps=2,
                                          prompts_per_step=6, max_new_tokens=16), [f"backend.rollout={engine}"])
        final = train_recipe(recipe)
        rows = [json.loads(line) for line in (tmp_path / engine / "metrics.jsonl").read_text().splitlines()]
        runs[engine] = (rows, load_model(final).state_dict())
    (padded, w_padded), (paged, w_paged) = runs["transformers"], runs["paged"]
    assert [r["step"] for r in paged] == [1, 2]
    for a, b in zip(padded, paged):
        for key in ("math/response_length", "code/response_length", "truncation_rate"):
            assert a.get(key) == b.get(key), key
        assert abs(b["importance_ratio/max"] - 1) < 1e-3 and abs(b["importance_ratio/min"] - 1) < 1e-3
    for k in w_padded:
        torch.testing.assert_close(w_paged[k], w_padded[k], rtol=1e-3, atol=1e-4)


@pytest.mark.slow
def test_evaluation_through_the_paged_sampler(tiny_world, tmp_path):
    """`evaluate(..., sampler="paged")` end to end (math grader pool): the same generations file as the
    padded engine's."""
    from merge_distill.evaluation.runner import ModelSpec, evaluate
    from merge_distill.evaluation.suites import load_suite

    suite = load_suite(str(tiny_world / "math_test.jsonl"))
    files = {}
    for engine in ("transformers", "paged"):
        out = tmp_path / engine
        result = evaluate([ModelSpec("base", str(tiny_world / "base"))], [suite], samples=2, max_new_tokens=24,
                          temperature=0.8, out_dir=out, batch_size=40, sampler=engine)
        assert result.rows and result.rows[0].n_problems == len(suite.records)
        files[engine] = (out / "generations" / "base__math_test.jsonl").read_text()
    assert files["paged"] == files["transformers"]


def test_sft_samples_its_teachers_through_the_paged_engine(tiny_world, tmp_path, write_recipe, monkeypatch):
    """Frozen teachers (bfloat16 here) sample through the recipe's engine: paged, with the padded samples."""
    from merge_distill import train as train_module
    from merge_distill.build import train_recipe
    from merge_distill.validate import load_recipe

    engines, losses = [], {}
    original = train_module.frozen_sampler
    monkeypatch.setattr(train_module, "frozen_sampler",
                        lambda recipe, model: engines.append(type(original(recipe, model)).__name__)
                        or original(recipe, model))
    for engine in ("transformers", "paged"):
        recipe = load_recipe(write_recipe(tmp_path / f"{engine}.yaml", tiny_world, tmp_path / engine, steps=1,
                                          prompts_per_step=6, max_new_tokens=12),
                             [f"backend.rollout={engine}", "method=sft", "dtype=bfloat16"])
        train_recipe(recipe)
        row = json.loads((tmp_path / engine / "metrics.jsonl").read_text().splitlines()[0])
        losses[engine] = (row["loss"], row["response_length"])
    assert set(engines) == {"TransformersSampler", "PagedSampler"}
    assert losses["paged"] == pytest.approx(losses["transformers"], rel=1e-4)
