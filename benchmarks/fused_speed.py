"""The student-update projection alone: `fused.token_logprobs` against plain autograd, time and peak memory.

    python benchmarks/fused_speed.py                      # workload L's shapes: 2048 tokens, hidden 256, vocab 151,936
    python benchmarks/fused_speed.py --device cuda --tokens 16384 --hidden 1024

Forward + backward of sum(w_i * log p(y_i | h_i)) through a `[vocab, hidden]` projection, and the no-grad forward
(a frozen scorer). Peak memory is what the call adds: `torch.cuda.max_memory_allocated` on CUDA, the process's
high-water RSS (reset before the call) on CPU.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

from _workloads import peak_rss_added  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--vocab", type=int, default=151_936)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--chunk-rows", type=int, default=None, help="default: fused.chunk_rows_for(vocab)")
    a = p.parse_args()

    import torch

    from merge_distill.fused import chunk_rows_for, token_logprobs

    torch.set_num_threads(a.threads)
    dev = torch.device(a.device)
    cuda = dev.type == "cuda"
    g = torch.Generator().manual_seed(0)
    h = torch.randn(a.tokens, a.hidden, generator=g).to(dev).requires_grad_()
    w = (torch.randn(a.vocab, a.hidden, generator=g) * 0.02).to(dev).requires_grad_()
    y = torch.randint(0, a.vocab, (a.tokens,), generator=g).to(dev)
    weights = torch.randn(a.tokens, generator=g).to(dev)
    rows = a.chunk_rows or chunk_rows_for(a.vocab, device=dev)

    def plain():
        return torch.nn.functional.linear(h, w).float().log_softmax(-1).gather(-1, y[:, None]).squeeze(-1)

    def fused():
        return token_logprobs(h, w, None, y, chunk_rows=rows)

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def measure(fn):
        h.grad = w.grad = None
        if not cuda:
            return peak_rss_added(fn)[::-1]
        sync()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        t0 = time.perf_counter()
        fn()
        sync()
        return time.perf_counter() - t0, (torch.cuda.max_memory_allocated() - base) / 2**20

    runs = {
        "plain fwd+bwd": lambda: (plain() * weights).sum().backward(),
        "fused fwd+bwd": lambda: (fused() * weights).sum().backward(),
        "plain no_grad": lambda: torch.no_grad()(plain)(),
        "fused no_grad": lambda: torch.no_grad()(fused)(),
    }
    print(f"{a.tokens} tokens x hidden {a.hidden} x vocab {a.vocab:,} on {a.device} "
          f"({torch.cuda.get_device_name() if cuda else f'{a.threads} threads'}); chunk rows "
          f"{rows}; logits would be {a.tokens * a.vocab * 4 / 2**20:,.0f} MiB")
    with torch.no_grad():
        torch.testing.assert_close(fused(), plain(), rtol=1e-5, atol=1e-5)
    results = {k: [] for k in runs}
    for _ in range(a.reps + 1):  # first round is a warm-up
        for k, fn in runs.items():
            results[k].append(measure(fn))
    for k, rs in results.items():
        rs = rs[1:]
        print(f"{k:<16} {statistics.median(r[0] for r in rs) * 1000:>9.1f} ms   peak +{max(r[1] for r in rs):>8.0f} MiB")


if __name__ == "__main__":
    main()
