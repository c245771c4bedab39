"""Planned against measured peak memory of real training runs (`merge_distill.plan` vs the process).

    python benchmarks/memory_plan.py                  # every shape, about 7 minutes on 2 busy cores
    python benchmarks/memory_plan.py --shapes qwen-fp32,long-fp32
    python benchmarks/memory_plan.py --device cuda    # torch.cuda.max_memory_allocated against the CUDA plan

On CPU (2026-11-29, torch 2.13, transformers 5.24, glibc 2.36):

    shape        | planned MiB | measured MiB | planned/measured | peak phase
    qwen-fp32    |        2920 |         2764 |            1.057 | backward end
    qwen-bf16    |        2551 |         2595 |            0.983 | update
    long-fp32    |        1218 |         1196 |            1.019 | update
    long-micro4  |         869 |          835 |            1.041 | update
    wide-bf16    |        1369 |         1433 |            0.955 | update
    max error: 5.7%

The CPU constants of the plan (baseline, tokenizer, heap slack) were measured on runs like these, so this
checks the model of the phases more than it validates the constants independently.

For each shape: random-init Qwen3-config student and teacher saved with `save_pretrained` in a temporary
folder (synthetic word-level tokenizer of exactly `vocab` ids, `_workloads.make_tokenizer`), prompts, and a
two-expert G-OPD recipe (lam 1.25, so the student's initial weights are loaded again as the reference);
`merge_distill.train.train` runs 2 steps (sample, score, update, and the final checkpoint) in a fresh
subprocess, which reports its peak resident memory (VmHWM: see `peak_rss`) or, with `--device cuda`,
`torch.cuda.max_memory_allocated`. Random models almost never sample EOS, so responses run to
max_new_tokens, the plan's worst case. The plan is given the longest rendered prompt.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]


@dataclass(frozen=True)
class Shape:
    name: str
    vocab: int
    hidden: int
    layers: int
    heads: int
    batch: int
    new_tokens: int
    prompt_words: tuple[int, int] = (24, 40)
    dtype: str = "float32"
    micro_batch: int | None = None
    reward_scale: float = 1.25


SHAPES = {s.name: s for s in [
    Shape("qwen-fp32", vocab=151_936, hidden=512, layers=2, heads=8, batch=8, new_tokens=32),
    Shape("qwen-bf16", vocab=151_936, hidden=512, layers=2, heads=8, batch=8, new_tokens=32, dtype="bfloat16",
          reward_scale=1.0),
    Shape("long-fp32", vocab=4096, hidden=384, layers=4, heads=6, batch=16, new_tokens=48, prompt_words=(96, 160)),
    Shape("long-micro4", vocab=4096, hidden=384, layers=4, heads=6, batch=16, new_tokens=48,
          prompt_words=(96, 160), micro_batch=4),
    Shape("wide-bf16", vocab=8192, hidden=384, layers=6, heads=6, batch=24, new_tokens=48, prompt_words=(48, 96),
          dtype="bfloat16"),
]}


def build(shape: Shape, root: Path, device: str) -> tuple[Path, int]:
    """Models, prompts and the recipe under root; (recipe path, longest rendered prompt in tokens)."""
    import random

    import torch
    import yaml

    from _workloads import make_tokenizer
    from merge_distill.data import render_prompt
    from merge_distill.models import save_model, tiny_qwen3

    tok = make_tokenizer(shape.vocab)
    for name, seed in (("student", 0), ("teacher", 1)):
        model = tiny_qwen3(shape.vocab, hidden=shape.hidden, layers=shape.layers, heads=shape.heads, seed=seed,
                           max_positions=1024, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        save_model(model.to(torch.float32), tok, root / name)
    rng = random.Random(0)
    words = shape.vocab - 8
    texts = [" ".join(f"t{rng.randrange(words)}" for _ in range(rng.randint(*shape.prompt_words)))
             for _ in range(4 * shape.batch)]
    (root / "prompts.jsonl").write_text("".join(json.dumps({"prompt": t}) + "\n" for t in texts))
    longest = max(len(render_prompt(tok, t, None)) for t in texts)
    recipe = {
        "student": str(root / "student"), "reward_scale": shape.reward_scale,
        "experts": [{"name": "math", "teacher": str(root / "teacher"), "prompts": str(root / "prompts.jsonl"),
                     "grader": "math"},
                    {"name": "code", "teacher": str(root / "teacher"), "prompts": str(root / "prompts.jsonl"),
                     "grader": "code"}],
        "train": {"steps": 2, "prompts_per_step": shape.batch, "max_new_tokens": shape.new_tokens, "lr": 1e-4,
                  "threads": 2, "micro_batch_size": shape.micro_batch},
        "dtype": shape.dtype, "device": device, "output_dir": str(root / "run"),
    }
    path = root / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path, longest


def worker(recipe_path: str) -> None:
    """Train the recipe; print the peak memory in bytes as the last line."""
    import torch

    from merge_distill.recipe import load_recipe
    from merge_distill.train import train

    recipe = load_recipe(recipe_path)
    train(recipe)
    if recipe.device.startswith("cuda"):
        print(torch.cuda.max_memory_allocated())
    else:
        print(peak_rss())


def peak_rss() -> int:
    """Bytes of this process's peak resident memory since it exec'd: VmHWM. Not `ru_maxrss`, which Linux carries
    across exec from the spawning process (Python spawns through vfork, so the parent's high-water mark,
    here the models it built, would count as the worker's); `ru_maxrss` where there is no /proc."""
    status = Path("/proc/self/status")
    if status.exists():
        line = next(x for x in status.read_text().splitlines() if x.startswith("VmHWM:"))
        return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default=",".join(SHAPES))
    p.add_argument("--device", default="cpu")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        return worker(a.worker)
    import transformers

    from merge_distill.plan import plan
    from merge_distill.recipe import load_recipe

    transformers.utils.logging.disable_progress_bar()
    rows = []
    print(f"{'shape':<12} | {'planned MiB':>11} | {'measured MiB':>12} | planned/measured | peak phase")
    for name in a.shapes.split(","):
        shape = SHAPES[name]
        with tempfile.TemporaryDirectory() as tmp:
            recipe, longest = build(shape, Path(tmp), a.device)
            out = subprocess.run([sys.executable, __file__, "--worker", str(recipe)], capture_output=True, text=True,
                                 env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
            if out.returncode:
                sys.exit(f"{name}: training failed\n{out.stderr[-3000:]}")
            measured = int(out.stdout.strip().splitlines()[-1])
            pl = plan(load_recipe(recipe), gpus=1, gpu_memory_bytes=2**40, device=a.device, prompt_tokens=longest)
        rows.append((name, pl.peak_bytes, measured))
        print(f"{name:<12} | {pl.peak_bytes / 2**20:>11.0f} | {measured / 2**20:>12.0f} | "
              f"{pl.peak_bytes / measured:>16.3f} | {pl.peak_phase}", flush=True)
    print(f"max error: {100 * max(abs(p / m - 1) for _, p, m in rows):.1f}%")


if __name__ == "__main__":
    main()
