"""Data parallelism on CPU (gloo): `merge-distill run` under torchrun with two ranks trains the same
weights as one process with the same global batch and seed, and its checkpoints resume on one rank.

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
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from merge_distill.distributed import reduce_metrics, shard
from merge_distill.recipe import load_recipe
from merge_distill.train import train

LR = 3e-3
STEPS = dict(steps=4, prompts_per_step=10, max_new_tokens=16, micro_batch_size=3, checkpoint_every=2,
             keep_checkpoints=4, lr=LR)


def torchrun(*args: str, nproc: int = 2, timeout: int = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "merge_distill", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


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
    train(one)
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
    cut = runs / "cut"
    shutil.copytree(runs / "two", cut)
    shutil.rmtree(cut / "final")
    shutil.rmtree(cut / "checkpoints" / "step-4")
    train(load_recipe(write_recipe(runs / "cut.yaml", tiny_world, cut, **STEPS)), resume=True)
    assert_same_training(tiny_world / "base", runs / "one" / "final", cut / "final")
    assert [m["step"] for m in metrics(cut)] == [1, 2, 3, 4]


def test_shard_covers_the_batch_in_order():
    for n in (1, 5, 10, 16):
        for size in (1, 2, 3, 4):
            bounds = [shard(n, r, size) for r in range(size)]
            assert bounds[0][0] == 0 and bounds[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
            assert max(hi - lo for lo, hi in bounds) - min(hi - lo for lo, hi in bounds) <= 1


def test_reduce_metrics_weights_means_by_tokens_and_sequences():
    a = ({"step": 3, "loss": 0.25, "math/reward": 1.0, "math/response_length": 4.0, "math/n_sequences": 2,
          "importance_ratio/max": 1.5, "time/step_s": 2.0},
         {"tokens": 8, "sequences": 2, "math/tokens": 8, "math/sequences": 2})
    b = ({"step": 3, "loss": 0.5, "math/reward": 4.0, "math/response_length": 12.0, "math/n_sequences": 1,
          "importance_ratio/max": 1.2, "time/step_s": 3.0, "code/reward": 7.0},
         {"tokens": 16, "sequences": 2, "math/tokens": 12, "math/sequences": 1, "code/tokens": 4, "code/sequences": 1})
    m = reduce_metrics([a, b])
    assert m["step"] == 3 and m["loss"] == 0.75 and m["math/n_sequences"] == 3
    assert m["math/reward"] == pytest.approx((8 * 1 + 12 * 4) / 20)
    assert m["math/response_length"] == pytest.approx((2 * 4 + 12) / 3)
    assert m["code/reward"] == 7.0 and m["importance_ratio/max"] == 1.5 and m["time/step_s"] == 3.0
