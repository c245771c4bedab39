"""Extensions: worlds outside the core (the CPU toy world is one) that add names to recipes and commands.

An extension is a function ``register(registry)`` named in the ``merge_distill.extensions`` entry-point group
(``name = "package.module:register"``, as graders are in ``merge_distill.graders``). The entry points are
loaded once, lazily, the first time anything below is asked for; a name registered twice is refused. What an
extension may register, and where the core uses it:

* a **section** -- a top-level recipe key the schema does not know (e.g. ``zoo:``), with ``parse`` turning its
  raw value into the extension's own object (validated by its own model; a one-line ``UserError`` naming
  ``zoo.preset`` etc.) and ``default_eval_suite`` naming an expert's held-out suite when the recipe gives none;
* a **path scheme** -- ``SCHEME:NAME`` in a recipe's model and prompt paths (e.g. ``zoo:math_expert``), turned
  into a plain path by the object its section parsed;
* a **suite source** -- suite names with a prefix (e.g. ``zoo-math``), loaded by the extension;
* a **builder** -- what the edge (``merge-distill run``, ``sweep``, ``validate``, ``plan``) asks before anything
  runs: which inputs of a loaded recipe are not built yet, which graders building them would run, and to build
  them (rank 0, once);
* **commands** -- a Typer app mounted under a name of the ``merge-distill`` command line (e.g. ``zoo``).

Resolution happens in the loader, on the raw YAML data (`resolve_recipe_data`): the sections are parsed and
removed, scheme paths become plain paths and default suites are named; nothing is built. A loaded recipe is an
ordinary recipe of plain paths, so training, evaluation and validation never see an extension. Building what
such a recipe names is the edge's job (`build`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import metadata
from typing import Any, Callable, Protocol

from merge_distill.errors import UserError

ENTRY_POINT_GROUP = "merge_distill.extensions"


@dataclass(frozen=True)
class Section:
    """A top-level recipe section owned by an extension."""

    parse: Callable[[Any], Any]  # the section's raw YAML value -> the extension's object (UserError when bad)
    default_eval_suite: Callable[[Any, str], str | None] = lambda parsed, expert: None


@dataclass(frozen=True)
class PathScheme:
    """`SCHEME:NAME` paths, resolved by the object the recipe's `section` parsed into: `resolve(parsed, NAME)`."""

    section: str
    resolve: Callable[[Any, str], str]


@dataclass(frozen=True)
class SuiteSource:
    """Suites named `<prefix><rest>`: `load(rest)` is the suite; `grader(rest)` the grader it will be graded by,
    answered before its data exists (None: unknown); `placeholder` shows what `rest` is in error messages."""

    load: Callable[[str], Any]
    grader: Callable[[str], str | None] = lambda rest: None
    placeholder: str = "<name>"


class Builder(Protocol):
    """Builds what a loaded recipe's paths point at (e.g. the zoo members it names)."""

    def unbuilt(self, recipe) -> str | None:
        """A line naming what the recipe needs that is not built yet, or None."""

    def graders(self, recipe) -> set[str]:
        """The graders building it would run (checked for isolation before anything is built)."""

    def build(self, recipe, *, progress=None, log=print) -> None:
        """Build what the recipe needs and is not built yet."""


@dataclass
class Registry:
    """Everything the loaded extensions registered, by name."""

    sections: dict[str, Section] = field(default_factory=dict)
    path_schemes: dict[str, PathScheme] = field(default_factory=dict)
    suite_sources: dict[str, SuiteSource] = field(default_factory=dict)
    builders: dict[str, Builder] = field(default_factory=dict)
    commands: dict[str, Callable[[], Any]] = field(default_factory=dict)

    def _add(self, table: dict, kind: str, name: str, value) -> None:
        if not name or not isinstance(name, str):
            raise ValueError(f"{kind} name must be a non-empty string")
        if name in table:
            raise ValueError(f"{kind} {name!r} is already registered")
        table[name] = value

    def add_section(self, name: str, section: Section) -> None:
        self._add(self.sections, "recipe section", name, section)

    def add_path_scheme(self, scheme: str, path_scheme: PathScheme) -> None:
        self._add(self.path_schemes, "path scheme", scheme, path_scheme)

    def add_suite_source(self, prefix: str, source: SuiteSource) -> None:
        if any(prefix.startswith(p) or p.startswith(prefix) for p in self.suite_sources):
            raise ValueError(f"suite source {prefix!r} overlaps one already registered "
                             f"({', '.join(self.suite_sources)})")
        self._add(self.suite_sources, "suite source", prefix, source)

    def add_builder(self, name: str, builder: Builder) -> None:
        self._add(self.builders, "builder", name, builder)

    def add_commands(self, name: str, make_app: Callable[[], Any]) -> None:
        """`make_app()` returns the Typer app mounted as `merge-distill NAME` (called when the CLI starts)."""
        self._add(self.commands, "command", name, make_app)


_REGISTRY: Registry | None = None


def registry() -> Registry:
    """The registry, filled by every `merge_distill.extensions` entry point on first use."""
    global _REGISTRY
    if _REGISTRY is None:
        loaded = Registry()
        for ep in _entry_points():
            try:
                register = ep.load()
            except Exception as exc:
                raise UserError(f"extension {ep.name!r} ({ep.value}) failed to load: {exc}") from exc
            register(loaded)
        _REGISTRY = loaded
    return _REGISTRY


def _entry_points() -> list[metadata.EntryPoint]:
    """One entry point per name (an editable install can list its distribution twice)."""
    try:
        found = metadata.entry_points(group=ENTRY_POINT_GROUP)
    except Exception:  # a broken distribution must not break loading recipes
        return []
    return list({ep.name: ep for ep in found}.values())


# ------------------------------------------------------------------------------ recipes, at load time


_PATH_FIELDS = ("teacher", "reference", "prompts")


def resolve_recipe_data(data: dict, source: str) -> dict:
    """Raw recipe data with the registered sections parsed and removed, `SCHEME:NAME` paths (student, each
    expert's teacher, reference and prompts, and the paths of a {path, lora} student or {base, adapter} teacher) made plain and each expert without an `eval_suite` given its
    section's default. Builds nothing. A scheme path whose section is missing is a one-line error."""
    reg = registry()
    parsed = {}
    for name in [n for n in data if n in reg.sections]:
        raw = data.pop(name)
        if raw is not None:  # `zoo: null` (e.g. from --set) is no section
            parsed[name] = parse_section(name, raw, source=source)

    def plain(value):
        if isinstance(value, dict):  # a student {path, lora} or an adapter model {base, adapter}
            return {k: plain(v) if k in ("path", "base", "adapter") else v for k, v in value.items()}
        if not isinstance(value, str) or ":" not in value:
            return value
        scheme, rest = value.split(":", 1)
        if scheme not in reg.path_schemes:
            return value
        owner = reg.path_schemes[scheme]
        if owner.section not in parsed:
            raise UserError(f"{source}: paths start with '{scheme}:' but the recipe has no {owner.section}: section")
        return owner.resolve(parsed[owner.section], rest)

    if "student" in data:
        data["student"] = plain(data["student"])
    for expert in data.get("experts") or []:
        if not isinstance(expert, dict):
            continue
        for key in _PATH_FIELDS:
            if key in expert:
                expert[key] = plain(expert[key])
        if expert.get("eval_suite") is None and isinstance(expert.get("name"), str):
            suite = next((s for name, p in parsed.items()
                          if (s := reg.sections[name].default_eval_suite(p, expert["name"]))), None)
            if suite:
                expert["eval_suite"] = suite
    return data


def parse_section(name: str, raw, *, source: str):
    """One registered section parsed on its own (e.g. `merge-distill eval --zoo` names the zoo of `zoo-*` suites as a
    recipe's `zoo:` section does); a one-line error where no extension registered `name`."""
    section = registry().sections.get(name)
    if section is None:
        raise UserError(f"{source}: no extension registered the recipe section '{name}'")
    try:
        return section.parse(raw)
    except UserError as e:
        raise UserError(f"{source}: {e}") from None


# ------------------------------------------------------------------------------ suites


def suite_source(name: str) -> tuple[SuiteSource, str] | None:
    """The registered source of a suite name and the rest of the name after its prefix, or None."""
    for prefix, source in registry().suite_sources.items():
        if name.startswith(prefix):
            return source, name[len(prefix):]
    return None


# ------------------------------------------------------------------------------ the edge


def unbuilt(recipe) -> str | None:
    """A line naming what a loaded recipe needs that no builder has built yet, or None."""
    lines = [line for b in registry().builders.values() if (line := b.unbuilt(recipe))]
    return "; ".join(lines) or None


def graders_to_build(recipe) -> set[str]:
    """The graders that building what the recipe needs would run."""
    return set().union(*(b.graders(recipe) for b in registry().builders.values()))


def build(recipe, *, progress=None, log=print):
    """Build what the recipe needs (every builder's share); returns the recipe (for `sweep`'s `resolve`)."""
    for b in registry().builders.values():
        b.build(recipe, progress=progress, log=log)
    return recipe


def mount_commands(app) -> None:
    """Mount every extension's commands on the Typer `app` (`merge-distill zoo ...`)."""
    for name, make_app in registry().commands.items():
        app.add_typer(make_app(), name=name)
