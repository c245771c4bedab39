"""Sampling: per-row randomness (a row's response does not depend on its batch), exact draws, and the stop ids."""

from types import SimpleNamespace

import torch

from merge_distill.data import render_prompt
from merge_distill.models import load_model, load_tokenizer
from merge_distill.toyworld.models import byte_tokenizer
from merge_distill.sampling import LogitsSource, draw, eos_token_ids, row_seeds, row_uniforms, sample, stop_ids
from sampled import assert_same_rows, biased_model


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


def test_eos_token_ids_are_the_tokenizers_then_the_generation_configs():
    """The stop ids training and evaluation pass: the tokenizer's EOS, then each of the generation config's (one id
    or a list, as Qwen3 instruct models ship it), without repeats; the tokenizer's alone without a config."""
    from transformers import GenerationConfig

    tok = byte_tokenizer()
    second = tok.convert_tokens_to_ids("<|endoftext|>")
    model = SimpleNamespace(generation_config=GenerationConfig(eos_token_id=[second, tok.eos_token_id]))
    assert eos_token_ids(tok, model) == (tok.eos_token_id, second)
    model.generation_config.eos_token_id = second
    assert eos_token_ids(tok, model) == (tok.eos_token_id, second)
    model.generation_config.eos_token_id = None
    assert eos_token_ids(tok, model) == (tok.eos_token_id,)
    assert eos_token_ids(tok, None) == eos_token_ids(tok, LogitsSource()) == (tok.eos_token_id,)
    assert stop_ids(5) == (5,) and stop_ids([5, 3]) == (5, 3)


def test_every_eos_id_ends_a_row_inside_its_mask():
    """Two stop ids (the tokenizer's EOS and a second one, e.g. Qwen3's <|endoftext|>): a row ends at whichever
    it draws first, that token inside its mask with its log-prob, and the row is not truncated. A model whose head
    favours the second id shows it: given only the first, those rows run on."""
    tok = byte_tokenizer()
    second = tok.convert_tokens_to_ids("<|endoftext|>")
    model = biased_model(tok, second, 2.5)
    prompts = [[5 + i, 17, 40 + i, 9][: 1 + i % 4] for i in range(12)]
    kw = dict(max_new_tokens=24, temperature=1.0, pad_token_id=tok.pad_token_id, seeds=row_seeds(2, 12))
    stops = (tok.eos_token_id, second)
    r = sample(model, prompts, eos_token_id=stops, **kw)
    ends = []
    for b, ids in enumerate(r.response_ids.tolist()):
        n = next((t + 1 for t, i in enumerate(ids) if i in stops), 24)
        assert r.response_mask[b].tolist() == [True] * n + [False] * (len(ids) - n)
        assert bool(r.truncated[b]) == (ids[n - 1] not in stops)
        assert r.sampler_logprobs[b, n - 1] < 0 and bool((r.sampler_logprobs[b, n:] == 0).all())
        ends.append(ids[n - 1] if ids[n - 1] in stops else None)
    assert ends.count(second) >= 3 and tok.eos_token_id in ends and None in ends  # both ids end rows; some hit the cap
    first_only = sample(model, prompts, eos_token_id=tok.eos_token_id, **kw)
    for b, end in enumerate(ends):
        if end == second:  # the same draws, not stopped there
            n = int(r.lengths[b])
            assert first_only.response_ids[b, :n].tolist() == r.response_ids[b, :n].tolist()
            assert int(first_only.lengths[b]) > n


def test_training_and_evaluation_pass_every_eos_id_of_the_model(tiny_world, tmp_path):
    """The trainer's rollouts (`train.Run._sample`) and evaluation (`runner.generate_and_grade`) stop at the
    ids `eos_token_ids` gives for the sampled model: its generation config's second EOS reaches the sampler."""
    from merge_distill.engines import TransformersSampler
    from merge_distill.evaluation.runner import ModelSpec, generate_and_grade
    from merge_distill.evaluation.suites import load_suite
    from merge_distill.train import Run

    model, tok = load_model(tiny_world / "base"), load_tokenizer(tiny_world / "base")
    second = tok.convert_tokens_to_ids("<|endoftext|>")
    model.generation_config.eos_token_id = [tok.eos_token_id, second]
    seen = []

    class Recording(TransformersSampler):
        def sample(self, prompts, **kw):
            seen.append(tuple(kw["eos_token_id"]))
            return super().sample(prompts, **kw)

    recipe = SimpleNamespace(rollout=SimpleNamespace(max_new_tokens=4, temperature=1.0),
                             budget=SimpleNamespace(max_rollout_tokens=None))
    setup = SimpleNamespace(recipe=recipe, tokenizer=tok, student=model)
    batch = [SimpleNamespace(token_ids=(5, 6, 7)), SimpleNamespace(token_ids=(8,))]
    Run._sample(setup, Recording(model), batch, [1, 2])
    suite = load_suite(str(tiny_world / "math_test.jsonl"))
    suite.records = suite.records[:2]
    grader = SimpleNamespace(grade_many=lambda records, texts: [SimpleNamespace(verdict="x", score=0.0, detail="")]
                             * len(texts))
    generate_and_grade(ModelSpec("base", str(tiny_world / "base")), suite, samples=1, temperature=1.0,
                       max_new_tokens=4, seed=0, out_dir=tmp_path, sampler=Recording(model), tokenizer=tok,
                       grader=grader)
    assert seen == [(tok.eos_token_id, second)] * 2
