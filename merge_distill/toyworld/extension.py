"""The toy world as an extension (`merge_distill.extensions`): what it adds to recipes and to the command line.

Registered through the `merge_distill.extensions` entry point ``toyworld`` (pyproject.toml):

* the recipe section ``zoo:`` (`ZooSection`: preset, seed, dir), parsed into a `Zoo`; each expert's eval suite
  defaults to ``zoo-<name>``;
* the path scheme ``zoo:NAME`` (``zoo:math_expert``, ``zoo:data/math_train.jsonl``): the member's path in the
  recipe's zoo folder;
* the suite source ``zoo-<domain>``: ``<zoo dir>/data/<domain>_test.jsonl`` of the zoo the last parsed ``zoo:``
  section named (a recipe's, or `merge-distill eval --zoo/--zoo-dir`): one process works with one zoo;
* the builder: the zoo members a loaded recipe's paths point at (those written ``zoo:NAME``), built on first
  use by the edge, rank 0 first;
* the ``merge-distill zoo`` commands (`merge_distill.toyworld.cli`).

Nothing under `merge_distill` outside this package imports it: the core sees the names registered here.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from merge_distill.errors import UserError
from merge_distill.extensions import PathScheme, Registry, Section, SuiteSource
from merge_distill.toyworld.zoo import Zoo

SECTION = "zoo"
SUITE_PREFIX = "zoo-"


class ZooSection(BaseModel):
    """A recipe's `zoo:` section: which zoo its `zoo:` paths and `zoo-*` suites mean."""

    model_config = ConfigDict(extra="forbid")

    preset: str = "default"
    seed: int = 0
    dir: str | None = Field(None, description="default: $MERGE_DISTILL_CACHE/zoo/<preset>-seed<seed>")


# What the parsed sections named, for the builder and the suite source (one process, one zoo for its suites).
_members: dict[str, tuple[Zoo, str]] = {}  # a resolved path -> (its zoo, the member it is in)
_suite_zoo: list[Zoo] = []  # the zoo of the last parsed section


def parse_section(raw) -> Zoo:
    """The zoo a `zoo:` section names (a one-line error naming its key when it is malformed); its suites become
    the `zoo-*` suites."""
    try:
        section = ZooSection.model_validate(raw)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(["zoo", *map(str, err["loc"])])
        problem = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
        raise UserError(f"{loc}: {problem}" + (f" (got {err.get('input')!r})" if err["type"] != "extra_forbidden"
                                               and err["loc"] else "")) from None
    zoo = Zoo(section.preset, section.seed, section.dir)
    _suite_zoo[:] = [zoo]
    return zoo


def resolve_path(zoo: Zoo, name: str) -> str:
    """`zoo:NAME` -> the member's path in the zoo folder (recorded, so that the builder knows what to build)."""
    path = str(zoo.path(name))
    _members[path] = (zoo, name)
    return path


def default_eval_suite(zoo: Zoo, expert: str) -> str:
    return f"{SUITE_PREFIX}{expert}"


def zoo_suite(domain: str, zoo_dir: str | Path | None):
    """The toy zoo's held-out tasks for ``domain``: ``<zoo_dir>/data/<domain>_test.jsonl``.

    Records already carry task_id, prompt, domain and grader; the suite's grader is theirs.
    """
    from merge_distill.evaluation.formats import normalize_records
    from merge_distill.evaluation.suites import Suite, default_metric
    from merge_distill.io import read_records

    name = f"{SUITE_PREFIX}{domain}"
    if zoo_dir is None:
        raise UserError(f"suite '{name}' needs a zoo directory (give the zoo dir)")
    path = Path(zoo_dir) / "data" / f"{domain}_test.jsonl"
    if not path.is_file():
        raise UserError(f"suite '{name}': {path} not found (is '{zoo_dir}' a zoo dir with a '{domain}' domain?)")
    records, _ = normalize_records(read_records(path, what=f"suite '{name}' data"), "prompt", name, str(path))
    graders = Counter(r.get("grader") for r in records)
    if len(graders) != 1 or None in graders:
        raise UserError(f"{path}: every record needs the same 'grader' (found {sorted(map(str, graders))})")
    grader = next(iter(graders))
    return Suite(name, domain, grader, records, metric=default_metric(grader), source=str(path))


def load_zoo_suite(domain: str):
    """`zoo-<domain>` of the zoo the last parsed `zoo:` section named."""
    return zoo_suite(domain, _suite_zoo[0].dir if _suite_zoo else None)


def suite_grader(domain: str) -> str:
    """A zoo suite is graded by its domain's grader (what `load_zoo_suite` finds in its records, before they exist)."""
    return domain


class ZooBuilder:
    """The zoo members a loaded recipe's `zoo:NAME` paths point at (in recipe order: student, then each expert's
    teacher, reference and prompts), by zoo."""

    @staticmethod
    def _needed(recipe) -> dict[Path, tuple[Zoo, list[str]]]:
        paths = [recipe.student.path] + [p for e in recipe.experts for p in (e.teacher, e.reference, e.prompts)]
        paths += [p for e in recipe.experts if not isinstance(e.teacher, (str, type(None)))
                  for p in (e.teacher.base, e.teacher.adapter)]
        out: dict[Path, tuple[Zoo, list[str]]] = {}
        for p in paths:
            if isinstance(p, str) and p in _members:
                zoo, member = _members[p]
                out.setdefault(zoo.dir, (zoo, []))[1].append(member)
        return out

    def unbuilt(self, recipe) -> str | None:
        lines = []
        for zoo, members in self._needed(recipe).values():
            pending = sorted({f"zoo:{m}" for m in members if not zoo.path(m.split("/")[0]).exists()})
            if pending:
                lines.append(f"zoo '{zoo.name}' (seed {zoo.seed}) at {zoo.dir}: not built yet ({', '.join(pending)}); "
                             "`merge-distill run` or `merge-distill zoo build` builds it")
        return "; ".join(lines) or None

    def graders(self, recipe) -> set[str]:
        return set().union(*(zoo.graders_to_build(members) for zoo, members in self._needed(recipe).values()))

    def build(self, recipe, *, progress=None, log=print) -> None:
        for zoo, members in self._needed(recipe).values():
            zoo.progress, zoo.log, zoo.isolation = progress, log, recipe.isolation
            for member in members:
                zoo.ensure([member])


def _zoo_commands():
    from merge_distill.toyworld.cli import zoo_app

    return zoo_app


def register(registry: Registry) -> None:
    """The `merge_distill.extensions` entry point."""
    registry.add_section(SECTION, Section(parse=parse_section, default_eval_suite=default_eval_suite))
    registry.add_path_scheme("zoo", PathScheme(section=SECTION, resolve=resolve_path))
    registry.add_suite_source(SUITE_PREFIX, SuiteSource(load=load_zoo_suite, grader=suite_grader,
                                                        placeholder="<domain>"))
    registry.add_builder("zoo", ZooBuilder())
    registry.add_commands("zoo", _zoo_commands)
