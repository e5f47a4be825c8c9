"""A temporary git + DVC copy of the repository to run the pipeline in, and its MLflow rows."""
from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

TINY = {
    "image_size": 32,
    "ingest": {"sample_photos": 24, "sample_paintings": 12, "shard_size": 16},
    "train": {"gen_filters": 4, "disc_filters": 4, "resnet_blocks": 1, "epochs": 1, "steps_per_epoch": 3,
              "batch_size": 2, "decay_from_epoch": 1, "grid_size": 4},
    "generate": {"batch_size": 16},
    "evaluate": {"offline_image_size": 75, "batch_size": 16, "download": False},
    "package": {"min_images": 20, "max_images": 30},
}


def run(cmd, cwd, env, check=True, timeout=None):
    res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if check and res.returncode != 0:
        raise AssertionError(f"{cmd} failed ({res.returncode}):\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    return res


def dvc(root, env, *args, check=True, timeout=None):
    return run([sys.executable, "-m", "dvc", *args], root, env, check=check, timeout=timeout)


def start_queue(root: Path, env: dict, jobs: int, log: Path) -> None:
    """`dvc queue start -j jobs`, returning once the workers are spawned, as it does in a terminal.
    Their output goes to `log`, never to a pipe of ours: the workers inherit it, and one that
    outlives its queue (seen: a DVC worker that logged "shutting down due to empty queue" and never
    exited) would keep `subprocess.run` waiting for the pipe to close, forever."""
    with open(log, "ab") as out:
        subprocess.run([sys.executable, "-m", "dvc", "queue", "start", "-j", str(jobs)], cwd=root, env=env,
                       stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, check=True, timeout=300)


def merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = merge(base[k], v) if isinstance(v, dict) else v
    return out


def set_params(root: Path, over: dict) -> None:
    params = yaml.safe_load((root / "params.yaml").read_text())
    (root / "params.yaml").write_text(yaml.safe_dump(merge(params, over), sort_keys=False))


def make_repo(dst: Path, repo_root: Path, params: dict | None = None) -> tuple[Path, dict]:
    """The project's files (tracked and new) at `dst`, params overridden, committed; returns (dst, env)."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=repo_root,
                           capture_output=True, text=True, check=True).stdout.split()
    for f in files:
        if (repo_root / f).is_file():
            (dst / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(repo_root / f, dst / f)
    if params:
        set_params(dst, params)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    env.update(GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@t",
               TORCH_HOME=str(dst / ".torch"), PYTHONPATH=str(dst),
               DVC_NO_ANALYTICS="1")  # DVC's usage report, unsendable here, left a file in /tmp per command
    run(["git", "init", "-q"], dst, env)
    if not (dst / ".dvc").exists():
        dvc(dst, env, "init", "-q")
    run(["git", "add", "-A"], dst, env)
    run(["git", "commit", "-qm", "test"], dst, env)
    return dst, env


def rows(root: Path) -> dict[str, dict]:
    """Every MLflow run of the store: name, status, times, params, latest metrics, tags, artifact
    files, data sets (name, digest, source type, context and counts) and logged model names."""
    if not (root / "mlflow.db").exists():
        return {}
    with sqlite3.connect(root / "mlflow.db") as con:
        found = {}
        for run_id, name, status, artifact_uri, start, end in con.execute(
                "select run_uuid, name, status, artifact_uri, start_time, end_time from runs"):
            def q(sql):
                return dict(con.execute(sql, (run_id,)).fetchall())
            artifacts = Path(artifact_uri.removeprefix("file://"))
            datasets = []
            for input_id, dname, digest, source_type in con.execute(
                    "select i.input_uuid, d.name, d.digest, d.dataset_source_type from inputs i join datasets d "
                    "on i.source_id = d.dataset_uuid where i.destination_id = ? and i.source_type = 'DATASET'",
                    (run_id,)).fetchall():
                tags = dict(con.execute("select name, value from input_tags where input_uuid = ?", (input_id,)))
                datasets.append({"name": dname, "digest": digest, "source_type": source_type,
                                 "context": tags.get("mlflow.data.context"), "photos": tags.get("photos"),
                                 "paintings": tags.get("paintings")})
            models = [m for (m,) in con.execute("select name from logged_models where source_run_id = ?", (run_id,))]
            found[run_id] = {"name": name, "status": status, "start_time": start, "end_time": end,
                             "params": q("select key, value from params where run_uuid=?"),
                             "metrics": q("select key, value from latest_metrics where run_uuid=?"),
                             "tags": q("select key, value from tags where run_uuid=?"),
                             "artifacts": sorted(p.name for p in artifacts.rglob("*")) if artifacts.exists() else [],
                             "datasets": datasets, "models": models}
    return found


def new_rows(root: Path, before: dict) -> list[dict]:
    return [row for run_id, row in rows(root).items() if run_id not in before]


def assert_complete(row: dict, metrics_dir: Path, values: bool = True) -> None:
    """The row holds every param, the final numbers of train, evaluate and package (the values in
    `metrics_dir`, or with values=False every key only), the grid, the data set and the model."""
    assert row["status"] == "FINISHED"
    for stage in ("train", "evaluate", "package"):
        numbers = {k: v for k, v in json.loads((metrics_dir / f"{stage}.json").read_text()).items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)}
        for key, value in numbers.items():
            if values:
                assert row["metrics"].get(f"{stage}.{key}") == pytest.approx(value), (stage, key)
            else:
                assert f"{stage}.{key}" in row["metrics"], (stage, key)
    assert [d["name"] for d in row["datasets"]] == ["embedded-sample"] and row["models"] == ["photo2monet"]
    assert {"grid.png", "memorization.png"} <= set(row["artifacts"])
    assert row["tags"]["evaluate.extractor"] == "offline" and "OFFLINE" in row["tags"].get(
        "evaluate.extractor_description", "OFFLINE (copied rows hold the id alone)")
    assert len(row["params"]) > 30 and row["params"]["lambda_cycle"] in {"10", "5", "3"}
