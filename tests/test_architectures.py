"""The scorer gives each architecture's own log-probs, those the sampler reads from `model(...).logits`: heads
that post-process logits (Granite divides by `logits_scaling`, Cohere multiplies by `logit_scale`, HyperCLOVAX
multiplies by `logits_scaling`, Gemma 2/3 soft-cap), GPT-2's `transformer` backbone and tied head, all through
the fused projection; a model whose logits it cannot reproduce is refused."""

import contextlib

import pytest
import torch
import transformers as tf

from merge_distill.errors import UserError
from merge_distill.sampling import Rollouts, left_pad, positions, sample
from merge_distill.scoring import response_logprobs

VOCAB, BOS, EOS, PAD = 160, 1, 2, 0
SMALL = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
             num_key_value_heads=1, max_position_embeddings=64, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD)
ARCHITECTURES = {  # post-processing set to bite: logits are several nats wide (see `tiny`)
    "llama": lambda: tf.LlamaForCausalLM(tf.LlamaConfig(**SMALL)),
    "qwen3": lambda: tf.Qwen3ForCausalLM(tf.Qwen3Config(**SMALL, head_dim=16)),
    "mistral": lambda: tf.MistralForCausalLM(tf.MistralConfig(**SMALL)),
    "phi3": lambda: tf.Phi3ForCausalLM(tf.Phi3Config(**SMALL)),
    "gemma2": lambda: tf.Gemma2ForCausalLM(tf.Gemma2Config(**SMALL, head_dim=16, final_logit_softcapping=2.0)),
    "gemma3": lambda: tf.Gemma3ForCausalLM(tf.Gemma3TextConfig(**SMALL, head_dim=16, final_logit_softcapping=1.0)),
    "granite": lambda: tf.GraniteForCausalLM(tf.GraniteConfig(**SMALL, logits_scaling=4.0)),
    "cohere": lambda: tf.CohereForCausalLM(tf.CohereConfig(**SMALL, logit_scale=0.25)),
    "hyperclovax": lambda: tf.HyperCLOVAXForCausalLM(tf.HyperCLOVAXConfig(**SMALL, logits_scaling=0.25)),
    "gpt2": lambda: tf.GPT2LMHeadModel(tf.GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=2, n_positions=64, bos_token_id=BOS, eos_token_id=EOS,
        pad_token_id=PAD, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)),
}
POST_PROCESSED = {"gemma2", "gemma3", "granite", "cohere", "hyperclovax"}


def tiny(name: str) -> torch.nn.Module:
    """A seeded float32 model of architecture `name`, its output embeddings scaled up so that logits span
    several nats and soft-caps and scales change the log-probs by far more than the tolerances."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = ARCHITECTURES[name]()
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(40)
    return model


def rollouts() -> Rollouts:
    """4 rows: left-padded prompts of 5, 2, 7 and 1 tokens; right-padded responses of 6 (truncated), 3, 1 and 4
    tokens, the shorter ones ending in EOS."""
    g = torch.Generator().manual_seed(1)
    prompt_ids, prompt_mask = left_pad([torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in (5, 2, 7, 1)],
                                       PAD)
    lengths = [6, 3, 1, 4]
    response_ids = torch.full((4, 6), PAD)
    response_mask = torch.zeros(4, 6, dtype=torch.bool)
    for row, n in enumerate(lengths):
        response_ids[row, :n] = torch.randint(3, VOCAB, (n,), generator=g)
        response_mask[row, :n] = True
        if n < 6:
            response_ids[row, n - 1] = EOS
    return Rollouts(prompt_ids, prompt_mask, response_ids, response_mask, sampler_logprobs=torch.zeros(4, 6),
                    truncated=torch.tensor([True, False, False, False]))


def logprobs_at_responses(logits_of, ro: Rollouts, temperature: float) -> torch.Tensor:
    """log-softmax(`logits_of(input_ids=, attention_mask=, position_ids=)` / temperature) at the response tokens."""
    ids = torch.cat([ro.prompt_ids, ro.response_ids], 1)
    mask = torch.cat([ro.prompt_mask, ro.response_mask.long()], 1)
    P = ro.prompt_ids.shape[1]
    logits = logits_of(input_ids=ids, attention_mask=mask, position_ids=positions(mask))[:, P - 1:-1]
    lp = (logits.float() / temperature).log_softmax(-1)
    return lp.gather(-1, ro.response_ids[..., None]).squeeze(-1) * ro.response_mask


def own_logprobs(model, ro: Rollouts, temperature: float) -> torch.Tensor:
    """What the sampler samples from: the model's own logits."""
    return logprobs_at_responses(lambda **kw: model(**kw).logits, ro, temperature)


def unprocessed_logprobs(model, ro: Rollouts, temperature: float) -> torch.Tensor:
    """`lm_head(backbone(x))` without the forward's post-processing: what the scorer used before."""
    head, backbone = model.get_output_embeddings(), model.base_model
    return logprobs_at_responses(lambda **kw: head(backbone(**kw).last_hidden_state), ro, temperature)


@contextlib.contextmanager
def head_module_never_runs(model):
    """Fails if the head module runs: the scorer must project through the fused function, never materialising
    `[tokens, vocab]` logits (the full-logits fallback would)."""
    def fail(*_):
        raise AssertionError("the scorer ran the head module on full logits")

    handle = model.get_output_embeddings().register_forward_hook(fail)
    try:
        yield
    finally:
        handle.remove()


def fused_response_logprobs(model, ro: Rollouts, **kwargs) -> torch.Tensor:
    """`response_logprobs` after its once-per-model check (a full forward on a probe), with the head module
    forbidden."""
    with torch.no_grad():
        response_logprobs(model, ro)
    with head_module_never_runs(model):
        return response_logprobs(model, ro, **kwargs)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("name", ARCHITECTURES)
def test_scored_logprobs_are_the_models_own(name, temperature):
    model, ro = tiny(name), rollouts()
    with torch.no_grad():
        ours = fused_response_logprobs(model, ro, temperature=temperature)
        expected = own_logprobs(model, ro, temperature)
        if name in POST_PROCESSED:  # the post-processing matters here: ignoring it is far off
            assert (unprocessed_logprobs(model, ro, temperature) - expected).abs().max() > 0.1
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
    assert bool((ours[ro.response_mask == 0] == 0).all())


@pytest.mark.parametrize("name", ["gemma2", "granite", "gpt2"])
def test_student_gradients_match_autograd_on_the_models_own_logits(name):
    model, ro = tiny(name), rollouts()
    weights = torch.randn(ro.response_mask.shape, generator=torch.Generator().manual_seed(2))
    ours = fused_response_logprobs(model, ro, temperature=0.7, chunk_tokens=4)
    (ours * weights).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    (own_logprobs(model, ro, 0.7) * weights).sum().backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, rtol=1e-4, atol=1e-5, msg=n)


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_importance_ratio_to_the_sampler_is_one(name):
    model = tiny(name)
    ro = sample(model, [[5, 6, 7], [8], [9, 10, 11, 12, 13]], max_new_tokens=6, temperature=0.7, eos_token_id=EOS,
                pad_token_id=PAD, seeds=[0, 1, 2])
    with torch.no_grad():
        ours = fused_response_logprobs(model, ro, temperature=0.7)
    torch.testing.assert_close(ours, ro.sampler_logprobs, rtol=1e-4, atol=1e-4)


class TripledLogitsLlama(tf.LlamaForCausalLM):
    """A causal LM whose forward post-processes logits in a way the scorer does not know."""

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        out.logits = out.logits * 3
        return out


def test_unknown_logit_postprocessing_is_refused_in_one_line():
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = TripledLogitsLlama(tf.LlamaConfig(**SMALL))
    with pytest.raises(UserError) as refused:
        response_logprobs(model, rollouts())
    message = str(refused.value)
    assert "\n" not in message
    assert "TripledLogitsLlama" in message and "'llama'" in message and "not supported by the scorer" in message
