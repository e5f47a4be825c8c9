"""All five stages through DVC on a tiny configuration, in a temporary copy of the repository.

Each test stands alone (`pytest -k NAME`): the `reproduced` fixture runs the first `dvc repro`
once per module, and a test that changes the workspace counts the MLflow rows it adds itself."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image
from workspace import TINY, assert_complete, dvc, make_repo, new_rows, rows, run, set_params

STAGES = ("ingest", "train", "generate", "evaluate", "package")


@pytest.fixture(scope="module")
def repo(tmp_path_factory, repo_root):
    """A git + DVC repo holding the project's files (tracked and new), with tiny params."""
    return make_repo(tmp_path_factory.mktemp("e2e"), repo_root, TINY)


@pytest.fixture(scope="module")
def reproduced(repo):
    """The repo after its first `dvc repro`; returns (root, env, that repro's output)."""
    root, env = repo
    res = dvc(root, env, "repro")
    return root, env, res.stdout


def test_dvc_repro_runs_all_five_stages(reproduced):
    root, env, out = reproduced
    for stage in STAGES:
        assert f"Running stage '{stage}'" in out

    with zipfile.ZipFile(root / "data/images.zip") as zf:
        names = zf.namelist()
        assert len(names) == 24 and len(set(names)) == 24
        assert all("/" not in n and n.endswith(".jpg") for n in names)
        with zf.open(names[0]) as f, Image.open(f) as img:
            assert img.format == "JPEG" and img.size == (256, 256) and img.mode == "RGB"

    metrics = json.loads((root / "metrics/evaluate.json").read_text())
    for key in ("mifid", "fid", "distance", "kid_mean", "fid_identity", "fid_ground_truth", "fid_vs_ground_truth",
                "pair_l1"):
        assert isinstance(metrics[key], float) and metrics[key] == metrics[key]  # not NaN
    assert metrics["extractor"] == "offline"
    assert metrics["generated_images"] == 24 and metrics["paintings"] == 12 and metrics["baseline_images"] == 24
    with Image.open(root / "metrics/memorization.png") as img:
        assert img.format == "PNG"


def test_first_repro_makes_one_complete_row(reproduced):
    root, env, _ = reproduced
    first = [r for r in rows(root).values() if r["params"].get("lambda_cycle") == "10"
             and r["params"]["evaluate.batch_size"] == "16" and r["params"]["package.min_images"] == "20"]
    assert len(first) == 1
    assert_complete(first[0], root / "metrics")
    assert first[0]["params"]["train.epochs"] == "1"
    assert first[0]["name"].startswith("workspace@") and first[0]["tags"]["dvc_exp_name"] == "workspace"


def test_every_file_the_stages_write_is_declared_in_dvc_yaml(reproduced):
    root, _, _ = reproduced
    stages = yaml.safe_load((root / "dvc.yaml").read_text())["stages"]
    declared = {Path(next(iter(e)) if isinstance(e, dict) else e)
                for s in stages.values() for k in ("outs", "metrics", "plots") for e in s.get(k, [])}
    written = [f.relative_to(root) for d in ("data", "models", "metrics") for f in (root / d).rglob("*")
               if f.is_file() and f.name != ".gitignore"]
    undeclared = [str(f) for f in written if not any(f == d or d in f.parents for d in declared)]
    assert written and not undeclared


def test_dvc_plots_show_draws_each_plot_once_and_git_ignores_its_page(reproduced):
    root, env, _ = reproduced
    dvc(root, env, "plots", "show")
    page = (root / "dvc_plots" / "index.html").read_text()
    assert all(name in page for name in ("training losses", "grid.png", "memorization.png"))
    # each once: stage plots that the top-level plots also named were drawn twice; the loss curve's
    # stage plot is its seconds per epoch, as its title says (it was an untitled chart of them)
    drawn = json.loads(dvc(root, env, "plots", "show", "--json").stdout)["data"]
    assert sorted(drawn) == ["metrics/grid.png", "metrics/memorization.png", "metrics/train_curve.csv",
                             "training losses"], sorted(drawn)
    assert sorted(re.findall(r'id ?= ?"([^"]+)"', page)) == ["metrics_grid_png", "metrics_memorization_png",
                                                            "metrics_train_curve_csv", "training_losses"]
    (curve,) = drawn["metrics/train_curve.csv"]
    assert curve["content"]["title"]["text"] == "seconds per epoch" and '"field": "seconds"' in json.dumps(curve)
    untracked = run(["git", "status", "--porcelain", "--untracked-files=all"], root, env).stdout
    assert "dvc_plots" not in untracked, untracked


def test_real_dvc_lock_is_read_as_holding_after_a_repro(reproduced, monkeypatch):
    # the lock format DVC itself writes (hashes, folded commands, dotted params) reads as holding
    from pipeline.stage_results import held_results

    root, _, _ = reproduced
    assert list(held_results("evaluate", root)) == ["ingest", "train", "generate", "package"]
    # generate running: its fresh JPEG folder hashed as DVC hashes a folder matches evaluate's lock
    assert list(held_results("generate", root)) == ["ingest", "train", "evaluate", "package"]


def test_second_repro_does_nothing_and_logs_nothing(reproduced):
    root, env, _ = reproduced
    before = rows(root)
    res = dvc(root, env, "repro")
    assert "Running stage" not in res.stdout
    assert rows(root) == before


def _only_stage_reruns(root, env, over: dict, stage: str) -> dict:
    """Set `over` in params.yaml and `dvc repro`: `stage` alone runs, and makes one complete row."""
    before = rows(root)
    set_params(root, over)
    res = dvc(root, env, "repro")
    assert f"Running stage '{stage}'" in res.stdout
    assert not any(f"Running stage '{s}'" in res.stdout for s in STAGES if s != stage), res.stdout
    new = new_rows(root, before)
    assert len(new) == 1
    assert_complete(new[0], root / "metrics")
    return new[0]


def test_evaluate_only_rerun_makes_a_complete_row(reproduced):
    # DVC reruns evaluate alone: its new row gets train's and the unchanged package's results too
    root, env, _ = reproduced
    row = _only_stage_reruns(root, env, {"evaluate": {"batch_size": 8}}, "evaluate")
    assert row["params"]["evaluate.batch_size"] == "8"
    assert "train.loss_cycle" in row["metrics"]  # the training curve is copied too


def test_dvc_symlink_cache_still_makes_complete_rows(reproduced):
    # `cache.type: symlink` (for big data) makes every output a link into .dvc/cache; MLflow refused
    # the generator as a model artifact ("outside the artifact directory"), and the row stayed FINISHED
    root, env, _ = reproduced
    dvc(root, env, "config", "--local", "cache.type", "symlink")
    dvc(root, env, "checkout", "--relink")
    try:
        assert (root / "models/photo2monet.pt").is_symlink()
        row = _only_stage_reruns(root, env, {"evaluate": {"batch_size": 4}}, "evaluate")
        assert row["params"]["evaluate.batch_size"] == "4"
    finally:
        dvc(root, env, "config", "--local", "--unset", "cache.type")
        dvc(root, env, "checkout", "--relink")


def test_retraining_to_the_same_weights_skips_the_rest_and_still_makes_a_complete_row(reproduced):
    # a train-only param (the grid's size) retrains; training is deterministic and the generator
    # file reproducible, so DVC skips generate/evaluate/package and train's new row is filled from them
    root, env, _ = reproduced
    before = rows(root)
    generator = (root / "models/photo2monet.pt").read_bytes()
    set_params(root, {"train": {"grid_size": 3}})
    res = dvc(root, env, "repro")
    assert "Running stage 'train'" in res.stdout
    assert not any(f"Running stage '{s}'" in res.stdout for s in ("generate", "evaluate", "package"))
    assert (root / "models/photo2monet.pt").read_bytes() == generator
    new = new_rows(root, before)
    assert len(new) == 1 and new[0]["params"]["train.grid_size"] == "3"
    assert_complete(new[0], root / "metrics")


def test_a_fresh_clones_first_repro_makes_a_complete_row_when_evaluate_is_skipped(reproduced):
    # A fresh clone has the committed metrics (git) but none of the data, models or JPEGs: every
    # stage but evaluate reruns, and reproduces the locked bytes, so DVC skips evaluate. package,
    # which reruns (no zip), finds train's row and must fill in evaluate's results.
    root, env, _ = reproduced
    before = rows(root)
    for path in ("data/raw", "data/shards", "data/manifest.csv", "models/photo2monet.pt", "models/monet2photo.pt",
                 ".cache/train", "data/generated", "data/images.zip"):
        shutil.rmtree(root / path) if (root / path).is_dir() else (root / path).unlink()
    shutil.rmtree(root / ".dvc/cache")  # nor a DVC cache to check them out from
    res = dvc(root, env, "repro")
    assert all(f"Running stage '{s}'" in res.stdout for s in ("ingest", "train", "generate", "package")), res.stdout
    assert "Running stage 'evaluate'" not in res.stdout
    new = new_rows(root, before)
    assert len(new) == 1
    assert_complete(new[0], root / "metrics")


def test_a_clone_that_pulls_from_a_dvc_remote_has_nothing_to_rerun(reproduced, tmp_path):
    # how a team shares results: commit, `dvc push`; elsewhere `git clone`, `dvc pull`. Every output
    # must come back, or DVC reruns its stage (it did: the checkpoint, an uncached output, retrained)
    root, env, _ = reproduced
    dvc(root, env, "repro")  # whatever params earlier tests left, their outputs are current
    run(["git", "add", "-A"], root, env)
    run(["git", "commit", "-qm", "results", "--allow-empty"], root, env)
    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(root), str(clone)], tmp_path, env)
    for where in (root, clone):  # --local: the remote stays out of the committed .dvc/config
        dvc(where, env, "remote", "add", "--local", "-d", "store", str(tmp_path / "remote"))
    dvc(root, env, "push")
    dvc(clone, env, "pull")
    assert "Data and pipelines are up to date" in dvc(clone, env, "status").stdout
    res = dvc(clone, env, "repro")
    assert "Running stage" not in res.stdout, res.stdout
    assert (clone / "models/photo2monet.pt").read_bytes() == (root / "models/photo2monet.pt").read_bytes()


def test_params_trained_before_come_back_from_dvcs_run_cache(reproduced):
    # back to params DVC has trained before, train's outputs are restored from DVC's run-cache, not
    # trained again (an output with `persist: true`, as the checkpoint was, turns the run-cache off)
    root, env, _ = reproduced
    dvc(root, env, "repro")
    grid_size = yaml.safe_load((root / "params.yaml").read_text())["train"]["grid_size"]
    grid = (root / "metrics/grid.png").read_bytes()
    set_params(root, {"train": {"grid_size": grid_size + 1}})
    assert "Running stage 'train'" in dvc(root, env, "repro").stdout
    assert (root / "metrics/grid.png").read_bytes() != grid
    before = rows(root)
    set_params(root, {"train": {"grid_size": grid_size}})
    res = dvc(root, env, "repro")
    assert "Stage 'train' is cached - skipping run, checking out outputs" in res.stdout, res.stdout
    assert "Running stage" not in res.stdout
    assert (root / "metrics/grid.png").read_bytes() == grid
    assert rows(root) == before  # nothing ran, so nothing logged


def test_a_retraining_to_weights_made_before_gets_the_restored_stages_results_in_its_row(reproduced):
    # training is deterministic: back to params trained before (with a train-only param changed,
    # so train itself runs), it makes the same weights, and DVC restores generate, evaluate and
    # package from its run-cache instead of running them. Nothing logged their results into the
    # new row, which held train's alone
    root, env, _ = reproduced
    dvc(root, env, "repro", "-f")  # every stage runs: each in DVC's run-cache (another test empties it)
    # its row spans them all: train copied in the later stages' results (the lock said they held),
    # and the stages after it, forced all the same, had kept the row's end at training's
    forced = max(rows(root).values(), key=lambda row: row["end_time"])
    assert forced["status"] == "FINISHED"
    assert forced["end_time"] / 1000 >= (root / "metrics/package.json").stat().st_mtime
    params = yaml.safe_load((root / "params.yaml").read_text())
    scores = json.loads((root / "metrics/evaluate.json").read_text())
    set_params(root, {"lambda_identity": params["lambda_identity"] + 0.25})
    dvc(root, env, "repro")
    before = rows(root)
    set_params(root, {"lambda_identity": params["lambda_identity"],
                      "train": {"log_every": params["train"]["log_every"] + 1}})
    res = dvc(root, env, "repro")
    assert "Running stage 'train'" in res.stdout
    restored = [s for s in ("generate", "evaluate", "package") if f"Stage '{s}' is cached - skipping run" in res.stdout]
    assert restored == ["generate", "evaluate", "package"], res.stdout
    (new,) = new_rows(root, before)
    assert json.loads((root / "metrics/evaluate.json").read_text()) == scores
    assert_complete(new, root / "metrics")


def test_a_training_killed_outright_resumes_when_dvc_runs_it_again(reproduced):
    # kill -9 runs no handler; DVC must leave the resumable state where it was, and its rerun resume it
    root, env, _ = reproduced
    steps = 150  # per epoch: a few seconds at this size, so the kill lands in the second epoch
    set_params(root, {"train": {"epochs": 2, "steps_per_epoch": steps, "decay_from_epoch": 1}})
    checkpoint = root / ".cache/train/checkpoint.pt"
    checkpoint.unlink(missing_ok=True)
    stage = subprocess.Popen([sys.executable, "-m", "dvc", "repro", "train"], cwd=root, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 300
        while not checkpoint.exists() and stage.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        os.killpg(stage.pid, signal.SIGKILL)  # DVC and the stage under it
        stage.wait(timeout=60)
    finally:
        if stage.poll() is None:
            os.killpg(stage.pid, signal.SIGKILL)
    assert torch.load(checkpoint, weights_only=True)["trainer"]["step"] == steps
    res = dvc(root, env, "repro")  # every stage: later tests start from a reproduced workspace
    assert f"resuming from .cache/train/checkpoint.pt at step {steps}" in res.stdout, res.stdout
    assert json.loads((root / "metrics/train.json").read_text())["steps"] == 2 * steps


def test_sigterm_stops_a_stage_as_ctrl_c_does(reproduced):
    # what `kill`, `timeout` and job schedulers send: the stage died on the spot, its row left
    # RUNNING, its temp files left for the next run, and not a word said
    root, env, _ = reproduced
    steps = 140  # not the kill -9 test's 150: DVC would find this training done already
    set_params(root, {"train": {"epochs": 2, "steps_per_epoch": steps, "decay_from_epoch": 1}})
    checkpoint = root / ".cache/train/checkpoint.pt"
    checkpoint.unlink(missing_ok=True)
    before = rows(root)
    cmd = yaml.safe_load((root / "dvc.yaml").read_text())["stages"]["train"]["cmd"].split()
    stage = subprocess.Popen([sys.executable, *cmd[1:]], cwd=root, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        while not checkpoint.exists() and stage.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        stage.send_signal(signal.SIGTERM)
        out, err = stage.communicate(timeout=60)
    finally:
        if stage.poll() is None:
            stage.kill()
    assert stage.returncode == 143, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    assert err.rstrip().endswith("\nerror: train: stopped by SIGTERM; no output was left half-written (run it "
                                 "again: it resumes from its last finished epoch)"), err[-3000:]
    assert [row["status"] for row in new_rows(root, before)] == ["KILLED"]
    assert not [p for p in root.rglob(".*.tmp") if ".dvc" not in p.parts]  # every temp output removed
    res = dvc(root, env, "repro")  # every stage: later tests start from a reproduced workspace
    assert f"resuming from .cache/train/checkpoint.pt at step {steps}" in res.stdout, res.stdout


def test_a_generate_param_that_leaves_the_jpegs_alone_still_makes_a_complete_row(reproduced):
    # another generate batch size: the same JPEGs, so DVC skips evaluate and package, and generate
    # is the one stage that runs; it makes the experiment's row from what the others left
    root, env, _ = reproduced
    row = _only_stage_reruns(root, env, {"generate": {"batch_size": 5}}, "generate")
    assert row["params"]["generate.batch_size"] == "5"
    set_params(root, {"generate": {"batch_size": 16}})


def test_a_generate_param_after_the_readmes_way_back_from_an_experiment_makes_a_complete_row(reproduced):
    # `git checkout params.yaml` after an experiment leaves dvc.lock at the experiment's: DVC then
    # restores train, evaluate and package from its run-cache, and generate, the one stage that
    # runs, read their lock entries as stale and made no row at all
    root, env, _ = reproduced
    dvc(root, env, "exp", "run", "-S", "lambda_cycle=4")
    run(["git", "checkout", "params.yaml"], root, env)
    before = rows(root)
    res = dvc(root, env, "exp", "run", "-n", "batch-seven", "-S", "generate.batch_size=7")
    assert "Running stage 'generate'" in res.stdout
    assert not any(f"Running stage '{s}'" in res.stdout for s in ("train", "evaluate", "package")), res.stdout
    new = new_rows(root, before)
    assert len(new) == 1 and new[0]["name"] == "batch-seven" and new[0]["params"]["generate.batch_size"] == "7"
    assert new[0]["params"]["lambda_cycle"] == "10"
    assert_complete(new[0], root / "metrics")
    assert new[0]["tags"]["evaluate.results_from"] == new[0]["tags"]["package.results_from"]
    # other JPEGs, and generate alone asked for: no earlier row holds their scores, so it makes no
    # row (one without them); evaluate makes it when it runs
    set_params(root, {"generate": {"jpeg_quality": 90}})
    before = rows(root)
    res = dvc(root, env, "repro", "generate")
    assert "Running stage 'generate'" in res.stdout and not new_rows(root, before)
    # a train param changed and generate run alone: its generator was not trained under these params,
    # so it makes no row that would say it was
    set_params(root, {"lambda_cycle": 2, "generate": {"jpeg_quality": 95, "batch_size": 9}})
    res = dvc(root, env, "repro", "-s", "generate")
    assert "Running stage 'generate'" in res.stdout and not new_rows(root, before)
    run(["git", "checkout", "params.yaml"], root, env)
    dvc(root, env, "repro")  # the committed params' outputs back, from the run-cache


def test_package_only_reruns_make_complete_rows_with_distinct_names(reproduced):
    root, env, _ = reproduced
    before = rows(root)
    for min_images in (19, 18):
        set_params(root, {"package": {"min_images": min_images}})
        res = dvc(root, env, "repro")
        assert "Running stage 'package'" in res.stdout and "Running stage 'evaluate'" not in res.stdout
    new = new_rows(root, before)
    assert sorted(r["params"]["package.min_images"] for r in new) == ["18", "19"]
    for row in new:
        assert_complete(row, root / "metrics")
    names = [r["name"] for r in new]
    assert len(set(names)) == 2 and all(n.startswith("workspace@") for n in names)


def test_exp_run_is_a_new_complete_row_named_after_the_experiment(reproduced):
    root, env, _ = reproduced
    before = rows(root)
    dvc(root, env, "exp", "run", "-n", "cycle-five", "-S", "lambda_cycle=5")
    new = new_rows(root, before)
    assert len(new) == 1 and new[0]["params"]["lambda_cycle"] == "5"
    assert new[0]["name"] == "cycle-five" and new[0]["tags"]["dvc_exp_name"] == "cycle-five"
    assert_complete(new[0], root / "metrics")


def test_exp_run_takes_every_float_form_dvc_writes(reproduced):
    # DVC writes `lr: 1e-05` (YAML 1.2: a float; a YAML 1.1 reader sees a string) and `1e+1`, `.5` as given
    root, env, _ = reproduced
    before = rows(root)
    dvc(root, env, "exp", "run", "-n", "small-lr", "-S", "train.lr=1e-5", "-S", "lambda_cycle=1e+1",
        "-S", "lambda_identity=.5")
    written = (root / "params.yaml").read_text()
    assert "lr: 1e-05" in written, written
    new = new_rows(root, before)
    assert len(new) == 1 and new[0]["name"] == "small-lr"
    assert (new[0]["params"]["train.lr"], new[0]["params"]["lambda_cycle"],
            new[0]["params"]["lambda_identity"]) == ("1e-05", "10", "0.5")
    assert_complete(new[0], root / "metrics")


def test_temp_experiment_logs_into_the_main_store(reproduced):
    # `dvc exp run --temp` runs the stages inside .dvc/tmp/exps/...: the row must still land in <repo>/mlflow.db
    root, env, _ = reproduced
    before = rows(root)
    dvc(root, env, "exp", "run", "--temp", "-S", "lambda_cycle=3")
    new = new_rows(root, before)
    assert len(new) == 1 and new[0]["params"]["lambda_cycle"] == "3"
    assert new[0]["status"] == "FINISHED" and "evaluate.fid" in new[0]["metrics"]
    assert not list((root / ".dvc/tmp").rglob("mlflow.db"))


def test_bad_param_is_one_line_and_nonzero(repo):
    root, env = repo
    bad = root / "bad.yaml"
    bad.write_text("lambda_cycle: 5\ntrain:\n  epochz: 3\n")
    res = run([sys.executable, "-m", "pipeline.train", "--params", str(bad), "--shards", "x", "--manifest", "x",
                "--generator", "x", "--reverse-generator", "x", "--checkpoint", "x", "--metrics", "x",
                "--curve", "x", "--grid", "x"], root, env, check=False)
    assert res.returncode == 2
    assert res.stderr.startswith("error: params: unknown key 'train.epochz'")
    assert len(res.stderr.strip().splitlines()) == 1


def test_an_evaluate_or_package_that_fails_marks_the_row_failed(reproduced):
    # train made this execution's row; a later stage that refuses its input marks it FAILED, as a
    # failing training does, instead of leaving it FINISHED without that stage's numbers
    root, env, _ = reproduced
    before = rows(root)
    set_params(root, {"lambda_cycle": 3.0, "evaluate": {"extractor": "fid-inception", "weights": "missing.pth",
                                                        "download": False}})
    res = dvc(root, env, "repro", check=False)
    assert res.returncode != 0 and "Running stage 'train'" in res.stdout and "missing.pth" in res.stderr
    failed = new_rows(root, before)
    assert len(failed) == 1 and failed[0]["status"] == "FAILED" and "train.loss_cycle" in failed[0]["metrics"]
    assert not any(k.startswith("evaluate.") for k in failed[0]["metrics"])
    # evaluate works again (a new row: other params); package wants more images than there are
    between = rows(root)
    set_params(root, {"evaluate": {"extractor": "offline", "weights": "", "download": True},
                      "package": {"min_images": 30}})
    res = dvc(root, env, "repro", check=False)
    assert res.returncode != 0 and "24 images; the submission needs 30–" in res.stderr
    again = new_rows(root, between)
    assert len(again) == 1 and again[0]["status"] == "FAILED" and "evaluate.fid" in again[0]["metrics"]
    assert not any(k.startswith("package.") for k in again[0]["metrics"])
    set_params(root, {"lambda_cycle": 10.0, "package": {"min_images": 20}})
