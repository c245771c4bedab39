"""The vLLM adapter's pure parts, without vLLM: fake outputs with the attribute names of vLLM 0.33's
`RequestOutput`, `CompletionOutput`, `Logprob` and `FlatLogprobs` (vllm/outputs.py, vllm/logprobs.py),
converted to the tensors the transformers backend returns. Nothing here runs a real vLLM engine."""

from __future__ import annotations

import inspect
import json
import os
import sys
from dataclasses import dataclass, field
from types import SimpleNamespace
from pathlib import Path
from typing import Any

import pytest
import torch

from merge_distill.engines import RowChunks, TransformersSampler, make_sampler
from merge_distill.backends import vllm as vb
from merge_distill.errors import UserError
from merge_distill.recipe import Lora, Recipe
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
    assert r.response_mask.dtype == torch.bool
    assert r.response_mask.tolist() == [[True, True, True, False], [True] * 4, [True, False, False, False]]
    assert torch.equal(r.sampler_logprobs, torch.tensor([[-0.5, -1.5, -0.25, 0], [-1, -2, -3, -4], [-0.125, 0, 0, 0]]))
    assert r.truncated.tolist() == [False, True, False]
    assert r.response_token_lists() == [ids for ids, _, _ in RESPONSES]
    assert r.lengths.tolist() == [3, 4, 1]


def test_every_stop_id_ends_a_row_untruncated():
    """With two stop ids, a response ending in the second is a finished row, not a truncated one."""
    outputs = generate_outputs(False)
    outputs[1].outputs[0] = completion([12, 13, 14], [-1.0, -2.0, -3.0], flat=False, finish_reason="stop")
    assert vb.rollouts_from_outputs(PROMPTS, outputs, eos_token_id=(EOS, 14), pad_token_id=PAD).truncated.tolist() == [
        False, False, False]
    assert vb.rollouts_from_outputs(PROMPTS, outputs, eos_token_id=EOS, pad_token_id=PAD).truncated.tolist() == [
        False, True, False]


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
# Arguments of vLLM 0.33's `LLM` / `EngineArgs` (vllm/entrypoints/llm.py, vllm/engine/arg_utils.py) the adapter passes.
ENGINE_ARGS = {"model", "tokenizer", "dtype", "seed", "gpu_memory_utilization", "max_model_len",
               "distributed_executor_backend", "tensor_parallel_size", "enable_sleep_mode", "logprobs_mode",
               "max_num_seqs", "max_num_batched_tokens", "enforce_eager", "kv_cache_memory_bytes",
               "enable_lora", "max_lora_rank", "max_loras"}
# What vLLM's external launcher reads (vllm/v1/executor/uniproc_executor.py: ExecutorWithExternalLauncher).
LAUNCH_KEYS = {"RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "VLLM_ENABLE_V1_MULTIPROCESSING"}


def fake_platform(device_type="cuda", sleep=True):
    """vllm.platforms as the adapter reads it: the current platform's device type and whether it has sleep mode."""
    return SimpleNamespace(current_platform=SimpleNamespace(device_type=device_type,
                                                            is_sleep_mode_available=lambda: sleep))


def fake_vllm(make_llm, platforms=None):
    def SamplingParams(**kw):  # mirrors the vLLM class name
        assert set(kw) <= set(SAMPLING_DEFAULTS), set(kw) - set(SAMPLING_DEFAULTS)
        return SimpleNamespace(**{**SAMPLING_DEFAULTS, **kw})

    def TokensPrompt(**kw):  # a TypedDict in vLLM
        assert set(kw) == {"prompt_token_ids"}
        return dict(kw)

    return SimpleNamespace(SamplingParams=SamplingParams, TokensPrompt=TokensPrompt, LLM=make_llm, __version__="0.33.0",
                           platforms=platforms or fake_platform())


class FakeLLM:
    """vLLM 0.33's `LLM` as the adapter drives it, over a tiny HF model `net` (None: none to run or load into).

    - `generate`: the sampled token's processed (tempered) log-prob, per-request seeds, EOS kept.
    - Sleep mode, as vllm/v1/worker/gpu_worker.py does it: `sleep(1)` offloads the weights to the host,
      `sleep(2)` discards them, both free the KV cache; `wake_up(["weights"])` maps the weights' memory again
      (restored after level 1, garbage after level 2), `wake_up(["kv_cache"])` the KV cache.
    - `collective_rpc("reload_weights", kwargs={"weights_iterator", "is_checkpoint_format"})`: takes the weights
      one at a time, as vLLM's in-place reload does, into its own model.
    - LoRA (`generate(lora_request=...)`, `llm_engine.remove_lora`): an adapter is read from its folder when a request
      first names its id, as vLLM's LRU adapter cache does (a missing folder fails), and kept by id until removed.
    Every call goes to `calls` (and `log`, shared with the test); a call where real vLLM would fail or compute
    garbage (generating from discarded weights or without a KV cache, loading into unmapped memory) fails."""

    def __init__(self, net=None, log=None, **kwargs):
        assert set(kwargs) <= ENGINE_ARGS, set(kwargs) - ENGINE_ARGS
        self.net, self.kwargs, self.calls, self.log = net, kwargs, [], log if log is not None else []
        self.batch_invariant = os.environ.get("VLLM_BATCH_INVARIANT")  # read as vLLM's worker reads it, at start
        self.weights, self.kv_cache = "valid", True  # weights: valid | offloaded | discarded | garbage
        self.loaded = []  # per reload: [(name, dtype, sum)] of what the engine took
        self.adapters = {}  # lora_int_id -> the adapter_config.json read from its folder
        # the in-process engine core's client (vllm/v1/engine/core_client.py: InprocClient.shutdown)
        self.llm_engine = SimpleNamespace(engine_core=SimpleNamespace(shutdown=lambda: self._call("shutdown")),
                                          remove_lora=self._remove_lora)

    def _remove_lora(self, lora_id):
        self._call("remove_lora", id=lora_id)
        return self.adapters.pop(lora_id, None) is not None

    def _call(self, what, **detail):
        self.calls.append((what, detail))
        self.log.append(what)

    def _logprobs(self, ids):
        with torch.no_grad():
            logits = self.net(input_ids=torch.tensor([ids])).logits[0].float()
        return torch.log_softmax(logits, -1)

    def generate(self, prompts, params, use_tqdm=True, lora_request=None):
        assert self.weights == "valid" and self.kv_cache, (self.weights, self.kv_cache)
        assert (lora_request is not None) == bool(self.kwargs.get("enable_lora")), "an adapter needs enable_lora"
        if lora_request is not None and lora_request.lora_int_id not in self.adapters:
            config = Path(lora_request.lora_path) / "adapter_config.json"
            self.adapters[lora_request.lora_int_id] = json.loads(config.read_text())
        params = params if isinstance(params, list) else [params] * len(prompts)
        self._call("generate", rows=len(prompts), stop_token_ids=[sp.stop_token_ids for sp in params],
                   lora=lora_request and lora_request.lora_int_id)
        outs = []
        for prompt, sp in zip(prompts, params):
            ids = list(prompt["prompt_token_ids"])
            assert len(ids) + sp.max_tokens <= self.kwargs["max_model_len"]
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

    def sleep(self, level=1, mode="abort"):
        assert self.kwargs["enable_sleep_mode"] and self.weights == "valid" and self.kv_cache
        self._call(f"sleep({level})")
        self.weights, self.kv_cache = {1: "offloaded", 2: "discarded"}[level], False

    def wake_up(self, tags=None):
        self._call(f"wake_up({','.join(tags)})")
        if "weights" in tags:
            self.weights = {"offloaded": "valid", "discarded": "garbage"}.get(self.weights, self.weights)
        if "kv_cache" in tags:
            self.kv_cache = True
        return self.weights == "valid" and self.kv_cache

    def collective_rpc(self, method, timeout=None, args=(), kwargs=None):
        assert method == "reload_weights" and kwargs["is_checkpoint_format"] is True
        assert self.weights in ("valid", "garbage"), f"loading into {self.weights} weights"
        weights = kwargs["weights_iterator"]
        assert inspect.isgenerator(weights), type(weights)  # streamed, not a materialised state dict
        self._call("reload_weights")
        own = self.net.state_dict() if self.net is not None else {}
        self.loaded.append([])
        for name, tensor in weights:
            self.log.append(("load", name))
            self.loaded[-1].append((name, tensor.dtype, float(tensor.float().sum())))
            if name in own:
                own[name].copy_(tensor)
        self.weights = "valid"
        return [None]

    def reset_prefix_cache(self, reset_running_requests=False, reset_connector=False):
        self._call("reset_prefix_cache")
        return True


@pytest.fixture
def launcher_env(monkeypatch):
    """This process's environment without the launcher's variables; what the sampler sets stays in the test."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_KEYS}
    monkeypatch.setattr(os, "environ", env)
    return env


@pytest.fixture
def tiny_model():
    from merge_distill.toyworld.models import tiny_qwen3

    return tiny_qwen3(16, hidden=16, layers=1, heads=2, seed=0).eval()


def vllm_sampler(monkeypatch, model, student=None, *, log=None, platforms=None, engine=vb.VLLMSampler, **kw):
    """A `VLLMSampler` (or `engine`) over a `FakeLLM` of `model`, built as the trainer builds it (one process, on the
    CPU; vLLM's platform a CUDA one unless `platforms` says otherwise)."""
    monkeypatch.setattr(vb, "import_vllm", lambda: fake_vllm(lambda **args: FakeLLM(model, log, **args), platforms))
    kw = {"max_model_len": 64, "device": "cpu", "dtype": "float32", **kw}
    return engine("checkpoints/student", model if student is None else student, **kw)


def sample(sampler, prompts=((1, 2, 3), (4,)), seeds=(3, 4), **kw):
    kw = {"max_new_tokens": 4, "temperature": 1.0, "eos_token_id": EOS, "pad_token_id": PAD, **kw}
    return sampler.sample([list(p) for p in prompts], seeds=list(seeds), **kw)


def test_sampler_matches_the_transformers_backend(monkeypatch, launcher_env, tiny_model):
    from merge_distill.scoring import response_logprobs

    sampler = vllm_sampler(monkeypatch, tiny_model)
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
    with pytest.raises(UserError, match="a prompt of 3 tokens \\+ 62 new tokens exceeds the vLLM engine's max_model_len 64"):
        sample(sampler, max_new_tokens=62)


def test_every_eos_id_reaches_the_engine(monkeypatch, launcher_env, tiny_model):
    """The sampler's stop ids (e.g. Qwen3's <|im_end|> and <|endoftext|>) are every request's `stop_token_ids`
    (vLLM's own EOS handling is off: `ignore_eos`); a row the engine stopped at either is not truncated."""
    sampler = vllm_sampler(monkeypatch, tiny_model)
    prompts, stops = [[1, 2, 3], [4], [5, 6], [1, 2, 3], [7]], (14, 3)  # tokens this random model samples often
    r = sampler.sample(prompts, max_new_tokens=6, temperature=0.7, eos_token_id=stops, pad_token_id=PAD,
                       seeds=[3, 4, 5, 6, 7])
    (generate,) = [d for what, d in sampler.llm.calls if what == "generate"]
    assert generate["stop_token_ids"] == [[14, 3]] * 5
    last = [ids[-1] for ids, cut in zip(r.response_token_lists(), r.truncated) if not cut]
    assert 14 in last and 3 in last
    assert all(n == 6 for n, cut in zip(r.lengths.tolist(), r.truncated) if cut)


def test_engine_settings_come_from_the_recipe(monkeypatch, launcher_env, tiny_model):
    """backend.max_num_seqs, max_num_batched_tokens and gpu_memory_utilization reach `vllm.LLM` (None leaves
    vLLM's default: not passed); backend.batch_invariant sets VLLM_BATCH_INVARIANT before the engine starts,
    replacing an exported value; the vLLM keys are refused for another engine."""
    engines = []
    monkeypatch.setattr(vb, "import_vllm", lambda: fake_vllm(lambda **a: engines.append(FakeLLM(tiny_model, **a))
                                                             or engines[-1]))
    backend = {"rollout": "vllm", "gpu_memory_utilization": 0.45, "max_num_seqs": 32, "max_num_batched_tokens": 8192,
               "batch_invariant": True}
    make_sampler(Recipe.model_validate({**RECIPE, "device": "cpu", "backend": backend}), tiny_model, max_model_len=64)
    kw = engines[-1].kwargs
    assert (kw["gpu_memory_utilization"], kw["max_num_seqs"], kw["max_num_batched_tokens"]) == (0.45, 32, 8192)
    assert engines[-1].batch_invariant == "1"
    launcher_env["VLLM_BATCH_INVARIANT"] = "1"  # exported by the user: the recipe's false wins
    make_sampler(Recipe.model_validate({**RECIPE, "device": "cpu", "backend": {"rollout": "vllm"}}), tiny_model,
                 max_model_len=64)
    assert "max_num_seqs" not in engines[-1].kwargs and "max_num_batched_tokens" not in engines[-1].kwargs
    assert engines[-1].kwargs["gpu_memory_utilization"] == 0.5 and engines[-1].batch_invariant == "0"
    for key, value in (("max_num_seqs", 8), ("max_num_batched_tokens", 512), ("batch_invariant", True)):
        with pytest.raises(Exception, match=f"backend.{key} sets the vLLM sampler, but backend.rollout is paged"):
            Recipe.model_validate({**RECIPE, "backend": {"rollout": "paged", key: value}})
    with pytest.raises(Exception, match="max_num_seqs"):
        Recipe.model_validate({**RECIPE, "backend": {"rollout": "vllm", "max_num_seqs": 0}})


def test_one_engine_per_rank_through_the_external_launcher(monkeypatch, launcher_env, tiny_model):
    """Under torchrun each rank builds its own engine with vLLM's external launcher: it takes that rank's RANK /
    LOCAL_RANK (its GPU) from the environment torchrun set, and its own seed. Alone, rank 0 of a world of one on
    the recipe's GPU. Never every engine on cuda:0."""
    from merge_distill.distributed import World

    for rank in range(4):
        torchrun = {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "4", "MASTER_ADDR": "10.0.0.1",
                    "MASTER_PORT": "29500"}
        launcher_env.clear()
        launcher_env.update(torchrun)
        monkeypatch.setattr(vb.distributed, "world", lambda rank=rank: World(rank, 4, rank))
        sampler = vllm_sampler(monkeypatch, tiny_model, seed=7, max_model_len=1000, gpu_memory_utilization=0.25,
                               device=f"cuda:{rank}", dtype="bfloat16")
        assert sampler.llm.kwargs == {
            "model": "checkpoints/student", "tokenizer": "checkpoints/student", "dtype": "bfloat16", "seed": 7 + rank,
            "gpu_memory_utilization": 0.25, "max_model_len": 1000, "distributed_executor_backend": "external_launcher",
            "tensor_parallel_size": 1, "enable_sleep_mode": True, "logprobs_mode": "processed_logprobs"}
        # torchrun's values are kept; the engine core runs in this process (the external launcher requires it)
        assert launcher_env == {**torchrun, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_BATCH_INVARIANT": "0"}
    launcher_env.clear()
    monkeypatch.setattr(vb.distributed, "world", lambda: World())
    vllm_sampler(monkeypatch, tiny_model, device="cuda:1")
    assert {k: launcher_env[k] for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR")} == {
        "RANK": "0", "LOCAL_RANK": "1", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}
    assert int(launcher_env["MASTER_PORT"]) > 0


def labels(llm):
    return [what for what, _ in llm.calls]


WAKE = ["wake_up(weights)", "reload_weights", "reset_prefix_cache", "wake_up(kv_cache)"]


def test_sleep_level_2_frees_everything_and_reloads_the_trainer_weights_at_each_wake(monkeypatch, launcher_env,
                                                                                     tiny_model):
    """TRL's and verl's sequence: asleep (level 2) from construction; to sample, wake the weights, load the trainer's
    (level 2 discarded them: vLLM issue #29341), wake the KV cache, generate, sleep. The fake fails a generate
    from discarded weights, so leaving out the reload fails this test."""
    sampler = vllm_sampler(monkeypatch, tiny_model)
    llm = sampler.llm
    assert llm.kwargs["enable_sleep_mode"] is True and labels(llm) == ["sleep(2)"]
    sample(sampler)
    assert labels(llm) == ["sleep(2)", *WAKE, "generate", "sleep(2)"]
    sampler.sync_weights(tiny_model)  # after an update: taken at the next wake, not now (the engine sleeps)
    assert labels(llm)[-1] == "sleep(2)"
    llm.calls.clear()
    with sampler.awake():  # one wake for several calls (the trainer's sampling phase, or an evaluation)
        sample(sampler)
        sample(sampler)
    assert labels(llm) == [*WAKE, "generate", "generate", "sleep(2)"]
    llm.calls.clear()
    with sampler.awake():
        sampler.sync_weights(tiny_model)  # awake: loaded at once
    assert labels(llm) == [*WAKE, "reload_weights", "reset_prefix_cache", "sleep(2)"]


def test_sleep_levels_1_and_0(monkeypatch, launcher_env, tiny_model):
    """Level 1 keeps the weights on the host: a wake without an update in between loads nothing. Level 0 never
    sleeps: the weights are loaded at the first use after an update."""
    one = vllm_sampler(monkeypatch, tiny_model, sleep_level=1)
    sample(one)
    assert labels(one.llm) == ["sleep(1)", "wake_up(weights)", "wake_up(kv_cache)", "generate", "sleep(1)"]
    one.sync_weights(tiny_model)
    one.llm.calls.clear()
    sample(one)
    assert labels(one.llm) == [*WAKE, "generate", "sleep(1)"]
    zero = vllm_sampler(monkeypatch, tiny_model, sleep_level=0)
    assert zero.llm.kwargs["enable_sleep_mode"] is False
    sample(zero)
    zero.sync_weights(tiny_model)
    sample(zero)
    assert labels(zero.llm) == ["generate", "reload_weights", "reset_prefix_cache", "generate"]


@dataclass
class LoRARequest:  # vllm.lora.request.LoRARequest (the fields the sampler sets)
    lora_name: str
    lora_int_id: int
    lora_path: str = ""


@pytest.fixture
def lora_student(monkeypatch, tiny_model):
    """The tiny model with a peft LoRA adapter of rank 4 in its layers (a LoRA student), and vLLM's `LoRARequest`
    importable as the sampler imports it."""
    import copy

    from merge_distill.adapters import add_lora

    monkeypatch.setitem(sys.modules, "vllm.lora.request", SimpleNamespace(LoRARequest=LoRARequest))
    student = copy.deepcopy(tiny_model)
    add_lora(student, Lora(r=4), seed=0)
    return student


def lora_sampler(monkeypatch, tiny_model, student, sleep_level):
    """The sampler `make_sampler` builds for a recipe whose student is `{path, lora: {r: 4}}`, over a `FakeLLM`."""
    monkeypatch.setattr(vb, "import_vllm", lambda: fake_vllm(lambda **args: FakeLLM(tiny_model, **args)))
    recipe = Recipe.model_validate({**RECIPE, "student": {"path": "s", "lora": {"r": 4}}, "device": "cpu",
                                    "dtype": "float32", "backend": {"rollout": "vllm", "sleep_level": sleep_level}})
    return make_sampler(recipe, student, max_model_len=64)


def generated_with(llm) -> list:
    return [d["lora"] for what, d in llm.calls if what == "generate"]


def test_a_lora_student_sends_its_adapter_alone_and_its_base_only_after_a_level_2_sleep(monkeypatch, launcher_env,
                                                                                     tiny_model, lora_student):
    """A LoRA student's engine is built on its base with vLLM's LoRA (rank 4 -> max_lora_rank 8, one adapter) and
    every request names the current adapter. At level 2 each wake streams the base (the engine discarded it) under
    the base's own names, never an adapter's weight; each sync writes a new adapter folder under a new id and removes
    the previous one from the engine and the disk. The fake fails a generate from discarded weights."""
    sampler = lora_sampler(monkeypatch, tiny_model, lora_student, sleep_level=2)
    llm = sampler.llm
    assert type(sampler) is vb.LoRAVLLMSampler and llm.kwargs["model"] == "s"
    assert (llm.kwargs["enable_lora"], llm.kwargs["max_lora_rank"], llm.kwargs["max_loras"]) == (True, 8, 1)
    sample(sampler)
    load = ["wake_up(weights)", "reload_weights", "reset_prefix_cache", "wake_up(kv_cache)", "generate", "sleep(2)"]
    assert labels(llm) == ["sleep(2)", *load] and generated_with(llm) == [1]
    (base,) = llm.loaded
    assert [name for name, _, _ in base] == list(tiny_model.state_dict())  # no `base_layer`, no `lora_`
    first = Path(sampler.lora_request.lora_path)
    assert llm.adapters[1]["r"] == 4 and (first / "adapter_model.safetensors").is_file()
    sampler.sync_weights(lora_student)
    llm.calls.clear()
    sample(sampler)
    assert labels(llm) == [*load[:2], "remove_lora", *load[2:]] and generated_with(llm) == [2]
    assert list(llm.adapters) == [2] and not first.exists() and Path(sampler.lora_request.lora_path).is_dir()
    sampler.close()
    assert not first.parent.exists()


def test_a_lora_student_at_sleep_level_1_sends_only_its_adapter(monkeypatch, launcher_env, tiny_model, lora_student):
    """Level 1 keeps the base on the host: the engine never takes a weight through `reload_weights`; the first wake
    and each wake after a sync load the adapter (a new id), a wake without a sync loads nothing."""
    sampler = lora_sampler(monkeypatch, tiny_model, lora_student, sleep_level=1)
    llm = sampler.llm
    sample(sampler)
    sampler.sync_weights(lora_student)
    sample(sampler)
    sample(sampler)
    awake = ["wake_up(weights)", "wake_up(kv_cache)", "generate", "sleep(1)"]
    assert labels(llm) == ["sleep(1)", "wake_up(weights)", "reset_prefix_cache", *awake[1:],
                           "wake_up(weights)", "remove_lora", "reset_prefix_cache", *awake[1:], *awake]
    assert generated_with(llm) == [1, 2, 2] and llm.loaded == []


def test_save_adapter_writes_the_students_adapter_in_peft_s_format(tmp_path, tiny_model):
    """The folder `save_adapter` writes is a peft adapter folder: peft loads it onto a fresh base and gives the LoRA
    student's log-probs, with an expert's adapter loaded beside the student's in the same model (a shared base) left
    out. Its tensors are the adapter's alone, in the engine's dtype."""
    import copy

    from peft import PeftModel
    from safetensors import safe_open

    from merge_distill.adapters import add_lora

    student = copy.deepcopy(tiny_model)
    peft_model = add_lora(student, Lora(r=4), seed=0)
    expert = add_lora(copy.deepcopy(tiny_model), Lora(r=4), seed=1)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for model in (student, expert):
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=generator))
    expert.save_pretrained(tmp_path / "expert")
    peft_model.load_adapter(str(tmp_path / "expert"), adapter_name="expert0", is_trainable=False)
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        want = student(input_ids=ids).logits
        vb.save_adapter(student, tmp_path / "saved", dtype=torch.float32)
        loaded = PeftModel.from_pretrained(copy.deepcopy(tiny_model), tmp_path / "saved")
        torch.testing.assert_close(loaded(input_ids=ids).logits, want, rtol=0, atol=1e-6)
        assert not torch.allclose(tiny_model(input_ids=ids).logits, want, atol=1e-3)  # the adapter moves them
    vb.save_adapter(student, tmp_path / "bf16", dtype=torch.bfloat16)
    with safe_open(tmp_path / "bf16" / "adapter_model.safetensors", "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
        assert all(".lora_A.weight" in k or ".lora_B.weight" in k for k in f.keys()) and len(f.keys()) == 2 * 7


class Shard:
    """An FSDP2 parameter as `parallel.full_tensors` sees it (a DTensor): `to` casts this rank's piece,
    `full_tensor()` gathers the whole (logged)."""

    def __init__(self, name, tensor, log):
        self.name, self.tensor, self.log = name, tensor, log

    def detach(self):
        return self

    def is_floating_point(self):
        return self.tensor.is_floating_point()

    def to(self, device=None, dtype=None):
        return Shard(self.name, self.tensor.to(device=device, dtype=dtype), self.log)

    def full_tensor(self):
        self.log.append(("gather", self.name))
        return self.tensor.clone()


class Sharded(torch.nn.Module):
    def __init__(self, model, log):
        super().__init__()
        self.model, self.log = model, log

    def state_dict(self, *args, **kwargs):
        return {name: Shard(name, t, self.log) for name, t in self.model.state_dict().items()}


def test_no_sleep_mode_where_the_platform_has_none(monkeypatch, launcher_env, tiny_model):
    """vLLM's CPU platform refuses `enable_sleep_mode` at engine creation: there the engine is built without it, in
    eager mode, never put to sleep, and still takes the trainer's weights at the first use after an update."""
    cpu = vllm_sampler(monkeypatch, tiny_model, sleep_level=2, platforms=fake_platform("cpu", sleep=False))
    assert cpu.llm.kwargs["enable_sleep_mode"] is False and cpu.llm.kwargs["enforce_eager"] is True
    sample(cpu)
    cpu.sync_weights(tiny_model)
    sample(cpu)
    assert labels(cpu.llm) == ["generate", "reload_weights", "reset_prefix_cache", "generate"]
    cuda = vllm_sampler(monkeypatch, tiny_model, sleep_level=2)
    assert cuda.llm.kwargs["enable_sleep_mode"] is True and "enforce_eager" not in cuda.llm.kwargs


def test_cpu_head_sizes_and_versions_are_one_clear_line(monkeypatch, launcher_env, tiny_model, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 32, "num_attention_heads": 2, "head_dim": 16}))
    monkeypatch.setattr(vb, "import_vllm", lambda: fake_vllm(FakeLLM, fake_platform("cpu", sleep=False)))
    with pytest.raises(UserError, match=r"model '.*': head size 16; vLLM's CPU attention takes 32, 64"):
        vb.VLLMSampler(str(tmp_path), tiny_model, max_model_len=64, device="cpu", dtype="float32")
    vb.check_head_size(str(tmp_path), "cuda")  # CUDA's kernels take it
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 64, "num_attention_heads": 2}))
    vb.check_head_size(str(tmp_path), "cpu")  # 64 / 2 = 32
    monkeypatch.undo()
    monkeypatch.setitem(sys.modules, "vllm", SimpleNamespace(__version__="0.31.1"))
    with pytest.raises(UserError, match=r"runs on vLLM 0.32 or 0.33; this is vLLM 0.31.1"):
        vb.import_vllm()


def test_weights_stream_one_gathered_tensor_at_a_time(monkeypatch, launcher_env, tiny_model):
    """The engine takes each parameter as it is gathered, in the engine's dtype: gather, load, gather, load...,
    never the whole state dict first (a generator, not a dict)."""
    log = []
    sampler = vllm_sampler(monkeypatch, tiny_model, Sharded(tiny_model, log), log=log, dtype="bfloat16")
    log.clear()
    sample(sampler)
    names = list(tiny_model.state_dict())
    steps = [e for e in log if isinstance(e, tuple)]
    assert steps == [step for name in names for step in (("gather", name), ("load", name))]
    (loaded,) = sampler.llm.loaded
    assert [(n, d) for n, d, _ in loaded] == [(n, torch.bfloat16) for n in names]


def test_full_tensors_gathers_fsdp2_shards_one_by_one(tmp_path, tiny_model):
    """The same with torch's own FSDP2 (one rank, gloo): each DTensor shard cast, then gathered to a plain tensor."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    from merge_distill.parallel import decoder_layers, full_tensors

    expected = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        for layer in decoder_layers(tiny_model):
            fully_shard(layer)
        fully_shard(tiny_model)
        assert all(hasattr(t, "full_tensor") for t in tiny_model.state_dict().values())
        stream = full_tensors(tiny_model, dtype=torch.bfloat16)
        assert inspect.isgenerator(stream)
        got = list(stream)
    finally:
        dist.destroy_process_group()
    assert [n for n, _ in got] == list(expected)
    for name, tensor in got:
        assert not hasattr(tensor, "full_tensor") and tensor.dtype == torch.bfloat16
        assert torch.equal(tensor, expected[name].to(torch.bfloat16))


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


def test_backend_scoring_is_refused_with_the_reason():
    """Teachers and references score through the trainer's chunked scorer, whatever samples the student: the key
    that chose a scorer is gone, whatever its value."""
    for value in ("vllm", "transformers"):
        with pytest.raises(Exception, match="backend.scoring was removed: teachers and references always score "
                                            "through the trainer's chunked scorer; delete the line"):
            Recipe.model_validate({**RECIPE, "backend": {"rollout": "vllm", "scoring": value}})


def test_backend_defaults_to_transformers():
    recipe = Recipe.model_validate(RECIPE)
    assert (recipe.backend.rollout, recipe.backend.gpu_memory_utilization) == ("transformers", 0.5)
    assert type(make_sampler(recipe, None)) is TransformersSampler  # the padded engine, not its paged subclass
    budget = Recipe.model_validate({**RECIPE, "budget": {"max_rollout_tokens": 512}})
    assert type(make_sampler(budget, None)) is RowChunks and type(make_sampler(budget, None).engine) is TransformersSampler
    with pytest.raises(Exception, match="rollout"):
        Recipe.model_validate({**RECIPE, "backend": {"rollout": "sglang"}})


def test_left_pad_is_the_shared_layout():
    ids, mask = left_pad(PROMPTS, PAD)
    r = vb.rollouts_from_outputs(PROMPTS, generate_outputs(False), eos_token_id=EOS, pad_token_id=PAD)
    assert torch.equal(ids, r.prompt_ids) and torch.equal(mask, r.prompt_mask)


def trainer_engines(monkeypatch, engine=FakeLLM):
    """Route the trainer's vLLM engines to fakes over the checkpoint each is built from; returns them."""
    from merge_distill.models import load_model

    engines = []

    def make(**kwargs):
        engines.append(engine(load_model(kwargs["model"]).eval(), **kwargs))
        return engines[-1]

    monkeypatch.setattr(vb, "import_vllm", lambda: fake_vllm(make))
    return engines


@pytest.mark.slow
def test_trainer_samples_through_the_backend(monkeypatch, launcher_env, tiny_world, tmp_path, write_recipe):
    """The trainer's side (no real vLLM here): one engine, the student's; its max_model_len is the longest
    training prompt + max_new_tokens; each step wakes it once, loads the trainer's current weights, samples
    every row in one call (it pages its own cache: no chunks within max_rollout_tokens), and puts it to sleep
    for scoring and the update. The student is not gathered for decoding (under fsdp it stays sharded while
    the engine samples). Frozen models score in the trainer, never in an engine."""
    from merge_distill.models import load_model, load_tokenizer
    from merge_distill.build import load_prompts, train_recipe
    from merge_distill.validate import load_recipe

    from merge_distill import parallel

    def gathered(*a, **kw):
        raise AssertionError("the student's shards gathered for decoding: the engine holds its own weights")

    monkeypatch.setattr(parallel, "decoding", gathered)
    engines = trainer_engines(monkeypatch)
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", tiny_world, tmp_path / "run", steps=2, prompts_per_step=4,
                                      max_new_tokens=6, max_rollout_tokens=16),
                         ["backend.rollout=vllm", "experts.code.reward_scale=1.0", "backend.check_sync_every=0"])
    train_recipe(recipe)
    (llm,) = engines  # the student's sampler, and no engine for a frozen model
    longest = max(len(p.token_ids) for pool in load_prompts(recipe, load_tokenizer(recipe.student.path)) for p in pool)
    assert llm.kwargs["model"] == recipe.student.path and llm.kwargs["max_model_len"] == longest + 6
    step = [*WAKE, "generate", "sleep(2)"]
    assert labels(llm) == ["sleep(2)", *step, *step, "shutdown"]  # shut down after training (it made the group)
    assert [d["rows"] for what, d in llm.calls if what == "generate"] == [4, 4]
    # the first wake loads the initial weights (level 2 discarded the engine's own), the second the updated ones
    base = load_model(tiny_world / "base").state_dict()
    first, second = llm.loaded
    assert [n for n, _, _ in first] == list(base) and [n for n, _, _ in second] == list(base)
    assert all(abs(total - float(base[n].sum())) < 1e-3 for n, _, total in first)
    assert any(abs(a[2] - b[2]) > 1e-6 for a, b in zip(first, second))
    rows = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(r["math/n_sequences"] > 0 for r in rows)


@pytest.mark.slow
def test_periodic_evaluation_samples_in_its_own_wake(monkeypatch, launcher_env, tiny_world, tmp_path, write_recipe):
    """Periodic evaluation samples through the same engine, inside one wake with the updated weights, and the
    engine's max_model_len covers the evaluation's prompts and max_new_tokens too."""
    import yaml
    from typer.testing import CliRunner

    from merge_distill.cli import app
    from merge_distill.data import render_prompt
    from merge_distill.evaluation.suites import load_suite
    from merge_distill.models import load_tokenizer

    engines = trainer_engines(monkeypatch)
    path = write_recipe(tmp_path / "r.yaml", tiny_world, tmp_path / "run", steps=2, prompts_per_step=4,
                        max_new_tokens=6, eval_every=1)
    recipe = yaml.safe_load(path.read_text())
    suite = str(tiny_world / "math_test.jsonl")
    recipe["eval"] = {"suites": [suite], "max_problems": 4, "max_new_tokens": 40}
    recipe["backend"] = {"rollout": "vllm", "check_sync_every": 0}  # the sync guard's probe: tested on its own
    path.write_text(yaml.safe_dump(recipe))
    result = CliRunner().invoke(app, ["run", str(path), "--no-eval"])
    assert result.exit_code == 0, result.output
    (llm,) = engines
    step = [*WAKE, "generate", "sleep(2)"]
    assert labels(llm) == ["sleep(2)", *step, *step, *step, "shutdown"]  # step 1, evaluation after it, step 2
    tokenizer = load_tokenizer(recipe["student"])
    loaded = load_suite(suite)
    longest = max(len(render_prompt(tokenizer, loaded.render_prompt(r), loaded.system_prompt)) for r in loaded.records)
    assert llm.kwargs["max_model_len"] >= longest + 40
    assert (tmp_path / "run" / "metrics.jsonl").read_text().count("eval/") == 1


@pytest.mark.slow
def test_engine_noise_stays_out_of_the_reward(monkeypatch, launcher_env, tiny_world, tmp_path, write_recipe):
    """The engine's log-probs (bf16, its own kernels) differ from the trainer's. As in the official G-OPD code,
    the advantage's pi_old term is the trainer's recomputed log-prob; the engine's serves only in the
    importance weight pi_theta / pi_engine."""
    from merge_distill import objective
    from merge_distill.build import train_recipe
    from merge_distill.validate import load_recipe

    noise = 0.3

    class NoisyLLM(FakeLLM):
        def generate(self, prompts, params, use_tqdm=True, lora_request=None):
            outs = super().generate(prompts, params, use_tqdm, lora_request)
            for out in outs:  # flat log-probs holding the sampled token only (logprobs=0)
                out.outputs[0].logprobs.logprobs = [lp - noise for lp in out.outputs[0].logprobs.logprobs]
            return outs

    trainer_engines(monkeypatch, NoisyLLM)
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
                                      max_new_tokens=6), ["backend.rollout=vllm", "backend.check_sync_every=0"])
    train_recipe(recipe)  # (the sync guard would stop this run: the engine's log-probs are off by `noise`)
    (logprobs, engine_lp), = rollouts  # one micro-batch: the trainer's log-probs and the engine's
    mask = engine_lp != 0
    # the engine's log-probs are the trainer's minus the noise; the advantage saw the trainer's
    torch.testing.assert_close(engine_lp[mask], logprobs[mask] - noise, rtol=0, atol=1e-4)
    used = torch.cat([s[s != 0] for s in seen])
    torch.testing.assert_close(torch.sort(used).values, torch.sort(logprobs[mask]).values, rtol=0, atol=1e-4)


@pytest.mark.slow
def test_the_sync_guard_stops_a_run_whose_engine_kept_stale_weights(monkeypatch, launcher_env, tiny_world, tmp_path,
                                                                    write_recipe):
    """`backend.check_sync_every`: after the first update (and every N steps) the engine samples a probe and the
    trainer scores it. An engine that takes every update (the fake loads exactly the trainer's weights) passes at a
    gap of float rounding; one whose `sync_weights` does nothing (sleep level 0: nothing else reloads it) stops the
    run at step 1, in one line."""
    from merge_distill.build import train_recipe
    from merge_distill.validate import load_recipe

    trainer_engines(monkeypatch)
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", tiny_world, tmp_path / "run", steps=2, prompts_per_step=4,
                                      max_new_tokens=6),
                         ["backend.rollout=vllm", "backend.sleep_level=0", "backend.check_sync_every=1"])
    train_recipe(recipe)
    rows = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(0 <= r["sync_gap"] < 1e-5 for r in rows)

    monkeypatch.setattr(vb.VLLMSampler, "sync_weights", lambda self, model: None)
    stale = recipe.model_copy(update={"output_dir": str(tmp_path / "stale")})
    with pytest.raises(UserError, match=r"^step 1: the vLLM sampler's log-probs of a probe differ from the trainer's "
                                        r"by .* a token \(tolerance 0.001 in float32\): its weights are not the "
                                        r"trainer's \(backend.check_sync_every\)$"):
        train_recipe(stale)


def test_check_sync_compares_the_masked_tokens_only():
    engine = torch.tensor([[-1.0, -2.0, -9.0], [-0.5, 0.0, 0.0]])
    trainer = torch.tensor([[-1.0, -2.0004, 0.0], [-0.5008, 0.0, 0.0]])
    mask = torch.tensor([[True, True, False], [True, False, False]])
    assert vb.check_sync(engine, trainer, mask, dtype="float32", step=3) == pytest.approx(0.0004, abs=1e-6)
    with pytest.raises(UserError, match=r"^step 3: .* by 0.0401 a token \(tolerance 0.001 in float32\)"):
        vb.check_sync(engine, trainer + torch.tensor([[0.0, 0.12, 0.0], [0.0, 0.0, 0.0]]), mask, dtype="float32", step=3)
    assert vb.check_sync(engine, trainer + 0.05, mask, dtype="bfloat16", step=3) < vb.SYNC_TOLERANCE["bfloat16"]
    with pytest.raises(UserError, match="nan"):
        vb.check_sync(engine, trainer * float("nan"), mask, dtype="bfloat16", step=3)
