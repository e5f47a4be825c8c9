"""Training in two processes on the CPU (gloo), as the train stage starts them under DVC and as a
plain torchrun does; and a killed worker that must fail the stage at once, not hang it."""
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time

import psutil
import pytest
import torch
from workspace import dvc, make_repo, new_rows, rows, run, set_params

TINY = {
    "image_size": 32,
    "ingest": {"sample_photos": 24, "sample_paintings": 12, "shard_size": 16},
    "train": {"gen_filters": 4, "disc_filters": 4, "resnet_blocks": 1, "epochs": 2, "steps_per_epoch": 3,
              "batch_size": 2, "decay_from_epoch": 1, "grid_size": 4, "log_every": 1, "processes": 2},
    "generate": {"batch_size": 16},
    "evaluate": {"offline_image_size": 75, "batch_size": 16, "download": False},
    "package": {"min_images": 20, "max_images": 30},
}
TRAIN_ARGS = ["--shards", "data/shards", "--manifest", "data/manifest.csv", "--generator", "models/photo2monet.pt",
              "--reverse-generator", "models/monet2photo.pt", "--checkpoint", ".cache/train/checkpoint.pt",
              "--metrics", "metrics/train.json", "--curve", "metrics/train_curve.csv", "--grid", "metrics/grid.png"]


@pytest.fixture(scope="module")
def repo(tmp_path_factory, repo_root):
    root, env = make_repo(tmp_path_factory.mktemp("ddp"), repo_root, TINY)
    dvc(root, env, "repro", "ingest")
    return root, env


def test_two_processes_through_dvc(repo, tmp_path):
    root, env = repo
    env = {**env, "TMPDIR": str(tmp_path)}
    set_params(root, {"train": TINY["train"]})
    before = rows(root)
    res = dvc(root, env, "repro")
    for stage in ("train", "generate", "evaluate", "package"):  # generate loads the generator in one process
        assert f"Running stage '{stage}'" in res.stdout
    assert "weights identical on all 2 processes" in res.stdout
    assert "FutureWarning" not in res.stdout + res.stderr  # PyTorch's on DDP's broadcast_buffers, once a worker
    train = json.loads((root / "metrics/train.json").read_text())
    assert train["processes"] == 2 and train["steps"] == 6
    assert all(torch.isfinite(torch.tensor(v)) for k, v in train.items() if k.startswith("loss_"))
    state = torch.load(root / ".cache/train/checkpoint.pt", weights_only=True)
    assert state["processes"] == 2 and len(state["ranks"]) == 2
    assert not torch.equal(state["ranks"][0]["data_rng"], state["ranks"][1]["data_rng"])  # own batches
    (row,) = new_rows(root, before)  # one row, from rank 0 alone
    assert row["status"] == "FINISHED" and row["params"]["train.processes"] == "2"
    assert row["metrics"]["train.processes"] == 2 and "evaluate.fid" in row["metrics"]
    assert not list(tmp_path.glob("torchelastic_*"))  # the launcher's log folder goes with its run


def test_plain_torchrun_works_too(repo, tmp_path):
    root, env = repo
    env = {**env, "TMPDIR": str(tmp_path)}  # torchrun's own log folder, which it leaves behind
    set_params(root, {"train": {**TINY["train"], "epochs": 1, "decay_from_epoch": 1}})
    res = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "pipeline.train", *TRAIN_ARGS], root, env, timeout=600)
    assert "weights identical on all 2 processes" in res.stdout
    assert json.loads((root / "metrics/train.json").read_text())["processes"] == 2


def test_torchrun_with_another_process_count_than_the_params_is_one_line(repo, tmp_path):
    # it trained 2 processes (a global batch twice the size) while params.yaml, dvc.lock and the
    # MLflow params said 1: DVC's run-cache then gave these weights to the 1-process params
    root, env = repo
    env = {**env, "TMPDIR": str(tmp_path)}
    set_params(root, {"train": {**TINY["train"], "processes": 1}})
    before = {p: p.stat().st_mtime_ns for p in (root / "metrics").iterdir()}
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "-m", "pipeline.train", *TRAIN_ARGS], cwd=root, env=env, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode != 0
    said = [line for line in (res.stdout + res.stderr).splitlines() if line.startswith("error:")]
    assert said == ["error: train: torchrun started 2 processes, and train.processes is 1: set train.processes=2 "
                    "(a run records the process count it trained with; the global batch is batch_size × processes)"]
    assert {p: p.stat().st_mtime_ns for p in (root / "metrics").iterdir()} == before


def _worker(rank: int, timeout: float = 120) -> psutil.Process:
    deadline = time.time() + timeout
    while time.time() < deadline:
        for proc in psutil.process_iter(["cmdline"]):
            try:
                if "pipeline.train" in " ".join(proc.info["cmdline"] or []) \
                        and proc.environ().get("LOCAL_RANK") == str(rank):
                    return proc
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        time.sleep(0.5)
    raise AssertionError(f"no worker of rank {rank} appeared")


@pytest.mark.parametrize("victim", [1, 0])
def test_a_killed_worker_fails_the_stage_with_a_clear_error(repo, tmp_path, victim):
    root, env = repo
    env = {**env, "TMPDIR": str(tmp_path)}
    set_params(root, {"train": {**TINY["train"], "steps_per_epoch": 100_000}})  # hours, unless stopped
    before = rows(root)
    stage = subprocess.Popen([sys.executable, "-m", "dvc", "repro", "train"], cwd=root, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        workers = [_worker(0), _worker(1)]
        deadline = time.time() + 120
        while not new_rows(root, before) and time.time() < deadline:  # training, its row open
            time.sleep(1)
        time.sleep(2)
        workers[victim].send_signal(signal.SIGKILL)
        out, err = stage.communicate(timeout=120)  # no hang: the others are stopped at once
    finally:
        if stage.poll() is None:
            stage.kill()
    assert stage.returncode != 0
    # one line: not also the survivor's (with gloo's source path) nor the launcher's own log line
    # (rank 0 killed mid-way through its progress bar leaves the line open: the error follows it)
    said = re.findall(r"error: [^\r\n]*", out + err) + [line for line in (out + err).splitlines() if "exitcode" in line]
    assert said == [f"error: train: worker {victim} of 2 failed (signal SIGKILL); every worker was stopped"], out + err
    assert all(not w.is_running() or w.status() == psutil.STATUS_ZOMBIE for w in workers)
    assert not list(tmp_path.glob("torchelastic_*"))  # the failure was read from it before it went
    # rank 0 killed outright could not end its row: the launcher does
    assert [row["status"] for row in new_rows(root, before)] == ["FAILED"]


def test_workers_die_with_a_launcher_killed_outright(repo, tmp_path):
    # torchrun puts each worker in a session of its own: kill -9 of the stage (or of DVC's process
    # group) left them training, and rank 0 wrote the outputs of a stage DVC had called failed
    root, env = repo
    env = {**env, "TMPDIR": str(tmp_path)}
    set_params(root, {"train": {**TINY["train"], "steps_per_epoch": 30, "epochs": 2}})  # a minute or so
    outputs = [root / "models/photo2monet.pt", root / "metrics/train.json"]
    before = [p.stat().st_mtime_ns if p.exists() else None for p in outputs]
    launcher = subprocess.Popen([sys.executable, "-m", "pipeline.train", *TRAIN_ARGS], cwd=root, env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    workers = []
    try:
        workers = [_worker(0), _worker(1)]
        time.sleep(3)
        launcher.kill()
        launcher.wait()
        _, alive = psutil.wait_procs(workers, timeout=30)
        assert not alive, "workers outlived their launcher"
    finally:
        for proc in [*workers, psutil.Process(launcher.pid) if launcher.poll() is None else None]:
            with contextlib.suppress(AttributeError, psutil.NoSuchProcess):
                proc.kill()
    time.sleep(2)
    assert [p.stat().st_mtime_ns if p.exists() else None for p in outputs] == before


def test_ctrl_c_stops_every_worker_and_says_so_once(repo):
    """A terminal's Ctrl-C signals the whole process group: the launcher and every worker."""
    root, env = repo
    set_params(root, {"train": {**TINY["train"], "steps_per_epoch": 100_000}})
    stage = subprocess.Popen([sys.executable, "-m", "pipeline.train", *TRAIN_ARGS], cwd=root, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        workers = [_worker(0), _worker(1)]
        time.sleep(5)
        os.killpg(stage.pid, signal.SIGINT)
        out, err = stage.communicate(timeout=120)
    finally:
        if stage.poll() is None:
            os.killpg(stage.pid, signal.SIGKILL)
    assert stage.returncode == 130
    assert "Traceback" not in out + err, err[-3000:]
    said = [line for line in (out + err).splitlines() if line.startswith("error:")]
    assert said == ["error: train: interrupted; no output was left half-written "
                    "(run it again: it resumes from its last finished epoch)"]
    assert all(not w.is_running() or w.status() == psutil.STATUS_ZOMBIE for w in workers)


def test_an_error_every_rank_finds_is_said_once(repo, tmp_path):
    # a damaged checkpoint (or one of another process count): each rank said it, then the launcher
    # blamed a worker for it, 3 lines for 1 error
    root, env = repo
    env = {**env, "TMPDIR": str(tmp_path)}
    set_params(root, {"train": TINY["train"]})
    checkpoint = root / ".cache/train/checkpoint.pt"
    checkpoint.parent.mkdir(parents=True, exist_ok=True)
    checkpoint.write_bytes(b"PK\x03\x04" + bytes(1000))
    try:
        res = subprocess.run([sys.executable, "-m", "pipeline.train", *TRAIN_ARGS], cwd=root, env=env,
                             capture_output=True, text=True, timeout=600)
    finally:
        checkpoint.unlink()
    assert res.returncode == 2, res.stderr[-3000:]
    said = [line for line in (res.stdout + res.stderr).splitlines() if "error:" in line]
    assert len(said) == 1 and said[0].startswith(f"error: train: {checkpoint.relative_to(root)}"), said
    assert "Traceback" not in res.stderr


def test_running_out_of_memory_on_every_rank_is_said_once(repo, tmp_path):
    # each rank printed errors.cli's out-of-memory line, then the launcher blamed worker 1: 3 lines
    root, env = repo
    env = {**env, "TMPDIR": str(tmp_path)}
    set_params(root, {"train": {**TINY["train"], "batch_size": 10**14}})  # more than any address space holds
    try:
        res = subprocess.run([sys.executable, "-m", "pipeline.train", *TRAIN_ARGS], cwd=root, env=env,
                             capture_output=True, text=True, timeout=600)
    finally:
        set_params(root, {"train": TINY["train"]})
    assert res.returncode == 2, res.stderr[-3000:]
    said = [line for line in (res.stdout + res.stderr).splitlines() if "error:" in line]
    assert len(said) == 1 and said[0].startswith("error: train: out of memory (it asked for "), said
    assert "Traceback" not in res.stderr


def test_more_processes_than_gpus_is_one_line_before_any_worker_starts(tmp_path, monkeypatch, capsys):
    # one GPU per process: on a 1-GPU machine train.processes=2 started both workers, and the second
    # one failed in torch.cuda.set_device, asking for a GPU that is not there
    from pipeline import distributed, train
    from pipeline.errors import PipelineError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(distributed, "launch", lambda *args: pytest.fail("a worker was started"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    params = tmp_path / "params.yaml"
    params.write_text("device: cuda\ntrain:\n  processes: 2\n")
    with pytest.raises(SystemExit) as e:
        train.main(["--params", str(params), *TRAIN_ARGS])
    assert e.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        "error: train: 2 processes need a GPU each, and this machine shows 1: set train.processes "
        "(under torchrun: --nproc_per_node) to at most that"]
    # under a plain torchrun every worker checks it before taking its GPU
    with pytest.raises(PipelineError, match="2 processes need a GPU each, and this machine shows 1"):
        distributed.start(distributed.World(rank=1, size=2, local_rank=1, local_size=2), torch.device("cuda"))
    distributed.check_devices(1, torch.device("cuda"))  # one process, one GPU: fine
    distributed.check_devices(8, torch.device("cpu"))  # gloo on the CPU needs no GPU


@pytest.mark.parametrize("local_size, environ, threads", [
    (2, {}, 8),                                               # a share of the 16 cores each
    (2, {"OMP_NUM_THREADS": "1", "PIPELINE_TRAIN_LAUNCHER": "7"}, 1),  # the user's, through the stage
    (2, {"OMP_NUM_THREADS": "3"}, 3),                         # the user's, under a plain torchrun
    (1, {"OMP_NUM_THREADS": "1"}, 1),                         # one worker a machine: torchrun sets nothing
    (2, {"OMP_NUM_THREADS": "1"}, 8),                         # torchrun's own default, not a choice
    (2, {"OMP_NUM_THREADS": "many"}, 8),
])
def test_a_cpu_worker_takes_the_threads_the_user_set_or_its_share(local_size, environ, threads):
    # each worker took its share whatever OMP_NUM_THREADS said: a sweep's `OMP_NUM_THREADS=1 dvc
    # queue start -j 2` oversubscribed the cores with train.processes > 1
    from pipeline import distributed

    world = distributed.World(rank=0, size=4, local_rank=0, local_size=local_size)
    assert distributed.cpu_threads(world, environ, 16) == threads


def _train_as(rank: int, port: int, checkpoints: list[str], out: str) -> None:
    """Rank `rank` of a 2-process gloo training of a tiny recipe, with its own checkpoint path."""
    from pathlib import Path

    from pipeline import distributed
    from pipeline import train as train_stage
    from pipeline.params import parse

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    world = distributed.World(rank=rank, size=2, local_rank=rank, local_size=2)
    device = distributed.start(world, torch.device("cpu"))
    p = parse({"image_size": 32, "train": {"gen_filters": 4, "disc_filters": 4, "resnet_blocks": 1, "batch_size": 2,
                                           "epochs": 2, "steps_per_epoch": 2, "decay_from_epoch": 1}})
    g = torch.Generator().manual_seed(0)
    photos, monets = (torch.randint(0, 256, (n, 32, 32, 3), dtype=torch.uint8, generator=g) for n in (6, 4))
    said = []
    trainer, _ = train_stage.train(p, photos, monets, Path(checkpoints[rank]), "key", said.append, world, device)
    torch.save({"said": said, "G": trainer.nets.G.state_dict()}, f"{out}-{rank}.pt")
    distributed.finish(world)


def _two_processes(checkpoints: list, out, timeout: float = 240) -> list[dict]:
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.start_processes(_train_as, args=(port, [str(c) for c in checkpoints], str(out)), nprocs=2,
                             join=False, start_method="spawn")
    deadline = time.time() + timeout
    try:
        while not ctx.join(timeout=5):
            assert time.time() < deadline, "the two processes hung"
    finally:
        for proc in ctx.processes:
            if proc.is_alive():
                proc.kill()
    return [torch.load(f"{out}-{rank}.pt", weights_only=True) for rank in (0, 1)]


def test_every_rank_resumes_from_rank_0s_checkpoint(tmp_path):
    # on two machines only rank 0's disk has the checkpoint (rank 0 alone writes it): the other
    # rank trained from scratch while rank 0 resumed, and the two waited on each other
    checkpoint = tmp_path / "checkpoint.pt"
    first = _two_processes([checkpoint, checkpoint], tmp_path / "first")
    assert torch.load(checkpoint, weights_only=True)["trainer"]["step"] == 4
    elsewhere = tmp_path / "other-machine" / "checkpoint.pt"  # rank 1's disk: no checkpoint there
    again = _two_processes([checkpoint, elsewhere], tmp_path / "again")
    assert not elsewhere.exists()
    for rank in (0, 1):  # both resumed the finished run: the same weights as it saved, no step trained
        assert all(torch.equal(first[0]["G"][k], again[rank]["G"][k]) for k in first[0]["G"])
    assert any("resuming from" in line and "at step 4" in line for line in again[0]["said"])
