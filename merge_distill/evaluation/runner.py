"""Generate, grade and score: the one evaluation path that `eval` and `run` share.

Per (model, suite) the samples and verdicts go to `generations/<model>__<suite>.jsonl`, appended chunk
by chunk, so an interrupted evaluation resumes where it stopped and a finished one can be re-graded
without generating again. All models draw their samples with the same seeds (common random numbers),
which makes paired differences between models tighter. Under torchrun every rank samples and grades its share
of the problems, appending to a file of its own, and rank 0 writes the one file (`generate_and_grade`).
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

from merge_distill import distributed
from merge_distill.data import render_prompt
from merge_distill.errors import UserError
from merge_distill.evaluation.metrics import (
    ResultRow,
    paired_difference,
    per_problem_estimates,
    suite_score,
)
from merge_distill.evaluation.suites import Suite
from merge_distill.io import write_jsonl
from merge_distill.parallel import collectives


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
    sampled_by_rank: list[int] = field(default_factory=list)  # samples each rank drew (resumed ones not counted)
    isolation: str | None = None  # the sandbox level code suites were graded under; None when no suite ran code

    def paired(self, a: str, b: str, suite: str) -> tuple[float, float, int]:
        return paired_difference(self.per_problem[(a, suite)], self.per_problem[(b, suite)])


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.@-]+", "_", name)


def _seed(*parts) -> int:
    return int.from_bytes(hashlib.sha256("/".join(map(str, parts)).encode()).digest()[:6], "little")


SAMPLERS = ("transformers", "paged", "vllm")  # the engines evaluation can load a model folder into


def longest_request(tokenizer, suites: list[Suite], max_new_tokens: int) -> int:
    """The most prompt + response tokens one evaluation request on `suites` takes (sizes a vLLM engine)."""
    return max_new_tokens + max((len(render_prompt(tokenizer, s.render_prompt(r), s.system_prompt))
                                 for s in suites for r in s.records), default=0)


def generation_config(path: str):
    """The generation config of a model folder (None without one)."""
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(path)
    except OSError:
        return None


def _load(name: str, path: str, device: str = "cpu", sampler: str = "transformers", *, suites: list[Suite] = (),
          max_new_tokens: int = 0, engine_options: dict | None = None):
    """(Sampler, tokenizer) of a model folder, or of a closed-form spec (`merge_distill.closed_form`; it mixes
    several models per token, so it always samples through the padded `TransformersSampler`). A vLLM engine
    (`backends.vllm.VLLMSampler`, resident: no sleep) is sized for the longest request on `suites` and takes
    `engine_options` (the recipe's engine settings: dtype, gpu_memory_utilization, ...)."""
    from merge_distill import closed_form
    from merge_distill.engines import PagedSampler, TransformersSampler
    from merge_distill.models import load_model, load_tokenizer

    if closed_form.is_spec(path):
        source, tokenizer = closed_form.load(path, device=device)
        return TransformersSampler(source), tokenizer
    tokenizer = load_tokenizer(path, what=f"model '{name}'")
    if sampler == "vllm":
        from merge_distill.backends.vllm import VLLMSampler

        engine = VLLMSampler(path, None, max_model_len=longest_request(tokenizer, suites, max_new_tokens),
                             device=device, sleep_level=0, **(engine_options or {}))
        engine.generation_config = generation_config(path)  # its EOS ids (`sampling.eos_token_ids`)
        return engine, tokenizer
    model = load_model(path, what=f"model '{name}'").to(device)
    return (PagedSampler(model) if sampler == "paged" else TransformersSampler(model)), tokenizer


@dataclass
class Graded:
    """One model's samples on one suite, graded: `rows` for every (problem, sample) in problem order, and how many
    samples each rank drew in this call (`sampled_by_rank`; those found in the file from an earlier call are not
    counted)."""

    rows: list[dict]
    sampled_by_rank: list[int]


def evaluating_ranks() -> distributed.World:
    """The ranks that share an evaluation: all of them while the process group is up (a process left alone, e.g.
    after `distributed.shutdown`, evaluates everything)."""
    return distributed.world() if distributed.active() else distributed.SINGLE


def generations_path(out_dir: Path, spec_name: str, suite_name: str) -> Path:
    return out_dir / "generations" / f"{_safe(spec_name)}__{_safe(suite_name)}.jsonl"


def rank_part(path: Path, rank: int) -> Path:
    """The file one rank appends its share to while several ranks evaluate (`generate_and_grade`)."""
    return path.with_name(f"{path.stem}.rank-{rank}.jsonl")


def rank_parts(path: Path) -> list[Path]:
    """Every rank's file of `path` (from this evaluation or an interrupted one on any number of ranks)."""
    return sorted(path.parent.glob(f"{path.stem}.rank-*.jsonl"))


def read_generations(path: Path, *, repair: bool) -> dict[tuple[str, int], dict]:
    """The rows of a generations file by (task_id, sample); a last line cut by a kill is dropped (and, with
    `repair`, cut off the file, which its writer then appends to)."""
    if not path.exists():
        return {}
    text = path.read_text()
    if text and not text.endswith("\n"):
        text = text[: text.rfind("\n") + 1]
        if repair:
            path.write_text(text)
    rows = (json.loads(line) for line in text.splitlines())
    return {(row["task_id"], row["sample"]): row for row in rows}


def generate_and_grade(spec: ModelSpec, suite: Suite, *, samples: int, temperature: float, max_new_tokens: int,
                       seed: int, out_dir: Path, batch_size: int = 256, sampler=None, tokenizer=None,
                       grader=None, progress=None, load=None, isolation: str = "bubblewrap") -> Graded:
    """All (task, sample) generations for one model on one suite, graded; resumes from its JSONL file.

    Under torchrun every rank calls this with the same arguments: each samples and grades its contiguous share
    of the problems (`distributed.shard`) into a file of its own (`rank_part`), the rows are gathered
    (`parallel.collectives.gather`, over the group's CPU backend), and rank 0
    writes the whole file as one process would (problem order) and removes the ranks' files. Every rank
    returns every row. Each (problem, sample) has its own seed, so the split changes no sample.

    The responses come from `sampler` (any `merge_distill.engines.Sampler`: the same engines serve training
    and evaluation); without one, the model is loaded (by `load()`, else from `spec`) only if some
    generations are missing. Without a `grader`, the suite's is made, with `isolation` if it runs code."""
    path = generations_path(out_dir, spec.name, suite.name)
    path.parent.mkdir(parents=True, exist_ok=True)
    world = evaluating_ranks()
    own = path if world.size == 1 else rank_part(path, world.rank)
    parts = rank_parts(path)
    done = read_generations(path, repair=own == path)
    for part in parts:
        done.update(read_generations(part, repair=own == part))
    lo, hi = distributed.shard(len(suite.records), world.rank, world.size)
    todo = [(r, k) for r in suite.records[lo:hi] for k in range(samples) if (r["task_id"], k) not in done]
    if todo:
        if sampler is None:
            sampler, tokenizer = load() if load else _load(spec.name, spec.path_for(suite.name))
        _sample_and_grade(todo, suite, own, done, sampler=sampler, tokenizer=tokenizer, seed=seed,
                          grader=grader, isolation=isolation, batch_size=batch_size, progress=progress,
                          what=f"eval {spec.name} on {suite.name}", max_new_tokens=max_new_tokens,
                          temperature=temperature)
    shares = collectives.gather(([done[(r["task_id"], k)] for r in suite.records[lo:hi] for k in range(samples)],
                                 len(todo)))
    rows = [row for share, _ in shares for row in share]
    if world.main and (world.size > 1 or parts):  # the ranks' files become the one file
        write_jsonl(path, rows)
        for part in rank_parts(path):
            part.unlink()
    return Graded(rows, [n for _, n in shares])


def _sample_and_grade(todo: list[tuple[dict, int]], suite: Suite, path: Path, done: dict, *, sampler, tokenizer,
                      seed: int, grader, isolation: str, batch_size: int, progress, what: str, max_new_tokens: int,
                      temperature: float) -> None:
    """Sample and grade the (record, sample) pairs `todo`, in chunks of `batch_size`, appending each graded row
    to `path` and to `done`."""
    from merge_distill.graders import get_grader
    from merge_distill.sampling import eos_token_ids

    grader = grader or get_grader(suite.grader, isolation=isolation)
    task = progress.add_task(what, total=len(todo)) if progress else None
    prompt_cache: dict[str, list[int]] = {}
    # the sampled model's EOS ids, all of them (an engine without the module, vLLM's, has its folder's config)
    stops = eos_token_ids(tokenizer, getattr(sampler, "model", None) or sampler)

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
            # whatever the chunking, the split over ranks or an interrupted run's resume point
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
             sampler: str = "transformers", engine_options: dict | None = None) -> EvalResult:
    """Every model on every suite. Greedy (temperature 0) takes one sample per problem.
    A model is loaded (once, on `device`, into the `sampler` engine: transformers, paged, or vllm with
    `engine_options`) only if it has generations left to make.

    Under torchrun every rank calls this (before the process group is gone): each loads the models on its own
    device (`distributed.device_for`), samples and grades its share of every suite's problems with graders of
    its own, and every rank returns the whole result (`generate_and_grade`); rank 0 writes the files.

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
    out_dir, device = Path(out_dir), distributed.device_for(device)
    result = EvalResult(rows=[], isolation=sandbox_level([s.grader for s in suites], isolation),
                        sampled_by_rank=[0] * evaluating_ranks().size)
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
                        loaded[path] = _load(name, path, device, sampler, suites=suites,
                                             max_new_tokens=max_new_tokens, engine_options=engine_options)
                    return loaded[path]

                graded = generate_and_grade(spec, suite, samples=k, temperature=temp, max_new_tokens=max_new_tokens,
                                            seed=seed, out_dir=out_dir, batch_size=batch_size,
                                            grader=graders[suite.grader], progress=progress, load=load)
                n_generated += len(graded.rows)
                result.sampled_by_rank = [a + b for a, b in zip(result.sampled_by_rank, graded.sampled_by_rank)]
                rows, per_problem = score_rows(spec.name, suite, graded.rows, k, temp)
                result.rows += rows
                result.per_problem[(spec.name, suite.name)] = per_problem
    finally:
        for g in graders.values():
            getattr(g, "close", lambda: None)()
    result.samples_per_second = n_generated / max(1e-9, time.perf_counter() - t0)
    return result
