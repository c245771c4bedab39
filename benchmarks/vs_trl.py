"""merge-distill's on-policy distillation step against TRL's, on the same models, prompts and batch.

    python benchmarks/vs_trl.py                  # both workloads, alternating repetitions (~45 min on 2 cores)
    python benchmarks/vs_trl.py --quick          # smoke run: one repetition, one timed step, a smaller L
    python benchmarks/vs_trl.py --workloads L --reps 5 --variants ours,gkd_best
    python benchmarks/vs_trl.py --workloads V --variants ours,ours_padded,gkd_best,iwopd_best,distill_best \
        --reps 3 --steps 1 --threads 1      # the spread of lengths (~25 min on one core)

One step of on-policy distillation: the student samples a response to every prompt of the batch (temperature
1, no top-k/top-p), the teacher scores it, the student takes one AdamW step on a reverse-KL objective.

- `ours`: `merge_distill.train.train_step` on a `Run` built by `merge_distill.build.build_run` from a recipe
  (method gopd, lam 1 = on-policy distillation: the sampled-token reverse-KL policy gradient), with the padded
  sampler, or the paged one on a workload with a spread of lengths; `ours_padded`: always the padded one.
- workload V: responses of 16..1,024 tokens (lognormal, median 160), each prompt's length fixed in
  prompts.jsonl and forced in every trainer where its sampler allows: TRL through a logits processor added to
  `generate` (EOS impossible before the row's length, certain at it; HF keeps the finished row until the batch
  ends, as with a real EOS), merge-distill's paged sampler through per-row caps (the row leaves and frees its
  pages), its padded sampler through the same forced EOS. Every trainer samples the same number of tokens.
- `gkd_best` / `gkd_default`: TRL's `GKDTrainer` with lmbda=1 (always on-policy), beta=1 (full-vocabulary
  reverse KL), temperature 1; best = gradient checkpointing off and fp32, default = TRL's defaults
  (gradient checkpointing on, which also turns the KV cache off in generation; bf16 autocast).
- `iwopd_best`: TRL's `IWOPDTrainer` (sampled-token importance-weighted OPD, full-vocabulary log-softmax),
  best settings. `distill_best`: TRL's `DistillationTrainer` (chunked full-vocabulary reverse KL), best settings.
- the floor (inside the `ours` process, after its timed steps): the unavoidable passes in plain PyTorch:
  KV-cached sampling (one forward per token, softmax, inverse-CDF draw), one teacher forward and one student
  forward/backward over the sequence (logits of response positions only), AdamW. Timed alternately with our
  step in the same process: `loop/floor` is their ratio.

TRL runs through its own `Trainer.train()` loop (collation and tokenisation included, as in real use);
a step's time is the time between consecutive `on_step_end` callbacks. Each variant runs in a fresh process
(peak RSS is that process's `ru_maxrss`), the variants alternate within each repetition, a warm-up step is
dropped, and every process uses 2 threads and float32 weights. Tokens/s = sampled response tokens per
second of step time (up to and including EOS). The last line is `ratio: X`: merge-distill tokens/s over the
fastest TRL trainer at best settings on workload L (median over repetitions of the per-repetition ratio).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(ROOT), str(HERE)]

from _workloads import (WORKLOADS, ForcedEOS, Workload, build, forced_logits, prompt_key,  # noqa: E402
                        time_floor)

THREADS = int(os.environ.get("BENCH_THREADS", "2"))  # --threads sets it for the child processes
TRL_VARIANTS = ("gkd_best", "gkd_default", "iwopd_best", "distill_best")
BEST = ("gkd_best", "iwopd_best", "distill_best")
LABELS = {"ours": "merge-distill", "ours_padded": "merge-distill padded", "floor": "floor (plain PyTorch)",
          "gkd_best": "TRL GKD best", "gkd_default": "TRL GKD defaults", "iwopd_best": "TRL IW-OPD best",
          "distill_best": "TRL Distillation best"}


# ------------------------------------------------------------------------------------------ children


def _rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _threads():
    import torch

    torch.set_num_threads(THREADS)
    torch.manual_seed(0)


def forced_lengths(d: Path, tokenizer) -> dict[tuple[int, ...], int]:
    """prompt_key -> forced response length, for a workload with a spread of lengths (else empty)."""
    records = [json.loads(line) for line in (d / "prompts.jsonl").read_text().splitlines()]
    return {prompt_key(tokenizer(r["prompt"], add_special_tokens=False).input_ids): r["length"]
            for r in records if "length" in r}


def lengths_of(table: dict, prompts) -> list[int]:
    keys = [prompt_key(p) for p in prompts]
    missing = [k for k in keys if k not in table]
    if missing:
        raise SystemExit(f"a prompt the workload does not know: {missing[0][:8]}...")
    return [table[k] for k in keys]


def child_ours(w: Workload, d: Path, warmup: int, steps: int, floor_pairs: int, rollout: str) -> dict:
    _threads()

    from merge_distill.recipe import Recipe
    from merge_distill.build import build_run
    from merge_distill.train import train_step

    out_dir = Path(tempfile.mkdtemp(prefix="md-bench-"))
    recipe = Recipe.model_validate({
        "student": str(d / "student"), "reward_scale": 1.0,
        "experts": [{"name": "synthetic", "teacher": str(d / "teacher"), "prompts": str(d / "prompts.jsonl")}],
        "rollout": {"prompts_per_step": w.batch, "max_new_tokens": w.new_tokens, "temperature": 1.0},
        "optim": {"lr": 1e-5}, "schedule": {"steps": warmup + steps}, "seed": 0,
        "backend": {"rollout": rollout}, "output_dir": str(out_dir)})
    s = build_run(recipe)
    table = forced_lengths(d, s.tokenizer)
    if table:  # the spread: each row ends at its length, each sampler the way it allows (same work as a real EOS)
        inner = s.sampler.sample
        if rollout == "paged":  # a per-row cap: the row leaves the batch and frees its pages there
            def sample(prompts, *, max_new_tokens, **kw):
                return inner(prompts, max_new_tokens=lengths_of(table, prompts), **kw)
        else:  # EOS forced at the row's length; the row stays in the padded batch until the longest ends
            from merge_distill.sampling import sample as padded_sample

            def sample(prompts, *, max_new_tokens, eos_token_id, **kw):
                source = forced_logits(s.sampler.model, lengths_of(table, prompts), eos_token_id)
                return padded_sample(source, prompts, max_new_tokens=max_new_tokens, eos_token_id=eos_token_id, **kw)
        s.sampler.sample = sample
    s.frozen.get(recipe.experts[0].teacher)
    rss_ready = _rss_mb()
    times, tokens, parts = [], [], []
    step = 0

    def ours_step():
        nonlocal step
        t0 = time.perf_counter()
        m = train_step(s, step)
        step += 1
        return time.perf_counter() - t0, m

    for i in range(warmup + steps):
        dt, m = ours_step()
        if i >= warmup:
            times.append(dt)
            tokens.append(round(m["response_length"] * w.batch))
            parts.append({k.removeprefix("time/").removesuffix("_s"): m[k] for k in m if k.startswith("time/")})
    rss_peak = _rss_mb()

    loop_floor = None
    if floor_pairs:
        prompts = [list(p.token_ids) for p in s.mixer.pools[0]]
        loop_floor = time_floor(d, [("teacher", None)], prompts, w.new_tokens, floor_pairs,
                                lambda: ours_step()[0], pad_token_id=s.tokenizer.pad_token_id)
    return {"times": times, "tokens": tokens, "parts": parts, "rss_ready_mb": rss_ready, "rss_peak_mb": rss_peak,
            "loop_floor": loop_floor}


def child_trl(variant: str, w: Workload, d: Path, warmup: int, steps: int) -> dict:
    _threads()
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    tok = AutoTokenizer.from_pretrained(d / "student")
    tok.padding_side = "left"
    student = AutoModelForCausalLM.from_pretrained(d / "student", dtype=torch.float32)
    teacher = AutoModelForCausalLM.from_pretrained(d / "teacher", dtype=torch.float32)
    prompts = [json.loads(line)["prompt"] for line in (d / "prompts.jsonl").read_text().splitlines()]
    out_dir = tempfile.mkdtemp(prefix="trl-bench-")
    best = variant.endswith("_best")
    common = dict(output_dir=out_dir, per_device_train_batch_size=w.batch, gradient_accumulation_steps=1,
                  max_steps=warmup + steps, learning_rate=1e-5, report_to="none", save_strategy="no",
                  use_cpu=True, dataloader_num_workers=0, seed=0, disable_tqdm=True, temperature=1.0)
    if best:
        common.update(gradient_checkpointing=False, bf16=False, logging_strategy="no")

    counted: list[int] = []
    original_generate = student.generate
    eos = tok.eos_token_id
    table = forced_lengths(d, tok)

    def counting_generate(*args, **kwargs):
        input_ids = kwargs["input_ids"] if "input_ids" in kwargs else args[0]
        width = input_ids.shape[1]
        if table:  # the spread: EOS forced at each row's length (HF generate keeps the row until all end)
            from transformers import LogitsProcessor, LogitsProcessorList

            forced = ForcedEOS(lengths_of(table, input_ids.tolist()), eos)

            class AtLength(LogitsProcessor):
                def __call__(self, ids, scores):
                    return forced.at(ids.shape[1] - width, scores)

            kwargs["logits_processor"] = LogitsProcessorList([*(kwargs.get("logits_processor") or []), AtLength()])
        out = original_generate(*args, **kwargs)
        seqs = out.sequences if hasattr(out, "sequences") else out
        comp = seqs[:, width:]
        is_eos = comp == eos
        lengths = torch.where(is_eos.any(1), is_eos.int().argmax(1) + 1, comp.shape[1])
        counted.append(int(lengths.sum()))
        return out

    student.generate = counting_generate

    if variant.startswith("gkd"):
        from trl.experimental.gkd import GKDConfig, GKDTrainer

        data = Dataset.from_list([{"messages": [{"role": "user", "content": p},
                                                {"role": "assistant", "content": "t0"}]} for p in prompts])
        args = GKDConfig(lmbda=1.0, beta=1.0, max_new_tokens=w.new_tokens, max_length=4096, **common)
        trainer = GKDTrainer(model=student, teacher_model=teacher, args=args, train_dataset=data,
                             processing_class=tok)
    elif variant.startswith("iwopd"):
        from trl.experimental.iw_opd import IWOPDConfig, IWOPDTrainer

        # Prompt-only records make Trainer count 0 label tokens and IW-OPD divide its loss by that (-inf, then
        # NaN weights); a placeholder completion of the response length gives the right token count.
        filler = " ".join(["t0"] * w.new_tokens)
        data = Dataset.from_list([{"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": filler}]}
                                  for p in prompts])
        args = IWOPDConfig(lmbda=1.0, beta=1.0, max_completion_length=w.new_tokens, max_length=4096, top_p=1.0,
                           top_k=0, **common)
        trainer = IWOPDTrainer(model=student, teacher_model=teacher, args=args, train_dataset=data,
                               processing_class=tok)
    elif variant.startswith("distill"):
        from trl import DistillationConfig, DistillationTrainer

        data = Dataset.from_list([{"prompt": [{"role": "user", "content": p}]} for p in prompts])
        args = DistillationConfig(beta=1.0, max_completion_length=w.new_tokens, top_p=1.0, top_k=0, **common)
        trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=data,
                                      processing_class=tok)
    else:
        raise SystemExit(f"unknown variant {variant}")

    class StepTimer(TrainerCallback):
        marks: list[float] = []

        def on_train_begin(self, args, state, control, **kwargs):
            self.marks.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kwargs):
            self.marks.append(time.perf_counter())

    timer = StepTimer()
    trainer.add_callback(timer)
    rss_ready = _rss_mb()
    trainer.train()
    step_times = [b - a for a, b in zip(timer.marks, timer.marks[1:])]
    if len(counted) != len(step_times):
        raise SystemExit(f"{variant}: {len(counted)} generate calls for {len(step_times)} steps")
    return {"times": step_times[warmup:], "tokens": counted[warmup:], "rss_ready_mb": rss_ready,
            "rss_peak_mb": _rss_mb(), "bf16": bool(args.bf16),
            "gradient_checkpointing": bool(args.gradient_checkpointing)}


def child_main(a) -> None:
    w = _workload(a.workload, a.quick)
    d = Path(a.dir) / w.name
    if a.child == "build":
        build(w, Path(a.dir))
        result = {"built": str(d)}
    elif a.child in ("ours", "ours_padded"):
        # ours: the recommended sampler (paged where lengths spread); ours_padded: the padded one
        rollout = "paged" if a.child == "ours" and w.median_new else "transformers"
        result = child_ours(w, d, a.warmup, a.steps, a.floor_pairs if not w.median_new else 0, rollout)
    else:
        result = child_trl(a.child, w, d, a.warmup, a.steps)
    print("RESULT " + json.dumps(result), flush=True)


# ------------------------------------------------------------------------------------------ parent


def _workload(name: str, quick: bool) -> Workload:
    from dataclasses import replace

    w = WORKLOADS[name]
    if quick and name == "L":
        w = replace(w, batch=8, new_tokens=32)
    if quick and name == "V":
        w = replace(w, batch=6, new_tokens=96, median_new=24)
    return w


def cpu_ticks() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine so far, from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    hz = os.sysconf("SC_CLK_TCK")
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields) - idle) / hz, sum(fields) / hz


def wait_quiet(max_wait: float, busy_cores: float = 0.25, sample: float = 3.0) -> float:
    """Wait (up to max_wait s) until the machine is idle but for us: other processes use < busy_cores over
    `sample` seconds. Returns the busy cores last seen."""
    deadline = time.time() + max_wait
    while True:
        b0, _ = cpu_ticks()
        time.sleep(sample)
        busy = (cpu_ticks()[0] - b0) / sample
        if busy < busy_cores or time.time() > deadline:
            return busy
        time.sleep(10)


def run_child(variant: str, a, workload: str, floor: bool = False) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", variant, "--workload", workload,
           "--threads", str(THREADS),
           "--dir", a.dir, "--warmup", str(a.warmup), "--steps", str(a.steps),
           "--floor-pairs", str(a.floor_pairs if floor else 0)] + (["--quick"] if a.quick else [])
    env = {**os.environ, "OMP_NUM_THREADS": str(THREADS), "MKL_NUM_THREADS": str(THREADS),
           "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TRL_EXPERIMENTAL_SILENCE": "1", "PYTHONWARNINGS": "ignore",
           "PYTHONPATH": os.pathsep.join([str(ROOT), str(HERE), os.environ.get("PYTHONPATH", "")])}
    import resource

    if variant != "build":
        wait_quiet(a.wait_quiet)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    b0, t0 = cpu_ticks()[0], time.time()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.time() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    own = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            result = json.loads(line[len("RESULT "):])
            # CPU that other processes used while this one ran, in cores (0 = the machine was ours alone)
            result["foreign_cores"] = max(0.0, (cpu_ticks()[0] - b0 - own) / wall)
            result["wall_s"] = wall
            return result
    raise SystemExit(f"{variant} on {workload} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")


def med(xs):
    return statistics.median(xs) if xs else float("nan")


def load_average() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def report(workload: str, w: Workload, runs: dict[str, list[dict]], reps: int) -> dict:
    print(f"\n== workload {workload}: vocab {w.vocab:,}, hidden {w.hidden}, {w.layers} layers, batch {w.batch}, "
          f"{w.new_tokens} new tokens, prompts {w.prompt_min + 5}-{w.prompt_max + 5} tokens; "
          f"{reps} repetitions x {len(runs['ours'][0]['times'])} timed steps")
    tps = {v: [sum(r["tokens"]) / sum(r["times"]) for r in rs] for v, rs in runs.items()}
    foreign = [r["foreign_cores"] for rs in runs.values() for r in rs]
    print(f"other processes' CPU use during the runs: median {med(foreign):.2f} cores, max {max(foreign):.2f}")
    print(f"{'variant':<24}{'tokens/s':>10}{'step s':>9}{'peak RSS MB':>13}{'step RSS MB':>13}"
          f"{'ours x faster':>15}{'ours mem share':>16}")
    ours_peak = med([r["rss_peak_mb"] for r in runs["ours"]])
    summary = {"tps": {}, "speedup": {}, "mem_share": {}}
    for v, rs in runs.items():
        step_s = med([med(r["times"]) for r in rs])
        peak = med([r["rss_peak_mb"] for r in rs])
        step_mem = med([r["rss_peak_mb"] - r["rss_ready_mb"] for r in rs])
        speed = "" if v == "ours" else f"{med([o / t for o, t in zip(tps['ours'], tps[v])]):.2f}x"
        share = "" if v == "ours" else f"{ours_peak / peak:.2f}"
        summary["tps"][v] = med(tps[v])
        if v != "ours":
            summary["speedup"][v] = med([o / t for o, t in zip(tps["ours"], tps[v])])
            summary["mem_share"][v] = ours_peak / peak
        print(f"{LABELS[v]:<24}{med(tps[v]):>10.0f}{step_s:>9.3f}{peak:>13.0f}{step_mem:>13.0f}{speed:>15}{share:>16}")
    best = [v for v in BEST if v in runs]
    if best:
        per_rep = [o / max(tps[v][i] for v in best) for i, o in enumerate(tps["ours"])]
        summary["vs_trl_best"] = med(per_rep)
        print(f"ours / fastest TRL at best settings ({', '.join(LABELS[v] for v in best)}): "
              f"{summary['vs_trl_best']:.2f}x (median of {len(per_rep)} repetitions)")
    parts = runs["ours"][0]["parts"]
    if parts:
        split = {k: med([p[k] for r in runs["ours"] for p in r["parts"]]) for k in parts[0]}
        print("merge-distill step split (s, median): " + ", ".join(f"{k} {v:.3f}" for k, v in split.items()))
    lf = [r["loop_floor"] for r in runs["ours"] if r.get("loop_floor")]
    if lf:
        o = med([t for x in lf for t in x["ours_s"]])
        floors = {k: {p: med([f[p] for x in lf for f in x[k]]) for p in lf[0][k][0]} for k in ("plain", "chunked")}
        for k, f in floors.items():
            print(f"floor, {k} log-probs (s, median): " + ", ".join(f"{p} {v:.3f}" for p, v in f.items()))
        best = min(f["step"] for f in floors.values())
        summary["loop_floor"] = o / best
        print(f"loop / floor (same process, alternating; floor = the faster of the two): "
              f"{o:.3f} s / {best:.3f} s = {o / best:.2f}")
    return summary


def main() -> None:
    global THREADS
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke run: 1 repetition, 1 timed step, a smaller L")
    p.add_argument("--workloads", default="S,L")
    p.add_argument("--variants", default="ours," + ",".join(TRL_VARIANTS))
    p.add_argument("--reps", type=int, default=None, help="alternating repetitions (default: S 5, L 3)")
    p.add_argument("--steps", type=int, default=None,
                   help="timed steps per process, after the warm-up (default: S 10, L 3)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--floor-pairs", type=int, default=3, help="floor/ours pairs timed in the ours process")
    p.add_argument("--floor-reps", type=int, default=1, help="repetitions whose ours process also times the floor")
    p.add_argument("--threads", type=int, default=THREADS, help="torch threads per process (default 2)")
    p.add_argument("--wait-quiet", type=float, default=900,
                   help="before each run, wait up to this many seconds for other processes to leave the CPUs")
    p.add_argument("--dir", default=str(Path(tempfile.gettempdir()) / "merge-distill-bench"))
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--workload", help=argparse.SUPPRESS)
    a = p.parse_args()
    THREADS = a.threads
    if a.child:
        return child_main(a)
    if a.quick:
        a.reps, a.steps, a.floor_pairs = 1, 1, 1
    variants = a.variants.split(",")
    if "ours" not in variants:
        variants.insert(0, "ours")
    import importlib.metadata as md

    versions = {k: md.version(k) for k in ("torch", "transformers", "trl")}
    print(f"merge-distill vs TRL: {', '.join(f'{k} {v}' for k, v in versions.items())}; {THREADS} threads, "
          f"float32, {os.cpu_count()} CPUs; load average at start {load_average()}")
    summaries = {}
    for wl in a.workloads.split(","):
        w = _workload(wl, a.quick)
        wa = argparse.Namespace(**vars(a))
        wa.reps = a.reps or (5 if wl == "S" else 3)
        wa.steps = a.steps or (10 if wl == "S" else 3)
        run_child("build", wa, wl)
        runs: dict[str, list[dict]] = {v: [] for v in variants}
        for rep in range(wa.reps):
            order = variants if rep % 2 == 0 else variants[::-1]  # alternate, and alternate the order
            for v in order:
                runs[v].append(run_child(v, wa, wl, floor=v == "ours" and rep < a.floor_reps))
                r = runs[v][-1]
                print(f"  [{wl} rep {rep + 1}/{wa.reps}] {v}: {med(r['times']):.3f} s/step ({r['wall_s']:.0f} s wall, "
                      f"other processes used {r['foreign_cores']:.2f} cores meanwhile)", flush=True)
        summaries[wl] = report(wl, w, runs, wa.reps)
    print(f"\nload average at end {load_average()}")
    if "L" in summaries and "vs_trl_best" in summaries["L"]:
        print(f"ratio: {summaries['L']['vs_trl_best']:.2f}")


if __name__ == "__main__":
    main()
