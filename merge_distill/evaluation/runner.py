"""Generate, grade and score: the one evaluation path that `eval` and `run` share.

Per (model, suite) the samples and verdicts go to `generations/<model>__<suite>.jsonl`, appended chunk
by chunk, so an interrupted evaluation resumes where it stopped and a finished one can be re-graded
without generating again. All models draw their samples with the same seeds (common random numbers),
which makes paired differences between models tighter.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from merge_distill.data import render_prompt
from merge_distill.errors import UserError
from merge_distill.evaluation.metrics import (
    ResultRow,
    paired_difference,
    per_problem_estimates,
    suite_score,
)
from merge_distill.evaluation.suites import Suite


@dataclass(frozen=True)
class ModelSpec:
    """A model to evaluate: a name for the tables, a model folder, and optionally its own temperature."""

    name: str
    path: str
    temperature: float | None = None
    suite_paths: dict[str, str] | None = None  # a different model per suite (e.g. each domain's closed form)
    only_suites: tuple[str, ...] | None = None  # evaluate on these suites only (default: all)

    def path_for(self, suite: str) -> str:
        return (self.suite_paths or {}).get(suite, self.path)


@dataclass
class EvalResult:
    rows: list[ResultRow]
    # (model, suite) -> task_id -> per-problem estimate, for paired differences
    per_problem: dict[tuple[str, str], dict[str, float]] = field(default_factory=dict)
    samples_per_second: float = 0.0
    isolation: str | None = None  # the sandbox level code suites were graded under; None when no suite ran code

    def paired(self, a: str, b: str, suite: str) -> tuple[float, float, int]:
        return paired_difference(self.per_problem[(a, suite)], self.per_problem[(b, suite)])


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.@-]+", "_", name)


def _seed(*parts) -> int:
    return int.from_bytes(hashlib.sha256("/".join(map(str, parts)).encode()).digest()[:6], "little")


SAMPLERS = ("transformers", "paged")  # the engines evaluation can load a model folder into


def _load(name: str, path: str, device: str = "cpu", sampler: str = "transformers"):
    """(Sampler, tokenizer) of a model folder, or of a closed-form spec (`merge_distill.closed_form`; it mixes
    several models per token, so it always samples through the padded `TransformersSampler`)."""
    from merge_distill import closed_form
    from merge_distill.engines import PagedSampler, TransformersSampler
    from merge_distill.models import load_model, load_tokenizer

    if closed_form.is_spec(path):
        source, tokenizer = closed_form.load(path, device=device)
        return TransformersSampler(source), tokenizer
    model = load_model(path, what=f"model '{name}'").to(device)
    engine = PagedSampler(model) if sampler == "paged" else TransformersSampler(model)
    return engine, load_tokenizer(path, what=f"model '{name}'")


def generate_and_grade(spec: ModelSpec, suite: Suite, *, samples: int, temperature: float, max_new_tokens: int,
                       seed: int, out_dir: Path, batch_size: int = 256, sampler=None, tokenizer=None,
                       grader=None, progress=None, load=None, isolation: str = "bubblewrap") -> list[dict]:
    """All (task, sample) generations for one model on one suite, graded; resumes from its JSONL file.

    The responses come from `sampler` (any `merge_distill.engines.Sampler`: the same engines serve training
    and evaluation); without one, the model is loaded (by `load()`, else from `spec`) only if some
    generations are missing. Without a `grader`, the suite's is made, with `isolation` if it runs code."""
    from merge_distill.graders import get_grader
    from merge_distill.sampling import eos_token_ids

    path = out_dir / "generations" / f"{_safe(spec.name)}__{_safe(suite.name)}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    done = {}
    if path.exists():
        text = path.read_text()
        if text and not text.endswith("\n"):  # a line cut by a kill: drop it, generate that sample again
            text = text[: text.rfind("\n") + 1]
            path.write_text(text)
        for line in text.splitlines():
            row = json.loads(line)
            done[(row["task_id"], row["sample"])] = row
    todo = [(r, k) for r in suite.records for k in range(samples) if (r["task_id"], k) not in done]
    if todo:
        if sampler is None:
            sampler, tokenizer = load() if load else _load(spec.name, spec.path_for(suite.name))
        grader = grader or get_grader(suite.grader, isolation=isolation)
        task = progress.add_task(f"eval {spec.name} on {suite.name}", total=len(todo)) if progress else None
        prompt_cache: dict[str, list[int]] = {}
        stops = eos_token_ids(tokenizer, getattr(sampler, "model", None))  # the sampled model's EOS ids, all of them

        def write(chunk, texts, lengths, truncated, verdicts):
            for (r, k), text, v, n, cut in zip(chunk, texts, verdicts.result(), lengths, truncated):
                row = {"task_id": r["task_id"], "sample": k, "completion": text, "verdict": v.verdict,
                       "score": v.score, "detail": v.detail, "n_tokens": int(n), "truncated": bool(cut)}
                done[(r["task_id"], k)] = row
                f.write(json.dumps(row) + "\n")
            f.flush()
            if progress:
                progress.update(task, advance=len(chunk))

        # grading of one chunk (sandboxed programs, math-verify processes) overlaps generation of the next
        with open(path, "a") as f, ThreadPoolExecutor(max_workers=1) as grading:
            pending = None
            for lo in range(0, len(todo), batch_size):
                chunk = todo[lo: lo + batch_size]
                ids = []
                for r, _ in chunk:
                    if r["task_id"] not in prompt_cache:
                        prompt_cache[r["task_id"]] = render_prompt(tokenizer, suite.render_prompt(r), suite.system_prompt)
                    ids.append(prompt_cache[r["task_id"]])
                # one seed per (problem, sample): every model draws with the same seeds (paired comparisons),
                # whatever the chunking or an interrupted run's resume point
                seeds = [_seed(seed, suite.name, r["task_id"], k) for r, k in chunk]
                ro = sampler.sample(ids, max_new_tokens=max_new_tokens, temperature=temperature,
                                    eos_token_id=stops, pad_token_id=tokenizer.pad_token_id, seeds=seeds)
                texts = tokenizer.batch_decode(ro.response_token_lists(), skip_special_tokens=True)
                verdicts = grading.submit(grader.grade_many, [r for r, _ in chunk], texts)
                if pending:
                    write(*pending)
                pending = (chunk, texts, ro.lengths.tolist(), ro.truncated.tolist(), verdicts)
            if pending:
                write(*pending)
    return [done[(r["task_id"], k)] for r in suite.records for k in range(samples)]


def score_rows(spec_name: str, suite: Suite, graded: list[dict], samples: int, temperature: float):
    """Result rows (whole suite, then each subset) and the per-problem estimates."""
    by_task: dict[str, list[float]] = defaultdict(list)
    for g in graded:
        by_task[g["task_id"]].append(float(g["score"]))
    ks = [samples] if suite.metric == "avg" else sorted({1, samples})
    rows, per_problem = [], {}
    for k in ks:
        groups = [(None, suite.records)] + [(s, [r for r in suite.records if r.get("subset") == s]) for s in suite.subsets()]
        for subset, records in groups:
            correct = [by_task[r["task_id"]] for r in records]
            sc = suite_score(correct, suite.metric, k)
            rows.append(ResultRow(model=spec_name, suite=suite.name, domain=suite.domain, metric=suite.metric, k=k,
                                  score=sc.score, stderr=sc.stderr, n_problems=sc.n_problems,
                                  n_samples=sc.n_samples, subset=subset, temperature=temperature))
            if subset is None and k == ks[0]:
                est = per_problem_estimates(correct, suite.metric, k)
                per_problem = {r["task_id"]: float(e) for r, e in zip(records, est)}
    return rows, per_problem


def evaluate(models: list[ModelSpec], suites: list[Suite], *, samples: int = 1, temperature: float = 1.0,
             max_new_tokens: int = 256, seed: int = 1234, out_dir: str | Path, batch_size: int = 256,
             progress=None, device: str = "cpu", isolation: str = "bubblewrap",
             sampler: str = "transformers") -> EvalResult:
    """Every model on every suite. Greedy (temperature 0) takes one sample per problem.
    A model is loaded (once, on `device`, into the `sampler` engine: transformers or paged) only if it has
    generations left to make.

    Suites whose grader runs code are graded in the sandbox at `isolation` ("bubblewrap", checked here
    before any model loads: ``IsolationUnavailable`` where it does not work; or the opt-out "rlimits")."""
    from merge_distill.graders import get_grader, sandbox_level

    if samples < 1:
        raise UserError("--samples must be at least 1")
    if sampler not in SAMPLERS:
        raise UserError(f"sampler '{sampler}': expected one of {', '.join(SAMPLERS)}")
    names = [m.name for m in models]
    if len(set(names)) != len(names):
        raise UserError(f"model names must be unique (got {', '.join(names)})")
    out_dir = Path(out_dir)
    result = EvalResult(rows=[], isolation=sandbox_level([s.grader for s in suites], isolation))
    n_generated, t0 = 0, time.perf_counter()

    graders = {}
    try:
        for spec in models:
            loaded: dict[str, tuple] = {}
            for suite in suites:
                if spec.only_suites is not None and suite.name not in spec.only_suites:
                    continue
                temp = temperature if spec.temperature is None else spec.temperature
                k = 1 if temp == 0 else samples
                if suite.grader not in graders:
                    graders[suite.grader] = get_grader(suite.grader, isolation=isolation)
                path = spec.path_for(suite.name)

                def load(path=path, loaded=loaded, name=spec.name):
                    if path not in loaded:
                        loaded.clear()  # one model in memory at a time
                        loaded[path] = _load(name, path, device, sampler)
                    return loaded[path]

                graded = generate_and_grade(spec, suite, samples=k, temperature=temp, max_new_tokens=max_new_tokens,
                                            seed=seed, out_dir=out_dir, batch_size=batch_size,
                                            grader=graders[suite.grader], progress=progress, load=load)
                n_generated += len(graded)
                rows, per_problem = score_rows(spec.name, suite, graded, k, temp)
                result.rows += rows
                result.per_problem[(spec.name, suite.name)] = per_problem
    finally:
        for g in graders.values():
            getattr(g, "close", lambda: None)()
    result.samples_per_second = n_generated / max(1e-9, time.perf_counter() - t0)
    return result
