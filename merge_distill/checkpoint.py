"""What a run leaves in its `output_dir`: checkpoints, the manifest and the metrics log.

- `checkpoints/step-N/`: an HF model folder (safetensors + tokenizer) plus `optimizer.pt` (the full AdamW
  state, keyed by parameter name) and `trainer_state.pt` (scheduler, data position, skipped-step count),
  written to a temporary folder and renamed into place, so a kill never leaves a half-written checkpoint.
  Rank 0 writes the full (gathered) state through `merge_distill.parallel`: a run resumes on any number of
  ranks and in either layout (ddp or fsdp). `checksums.json` holds the sha256 of every other file: `--resume`
  takes the newest checkpoint whose files match it, and says which damaged ones it skipped.
- `.lock`: held (flock) by the live run, with its pid; a second run in the same `output_dir` is refused.
- `manifest.json`: what must not change when a run resumes (student, method, teachers, references, lam).
- `metrics.jsonl` (and TensorBoard logs when installed): one line per step.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

import torch

from merge_distill import distributed, parallel
from merge_distill.parallel import collectives
from merge_distill.errors import UserError
from merge_distill.io import atomic_dir, atomic_write_json

TRAINER_STATE = "trainer_state.pt"  # step, scheduler, data position: small, read by every rank
OPTIMIZER_STATE = "optimizer.pt"  # the full optimizer state by parameter name, read by rank 0
CHECKSUMS = "checksums.json"  # file name -> sha256 of every other file of the checkpoint


def checkpoint_dirs(output_dir: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every complete checkpoint of a run, oldest first."""
    root = output_dir / "checkpoints"
    found = []
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith("step-") and (p / TRAINER_STATE).is_file():
                found.append((int(p.name.removeprefix("step-")), p))
    return sorted(found)


def save_checkpoint(s, optimizer, scheduler, step: int) -> Path:
    """Checkpoint `step` of the run `s` (a `train.Setup`); keeps the newest `train.keep_checkpoints`. Every rank
    calls this (under fsdp the state is gathered from all of them); rank 0 writes."""
    out = Path(s.recipe.output_dir) / "checkpoints" / f"step-{step}"
    optimizer_state = parallel.optimizer_state(s.student, optimizer)
    with atomic_dir(out) if distributed.is_main() else contextlib.nullcontext() as tmp:
        parallel.save_student(s.student, tmp)
        if tmp is not None:
            s.tokenizer.save_pretrained(tmp)
            torch.save(optimizer_state, tmp / OPTIMIZER_STATE)
            torch.save({"step": step, "scheduler": scheduler.state_dict(), "mixer": s.mixer.state_dict(),
                        "skipped_steps": s.skipped_steps}, tmp / TRAINER_STATE)
            write_checksums(tmp)
    if distributed.is_main():
        for _, old in checkpoint_dirs(Path(s.recipe.output_dir))[: -s.recipe.train.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
    collectives.barrier()
    return out


def save_final(s, folder: Path) -> None:
    """The trained student as an HF folder (weights and tokenizer), written atomically by rank 0."""
    with atomic_dir(folder) if distributed.is_main() else contextlib.nullcontext() as tmp:
        parallel.save_student(s.student, tmp)
        if tmp is not None:
            s.tokenizer.save_pretrained(tmp)
    collectives.barrier()


def resume_from(s, optimizer, scheduler) -> int:
    """Load the newest checkpoint of the run into `s`, the optimizer and the scheduler; its step (0: none).

    The checkpoint may come from any layout and number of ranks: rank 0 reads the weights and optimizer state
    and `merge_distill.parallel` hands each rank its part."""
    from merge_distill.models import load_model

    found = checkpoint_dirs(Path(s.recipe.output_dir))
    if not found:
        return 0
    main = distributed.is_main()
    step, path = collectives.gather(newest_intact(found) if main else None)[0]  # rank 0 checks the files
    if not (path / OPTIMIZER_STATE).is_file():
        raise UserError(f"{path}: no {OPTIMIZER_STATE}: written by an older merge-distill, whose checkpoints held "
                        "the optimizer state by position; resume it with that version, or start a new run")
    try:
        state = torch.load(path / TRAINER_STATE, weights_only=False, map_location="cpu")
    except Exception as e:  # noqa: BLE001 (a file the checksums vouched for: one line, whatever torch raises)
        raise UserError(f"{path / TRAINER_STATE}: cannot be read ({type(e).__name__}: {e})") from None
    parallel.load_student(s.student, load_model(path, what="checkpoint").state_dict() if main else None)
    optimizer_state = torch.load(path / OPTIMIZER_STATE, weights_only=False, map_location="cpu") if main else None
    parallel.load_optimizer_state(s.student, optimizer, optimizer_state)
    scheduler.load_state_dict(state["scheduler"])
    s.mixer.load_state_dict(state["mixer"])
    s.skipped_steps = state.get("skipped_steps", 0)
    s.sampler.sync_weights(s.student)
    return step


def write_checksums(folder: Path) -> None:
    atomic_write_json(folder / CHECKSUMS, {p.name: _sha256(p) for p in sorted(folder.iterdir())
                                           if p.is_file() and p.name != CHECKSUMS})


def damage(folder: Path) -> str | None:
    """What is wrong with a checkpoint's files (a file missing, or not matching `checksums.json`), or None."""
    try:
        sums = json.loads((folder / CHECKSUMS).read_text())
    except (OSError, ValueError):
        return f"{CHECKSUMS} missing or unreadable"
    for name, digest in sums.items():
        if not (folder / name).is_file():
            return f"{name} missing"
        if _sha256(folder / name) != digest:
            return f"{name} does not match its checksum"
    return None


def newest_intact(found: list[tuple[int, Path]]) -> tuple[int, Path]:
    """The newest checkpoint whose files are intact (a warning for each newer one skipped); an error if none is."""
    skipped = []
    for step, path in reversed(found):
        problem = damage(path)
        if problem is None:
            if skipped:
                print(f"warning: resuming from {path.name}; skipped damaged {'; '.join(skipped)}", file=sys.stderr,
                      flush=True)
            return step, path
        skipped.append(f"{path.name} ({problem})")
    raise UserError(f"no intact checkpoint in {found[0][1].parent}: {'; '.join(skipped)}")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


@contextlib.contextmanager
def holding(output_dir: Path):
    """Hold `output_dir`'s lock for the block: another live run there (another process; with or without
    --resume) is refused with one line naming its pid. The kernel drops the lock when its holder dies, so a
    crashed run's lock is simply taken over. Only rank 0 locks; nested holds of one folder in one process nest."""
    output_dir = Path(output_dir)
    key = str(output_dir.resolve())
    if not distributed.is_main() or key in _held:
        yield
        return
    output_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(output_dir / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            raise UserError(f"output_dir '{output_dir}' is in use by a live run (pid {holder}); wait for it to "
                            "finish or stop it, or choose another output_dir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        _held.add(key)
        try:
            yield
        finally:
            _held.discard(key)
    finally:
        os.close(fd)  # releases the lock


_held: set[str] = set()


def check_manifest(recipe, resume: bool) -> None:
    """A run's teachers, references and reward scales are fixed: resuming with others is an error."""
    path = Path(recipe.output_dir) / "manifest.json"
    manifest = recipe.manifest()
    if path.exists() and resume:
        old = json.loads(path.read_text())
        if old != manifest:
            changed = [k for k in manifest if old.get(k) != manifest[k]]
            raise UserError(f"{path}: the recipe's {', '.join(changed)} differ from the run being resumed; "
                            "use a new output_dir, or restore the original recipe")
    elif path.exists() and checkpoint_dirs(Path(recipe.output_dir)):
        raise UserError(f"output_dir '{recipe.output_dir}' already holds a run; pass --resume to continue it, "
                        "or choose another output_dir")
    if distributed.is_main():
        atomic_write_json(path, manifest)


class MetricsLog:
    """metrics.jsonl (and TensorBoard when installed); on resume, lines past the checkpoint are dropped."""

    def __init__(self, output_dir: Path, start_step: int):
        self.path = output_dir / "metrics.jsonl"
        if self.path.exists():
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= start_step]
            self.path.write_text("".join(line + "\n" for line in kept))
        self.file = open(self.path, "a")
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(output_dir / "tensorboard"))
        except ImportError:
            self.tb = None

    def write(self, metrics: dict) -> None:
        self.file.write(json.dumps(metrics) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in metrics.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, metrics["step"])

    def close(self) -> None:
        self.file.close()
        if self.tb is not None:
            self.tb.close()
