"""Peak memory of exact-token scoring as vocabulary and response length grow: ours stays flat past one chunk.

    python benchmarks/scoring_memory.py                 # vocab 4k/32k/152k x length 128/512/2048, batch 4
    python benchmarks/scoring_memory.py --plain-limit-gb 1

For each (vocab, length) a tiny Qwen3-config model (hidden 64, 1 layer) scores `batch` random responses after a
16-token prompt, four ways:

- `ours no_grad`: `merge_distill.scoring.response_logprobs` under `torch.no_grad()` (a frozen teacher or
  reference scoring a batch);
- `plain no_grad`: the model's own logits at the response positions, `log_softmax`, `gather`;
- `ours grad` / `plain grad`: the same with gradients, plus `backward()` (the student's update).

The number is the peak resident memory added by the call (MiB): the process's high-water mark is reset
(`/proc/self/clear_refs`) just before, so it is this call's peak over what was already resident (model,
inputs). Plain variants whose logits alone would pass `--plain-limit-gb` are skipped ("-").
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

from _workloads import peak_rss_added  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocab", default="4096,32768,151936")
    p.add_argument("--length", default="128,512,2048")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--plain-limit-gb", type=float, default=1.5, help="skip plain variants with bigger logits")
    a = p.parse_args()

    import torch

    from merge_distill.fused import chunk_rows_for
    from merge_distill.toyworld.models import tiny_qwen3
    from merge_distill.sampling import Rollouts, positions
    from merge_distill.scoring import response_logprobs

    torch.set_num_threads(a.threads)

    def plain(model, ro: Rollouts):
        ids = torch.cat([ro.prompt_ids, ro.response_ids], 1)
        mask = torch.cat([ro.prompt_mask, ro.response_mask.long()], 1)
        L = ro.response_ids.shape[1]
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions(mask), logits_to_keep=L + 1).logits
        return logits[:, :-1].float().log_softmax(-1).gather(-1, ro.response_ids[..., None]).squeeze(-1)

    print(f"batch {a.batch}, prompt 16 tokens, hidden 64, 1 layer, {a.threads} threads; "
          f"peak MiB added by the call (seconds)")
    header = ["vocab", "length", "logits MiB", "chunk rows", "ours no_grad", "plain no_grad", "ours grad",
              "plain grad"]
    print(" | ".join(f"{h:>14}" for h in header))
    for vocab in map(int, a.vocab.split(",")):
        model = tiny_qwen3(vocab, hidden=64, layers=1, heads=2, seed=0, max_positions=4096)
        for length in map(int, a.length.split(",")):
            g = torch.Generator().manual_seed(0)
            ro = Rollouts(prompt_ids=torch.randint(0, vocab, (a.batch, 16), generator=g),
                          prompt_mask=torch.ones(a.batch, 16, dtype=torch.long),
                          response_ids=torch.randint(0, vocab, (a.batch, length), generator=g),
                          response_mask=torch.ones(a.batch, length, dtype=torch.bool),
                          sampler_logprobs=torch.zeros(a.batch, length), truncated=torch.ones(a.batch, dtype=torch.bool))
            logits_mib = a.batch * length * vocab * 4 / 2**20
            too_big = logits_mib > a.plain_limit_gb * 1024
            cells = [f"{vocab:,}", f"{length:,}", f"{logits_mib:,.0f}", f"{chunk_rows_for(vocab):,}"]

            def no_grad(f, model=model, ro=ro):
                with torch.no_grad():
                    f(model, ro)

            def with_grad(f, model=model, ro=ro):
                model.zero_grad(set_to_none=True)
                f(model, ro).sum().backward()

            for run, f in ((no_grad, response_logprobs), (no_grad, plain), (with_grad, response_logprobs),
                           (with_grad, plain)):
                if f is plain and too_big:
                    cells.append("-")
                    continue
                run(f)  # warm-up (allocator, gradients' buffers)
                mib, sec = peak_rss_added(lambda: run(f))
                cells.append(f"{mib:,.0f} ({sec:.2f}s)")
            print(" | ".join(f"{c:>14}" for c in cells), flush=True)
        del model


if __name__ == "__main__":
    main()
