"""Rollouts at a realistic spread of lengths: the paged sampler (continuous batching) against today's padded one.

    python benchmarks/rollouts.py                          # the default: ~15 minutes on one core
    python benchmarks/rollouts.py --rows 16 --kv-rows 16   # one batch, no memory budget
    python benchmarks/rollouts.py --config merge_distill/configs/qwen3-0.6b --device cuda --dtype bfloat16 \\
        --vocabs 151936 --max-new 2048 --median-new 512 --rows 64

The workload: `rows` prompts of 16..48 random tokens, each with a response length drawn from a lognormal
(median `--median-new`, sigma `--sigma`), clipped to [`--min-new`, `--max-new`]. The models are random tiny
Qwen3s (hidden 64, 2 layers; or a shipped config's shape with `--config`), at each vocabulary in `--vocabs`
(default 260 and Qwen3's 151,936). A random model does not end its responses on its own, so the lengths are
forced, each sampler the way it allows, and both do the same work as they would if a trained model drew EOS
at those lengths:
- padded (`merge_distill.sampling.sample`): the row's EOS is forced at its length (and masked before it). The
  row stays in the batch until the longest row ends, as with a real EOS.
- paged (`merge_distill.paged.sample_paged`): each row is capped at its length, with no EOS, and frees its
  pages there, as at a real EOS.

Both get the same KV memory: `--kv-rows` rows at the longest prompt + `--max-new` (what a row may take when
lengths are not known in advance; default 16 of the 64 rows), as a run's `budget.max_rollout_tokens` gives them.
The padded sampler then samples the rows in chunks of that many, each chunk until its longest row ends (what the
trainer does); the paged engine gets that many tokens of cache, and admits rows while pages are free, so short
rows make room for waiting ones. `--cache-tokens` sets the paged cache alone.

tokens/s counts the real response tokens: the sum of the lengths, divided by the call's wall time. That time
includes the paged engine's setup and teardown. Peak is the memory the call adds:
`torch.cuda.max_memory_allocated` on CUDA. On the CPU it is the process's high-water RSS, reset just before the
call, after the heap's free memory is handed back (`malloc_trim`). It counts what glibc's heap grows by during
the call, fragmentation included: the padded sampler's per-step `cat` of a growing cache, between vocab-sized
logits, can grow the heap far beyond its live tensors. The line above the table gives the KV each one holds.
Repetitions alternate the samplers and the vocabularies in one run. The last line is `ratio: X`: paged
over padded in tokens/s at the largest vocabulary, the median over repetitions.

A real model instead, with a vLLM column (`--model`; vLLM from the vLLM environment, `scripts/setup.sh --vllm`):

    VLLM_ENABLE_V1_MULTIPROCESSING=0 .venv-vllm/bin/python benchmarks/rollouts.py --model SmolLM2.gguf --vllm \
        --rows 16 --max-new 64 --threads 2

Each engine samples the same `rows` prompts (short questions, raw text) through the run's `Sampler` protocol at
T=1, up to `--max-new` tokens, ended by the model's own EOS ids: padded, paged (where transformers has its engine:
not 5.19, the vLLM environment's; run the main environment for it), and with `--vllm` the vLLM sampler
(its CPU build's kernels, on `--threads` cores: VLLM_CPU_OMP_THREADS_BIND, which also sets the process's torch
threads). The responses differ between engines (each its own draws), so tokens/s counts each call's own tokens.
The last line gives each engine over padded, the median over repetitions.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

from _workloads import forced_logits, lognormal_lengths, peak_rss_added  # noqa: E402


def _trim() -> None:
    """Hand the heap's free memory back to the OS (glibc `malloc_trim`), so that the RSS before a call is what is
    live, and the call's peak is not hidden in memory a previous call left in the heap."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=64, help="responses per call (prompts x rollouts)")
    p.add_argument("--kv-rows", type=int, default=16, help="the KV budget of both samplers, in rows at the longest "
                                                           "prompt + --max-new (default 16)")
    p.add_argument("--min-new", type=int, default=16)
    p.add_argument("--max-new", type=int, default=1024)
    p.add_argument("--median-new", type=float, default=160, help="median of the lognormal response lengths")
    p.add_argument("--sigma", type=float, default=1.0, help="sigma of the lognormal (its log's std)")
    p.add_argument("--vocabs", default="260,151936")
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--config", default=None, help="a folder with a config.json (e.g. merge_distill/configs/qwen3-0.6b): "
                                                  "a random model of that shape instead (its vocabulary wins)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", help="the weights' dtype (both samplers compute in it)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--cache-tokens", type=int, default=None, help="paged: the KV cache's capacity (default: every "
                                                                  "row at --max-new)")
    p.add_argument("--page-size", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", default=None, help="a model folder or .gguf: real responses ended by its EOS ids, "
                                                 "instead of random models with forced lengths")
    p.add_argument("--vllm", action="store_true", help="with --model: add the vLLM sampler")
    a = p.parse_args()
    if a.model:
        return real_model(a)

    import torch

    from merge_distill.toyworld.models import tiny_qwen3
    from merge_distill.paged import PagedConfig, sample_paged
    from merge_distill.sampling import row_seeds, sample

    torch.set_num_threads(a.threads)
    device, dtype = torch.device(a.device), getattr(torch, a.dtype)

    def build(vocab: int):
        if a.config:
            from transformers import AutoConfig, AutoModelForCausalLM

            config = AutoConfig.from_pretrained(a.config)
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                torch.manual_seed(a.seed)
                model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        else:
            model = tiny_qwen3(vocab, hidden=a.hidden, layers=a.layers, heads=a.heads, seed=a.seed,
                               max_positions=a.max_new + 64)
        return model.to(device=device, dtype=dtype).eval()

    def measure(fn):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
            t0 = time.perf_counter()
            fn()
            torch.cuda.synchronize(device)
            return (torch.cuda.max_memory_allocated(device) - before) / 2**20, time.perf_counter() - t0
        _trim()
        return peak_rss_added(fn)

    vocabs = [int(v) for v in a.vocabs.split(",")]
    if a.config:  # one model, of the config's vocabulary
        model = build(0)
        vocabs, models = [model.config.vocab_size], {model.config.vocab_size: model}
    else:
        models = {v: build(v) for v in vocabs}
    g = torch.Generator().manual_seed(a.seed)
    length = lognormal_lengths(a.rows, a.median_new, a.sigma, a.min_new, a.max_new, a.seed)
    prompts = [torch.randint(0, min(vocabs) - 1, (int(n),), generator=g).tolist()
               for n in torch.randint(16, 49, (a.rows,), generator=g)]
    seeds = row_seeds(a.seed, a.rows)
    kv_rows = min(a.kv_rows, a.rows)
    budget = kv_rows * (max(len(q) for q in prompts) + a.max_new)
    paged_config = PagedConfig(max_cache_tokens=a.cache_tokens or budget,
                               **({"page_size": a.page_size} if a.page_size else {}))
    tokens = sum(length)

    def padded(model, prompts=prompts, length=length, seeds=seeds):
        eos = model.config.vocab_size - 1
        for lo in range(0, len(prompts), kv_rows):  # the trainer's chunks under budget.max_rollout_tokens
            hi = lo + kv_rows
            with torch.no_grad():
                r = sample(forced_logits(model, length[lo:hi], eos), prompts[lo:hi], max_new_tokens=a.max_new,
                           temperature=1.0, eos_token_id=eos, pad_token_id=0, seeds=seeds[lo:hi])
            assert r.lengths.tolist() == length[lo:hi]

    def paged(model, prompts=prompts, length=length, seeds=seeds):
        r = sample_paged(model, prompts, max_new_tokens=length, temperature=1.0, eos_token_id=-1, pad_token_id=0,
                         seeds=seeds, config=paged_config)
        assert r.lengths.tolist() == length

    where = f"{a.device}, {a.dtype}, {a.threads} thread{'s' * (a.threads != 1)}"
    shape = a.config or f"hidden {a.hidden}, {a.layers} layers"
    print(f"{a.rows} rows, prompts 16..48 tokens, responses {min(length)}..{max(length)} (median "
          f"{statistics.median(length):.0f}, sum {tokens:,}, longest {max(length)}); {shape}; {where}")
    chunks = [length[lo:lo + kv_rows] for lo in range(0, a.rows, kv_rows)]
    steps = sum(len(c) * max(c) for c in chunks)
    print(f"KV budget: {kv_rows} rows at the longest prompt + {a.max_new} = {budget:,} tokens. Paged cache: "
          f"{paged_config.max_cache_tokens:,} tokens, pages of {paged_config.page_size}; padded: {len(chunks)} chunks "
          f"of {kv_rows} rows, {steps:,} row-steps for {tokens:,} tokens")
    cfg = next(iter(models.values())).config
    per_token = cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * getattr(
        cfg, "head_dim", cfg.hidden_size // cfg.num_attention_heads) * dtype.itemsize
    grid = kv_rows * (max(len(q) for q in prompts) + max(length))
    forward = max(a.rows, 256)  # the paged engine's tokens per forward (PagedConfig.max_batch_tokens)
    print(f"KV: padded {grid:,} tokens = {grid * per_token / 2**20:,.1f} MiB at the end (rebuilt by a cat each "
          f"step); paged {paged_config.max_cache_tokens:,} tokens = "
          f"{paged_config.max_cache_tokens * per_token / 2**20:,.1f} MiB from the start, and its attention mask "
          f"{forward * (paged_config.max_cache_tokens + forward) * dtype.itemsize / 2**20:,.1f} MiB")
    for model in models.values():  # warm-up: first-call costs of either path
        padded(model, prompts[:2], [2, 3], seeds[:2])  # (one chunk)
        paged(model, prompts[:2], [2, 3], seeds[:2])
    print(f"{'vocab':>8} {'rep':>4} {'sampler':>8} {'seconds':>9} {'tokens/s':>10} {'peak MiB':>9}")
    results: dict[tuple[int, str], list[float]] = {}
    for rep in range(a.reps):
        for vocab in vocabs:
            order = (("padded", padded), ("paged", paged))
            for name, fn in order if rep % 2 == 0 else order[::-1]:
                mib, seconds = measure(lambda fn=fn: fn(models[vocab]))
                results.setdefault((vocab, name), []).append(tokens / seconds)
                print(f"{vocab:>8,} {rep:>4} {name:>8} {seconds:>9.2f} {tokens / seconds:>10,.0f} {mib:>9,.0f}",
                      flush=True)
    for vocab in vocabs:
        ratios = [pg / pd for pg, pd in zip(results[(vocab, "paged")], results[(vocab, "padded")])]
        print(f"vocab {vocab:,}: padded {statistics.median(results[(vocab, 'padded')]):,.0f} tokens/s, paged "
              f"{statistics.median(results[(vocab, 'paged')]):,.0f} tokens/s; paged/padded per repetition "
              + ", ".join(f"{r:.2f}" for r in ratios))
    top = max(vocabs)
    ratios = [pg / pd for pg, pd in zip(results[(top, "paged")], results[(top, "padded")])]
    print(f"ratio: {statistics.median(ratios):.2f}")


def real_model(a) -> None:
    """`--model`: each engine behind the `Sampler` protocol on one real model, its own EOS, tokens/s per call."""
    import os

    if a.vllm:  # vLLM binds its OpenMP threads (and the process's torch threads) to these cores
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{a.threads - 1}" if a.threads > 1 else "0")
    import torch

    from merge_distill.engines import PagedSampler, TransformersSampler
    from merge_distill.errors import UserError
    from merge_distill.models import gguf_folder, load_model, load_tokenizer
    from merge_distill.sampling import eos_token_ids, row_seeds

    torch.set_num_threads(a.threads)
    folder = gguf_folder(a.model) if a.model.endswith(".gguf") else Path(a.model)
    model = load_model(folder, dtype=getattr(torch, a.dtype)).to(a.device).eval()
    tokenizer = load_tokenizer(folder)
    texts = [f"Question {i}: what is {7 * i + 3} plus {11 * i + 5}? Explain your answer." for i in range(a.rows)]
    prompts = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    seeds = row_seeds(a.seed, a.rows)
    kw = dict(max_new_tokens=a.max_new, temperature=1.0, eos_token_id=eos_token_ids(tokenizer, model),
              pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)
    engines = {"padded": TransformersSampler(model)}
    try:
        engines["paged"] = PagedSampler(model)
    except UserError as e:  # transformers before 5.24 (the vLLM environment's 5.19)
        print(f"no paged column: {e}")
    if a.vllm:
        from merge_distill.backends.vllm import VLLMSampler

        engines["vllm"] = VLLMSampler(str(folder), model, max_model_len=max(map(len, prompts)) + a.max_new,
                                      device=a.device, dtype=a.dtype, seed=a.seed)
    print(f"{a.model}: {a.rows} prompts of {min(map(len, prompts))}..{max(map(len, prompts))} tokens, up to "
          f"{a.max_new} new at T=1; {a.device}, {a.dtype}, {torch.get_num_threads()} torch threads")

    def call(sampler, rows=a.rows):
        with torch.no_grad():
            t0 = time.perf_counter()
            r = sampler.sample(prompts[:rows], seeds=seeds[:rows], **kw)
            return int(r.lengths.sum()), time.perf_counter() - t0

    for sampler in engines.values():  # warm-up: first-call costs of each engine
        call(sampler, 2)
    print(f"{'rep':>4} {'sampler':>8} {'tokens':>7} {'seconds':>9} {'tokens/s':>10}")
    results: dict[str, list[float]] = {}
    for rep in range(a.reps):
        names = list(engines) if rep % 2 == 0 else list(engines)[::-1]
        for name in names:
            tokens, seconds = call(engines[name])
            results.setdefault(name, []).append(tokens / seconds)
            print(f"{rep:>4} {name:>8} {tokens:>7} {seconds:>9.2f} {tokens / seconds:>10,.1f}", flush=True)
    print("tokens/s (median): " + ", ".join(f"{n} {statistics.median(v):,.1f}" for n, v in results.items()))
    print("ratio over padded: " + ", ".join(
        f"{n} {statistics.median([x / p for x, p in zip(v, results['padded'])]):.2f}" for n, v in results.items()
        if n != "padded"))


if __name__ == "__main__":
    main()
