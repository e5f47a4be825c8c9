"""MLflow, and every call to it: one row per pipeline execution.

A row is identified by a key = hash(all params, the trained generator's bytes). The first stage
that logs in an execution opens the row; later stages find it by key and add to it. When only
some stages rerun (say `evaluate.*` changed), the key differs, so the first of them makes a new
row and copies into it what the stages DVC skips left on disk, where their results still hold
(`stage_results`), so every row is complete. Stages that DVC skips log nothing: no empty rows.

The store is `sqlite:///<main repo>/mlflow.db` unless MLFLOW_TRACKING_URI is set; the main repo is
DVC_ROOT (DVC points it at the parent repo inside `dvc exp run --temp`/queued runs), so temp
experiments log into the same place as the workspace. A row is named after its DVC experiment,
or, for a workspace run, after the commit and the time it started.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import time
from pathlib import Path

import pandas as pd

from pipeline.files import main_repo
from pipeline.params import Params, flatten
from pipeline.stage_results import held_results

EXPERIMENT = "monet-cyclegan"


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{main_repo() / 'mlflow.db'}"


def run_key(params: Params, generator_path: str | Path) -> str:
    h = hashlib.sha256(json.dumps(flatten(params), sort_keys=True, default=str).encode())
    h.update(Path(generator_path).read_bytes())
    return h.hexdigest()[:16]


def run_name() -> str:
    """The DVC experiment's name, else `workspace@<commit> <date time>`: what a person recognises.
    Always set explicitly: MLflow's own random names repeat, because the stages seed `random`."""
    name = os.environ.get("DVC_EXP_NAME")
    if name:
        return name
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return f"workspace@{commit or 'no-commit'} {time.strftime('%Y-%m-%d %H:%M:%S')}"


def _experiment_id(mlflow, own_store: bool) -> str:
    name = os.environ.get("MLFLOW_EXPERIMENT_NAME", EXPERIMENT)
    exp = mlflow.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    # artifacts beside the db, not under the cwd (which may be a temp experiment folder)
    location = (main_repo() / "mlartifacts").as_uri() if own_store else None
    return mlflow.create_experiment(name, artifact_location=location)


def open_run(params: Params, generator_path: str | Path, stage: str):
    """Start (or resume) the row of this pipeline execution for `stage`; use it as a context.

    A new row also gets every param, and the results of the other stages that still hold."""
    import mlflow  # heavy; only the stages that log import it

    own_store = "MLFLOW_TRACKING_URI" not in os.environ  # read first: set_tracking_uri sets it
    mlflow.set_tracking_uri(tracking_uri())
    exp_id = _experiment_id(mlflow, own_store)
    key = run_key(params, generator_path)
    found = mlflow.search_runs([exp_id], filter_string=f"tags.pipeline_key = '{key}'", max_results=1,
                               output_format="list")
    if found:
        return mlflow.start_run(run_id=found[0].info.run_id)
    exp_name = os.environ.get("DVC_EXP_NAME")
    run = mlflow.start_run(experiment_id=exp_id, run_name=run_name(),
                           tags={"pipeline_key": key, "dvc_exp_name": exp_name or "workspace"})
    mlflow.log_params(flatten(params))
    for other, files in held_results(stage).items():
        for path in files:
            log_file(path, other)
    return run


def log_file(path: Path, stage: str) -> None:
    """A stage's metrics JSON, curve CSV or picture, each the way its kind is logged."""
    if path.suffix == ".json":
        log_metrics_file(path)
    elif path.suffix == ".csv":
        log_curve(path, stage)
    else:
        log_artifact(path)


def log_metrics_file(path: str | Path, step: int | None = None) -> None:
    """Log the numeric entries of a stage's metrics JSON, prefixed by its name (`evaluate.fid`);
    text entries become tags."""
    import mlflow

    prefix = Path(path).stem
    data = json.loads(Path(path).read_text())
    numbers = {f"{prefix}.{k}": float(v) for k, v in data.items()
               if isinstance(v, (int, float)) and not isinstance(v, bool)}
    mlflow.log_metrics(numbers, step=step)
    texts = {f"{prefix}.{k}": str(v) for k, v in data.items() if isinstance(v, (str, bool))}
    if texts:
        mlflow.set_tags(texts)


def log_curve(path: str | Path, prefix: str) -> None:
    """A curve CSV (a `step` column and `loss_*` columns, one row per point) as metric histories."""
    import mlflow

    for row in pd.read_csv(path).to_dict("records"):
        mlflow.log_metrics({f"{prefix}.{k}": float(v) for k, v in row.items() if k.startswith("loss_")},
                           step=int(row["step"]))


def log_tags(tags: dict[str, str]) -> None:
    import mlflow

    mlflow.set_tags(tags)


def log_artifact(path: str | Path) -> None:
    import mlflow

    mlflow.log_artifact(str(path))
