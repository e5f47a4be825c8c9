"""MLflow run model: one row per pipeline execution.

A row is identified by a key = hash(all params, the trained generator's bytes). Train opens the
row; generate, evaluate and package find it by key and add to it. When only downstream params
changed (DVC reruns evaluate but not train), the key differs, so a new row is made and filled
from the metrics files that the skipped upstream stages left, so every row is complete. Stages
that DVC skips log nothing, hence no empty rows.

The store is `sqlite:///<main repo>/mlflow.db` unless MLFLOW_TRACKING_URI is set; the main repo is
DVC_ROOT (DVC points it at the parent repo inside `dvc exp run --temp`/queued runs), so temp
experiments log into the same place as the workspace.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from pipeline.params import Params, flatten

EXPERIMENT = "monet-cyclegan"


def repo_root() -> Path:
    root = os.environ.get("DVC_ROOT")
    if root:
        return Path(root).resolve()
    cwd = Path.cwd().resolve()
    parts = cwd.parts
    for i in range(len(parts) - 2):  # .../<repo>/.dvc/tmp/exps/... -> <repo>
        if parts[i:i + 3] == (".dvc", "tmp", "exps"):
            return Path(*parts[:i])
    return cwd


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{repo_root() / 'mlflow.db'}"


def run_key(params: Params, generator_path: str | Path) -> str:
    h = hashlib.sha256(json.dumps(flatten(params), sort_keys=True, default=str).encode())
    h.update(Path(generator_path).read_bytes())
    return h.hexdigest()[:16]


def _experiment_id(mlflow, own_store: bool) -> str:
    name = os.environ.get("MLFLOW_EXPERIMENT_NAME", EXPERIMENT)
    exp = mlflow.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    # artifacts beside the db, not under the cwd (which may be a temp experiment folder)
    location = (repo_root() / "mlartifacts").as_uri() if own_store else None
    return mlflow.create_experiment(name, artifact_location=location)


def open_run(params: Params, generator_path: str | Path, backfill: list[str | Path] = ()):
    """Start (or resume) the run of this pipeline execution; returns the active mlflow.ActiveRun.

    `backfill`: files of upstream stages (metrics JSON, or artifacts such as the sample grid),
    logged only when the row is new, i.e. when DVC skipped those stages this time."""
    import mlflow  # heavy; only the stages that log import it

    own_store = "MLFLOW_TRACKING_URI" not in os.environ  # read first: set_tracking_uri sets it
    mlflow.set_tracking_uri(tracking_uri())
    exp_id = _experiment_id(mlflow, own_store)
    key = run_key(params, generator_path)
    found = mlflow.search_runs([exp_id], filter_string=f"tags.pipeline_key = '{key}'", max_results=1,
                               output_format="list")
    if found:
        return mlflow.start_run(run_id=found[0].info.run_id)
    name = os.environ.get("DVC_EXP_NAME")
    run = mlflow.start_run(experiment_id=exp_id, run_name=name,
                           tags={"pipeline_key": key, "dvc_exp_name": name or "workspace"})
    mlflow.log_params(flatten(params))
    for path in map(Path, backfill):
        if path.suffix == ".json" and path.exists():
            log_metrics_file(path)
        elif path.exists():
            mlflow.log_artifact(str(path))
    return run


def log_metrics_file(path: str | Path, step: int | None = None) -> None:
    """Log the numeric entries of a stage's metrics JSON, prefixed by the stage (`evaluate.fid`)."""
    import mlflow

    stage = Path(path).stem
    data = json.loads(Path(path).read_text())
    numbers = {f"{stage}.{k}": float(v) for k, v in data.items()
               if isinstance(v, (int, float)) and not isinstance(v, bool)}
    mlflow.log_metrics(numbers, step=step)
    texts = {f"{stage}.{k}": str(v) for k, v in data.items() if isinstance(v, (str, bool))}
    if texts:
        mlflow.set_tags(texts)
