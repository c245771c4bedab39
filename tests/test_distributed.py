"""Data parallelism on CPU (gloo): `merge-distill run` under torchrun with two ranks, the student replicated
(ddp) or sharded (fsdp), trains the same weights as one process with the same global batch and seed; its
checkpoints resume on one rank and in the other layout; ranks whose responses differ in length do not hang.

Tolerance. Both runs sample the same tokens (row seeds) and compute the same sums in another order (each
rank's micro-batches, then a sum of two partial gradients, against one process's micro-batches), so their
gradients differ by float32 rounding. Adam normalises each element by its own sqrt(v): for the rare
element whose gradient is a near-cancelling sum, the rounding is a large *relative* error of that
gradient and becomes the same relative error of its step (at most ~lr per step). So the check is on the
update (final - initial weights): its L2 difference relative to its norm must be under 1e-3 (measured:
4.7e-5 on this recipe, the largest single element 5.3e-5 = 0.02 lr), and no element may be off by a whole
step (atol = lr). Real faults are far outside: a rank-local token mean gives 0.24, rank 1 reusing rank
0's row seeds 0.81. Adam is blind to a global gradient scale (a mean instead of a sum over ranks), so the
logged loss and gradient norm, which see it, must agree to 1e-4 too.
"""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.distributed.checkpoint import FileSystemReader

from merge_distill.checkpoint import checkpoint_dirs, newest_intact, read_checkpoint
from merge_distill.distributed import shard
from merge_distill.step_metrics import Max, Min, Sum, reduce, row_mean, token_mean, values
from merge_distill.errors import UserError
from merge_distill.build import train_recipe
from merge_distill.validate import load_recipe
from launch import torchrun

LR = 3e-3
STEPS = dict(steps=4, prompts_per_step=10, max_new_tokens=16, micro_batch_size=3, checkpoint_every=2,
             keep_checkpoints=4, lr=LR)
ON_RANKS = str(Path(__file__).with_name("checkpoint_ranks.py"))  # programs run on the ranks by some tests
# the fsdp run's settings (a resumed run repeats them): the student and the frozen models sharded, and a gathered
# decoding section after every step (`eval_every`, no evaluation), which must leave every parameter sharded
FSDP_SETS = ("--set", "parallel=fsdp", "--set", "placement.shard_frozen=true", "--set", "schedule.eval_every=1")


def assert_same_training(initial: Path, expected: Path, got: Path) -> None:
    w0, a, b = (load_file(p / "model.safetensors") for p in (initial, expected, got))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=LR, msg=lambda m, k=k: f"{k}: {m}")
    diff = sum(float(((b[k] - a[k]) ** 2).sum()) for k in a) ** 0.5
    update = sum(float(((a[k] - w0[k]) ** 2).sum()) for k in a) ** 0.5
    assert diff < 1e-3 * update, f"updates differ by {diff / update:.2e} of their norm"


def metrics(run: Path) -> list[dict]:
    return [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tiny_world, tmp_path_factory, write_recipe):
    """One process in-process, and the same recipe on two ranks through the CLI under torchrun."""
    root = tmp_path_factory.mktemp("ddp")
    one = load_recipe(write_recipe(root / "one.yaml", tiny_world, root / "one", **STEPS))
    train_recipe(one)
    two = write_recipe(root / "two.yaml", tiny_world, root / "two", **STEPS)
    torchrun("run", str(two), "--no-eval")
    return root


def test_two_ranks_train_the_weights_of_one_process(runs, tiny_world):
    assert_same_training(tiny_world / "base", runs / "one" / "final", runs / "two" / "final")
    one, two = metrics(runs / "one"), metrics(runs / "two")
    assert [m["step"] for m in two] == [1, 2, 3, 4]  # rank 0 alone logs, once a step
    for a, b in zip(one, two):
        for key in ("loss", "grad_norm", "math/reward", "code/reverse_kl_teacher", "math/kl_reference",
                    "response_length", "code/response_length", "importance_ratio/mean", "math/n_sequences"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key
    ckpts = sorted(p.name for p in (runs / "two" / "checkpoints").iterdir())
    assert ckpts == ["step-2", "step-4"]


def test_two_rank_checkpoint_resumes_on_one_rank(runs, tiny_world, write_recipe):
    """Cut the two-rank run back to its step-2 checkpoint, then finish it in one process."""
    out = cut(runs / "two", runs / "cut")
    train_recipe(load_recipe(write_recipe(runs / "cut.yaml", tiny_world, out, **STEPS)), resume=True)
    assert_same_training(tiny_world / "base", runs / "one" / "final", out / "final")
    assert resumed(out)  # a run that started over in one process would be the one-process run exactly


# ------------------------------------------------------------------------------------------------ fsdp


@pytest.fixture(scope="module")
def fsdp_run(runs, tiny_world, write_recipe):
    """The same recipe on two ranks with the student sharded (FSDP2) instead of replicated, and the teachers and
    references too (`placement.shard_frozen`). `eval_every` adds a gathered decoding section after every step
    (empty here: no evaluation), which must leave every parameter sharded for the checkpoint that follows."""
    path = write_recipe(runs / "fsdp.yaml", tiny_world, runs / "fsdp", **STEPS)
    torchrun("run", str(path), "--no-eval", *FSDP_SETS)
    return runs / "fsdp"


def test_fsdp_two_ranks_train_the_weights_of_one_process(runs, fsdp_run, tiny_world):
    """Sharded weights, gradients reduce-scattered, AdamW on shards: the same training as one process (the
    tolerance of the module docstring; measured 6.2e-4 of the update on the smoke zoo, docs/distributed.md)."""
    assert_same_training(tiny_world / "base", runs / "one" / "final", fsdp_run / "final")
    for a, b in zip(metrics(runs / "one"), metrics(fsdp_run), strict=True):
        for key in ("loss", "grad_norm", "math/reward", "code/reverse_kl_teacher", "response_length"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key
    # each rank wrote its own half of every weight and moment (DCP's index lists two chunks, rows 0-47 and 48-95
    # of a [96, 32] projection, not one gathered whole); together they hold the whole optimizer state, by name
    folder = fsdp_run / "checkpoints" / "step-2"
    assert sorted(p.name for p in folder.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    index = FileSystemReader(folder).read_metadata().state_dict_metadata
    for key in ("model.model.layers.0.mlp.up_proj.weight", "optimizer.state.model.layers.0.mlp.up_proj.weight.exp_avg"):
        chunks = [(list(c.offsets), list(c.sizes)) for c in index[key].chunks]
        assert chunks == [([0, 0], [48, 32]), ([48, 0], [48, 32])], key
    state = read_checkpoint(fsdp_run / "checkpoints" / "step-2")["optimizer"]["state"]
    one = read_checkpoint(runs / "one" / "checkpoints" / "step-2")["optimizer"]["state"]
    assert state.keys() == one.keys() and "model.embed_tokens.weight" in state
    for name, moments in one.items():
        assert state[name]["exp_avg_sq"].shape == moments["exp_avg_sq"].shape, name


def cut(run: Path, to: Path) -> Path:
    """A copy of `run` as if it had been killed right after its step-2 checkpoint. Its logged steps are marked
    (`"cut": true`), so that `resumed` tells a run that resumed (it keeps steps 1-2) from one that started over."""
    shutil.copytree(run, to)
    shutil.rmtree(to / "final")
    shutil.rmtree(to / "checkpoints" / "step-4")
    (to / "metrics.jsonl").write_text("".join(json.dumps({**m, "cut": True}) + "\n" for m in metrics(run)))
    return to


def resumed(run: Path) -> bool:
    """`run` (a `cut` copy, then resumed) went on from its step-2 checkpoint: steps 1-2 logged before the cut,
    3-4 after."""
    return [(m["step"], m.get("cut", False)) for m in metrics(run)] == [(1, True), (2, True), (3, False), (4, False)]


def same_weights(a: Path, b: Path) -> None:
    """Bit for bit: the two final exports (float32, the recipe's dtype) hold equal tensors."""
    x, y = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert x.keys() == y.keys()
    assert [k for k in x if not torch.equal(x[k], y[k])] == []


@pytest.mark.slow
def test_fsdp_run_resumed_on_two_ranks_is_bit_identical(fsdp_run, runs, tiny_world, write_recipe):
    """Uninterrupted: `fsdp_run`, steps 1-4 in one launch on 2 fsdp ranks (its step-2 checkpoint written, never
    read). Interrupted: the same run cut back to its step-2 checkpoint (as if killed after writing it), then
    resumed in a second 2-rank launch for steps 3-4. Same shards, same data position, same row seeds: the final
    weights and the logged steps 3-4 are the same bits."""
    out = cut(fsdp_run, runs / "fsdp-cut-2")
    torchrun("run", str(write_recipe(runs / "fsdp-cut-2.yaml", tiny_world, out, **STEPS)), "--no-eval", "--resume",
             *FSDP_SETS)
    same_weights(fsdp_run / "final", out / "final")
    assert resumed(out)
    untimed = lambda run: [{k: v for k, v in m.items() if not k.startswith("time/") and k != "cut"}  # noqa: E731
                           for m in metrics(run)]
    assert untimed(out) == untimed(fsdp_run)


@pytest.mark.slow
def test_fsdp_checkpoint_reshards_to_one_process_and_back(fsdp_run, runs, tiny_world, write_recipe):
    """The 2-rank fsdp checkpoint of step 2 (each rank wrote half of every tensor):

    1. loaded in one process, the student's weights and AdamW state (both moments, the step count), the mixer and
       the counters are the bits the two ranks saved (their full gather, by DCP's own `dcp_to_torch_save`);
    2. resaved by that process, it is a one-process checkpoint of the same state (one shard file), and the two
       finish the same: resumed in one process, the 2-rank checkpoint and the 1-process one give the same bits,
       and within the module docstring's tolerance of the uninterrupted one-process run;
    3. and back: the 1-process checkpoint resumed on 2 fsdp ranks finishes bit-identical to the uninterrupted
       2-rank run (`fsdp_run`, see `test_fsdp_run_resumed_on_two_ranks_is_bit_identical`)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    from merge_distill.build import build_run

    saved = read_checkpoint(fsdp_run / "checkpoints" / "step-2")
    one = cut(fsdp_run, runs / "fsdp-to-one")
    resaved = cut(fsdp_run, runs / "fsdp-resaved")
    s = build_run(load_recipe(write_recipe(runs / "resaved.yaml", tiny_world, resaved, **STEPS)))
    optimizer, ckpt = s.optimizer, s.checkpoints
    assert ckpt.resume() == 2
    weights = s.student.state_dict()
    assert [k for k, v in saved["model"].items() if not torch.equal(weights[k], v)] == []
    moments = get_optimizer_state_dict(s.student, optimizer)["state"]
    assert moments.keys() == saved["optimizer"]["state"].keys()
    for name, state in saved["optimizer"]["state"].items():
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(moments[name][key], state[key]), (name, key)
    assert s.mixer.state_dict() == saved["mixer"] and s.scheduler.state_dict()["last_epoch"] == 2
    ckpt.save(2)  # over the 2-rank files: now written by one process
    assert sorted(p.name for p in (resaved / "checkpoints" / "step-2").glob("*.distcp")) == ["__0_0.distcp"]
    back = runs / "one-to-fsdp"
    shutil.copytree(resaved, back)

    for out in (one, resaved):
        train_recipe(load_recipe(write_recipe(runs / f"{out.name}.yaml", tiny_world, out, **STEPS)), resume=True)
    assert resumed(one) and resumed(resaved)
    same_weights(one / "final", resaved / "final")
    assert_same_training(tiny_world / "base", runs / "one" / "final", one / "final")

    torchrun("run", str(write_recipe(runs / "back.yaml", tiny_world, back, **STEPS)), "--no-eval", "--resume",
             *FSDP_SETS)
    assert resumed(back)
    same_weights(fsdp_run / "final", back / "final")


def test_a_damaged_shard_of_a_two_rank_checkpoint_falls_back(fsdp_run, tmp_path, capsys):
    """One byte of rank 1's shard of the newest checkpoint flipped: rank 0, which decides, takes the one before
    and names the file; with every checkpoint damaged, one line."""
    run = tmp_path / "run"
    shutil.copytree(fsdp_run / "checkpoints", run / "checkpoints")
    shard = run / "checkpoints" / "step-4" / "__1_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    found = checkpoint_dirs(run)
    assert newest_intact(found) == found[0]
    assert "skipped damaged step-4 (__1_0.distcp does not match its checksum)" in capsys.readouterr().err
    (run / "checkpoints" / "step-2" / "__0_0.distcp").write_bytes(b"")
    with pytest.raises(UserError, match=r"^no intact checkpoint in .*: step-4 \(__1_0.distcp does not match its "
                                        r"checksum\); step-2 \(__0_0.distcp does not match its checksum\)$"):
        newest_intact(found)


@pytest.mark.slow
def test_rank_0_chooses_the_checkpoint_every_rank_resumes(fsdp_run, tmp_path, tiny_world, write_recipe):
    """Rank 1 lists only step-2 (its view of the folder lags behind step-4's rename): it still resumes at step
    4, rank 0's choice, instead of loading another checkpoint than rank 0 (or waiting for a collective rank 0
    never sends)."""
    run = tmp_path / "run"
    shutil.copytree(fsdp_run / "checkpoints", run / "checkpoints")
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", tiny_world, run, **STEPS),
                         ["parallel=fsdp", "placement.shard_frozen=true"])
    (tmp_path / "fsdp.yaml").write_text(json.dumps(recipe.model_dump(mode="json", exclude_defaults=True)))
    torchrun("choice", str(tmp_path / "fsdp.yaml"), str(tmp_path), timeout=120, script=ON_RANKS)
    assert [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)] == [{"step": 4, "scheduler": 4}] * 2


@pytest.mark.slow
def test_fsdp_models_load_on_meta_and_receive_rank_0s_weights(tiny_world, tmp_path, write_recipe):
    """`setup` of an fsdp recipe with the frozen models sharded (tests/checkpoint_ranks.py on 2 ranks): rank 0 alone
    reads the student and the teacher from disk; rank 1 builds them on the meta device and holds only its half of
    the student; on both ranks the gathered weights are the files', the head stays tied to the embeddings, and the
    rotary `inv_freq` (a buffer no state dict carries) is the one transformers computes, not to_empty's garbage."""
    from transformers import AutoModelForCausalLM

    recipe = write_recipe(tmp_path / "r.yaml", tiny_world, tmp_path / "run")
    recipe = load_recipe(recipe, ["parallel=fsdp", "placement.shard_frozen=true"])
    (tmp_path / "fsdp.yaml").write_text(json.dumps(recipe.model_dump(mode="json", exclude_defaults=True)))
    teacher = tiny_world / "math_teacher"
    torchrun("loading", str(tmp_path / "fsdp.yaml"), str(teacher), str(tmp_path), timeout=120, script=ON_RANKS)
    rank0, rank1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert rank0["read_whole"] == ["base", "math_teacher"] and rank1["read_whole"] == []
    inv_freq = AutoModelForCausalLM.from_pretrained(tiny_world / "base").model.rotary_emb.inv_freq.tolist()
    for report in (rank0, rank1):
        assert report["held"] * 2 == report["whole"]
        assert report["student_matches_file"] and report["teacher_matches_file"] and report["tied"]
        assert report["inv_freq"] == inv_freq and report["meta_left"] == []


def test_ddp_checkpoint_resumes_under_fsdp(runs, tiny_world, write_recipe):
    out = cut(runs / "two", runs / "ddp-to-fsdp")
    torchrun("run", str(write_recipe(runs / "ddp-to-fsdp.yaml", tiny_world, out, **STEPS)), "--no-eval",
             "--resume", "--set", "parallel=fsdp")
    assert_same_training(tiny_world / "base", runs / "one" / "final", out / "final")
    assert resumed(out)


def length_switch_model(tok, marker: str = "~"):
    """A one-layer Qwen3 whose response is EOS at once when its context holds the byte `marker`, and spaces
    until max_new_tokens otherwise: attention with q = 0 averages a value that only the marker carries into a
    "stop" direction of the residual stream; every token's embedding points to "go on"."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1, head_dim=16, intermediate_size=32, tie_word_embeddings=False,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=None,
                         max_position_embeddings=256)
    model = Qwen3ForCausalLM(config)
    layer = model.model.layers[0]
    mark, space = (tok(x, add_special_tokens=False)["input_ids"][0] for x in (marker, " "))
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        for norm in (model.model.norm, layer.input_layernorm, layer.post_attention_layernorm,
                     layer.self_attn.q_norm, layer.self_attn.k_norm):
            norm.weight.fill_(1.0)
        embed = model.model.embed_tokens.weight
        embed[:, 0] = 1.0                        # "go on"
        embed[mark, 0], embed[mark, 2] = 0.0, 1.0
        layer.self_attn.v_proj.weight[0, 2] = 1.0    # the marker's value
        layer.self_attn.o_proj.weight[1, 0] = 50.0   # -> "stop"
        model.lm_head.weight[space, 0], model.lm_head.weight[space, 1] = 5.0, -10.0
        model.lm_head.weight[tok.eos_token_id, 1] = 10.0
    return model


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["ddp", "fsdp"])
def test_ranks_with_unequal_responses_do_not_hang(layout, tmp_path, tiny_world, write_recipe):
    """Rank 0's prompts (the first domain's, by the mixer's order) all end at once; rank 1's all run to
    max_new_tokens, in more micro-batches. Under fsdp every forward is a collective: decoding and the update
    must not wait for each other across ranks. With the frozen models sharded too, each rank scores with the
    other domain's teacher without a row of that domain. Checkpoints (gathered) in between."""
    import yaml

    from merge_distill.models import load_tokenizer, save_model

    tok = load_tokenizer(tiny_world / "base", what="tokenizer")
    save_model(length_switch_model(tok), tok, tmp_path / "switch")
    (tmp_path / "short.jsonl").write_text("".join(json.dumps({"prompt": "~" * (5 + i)}) + "\n" for i in range(4)))
    (tmp_path / "long.jsonl").write_text("".join(json.dumps({"prompt": "ab" * (3 + i)}) + "\n" for i in range(4)))
    recipe = {"student": str(tmp_path / "switch"), "reward_scale": 1.0, "parallel": layout,
              "placement": {"shard_frozen": layout == "fsdp"},
              # two teachers of different shapes: a rank scoring with one while the other scores with the other
              # would pair mismatched collectives
              "experts": [{"name": name, "teacher": str(teacher), "prompts": str(tmp_path / f"{name}.jsonl")}
                          for name, teacher in (("short", tmp_path / "switch"), ("long", tiny_world / "math_teacher"))],
              "rollout": {"prompts_per_step": 4, "max_new_tokens": 24}, "budget": {"max_tokens_per_micro_batch": 80},
              "schedule": {"steps": 2, "checkpoint_every": 1}, "optim": {"lr": 1e-3},
              "output_dir": str(tmp_path / "run")}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    torchrun("run", str(tmp_path / "r.yaml"), "--no-eval", timeout=60)
    for m in metrics(tmp_path / "run"):
        assert m["short/response_length"] == 1 and m["long/response_length"] == 24
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()


def test_shard_covers_the_batch_in_order():
    for n in (1, 5, 10, 16):
        for size in (1, 2, 3, 4):
            bounds = [shard(n, r, size) for r in range(size)]
            assert bounds[0][0] == 0 and bounds[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
            assert max(hi - lo for lo, hi in bounds) - min(hi - lo for lo, hi in bounds) <= 1


def test_step_metrics_combine_as_one_process_holding_every_rank_rows():
    """Rank a: math rows of lengths 3, 5 with per-token rewards; rank b: one math row of 12 tokens and one code row.
    Each metric is what one process computes on all rows together, whatever the ranks' shares."""
    mask_a, mask_b = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]]), torch.ones(1, 12)
    reward_a, reward_b = torch.tensor([[1.0, 2.0, 3.0, 9.0], [0.0, 0.0, 1.0, 1.0]]), torch.full((1, 12), 4.0)
    a = {"step": 3, "loss": Sum(0.25), "math/reward": token_mean(reward_a, mask_a),
         "math/response_length": row_mean(torch.tensor([3, 4])), "math/n_sequences": Sum(2),
         "importance_ratio/max": Max(1.5), "importance_ratio/min": Min(0.5), "time/step_s": Max(2.0)}
    b = {"step": 3, "loss": Sum(0.5), "math/reward": token_mean(reward_b, mask_b),
         "math/response_length": row_mean(torch.tensor([12])), "math/n_sequences": Sum(1),
         "importance_ratio/max": Max(1.2), "importance_ratio/min": Min(0.7), "time/step_s": Max(3.0),
         "code/reward": token_mean(torch.tensor([[7.0, 7.0]]), torch.ones(1, 2))}
    m = reduce([a, b])
    assert m["step"] == 3 and m["loss"] == 0.75 and m["math/n_sequences"] == 3
    assert m["math/reward"] == pytest.approx((1 + 2 + 3 + 0 + 0 + 1 + 1 + 12 * 4) / (7 + 12))  # over tokens
    assert m["math/response_length"] == pytest.approx((3 + 4 + 12) / 3)  # over rows
    assert m["code/reward"] == 7.0 and m["importance_ratio/max"] == 1.5 and m["importance_ratio/min"] == 0.5
    assert m["time/step_s"] == 3.0
    assert values(a)["math/reward"] == pytest.approx(8 / 7)  # one process: its own rows only
