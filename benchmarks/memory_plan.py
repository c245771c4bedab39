"""Planned against measured peak memory of real training runs (`merge_distill.plan` vs the process), over a
grid of shapes: layers, width, vocabulary (tied or not), rows, prompt and response lengths, micro-batches,
bf16, OPD (no reference), and one base shared by a LoRA student, two adapter experts and the reference.

    python benchmarks/memory_plan.py                  # 16 shapes, ~35-45 minutes on 2 cores shared with others
    python benchmarks/memory_plan.py --shapes issue-24,tied
    python benchmarks/memory_plan.py --device cuda    # the process's peak device memory against the CUDA plan

On CPU (2026-12-07, torch 2.13, transformers 5.24, glibc 2.36; 25 minutes on 2 cores shared with other
jobs), planned / measured peak resident memory:

    shape         | layers x hidden, vocab, rows x tokens | planned MiB | measured MiB | ratio | peak phase
    issue-24      | 5x512/1408 v151k 8x64+64              |        4197 |         4374 | 0.960 | backward end
    tied          | 5x512/1408 v151kt 8x64+64             |        3099 |         3234 | 0.958 | backward end
    layers-2      | 2x512/1408 v32k 8x64+64               |        1341 |         1516 | 0.885 | update
    layers-12     | 12x256/704 v32k 8x64+64               |        1333 |         1410 | 0.945 | update
    wide          | 3x1024/2816 v32k 8x64+64              |        2743 |         3037 | 0.903 | update
    vocab-8k      | 5x384/1024 v8k 16x64+64               |        1151 |         1265 | 0.909 | update
    vocab-8k-tied | 5x384/1024 v8kt 16x64+64              |        1091 |         1200 | 0.908 | update
    rows-32       | 4x256/704 v16k 32x64+64               |        1350 |         1414 | 0.955 | update
    long          | 4x384/1024 v8k 8x160+256              |        1355 |         1429 | 0.948 | update
    long-micro2   | 4x384/1024 v8k 8x160+256 mb2          |         964 |         1008 | 0.956 | update
    short         | 5x512/1408 v32k 16x24+16              |        1506 |         1670 | 0.902 | update
    bf16-opd      | 5x512/1408 v32k 8x64+64 bf16 opd      |        1443 |         1554 | 0.929 | update
    bf16-long     | 4x384/1024 v8k 8x128+192 bf16         |        1011 |         1109 | 0.912 | update
    worst ratio: 0.885 (layers-2); max error 11.5% (tolerance 15%)

and (2026-12-07, those three alone: `--shapes v32k,shared-base`, then `--shapes shared-long,shared-base`, 5
minutes each; shared-base measured 1144 MiB in the first, ratio 0.943):

    v32k          | 5x512/1408 v32k 8x64+64               |        1674 |         1767 | 0.947 | update
    shared-base   | 5x512/1408 v32k 8x64+64 lora16        |        1079 |         1124 | 0.961 | update
    shared-long   | 4x384/1024 v8k 8x160+256 lora16       |        1363 |         1398 | 0.975 | update

A shared base (`lora`: r) is a LoRA student of the student folder (r on all-linear, lora_alpha 2r) and two
experts each a peft adapter of that folder (`save_adapters`: r on all-linear, random A and B), their
references the base (`teacher_base` for one, `student` for the other): the student's one base serves them all,
so of the v32k run's frozen teacher and reference, gradients, AdamW state and embedding gradients only the
adapters' float32 weights and state are left (643 MiB less measured, 595 planned). Its update holds more heap
slack than a full student's (peft's forward frees a base output, B's output and its scaled copy per wrapped
linear between saved tensors): `plan.CPU_LORA_SLACK`, fitted on shared-base, shared-long and a 2-layer shape
(808 planned against 852 measured).

The plan is under on every shape by 4-12%: what the process's heap keeps of the first update (glibc does not
return freed blocks from the middle of its heap) is still resident when the next step samples and scores, and
the plan counts that slack in the update phase only.

For each shape: random-init Qwen3-config student and teacher saved with `save_pretrained` in float32 in a
temporary folder (synthetic word-level tokenizer of exactly `vocab` ids, `_workloads.make_tokenizer`),
prompts of exactly `prompt` tokens, and a two-expert G-OPD recipe (lam 1.25, so the student's initial
weights are loaded again as the reference; `opd`: lam 1, none); the weight files are then written out and
dropped from the page cache (`evict`), as a user's checkpoints are. `merge_distill.train.train` runs 2
steps (sample, score, update), with no checkpoint (the benchmark measures the training phases; the plan is
asked for the same, `checkpoints=False`), in a fresh subprocess, which reports its peak resident memory
(VmHWM: see `peak_rss`) or, with `--device cuda`, `torch.cuda.max_memory_reserved` plus what the process
holds outside torch's allocator at the end (the CUDA context, NCCL: `mem_get_info`; never run: no GPU has
been lent to these checks). Random models almost never sample EOS, so responses run to max_new_tokens, the
plan's worst case. The plan is given the longest rendered prompt. Exit status 1 when a shape's plan is off
by more than `--tolerance` (15%).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]


@dataclass(frozen=True)
class Shape:
    """A Qwen3-config student and teacher, and the step that trains it (`prompt` tokens: the chat template's 5
    included; every response runs to `new_tokens`)."""

    name: str
    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    tied: bool
    batch: int
    new_tokens: int
    prompt: int = 64
    dtype: str = "float32"
    micro_batch: int | None = None
    reward_scale: float = 1.25
    lora: int | None = None  # r: a LoRA student and two adapter experts (r, all-linear) of its own base


def _shape(name: str, **kw) -> Shape:
    base = dict(vocab=151_936, hidden=512, layers=5, heads=8, kv_heads=2, intermediate=1408, tied=False, batch=8,
                new_tokens=64)
    return Shape(name, **{**base, **kw})


SHAPES = {s.name: s for s in [
    _shape("issue-24"),  # issue #24's shape: untied 151,936 vocabulary, 8 prompts x 64 tokens, fp32
    _shape("tied", tied=True),
    _shape("layers-2", layers=2, vocab=32_000),
    _shape("layers-12", layers=12, hidden=256, heads=4, kv_heads=2, intermediate=704, vocab=32_000),
    _shape("wide", hidden=1024, layers=3, heads=16, kv_heads=4, intermediate=2816, vocab=32_000),
    _shape("vocab-8k", vocab=8192, hidden=384, heads=6, kv_heads=2, intermediate=1024, batch=16),
    _shape("vocab-8k-tied", vocab=8192, hidden=384, heads=6, kv_heads=2, intermediate=1024, batch=16, tied=True),
    _shape("rows-32", vocab=16_384, hidden=256, layers=4, heads=4, kv_heads=2, intermediate=704, batch=32),
    _shape("long", vocab=8192, hidden=384, layers=4, heads=6, kv_heads=2, intermediate=1024, prompt=160,
           new_tokens=256),
    _shape("long-micro2", vocab=8192, hidden=384, layers=4, heads=6, kv_heads=2, intermediate=1024, prompt=160,
           new_tokens=256, micro_batch=2),
    _shape("short", vocab=32_000, new_tokens=16, prompt=24, batch=16),
    _shape("bf16-opd", vocab=32_000, dtype="bfloat16", reward_scale=1.0),
    _shape("bf16-long", vocab=8192, hidden=384, layers=4, heads=6, kv_heads=2, intermediate=1024, prompt=128,
           new_tokens=192, dtype="bfloat16"),
    _shape("v32k", vocab=32_000),  # shared-base's run with whole models: a student, a teacher and the reference
    _shape("shared-base", vocab=32_000, lora=16),  # one base: the LoRA student, two adapter teachers, the reference
    _shape("shared-long", vocab=8192, hidden=384, layers=4, heads=6, kv_heads=2, intermediate=1024, prompt=160,
           new_tokens=256, lora=16),
]}


def build(shape: Shape, root: Path, device: str) -> tuple[Path, int]:
    """Models, prompts and the recipe under root; (recipe path, longest rendered prompt in tokens)."""
    import random

    import torch
    import yaml
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from _workloads import make_tokenizer
    from merge_distill.data import render_prompt
    from merge_distill.models import save_model

    tok = make_tokenizer(shape.vocab)
    for name, seed in (("student", 0), ("teacher", 1))[:2 - bool(shape.lora)]:
        config = Qwen3Config(vocab_size=shape.vocab, hidden_size=shape.hidden, num_hidden_layers=shape.layers,
                             num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
                             head_dim=shape.hidden // shape.heads, intermediate_size=shape.intermediate,
                             max_position_embeddings=1024, tie_word_embeddings=shape.tied,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=None)
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            save_model(Qwen3ForCausalLM(config), tok, root / name)
    teachers = [str(root / "teacher")] * 2
    if shape.lora:
        teachers = [{"base": str(root / "student"), "adapter": str(adapter)}
                    for adapter in save_adapters(root / "student", shape.lora, [root / "math", root / "code"])]
    rng = random.Random(0)
    words = shape.vocab - 8
    texts = [" ".join(f"t{rng.randrange(words)}" for _ in range(shape.prompt - 5)) for _ in range(4 * shape.batch)]
    (root / "prompts.jsonl").write_text("".join(json.dumps({"prompt": t}) + "\n" for t in texts))
    longest = max(len(render_prompt(tok, t, None)) for t in texts)
    recipe = {
        "student": str(root / "student"), "reward_scale": shape.reward_scale,
        "experts": [{"name": "math", "teacher": teachers[0], "prompts": str(root / "prompts.jsonl"), "grader": "math"},
                    {"name": "code", "teacher": teachers[1], "prompts": str(root / "prompts.jsonl"), "grader": "code"}],
        "rollout": {"prompts_per_step": shape.batch, "max_new_tokens": shape.new_tokens}, "optim": {"lr": 1e-4},
        "budget": {"threads": 2, "micro_batch_size": shape.micro_batch}, "schedule": {"steps": 2},
        "dtype": shape.dtype, "device": device, "output_dir": str(root / "run"),
    }
    if shape.lora:  # the math reference spelled as the adapter teacher's base, the code one as the student's
        recipe["student"] = {"path": recipe["student"], "lora": {"r": shape.lora, "lora_alpha": 2 * shape.lora}}
        recipe["experts"][0]["reference"] = "teacher_base"
    path = root / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    for weights in root.rglob("*.safetensors"):
        evict(weights)
    return path, longest


def save_adapters(base: Path, r: int, folders: list[Path]) -> list[Path]:
    """A peft LoRA adapter of `base` (r, all-linear) in each folder, each with its own random A and B (B is not
    zero: each expert differs from the base and from the other)."""
    import peft
    import torch
    from transformers import AutoModelForCausalLM

    for seed, folder in enumerate(folders):
        with torch.random.fork_rng(), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # peft asks transformers 5 an old name
            torch.manual_seed(10 + seed)
            model = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                                        peft.LoraConfig(task_type="CAUSAL_LM", r=r, target_modules="all-linear"))
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    torch.nn.init.normal_(p, std=0.02)
            model.save_pretrained(folder)
    return folders


def evict(path: Path) -> None:
    """Write `path` out and drop it from the page cache, so the run reads it from disk as a user's checkpoint
    usually is. On CPU a frozen model in its file's dtype is memory-mapped: its pages count in the resident set
    as they are read, and a file just written sits in the page cache in large folios, which map whole blocks of
    an embedding whose few looked-up rows a short run reads (measured: the issue-24 shape peaks 8% higher)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def worker(recipe_path: str) -> None:
    """Train the recipe; print the peak memory in bytes as the last line."""
    import torch

    from merge_distill.build import train_recipe
    from merge_distill.validate import load_recipe

    import merge_distill.train as loop

    loop.save_checkpoint = loop.save_final = lambda *args: None  # no checkpoints: the training phases alone
    recipe = load_recipe(recipe_path)
    train_recipe(recipe)
    if recipe.device.startswith("cuda"):
        free, total = torch.cuda.mem_get_info()
        print(torch.cuda.max_memory_reserved() + total - free - torch.cuda.memory_reserved())
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


def describe(s: Shape) -> str:
    """The shape in one column: layers x hidden / intermediate, vocabulary (t: tied), rows x prompt + new tokens."""
    return (f"{s.layers}x{s.hidden}/{s.intermediate} v{s.vocab // 1000}k{'t' if s.tied else ''} "
            f"{s.batch}x{s.prompt}+{s.new_tokens}" + (f" mb{s.micro_batch}" if s.micro_batch else "")
            + (" bf16" if s.dtype == "bfloat16" else "") + (" opd" if s.reward_scale == 1.0 else "")
            + (f" lora{s.lora}" if s.lora else ""))


def measure(shape: Shape, device: str) -> tuple[int, object]:
    """(measured peak bytes of a 2-step run in a fresh process, the plan of the same recipe)."""
    from merge_distill.plan import plan
    from merge_distill.validate import load_recipe

    with tempfile.TemporaryDirectory() as tmp:
        recipe, longest = build(shape, Path(tmp), device)
        out = subprocess.run([sys.executable, __file__, "--worker", str(recipe)], capture_output=True, text=True,
                             env={**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"})
        if out.returncode:
            sys.exit(f"{shape.name}: training failed\n{out.stderr[-3000:]}")
        planned = plan(load_recipe(recipe), gpus=1, gpu_memory_bytes=2**40, device=device, prompt_tokens=longest,
                       checkpoints=False)
        return int(out.stdout.strip().splitlines()[-1]), planned


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default=",".join(SHAPES))
    p.add_argument("--device", default="cpu")
    p.add_argument("--tolerance", type=float, default=0.15, help="exit 1 when a shape's plan is off by more")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        return worker(a.worker)
    import transformers

    transformers.utils.logging.disable_progress_bar()
    ratios = {}
    print(f"{'shape':<14}| {'layers x hidden, vocab, rows x tokens':<38}| {'planned MiB':>11} | {'measured MiB':>12} "
          f"| ratio | peak phase")
    for name in a.shapes.split(","):
        shape = SHAPES[name]
        measured, pl = measure(shape, a.device)
        ratios[name] = pl.peak_bytes / measured
        print(f"{name:<14}| {describe(shape):<38}| {pl.peak_bytes / 2**20:>11.0f} | {measured / 2**20:>12.0f} | "
              f"{ratios[name]:.3f} | {pl.peak_phase}", flush=True)
    worst = max(ratios, key=lambda n: abs(ratios[n] - 1))
    print(f"worst ratio: {ratios[worst]:.3f} ({worst}); max error {100 * abs(ratios[worst] - 1):.1f}% "
          f"(tolerance {100 * a.tolerance:.0f}%)")
    if abs(ratios[worst] - 1) > a.tolerance:
        sys.exit(1)


if __name__ == "__main__":
    main()
