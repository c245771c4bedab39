"""The GPU check, in one command: first `torchrun --nproc_per_node 1 -m merge_distill run` with `parallel: fsdp`,
`dtype: bfloat16` on the NCCL group (the path a single-process check never takes: a device-keyed process group,
FSDP2's mixed precision on rows past 256 tokens, a sharded checkpoint and its resume); then a 4B student, two 4B
teachers and the reference on one GPU: 2 steps of G-OPD (lam 1.25) at 8k-token responses; peak memory
(allocated and reserved) against `merge_distill.plan`, and each step's time split (sample, score, update).

    timeout 570 python benchmarks/gpu_4b_check.py        # H200: about 7-9.5 minutes (estimated, see below)
    python benchmarks/gpu_4b_check.py --torchrun-only    # the NCCL run alone (about a minute)
    python benchmarks/gpu_4b_check.py --config /tmp/tiny --device cpu --new-tokens 16   # a CPU smoke test (gloo)

No downloads: random weights from the shipped Qwen3-4B config.json (`--config`: a shipped name or a folder
with one), built on the device, saved in bf16 under `--workdir` (default a temporary folder; 3 x 8 GB): the
student and the math and code teachers (seeds 0, 1, 2); the reference is the student's initial weights, which
the trainer loads again as a frozen copy. Tokenizer: `byte_tokenizer` (260 ids; the models keep their
151,936 rows). `never_eos` keeps EOS out (random weights sample it once per ~vocab tokens: 5% of 8k-token
rows), so responses run to max_new_tokens, the plan's worst case. Recipe: 2 prompts a step (one per domain,
sampled as one batch of 2), bf16, gradient checkpointing, one row per micro-batch, no evaluation. Printed:
the plan (components, phases), each step as it ends (response length, time split, decoding ms/token,
`max_memory_allocated` so far; on cpu peak RSS), then `peak: measured X GiB, planned Y GiB (planned/measured Z)`.

Time on an H200, estimated: the project's sampler runs one forward per token, launch-bound at batch 2 (~3,600
aten ops a token for 36 layers, counted on CPU): ~30-45 ms, so ~4-6 minutes for 8192 tokens; scoring and the
update ~10-20 s; building, saving and loading the four models ~1.5 minutes. Two full 8192-token steps (~11-15
minutes) do not fit a 10-minute command, so step 1 is a warm-up whose sampling stops at `--warmup-tokens`
(256): it pays CUDA's start-up, creates AdamW's m and v and leaves the gradients that step 2's sampling holds;
step 2, at full length, is the one to read, and the peak (the plan's: sample, then update) falls in it.
`--warmup-tokens 0` samples both steps at full length (with `--new-tokens 4096` for ~8 minutes). The final
checkpoint is not written (64 GB of fp32 weights and AdamW state; the GPU machine has a 64 GiB disk).

The torchrun run (`--torchrun-layers`, default 2, of the same config; random weights, `never_eos`, so every row
runs to `--torchrun-tokens`, default 300): 2 steps with a checkpoint after each, then the run cut back to its
step-1 checkpoint and resumed (`--resume`), each as `torchrun --nproc_per_node 1` (`--torchrun-ranks`); it prints
`torchrun fsdp bf16: ok` or the failing command's last lines, and the 4B part runs either way.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

from memory_plan import peak_rss  # noqa: E402

GiB = 2**30
PROMPTS = {
    "math": ["What is 17 * 23?", "Solve for x: 3x + 7 = 22.", "How many primes are there below 50?"],
    "code": ["Write a Python function that reverses a string.", "Implement binary search over a sorted list."],
}
START = time.perf_counter()


def log(text: str) -> None:
    print(f"[{time.perf_counter() - START:6.1f}s] {text}", flush=True)


def config_dir(name: str) -> Path:
    from merge_distill.shapes import CONFIGS

    p = CONFIGS / name if (CONFIGS / name / "config.json").is_file() else Path(name)
    return p.parent if p.name == "config.json" else p


@torch.no_grad()
def never_eos(model, eos: int, c: float = 0.1, k: float = 5000.0) -> None:
    """Residual channel 0 carries +c at every position (each embedding row has c there, and no layer writes it:
    row 0 of every o_proj and down_proj is zero), and the EOS row (tied: also the output row) has -k there, so
    EOS's logit sits ~c * k / rms(final hidden) below the others' (the 4B config on CPU: EOS's log-prob -70,
    the average token's -12.4; -12.6 for EOS without this)."""
    emb = model.get_input_embeddings().weight
    emb[:, 0] = c
    emb[eos, 0] = -k
    for layer in model.model.layers:
        layer.self_attn.o_proj.weight[0] = 0
        layer.mlp.down_proj.weight[0] = 0


def build(root: Path, config: Path, device: str, new_tokens: int) -> tuple[Path, int]:
    """Models, prompts and the recipe under root; (recipe path, longest rendered prompt in tokens)."""
    import yaml
    from transformers import AutoConfig, AutoModelForCausalLM

    from merge_distill.data import render_prompt
    from merge_distill.models import save_model
    from merge_distill.toyworld.models import byte_tokenizer

    tok = byte_tokenizer()
    cfg = AutoConfig.from_pretrained(config)
    cfg.eos_token_id, cfg.pad_token_id, cfg.bos_token_id = tok.eos_token_id, tok.pad_token_id, None
    for name, seed in (("student", 0), ("math_teacher", 1), ("code_teacher", 2)):
        torch.manual_seed(seed)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
        never_eos(model, tok.eos_token_id)
        save_model(model, tok, root / name)
        del model
        log(f"saved {root / name} ({cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, vocab {cfg.vocab_size})")
    for domain, texts in PROMPTS.items():
        (root / f"{domain}.jsonl").write_text("".join(json.dumps({"prompt": t}) + "\n" for t in texts))
    longest = max(len(render_prompt(tok, t, None)) for texts in PROMPTS.values() for t in texts)
    recipe = {
        "student": str(root / "student"), "reward_scale": 1.25,
        "experts": [{"name": d, "teacher": str(root / f"{d}_teacher"), "reference": "student",
                     "prompts": str(root / f"{d}.jsonl")} for d in PROMPTS],
        "rollout": {"prompts_per_step": 2, "max_new_tokens": new_tokens}, "optim": {"lr": 1e-5},
        "budget": {"gradient_checkpointing": True, "max_tokens_per_micro_batch": longest + new_tokens},
        "schedule": {"steps": 2, "checkpoint_every": 0},
        "dtype": "bfloat16", "device": device, "output_dir": str(root / "run"),
    }
    path = root / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path, longest


def peak_bytes(device: str) -> int:
    return torch.cuda.max_memory_allocated(torch.device(device)) if device.startswith("cuda") else peak_rss()


def reserved_bytes(device: str) -> int:
    """What the caching allocator held at its peak: what the GPU really had to have free (cpu: peak RSS)."""
    return torch.cuda.max_memory_reserved(torch.device(device)) if device.startswith("cuda") else peak_rss()


def torchrun_check(root: Path, config: Path, device: str, *, layers: int, new_tokens: int, ranks: int) -> bool:
    """`merge-distill run` under torchrun with fsdp and bf16 on `ranks` processes (NCCL on CUDA), 2 steps with a
    checkpoint after each; then cut back to step 1 and resumed. True when both runs end well and resume where
    the checkpoint left off."""
    import yaml
    from transformers import AutoConfig

    small = root / "config"
    cfg = AutoConfig.from_pretrained(config)
    cfg.num_hidden_layers = layers
    if getattr(cfg, "layer_types", None):
        cfg.layer_types = cfg.layer_types[:layers]
    cfg.save_pretrained(small)
    recipe_path, longest = build(root, small, device, new_tokens)
    recipe = yaml.safe_load(recipe_path.read_text())
    recipe["schedule"].update(checkpoint_every=1, keep_checkpoints=2)
    recipe.update(parallel="fsdp", dtype="bfloat16")
    recipe_path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}",
               "-m", "merge_distill", "run", str(recipe_path), "--no-eval"]
    run = Path(recipe["output_dir"])
    for label, extra in (("2 steps", []), ("resumed from step 1", ["--resume"])):
        t0 = time.perf_counter()
        done = subprocess.run(command + extra, capture_output=True, text=True)
        if done.returncode != 0:
            log(f"torchrun fsdp bf16 ({label}): FAILED ({' '.join(command + extra)})")
            print((done.stdout + done.stderr)[-4000:], flush=True)
            return False
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        log(f"torchrun fsdp bf16 ({label}): {time.perf_counter() - t0:.0f} s, steps {[r['step'] for r in rows]}, "
            f"response length {rows[-1]['response_length']:.0f} tokens, loss {rows[-1]['loss']:.4f}")
        if label == "2 steps":  # cut back to the step-1 checkpoint, as if killed after it
            shutil.rmtree(run / "final")
            shutil.rmtree(run / "checkpoints" / "step-2")
    ok = [r["step"] for r in rows] == [1, 2] and (run / "final").is_dir()
    log(f"torchrun fsdp bf16: {'ok' if ok else 'FAILED (steps or final export missing)'}")
    return ok


def print_plan(pl) -> None:
    print(f"plan ({pl.device}, 1 device of {pl.budget_bytes / GiB:.1f} GiB):")
    for name, b in pl.components.items():
        print(f"  {b / GiB:8.2f} GiB  {name}")
    print("  phases: " + " | ".join(f"{p} {b / GiB:.2f}" for p, b in pl.phase_bytes().items())
          + f" GiB; peak in {pl.peak_phase}; {pl.verdict()}", flush=True)


class StepPrinter:
    """train()'s progress hook: each step's line from metrics.jsonl (written just before) as the step ends."""

    def __init__(self, metrics: Path, device: str):
        self.metrics, self.device = metrics, device

    def add_task(self, *args, **kwargs) -> int:
        return 0

    def update(self, task, completed: int, description: str = "") -> None:
        m = json.loads(self.metrics.read_text().splitlines()[-1])
        n, t = m["response_length"], {k: m[f"time/{k}_s"] for k in ("sample", "score", "update", "step")}
        log(f"step {m['step']}: response {n:.0f} tokens (truncated {m['truncation_rate']:.0%}); sample "
            f"{t['sample']:.1f} s ({1000 * t['sample'] / n:.0f} ms/token), score {t['score']:.1f} s, update "
            f"{t['update']:.1f} s, step {t['step']:.1f} s; peak so far {peak_bytes(self.device) / GiB:.2f} GiB")


def short_first_sampling(tokens: int) -> None:
    """The student's first sampling call (step 1's) stops at `tokens` new tokens: a warm-up step."""
    from merge_distill.engines import TransformersSampler

    full, calls = TransformersSampler.sample, []

    def sample(self, prompts, *, max_new_tokens, **kwargs):
        calls.append(1)
        return full(self, prompts, max_new_tokens=min(tokens, max_new_tokens) if len(calls) == 1 else
                    max_new_tokens, **kwargs)

    TransformersSampler.sample = sample


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="qwen3-4b", help="a shipped config name or a folder with a config.json")
    p.add_argument("--device", default="cuda")
    p.add_argument("--new-tokens", type=int, default=8192, help="max_new_tokens (step 2's, every response's)")
    p.add_argument("--warmup-tokens", type=int, default=256, help="step 1's sampling stops here; 0: full length")
    p.add_argument("--workdir", help="models, recipe and run (default: a temporary folder, removed after)")
    p.add_argument("--torchrun-only", action="store_true", help="the torchrun fsdp bf16 run alone")
    p.add_argument("--skip-torchrun", action="store_true", help="the 4B steps alone")
    p.add_argument("--torchrun-layers", type=int, default=2)
    p.add_argument("--torchrun-tokens", type=int, default=300, help="past 256: bf16 counts integers exactly to 256")
    p.add_argument("--torchrun-ranks", type=int, default=1)
    a = p.parse_args()
    import transformers

    import merge_distill.checkpoint as checkpoint
    import merge_distill.train as train_module
    from merge_distill.build import train_recipe
    from merge_distill.plan import device_memory, plan
    from merge_distill.validate import load_recipe

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    tmp = None if a.workdir else tempfile.TemporaryDirectory(prefix="gpu_4b_check-")
    root = Path(a.workdir or tmp.name)
    root.mkdir(parents=True, exist_ok=True)
    cuda = a.device.startswith("cuda")
    log(f"{torch.cuda.get_device_name() if cuda else a.device}, torch {torch.__version__}, transformers "
        f"{transformers.__version__}")
    if not a.skip_torchrun:
        ok = torchrun_check(root / "torchrun", config_dir(a.config), a.device, layers=a.torchrun_layers,
                            new_tokens=a.torchrun_tokens, ranks=a.torchrun_ranks)
        shutil.rmtree(root / "torchrun", ignore_errors=True)
        if a.torchrun_only:
            sys.exit(0 if ok else 1)
    recipe_path, longest = build(root, config_dir(a.config), a.device, a.new_tokens)
    recipe = load_recipe(recipe_path)
    pl = plan(recipe, gpus=1, gpu_memory_bytes=device_memory(a.device.split(":")[0]), device=a.device,
              prompt_tokens=longest)
    print_plan(pl)
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    if a.warmup_tokens:
        short_first_sampling(a.warmup_tokens)
    # no checkpoints: 12 bytes a parameter (fp32 weights, AdamW's m and v), and the final weights (4 more)
    checkpoint.Checkpointer.save = train_module.save_final = lambda *args, **kwargs: None
    first = min(a.warmup_tokens or a.new_tokens, a.new_tokens)
    log(f"training: 2 steps, {a.new_tokens} new tokens (step 1: {first}), longest prompt {longest} tokens")
    train_recipe(recipe, progress=StepPrinter(root / "run" / "metrics.jsonl", a.device))
    measured, reserved = peak_bytes(a.device), reserved_bytes(a.device)
    print(f"peak: measured {measured / GiB:.2f} GiB allocated, {reserved / GiB:.2f} GiB reserved, planned "
          f"{pl.peak_bytes / GiB:.2f} GiB (planned/allocated {pl.peak_bytes / measured:.3f}, planned/reserved "
          f"{pl.peak_bytes / reserved:.3f})", flush=True)
    if tmp:
        tmp.cleanup()


if __name__ == "__main__":
    main()
