"""File I/O: atomic writes (a kill mid-write never leaves a half-written result in place) and reading
record files (JSONL, JSON list, parquet) for training prompts and evaluation suites alike."""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

from merge_distill.errors import UserError


def cache_root() -> Path:
    """Where this project keeps what it builds or fetches once (the zoo, converted GGUF files, ...)."""
    return Path(os.environ.get("MERGE_DISTILL_CACHE", Path.home() / ".cache" / "merge-distill"))


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh temporary folder beside `path`; on success it replaces `path` in one rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
        _fsync_tree(tmp)
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.rename(path, old)
            os.rename(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _fsync_tree(root: Path) -> None:
    for p in root.rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write to a temporary file beside `path`, fsync, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Read a JSONL file (gzipped if it ends in .gz); a bad line is a UserError naming the file and line."""
    return _jsonl_objects(path, lambda i: f"{path}:{i}")


def _jsonl_objects(path: str | os.PathLike, where: Callable[[int], str]) -> list[dict]:
    """One JSON object per non-blank line; `where(line_number)` starts each error message."""
    rows = []
    opener = gzip.open if str(path).lower().endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{where(i)}: invalid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise UserError(f"{where(i)}: expected a JSON object per line")
            rows.append(row)
    return rows


# ----------------------------------------------------------------------------- record files

# One meaning per suffix, for training prompts and evaluation suites alike (matched case-insensitively):
RECORD_SUFFIXES: tuple[str, ...] = (
    ".jsonl",     # one JSON object per line (blank lines skipped)
    ".jsonl.gz",  # the same, gzipped
    ".json",      # one JSON list of objects
    ".parquet",   # one record per row (needs pyarrow)
)


def read_records(path: str | os.PathLike, *, what: str) -> list[dict]:
    """The records (dicts) in a data file, by suffix (see :data:`RECORD_SUFFIXES`).

    ``what`` names the field or role of the file in errors, which are one-line UserErrors of the form
    ``<what> '<path>': <problem>``: a missing file, an unknown suffix, invalid JSON (with its line),
    a record that is not an object, and a file with no records are all errors.
    """
    path = Path(path)
    where = f"{what} '{path}'"
    if not path.is_file():
        raise UserError(f"{where} does not exist")
    name = path.name.lower()
    try:
        if name.endswith((".jsonl", ".jsonl.gz")):
            rows = _jsonl_objects(path, lambda i: f"{where}: line {i}")
        elif name.endswith(".json"):
            rows = _json_list(path, where)
        elif name.endswith(".parquet"):
            rows = _parquet_rows(path, where)
        else:
            raise UserError(f"{where}: unsupported file type (expected {', '.join(RECORD_SUFFIXES)})")
    except (UnicodeDecodeError, EOFError, gzip.BadGzipFile) as e:
        raise UserError(f"{where}: cannot read it ({type(e).__name__}: {e})") from None
    if not rows:
        raise UserError(f"{where} is empty (no records)")
    return rows


_JSONL_HINT = " (for one object per line, name the file .jsonl)"


def _json_list(path: Path, where: str) -> list[dict]:
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        return []
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        hint = _JSONL_HINT if e.msg == "Extra data" else ""
        raise UserError(f"{where}: invalid JSON ({e.msg} at line {e.lineno}){hint}") from None
    if not isinstance(data, list):
        hint = _JSONL_HINT if isinstance(data, dict) else ""
        raise UserError(f"{where}: expected a JSON list of objects, got {_json_kind(data)}{hint}")
    for i, row in enumerate(data):
        if not isinstance(row, dict):
            raise UserError(f"{where}: record {i}: expected a JSON object, got {_json_kind(row)}")
    return data


def _json_kind(value: Any) -> str:
    kinds = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}
    return kinds.get(type(value), "a number")


def _parquet_rows(path: Path, where: str) -> list[dict]:
    try:
        import pyarrow.parquet as pq  # optional; comes with `datasets`
    except ImportError:
        raise UserError(f"{where}: reading parquet needs pyarrow (pip install pyarrow)") from None
    try:
        return pq.read_table(path).to_pylist()
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types for bad files
        raise UserError(f"{where}: cannot read parquet ({e})") from None


def write_jsonl(path: str | os.PathLike, rows: list[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))
