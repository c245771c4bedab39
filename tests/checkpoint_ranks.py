"""Programs tests/test_distributed.py runs on 2 gloo ranks under torchrun (`checkpoint_ranks.py NAME ARGS`); each
rank writes a JSON report to OUT, which the test checks.

- `loading RECIPE TEACHER OUT`: `build.build_run` of an fsdp recipe with the frozen models sharded; per rank, the
  models it read whole from disk (`from_pretrained` calls), how much of the student it holds, the student's and
  the teacher's gathered weights against their files, the tied embeddings and the rotary buffers.
- `choice RECIPE OUT`: resume a run whose newest checkpoint rank 1 cannot see (its listing lags, as on a node
  without a shared view of the folder): the step each rank resumed at.
"""

import json
import sys
from pathlib import Path

import torch
import transformers
from safetensors.torch import load_file

from merge_distill import distributed, parallel
from merge_distill.build import build_run
from merge_distill.validate import load_recipe

read_whole = []
_from_pretrained = transformers.AutoModelForCausalLM.from_pretrained


def counted(path, *args, **kwargs):
    read_whole.append(Path(path).name)
    return _from_pretrained(path, *args, **kwargs)


transformers.AutoModelForCausalLM.from_pretrained = counted


def same_as_file(model: torch.nn.Module, folder: Path) -> bool:
    """Every gathered weight equals the file's (every rank gathers; a tied head is the embeddings)."""
    files = load_file(folder / "model.safetensors")
    return all(torch.equal(tensor, files[name if name in files else "model.embed_tokens.weight"])
               for name, tensor in parallel.full_tensors(model))


def loading(recipe_path: str, teacher: str, out: str) -> None:
    recipe = load_recipe(recipe_path)
    distributed.init(recipe.device)
    s = build_run(recipe)
    rank = distributed.world().rank
    held = sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in s.student.parameters())
    whole = sum(p.numel() for p in s.student.parameters())
    frozen = s.frozen.get(teacher, what="teacher")
    report = {
        "read_whole": list(read_whole), "held": held, "whole": whole,
        "student_matches_file": same_as_file(s.student, Path(recipe.student.path)),
        "teacher_matches_file": same_as_file(parallel.root_of(frozen).model, Path(teacher)),
        "tied": s.student.lm_head.weight is s.student.model.embed_tokens.weight,
        "inv_freq": s.student.model.rotary_emb.inv_freq.tolist(),
        "meta_left": [n for n, t in [*s.student.named_parameters(), *s.student.named_buffers()]
                      if t.is_meta or getattr(t, "to_local", lambda: t)().is_meta],
    }
    (Path(out) / f"rank{rank}.json").write_text(json.dumps(report))


def choice(recipe_path: str, out: str) -> None:
    from merge_distill import checkpoint
    recipe = load_recipe(recipe_path)
    distributed.init(recipe.device)
    rank = distributed.world().rank
    if rank == 1:
        listed = checkpoint.checkpoint_dirs
        checkpoint.checkpoint_dirs = lambda output_dir: listed(output_dir)[:-1]
    run = build_run(recipe)
    step = run.checkpoints.resume()
    (Path(out) / f"rank{rank}.json").write_text(json.dumps({"step": step, "scheduler": run.scheduler.last_epoch}))


if __name__ == "__main__":
    {"loading": loading, "choice": choice}[sys.argv[1]](*sys.argv[2:])
    distributed.shutdown()  # after the program's models are gone (see tests/on_ranks.py)
