"""Experiment trackers (recipe `report_to:`), each through its own library, behind one interface.

`metrics.jsonl` is always written (`checkpoint.MetricsLog`); a tracker is one more place the same values go:

- `tensorboard`: `torch.utils.tensorboard.SummaryWriter` event files in `<output_dir>/tensorboard`
- `wandb`: a `wandb` run with `dir=<output_dir>` (`<output_dir>/wandb/`); offline where `WANDB_MODE=offline`
- `trackio`: trackio's own local store (a SQLite file per project under `TRACKIO_DIR`, trackio's default
  `~/.cache/huggingface/trackio`; trackio reads that variable when it is first imported)
- `mlflow`: MLflow's local SQLite store `<output_dir>/mlflow.db`, artifacts in `<output_dir>/mlartifacts` (its
  file store `./mlruns` is in maintenance mode and refused by MLflow 3.7+ unless opted into)

Each run is named after its output folder in the project (experiment) `merge-distill`. A tracker logs the
recipe when it starts, each step's metrics under their own names (`math/reward`, `code/reverse_kl_teacher`,
`eval/<suite>`), and at the end the evaluation tables (report.json's rows and paired differences) and figures.
Only rank 0 opens trackers (`open_trackers`); the trainer gets them as a part (`train(run, trackers=...)`).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Protocol

from merge_distill.errors import UserError
from merge_distill.recipe import Recipe

PROJECT = "merge-distill"


class Tracker(Protocol):
    """One experiment tracker's run; started (with the run's config) by its constructor. Tables and images are
    logged at the last training step (`step`), so they do not move the runs' step axes on."""

    def log_metrics(self, step: int, metrics: dict) -> None: ...

    def log_table(self, step: int, name: str, rows: list[dict]) -> None: ...

    def log_image(self, step: int, name: str, path: Path) -> None: ...

    def close(self) -> None: ...


def scalars(metrics: dict) -> dict[str, float]:
    """The numeric values of a metrics line, without its `step`."""
    return {k: float(v) for k, v in metrics.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}


def columns_and_data(rows: list[dict]) -> tuple[list[str], list[list]]:
    """Rows of dicts as (columns in first-seen order, one list per row); lists and dicts become JSON text."""
    def cell(value):
        return json.dumps(value) if isinstance(value, (list, dict)) else value

    columns = list(dict.fromkeys(k for r in rows for k in r))
    return columns, [[cell(r.get(c)) for c in columns] for r in rows]


def markdown_table(rows: list[dict]) -> str:
    columns, data = columns_and_data(rows)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    return "\n".join(lines + ["| " + " | ".join("" if v is None else str(v) for v in row) + " |" for row in data])


class TensorBoardTracker:
    """Event files in `<output_dir>/tensorboard`: scalars, the recipe and tables as text, figures as images."""

    def __init__(self, out: Path, name: str, config: dict):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(out / "tensorboard"))
        self.writer.add_text("recipe", "```\n" + json.dumps(config, indent=2) + "\n```")

    def log_metrics(self, step, metrics):
        for k, v in scalars(metrics).items():
            self.writer.add_scalar(k, v, step, new_style=True, double_precision=True)  # float64, as metrics.jsonl
        self.writer.flush()

    def log_table(self, step, name, rows):
        self.writer.add_text(name, markdown_table(rows), step)

    def log_image(self, step, name, path):
        import matplotlib.image

        self.writer.add_image(name, matplotlib.image.imread(str(path)), step, dataformats="HWC")

    def close(self):
        self.writer.close()


class WandbTracker:
    """A `wandb` run in `<output_dir>/wandb`: the recipe as its config, `wandb.Table`s, `wandb.Image`s."""

    def __init__(self, out: Path, name: str, config: dict):
        import wandb

        self.library = wandb
        self.run = wandb.init(project=PROJECT, name=name, dir=str(out), config=config, reinit="create_new")

    def log_metrics(self, step, metrics):
        self.run.log(scalars(metrics), step=step)

    def log_table(self, step, name, rows):
        columns, data = columns_and_data(rows)
        self.run.log({name: self.library.Table(columns=columns, data=data)}, step=step)

    def log_image(self, step, name, path):
        self.run.log({name: self.library.Image(str(path))}, step=step)

    def close(self):
        self.run.finish()


class TrackioTracker(WandbTracker):  # trackio's API is wandb's: the same calls on its own run
    """A trackio run in its local store: the recipe as its config, `trackio.Table`s, `trackio.Image`s."""

    def __init__(self, out: Path, name: str, config: dict):
        import trackio

        self.library = trackio
        self.run = trackio.init(project=PROJECT, name=name, config=config, embed=False)


class MlflowTracker:
    """An MLflow run in the local store `<output_dir>/mlflow.db` (`MlflowClient`, no global state): the recipe as
    flattened params and `recipe.json`, metrics by step, tables as JSON artifacts, figures as artifacts."""

    def __init__(self, out: Path, name: str, config: dict):
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=f"sqlite:///{out.resolve() / 'mlflow.db'}")
        experiment = self.client.get_experiment_by_name(PROJECT)
        experiment_id = (experiment.experiment_id if experiment else
                         self.client.create_experiment(PROJECT, artifact_location=(out.resolve() / "mlartifacts").as_uri()))
        self.run_id = self.client.create_run(experiment_id, run_name=name).info.run_id
        params = [Param(k, str(v)[:6000]) for k, v in flatten(config).items()]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=params[i:i + 100])
        self.client.log_dict(self.run_id, config, "recipe.json")

    def log_metrics(self, step, metrics):
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in scalars(metrics).items()])

    def log_table(self, step, name, rows):
        self.client.log_dict(self.run_id, rows, f"{name}.json")

    def log_image(self, step, name, path):
        self.client.log_artifact(self.run_id, str(path))

    def close(self):
        self.client.set_terminated(self.run_id)


def flatten(config: dict, prefix: str = "") -> dict:
    """`{"optim": {"lr": 1e-5}}` -> `{"optim.lr": 1e-5}` (lists stay whole)."""
    out = {}
    for k, v in config.items():
        if isinstance(v, dict) and v:
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


TRACKERS = {"tensorboard": TensorBoardTracker, "wandb": WandbTracker, "trackio": TrackioTracker,
            "mlflow": MlflowTracker}


class Trackers:
    """The run's trackers as one: each call goes to every tracker (none: nothing happens). Tables and images go
    at the last step whose metrics were logged."""

    def __init__(self, trackers: dict[str, Tracker] | None = None):
        self.trackers = dict(trackers or {})
        self.step = 0

    def log_metrics(self, step: int, metrics: dict) -> None:
        self.step = step
        for t in self.trackers.values():
            t.log_metrics(step, metrics)

    def log_table(self, name: str, rows: list[dict]) -> None:
        for t in self.trackers.values():
            t.log_table(self.step, name, rows)

    def log_image(self, name: str, path: Path) -> None:
        if Path(path).exists():
            for t in self.trackers.values():
                t.log_image(self.step, name, Path(path))

    def close(self) -> None:
        for t in self.trackers.values():
            t.close()
        self.trackers = {}

    def __enter__(self) -> "Trackers":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def start_failure(name: str, error: Exception) -> str:
    """One line: why tracker `name` did not start (a missing package names the extra that installs it, which
    has the tracker's name)."""
    if isinstance(error, ImportError):
        missing = f" ({error.name} is missing)" if error.name else ""
        return f"report_to: {name} needs its package{missing}: pip install 'merge-distill[{name}]'"
    first = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return f"report_to: {name} did not start: {type(error).__name__}: {first}"


def open_trackers(recipe: Recipe) -> Trackers:
    """The recipe's `report_to` trackers, started on rank 0 with the recipe as their config (other ranks: none;
    every rank calls this). One that fails to start stops the run on every rank under `tracker_required`
    (UserError, one line); otherwise that line goes to stderr as a warning and the run goes on without it."""
    from merge_distill import distributed
    from merge_distill.parallel import collectives

    if not recipe.report_to:
        return Trackers()
    started, failure = {}, None
    if distributed.is_main():
        out = Path(recipe.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        config = recipe.model_dump(mode="json")
        for name in dict.fromkeys(recipe.report_to):
            try:
                started[name] = TRACKERS[name](out, out.resolve().name, config)
            except Exception as error:  # noqa: BLE001 - any failure to start is reported in one line
                line = start_failure(name, error)
                if recipe.tracker_required:
                    failure = failure or line
                else:
                    print(f"warning: {line}; training without it (tracker_required: false)", file=sys.stderr)
    if collectives.any_rank(failure is not None):  # every rank stops, not only the one whose tracker failed
        Trackers(started).close()
        raise UserError(f"{failure or 'report_to: a tracker did not start on rank 0'} "
                        "(tracker_required: false trains without it)")
    return Trackers(started)


def log_report(trackers: Trackers, report: dict, figures: dict[str, Path]) -> None:
    """The evaluation at the end of a run: report.json's rows and paired differences as tables, and figures."""
    trackers.log_table("eval/results", report["rows"])
    if report.get("paired_differences"):
        trackers.log_table("eval/paired_differences", report["paired_differences"])
    for name, path in figures.items():
        trackers.log_image(name, path)
