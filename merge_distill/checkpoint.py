"""What a run leaves in its `output_dir`: checkpoints, the final model, the manifest and the metrics log.

- `checkpoints/step-N/`: a torch.distributed.checkpoint (DCP) folder written by a `Checkpointer`, torchtitan's
  shape: every `Stateful` registered with it (the student's weights and AdamW state, sharded state dicts keyed by
  parameter name; the scheduler; the data mixer; trainer counters such as `skipped_steps`) plus the step. Each
  rank writes its own shards (`__R_0.distcp`) and rank 0 the index (`.metadata`), so no rank gathers the model;
  loading reshards, so a checkpoint resumes on any number of ranks and in either layout (fsdp on 2 ranks -> one
  process -> ddp or fsdp again). Written to `.step-N.tmp` and renamed into place by rank 0 once every rank is
  done, so a kill never leaves a half-written checkpoint; the newest `schedule.keep_checkpoints` are kept.
  `checksums.json` holds the sha256 of every file: each rank hashes the shards it wrote, rank 0 gathers them,
  so no rank reads another's shard. `--resume`: rank 0 takes the newest checkpoint whose files match their
  checksums (a warning names each damaged file it skipped) and broadcasts its choice, so every rank loads the
  same one even where the ranks list the folder differently; DCP needs a filesystem every rank sees.
  Checkpoints of earlier versions (an HF folder with `optimizer.pt`) are refused with one line saying what to do
  (its weights are an ordinary model folder: start a new run from it).
- `final/`: the trained student as an HF folder (safetensors, config, generation config, tokenizer) in the
  recipe's `export_dtype` (default its `dtype`), written atomically by rank 0 from weights gathered one tensor
  at a time, each cast before it is gathered (`save_final`).
- `.lock`: held (flock) by the live run, with its pid; a second run in the same `output_dir` is refused.
- `manifest.json`: what must not change when a run resumes (student, method, teachers, references, lam).
- `metrics.jsonl`: one line per step (and the recipe's `report_to` trackers: `merge_distill.tracking`).
- `resolved_recipe.yaml`, `run.json` and `final/README.md`: the resolved recipe, the command and provenance, and
  the model card rendered from them (`merge_distill.evaluation.card`; written by `run.run_recipe` once training ends).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import sys
import tempfile
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.stateful import Stateful

from merge_distill import distributed, parallel
from merge_distill.parallel import collectives
from merge_distill.errors import UserError
from merge_distill.io import atomic_dir, atomic_write_json

METADATA = ".metadata"  # DCP's index of every shard, written by rank 0 last
CHECKSUMS = "checksums.json"  # file name -> sha256 of every other file of the checkpoint
OLD_FORMAT = "trainer_state.pt"  # in checkpoints of earlier versions (HF folder + optimizer.pt + this)


def checkpoint_dirs(output_dir: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every checkpoint of a run, oldest first (temporary folders of unfinished saves are not)."""
    root = output_dir / "checkpoints"
    found = []
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith("step-") and p.is_dir():
                found.append((int(p.name.removeprefix("step-")), p))
    return sorted(found)


class Attributes(Stateful):
    """Named attributes of an object (e.g. the trainer's counters) as a `Stateful`."""

    def __init__(self, owner, *names: str):
        self.owner, self.names = owner, names

    def state_dict(self) -> dict:
        return {name: getattr(self.owner, name) for name in self.names}

    def load_state_dict(self, state: dict) -> None:
        for name in self.names:
            setattr(self.owner, name, state[name])


class Checkpointer:
    """A run's checkpoints: what they hold (the `Stateful`s registered by name), when they are written (every
    `every` steps and at the last one) and how many are kept (`keep`). New trainer state is one `register`.
    Every rank calls `save` and `resume` (torch.distributed.checkpoint's collectives)."""

    def __init__(self, output_dir: Path, *, every: int = 0, keep: int = 2):
        self.root = Path(output_dir) / "checkpoints"
        self.every, self.keep = every, keep
        self.states: dict[str, Stateful] = {}

    def register(self, name: str, state: Stateful) -> None:
        self.states[name] = state

    def step_done(self, step: int, last: int) -> Path | None:
        """After step `step` (counted from 1) of `last`: a checkpoint when one is due."""
        if step == last or (self.every and step % self.every == 0):
            return self.save(step)
        return None

    def save(self, step: int) -> Path:
        out, tmp = self.root / f"step-{step}", self.root / f".step-{step}.tmp"
        main = distributed.is_main()
        if main:  # a save killed before its rename left this behind
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        collectives.barrier()
        metadata = _dcp(dcp.save, {"step": step, **self.states}, tmp)
        files = {info.relative_path for info in metadata.storage_data.values()}
        mine = f"__{distributed.world().rank}_"  # DCP's name for the files this rank wrote
        sums = collectives.gather({name: _sha256(tmp / name) for name in sorted(files) if name.startswith(mine)})
        if main:
            digests = {name: digest for part in sums for name, digest in part.items()}
            missing = files - digests.keys()
            assert not missing, f"no rank hashed {sorted(missing)}"
            write_checksums(tmp, {METADATA: _sha256(tmp / METADATA), **digests})
            shutil.rmtree(out, ignore_errors=True)  # the same step saved again (a run resumed from before it)
            os.rename(tmp, out)
            for _, old in checkpoint_dirs(self.root.parent)[: -self.keep]:
                shutil.rmtree(old, ignore_errors=True)
        collectives.barrier()
        return out

    def resume(self) -> int:
        """Load the newest intact checkpoint into every registered state; its step (0: there is none). Rank 0
        chooses and every rank loads its choice (resharding to this run's ranks and layout)."""
        choice = collectives.broadcast(_choose(self.root.parent) if distributed.is_main() else None)
        if isinstance(choice, str):
            raise UserError(choice)
        if choice is None:
            return 0
        step, path = choice
        loaded = {"step": 0, **self.states}
        _dcp(dcp.load, loaded, Path(path))
        if loaded["step"] != step:
            raise UserError(f"{path}: holds step {loaded['step']}, not {step}")
        return step


def write_checksums(folder: Path, digests: dict[str, str]) -> None:
    atomic_write_json(folder / CHECKSUMS, dict(sorted(digests.items())))


def _dcp(fn, state: dict, folder: Path):
    """`dcp.save` or `dcp.load` of `state` at `folder`, over the ranks or in this process alone (also inside
    `distributed.local()`, where the group exists but the other ranks are not listening)."""
    with warnings.catch_warnings():  # alone: "assuming the intent is to save in a single process"
        warnings.filterwarnings("ignore", message=".*single process")
        return fn(state, checkpoint_id=folder, no_dist=not distributed.active())


def _choose(output_dir: Path) -> tuple[int, Path] | str | None:
    """Rank 0's choice of checkpoint to resume: (step, folder), None when there is none, or why none can be."""
    found = checkpoint_dirs(output_dir)
    if not found:
        return None
    old = [path for _, path in found if (path / OLD_FORMAT).is_file() and not (path / METADATA).is_file()]
    if old:
        return (f"{old[-1]}: a checkpoint of an earlier merge-distill (HF folder + optimizer.pt), which this version "
                "cannot resume; resume it with that version, or start a new run from it (student: that folder) in "
                "a new output_dir")
    try:
        return newest_intact(found)
    except UserError as e:
        return str(e)


def read_checkpoint(folder: Path) -> dict:
    """A checkpoint's whole state in this process ({name: state dict} and "step"), full tensors on the host: for
    inspection and conversion (e.g. `export_checkpoint`), not for resuming."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with tempfile.TemporaryDirectory() as tmp:
        with distributed.local():
            dcp_to_torch_save(folder, Path(tmp) / "state.pt")
        return torch.load(Path(tmp) / "state.pt", weights_only=False)


def export_checkpoint(folder: Path, base: str | os.PathLike, out: Path) -> None:
    """The student weights of checkpoint `folder` as an HF folder at `out` (one process), with the config and
    tokenizer of `base`, the model the run trained."""
    from merge_distill.models import empty_model, load_tokenizer, save_model

    model = empty_model(base, what="student")
    model.load_state_dict(read_checkpoint(folder)["model"], assign=True)
    model.tie_weights()
    save_model(model, load_tokenizer(base, what="student"), out)


def save_final(s, folder: Path) -> None:
    """The trained student as an HF folder in the recipe's `export_dtype` (default: its `dtype`), written
    atomically by rank 0 (every rank calls); a LoRA student's is its base with the adapter merged, and the adapter
    alone in `adapter/` (`adapters.save_adapter_and_merged`). Each weight is cast on its rank, then gathered (under fsdp), then
    kept by rank 0 on the host: no float32 copy of the whole model is ever made besides the shards."""
    from transformers import AutoModelForCausalLM

    dtype = getattr(torch, s.recipe.export_dtype or s.recipe.dtype)
    main = distributed.is_main()
    first = {}  # a tied weight (the head of tied embeddings) is kept once
    tied = {name for name, t in s.student.state_dict(keep_vars=True).items()
            if first.setdefault(id(t), name) != name}
    weights = {}
    lora = s.recipe.student.lora is not None  # (merged in float32, then cast)
    for name, tensor in parallel.full_tensors(s.student, dtype=torch.float32 if lora else dtype, device=s.device):
        if main and name not in tied:
            weights[name] = tensor.to("cpu")
    with atomic_dir(folder) if main else contextlib.nullcontext() as tmp:
        if tmp is not None and s.recipe.student.lora is not None:  # the adapter, and the base with it merged
            from merge_distill.adapters import save_adapter_and_merged

            save_adapter_and_merged(weights, tied, s.student.config, s.recipe.student.lora, s.recipe.student.path,
                                    s.tokenizer, Path(tmp), dtype=dtype, generation_config=s.student.generation_config)
        elif tmp is not None:
            with torch.device("meta"):  # a twin without storage takes the weights, so transformers writes the
                twin = AutoModelForCausalLM.from_config(s.student.config, dtype=dtype)  # folder as any model's
            missing = twin.load_state_dict(weights, assign=True, strict=False).missing_keys
            assert set(missing) <= tied, f"no weights for {sorted(set(missing) - tied)}"
            twin.tie_weights()
            twin.generation_config = s.student.generation_config
            twin.save_pretrained(tmp, safe_serialization=True)
            s.tokenizer.save_pretrained(tmp)
    collectives.barrier()


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
    """metrics.jsonl (experiment trackers are `merge_distill.tracking`'s); on resume, lines past the checkpoint are
    dropped."""

    def __init__(self, output_dir: Path, start_step: int):
        self.path = output_dir / "metrics.jsonl"
        if self.path.exists():
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= start_step]
            self.path.write_text("".join(line + "\n" for line in kept))
        self.file = open(self.path, "a")

    def write(self, metrics: dict) -> None:
        self.file.write(json.dumps(metrics) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()
