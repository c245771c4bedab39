"""Experiment trackers (`report_to:`), each run for real and offline: what each library wrote is read back with
that library's own reader and must equal metrics.jsonl and report.json."""

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

TRACKERS = ["tensorboard", "wandb", "trackio", "mlflow"]


def offline_env(tmp_path: Path) -> dict:
    """Every tracker offline and writing under `tmp_path` only (wandb's settings and cache, trackio's store)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "TRACKIO_", "MLFLOW_"))}
    env.update(WANDB_MODE="offline", WANDB_SILENT="true", WANDB_CONFIG_DIR=str(tmp_path / "wandb-config"),
               WANDB_CACHE_DIR=str(tmp_path / "wandb-cache"), WANDB_DATA_DIR=str(tmp_path / "wandb-data"),
               TRACKIO_DIR=str(tmp_path / "trackio"), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    return env


# ------------------------------------------------------------------------------ each library's own reader

def tensorboard_values(run_dir: Path, tag: str) -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.util import tensor_util

    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"tensors": 0, "images": 0})
    events.Reload()
    return {e.step: float(tensor_util.make_ndarray(e.tensor_proto)) for e in events.Tensors(tag)}


def wandb_records(run_dir: Path):
    """The protobuf `Record`s of the offline run's `.wandb` file (wandb's own message types; the file is framed
    as a LevelDB log: 32 KiB blocks of chunks, each `crc32 | length (2 bytes) | type (1 byte)`)."""
    from wandb.proto import wandb_internal_pb2

    (path,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    raw, pos, pending = path.read_bytes(), 7, b""  # a 7-byte file header: ':W&B', a key, the version
    assert raw[:4] == b":W&B"
    while pos + 7 <= len(raw):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a chunk header is padding
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", raw[pos:pos + 7])
        data, pos = raw[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):  # full, last
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending + data if kind == 4 else data)
            pending = b""
            yield record
        elif kind in (2, 3):  # first, middle
            pending += data


def wandb_history(run_dir: Path) -> list[dict]:
    return [{item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item}
            for r in wandb_records(run_dir) if r.WhichOneof("record_type") == "history"]


def trackio_read(run_dir: Path, what: str) -> list[dict] | dict:
    """`SQLiteStorage.get_logs` or `get_run_config` of the run, from the store the run wrote to (`TRACKIO_DIR`
    was `offline_env`'s there; here trackio may have read another when first imported)."""
    from trackio import sqlite_storage

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sqlite_storage, "TRACKIO_DIR", run_dir.parent / "trackio")
        return getattr(sqlite_storage.SQLiteStorage, what)("merge-distill", run_dir.name)


def trackio_logs(run_dir: Path) -> list[dict]:
    return trackio_read(run_dir, "get_logs")


def mlflow_client_and_run(run_dir: Path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("merge-distill").experiment_id])
    return client, run


# ------------------------------------------------------------------------------------------------- tests

@pytest.fixture(scope="module")
def tracked_run(tiny_world, tmp_path_factory, write_recipe) -> Path:
    """`merge-distill run` (a real process, as a user runs it) with all four trackers, 2 steps, a periodic
    evaluation after step 1 and a small final one with baselines (so report.json has rows and paired
    differences)."""
    for module in ("torch.utils.tensorboard", "wandb", "trackio", "mlflow", "sqlalchemy", "alembic"):
        pytest.importorskip(module, reason="pip install 'merge-distill[trackers]'")
    tmp = tmp_path_factory.mktemp("tracked")
    run_dir = tmp / "run"
    path = write_recipe(tmp / "r.yaml", tiny_world, run_dir, steps=2, prompts_per_step=8, max_new_tokens=8,
                        eval_every=1, report_to=TRACKERS)
    recipe = yaml.safe_load(path.read_text())
    recipe["eval"] = {"suites": [str(tiny_world / "math_test.jsonl")], "max_problems": 4, "max_new_tokens": 8}
    path.write_text(yaml.safe_dump(recipe))
    proc = subprocess.run([sys.executable, "-m", "merge_distill", "run", str(path), "--isolation", "rlimits"],
                          env=offline_env(tmp), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


def logged_by_each(run_dir: Path, key: str) -> dict[str, dict[int, float]]:
    """{tracker: {step: value}} of metric `key`, as each library reads back what it wrote."""
    client, run = mlflow_client_and_run(run_dir)
    return {"tensorboard": tensorboard_values(run_dir, key),
            "wandb": {h["_step"]: h[key] for h in wandb_history(run_dir) if key in h},
            "trackio": {r["step"]: r[key] for r in trackio_logs(run_dir) if key in r},
            "mlflow": {m.step: m.value for m in client.get_metric_history(run.info.run_id, key)}}


@pytest.mark.slow
def test_each_tracker_holds_metrics_jsonl_step_by_step(tracked_run):
    """`math/reward` and `code/reverse_kl_teacher` at steps 1 and 2 and the periodic evaluation's score, read back
    from what each library wrote, equal metrics.jsonl's exactly (TensorBoard's in double precision)."""
    lines = [json.loads(line) for line in (tracked_run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2] and "eval/math_test" not in lines[1]  # evaluated after step 1
    for key in ("math/reward", "code/reverse_kl_teacher", "eval/math_test"):
        want = {m["step"]: m[key] for m in lines if key in m}
        assert key == "eval/math_test" or len(set(want.values())) == 2, "steps 1 and 2 must be told apart"
        assert logged_by_each(tracked_run, key) == {t: want for t in TRACKERS}


@pytest.mark.slow
def test_each_tracker_holds_the_recipe(tracked_run):
    """The recipe as the run's config: optim.lr (3e-3 in the test recipe) and report_to itself."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.util import tensor_util

    events = EventAccumulator(str(tracked_run / "tensorboard"), size_guidance={"tensors": 0})
    events.Reload()
    text = tensor_util.make_ndarray(events.Tensors("recipe/text_summary")[0].tensor_proto).item().decode()
    assert json.loads(text.strip("`\n"))["optim"]["lr"] == 3e-3
    wandb_config = {u.key: json.loads(u.value_json) for r in wandb_records(tracked_run)  # init's config: the run
                    for u in (r.run.config.update if r.WhichOneof("record_type") == "run" else [])}  # record's
    assert wandb_config["optim"]["lr"] == 3e-3 and wandb_config["report_to"] == TRACKERS
    trackio_config = trackio_read(tracked_run, "get_run_config")
    assert trackio_config["optim"]["lr"] == 3e-3 and trackio_config["report_to"] == TRACKERS
    _, run = mlflow_client_and_run(tracked_run)
    assert float(run.data.params["optim.lr"]) == 3e-3 and run.data.params["report_to"] == str(TRACKERS)


@pytest.mark.slow
def test_each_tracker_holds_the_evaluation_tables_and_figures(tracked_run):
    """report.json's rows and paired differences, row for row, as each library's table, and report.png and
    training_curves.png as its images, all at the last training step (2)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.util import tensor_util

    from merge_distill.tracking import markdown_table

    report = json.loads((tracked_run / "report.json").read_text())
    tables = {"eval/results": report["rows"], "eval/paired_differences": report["paired_differences"]}
    assert len({r["model"] for r in report["rows"]}) == 4 and tables["eval/paired_differences"]  # base, 2 teachers,
    figures = {"report", "training_curves"}                                                       # the student

    events = EventAccumulator(str(tracked_run / "tensorboard"), size_guidance={"tensors": 0, "images": 0})
    events.Reload()
    assert {name: [(i.step, i.height) for i in events.Images(name)] for name in figures} == {
        "report": [(2, 456)], "training_curves": [(2, 352)]}  # the figures' heights in pixels
    for name, rows in tables.items():
        (text,) = events.Tensors(f"{name}/text_summary")
        assert text.step == 2 and tensor_util.make_ndarray(text.tensor_proto).item().decode() == markdown_table(rows)

    history = wandb_history(tracked_run)
    for name, rows in tables.items():
        (logged,) = [h for h in history if f"{name}/_type" in h]
        assert logged["_step"] == 2 and logged[f"{name}/_type"] == "table-file"
        table = json.loads(next(tracked_run.glob(f"wandb/offline-run-*/files/{logged[f'{name}/path']}")).read_text())
        assert [dict(zip(table["columns"], row)) for row in table["data"]] == rows
    for name in figures:
        (logged,) = [h for h in history if f"{name}/_type" in h]
        assert logged["_step"] == 2 and logged[f"{name}/_type"] == "image-file"

    logs = trackio_logs(tracked_run)
    for name, rows in tables.items():
        (logged,) = [r for r in logs if name in r]
        assert logged["step"] == 2 and logged[name] == {"_type": "trackio.table", "_value": rows}
    for name in figures:
        (logged,) = [r for r in logs if name in r]
        assert logged["step"] == 2 and logged[name]["_type"] == "trackio.image"

    client, run = mlflow_client_and_run(tracked_run)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"recipe.json", "report.png", "training_curves.png", "eval"} <= artifacts
    for name, rows in tables.items():
        assert json.loads(Path(client.download_artifacts(run.info.run_id, f"{name}.json")).read_text()) == rows


def test_a_tracker_that_cannot_start_stops_the_run_unless_told(tiny_world, tmp_path, write_recipe, monkeypatch,
                                                                capsys):
    """wandb not importable: with tracker_required (the default) the run stops before training, one line naming
    the extra; with tracker_required false, one warning line and the run trains to its end."""
    from merge_distill.build import train_recipe
    from merge_distill.errors import UserError
    from merge_distill.validate import load_recipe

    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    required = load_recipe(write_recipe(tmp_path / "a.yaml", tiny_world, tmp_path / "a", steps=1,
                                        prompts_per_step=4, max_new_tokens=4, report_to=["wandb"]))
    with pytest.raises(UserError) as stopped:
        train_recipe(required)
    assert str(stopped.value) == ("report_to: wandb needs its package (wandb is missing): pip install "
                                  "'merge-distill[wandb]' (tracker_required: false trains without it)")
    assert not (tmp_path / "a" / "metrics.jsonl").exists()

    optional = load_recipe(write_recipe(tmp_path / "b.yaml", tiny_world, tmp_path / "b", steps=1, prompts_per_step=4,
                                        max_new_tokens=4, report_to=["wandb"], tracker_required=False))
    capsys.readouterr()
    final = train_recipe(optional)
    err = capsys.readouterr().err  # (transformers' progress bars aside)
    assert [line for line in err.splitlines() if "report_to" in line or "warning" in line.lower()] == [
        "warning: report_to: wandb needs its package (wandb is missing): pip install 'merge-distill[wandb]'; "
        "training without it (tracker_required: false)"]
    assert (final / "model.safetensors").exists()
    assert len((tmp_path / "b" / "metrics.jsonl").read_text().splitlines()) == 1


def test_only_rank_0_starts_trackers_and_every_rank_stops_with_it(tmp_path, monkeypatch):
    """Another rank starts none (nothing written), and when rank 0's required tracker failed (`any_rank` says
    so), that rank stops too with one line, instead of going on to wait for rank 0 in a collective."""
    from merge_distill import distributed
    from merge_distill.errors import UserError
    from merge_distill.parallel import collectives
    from merge_distill.recipe import Recipe
    from merge_distill.tracking import open_trackers

    recipe = Recipe(student="base", experts=[{"name": "math", "teacher": "t", "prompts": "p.jsonl"}],
                    output_dir=str(tmp_path / "run"), report_to=["tensorboard"])
    monkeypatch.setattr(distributed, "is_main", lambda: False)
    assert open_trackers(recipe).trackers == {} and not (tmp_path / "run").exists()
    monkeypatch.setattr(collectives, "any_rank", lambda flag: True)  # rank 0's tracker did not start
    with pytest.raises(UserError, match=r"^report_to: a tracker did not start on rank 0 \(tracker_required: false"):
        open_trackers(recipe)


@pytest.mark.slow
def test_two_ranks_write_one_tracker_run(tiny_world, tmp_path, write_recipe):
    """Under torchrun, rank 0 alone starts the trackers: one TensorBoard event file, holding metrics.jsonl's
    values (the metrics reduced over both ranks)."""
    pytest.importorskip("torch.utils.tensorboard", reason="pip install 'merge-distill[tensorboard]'")
    from launch import torchrun

    path = write_recipe(tmp_path / "r.yaml", tiny_world, tmp_path / "run", steps=2, prompts_per_step=4,
                        max_new_tokens=8, report_to=["tensorboard"])
    torchrun("run", str(path), "--no-eval")
    assert len(list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))) == 1
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert tensorboard_values(tmp_path / "run", "math/reward") == {m["step"]: m["math/reward"] for m in lines}
