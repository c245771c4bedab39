"""Reporting of evaluation results: a rich table, results.json/.md/.png, paired differences.

Layout everywhere: one row per suite (and per subset of a suite), one column per model,
cells ``score ± stderr`` in percent, the best score of each row in bold.
"""

from __future__ import annotations

import dataclasses
import io
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.table import Table
from rich.text import Text

from merge_distill.evaluation.metrics import (
    Metric,
    ResultRow,
    paired_difference,
    per_problem_estimates,
)
from merge_distill.io import atomic_write_bytes

RowLike = ResultRow | Mapping[str, Any]
RowKey = tuple[str, str | None, str, int]  # suite, subset, metric, k
MISSING = "—"


# --------------------------------------------------------------------------- layout


def _as_rows(rows: Sequence[RowLike]) -> list[ResultRow]:
    return [r if isinstance(r, ResultRow) else ResultRow.from_dict(r) for r in rows]


def _layout(rows: list[ResultRow]) -> tuple[list[str], list[RowKey], dict[tuple[RowKey, str], ResultRow]]:
    """Models (columns) and row keys in first-appearance order, subsets after their suite."""
    models: list[str] = []
    suites: list[str] = []
    keys: list[RowKey] = []
    cells: dict[tuple[RowKey, str], ResultRow] = {}
    for row in rows:
        key = (row.suite, row.subset, row.metric, row.k)
        if row.model not in models:
            models.append(row.model)
        if row.suite not in suites:
            suites.append(row.suite)
        if key not in keys:
            keys.append(key)
        cells[(key, row.model)] = row
    seen = {key: i for i, key in enumerate(keys)}
    keys.sort(key=lambda k: (suites.index(k[0]), k[1] is not None, seen[k]))
    return models, keys, cells


def row_label(key: RowKey) -> str:
    suite, subset, _, _ = key
    return suite if subset is None else f"{suite} / {subset}"


def format_cell(row: ResultRow) -> str:
    """``score ± stderr`` in percent, e.g. ``80.4 ± 1.2``."""
    return f"{100 * row.score:.1f} ± {100 * row.stderr:.1f}"


def _best_models(key: RowKey, models: list[str], cells: Mapping[tuple[RowKey, str], ResultRow]) -> set[str]:
    """Models with the best score in a row, compared at the displayed precision (ties all win)."""
    shown = {m: round(100 * cells[(key, m)].score, 1) for m in models if (key, m) in cells}
    if len(shown) < 2:
        return set()
    best = max(shown.values())
    return {m for m, v in shown.items() if v == best}


def _sizes(key: RowKey, models: list[str], cells: Mapping[tuple[RowKey, str], ResultRow]) -> str:
    sizes = sorted({(cells[(key, m)].n_problems, cells[(key, m)].n_samples) for m in models if (key, m) in cells})
    return " / ".join(f"{p}×{s}" for p, s in sizes)


def caption(rows: Sequence[RowLike]) -> str:
    """Which numbers the table shows, and each suite's problems × samples per problem."""
    models, keys, cells = _layout(_as_rows(rows))
    sizes = [f"{row_label(k)} {_sizes(k, models, cells)}" for k in keys if k[1] is None]
    return "score ± stderr (%, over problems); problems × samples: " + ", ".join(sizes)


def rich_table(rows: Sequence[RowLike], title: str | None = "Evaluation results") -> Table:
    """Models as columns, suites (and subsets) as rows; the best of each row in bold."""
    models, keys, cells = _layout(_as_rows(rows))
    table = Table(title=title, caption=caption(rows) if keys else None)
    table.add_column("suite")
    table.add_column("metric")
    for model in models:
        table.add_column(model, justify="right")
    for key in keys:
        best = _best_models(key, models, cells)
        row_cells: list[Text | str] = [row_label(key) if key[1] is None else f"  {key[1]}", f"{key[2]}@{key[3]}"]
        for model in models:
            row = cells.get((key, model))
            row_cells.append(MISSING if row is None else Text(format_cell(row), style="bold" if model in best else ""))
        table.add_row(*row_cells)
    return table


def markdown_table(rows: Sequence[RowLike]) -> str:
    """The same layout as :func:`rich_table` as a markdown table (best in ``**bold**``)."""
    models, keys, cells = _layout(_as_rows(rows))
    lines = [
        "| " + " | ".join(["suite", "metric", *models]) + " |",
        "|" + "---|---|" + "---:|" * len(models),
    ]
    for key in keys:
        best = _best_models(key, models, cells)
        out = [row_label(key), f"{key[2]}@{key[3]}"]
        for model in models:
            row = cells.get((key, model))
            text = MISSING if row is None else format_cell(row)
            out.append(f"**{text}**" if model in best else text)
        lines.append("| " + " | ".join(out) + " |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- paired differences


@dataclass
class PairedDifference:
    """Mean per-problem difference ``a - b`` on one suite, with its standard error (fractions)."""

    suite: str
    a: str
    b: str
    metric: str
    k: int | None
    diff: float
    stderr: float
    n_problems: int

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def format(self) -> str:
        """E.g. ``champ avg@4: student - base = +2.3 ± 1.1 points (paired over 270 problems)``."""
        label = self.metric if self.k is None else f"{self.metric}@{self.k}"
        return (
            f"{self.suite} {label}: {self.a} - {self.b} = {100 * self.diff:+.1f} ± {100 * self.stderr:.1f} points "
            f"(paired over {self.n_problems} problems)"
        )


def paired_rows(
    per_problem: Mapping[str, Mapping[str, Mapping[str, Sequence[float] | float]]],
    pairs: Sequence[tuple[str, str]],
    metrics: Mapping[str, tuple[Metric, int | None]] | None = None,
) -> list[PairedDifference]:
    """Paired differences for each (a, b) model pair on every suite both were scored on.

    ``per_problem[model][suite][task_id]`` is that problem's per-sample correctness list
    (reduced with the suite's metric from ``metrics[suite] = (metric, k)``, default avg
    over all samples) or an already-computed per-problem estimate (a float).
    """
    metrics = metrics or {}
    out = []
    for a, b in pairs:
        for model in (a, b):
            if model not in per_problem:
                raise ValueError(f"no per-problem results for model '{model}'")
        for suite in [s for s in per_problem[a] if s in per_problem[b]]:
            metric, k = metrics.get(suite, ("avg", None))
            try:
                diff, stderr, n = paired_difference(
                    _estimates(per_problem[a][suite], metric, k), _estimates(per_problem[b][suite], metric, k)
                )
            except ValueError as e:
                raise ValueError(f"suite '{suite}', {a} vs {b}: {e}") from None
            out.append(PairedDifference(suite, a, b, metric, k, diff, stderr, n))
    return out


def pairwise_differences(
    rows: Sequence[RowLike],
    per_problem: Mapping[tuple[str, str], Mapping[str, Sequence[float] | float]],
    models: Sequence[str],
    suites: Sequence[str],
) -> list[PairedDifference]:
    """`merge-distill eval`'s comparison: each model minus each model after it (in the order given), on every
    suite both were scored on, paired per problem. Each suite is reduced with the metric of its first row (its
    headline: avg, or pass for pass suites) over all samples. ``per_problem[(model, suite)][task_id]`` is as
    `EvalResult.per_problem` holds it."""
    pairs = [(a, b) for i, a in enumerate(models) for b in models[i + 1:]]
    if not pairs:
        return []
    nested: dict[str, dict[str, Mapping[str, Sequence[float] | float]]] = {}
    for (model, suite), values in per_problem.items():
        nested.setdefault(model, {})[suite] = values
    scored = _as_rows(rows)
    metrics = {s: (next(r.metric for r in scored if r.suite == s), None) for s in suites}
    return paired_rows(nested, pairs, metrics)


def _estimates(values: Mapping[str, Sequence[float] | float], metric: Metric, k: int | None) -> dict[str, float]:
    ids = list(values)
    lists = [values[i] for i in ids]
    if all(isinstance(v, (int, float)) for v in lists):
        return {i: float(v) for i, v in zip(ids, lists)}
    return dict(zip(ids, per_problem_estimates(lists, metric, k)))  # type: ignore[arg-type]


# --------------------------------------------------------------------------- files


def _jsonable(obj: Any) -> Any:
    if hasattr(obj, "to_dict"):
        return obj.to_dict()
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item"):  # numpy scalars
        return obj.item()
    raise TypeError(f"cannot write {type(obj).__name__} to results.json")


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` beside ``path``, then rename it into place."""
    atomic_write_bytes(path, data)


def results_markdown(rows: Sequence[RowLike], extra: Mapping[str, Any] | None = None) -> str:
    """results.md: the table, its caption (and, under it, ``sandbox_isolation``: the isolation code results
    ran under), paired differences and any other scalar extras."""
    extra = dict(extra or {})
    parts = ["# Evaluation results", "", markdown_table(rows), "", f"_{caption(rows)}_"]
    isolation = extra.pop("sandbox_isolation", None)
    if isolation:
        from merge_distill.sandbox import isolation_note

        parts += ["", f"_{isolation_note(isolation)}_"]
    paired = extra.pop("paired_differences", None)
    if paired:
        parts += ["", "## Paired differences", ""]
        for d in paired:
            d = d if isinstance(d, PairedDifference) else PairedDifference(**d)
            parts.append(f"- {d.format()}")
    scalars = {k: v for k, v in extra.items() if isinstance(v, (str, int, float, bool)) or v is None}
    if scalars:
        parts += ["", "## Run", ""] + [f"- {k}: {v}" for k, v in scalars.items()]
    return "\n".join(parts) + "\n"


def bar_chart_png(rows: Sequence[RowLike]) -> bytes:
    """One panel per suite, a group of bars per row (subset, metric), one bar per model that has that row
    (so a greedy-only row is not padded with empty slots), a colour per model throughout, error bars = stderr;
    PNG bytes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    models, keys, cells = _layout(_as_rows(rows))
    colours = {m: f"C{i % 10}" for i, m in enumerate(models)}
    suites = list(dict.fromkeys(k[0] for k in keys))
    bars = {suite: sum(1 + sum((k, m) in cells for m in models) for k in keys if k[0] == suite) for suite in suites}
    fig = Figure(figsize=(min(22.0, max(6.0, 0.32 * max(bars.values()) + 1.5)), 0.6 + 3.2 * len(suites)))
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(suites), 1, squeeze=False)[:, 0]
    for ax, suite in zip(axes, suites):
        x, ticks, labels = 0.0, [], []
        for key in (k for k in keys if k[0] == suite):
            present = [m for m in models if (key, m) in cells]
            for j, model in enumerate(present):
                row = cells[(key, model)]
                ax.bar(x + j, 100 * row.score, 0.9, yerr=100 * row.stderr, capsize=2, color=colours[model])
            ticks.append(x + (len(present) - 1) / 2)
            labels.append(f"{key[1] or 'all'}\n{key[2]}@{key[3]}")
            x += len(present) + 1
        ax.set_xticks(ticks)
        ax.set_xticklabels(labels, fontsize="small")
        ax.set_title(suite, fontsize="medium", loc="left")
        ax.set_ylabel("score (%)")
        ax.set_ylim(0, 100)
        ax.grid(axis="y", alpha=0.3)
    handles = [Patch(color=colours[m], label=m) for m in models]
    fig.legend(handles=handles, loc="upper center", ncol=min(len(models), 6), frameon=False, fontsize="small")
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.45 / fig.get_figheight()))
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    return buf.getvalue()


def write_results(
    rows: Sequence[RowLike], out_dir: str | Path, extra: Mapping[str, Any] | None = None, stem: str = "results"
) -> dict[str, Path]:
    """Write ``results.json`` (``{"rows": [...], **extra}``), ``results.md`` and ``results.png``.

    ``stem`` renames the three files (``run`` writes ``report.json``, ``report.md``, ``report.png``).

    ``extra`` holds run-level information such as ``paired_differences`` (a list of
    :class:`PairedDifference` or their dicts) or an isolation level. Each file is written
    atomically. Returns the paths by kind (``json``, ``md``, ``png``).
    """
    result_rows = _as_rows(rows)
    if not result_rows:
        raise ValueError("no result rows to write")
    extra = dict(extra or {})
    if "rows" in extra:
        raise ValueError("'rows' is reserved in results.json; rename that extra key")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {kind: out / f"{stem}.{kind}" for kind in ("json", "md", "png")}
    payload = {"rows": [r.to_dict() for r in result_rows], **extra}
    atomic_write(paths["json"], (json.dumps(payload, indent=2, default=_jsonable) + "\n").encode())
    atomic_write(paths["md"], results_markdown(result_rows, extra).encode())
    atomic_write(paths["png"], bar_chart_png(result_rows))
    return paths
