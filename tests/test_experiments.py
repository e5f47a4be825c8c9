"""Experiments as DVC and MLflow users run them, in a temporary copy of the repository (tiny
params): queued sweeps with two workers, the row spanning the pipeline with its data set and
model, the model loaded and served, a remote tracking server, and an unreachable one."""
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import types
import urllib.request
import warnings
from pathlib import Path

import numpy as np
import pytest
import readme_recipes
import torch
from workspace import TINY, assert_complete, dvc, make_repo, new_rows, rows, run, start_queue

from pipeline.errors import DataError, PipelineError

WAIT = 180  # seconds a server gets to come up


@pytest.fixture(scope="module")
def reproduced(tmp_path_factory, repo_root):
    root, env = make_repo(tmp_path_factory.mktemp("exps"), repo_root, TINY)
    done = dvc(root, env, "repro")
    (root.parent / "repro.out").write_text(done.stdout + done.stderr)  # beside the repository, not in it
    return root, env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(url: str, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.time() + WAIT
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"{proc.args} exited {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(1)
    raise AssertionError(f"{url} did not answer in {WAIT} s:\n{log.read_text()[-3000:]}")


def start(cmd: list[str], cwd: Path, env: dict, log: Path) -> subprocess.Popen:
    out = open(log, "w")
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def stop(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, 15)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)


def photos(root: Path, n: int) -> np.ndarray:
    from pipeline.shards import iter_domain, read_manifest

    _, first = next(iter_domain(root / "data/shards", read_manifest(root / "data/manifest.csv"), "photo"))
    return first[:n].numpy()


def expected_paintings(root: Path, batch: np.ndarray) -> np.ndarray:
    """What `generate` makes of `batch` with the trained generator: in the `precision` of the
    params, as resolved here (bf16 on a CPU with AMX)."""
    from pipeline import generator_file
    from pipeline.params import load
    from pipeline.runtime import autocast, autocast_dtype

    cpu = torch.device("cpu")
    net, config = generator_file.load(root / "models/photo2monet.pt", cpu)
    ctx = autocast(cpu, autocast_dtype(load(root / "params.yaml").precision, cpu))
    return generator_file.translate(net, torch.from_numpy(batch), config["image_size"], cpu, ctx,
                                    out_size=256, batch_size=load(root / "params.yaml").generate.batch_size).numpy()


def the_row(root: Path) -> tuple[str, dict]:
    ((run_id, row),) = [(k, r) for k, r in rows(root).items() if r["name"].startswith("workspace@")]
    return run_id, row


def test_one_row_spans_training_and_names_its_data_set(reproduced):
    root, _ = reproduced
    run_id, row = the_row(root)
    assert_complete(row, root / "metrics")
    # opened before the first step (the checkpoint is written after each epoch), ended by package
    assert row["start_time"] / 1000 < (root / ".cache/train/checkpoint.pt").stat().st_mtime
    assert row["end_time"] / 1000 >= (root / "metrics/package.json").stat().st_mtime
    (dataset,) = row["datasets"]
    assert dataset["name"] == "embedded-sample" and dataset["source_type"] == "code" and dataset["context"] == "training"
    assert (dataset["photos"], dataset["paintings"]) == ("24", "12")
    assert dataset["digest"]
    assert row["models"] == ["photo2monet"]


@pytest.mark.parametrize("source, name, kind, points_to", [
    ("kaggle", "kaggle/gan-getting-started", "http", "kaggle.com/competitions/gan-getting-started"),
    ("/data/gan-getting-started.zip", "local/gan-getting-started.zip", "local", "/data/gan-getting-started.zip"),
    ("sample", "embedded-sample", "code", "pipeline/sample.py")])
def test_the_data_set_names_where_the_images_came_from(source, name, kind, points_to):
    from pipeline.tracking import _dataset_source

    found, found_name = _dataset_source(source)
    assert (found_name, found._get_source_type()) == (name, kind) and points_to in found.to_json()


@pytest.mark.parametrize("uri, expected", [
    (None, "sqlite:///{repo}/mlflow.db"),
    ("sqlite:///mlflow.db", "sqlite:///{repo}/mlflow.db"),        # as the README's serve command writes it
    ("sqlite:///stores/team.db", "sqlite:///{repo}/stores/team.db"),
    ("sqlite:////srv/team.db", "sqlite:////srv/team.db"),
    ("http://127.0.0.1:5000", "http://127.0.0.1:5000"),
])
def test_a_relative_sqlite_store_is_the_main_repositorys_from_a_queued_run(tmp_path, monkeypatch, uri, expected):
    from pipeline import tracking

    monkeypatch.delenv("DVC_ROOT", raising=False)
    queued = tmp_path / "repo/.dvc/tmp/exps/tmp1a2b"
    queued.mkdir(parents=True)
    monkeypatch.chdir(queued)
    if uri is None:
        monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    else:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    assert tracking.tracking_uri() == expected.format(repo=tmp_path / "repo")


def test_a_relative_local_source_names_the_file_in_the_main_repository(tmp_path, monkeypatch):
    from pipeline.tracking import _dataset_source

    monkeypatch.delenv("DVC_ROOT", raising=False)
    queued = tmp_path / "repo/.dvc/tmp/exps/tmp1a2b"  # where DVC runs a queued experiment
    queued.mkdir(parents=True)
    monkeypatch.chdir(queued)
    found, name = _dataset_source("gan.zip")
    assert name == "local/gan.zip" and str(tmp_path / "repo/gan.zip") in found.to_json()


def _one_photo_one_painting_manifest(folder):
    """A manifest for the rows' data set (no shards behind it)."""
    from pipeline.shards import MANIFEST_COLUMNS

    manifest = folder / "manifest.csv"
    manifest.write_text(",".join(MANIFEST_COLUMNS) + "\nphoto,a,photo-000.pt,0,x.tfrec,0\nmonet,b,monet-000.pt,0,y.tfrec,0\n")
    return manifest


@pytest.fixture
def store(tmp_path, monkeypatch):
    """An empty MLflow store in tmp_path, the working folder (no dvc.lock there: no other stage's
    results to copy); the manifest of the rows' data set and a generator file."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    generator = tmp_path / "g.pt"
    generator.write_bytes(b"weights")
    return _one_photo_one_painting_manifest(tmp_path), generator


def test_a_training_run_again_resumes_its_row_until_it_finishes(store, tmp_path, monkeypatch):
    # kill -9 leaves the row RUNNING, ^C marks it KILLED: either way the next training of the same
    # params continues that row; once keyed (finish_training), the next training makes a new one
    from pipeline import tracking
    from pipeline.params import parse

    manifest, generator = store
    p = parse({"train": {"lr": 1e-5}})
    monkeypatch.setenv("DVC_EXP_NAME", "killed")
    with pytest.raises(KeyboardInterrupt), tracking.start_training(p, manifest, None) as first:
        raise KeyboardInterrupt
    monkeypatch.setenv("DVC_EXP_NAME", "resumed")
    with tracking.start_training(p, manifest, first.info.run_id) as again:
        assert again.info.run_id == first.info.run_id
        tracking.finish_training(p, generator)
    # the row is the execution that finished it: named after it, not after the one killed
    assert rows(tmp_path)[first.info.run_id]["name"] == "resumed"
    assert rows(tmp_path)[first.info.run_id]["tags"]["dvc_exp_name"] == "resumed"
    with tracking.start_training(p, manifest, first.info.run_id) as new:
        assert new.info.run_id != first.info.run_id
    with tracking.start_training(parse({"train": {"lr": 2e-5}}), manifest, None) as other:
        assert other.info.run_id not in (first.info.run_id, new.info.run_id)  # other params: its own row
    assert [r["status"] for r in rows(tmp_path).values()] == ["FINISHED"] * 3


def test_a_training_stopped_after_it_copied_later_results_in_resumes_its_row(store, tmp_path):
    # finish_training copies in the results of the later stages that still hold (or that an earlier
    # row of the same generator holds); stopped after that, the row was taken for one whose training
    # had finished (it held evaluate's results), and the rerun made a second row
    from pipeline import tracking
    from pipeline.params import parse

    manifest, generator = store
    p = parse({"train": {"lr": 1e-5}})
    with pytest.raises(KeyboardInterrupt), tracking.start_training(p, manifest, None) as first:
        tracking.finish_training(p, generator)
        tracking.log_metrics_file(_json(tmp_path / "evaluate.json", {"fid": 1.5}))  # as the copies are
        raise KeyboardInterrupt  # while train logs the rest (its grid, its model)
    with tracking.start_training(p, manifest, first.info.run_id) as again:
        assert again.info.run_id == first.info.run_id
        tracking.finish_training(p, generator)
    (row,) = rows(tmp_path).values()
    assert row["status"] == "FINISHED" and row["tags"][tracking.TRAINING_DONE] == "true"
    # a row whose training was done and whose package then failed is not taken up again
    with pytest.raises(DataError), tracking.failure_marks_row(p, generator, "package"):
        raise DataError("package failed")
    with tracking.start_training(p, manifest, first.info.run_id) as new:
        assert new.info.run_id != first.info.run_id


def test_a_stopped_retraining_of_a_finished_checkpoint_resumes_its_own_row(store, tmp_path):
    # `dvc repro -f` with a finished checkpoint retrains 0 steps into a row of its own; the checkpoint
    # still names the first row, so a rerun of that retraining after kill -9 (or ^C) made a third row
    # and left the second RUNNING (KILLED) for good
    from pipeline import tracking
    from pipeline.params import parse

    manifest, generator = store
    p = parse({"train": {"lr": 1e-5}})
    with tracking.start_training(p, manifest, None) as first:
        tracking.finish_training(p, generator)
    with pytest.raises(KeyboardInterrupt), tracking.start_training(p, manifest, first.info.run_id) as retraining:
        raise KeyboardInterrupt
    assert retraining.info.run_id != first.info.run_id
    with tracking.start_training(p, manifest, first.info.run_id) as again:
        assert again.info.run_id == retraining.info.run_id
        tracking.finish_training(p, generator)
    with tracking.start_training(p, manifest, first.info.run_id) as next_one:  # that one finished: a new row
        assert next_one.info.run_id not in (first.info.run_id, retraining.info.run_id)
    assert [r["status"] for r in rows(tmp_path).values()] == ["FINISHED"] * 3


@pytest.mark.parametrize("uri, artifacts", [("sqlite:///team.db", "repo/mlartifacts"),
                                            ("sqlite:///{tmp}/elsewhere/team.db", "elsewhere/mlartifacts")])
def test_a_temp_experiment_keeps_its_artifacts_with_any_sqlite_store(tmp_path, monkeypatch, uri, artifacts):
    # `MLFLOW_TRACKING_URI=sqlite:///team.db dvc exp run --temp`: the row went to the main repo's
    # team.db, but its artifacts (the model, the pictures) to ./mlruns of DVC's temp folder, deleted after
    from pipeline import tracking
    from pipeline.params import parse

    repo = tmp_path / "repo"
    temp = repo / ".dvc/tmp/exps/standalone/tmp1"  # where DVC runs a --temp experiment
    temp.mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(temp)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri.format(tmp=tmp_path))
    picture = temp / "grid.png"
    picture.write_bytes(b"png")
    with tracking.start_training(parse({}), _one_photo_one_painting_manifest(temp), None) as run:
        tracking.log_artifact(picture)
    assert run.info.artifact_uri == (tmp_path / artifacts).as_uri() + f"/{run.info.run_id}/artifacts"
    assert (tmp_path / artifacts / run.info.run_id / "artifacts/grid.png").read_bytes() == b"png"
    assert not (temp / "mlruns").exists()


def test_a_row_shows_each_param_as_params_yaml_and_dvc_write_it(store, tmp_path):
    # `dvc exp run -S lambda_cycle=5` writes 5; the row said 5.0, so params.lambda_cycle = '5' in
    # the UI's search box found none of those runs
    from pipeline import tracking
    from pipeline.params import parse

    manifest, _ = store
    with tracking.start_training(parse({"lambda_cycle": 5, "train": {"lr": 2e-4, "ema": 0}}), manifest, None):
        pass
    (row,) = rows(tmp_path).values()
    assert (row["params"]["lambda_cycle"], row["params"]["train.lr"], row["params"]["train.ema"]) == ("5", "0.0002", "0")
    assert row["params"]["lambda_identity"] == "0.5" and row["params"]["train.compile"] in ("True", "False")


def test_a_training_stopped_while_logging_its_results_resumes_its_row(store, tmp_path, monkeypatch):
    # Ctrl-C (or kill -9) in the seconds of logging after the weights are saved: the row was keyed
    # already, so the resumed training made a second row beside it
    from pipeline import tracking
    from pipeline.params import parse

    manifest, generator = store
    p = parse({"train": {"lr": 1e-5}})
    with pytest.raises(KeyboardInterrupt), tracking.start_training(p, manifest, None) as first:
        tracking.finish_training(p, generator)
        raise KeyboardInterrupt  # while logging the model, say
    with tracking.start_training(p, manifest, first.info.run_id) as again:
        tracking.finish_training(p, generator)
    assert again.info.run_id == first.info.run_id
    assert [r["status"] for r in rows(tmp_path).values()] == ["FINISHED"]


def test_a_resumed_training_takes_up_its_own_row_not_the_newest_unfinished_one(store, tmp_path, monkeypatch):
    # the row of the checkpoint it resumes: the newest unfinished row of the same params may be a
    # queued experiment's, training right now (it was taken over), or one abandoned days ago
    from pipeline import tracking
    from pipeline.params import parse

    manifest, generator = store
    p = parse({"train": {"lr": 1e-5}})
    with pytest.raises(KeyboardInterrupt), tracking.start_training(p, manifest, None) as own:
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt), tracking.start_training(p, manifest, None) as other:
        raise KeyboardInterrupt  # newer, and another execution's
    with tracking.start_training(p, manifest, own.info.run_id) as again:
        assert again.info.run_id == own.info.run_id
    with tracking.start_training(p, manifest, "") as legacy:  # a checkpoint that names no row
        assert legacy.info.run_id == other.info.run_id  # as before: the newest unfinished one


def test_a_training_that_starts_afresh_makes_its_own_row(store, tmp_path, monkeypatch):
    # the killed training's checkpoint deleted, or a queued experiment of the same params training
    # beside another in its own folder: no checkpoint to resume, so not the other's row either
    from pipeline import tracking
    from pipeline.params import parse

    manifest, _ = store
    p = parse({"train": {"lr": 1e-5}})
    with pytest.raises(KeyboardInterrupt), tracking.start_training(p, manifest, None) as first:
        raise KeyboardInterrupt
    with tracking.start_training(p, manifest, None) as fresh:
        assert fresh.info.run_id != first.info.run_id
    assert {r["status"] for r in rows(tmp_path).values()} == {"KILLED", "FINISHED"}


def test_a_failure_after_training_marks_the_row_and_makes_none(store, tmp_path, monkeypatch):
    # generate, evaluate and package work before they open the row: a failure there marks training's
    from pipeline import tracking
    from pipeline.errors import DataError
    from pipeline.params import parse

    manifest, generator = store
    p = parse({"train": {"lr": 1e-5}})
    with pytest.raises(DataError), tracking.failure_marks_row(p, generator, "evaluate"):
        raise DataError("no store yet")
    assert not (tmp_path / "mlflow.db").exists()  # nothing made to mark nothing
    with tracking.start_training(p, manifest, None):
        tracking.finish_training(p, generator)
    for error, status in ((DataError("bad input"), "FAILED"), (KeyboardInterrupt(), "KILLED")):
        with pytest.raises(type(error)), tracking.failure_marks_row(p, generator, "evaluate"):
            raise error
        assert [r["status"] for r in rows(tmp_path).values()] == [status]
    other = parse({"train": {"lr": 2e-5}})
    with pytest.raises(DataError), tracking.failure_marks_row(other, generator, "evaluate"):
        raise DataError("another execution, no row")
    assert [r["status"] for r in rows(tmp_path).values()] == ["KILLED"]  # untouched, and no new row


def test_two_executions_of_the_same_params_log_their_later_stages_each_into_its_own_row(store, tmp_path, monkeypatch):
    # two queued experiments of the same params, side by side: the same weights, so the same key
    from pipeline import tracking
    from pipeline.params import parse

    manifest, generator = store
    p = parse({"train": {"lr": 1e-5}})
    ids = {}
    for name in ("q3a", "q3b"):
        monkeypatch.setenv("DVC_EXP_NAME", name)
        with tracking.start_training(p, manifest, None) as run:
            tracking.finish_training(p, generator)
        ids[name] = run.info.run_id
    (tmp_path / "evaluate.json").write_text('{"fid": 1.5}')
    for name in ("q3a", "q3b"):  # the first to finish training evaluates first
        monkeypatch.setenv("DVC_EXP_NAME", name)
        with tracking.open_run(p, generator, "evaluate", tmp_path, manifest) as run:
            tracking.log_metrics_file(tmp_path / "evaluate.json")
        assert run.info.run_id == ids[name]
    assert all("evaluate.fid" in row["metrics"] for row in rows(tmp_path).values())


def test_a_forced_rerun_that_fails_leaves_the_row_it_succeeded_for_alone(store, tmp_path, monkeypatch):
    # `dvc repro -f -s evaluate` finds the row of the execution that made these weights; if it fails,
    # that row's results still stand (and DVC restores them from its run-cache, with no stage to mend it)
    import json

    from pipeline import tracking
    from pipeline.errors import DataError
    from pipeline.params import parse

    manifest, generator = store
    p = parse({"train": {"lr": 1e-5}})
    with tracking.start_training(p, manifest, None):
        tracking.finish_training(p, generator)
    (tmp_path / "evaluate.json").write_text(json.dumps({"fid": 1.5}))
    with tracking.open_run(p, generator, "evaluate", tmp_path, manifest):
        tracking.log_metrics_file(tmp_path / "evaluate.json")
    with pytest.raises(DataError), tracking.failure_marks_row(p, generator, "evaluate"):
        raise DataError("the weights file replaced by a bad one")
    assert [r["status"] for r in rows(tmp_path).values()] == ["FINISHED"]
    # generate logs nothing of its own: evaluate's results in the row say it succeeded (`dvc repro -f
    # -s generate` after a shard was damaged marked the complete row FAILED)
    with pytest.raises(DataError), tracking.failure_marks_row(p, generator, "generate"):
        raise DataError("a shard damaged since")
    assert [r["status"] for r in rows(tmp_path).values()] == ["FINISHED"]
    with pytest.raises(DataError), tracking.failure_marks_row(p, generator, "package"):
        raise DataError("package has not succeeded for this row: it fails it")
    assert [r["status"] for r in rows(tmp_path).values()] == ["FAILED"]


def test_a_forced_rerun_keeps_the_duration_of_a_complete_row(store, tmp_path, monkeypatch):
    # the row is the execution from training to package; `dvc repro -f -s package` a day later
    # stretched it to a day
    import time

    from pipeline import tracking
    from pipeline.params import parse

    manifest, generator = store
    p = parse({"train": {"lr": 1e-5}})
    with tracking.start_training(p, manifest, None) as run:
        tracking.finish_training(p, generator)
    (tmp_path / "evaluate.json").write_text('{"fid": 1.5}')
    (tmp_path / "package.json").write_text('{"images": 7028}')
    ends = []
    for stage in ("evaluate", "package", "package", "evaluate"):  # the execution, then two forced reruns
        time.sleep(0.05)
        with tracking.open_run(p, generator, stage, tmp_path, manifest):
            tracking.log_metrics_file(tmp_path / f"{stage}.json")
        ends.append(rows(tmp_path)[run.info.run_id]["end_time"])
    assert ends[0] < ends[1] == ends[2] == ends[3]
    assert [r["status"] for r in rows(tmp_path).values()] == ["FINISHED"]


def test_the_stages_of_one_forced_repro_extend_and_fail_the_row(store, tmp_path, monkeypatch):
    # `dvc repro -f`: train copies in the results of the stages after it that the lock says still
    # hold, so the row was complete when training ended, and evaluate and package, forced to run all
    # the same, took themselves for a later rerun: the row kept training's end (its duration 3 s of
    # a 43 s execution), and a failure of theirs left it FINISHED
    from pipeline import tracking
    from pipeline.params import parse

    manifest, generator = store
    p = parse({"train": {"lr": 1e-5}})
    (tmp_path / "evaluate.json").write_text('{"fid": 1.5}')
    (tmp_path / "package.json").write_text('{"images": 7028}')

    def execution(name, stages):
        monkeypatch.setattr(tracking, "dvc_execution", lambda: name)
        ends = []
        for stage in stages:
            time.sleep(0.05)
            with tracking.open_run(p, generator, stage, tmp_path, manifest):
                tracking.log_metrics_file(tmp_path / f"{stage}.json")
            ends.append(rows(tmp_path)[run.info.run_id]["end_time"])
        return ends

    monkeypatch.setattr(tracking, "dvc_execution", lambda: "41:1000")
    with tracking.start_training(p, manifest, None) as run:
        tracking.finish_training(p, generator)
    first = execution("41:1000", ["evaluate", "package"])
    again = execution("41:1000", ["evaluate", "package"])  # complete already, in the same command
    assert first[0] < first[1] < again[0] < again[1]
    later = execution("57:2000", ["evaluate", "package"])  # `dvc repro -f --downstream evaluate` later
    assert later == [again[1]] * 2
    with pytest.raises(DataError), tracking.failure_marks_row(p, generator, "evaluate"):
        raise DataError("a later forced rerun fails: the row's results still stand")
    assert [r["status"] for r in rows(tmp_path).values()] == ["FINISHED"]
    # a stage of the command that made the row fails after the row was complete: so did the command
    p = parse({"train": {"lr": 2e-5}})
    monkeypatch.setattr(tracking, "dvc_execution", lambda: "63:3000")
    with tracking.start_training(p, manifest, None) as run:
        tracking.finish_training(p, generator)
    execution("63:3000", ["evaluate", "package"])
    with pytest.raises(DataError), tracking.failure_marks_row(p, generator, "package"):
        raise DataError("package, forced in the same dvc repro -f")
    assert rows(tmp_path)[run.info.run_id]["status"] == "FAILED"


def test_a_sigterm_as_mlflow_opens_the_row_ends_it_as_any_other(store, tmp_path, monkeypatch):
    # MLflow marks the row RUNNING inside start_run; a SIGTERM there, before the stage had charge
    # of ending the row, left it RUNNING for good: a new training's row, and a FINISHED row that a
    # forced rerun opened (found by sending the signal the moment the row turned RUNNING)
    import signal

    import mlflow

    from pipeline import errors, tracking
    from pipeline.params import parse

    manifest, generator = store
    p = parse({"train": {"lr": 1e-5}})
    start_run = mlflow.start_run

    def then_sigterm(*args, **kwargs):
        run = start_run(*args, **kwargs)
        signal.raise_signal(signal.SIGTERM)  # delivered here, as it would be inside start_run
        return run

    previous = signal.signal(signal.SIGTERM, errors._stop)  # as a stage's errors.cli sets it
    try:
        with monkeypatch.context() as m:
            m.setattr(mlflow, "start_run", then_sigterm)
            with pytest.raises(errors.Stopped), tracking.start_training(p, manifest, None):
                pass
        assert [r["status"] for r in rows(tmp_path).values()] == ["KILLED"]
        with tracking.start_training(p, manifest, ""):  # resumes the killed row
            tracking.finish_training(p, generator)
        for stage in ("evaluate", "package"):
            (tmp_path / f"{stage}.json").write_text('{"n": 1}')
            with tracking.open_run(p, generator, stage, tmp_path, manifest):
                tracking.log_metrics_file(tmp_path / f"{stage}.json")
        (before,) = rows(tmp_path).values()
        with monkeypatch.context() as m:  # `dvc repro -f -s package`, stopped as it opens the row
            m.setattr(mlflow, "start_run", then_sigterm)
            with pytest.raises(errors.Stopped), tracking.open_run(p, generator, "package", tmp_path, manifest):
                pass
        (after,) = rows(tmp_path).values()
        assert (after["status"], after["end_time"]) == ("FINISHED", before["end_time"])
        assert mlflow.active_run() is None
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_signals_held_hold_a_sigterm_to_the_end_of_the_step():
    import signal

    from pipeline import errors, files

    previous = signal.signal(signal.SIGTERM, errors._stop)
    steps = []
    try:
        with pytest.raises(errors.Stopped):
            with files.signals_held():
                signal.raise_signal(signal.SIGTERM)
                steps.append("the rest of the step")
            steps.append("after the step")
        assert steps == ["the rest of the step"]
        assert signal.getsignal(signal.SIGTERM) is errors._stop
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_a_stage_under_dvc_knows_the_command_it_runs_under(tmp_path):
    from pipeline import processes

    assert processes.dvc_execution() is None  # by hand (pytest is no dvc)
    fake = tmp_path / "dvc"  # a program named dvc that runs a stage through the shell, as DVC does
    fake.write_text("import subprocess, sys\nfor _ in range(2):\n    subprocess.run(['sh', '-c', sys.argv[1]], check=True)\n")
    probe = f"{sys.executable} -c 'from pipeline import processes; print(processes.dvc_execution())'"
    ids = [subprocess.run([sys.executable, str(fake), probe], capture_output=True, text=True, check=True,
                          cwd=Path(__file__).parents[1]).stdout.split() for _ in range(2)]
    assert ids[0][0] == ids[0][1] != ids[1][0] == ids[1][1]  # one id per command, the same for its stages
    assert re.fullmatch(r"\d+:\d+", ids[0][0])


def test_a_full_disk_under_the_store_is_one_line_naming_it(store, tmp_path, monkeypatch):
    # SQLite says "database or disk is full" inside an MlflowException, and the try to mark the row
    # FAILED fails the same way: 648 lines and 16 tracebacks, exit 1. A copy into a full artifact
    # folder is an OSError that names no file
    import errno

    import mlflow
    from mlflow.exceptions import MlflowException

    from pipeline import tracking
    from pipeline.params import parse

    manifest, _ = store

    def full(*args, **kwargs):
        raise MlflowException("(sqlite3.OperationalError) database or disk is full [SQL: UPDATE runs ...]")

    with pytest.raises(PipelineError, match=rf"MLflow could not write to {tmp_path / 'mlflow.db'}: the disk is full"):
        with monkeypatch.context() as m, tracking.start_training(parse({}), manifest, None):
            m.setattr(mlflow.MlflowClient, "set_terminated", full)  # the end as FAILED fails too
            m.setattr(mlflow, "log_metrics", full)
            tracking.log_metrics_file(_json(tmp_path / "train.json", {"loss": 1.0}))
    assert mlflow.active_run() is None

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")  # as shutil.copyfileobj raises it

    with pytest.raises(PipelineError, match=r"MLflow could not write to /\S+/artifacts: the disk is full"):
        with monkeypatch.context() as m, tracking.start_training(parse({}), manifest, None):
            m.setattr(mlflow, "log_artifact", no_space)
            tracking.log_artifact(tmp_path / "g.pt")
    assert [r["status"] for r in rows(tmp_path).values()] == ["RUNNING", "FAILED"]  # where the store could


def test_a_complete_row_stays_as_it_was_when_a_forced_rerun_fails_to_log(store, tmp_path, monkeypatch):
    # `dvc repro -f -s evaluate` on a row that holds evaluate's results, and the picture does not
    # fit the disk: the row went from FINISHED to FAILED, though its results still stand
    import errno

    import mlflow

    from pipeline import tracking
    from pipeline.params import parse

    manifest, generator = store
    p = parse({"train": {"lr": 1e-5}})
    with tracking.start_training(p, manifest, None):
        tracking.finish_training(p, generator)
    with tracking.open_run(p, generator, "evaluate", tmp_path, manifest):  # no package results yet
        tracking.log_metrics_file(_json(tmp_path / "evaluate.json", {"fid": 1.5}))
    (before,) = rows(tmp_path).values()
    monkeypatch.setattr(mlflow, "log_artifact", lambda *a, **k: (_ for _ in ()).throw(OSError(errno.ENOSPC, "full")))
    with pytest.raises(PipelineError, match="the disk is full"), tracking.open_run(p, generator, "evaluate", tmp_path, manifest):
        tracking.log_artifact(generator)
    (after,) = rows(tmp_path).values()
    assert (after["status"], after["end_time"]) == ("FINISHED", before["end_time"])
    with pytest.raises(PipelineError), tracking.open_run(p, generator, "package", tmp_path, manifest):
        tracking.log_artifact(generator)  # package has not succeeded for this row: it fails it
    assert [r["status"] for r in rows(tmp_path).values()] == ["FAILED"]


def test_a_full_disk_while_the_store_is_made_is_the_full_disk_line(store, tmp_path, monkeypatch):
    import mlflow
    from mlflow.exceptions import MlflowException

    from pipeline import tracking

    def full(name):
        raise MlflowException("(sqlite3.OperationalError) database or disk is full [SQL: CREATE TABLE ...]")

    monkeypatch.setattr(mlflow, "get_experiment_by_name", full)
    with pytest.raises(PipelineError, match="the disk is full; free some space"), tracking._serialized():
        tracking._experiment_id(mlflow)


def test_the_default_store_is_named_as_the_default_when_it_is_no_file(tmp_path, monkeypatch):
    from pipeline import tracking

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    (tmp_path / "mlflow.db").mkdir()
    with pytest.raises(PipelineError) as e:
        tracking.check_store()
    assert str(e.value) == (f"tracking: its store sqlite:///{tmp_path / 'mlflow.db'} names a folder, not a file; "
                            f"mend that, or set MLFLOW_TRACKING_URI to a store elsewhere")


def _json(path: Path, data: dict) -> Path:
    path.write_text(json.dumps(data))
    return path


def test_copied_results_end_the_curves_as_the_stage_logs_them(store, tmp_path, monkeypatch):
    # an evaluate-only experiment copies train's results: its final losses went in at step 0, a
    # false first point of every loss curve before the curve's own
    import mlflow

    from pipeline import tracking
    from pipeline.params import parse

    manifest, _ = store
    curve = tmp_path / "train_curve.csv"
    curve.write_text("epoch,step,loss_cycle,seconds\n1,2,0.70,1.0\n2,4,0.65,1.0\n")
    final = _json(tmp_path / "train.json", {"loss_cycle": 0.65, "steps": 4, "device": "cpu"})
    monkeypatch.setattr(tracking, "held_results", lambda stage, wanted: {"train": [final, curve]})
    with tracking.start_training(parse({}), manifest, None) as run:
        tracking._copy_held_results("evaluate")
    history = mlflow.MlflowClient().get_metric_history(run.info.run_id, "train.loss_cycle")
    assert sorted((m.step, m.value) for m in history) == [(2, 0.70), (4, 0.65), (4, 0.65)]
    assert [m.step for m in mlflow.MlflowClient().get_metric_history(run.info.run_id, "train.steps")] == [4]


def test_a_new_row_whose_filling_fails_ends_failed(store, tmp_path, monkeypatch):
    # open_run starts the row, then logs the model: an error there ended the stage with the row
    # still open, and MLflow closed it FINISHED at exit (seen with DVC's symlink cache)
    import mlflow

    from pipeline import tracking
    from pipeline.params import parse

    manifest, _ = store
    with pytest.raises(Exception), tracking.open_run(parse({}), tmp_path / "g.pt", "evaluate",
                                                     tmp_path / "no-shards", manifest):
        pass  # no shard to take the model's input example from
    assert mlflow.active_run() is None
    assert [r["status"] for r in rows(tmp_path).values()] == ["FAILED"]


def test_logged_model_loads_back_and_translates(reproduced, tmp_path):
    import mlflow

    root, _ = reproduced
    run_id, _ = the_row(root)
    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
    model = mlflow.pyfunc.load_model(f"runs:/{run_id}/photo2monet", dst_path=str(tmp_path))  # not a new /tmp dir
    batch = photos(root, 3)
    out = model.predict(batch)
    assert out.dtype == np.uint8 and out.shape == (3, 256, 256, 3)
    assert np.array_equal(out, expected_paintings(root, batch))
    read_only = batch.copy()  # as `np.asarray(PIL.Image.open(...))` reads a photo
    read_only.flags.writeable = False
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert np.array_equal(model.predict(read_only), out)
    assert not [w for w in seen if "writable" in str(w.message)], [str(w.message) for w in seen]
    (spec,) = model.metadata.get_input_schema().inputs  # the signature: one uint8 tensor of photos
    assert (spec.type, spec.shape) == (np.dtype(np.uint8), (-1, 256, 256, 3))
    with pytest.raises(Exception, match="uint8"):
        model.predict(batch.astype(np.float32))  # the signature or the model refuses it, by name


def test_the_logged_model_runs_its_own_code_whatever_pipeline_the_caller_imported(reproduced, tmp_path):
    # MLflow puts the model's code first on sys.path, but a module imported before under the same
    # name wins: a caller's own pipeline.py broke load_model (ImportError: cannot import name
    # 'generator_file'), and a process that had imported this repository's ran its code instead
    root, _ = reproduced
    run_id, _ = the_row(root)
    (tmp_path / "pipeline.py").write_text("def run():\n    return 'mine'\n")
    batch = photos(root, 2)
    np.save(tmp_path / "photos.npy", batch)
    script = f"""
import sys
import mlflow, numpy as np
import pipeline
mlflow.set_tracking_uri({f"sqlite:///{root / 'mlflow.db'}"!r})
model = mlflow.pyfunc.load_model('runs:/{run_id}/photo2monet', dst_path={str(tmp_path / 'model')!r})
np.save('out.npy', model.predict(np.load('photos.npy')))
assert sys.modules['pipeline'] is pipeline and pipeline.run() == 'mine'
print(sorted(name for name in sys.modules if name.startswith('pipeline')))
"""
    done = run([sys.executable, "-c", script], cwd=tmp_path, env=dict(os.environ))
    assert done.stdout.split()[-1] == "['pipeline']"  # the model's modules went with the load
    assert np.array_equal(np.load(tmp_path / "out.npy"), expected_paintings(root, batch))


def test_logging_the_model_prints_no_warning_nor_progress_of_mlflows_own_check(reproduced):
    root, _ = reproduced
    out = (root.parent / "repro.out").read_text()
    assert "train: logged to" in out  # the stage that logs the model printed here
    assert "Add type hints" not in out, out[-3000:]
    # log_model loads the model back to check the input example: its INFO line and download bar
    assert "Validating input example" not in out and "Downloading artifacts" not in out, out[-3000:]


def test_served_model_answers_a_rest_request(reproduced, tmp_path):
    root, env = reproduced
    run_id, _ = the_row(root)
    port = free_port()
    # TMPDIR: MLflow downloads the model into a temp folder it leaves behind; here, the test's own
    served_env = {**env, "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}", "TMPDIR": str(tmp_path)}
    log = tmp_path / "serve.log"
    proc = start([sys.executable, "-m", "mlflow", "models", "serve", "-m", f"runs:/{run_id}/photo2monet",
                  "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)], tmp_path, served_env, log)
    try:
        wait_for(f"http://127.0.0.1:{port}/ping", proc, log)
        batch = photos(root, 2)
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations",
                                         data=json.dumps({"inputs": batch.tolist()}).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as answer:
            paintings = np.array(json.loads(answer.read())["predictions"], dtype=np.uint8)
    finally:
        stop(proc)
    assert np.array_equal(paintings, expected_paintings(root, batch))


def test_two_queued_experiments_on_two_workers_make_two_complete_rows(reproduced):
    root, env = reproduced
    before = rows(root)
    dvc(root, env, "exp", "run", "--queue", "-S", "lambda_cycle=3,5")
    start_queue(root, {**env, "OMP_NUM_THREADS": "1"}, 2, root.parent / "queue.log")  # as the README: a core each
    deadline = time.time() + 900
    while time.time() < deadline:
        status = dvc(root, env, "queue", "status").stdout
        finished = status.count("Success") + status.count("Failed")  # both, not just none waiting
        if finished >= 2 and "Queued" not in status and "Running" not in status:
            break
        time.sleep(5)
    dvc(root, env, "queue", "stop", check=False, timeout=300)
    assert status.count("Success") == 2, status + dvc(root, env, "queue", "logs", "-e", "", check=False).stdout
    new = new_rows(root, before)
    assert sorted(r["params"]["lambda_cycle"] for r in new) == ["3", "5"]
    names = {line.split()[1] for line in status.splitlines()[1:] if "Success" in line}
    assert {r["name"] for r in new} == names  # named after their DVC experiments
    for row in new:
        assert_complete(row, root / "metrics", values=False)  # the experiments' own numbers, every key
        assert row["models"] == ["photo2monet"] and row["datasets"][0]["name"] == "embedded-sample"
    shown = dvc(root, env, "exp", "show", "--only-changed", "--csv").stdout
    assert "lambda_cycle" in shown and "fid_vs_ground_truth" in shown
    # the README's narrow table, as written there
    (narrow,) = [c for c in readme_recipes.commands() if c[:4] == ["dvc", "exp", "show", "--drop"]]
    table = [line.split(",") for line in dvc(root, env, *narrow[1:], "--csv").stdout.splitlines()]
    assert table[0] == ["Experiment", "fid_vs_ground_truth", "mifid", "lambda_cycle"]
    assert sorted(row[-1] for row in table[1:] if row[0] in names) == ["3", "5"]
    diff = dvc(root, env, "plots", "diff", *sorted(names), "--json").stdout
    assert "loss_cycle" in diff


def test_a_remote_tracking_server_receives_the_run(reproduced, tmp_path):
    root, env = reproduced
    port = free_port()
    log = tmp_path / "server.log"
    server = start([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                    "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
                    "--artifacts-destination", str(tmp_path / "server-artifacts")], tmp_path, env, log)
    try:
        wait_for(f"http://127.0.0.1:{port}/health", server, log)
        before = rows(root)
        uri = f"http://127.0.0.1:{port}"
        dvc(root, {**env, "MLFLOW_TRACKING_URI": uri}, "exp", "run", "-n", "remote", "-S", "lambda_cycle=7")
        assert rows(root) == before  # nothing in the local store
        from mlflow import MlflowClient

        client = MlflowClient(uri)
        (exp,) = [e for e in client.search_experiments() if e.name == "monet-cyclegan"]
        (found,) = client.search_runs([exp.experiment_id])
        assert found.info.run_name == "remote" and found.info.status == "FINISHED"
        assert found.data.params["lambda_cycle"] == "7" and "evaluate.fid_vs_ground_truth" in found.data.metrics
        assert {"grid.png", "memorization.png"} <= {a.path for a in client.list_artifacts(found.info.run_id)}
        assert list((tmp_path / "server-artifacts").rglob("grid.png"))  # proxied: the server wrote the files
    finally:
        stop(server)


def _train_alone(root: Path, env: dict, out: Path) -> subprocess.CompletedProcess:
    """The train stage of `root` with its outputs in `out` (the repository's own left as they are)."""
    return run([sys.executable, "-m", "pipeline.train", "--shards", "data/shards", "--manifest", "data/manifest.csv",
                "--generator", str(out / "g.pt"), "--reverse-generator", str(out / "r.pt"),
                "--checkpoint", str(out / "checkpoint.pt"), "--metrics", str(out / "m.json"), "--curve",
                str(out / "c.csv"), "--grid", str(out / "grid.png")], root, env, check=False, timeout=120)


def test_a_resume_refused_for_its_process_count_opens_no_row(reproduced, tmp_path):
    # refused inside training, after the row had opened: each refused try left a FAILED row with
    # every param that trained no step
    root, env = reproduced
    state = torch.load(root / ".cache/train/checkpoint.pt", weights_only=True)
    state["trainer"]["step"] = 1  # unfinished, written by two processes
    torch.save({**state, "processes": 2, "ranks": state["ranks"] * 2}, tmp_path / "checkpoint.pt")
    before = rows(root)
    res = _train_alone(root, env, tmp_path)
    assert res.returncode == 2, res.stderr[-2000:]
    assert res.stderr.strip().splitlines()[-1] == (
        f"error: train: {tmp_path / 'checkpoint.pt'} stopped at step 1 of a run with 2 processes, and this run "
        f"has 1: set train.processes=2 to resume it, or delete it to start afresh")
    assert new_rows(root, before) == [] and rows(root) == before


def test_an_unreachable_tracking_server_stops_train_before_any_step(reproduced, tmp_path):
    root, env = reproduced
    port = free_port()  # nothing listens there
    checkpoint = tmp_path / "checkpoint.pt"
    res = _train_alone(root, {**env, "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{port}"}, tmp_path)
    assert res.returncode != 0
    lines = res.stderr.strip().splitlines()
    assert lines[-1].startswith("error: tracking: no MLflow server answers at") and f":{port}" in lines[-1]
    assert not checkpoint.exists() and not list(tmp_path.iterdir())


def test_a_server_that_stops_answering_while_a_stage_logs_is_one_line_and_no_second_wait(store, monkeypatch):
    # after training (the server killed meanwhile): MLflow's retries, then ~250 lines of chained
    # tracebacks showing the password, the last about marking the row FAILED, which waited out
    # the retries a second time
    from pipeline import tracking
    from pipeline.params import parse

    manifest, generator = store
    p = parse({})
    with tracking.start_training(p, manifest, None) as run:
        pass
    mlflow, sqlite_store = tracking._mlflow(), tracking.tracking_uri()
    mlflow.start_run(run_id=run.info.run_id)  # the row a stage logs into, on MLflow's stack
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://alice:s3cretPW@127.0.0.1:{free_port()}")  # nothing there
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setattr(mlflow.tracking._tracking_service.utils, "_tracking_uri", None)  # put back afterwards
    mlflow.set_tracking_uri(tracking.tracking_uri())
    ended, end_run, timeout_before = [], mlflow.end_run, os.environ.get("MLFLOW_HTTP_REQUEST_TIMEOUT")

    def ending(*args):  # with no retries: the first try did not reach the server, nor will this one
        ended.append((args, os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"], os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"]))
        end_run(*args)

    monkeypatch.setattr(mlflow, "end_run", ending)
    with pytest.raises(tracking.ServerLost) as e, tracking._failing_ends(mlflow), tracking._serialized():
        mlflow.MlflowClient().get_run(run.info.run_id)
    assert str(e.value).startswith("tracking: the MLflow server at MLFLOW_TRACKING_URI=http://alice:***@127.0.0.1:")
    assert "(Connection refused, after MLflow's retries); start it and run the stage again" in str(e.value)
    assert "s3cretPW" not in str(e.value) and "\n" not in str(e.value)
    # one quick try to end the row, which takes it off MLflow's stack: MLflow ended it at exit,
    # waiting out its retries once more
    assert ended == [(("FAILED",), "0", "5")] and mlflow.active_run() is None
    assert os.environ.get("MLFLOW_HTTP_REQUEST_TIMEOUT") == timeout_before
    with pytest.raises(tracking.ServerLost), tracking.failure_marks_row(p, generator, "evaluate"):
        with tracking._serialized():
            mlflow.MlflowClient().get_run(run.info.run_id)
    assert len(ended) == 1  # (no row open yet there: nothing to try)
    # a forced rerun on a complete row: that one quick try ends it FINISHED, as it was
    lost_server = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(sqlite_store)
    mlflow.start_run(run_id=run.info.run_id)
    mlflow.set_tracking_uri(lost_server)
    with pytest.raises(tracking.ServerLost), tracking._failing_ends(mlflow, keep_end_time=1):
        with tracking._serialized():
            mlflow.MlflowClient().get_run(run.info.run_id)
    assert ended[1] == (("FINISHED",), "0", "5")
    # the first MLflow call of evaluate and package, after their work: the same line, not "MLflow
    # cannot use" the store with MLflow's message (and the password) in it
    with pytest.raises(tracking.ServerLost, match="^tracking: the MLflow server at .*alice:\\*\\*\\*@"), \
            tracking._serialized():
        tracking._experiment_id(mlflow)
    from mlflow.exceptions import MlflowException  # a host that drops packets: MLflow words it so
    timed_out = tracking._server_lost(MlflowException(
        "API request to http://alice:s3cretPW@10.0.0.1/api failed with timeout exception ConnectTimeoutError(...)"),
        tracking.tracking_uri())
    assert timed_out is not None and "(timed out, after MLflow's retries)" in str(timed_out)


def test_a_stage_prints_no_password_of_its_tracking_server(monkeypatch, capsys):
    # report()'s line and MLflow's own "View run ... at:" lines showed http://alice:s3cretPW@...
    from pipeline import tracking

    monkeypatch.setenv("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "")  # so that it is put back as it was:
    monkeypatch.delenv("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT")  # delenv alone records no absent variable
    mlflow = tracking._mlflow()
    monkeypatch.setattr(mlflow.tracking._tracking_service.utils, "_tracking_uri", None)  # put back afterwards
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://alice:s3cretPW@127.0.0.1:5077")
    run = types.SimpleNamespace(info=types.SimpleNamespace(experiment_id="1", run_id="abc"))
    monkeypatch.setattr(mlflow, "last_active_run", lambda: run)
    line = tracking.report("train")
    assert line.startswith("train: logged to http://alice:***@127.0.0.1:5077 in ") and "s3cretPW" not in line
    # the page without the credentials (the browser asks for them), not with '***' as the password
    assert line.endswith(": http://127.0.0.1:5077/#/experiments/1/runs/abc?workflowType=machine_learning")
    assert os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] == "true"


def test_an_experiment_named_by_its_id_is_one_line_before_the_work(store, monkeypatch):
    # MLFLOW_EXPERIMENT_ID was ignored without a word: the runs went to monet-cyclegan
    from pipeline import tracking

    monkeypatch.setenv("MLFLOW_EXPERIMENT_ID", "3")
    with pytest.raises(PipelineError, match=r"^tracking: MLFLOW_EXPERIMENT_ID=3 is set, but the pipeline names its "
                                            r"experiment: set MLFLOW_EXPERIMENT_NAME to that experiment's name"):
        tracking.check_store()
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "team")  # named as well: the name is the one taken
    tracking.check_store()


def test_a_deleted_experiment_is_one_line_before_the_work(store, tmp_path, monkeypatch):
    # deleted in the UI: MLflow refused to log into it with a traceback, evaluate's after its work
    from pipeline import tracking
    from pipeline.params import parse

    manifest, _ = store
    with tracking.start_training(parse({}), manifest, None) as run:
        pass
    tracking._mlflow().MlflowClient().delete_experiment(run.info.experiment_id)
    expected = (f"tracking: the MLflow experiment 'monet-cyclegan' in sqlite:///{tmp_path / 'mlflow.db'} is deleted; "
                f"restore it (MLFLOW_TRACKING_URI=sqlite:///{tmp_path / 'mlflow.db'} mlflow experiments restore "
                f"--experiment-id {run.info.experiment_id}), or set MLFLOW_EXPERIMENT_NAME to log into another "
                f"experiment")
    with pytest.raises(PipelineError, match=f"^{re.escape(expected)}$"):
        tracking.check_store()  # the stages' first step: no MLflow import
    with pytest.raises(PipelineError, match=f"^{re.escape(expected)}$"):
        tracking._experiment_id(tracking._mlflow())  # a server store: when the row opens
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "another")
    tracking.check_store()
    with tracking.start_training(parse({}), manifest, None) as other:
        assert other.info.experiment_id != run.info.experiment_id


def test_an_empty_experiment_name_is_no_name(store, monkeypatch):
    # MLFLOW_EXPERIMENT_NAME= (set, empty): the stages asked MLflow for an experiment named '', and
    # stopped on its traceback when it would not make one (Invalid experiment name)
    from pipeline import tracking
    from pipeline.params import parse

    manifest, _ = store
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "")
    tracking.check_store()
    with tracking.start_training(parse({}), manifest, None) as run:
        pass
    experiment = tracking._mlflow().get_experiment(run.info.experiment_id)
    assert experiment.name == "monet-cyclegan"


def test_a_store_mlflow_will_not_open_stops_train_before_any_step(reproduced, tmp_path):
    """A file store (`./mlruns`, what many MLflow users have), which MLflow 3 refuses unless
    MLFLOW_ALLOW_FILE_STORE is set: one line with MLflow's advice, not its traceback."""
    root, env = reproduced
    env = {k: v for k, v in env.items() if k != "MLFLOW_ALLOW_FILE_STORE"}
    checkpoint = tmp_path / "checkpoint.pt"
    res = _train_alone(root, {**env, "MLFLOW_TRACKING_URI": (tmp_path / "mlruns").as_uri()}, tmp_path)
    if res.returncode == 0:
        pytest.skip("this MLflow still opens file stores")
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-2000:]
    (line,) = res.stderr.strip().splitlines()[-1:]
    assert line.startswith(f"error: tracking: MLflow cannot use MLFLOW_TRACKING_URI={(tmp_path / 'mlruns').as_uri()}")
    assert "MLFLOW_ALLOW_FILE_STORE" in line  # MLflow's own way out, kept
    assert not checkpoint.exists() and not (tmp_path / "g.pt").exists()


def test_a_sqlite_store_in_a_folder_that_is_not_there_is_one_line_before_the_work(tmp_path, monkeypatch):
    # MLflow makes the file, not its folder: a FileNotFoundError traceback after training (package:
    # after its zip was written)
    from pipeline import tracking

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/typo/mlflow.db")
    with pytest.raises(PipelineError, match=rf"^tracking: MLFLOW_TRACKING_URI=sqlite:///{tmp_path}/typo/mlflow\.db "
                                            rf"is in {tmp_path}/typo, which does not exist; create it"):
        tracking.check_store()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    tracking.check_store()  # a file not made yet, in a folder that is there: MLflow makes it


def _immutable(path) -> bool:
    """`path` made unwritable even for root (chattr +i), where this file system allows it."""
    return shutil.which("chattr") is not None and subprocess.run(["chattr", "+i", str(path)],
                                                                 capture_output=True).returncode == 0


@pytest.mark.parametrize("what", ["file", "folder"])
def test_a_sqlite_store_this_user_may_not_write_is_one_line_before_the_work(tmp_path, monkeypatch, what):
    # MLflow opened it, read it, and failed on its first INSERT: a traceback of 216 lines after the
    # work; `sqlite:///` (the repository folder itself) was minutes of retries first
    from pipeline import tracking

    folder = tmp_path / "store"
    folder.mkdir()
    (folder / "mlflow.db").write_bytes(b"")
    locked = folder / "mlflow.db" if what == "file" else folder
    if os.geteuid() != 0:
        locked.chmod(0o555 if what == "folder" else 0o444)
    elif not _immutable(locked):
        pytest.skip("root, and no chattr +i here: a store root may not write cannot be made")
    try:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{folder}/mlflow.db")
        with pytest.raises(PipelineError, match="where this user may not write" if what == "folder"
                           else "is a file this user may not write"):
            tracking.check_store()
    finally:
        subprocess.run(["chattr", "-i", str(locked)], capture_output=True)
        locked.chmod(0o755)
    for uri in (f"sqlite:///{tmp_path}", f"sqlite:///{tmp_path}?timeout=5"):  # SQLite's options are no path
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        with pytest.raises(PipelineError, match=rf"^tracking: MLFLOW_TRACKING_URI={re.escape(uri)} names a folder"):
            tracking.check_store()


def test_where_a_new_experiment_keeps_its_artifacts(tmp_path, monkeypatch):
    from pipeline import tracking

    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    assert tracking.artifact_location("sqlite:////srv/x.db?timeout=5") == "file:///srv/mlartifacts"
    assert tracking.artifact_location("postgresql://me@db/mlflow") == (tmp_path / "mlartifacts").as_uri()
    # a file store keeps them inside itself, as MLflow does; a server decides for itself
    for uri in ("file:///srv/mlruns", "/srv/mlruns", "mlruns", "http://127.0.0.1:5000", "databricks"):
        assert tracking.artifact_location(uri) is None, uri


def test_a_server_behind_basic_auth_named_with_its_credentials_is_reached(monkeypatch):
    # http://user:password@host (MLflow sends them as a header): urllib took 'user:password@host'
    # for the host name, and the check said no server answers there
    import http.server
    import threading

    from pipeline import tracking

    heard = []

    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            heard.append((self.path, self.headers.get("Authorization")))
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"OK")

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://me:p%40ss@127.0.0.1:{server.server_port}/")
        tracking.check_store()
    finally:
        server.shutdown()
    assert heard == [("/health", "Basic bWU6cEBzcw==")]  # me:p@ss


def test_an_experiment_another_worker_makes_meanwhile_is_taken(store, monkeypatch):
    # two queue workers on a server store (no lock of ours): both found no experiment, and the
    # second one's create failed with RESOURCE_ALREADY_EXISTS, and its stage with it
    import mlflow
    from mlflow.exceptions import MlflowException

    from pipeline import tracking

    create = mlflow.create_experiment

    def raced(name, **kwargs):
        create(name, **kwargs)  # the other worker's
        raise MlflowException(f"Experiment '{name}' already exists.", error_code="RESOURCE_ALREADY_EXISTS")

    monkeypatch.setattr(mlflow, "create_experiment", raced)
    made = tracking._experiment_id(mlflow)
    assert made == mlflow.get_experiment_by_name(tracking.EXPERIMENT).experiment_id


def test_a_repository_whose_path_has_url_syntax_is_one_line_before_the_work(tmp_path, monkeypatch):
    # SQLAlchemy cuts a database path at '?' and decodes '%XX': a repository in `q?mark/` logged into
    # a file `q` beside it (and said it logged to the repository's mlflow.db); one in `50%20off/` failed
    # after the work
    from pipeline import tracking

    for name in ("q?mark", "50%20off"):
        repo = tmp_path / name
        repo.mkdir()
        monkeypatch.chdir(repo)
        monkeypatch.delenv("DVC_ROOT", raising=False)
        for typed in ("", "sqlite:///mlflow.db"):  # the default store, or one under the repository
            monkeypatch.setenv("MLFLOW_TRACKING_URI", typed)
            with pytest.raises(PipelineError, match=rf"tracking: the repository's path {re.escape(str(repo))} holds"):
                tracking.check_store()
        # as MLflow's set_tracking_uri leaves the variable, in the same process and its children
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{repo / 'mlflow.db'}")
        with pytest.raises(PipelineError, match="holds '\\?' or '%XX'"):
            tracking.check_store()
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'elsewhere.db'}")
        tracking.check_store()  # a store outside it, as the line advises
    plain = tmp_path / "100% done"  # a '%' without two hex digits is no escape: SQLAlchemy opens it
    plain.mkdir()
    monkeypatch.chdir(plain)
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    tracking.check_store()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["100% done", "50%20off", "q?mark"]  # nothing beside them
    # the store's file as SQLAlchemy opens it: an address the user typed with '%20' names a space
    assert tracking.sqlite_file("sqlite:////srv/50%20off/m.db?timeout=5") == Path("/srv/50 off/m.db")


def test_the_default_store_failing_to_open_is_named_as_the_default(tmp_path, monkeypatch):
    # the line said "MLFLOW_TRACKING_URI=<the default> (unset, the pipeline logs into <the default>)"
    import mlflow

    from pipeline import tracking
    repo = tmp_path / 'it\'s a "repo"'
    repo.mkdir()
    monkeypatch.chdir(repo)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)

    def refuse(name):  # what MLflow 3 raises making a store from such a folder
        raise RuntimeError("(sqlite3.OperationalError) near \"repo\": syntax error [SQL: INSERT INTO experiments ...]")

    monkeypatch.setattr(mlflow, "get_experiment_by_name", refuse)
    with pytest.raises(PipelineError) as e:
        tracking._experiment_id(mlflow)
    said = str(e.value)
    assert said.startswith(f"tracking: MLflow cannot use its store sqlite:///{repo / 'mlflow.db'}: ")
    assert "unset" not in said and "rename the folder" in said


def test_a_store_that_fails_to_open_is_one_line_without_its_password(monkeypatch):
    import mlflow

    from pipeline import tracking
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "postgresql://me:s3cret@db.example/mlflow")

    def refuse(name):
        raise ModuleNotFoundError("No module named 'psycopg'")

    monkeypatch.setattr(mlflow, "get_experiment_by_name", refuse)
    with pytest.raises(PipelineError) as e:
        tracking._experiment_id(mlflow)
    said = str(e.value)
    assert said.startswith("tracking: MLflow cannot use MLFLOW_TRACKING_URI=postgresql://me:***@db.example/mlflow")
    assert said.endswith("ModuleNotFoundError: No module named 'psycopg'")
    assert "s3cret" not in said and "\n" not in said


def test_a_curve_without_steps_logs_its_points_in_file_order(store, tmp_path):
    # a plot CSV with no `step` column (one added to dvc.yaml by hand) was a KeyError while its
    # results were copied into a row
    import mlflow

    from pipeline import tracking
    from pipeline.params import parse

    manifest, _ = store
    (tmp_path / "curve.csv").write_text("loss_a,loss_b\n3.0,1.0\n2.0,0.5\n")
    with tracking.start_training(parse({}), manifest, None) as run:
        tracking.log_curve(tmp_path / "curve.csv", "extra")
    history = mlflow.MlflowClient().get_metric_history(run.info.run_id, "extra.loss_a")
    assert [(m.step, m.value) for m in history] == [(0, 3.0), (1, 2.0)]


def test_results_a_stage_logs_itself_drop_the_row_they_were_copied_from(store, tmp_path):
    # a row filled from an earlier one (evaluate.results_from) kept naming it after evaluate ran and
    # logged its own results over the copies
    import mlflow

    from pipeline import tracking
    from pipeline.params import parse

    manifest, generator = store
    p = parse({"train": {"lr": 3e-5}})
    with tracking.start_training(p, manifest, None) as run:
        tracking.finish_training(p, generator)
        mlflow.set_tags({"evaluate.results_from": "an-earlier-row", "package.results_from": "an-earlier-row"})
    with tracking.open_run(p, generator, "evaluate", tmp_path, manifest):
        pass
    tags = rows(tmp_path)[run.info.run_id]["tags"]
    assert "evaluate.results_from" not in tags and tags["package.results_from"] == "an-earlier-row"


def test_a_stage_stopped_in_a_row_whose_results_of_it_are_copies_marks_it_killed(store, tmp_path):
    # generate filled the row from an earlier one; evaluate then ran for real and was interrupted,
    # and the copied scores passed for its own: the row stayed FINISHED
    import mlflow

    from pipeline import tracking
    from pipeline.params import parse

    manifest, generator = store
    p = parse({"train": {"lr": 4e-5}})
    with tracking.start_training(p, manifest, None) as run:
        tracking.finish_training(p, generator)
        mlflow.log_metrics({"evaluate.fid": 1.0, "package.images": 24})
        mlflow.set_tags({"evaluate.results_from": "an-earlier-row", "package.results_from": "an-earlier-row"})
    with pytest.raises(KeyboardInterrupt), tracking.failure_marks_row(p, generator, "evaluate"):
        raise KeyboardInterrupt
    assert rows(tmp_path)[run.info.run_id]["status"] == "KILLED"
