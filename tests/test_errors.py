"""The stages' one place for errors: a user's mistake or Ctrl-C is one line and an exit code."""
import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.errors import DataError, cli


def _stage(exc, monkeypatch, name="train"):
    monkeypatch.setattr(sys, "argv", [f"/repo/pipeline/{name}.py", "--shards", "data/shards"])  # as `python -m`

    @cli
    def main():
        raise exc

    with pytest.raises(SystemExit) as e:
        main()
    return e.value.code


def test_a_pipeline_error_is_one_line_and_exit_2(monkeypatch, capsys):
    assert _stage(DataError("data/x.tfrec: record 3: truncated"), monkeypatch) == 2
    assert capsys.readouterr().err == "error: data/x.tfrec: record 3: truncated\n"


@pytest.mark.parametrize("name, hint", [("train", ": it resumes from its last finished epoch"), ("evaluate", "")])
def test_ctrl_c_is_one_line_and_exit_130(name, hint, monkeypatch, capsys):
    assert _stage(KeyboardInterrupt(), monkeypatch, name) == 130
    said = capsys.readouterr().err
    assert said == f"error: {name}: interrupted; no output was left half-written (run it again{hint})\n"


def test_ctrl_c_of_a_queued_training_does_not_promise_a_resume(tmp_path, monkeypatch, capsys):
    # DVC ran it in .dvc/tmp/exps/..., which it deletes with the checkpoint in it
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DVC_ROOT", str(tmp_path.parent))
    assert _stage(KeyboardInterrupt(), monkeypatch, "train") == 130
    assert capsys.readouterr().err == ("error: train: interrupted; no output was left half-written (run it again; "
                                       "as a queued or --temp experiment it trains afresh: its checkpoint was in "
                                       "DVC's temp folder)\n")


def test_sigterm_is_one_line_and_exit_143(monkeypatch, capsys):
    import os
    import signal

    def main():
        os.kill(os.getpid(), signal.SIGTERM)  # what `kill` and job schedulers send
        time.sleep(10)

    monkeypatch.setattr(sys, "argv", ["/repo/pipeline/generate.py"])
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as e:
        cli(main)()
    assert e.value.code == 143
    assert capsys.readouterr().err == ("error: generate: stopped by SIGTERM; no output was left half-written "
                                       "(run it again)\n")
    assert signal.getsignal(signal.SIGTERM) is before  # the caller's handler back


def _lose_a_signal(signum):
    """A signal whose handler runs inside a weakref callback (its exception lost there)."""
    import weakref

    class Held:
        pass

    held = Held()
    ref = weakref.ref(held, lambda _: signal.raise_signal(signum))
    del held
    assert ref() is None


@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_that_lands_in_a_weakref_callback_still_stops_the_stage(signum, code, monkeypatch, capsys):
    # its handler's exception raised inside the callback, where Python only prints it: the stage went
    # on, wrote its outputs and exited 0 (seen once in 13 SIGTERMs of evaluate)
    def main():
        _lose_a_signal(signum)
        time.sleep(10)

    monkeypatch.setattr(sys, "argv", ["/repo/pipeline/evaluate.py"])
    hook = sys.unraisablehook
    with pytest.raises(SystemExit) as e:
        cli(main)()
    assert e.value.code == code
    said = capsys.readouterr().err
    assert said.startswith("error: evaluate: stopped by SIGTERM" if signum == signal.SIGTERM else
                           "error: evaluate: interrupted") and "Exception ignored" not in said, said
    assert sys.unraisablehook is hook


def test_a_lost_signal_is_not_sent_again_once_the_stage_has_ended(monkeypatch):
    # a stage that returned within the 50 ms was then killed by the signal sent again, with the
    # caller's handler back (the default: the process died after its work was done)
    monkeypatch.setattr(sys, "argv", ["/repo/pipeline/evaluate.py"])
    received = []
    before = signal.signal(signal.SIGTERM, lambda *_: received.append("SIGTERM"))
    try:
        assert cli(lambda: _lose_a_signal(signal.SIGTERM) or "done")() == "done"
        time.sleep(0.3)
    finally:
        signal.signal(signal.SIGTERM, before)
    assert received == []


def test_a_stop_that_arrives_after_a_lost_one_is_not_interrupted_by_it(monkeypatch, capsys):
    # the lost one sent again 50 ms later landed in the cleanup of the one that got through
    monkeypatch.setattr(sys, "argv", ["/repo/pipeline/evaluate.py"])
    cleaned = []

    def main():
        _lose_a_signal(signal.SIGTERM)
        try:
            signal.raise_signal(signal.SIGINT)  # Ctrl-C, in the stage's own code
        finally:
            time.sleep(0.3)  # removing temp files, marking the row
            cleaned.append(True)

    with pytest.raises(SystemExit) as e:
        cli(main)()
    assert e.value.code == 130 and cleaned == [True]
    assert capsys.readouterr().err.startswith("error: evaluate: interrupted")


def test_a_bug_keeps_its_traceback(monkeypatch):
    with pytest.raises(ZeroDivisionError):
        _stage(ZeroDivisionError("a bug"), monkeypatch)


def test_params_that_ask_for_more_memory_than_there_is_are_one_line_and_exit_2(monkeypatch, capsys):
    # `train.batch_size: 10000000` was 27 lines ending in torch's "DefaultCPUAllocator: can't allocate memory"
    import torch

    try:
        torch.empty(2**62, dtype=torch.uint8)  # more than any address space: torch's own error, on any machine
    except RuntimeError as e:
        error = e
    assert _stage(error, monkeypatch, "train") == 2
    assert capsys.readouterr().err == (
        "error: train: out of memory (it asked for 4194304.0 TiB at once); lower train.batch_size (per process), "
        "train.gen_filters, train.disc_filters, train.resnet_blocks or image_size (no output was left "
        "half-written)\n")
    # many small allocations (train.resnet_blocks: 100000000) fail on a small one: its size, not '0.0 GiB'
    small = RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 2359296 bytes.")
    assert _stage(small, monkeypatch, "train") == 2
    assert "(it asked for 2.2 MiB at once)" in capsys.readouterr().err
    # sizes multiplied past what 64 bits count (train.batch_size near 2**62): torch's own error
    try:
        torch.randint(0, 2, (2**62,))
    except RuntimeError as e:
        overflowed = e
    assert _stage(overflowed, monkeypatch, "train") == 2
    assert capsys.readouterr().err.startswith("error: train: out of memory (it asked for more than a 64-bit size ")
    # a KID of many subsets (evaluate.kid_subsets: 10000000000) runs out of memory in NumPy, not in a batch
    assert _stage(MemoryError(), monkeypatch, "evaluate") == 2
    assert capsys.readouterr().err == ("error: evaluate: out of memory; lower evaluate.batch_size or "
                                       "evaluate.kid_subsets (no output was left half-written)\n")
    gpu = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB. GPU 0 has a total capacity of "
                                 "79.19 GiB of which 1.10 GiB is free.")
    assert _stage(gpu, monkeypatch, "generate") == 2
    assert capsys.readouterr().err == ("error: generate: out of memory (it asked the GPU for 20.00 GiB more); lower "
                                       "generate.batch_size (no output was left half-written)\n")
    assert _stage(MemoryError(), monkeypatch, "ingest") == 2
    assert capsys.readouterr().err == ("error: ingest: out of memory; lower the sizes in params.yaml (no output was "
                                       "left half-written)\n")
    with pytest.raises(RuntimeError, match="shape"):  # any other RuntimeError is a bug: its traceback stays
        _stage(RuntimeError("shape '[2, 3]' is invalid"), monkeypatch)


def test_a_full_disk_is_one_line_naming_the_folder_left_and_exit_2(tmp_path, monkeypatch, capsys):
    # as shutil.copyfile says it: the source, then the target (a temp name inside a temp folder, gone)
    gone = tmp_path / "data" / ".raw.x1.tmp" / "photo_tfrec" / "p.tfrec"
    (tmp_path / "data").mkdir()
    full = OSError(errno.ENOSPC, "No space left on device", "/src/p.tfrec", None, str(gone))
    assert _stage(full, monkeypatch, "ingest") == 2
    assert capsys.readouterr().err == (f"error: ingest: No space left on device in {tmp_path / 'data'}; free some "
                                       f"space and run it again (no output was left half-written)\n")



@pytest.mark.parametrize("error, shown", [
    (OSError(errno.EROFS, "Read-only file system", "/ro/data/.images.zip.7124@vm+x1.tmp"),
     "Read-only file system: /ro/data"),                          # an output's temp name: its folder
    (PermissionError(errno.EACCES, "Permission denied", "/data/shards"), "Permission denied: /data/shards"),
])
def test_an_output_the_stage_may_not_write_is_one_line_and_exit_2(error, shown, monkeypatch, capsys):
    assert _stage(error, monkeypatch, "package") == 2
    assert capsys.readouterr().err == f"error: package: {shown} (no output was left half-written)\n"


@pytest.mark.parametrize("inside", [False, True])
def test_a_file_where_a_folder_is_needed_is_one_line_naming_it(tmp_path, monkeypatch, capsys, inside):
    # `touch .cache/features`: the feature cache's mkdir said FileExistsError, with a traceback
    from pipeline.files import write_bytes

    (tmp_path / "features").write_text("in the way")
    target = tmp_path / "features" / ("sub/x.npy" if inside else "x.npy")

    monkeypatch.setattr(sys, "argv", ["/repo/pipeline/evaluate.py"])

    @cli
    def main():
        write_bytes(target, b"x")

    with pytest.raises(SystemExit) as e:
        main()
    assert e.value.code == 2
    folder = target.parent
    assert capsys.readouterr().err == (f"error: {tmp_path / 'features'} is a file where a folder is needed (for "
                                       f"{folder}); move it away\n")


TRAIN_OUTPUTS = {"--generator": "g.pt", "--reverse-generator": "r.pt", "--checkpoint": "c.pt", "--metrics": "m.json",
                 "--curve": "c.csv", "--grid": "g.png"}


@pytest.mark.parametrize("change, said", [
    # a folder where a file goes: a whole training, then IsADirectoryError's traceback
    ({"--generator": "models"}, "train: --generator models is a folder; it names the file to write"),
    # two flags on one file: exit 0, and generate read the Monet→photo generator without a word
    ({"--reverse-generator": "g.pt"}, "train: --generator and --reverse-generator are both g.pt; each names an "
                                      "output of its own"),
    ({}, "m.csv: a folder, not a manifest (ingest writes it as a CSV file)"),  # was IsADirectoryError's traceback
])
def test_train_refuses_outputs_it_cannot_write_and_a_folder_for_a_manifest_before_training(
        change, said, tmp_path, repo_root, capsys, monkeypatch):
    from pipeline import train

    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    (tmp_path / "m.csv").mkdir()
    flags = [x for flag, path in {**TRAIN_OUTPUTS, **change}.items() for x in (flag, path)]
    with pytest.raises(SystemExit) as e:
        train.main(["--params", str(repo_root / "params.yaml"), "--shards", "s", "--manifest", "m.csv", *flags])
    assert e.value.code == 2
    assert capsys.readouterr().err == f"error: {said}\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.csv", "models"]  # nothing written, no store opened


@pytest.mark.parametrize("photos, min_images, said", [
    (3, 7000, "lower package.min_images"),  # `-S ingest.sample_photos=500`: 8 minutes, then package refused them
    (12, 10, "raise package.max_images"),
])
def test_train_refuses_a_photo_count_package_would_refuse_before_training(photos, min_images, said, tmp_path,
                                                                          repo_root, capsys, monkeypatch):
    from pipeline import train

    monkeypatch.chdir(tmp_path)
    rows = [f"photo,{i:010x},photo-000.pt,{i},photo_tfrec/p.tfrec,{i}" for i in range(photos)]
    rows += [f"monet,m{i},monet-000.pt,{i},monet_tfrec/m.tfrec,{i}" for i in range(2)]
    Path("m.csv").write_text("domain,image_name,shard,offset,tfrecord,record\n" + "\n".join(rows) + "\n")
    Path("params.yaml").write_text(f"package:\n  min_images: {min_images}\n  max_images: 10\n"
                                   if min_images <= 10 else "")
    flags = [x for pair in TRAIN_OUTPUTS.items() for x in pair]
    with pytest.raises(SystemExit) as e:
        train.main(["--shards", "s", "--manifest", "m.csv", *flags])
    assert e.value.code == 2
    low, high = (min_images, 10) if min_images <= 10 else (7000, 10000)
    assert capsys.readouterr().err == (f"error: train: m.csv lists {photos} photos, and the submission takes "
                                       f"{low}–{high} paintings, one per photo: {said} (package would refuse them "
                                       f"after training)\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.csv", "params.yaml"]


@pytest.mark.parametrize("stage", ["evaluate", "package"])
def test_a_missing_generator_stops_evaluate_and_package_before_their_work(stage, tmp_path, repo_root, capsys,
                                                                          monkeypatch):
    # they name their MLflow row by the generator's bytes: without it they worked, then crashed
    import importlib
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    out = tmp_path / "out"
    args = {"evaluate": ["--shards", "s", "--manifest", "m.csv", "--images", "g", "--out", f"{out}.json",
                         "--memorization", f"{out}.png", "--features-cache", str(tmp_path / "cache")],
            "package": ["--images", "g", "--out", f"{out}.zip", "--metrics", f"{out}.json", "--shards", "s",
                        "--manifest", "m.csv"]}[stage]
    main = importlib.import_module(f"pipeline.{stage}").main
    with pytest.raises(SystemExit) as e:
        main(["--params", str(repo_root / "params.yaml"), "--generator", str(tmp_path / "photo2monet.pt"), *args])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err == f"error: {stage}: {tmp_path / 'photo2monet.pt'}: no generator (run the train stage first); " \
                  f"{stage} finds its MLflow row by the generator's bytes\n"
    assert not list(tmp_path.iterdir())  # nothing written, no store opened
    # and one that is no generator: random bytes, cut short, a bare tensor, were logged as the
    # run's model (MLflow only warned), or cut short a traceback (OSError EINVAL)
    import re

    import torch

    from pipeline import generator_file
    from pipeline.params import parse

    whole = tmp_path.parent / f"{stage}-whole.pt"
    config = generator_file.config_of(parse({"image_size": 64, "train": {"gen_filters": 8, "resnet_blocks": 1}}))
    generator_file.save(generator_file.build(config), config, whole)
    generator_file.load(whole, torch.device("cpu"))  # a good one loads
    torch.save(torch.zeros(3), tmp_path.parent / f"{stage}-tensor.pt")
    damaged = {"random bytes": bytes(range(256)) * 400, "cut short": whole.read_bytes()[:5000], "empty": b"",
               "a bare tensor": (tmp_path.parent / f"{stage}-tensor.pt").read_bytes()}
    for what, data in damaged.items():
        (tmp_path / "photo2monet.pt").write_bytes(data)
        with pytest.raises(SystemExit) as e:
            main(["--params", str(repo_root / "params.yaml"), "--generator", str(tmp_path / "photo2monet.pt"), *args])
        assert e.value.code == 2, what
        err = capsys.readouterr().err
        assert re.fullmatch(rf"error: {re.escape(str(tmp_path / 'photo2monet.pt'))}: not a generator saved by the "
                            rf"train stage \(\w+\)\n", err), (what, err)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["photo2monet.pt"], what


def test_a_missing_manifest_stops_package_before_its_work(tmp_path, repo_root, capsys, monkeypatch):
    # a kill -9 of ingest between its shards and its manifest leaves none: package wrote the zip of
    # the old JPEGs, made a FAILED row, then stopped on a FileNotFoundError traceback
    from pipeline import package

    from pipeline import generator_file
    from pipeline.params import parse

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    config = generator_file.config_of(parse({"image_size": 32, "train": {"gen_filters": 4, "resnet_blocks": 1}}))
    generator_file.save(generator_file.build(config), config, tmp_path / "photo2monet.pt")
    with pytest.raises(SystemExit) as e:
        package.main(["--params", str(repo_root / "params.yaml"), "--generator", str(tmp_path / "photo2monet.pt"),
                      "--images", "g", "--out", f"{tmp_path}/out.zip", "--metrics", f"{tmp_path}/out.json",
                      "--shards", "s", "--manifest", f"{tmp_path}/manifest.csv"])
    assert e.value.code == 2
    assert capsys.readouterr().err == f"error: {tmp_path}/manifest.csv: manifest not found (run the ingest stage first)\n"
    assert [p.name for p in tmp_path.iterdir()] == ["photo2monet.pt"]  # nothing written, no store opened


def test_a_ddp_worker_stopped_by_ctrl_c_says_nothing(monkeypatch, capsys):
    # torchrun's launcher passes Ctrl-C on to every worker: the launcher's line is the one line
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert _stage(KeyboardInterrupt(), monkeypatch) == 130
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("sig, worker, said", [
    (signal.SIGINT, False, "error: train: interrupted while starting; nothing was written\n"),
    (signal.SIGINT, True, ""),
    (signal.SIGTERM, False, "error: train: stopped by SIGTERM while starting; nothing was written\n"),
])
def test_a_stage_stopped_while_it_imports_is_one_line(repo_root, sig, worker, said):
    # the seconds `import torch` takes: Ctrl-C there printed the import's traceback, SIGTERM nothing
    # at all (a DDP worker that is still starting says nothing: its launcher says it once)
    env = {**os.environ, **({"WORLD_SIZE": "2"} if worker else {})}
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.train", "--help"], cwd=repo_root, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 60
    while "libtorch" not in Path(f"/proc/{proc.pid}/maps").read_text() and time.time() < deadline:
        time.sleep(0.01)  # torch is being imported: pipeline/__init__ ran before it
    os.kill(proc.pid, sig)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + sig, err[-2000:]
    assert err == said, err[-2000:]
