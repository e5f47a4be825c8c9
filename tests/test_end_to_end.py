"""All five stages through DVC on a tiny configuration, in a temporary copy of the repository."""
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml
from PIL import Image

TINY = {
    "image_size": 32,
    "ingest": {"sample_photos": 24, "sample_paintings": 12, "shard_size": 16},
    "train": {"gen_filters": 4, "disc_filters": 4, "resnet_blocks": 1, "epochs": 1, "steps_per_epoch": 3,
              "batch_size": 2, "decay_from_epoch": 1, "grid_size": 4},
    "generate": {"batch_size": 16},
    "evaluate": {"offline_image_size": 75, "batch_size": 16, "download": False},
    "package": {"min_images": 20, "max_images": 30},
}


def _run(cmd, cwd, env, check=True):
    res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if check and res.returncode != 0:
        raise AssertionError(f"{cmd} failed ({res.returncode}):\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    return res


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(base[k], v) if isinstance(v, dict) else v
    return out


@pytest.fixture(scope="module")
def repo(tmp_path_factory, repo_root):
    """A git + DVC repo holding the project's files (tracked and new), with tiny params."""
    dst = tmp_path_factory.mktemp("e2e") / "repo"
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=repo_root,
                           capture_output=True, text=True, check=True).stdout.split()
    for f in files:
        if (repo_root / f).is_file():
            (dst / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(repo_root / f, dst / f)
    params = yaml.safe_load((dst / "params.yaml").read_text())
    (dst / "params.yaml").write_text(yaml.safe_dump(_merge(params, TINY), sort_keys=False))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    env.update(GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@t",
               TORCH_HOME=str(dst / ".torch"), PYTHONPATH=str(dst))
    _run(["git", "init", "-q"], dst, env)
    if not (dst / ".dvc").exists():
        _run([sys.executable, "-m", "dvc", "init", "-q"], dst, env)
    _run(["git", "add", "-A"], dst, env)
    _run(["git", "commit", "-qm", "tiny"], dst, env)
    return dst, env


def _mlflow_runs(db: Path):
    with sqlite3.connect(db) as con:
        return con.execute("select run_uuid, status from runs").fetchall()


def _metric(db: Path, run: str, key: str) -> float:
    with sqlite3.connect(db) as con:
        row = con.execute("select value from latest_metrics where run_uuid=? and key=?", (run, key)).fetchone()
    return row[0] if row else None


def test_dvc_repro_runs_all_five_stages(repo):
    root, env = repo
    res = _run([sys.executable, "-m", "dvc", "repro"], root, env)
    for stage in ("ingest", "train", "generate", "evaluate", "package"):
        assert f"Running stage '{stage}'" in res.stdout

    with zipfile.ZipFile(root / "data/images.zip") as zf:
        names = zf.namelist()
        assert len(names) == 24 and len(set(names)) == 24
        assert all("/" not in n and n.endswith(".jpg") for n in names)
        with zf.open(names[0]) as f, Image.open(f) as img:
            assert img.format == "JPEG" and img.size == (256, 256) and img.mode == "RGB"

    metrics = json.loads((root / "metrics/evaluate.json").read_text())
    for key in ("mifid", "fid", "distance", "fid_identity", "pair_l1"):
        assert isinstance(metrics[key], float) and metrics[key] == metrics[key]  # not NaN
    assert "OFFLINE" in metrics["feature_extractor"] and metrics["comparable_to_kaggle"] is False
    assert metrics["generated_images"] == 24 and metrics["paintings"] == 12

    runs = _mlflow_runs(root / "mlflow.db")
    assert len(runs) == 1 and runs[0][1] == "FINISHED"
    run = runs[0][0]
    assert _metric(root / "mlflow.db", run, "evaluate.mifid") == pytest.approx(metrics["mifid"])
    assert _metric(root / "mlflow.db", run, "package.images") == 24
    assert _metric(root / "mlflow.db", run, "train.loss_cycle") is not None
    with sqlite3.connect(root / "mlflow.db") as con:
        params = dict(con.execute("select key, value from params where run_uuid=?", (run,)).fetchall())
    assert params["lambda_cycle"] == "10.0" and params["train.epochs"] == "1"
    assert list((root / "mlartifacts").rglob("grid.png"))


def test_second_repro_does_nothing_and_logs_nothing(repo):
    root, env = repo
    before = _mlflow_runs(root / "mlflow.db")
    res = _run([sys.executable, "-m", "dvc", "repro"], root, env)
    assert "Running stage" not in res.stdout
    assert _mlflow_runs(root / "mlflow.db") == before


def test_exp_run_with_lambda_cycle_is_a_new_row(repo):
    root, env = repo
    _run(["git", "add", "-A"], root, env)
    _run(["git", "commit", "-qm", "lock"], root, env)
    _run([sys.executable, "-m", "dvc", "exp", "run", "-S", "lambda_cycle=5"], root, env)
    runs = _mlflow_runs(root / "mlflow.db")
    assert len(runs) == 2
    with sqlite3.connect(root / "mlflow.db") as con:
        values = {v for (v,) in con.execute("select value from params where key='lambda_cycle'")}
    assert values == {"10.0", "5.0"}


def test_temp_experiment_logs_into_the_main_store(repo):
    # `dvc exp run --temp` runs the stages inside .dvc/tmp/exps/...: the row must still land in <repo>/mlflow.db
    root, env = repo
    _run([sys.executable, "-m", "dvc", "exp", "run", "--temp", "-S", "lambda_cycle=3"], root, env)
    with sqlite3.connect(root / "mlflow.db") as con:
        values = {v for (v,) in con.execute("select value from params where key='lambda_cycle'")}
    assert values == {"10.0", "5.0", "3.0"}
    assert not list((root / ".dvc/tmp").rglob("mlflow.db"))


def test_bad_param_is_one_line_and_nonzero(repo):
    root, env = repo
    bad = root / "bad.yaml"
    bad.write_text("lambda_cycle: 5\ntrain:\n  epochz: 3\n")
    res = _run([sys.executable, "-m", "pipeline.train", "--params", str(bad), "--shards", "x", "--manifest", "x",
                "--models", "x", "--checkpoint", "x", "--metrics", "x", "--curve", "x", "--grid", "x"],
               root, env, check=False)
    assert res.returncode == 2
    assert res.stderr.startswith("error: params: unknown key 'train.epochz'")
    assert len(res.stderr.strip().splitlines()) == 1
