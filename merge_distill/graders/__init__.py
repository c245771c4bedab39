"""Graders: turn (task record, completion) pairs into verdicts.

Built-ins are "math" and "code", registered here in ``_BUILTINS`` (so a source tree needs no install).
Others come from the ``merge_distill.graders`` entry-point group (``name = "package.module:Factory"``),
the plugin mechanism, or from :func:`register_grader`. A grader is any object with a
``name`` and ``grade_many(records, completions) -> list[Verdict]`` (see :mod:`.base`); a grader class may
declare ``metric`` ("avg" or "pass"), the metric of suites it grades unless they say otherwise.
"""

from __future__ import annotations

import importlib
from importlib import metadata
from typing import Any, Callable, Iterable

from merge_distill.errors import UserError
from merge_distill.graders.base import VERDICTS, Grader, Verdict

ENTRY_POINT_GROUP = "merge_distill.graders"

_BUILTINS = {
    "math": "merge_distill.graders.math:MathGrader",
    "code": "merge_distill.graders.code:CodeGrader",
}
_REGISTERED: dict[str, Callable[..., Grader]] = {}


def register_grader(name: str, factory: Callable[..., Grader]) -> None:
    """Make `factory(**options)` available as get_grader(name, **options); replaces any earlier one."""
    if not name or not isinstance(name, str):
        raise ValueError("grader name must be a non-empty string")
    if not callable(factory):
        raise TypeError(f"grader factory for {name!r} is not callable")
    _REGISTERED[name] = factory


def _entry_points() -> dict[str, metadata.EntryPoint]:
    try:
        return {ep.name: ep for ep in metadata.entry_points(group=ENTRY_POINT_GROUP)}
    except Exception:  # a broken distribution must not break grading
        return {}


def available_graders() -> list[str]:
    """Every name get_grader accepts."""
    return sorted(set(_BUILTINS) | set(_entry_points()) | set(_REGISTERED))


def _load(target: str) -> Callable[..., Grader]:
    module, _, attr = target.partition(":")
    obj = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def _factory(name: str) -> Callable[..., Grader]:
    """The factory registered under `name`. Lookup order: registered, built-in, entry point."""
    if name in _REGISTERED:
        return _REGISTERED[name]
    if name in _BUILTINS:
        return _load(_BUILTINS[name])
    eps = _entry_points()
    if name not in eps:
        raise UserError(f"unknown grader {name!r}; known graders: {', '.join(available_graders())}")
    try:
        return eps[name].load()
    except Exception as exc:
        raise UserError(f"grader {name!r} ({eps[name].value}) failed to load: {exc}") from exc


def get_grader(name: str, *, isolation: str | None = None, **options: Any) -> Grader:
    """A new grader instance. Lookup order: registered, built-in, entry point.

    `isolation` ("bubblewrap" or "rlimits") goes to graders that run code (``runs_code``), and is dropped for
    the others; without it such a grader uses its own default (bubblewrap for the built-in code grader)."""
    factory = _factory(name)
    if isolation is not None and getattr(factory, "runs_code", False):
        options["isolation"] = isolation
    try:
        return factory(**options)
    except TypeError as exc:
        raise UserError(f"grader {name!r}: bad options {sorted(options)}: {exc}") from exc


def grader_metric(name: str) -> str:
    """The metric a grader declares (its factory's ``metric`` attribute, e.g. "pass" for code), read from
    the factory without making a grader; "avg" where it declares none, or where `name` is unknown or fails
    to load (get_grader reports that when grading starts)."""
    try:
        factory = _factory(name)
    except UserError:
        return "avg"
    return getattr(factory, "metric", "avg")


def grader_runs_code(name: str) -> bool:
    """Whether the grader runs model-written code (its factory's ``runs_code``), read from the factory without
    making a grader; False where `name` is unknown or fails to load (get_grader reports that)."""
    try:
        factory = _factory(name)
    except UserError:
        return False
    return bool(getattr(factory, "runs_code", False))


def sandbox_level(names: Iterable[str], isolation: str) -> str | None:
    """The isolation level model-written code will run under when any of the graders `names` runs code, else
    None (no code runs). Checked now, before anything runs: bubblewrap missing or failing its self-test raises
    ``IsolationUnavailable``, one line saying how to install it and how to opt out."""
    if not any(grader_runs_code(n) for n in set(names)):
        return None
    from merge_distill.sandbox import require_isolation

    return require_isolation(isolation)


__all__ = ["VERDICTS", "Grader", "Verdict", "available_graders", "get_grader", "grader_metric", "grader_runs_code",
           "register_grader", "sandbox_level"]
