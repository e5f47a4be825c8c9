"""A temporary git + DVC copy of the repository to run the pipeline in, and its MLflow rows."""
from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import yaml


def run(cmd, cwd, env, check=True, timeout=None):
    res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if check and res.returncode != 0:
        raise AssertionError(f"{cmd} failed ({res.returncode}):\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    return res


def dvc(root, env, *args, check=True):
    return run([sys.executable, "-m", "dvc", *args], root, env, check=check)


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
               TORCH_HOME=str(dst / ".torch"), PYTHONPATH=str(dst))
    run(["git", "init", "-q"], dst, env)
    if not (dst / ".dvc").exists():
        dvc(dst, env, "init", "-q")
    run(["git", "add", "-A"], dst, env)
    run(["git", "commit", "-qm", "test"], dst, env)
    return dst, env


def rows(root: Path) -> dict[str, dict]:
    """Every MLflow run of the store: name, status, params, latest metrics, tags, artifact files."""
    if not (root / "mlflow.db").exists():
        return {}
    with sqlite3.connect(root / "mlflow.db") as con:
        found = {}
        for run_id, name, status, artifact_uri in con.execute("select run_uuid, name, status, artifact_uri from runs"):
            def q(sql):
                return dict(con.execute(sql, (run_id,)).fetchall())
            artifacts = Path(artifact_uri.removeprefix("file://"))
            found[run_id] = {"name": name, "status": status,
                             "params": q("select key, value from params where run_uuid=?"),
                             "metrics": q("select key, value from latest_metrics where run_uuid=?"),
                             "tags": q("select key, value from tags where run_uuid=?"),
                             "artifacts": sorted(p.name for p in artifacts.rglob("*")) if artifacts.exists() else []}
    return found


def new_rows(root: Path, before: dict) -> list[dict]:
    return [row for run_id, row in rows(root).items() if run_id not in before]
