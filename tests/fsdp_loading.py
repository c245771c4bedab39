"""Run by tests/test_distributed.py under torchrun (2 gloo ranks): `train.setup` of an fsdp recipe with the frozen
models sharded, then one JSON report per rank in OUT: the models each rank read whole from disk
(`from_pretrained` calls), how much of the student it holds, the student's and the teacher's gathered weights
against their files, the tied embeddings and the rotary buffers. Usage: fsdp_loading.py RECIPE TEACHER OUT."""

import json
import sys
from pathlib import Path

import torch
import transformers
from safetensors.torch import load_file

from merge_distill import distributed, parallel
from merge_distill.recipe import load_recipe
from merge_distill.train import setup

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


def main(recipe_path: str, teacher: str, out: str) -> None:
    recipe = load_recipe(recipe_path)
    distributed.init(recipe.device)
    s = setup(recipe)
    rank = distributed.world().rank
    held = sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in s.student.parameters())
    whole = sum(p.numel() for p in s.student.parameters())
    frozen = s.frozen.get(teacher, what="teacher")
    report = {
        "read_whole": list(read_whole), "held": held, "whole": whole,
        "student_matches_file": same_as_file(s.student, Path(recipe.student)),
        "teacher_matches_file": same_as_file(parallel.root_of(frozen).model, Path(teacher)),
        "tied": s.student.lm_head.weight is s.student.model.embed_tokens.weight,
        "inv_freq": s.student.model.rotary_emb.inv_freq.tolist(),
        "meta_left": [n for n, t in [*s.student.named_parameters(), *s.student.named_buffers()]
                      if t.is_meta or getattr(t, "to_local", lambda: t)().is_meta],
    }
    (Path(out) / f"rank{rank}.json").write_text(json.dumps(report))
    distributed.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:])
