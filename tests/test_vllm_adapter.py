"""The vLLM adapter's pure parts, without vLLM: fake outputs with the attribute names of vLLM 0.33's
`RequestOutput`, `CompletionOutput`, `Logprob` and `FlatLogprobs` (vllm/outputs.py, vllm/logprobs.py),
converted to the tensors the transformers backend returns. Nothing here runs a real vLLM engine."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from types import SimpleNamespace
from pathlib import Path
from typing import Any

import pytest
import torch

from merge_distill.engines import TransformersSampler, TransformersScorer, make_sampler, make_scorer
from merge_distill.backends import vllm as vb
from merge_distill.errors import UserError
from merge_distill.recipe import Recipe
from merge_distill.sampling import Rollouts, left_pad

EOS, PAD = 7, 9


# ----------------------------------------------------------------- fakes shaped like vLLM 0.33's classes


@dataclass
class Logprob:  # vllm.logprobs.Logprob
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass
class FlatLogprobs:  # vllm.logprobs.FlatLogprobs (the fields; the real one is also a Sequence of dicts)
    start_indices: list[int] = field(default_factory=list)
    end_indices: list[int] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    ranks: list[int | None] = field(default_factory=list)
    decoded_tokens: list[str | None] = field(default_factory=list)

    def append(self, position: dict[int, Logprob] | None) -> None:  # as vLLM's append()
        self.start_indices.append(len(self.logprobs))
        for tok, lp in (position or {}).items():
            self.token_ids.append(tok)
            self.logprobs.append(lp.logprob)
            self.ranks.append(lp.rank)
            self.decoded_tokens.append(lp.decoded_token)
        self.end_indices.append(len(self.logprobs))


@dataclass
class CompletionOutput:  # vllm.outputs.CompletionOutput
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: Any
    routed_experts: Any = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


@dataclass
class RequestOutput:  # vllm.outputs.RequestOutput (constructor arguments of the same names)
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int] | None
    prompt_logprobs: Any
    outputs: list[CompletionOutput]
    finished: bool = True


def positions(pairs, flat: bool):
    """Per-position containers: `pairs` is a list of None or {token: logprob}; sampled token first (rank as
    vLLM reports it), so a top-k entry may carry a higher log-prob than the sampled token."""
    dicts = [None if p is None else {t: Logprob(lp, rank=r + 1) for r, (t, lp) in enumerate(p.items())} for p in pairs]
    if not flat:
        return dicts
    out = FlatLogprobs()
    for d in dicts:
        out.append(d)
    return out


def completion(ids, lps, *, flat, finish_reason, extra_top=False):
    pairs = [{t: lp, **({99: -0.01} if extra_top and t != 99 else {})} for t, lp in zip(ids, lps)]
    return CompletionOutput(0, "", list(ids), sum(lps), positions(pairs, flat), finish_reason=finish_reason)


PROMPTS = [[1, 2, 3], [4], [5, 6]]
RESPONSES = [([10, 11, EOS], [-0.5, -1.5, -0.25], "stop"),   # ends with EOS
             ([12, 13, 14, 15], [-1.0, -2.0, -3.0, -4.0], "length"),  # hit max_tokens
             ([EOS], [-0.125], "stop")]                        # EOS at once


def generate_outputs(flat: bool, extra_top: bool = True):
    return [RequestOutput(str(i), None, p, None, [completion(ids, lps, flat=flat, finish_reason=fr, extra_top=extra_top)])
            for i, (p, (ids, lps, fr)) in enumerate(zip(PROMPTS, RESPONSES))]


# ----------------------------------------------------------------------------------------- helpers


@pytest.mark.parametrize("flat", [False, True])
def test_token_logprobs_picks_the_given_token(flat):
    pairs = [None, {5: -2.0, 3: -0.1}, {3: -0.7}]  # position 1: token 5 sampled at rank 2, 3 is the top-1
    lp = positions(pairs, flat)
    assert vb.token_logprobs(lp, [5, 3], start=1) == [-2.0, -0.7]
    with pytest.raises(ValueError, match="token 4 not among"):
        vb.token_logprobs(lp, [4], start=1)
    with pytest.raises(ValueError, match="position 0"):
        vb.token_logprobs(lp, [5], start=0)  # the first prompt position has no log-prob


@pytest.mark.parametrize("flat", [False, True])
def test_rollouts_from_outputs(flat):
    r = vb.rollouts_from_outputs(PROMPTS, generate_outputs(flat), eos_token_id=EOS, pad_token_id=PAD)
    assert torch.equal(r.prompt_ids, torch.tensor([[1, 2, 3], [PAD, PAD, 4], [PAD, 5, 6]]))
    assert torch.equal(r.prompt_mask, torch.tensor([[1, 1, 1], [0, 0, 1], [0, 1, 1]]))
    assert torch.equal(r.response_ids, torch.tensor([[10, 11, EOS, PAD], [12, 13, 14, 15], [EOS, PAD, PAD, PAD]]))
    assert r.response_mask.dtype == torch.float32
    assert torch.equal(r.response_mask, torch.tensor([[1.0, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]]))
    assert torch.equal(r.sampler_logprobs, torch.tensor([[-0.5, -1.5, -0.25, 0], [-1, -2, -3, -4], [-0.125, 0, 0, 0]]))
    assert r.truncated.tolist() == [False, True, False]
    assert r.response_token_lists() == [ids for ids, _, _ in RESPONSES]
    assert r.lengths.tolist() == [3, 4, 1]


def test_rollouts_reject_mismatched_outputs():
    outputs = generate_outputs(False)
    with pytest.raises(ValueError, match="different prompt"):
        vb.rollouts_from_outputs(PROMPTS[::-1], outputs, eos_token_id=EOS, pad_token_id=PAD)
    with pytest.raises(ValueError, match="2 outputs for 3 prompts"):
        vb.rollouts_from_outputs(PROMPTS, outputs[:2], eos_token_id=EOS, pad_token_id=PAD)
    outputs[0].outputs.append(outputs[0].outputs[0])
    with pytest.raises(ValueError, match="one completion"):
        vb.rollouts_from_outputs(PROMPTS, outputs, eos_token_id=EOS, pad_token_id=PAD)


# ------------------------------------------- the engine wrappers, driven by a fake `vllm` module and LLM

# Some SamplingParams fields of vLLM 0.33 (vllm/sampling_params.py) and their defaults there.
SAMPLING_DEFAULTS = {"n": 1, "temperature": 1.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0, "seed": None,
                     "stop_token_ids": None, "ignore_eos": False, "max_tokens": 16, "logprobs": None,
                     "prompt_logprobs": None, "detokenize": True, "flat_logprobs": False, "skip_special_tokens": True}


def fake_vllm():
    def SamplingParams(**kw):  # mirrors the vLLM class name
        assert set(kw) <= set(SAMPLING_DEFAULTS), set(kw) - set(SAMPLING_DEFAULTS)
        return SimpleNamespace(**{**SAMPLING_DEFAULTS, **kw})

    def TokensPrompt(**kw):  # a TypedDict in vLLM
        assert set(kw) == {"prompt_token_ids"}
        return dict(kw)

    return SimpleNamespace(SamplingParams=SamplingParams, TokensPrompt=TokensPrompt, __version__="0.33.0")


class FakeLLM:
    """`LLM.generate` / `collective_rpc` / `reset_prefix_cache` over a tiny HF model, with vLLM's semantics:
    the sampled token's processed (tempered) log-prob, per-request seeds, EOS kept."""

    def __init__(self, model):
        self.model, self.calls = model, []

    def _logprobs(self, ids):
        with torch.no_grad():
            logits = self.model(input_ids=torch.tensor([ids])).logits[0].float()
        return torch.log_softmax(logits, -1)

    def generate(self, prompts, params, use_tqdm=True):
        params = params if isinstance(params, list) else [params] * len(prompts)
        outs = []
        for prompt, sp in zip(prompts, params):
            ids = list(prompt["prompt_token_ids"])
            gen = torch.Generator().manual_seed(sp.seed or 0)
            seq, toks, lps = list(ids), [], []
            for _ in range(sp.max_tokens):
                lp = torch.log_softmax(self._logprobs(seq)[-1] / max(sp.temperature, 1e-5), -1)
                tok = int(torch.multinomial(lp.exp(), 1, generator=gen)) if sp.temperature > 0 else int(lp.argmax())
                toks.append(tok)
                lps.append(float(lp[tok]))
                seq.append(tok)
                if tok in (sp.stop_token_ids or []):
                    break
            finish = "stop" if toks[-1] in (sp.stop_token_ids or []) else "length"
            outs.append(RequestOutput("r", None, ids, None,
                                      [completion(toks, lps, flat=sp.flat_logprobs, finish_reason=finish)]))
        return outs

    def collective_rpc(self, method, timeout=None, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        kwargs["weights_iterator"] = [name for name, _ in kwargs["weights_iterator"]]
        self.calls.append((method, kwargs))
        return [None]

    def reset_prefix_cache(self, reset_running_requests=False, reset_connector=False):
        self.calls.append(("reset_prefix_cache", {}))
        return True


@pytest.fixture
def tiny_model():
    from merge_distill.models import tiny_qwen3

    return tiny_qwen3(16, hidden=16, layers=1, heads=2, seed=0).eval()


def wrapped(cls, llm):
    obj = cls.__new__(cls)
    obj.llm = llm
    return obj


def test_sampler_matches_the_transformers_backend(monkeypatch, tiny_model):
    from merge_distill.scoring import response_logprobs

    monkeypatch.setattr(vb, "import_vllm", fake_vllm)
    llm = FakeLLM(tiny_model)
    sampler = wrapped(vb.VLLMSampler, llm)
    prompts, eos = [[1, 2, 3], [4], [5, 6], [1, 2, 3]], 14  # a token this random model samples often
    r = sampler.sample(prompts, max_new_tokens=6, temperature=0.7, eos_token_id=eos, pad_token_id=PAD, seeds=[3, 4, 5, 3])
    assert r.truncated.tolist() == [False, True, False, False] and r.lengths.tolist() == [4, 6, 1, 4]
    assert all(ids[-1] == eos for ids, cut in zip(r.response_token_lists(), r.truncated) if not cut)
    assert (r.response_ids[r.response_mask == 0] == PAD).all()
    # a row depends on its prompt and seed only: rows 0 and 3 agree, and so does a batch of one
    assert r.response_token_lists()[0] == r.response_token_lists()[3]
    alone = sampler.sample([[5, 6]], max_new_tokens=6, temperature=0.7, eos_token_id=eos, pad_token_id=PAD, seeds=[5])
    assert alone.response_token_lists()[0] == r.response_token_lists()[2]
    # the recorded log-probs are those of the tempered distribution, as the transformers backend records them
    assert torch.allclose(r.sampler_logprobs, response_logprobs(tiny_model, r, temperature=0.7), atol=1e-5)
    with pytest.raises(ValueError, match="one seed per row"):
        sampler.sample(prompts, max_new_tokens=2, temperature=1.0, eos_token_id=EOS, pad_token_id=PAD, seeds=[1])


def test_sync_weights_reloads_in_place_and_drops_the_prefix_cache(tiny_model):
    llm = FakeLLM(tiny_model)
    wrapped(vb.VLLMSampler, llm).sync_weights(tiny_model)
    (method, kwargs), (reset, _) = llm.calls
    assert method == "reload_weights" and kwargs["is_checkpoint_format"] is True
    assert kwargs["weights_iterator"] == list(tiny_model.state_dict())
    assert reset == "reset_prefix_cache"


# ------------------------------------------------------------------------ missing vLLM, recipe switch


RECIPE = {"student": "s", "experts": [{"name": "math", "teacher": "t", "prompts": "p.jsonl"}], "output_dir": "o"}


def test_missing_vllm_is_one_clear_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` raises ImportError
    with pytest.raises(UserError) as e:
        vb.import_vllm()
    assert "pip install 'merge-distill[vllm]'" in str(e.value) and len(str(e.value).splitlines()) == 1
    recipe = Recipe.model_validate({**RECIPE, "backend": {"rollout": "vllm"}})
    with pytest.raises(UserError, match=r"merge-distill\[vllm\]"):
        make_sampler(recipe, None)


def test_scoring_through_vllm_is_refused_with_the_reason():
    """Teachers and references score through the trainer's chunked scorer, whatever samples the student."""
    with pytest.raises(Exception, match="backend.scoring vllm was removed: teachers and references score through "
                                        "the trainer's chunked scorer"):
        Recipe.model_validate({**RECIPE, "backend": {"rollout": "vllm", "scoring": "vllm"}})
    recipe = Recipe.model_validate({**RECIPE, "backend": {"rollout": "vllm"}})
    assert isinstance(make_scorer(recipe, "t", None), TransformersScorer)


def test_backend_defaults_to_transformers():
    recipe = Recipe.model_validate(RECIPE)
    assert (recipe.backend.rollout, recipe.backend.scoring, recipe.backend.gpu_memory_utilization) == ("transformers", "transformers", 0.5)
    assert isinstance(make_sampler(recipe, None), TransformersSampler)
    assert isinstance(make_scorer(recipe, "t", None), TransformersScorer)
    with pytest.raises(Exception, match="rollout"):
        Recipe.model_validate({**RECIPE, "backend": {"rollout": "sglang"}})


def test_left_pad_is_the_shared_layout():
    ids, mask = left_pad(PROMPTS, PAD)
    r = vb.rollouts_from_outputs(PROMPTS, generate_outputs(False), eos_token_id=EOS, pad_token_id=PAD)
    assert torch.equal(ids, r.prompt_ids) and torch.equal(mask, r.prompt_mask)


@pytest.mark.slow
def test_trainer_samples_through_the_backend(monkeypatch, tiny_world, tmp_path, write_recipe):
    """The trainer's side of the backend (no real vLLM here): rollouts come from the engine, which gets the
    student's weights after every update; frozen models score in the trainer, never in an engine."""
    from merge_distill.models import load_model
    from merge_distill.recipe import load_recipe
    from merge_distill.train import train

    engines = []

    def engine(model, **kw):
        engines.append((Path(model).name, FakeLLM(load_model(model).eval())))
        return engines[-1][1]

    monkeypatch.setattr(vb, "import_vllm", fake_vllm)
    monkeypatch.setattr(vb, "_engine", engine)
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", tiny_world, tmp_path / "run", steps=2, prompts_per_step=4,
                                      max_new_tokens=6),
                         ["backend.rollout=vllm", "experts.code.reward_scale=1.0"])
    train(recipe)
    assert [n for n, _ in engines] == ["base"]  # the student's sampler, and no engine for a frozen model
    syncs = [c for c in engines[0][1].calls if c[0] == "reload_weights"]
    assert len(syncs) == 2  # one after each of the two updates
    rows = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(r["math/n_sequences"] > 0 for r in rows)


@pytest.mark.slow
def test_engine_noise_stays_out_of_the_reward(monkeypatch, tiny_world, tmp_path, write_recipe):
    """The engine's log-probs (bf16, its own kernels) differ from the trainer's. As in the official G-OPD code,
    the advantage's pi_old term is the trainer's recomputed log-prob; the engine's serves only in the
    importance weight pi_theta / pi_engine."""
    from merge_distill import objective
    from merge_distill.models import load_model
    from merge_distill.recipe import load_recipe
    from merge_distill.scoring import response_logprobs
    from merge_distill.train import train

    noise = 0.3

    class NoisyLLM(FakeLLM):
        def generate(self, prompts, params, use_tqdm=True):
            outs = super().generate(prompts, params, use_tqdm)
            for out in outs:  # flat log-probs holding the sampled token only (logprobs=0)
                out.outputs[0].logprobs.logprobs = [lp - noise for lp in out.outputs[0].logprobs.logprobs]
            return outs

    student = load_model(tiny_world / "base").eval()
    monkeypatch.setattr(vb, "import_vllm", fake_vllm)
    monkeypatch.setattr(vb, "_engine", lambda model, **kw: NoisyLLM(student))
    seen = []
    original = objective.gopd_advantages

    def spy(student_lp, teacher_lp, reference_lp, lam):
        seen.append(student_lp)
        return original(student_lp, teacher_lp, reference_lp, lam)

    rollouts = []
    original_pg = objective.policy_gradient_loss

    def pg_spy(logprobs, sampler_logprobs, *a, **kw):
        rollouts.append((logprobs.detach(), sampler_logprobs))
        return original_pg(logprobs, sampler_logprobs, *a, **kw)

    monkeypatch.setattr(objective, "gopd_advantages", spy)
    monkeypatch.setattr(objective, "policy_gradient_loss", pg_spy)
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", tiny_world, tmp_path / "run", steps=1, prompts_per_step=4,
                                      max_new_tokens=6), ["backend.rollout=vllm"])
    train(recipe)
    (logprobs, engine_lp), = rollouts  # one micro-batch: the trainer's log-probs and the engine's
    mask = engine_lp != 0
    # the engine's log-probs are the trainer's minus the noise; the advantage saw the trainer's
    torch.testing.assert_close(engine_lp[mask], logprobs[mask] - noise, rtol=0, atol=1e-4)
    used = torch.cat([s[s != 0] for s in seen])
    torch.testing.assert_close(torch.sort(used).values, torch.sort(logprobs[mask]).values, rtol=0, atol=1e-4)
