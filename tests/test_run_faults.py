"""Runs that survive mistakes and faults: one live run per output_dir, and checkpoints that are verified
(sha256 of every file, each DCP shard on its own) before `--resume` trusts them, falling back to the newest intact
one; the final model in the recipe's export dtype."""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from merge_distill.checkpoint import CHECKSUMS, METADATA, checkpoint_dirs, damage, holding, newest_intact
from merge_distill.errors import UserError
from merge_distill.build import train_recipe
from merge_distill.validate import load_recipe

STEPS = dict(steps=3, prompts_per_step=4, max_new_tokens=8, checkpoint_every=1, keep_checkpoints=3)
SHARD = "__0_0.distcp"  # the one shard file of a one-process checkpoint (DCP's name: rank 0's first file)


def cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "merge_distill", *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})


@pytest.fixture(scope="module")
def finished(tiny_world, tmp_path_factory, write_recipe):
    root = tmp_path_factory.mktemp("faults")
    train_recipe(load_recipe(write_recipe(root / "r.yaml", tiny_world, root / "run", **STEPS)))
    return root / "run"


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def flip_a_byte(path: Path) -> None:
    """One bit of the middle byte inverted: the same size, so only the checksum tells."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def test_every_damaged_file_sends_resume_to_the_checkpoint_before(finished, tmp_path):
    names = sorted(p.name for p in (finished / "checkpoints" / "step-3").iterdir())
    assert names == sorted([METADATA, SHARD, CHECKSUMS])
    for name, harm in [(n, truncate) for n in names] + [(SHARD, flip_a_byte), (METADATA, flip_a_byte)]:
        run = tmp_path / f"{name}-{harm.__name__}"
        shutil.copytree(finished, run)
        harm(run / "checkpoints" / "step-3" / name)
        found = checkpoint_dirs(run)
        assert damage(found[-1][1]) is not None and damage(found[-2][1]) is None, name
        assert newest_intact(found) == found[-2], name
    missing = tmp_path / "missing"
    shutil.copytree(finished, missing)
    (missing / "checkpoints" / "step-3" / SHARD).unlink()
    assert damage(missing / "checkpoints" / "step-3") == f"{SHARD} missing"


def test_resume_skips_a_damaged_shard_and_trains_the_same_weights(finished, tiny_world, tmp_path, capsys,
                                                                  write_recipe):
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    shutil.rmtree(run / "final")
    flip_a_byte(run / "checkpoints" / "step-3" / SHARD)
    train_recipe(load_recipe(write_recipe(tmp_path / "r.yaml", tiny_world, run, **STEPS)), resume=True)
    err = capsys.readouterr().err
    assert f"resuming from step-2; skipped damaged step-3 ({SHARD} does not match its checksum)" in err
    a, b = load_file(finished / "final" / "model.safetensors"), load_file(run / "final" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)  # step 3 trained again from step 2, exactly
    assert [json.loads(l)["step"] for l in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]


def test_no_intact_checkpoint_is_one_line(finished, tiny_world, tmp_path, write_recipe):
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    for _, path in checkpoint_dirs(run):
        flip_a_byte(path / SHARD)
    with pytest.raises(UserError, match=rf"no intact checkpoint in .*: step-3 \({SHARD} does not match") as e:
        train_recipe(load_recipe(write_recipe(tmp_path / "r.yaml", tiny_world, run, **STEPS)), resume=True)
    assert len(str(e.value).splitlines()) == 1


def test_a_checkpoint_of_the_earlier_format_is_one_line(finished, tiny_world, tmp_path, write_recipe):
    """An HF folder with optimizer.pt and trainer_state.pt (what earlier versions wrote) is refused, saying how
    to go on."""
    run = tmp_path / "run"
    (run / "checkpoints" / "step-2").mkdir(parents=True)
    for name in ("model.safetensors", "config.json", "optimizer.pt", "trainer_state.pt", CHECKSUMS):
        (run / "checkpoints" / "step-2" / name).write_text("{}")
    with pytest.raises(UserError, match=r"step-2: a checkpoint of an earlier merge-distill .* start a new run from "
                                        r"it \(student: that folder\)") as e:
        train_recipe(load_recipe(write_recipe(tmp_path / "r.yaml", tiny_world, run, **STEPS)), resume=True)
    assert len(str(e.value).splitlines()) == 1


def test_final_model_is_in_the_export_dtype(finished, tiny_world, tmp_path, write_recipe):
    """float32 by default (the recipe's dtype); a bfloat16 recipe exports bfloat16, as transformers loads it; an
    explicit export_dtype wins. The checkpoints keep float32 weights either way."""
    from transformers import AutoModelForCausalLM

    def dtypes(folder: Path) -> set:
        return {t.dtype for t in load_file(folder / "model.safetensors").values()}

    assert dtypes(finished / "final") == {torch.float32}
    for overrides, expected in ((["dtype=bfloat16"], torch.bfloat16),
                                (["dtype=bfloat16", "export_dtype=float16"], torch.float16)):
        out = tmp_path / overrides[-1]
        recipe = write_recipe(tmp_path / "r.yaml", tiny_world, out, **{**STEPS, "steps": 1})
        train_recipe(load_recipe(recipe, overrides))
        assert dtypes(out / "final") == {expected}
        model = AutoModelForCausalLM.from_pretrained(out / "final")
        assert model.dtype == expected and model.lm_head.weight is model.model.embed_tokens.weight
        assert model(torch.tensor([[1, 2, 3]])).logits.isfinite().all()
        from merge_distill.checkpoint import read_checkpoint

        assert read_checkpoint(out / "checkpoints" / "step-1")["model"]["model.norm.weight"].dtype == torch.float32


@pytest.mark.slow
def test_a_kill_while_a_checkpoint_is_written_resumes_from_the_one_before(finished, tiny_world, tmp_path,
                                                                          write_recipe):
    """SIGKILL after the second checkpoint's shards are written, before its checksums and its rename into place:
    the half-written folder is never taken for a checkpoint."""
    recipe = write_recipe(tmp_path / "r.yaml", tiny_world, tmp_path / "run", **STEPS)
    script = ("import os, signal, sys\n"
              "from merge_distill import checkpoint\n"
              "from merge_distill.build import train_recipe\n"
              "from merge_distill.validate import load_recipe\n"
              "calls = []\n"
              "def write_checksums(folder, digests):\n"
              "    calls.append(folder)\n"
              "    if len(calls) == 2:\n"
              "        os.kill(os.getpid(), signal.SIGKILL)\n"
              "    return real(folder, digests)\n"
              "real, checkpoint.write_checksums = checkpoint.write_checksums, write_checksums\n"
              "train_recipe(load_recipe(sys.argv[1]))\n")
    proc = subprocess.run([sys.executable, "-c", script, str(recipe)], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    leftovers = [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()]
    assert "step-1" in leftovers and "step-2" not in leftovers
    assert ".step-2.tmp" in leftovers  # the half-written one
    train_recipe(load_recipe(recipe), resume=True)
    a, b = load_file(finished / "final" / "model.safetensors"), load_file(tmp_path / "run" / "final" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_a_live_run_holds_its_output_dir(finished, tmp_path, tiny_world, write_recipe):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_world, tmp_path / "busy", **STEPS)
    with holding(tmp_path / "busy"):  # this process is the live run
        for extra in ([], ["--resume"]):
            proc = cli("run", str(recipe), "--no-eval", *extra)
            assert proc.returncode == 1
            assert proc.stderr.strip() == (f"error: output_dir '{tmp_path / 'busy'}' is in use by a live run (pid "
                                           f"{os.getpid()}); wait for it to finish or stop it, or choose another "
                                           "output_dir")
    # a run that died holding the lock leaves it to the next one
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from merge_distill.checkpoint import holding\n"
                               "with holding(sys.argv[1]):\n print('held', flush=True); time.sleep(60)",
                               str(tmp_path / "busy")], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(UserError, match=f"pid {holder.pid}"):
        with holding(tmp_path / "busy"):
            pass
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    with holding(tmp_path / "busy"):
        assert (tmp_path / "busy" / ".lock").read_text().strip() == str(os.getpid())
