"""One record reader (merge_distill.io.read_records) for training prompts and eval suites: one meaning per
suffix, and one-line errors naming the field and the file."""

import gzip
import json
import re
from pathlib import Path

import pytest

from merge_distill.data import load_records
from merge_distill.errors import UserError
from merge_distill.evaluation.suites import load_suite
from merge_distill.io import RECORD_SUFFIXES, read_records

RECORDS = [
    {"task_id": f"t/{i}", "prompt": f"{i}+1=", "answer": str(i + 1), "domain": "math", "grader": "math"}
    for i in range(3)
]
TRAIN = "experts.0.prompts (math)"


def write(path: Path, records=RECORDS) -> Path:
    name = path.name.lower()
    if name.endswith(".parquet"):
        pa = pytest.importorskip("pyarrow")
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(records), path)
    elif name.endswith(".json"):
        path.write_text(json.dumps(records))
    else:
        text = "".join(json.dumps(r) + "\n" for r in records)
        path.write_bytes(gzip.compress(text.encode()) if name.endswith(".gz") else text.encode())
    return path


@pytest.mark.parametrize("suffix", RECORD_SUFFIXES)
def test_training_prompts_and_suites_read_a_file_the_same_way(tmp_path, suffix):
    path = write(tmp_path / f"math{suffix}")
    assert load_records(path, what=TRAIN) == RECORDS
    assert load_records(str(path), what=TRAIN) == RECORDS
    assert load_suite(path).records == RECORDS  # task_id and prompt present: normalising changes nothing


def test_json_is_a_list_for_both(tmp_path):
    """A .json file of JSON lines (what training prompts used to accept) is an error for both, with the fix."""
    path = tmp_path / "math.json"
    path.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    messages = []
    for read in (lambda: load_records(path, what=TRAIN), lambda: load_suite(path)):
        with pytest.raises(UserError, match=r"math\.json': invalid JSON \(Extra data at line 2\)") as err:
            read()
        messages.append(str(err.value))
    assert all("name the file .jsonl" in m and "\n" not in m for m in messages)
    assert messages[0].startswith(f"{TRAIN} '{path}': ")
    assert messages[1].startswith(f"data file '{path}': ")


def test_suffix_is_case_insensitive(tmp_path):
    assert load_records(write(tmp_path / "MATH.JSON"), what=TRAIN) == RECORDS


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("p.jsonl", "", r"'.*p\.jsonl' is empty \(no records\)"),
        ("p.jsonl", "\n\n", r"is empty \(no records\)"),
        ("p.json", "", r"'.*p\.json' is empty \(no records\)"),
        ("p.json", "[]", r"is empty \(no records\)"),
        ("p.jsonl", '{"prompt": "a"}\n[1, 2]\n', r"p\.jsonl': line 2: expected a JSON object per line"),
        ("p.jsonl", '{"prompt": "a"}\n{oops\n', r"p\.jsonl': line 2: invalid JSON"),
        ("p.json", '[{"prompt": "a"}, "b"]', r"p\.json': record 1: expected a JSON object, got a string"),
        ("p.json", '{"prompt": "a"}', r"p\.json': expected a JSON list of objects, got an object .*\.jsonl"),
        ("p.json", '"prompts"', r"p\.json': expected a JSON list of objects, got a string$"),
        ("p.json", "[{", r"p\.json': invalid JSON"),
        ("p.jsonl.gz", "not gzip", r"p\.jsonl\.gz': cannot read it \(BadGzipFile"),
        ("p.csv", "prompt\na\n", r"p\.csv': unsupported file type \(expected \.jsonl, \.jsonl\.gz, \.json, \.parquet\)"),
    ],
)
def test_bad_files_are_one_line_errors_naming_field_and_file(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(UserError, match=message) as err:
        read_records(path, what=TRAIN)
    assert str(err.value).startswith(f"{TRAIN} '{path}'") and "\n" not in str(err.value)
    with pytest.raises(UserError, match=message):
        load_records(path, what=TRAIN)


def test_missing_file(tmp_path):
    with pytest.raises(UserError, match=rf"^{re.escape(TRAIN)} '.*nope\.jsonl' does not exist$"):
        load_records(tmp_path / "nope.jsonl", what=TRAIN)
    with pytest.raises(UserError, match=r"^data file '.*nope\.jsonl' does not exist$"):
        load_suite(tmp_path / "nope.jsonl")


def test_bad_parquet(tmp_path):
    pytest.importorskip("pyarrow")
    path = tmp_path / "p.parquet"
    path.write_bytes(b"not parquet")
    with pytest.raises(UserError, match=r"p\.parquet': cannot read parquet"):
        read_records(path, what=TRAIN)
