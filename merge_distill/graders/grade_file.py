"""Grade a JSONL file of completions; resumable.

Input: one JSON object per line, a task record plus ``completion`` and optionally ``domain``: the
name of the grader for that line, any registered one (``available_graders()``: math, code, a plugin's).
When ``domain`` is absent it is inferred: ``answer`` -> math, ``test``/``test_list`` -> code.

Output: one line per graded input line, in input order:
``{"line", "task_id", "domain", "verdict", "score", "detail"}``, plus ``"isolation"`` (the sandbox's
level, bubblewrap or rlimits) on lines whose grader ran the completion as code. ``line`` is the 1-based input
line number; together with ``task_id`` it identifies a graded sample (a task id repeats when
several samples of one task are graded). On a rerun, lines already in the output are kept and
skipped, and a torn last line (a kill mid-write) is dropped. Lines are graded in chunks and each
verdict is appended and flushed as soon as its chunk is graded, so an interruption loses at most
the chunk in flight.
"""

from __future__ import annotations

import json
import os
from collections import Counter, defaultdict
from pathlib import Path

from merge_distill.errors import UserError
from merge_distill.graders import available_graders, get_grader, grader_runs_code, sandbox_level
from merge_distill.graders.base import VERDICTS, Grader, short


def infer_domain(record: dict) -> str | None:
    """The record's ``domain`` (a grader name) if it has one, else guessed from its fields (None if neither)."""
    domain = record.get("domain")
    if domain is not None:
        return domain
    if "answer" in record:
        return "math"
    if "test" in record or "test_list" in record:
        return "code"
    return None


def _read_done(out_path: Path) -> dict[tuple[int, str], dict]:
    """Verdict lines already written, keyed by (line, task_id); trims a torn final line."""
    done: dict[tuple[int, str], dict] = {}
    if not out_path.exists():
        return done
    data = out_path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data):  # the last write was cut short: drop it, it will be graded again
        with open(out_path, "r+b") as f:
            f.truncate(end)
        data = data[:end]
    for n, raw in enumerate(data.decode("utf-8").splitlines(), 1):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw)
            done[(int(row["line"]), str(row.get("task_id")))] = row
        except (ValueError, KeyError, TypeError) as exc:
            raise UserError(f"{out_path}:{n}: not a verdict line from grade_file ({exc}); "
                            f"move the file away or pick another --out") from exc
    return done


def _read_input(in_path: Path) -> list[tuple[int, dict, str]]:
    """(line number, record, domain) per non-blank line; UserError at the first bad line."""
    items = []
    graders = None  # the registered grader names, looked up once
    try:
        text = in_path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{in_path}: no such file") from None
    except UnicodeDecodeError as exc:
        raise UserError(f"{in_path}: not UTF-8 text ({exc})") from None
    for n, raw in enumerate(text.splitlines(), 1):
        if not raw.strip():
            continue
        where = f"{in_path}:{n}"
        try:
            record = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise UserError(f"{where}: invalid JSON ({exc.msg} at column {exc.colno})") from None
        if not isinstance(record, dict):
            raise UserError(f"{where}: expected a JSON object, got {type(record).__name__}")
        if not isinstance(record.get("completion"), str):
            raise UserError(f"{where}: missing 'completion' (a string)")
        domain = infer_domain(record)
        if not domain:
            raise UserError(f"{where}: cannot tell the domain: add 'domain' (a grader name), or 'answer' (math) / "
                            f"'test' or 'test_list' (code)")
        if graders is None:
            graders = set(available_graders())
        if not isinstance(domain, str) or domain not in graders:
            raise UserError(f"{where}: unknown domain {domain!r} (registered graders: {', '.join(sorted(graders))})")
        items.append((n, record, domain))
    return items


def grade_file(in_path, out_path, *, timeout_s: float | None = None, workers: int | None = None,
               chunk_size: int = 64, isolation: str = "bubblewrap") -> dict:
    """Grade every line of `in_path` into `out_path` (see module docstring); return a summary.

    `isolation` is the sandbox level for lines graded by running code: bubblewrap (the default; nothing is
    graded, and ``IsolationUnavailable`` is raised, when it does not work here) or rlimits (the user's opt-out).

    The summary: ``{"in_path", "out_path", "total", "graded", "resumed", "isolation",
    "domains": {domain: {"n", "pass", "pass_rate", "verdicts": {verdict: count}}}}`` over all lines
    of the output, resumed ones included; ``isolation`` names the levels the code lines ran under
    (None when no line is code).
    """
    in_path, out_path = Path(in_path), Path(out_path)
    items = _read_input(in_path)
    done = _read_done(out_path)
    todo = [(n, rec, dom) for n, rec, dom in items if (n, str(rec.get("task_id"))) not in done]

    graders: dict[str, Grader] = {}
    options = {k: v for k, v in (("timeout_s", timeout_s), ("workers", workers)) if v is not None}
    try:
        for n, record, domain in todo:  # validate everything before spending time on grading
            if not isinstance(domain, str) or domain not in graders:
                graders[domain] = get_grader(domain, isolation=isolation, **options)
            try:
                check = getattr(graders[domain], "check_record", None)
                if check is not None:
                    check(record)
            except UserError as exc:
                raise UserError(f"{in_path}:{n}: {exc}") from None
        level = sandbox_level(graders, isolation)  # before any line is graded
        out_path.parent.mkdir(parents=True, exist_ok=True)
        with open(out_path, "a", encoding="utf-8") as out:
            for start in range(0, len(todo), max(1, chunk_size)):
                chunk = todo[start: start + chunk_size]
                rows = _grade_chunk(chunk, graders, level)
                for row in rows:
                    out.write(json.dumps(row, ensure_ascii=False) + "\n")
                    done[(row["line"], str(row["task_id"]))] = row
                out.flush()
                os.fsync(out.fileno())
    finally:
        for grader in graders.values():
            close = getattr(grader, "close", None)
            if close is not None:
                close()

    wanted = {(n, str(rec.get("task_id"))) for n, rec, _ in items}
    rows = [row for key, row in done.items() if key in wanted]
    summary = summarize(rows)
    summary.update(in_path=str(in_path), out_path=str(out_path), graded=len(todo),
                   resumed=len(rows) - len(todo))
    return summary


def _grade_chunk(chunk, graders, level: str | None) -> list[dict]:
    by_domain: dict[str, list[int]] = defaultdict(list)
    for i, (_, _, domain) in enumerate(chunk):
        by_domain[domain].append(i)
    verdicts = [None] * len(chunk)
    for domain, idx in by_domain.items():
        got = graders[domain].grade_many([chunk[i][1] for i in idx], [chunk[i][1]["completion"] for i in idx])
        for i, v in zip(idx, got):
            verdicts[i] = v
    rows = []
    for (n, record, domain), v in zip(chunk, verdicts):
        row = {"line": n, "task_id": record.get("task_id"), "domain": domain, "verdict": v.verdict,
               "score": v.score, "detail": short(v.detail)}
        if getattr(graders[domain], "runs_code", False):
            row["isolation"] = level
        rows.append(row)
    return rows


def summarize(rows: list[dict]) -> dict:
    """Per-domain counts of verdict rows, and the isolation levels code rows ran under ("unrecorded" for lines
    written before verdicts recorded it)."""
    per: dict[str, Counter] = defaultdict(Counter)
    levels = set()
    for row in rows:
        per[row.get("domain", "?")][row["verdict"]] += 1
        if row.get("isolation"):
            levels.add(row["isolation"])
        elif grader_runs_code(str(row.get("domain"))):
            levels.add("unrecorded")
    domains = {}
    for domain in sorted(per):
        counts = per[domain]
        n = sum(counts.values())
        domains[domain] = {
            "n": n,
            "pass": counts["pass"],
            "pass_rate": counts["pass"] / n if n else 0.0,
            "verdicts": {v: counts[v] for v in VERDICTS if counts[v]},
        }
    return {"total": len(rows), "domains": domains, "isolation": ", ".join(sorted(levels)) or None}


def summary_table(summary: dict):
    """A rich Table of a grade_file summary: one row per domain, one column per verdict seen."""
    from rich.table import Table

    seen = [v for v in VERDICTS if any(v in d["verdicts"] for d in summary["domains"].values())]
    title = f"Verdicts: {summary.get('out_path', '')}".rstrip(": ")
    table = Table(title=title)
    table.add_column("domain")
    table.add_column("n", justify="right")
    table.add_column("pass rate", justify="right")
    for v in seen:
        table.add_column(v, justify="right")
    for domain, d in summary["domains"].items():
        table.add_row(domain, str(d["n"]), f"{100 * d['pass_rate']:.1f}%",
                      *[str(d["verdicts"].get(v, 0)) for v in seen])
    if len(summary["domains"]) > 1:
        total = Counter()
        for d in summary["domains"].values():
            total.update(d["verdicts"])
        n = summary["total"]
        table.add_row("all", str(n), f"{100 * total['pass'] / n:.1f}%" if n else "-",
                      *[str(total.get(v, 0)) for v in seen], style="bold")
    if summary.get("resumed"):
        table.caption = f"{summary['resumed']} line(s) kept from an earlier run, {summary.get('graded', 0)} graded now"
    return table
