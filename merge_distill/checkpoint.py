"""What a run leaves in its `output_dir`: checkpoints, the manifest and the metrics log.

- `checkpoints/step-N/`: an HF model folder (safetensors + tokenizer) plus `optimizer.pt` (the full AdamW
  state, keyed by parameter name) and `trainer_state.pt` (scheduler, data position, skipped-step count),
  written to a temporary folder and renamed into place, so a kill never leaves a half-written checkpoint.
  Rank 0 writes the full (gathered) state through `merge_distill.parallel`: a run resumes on any number of
  ranks and in either layout (ddp or fsdp).
- `manifest.json`: what must not change when a run resumes (student, method, teachers, references, lam).
- `metrics.jsonl` (and TensorBoard logs when installed): one line per step.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path

import torch

from merge_distill import distributed, parallel
from merge_distill.errors import UserError
from merge_distill.io import atomic_dir, atomic_write_json

TRAINER_STATE = "trainer_state.pt"  # step, scheduler, data position: small, read by every rank
OPTIMIZER_STATE = "optimizer.pt"  # the full optimizer state by parameter name, read by rank 0


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
    if distributed.is_main():
        for _, old in checkpoint_dirs(Path(s.recipe.output_dir))[: -s.recipe.train.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
    distributed.barrier()
    return out


def save_final(s, folder: Path) -> None:
    """The trained student as an HF folder (weights and tokenizer), written atomically by rank 0."""
    with atomic_dir(folder) if distributed.is_main() else contextlib.nullcontext() as tmp:
        parallel.save_student(s.student, tmp)
        if tmp is not None:
            s.tokenizer.save_pretrained(tmp)
    distributed.barrier()


def resume_from(s, optimizer, scheduler) -> int:
    """Load the newest checkpoint of the run into `s`, the optimizer and the scheduler; its step (0: none).

    The checkpoint may come from any layout and number of ranks: rank 0 reads the weights and optimizer state
    and `merge_distill.parallel` hands each rank its part."""
    from merge_distill.models import load_model

    found = checkpoint_dirs(Path(s.recipe.output_dir))
    if not found:
        return 0
    step, path = found[-1]
    state = torch.load(path / TRAINER_STATE, weights_only=False, map_location="cpu")
    main = distributed.is_main()
    if not (path / OPTIMIZER_STATE).is_file():
        raise UserError(f"{path}: no {OPTIMIZER_STATE}: written by an older merge-distill, whose checkpoints held "
                        "the optimizer state by position; resume it with that version, or start a new run")
    parallel.load_student(s.student, load_model(path, what="checkpoint").state_dict() if main else None)
    optimizer_state = torch.load(path / OPTIMIZER_STATE, weights_only=False, map_location="cpu") if main else None
    parallel.load_optimizer_state(s.student, optimizer, optimizer_state)
    scheduler.load_state_dict(state["scheduler"])
    s.mixer.load_state_dict(state["mixer"])
    s.skipped_steps = state.get("skipped_steps", 0)
    s.sampler.sync_weights(s.student)
    return step


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
