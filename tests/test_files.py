import errno
import os
import signal
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline import files
from pipeline.errors import PipelineError
from pipeline.feature_cache import FeatureCache
from pipeline.files import PID_SPACE, atomic_dir, atomic_path, save_torch, write_json


def test_atomic_path_keeps_old_file_when_writer_dies(tmp_path):
    target = tmp_path / "out.json"
    write_json(target, {"v": 1})
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert target.read_text().strip().startswith("{") and '"v": 1' in target.read_text()
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_atomic_dir_replaces_whole_or_not_at_all(tmp_path):
    target = tmp_path / "gen"
    with atomic_dir(target) as tmp:
        (tmp / "a.jpg").write_bytes(b"1")
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as tmp:
            (tmp / "b.jpg").write_bytes(b"2")
            raise RuntimeError("killed")
    assert sorted(p.name for p in target.iterdir()) == ["a.jpg"]
    with atomic_dir(target) as tmp:
        (tmp / "c.jpg").write_bytes(b"3")
    assert sorted(p.name for p in target.iterdir()) == ["c.jpg"]
    assert [p.name for p in tmp_path.iterdir()] == ["gen"]


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_outputs_get_the_modes_the_umask_gives(tmp_path, repo_root, umask):
    # mkstemp and mkdtemp alone make 0600 files and 0700 folders: no group could read the outputs
    code = ("import os, sys; from pathlib import Path; from pipeline.files import atomic_dir, write_json\n"
            "out = Path(sys.argv[1]); write_json(out / 'm.json', {})\n"
            "with atomic_dir(out / 'shards') as d: (d / 'x').write_bytes(b'x')\n")
    subprocess.run([sys.executable, "-c", f"import os; os.umask({umask}); exec({code!r})", str(tmp_path)],
                   check=True, cwd=repo_root)
    assert (tmp_path / "m.json").stat().st_mode & 0o777 == 0o666 & ~umask
    assert (tmp_path / "shards").stat().st_mode & 0o777 == 0o777 & ~umask
    assert (tmp_path / "shards/x").stat().st_mode & 0o777 == 0o666 & ~umask


def test_save_torch_writes_the_same_bytes_whatever_the_temp_name(tmp_path):
    # torch.save(path) names its archive after the file; DVC must see equal tensors as equal files
    obj = {"w": torch.arange(6.0).reshape(2, 3), "step": 3}
    save_torch(obj, tmp_path / "a.pt")
    save_torch(obj, tmp_path / "b" / "other.pt")
    assert (tmp_path / "a.pt").read_bytes() == (tmp_path / "b" / "other.pt").read_bytes()
    assert torch.equal(torch.load(tmp_path / "a.pt", weights_only=True)["w"], obj["w"])
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["a.pt", "b", "other.pt"]  # no temp files left


# A full disk, for real: every temp file the writers make is a link to /dev/full, whose writes fail
# with ENOSPC in the kernel, whichever library writes (torch, numpy, pathlib)
@pytest.fixture
def full_disk(monkeypatch, tmp_path):
    if not os.access("/dev/full", os.W_OK):
        pytest.skip("no writable /dev/full on this system: the full-disk path is not exercised")
    real_mkstemp = tempfile.mkstemp

    def mkstemp(*args, **kwargs):
        fd, name = real_mkstemp(*args, **kwargs)
        os.close(fd)
        os.unlink(name)
        os.symlink("/dev/full", name)
        return os.open(name, os.O_WRONLY), name

    monkeypatch.setattr(files.tempfile, "mkstemp", mkstemp)
    return tmp_path


@pytest.mark.parametrize("write", [
    lambda path: save_torch({"w": torch.ones(1000)}, path),
    lambda path: write_json(path, {"v": 1}),
    lambda path: FeatureCache(path.parent, "offline").get("x", "k", lambda: np.ones((10, 4))),
])
def test_a_full_disk_is_enospc_naming_the_output(full_disk, write):
    target = full_disk / "out" / "thing"
    with pytest.raises(OSError) as e:
        write(target)
    assert e.value.errno == errno.ENOSPC and Path(e.value.filename).parent == target.parent
    assert list(target.parent.iterdir()) == []  # no temp file (nor link) left


def test_a_full_disk_inside_a_folder_being_filled_names_the_folder(tmp_path):
    if not os.access("/dev/full", os.W_OK):
        pytest.skip("no writable /dev/full on this system: the full-disk path is not exercised")
    with pytest.raises(OSError) as e:
        with atomic_dir(tmp_path / "gen") as tmp:
            (tmp / "a.jpg").symlink_to("/dev/full")
            (tmp / "a.jpg").write_bytes(b"jpeg")
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(tmp_path / "gen")
    assert list(tmp_path.iterdir()) == []


_KILLED_WRITER = """
import os, signal, sys
from pipeline.files import atomic_dir, atomic_path
with atomic_dir(sys.argv[1]) as tmp, atomic_path(sys.argv[2]) as tmp_file:
    (tmp / "a.jpg").write_bytes(b"half")
    tmp_file.write_bytes(b"half")
    os.kill(os.getpid(), signal.SIGKILL)  # no `finally` runs: what kill -9 or the OOM killer leave
"""


def test_what_a_writer_killed_outright_left_is_removed_by_the_next(tmp_path, repo_root):
    folder, file = tmp_path / "out" / "shards", tmp_path / "out" / "checkpoint.pt"
    killed = subprocess.run([sys.executable, "-c", _KILLED_WRITER, str(folder), str(file)], cwd=repo_root)
    assert killed.returncode == -signal.SIGKILL
    left = sorted(p.name for p in folder.parent.iterdir())
    assert len(left) == 2 and all(name.endswith(".tmp") for name in left)
    # a live writer's temp (another queue worker's, of the same shared file) is not touched
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        busy = folder.parent / f".checkpoint.pt.{live.pid}@{PID_SPACE}+x.tmp"
        busy.write_bytes(b"in progress")
        # and one of another host sharing the disk (or a container): its pid means nothing here
        elsewhere = folder.parent / ".checkpoint.pt.999999999@another-host+x.tmp"
        elsewhere.write_bytes(b"in progress")
        with atomic_dir(folder) as tmp:
            (tmp / "b.jpg").write_bytes(b"whole")
        save_torch({"step": 1}, file)
        assert sorted(p.name for p in folder.parent.iterdir()) == sorted(["shards", "checkpoint.pt", busy.name,
                                                                          elsewhere.name])
    finally:
        live.kill()
        live.wait()


def test_what_a_writer_killed_outright_left_goes_with_any_stage_writing_beside_it(tmp_path, repo_root):
    # DVC restores a killed stage's outputs from its cache without running it: its temps (ingest's
    # 1.5 GB) stayed for good, gitignored and unseen, since only a next writer of the same output
    # removed them. Any stage that checks an output in that folder, or writes one there, does now
    from pipeline.files import check_outputs

    data = tmp_path / "data"
    killed = subprocess.run([sys.executable, "-c", _KILLED_WRITER, str(data / "shards"), str(data / "manifest.csv")],
                            cwd=repo_root)
    assert killed.returncode == -signal.SIGKILL and len(list(data.iterdir())) == 2
    check_outputs("package", {"out": data / "images.zip"})
    assert list(data.iterdir()) == []
    subprocess.run([sys.executable, "-c", _KILLED_WRITER, str(data / "generated"), str(data / "x.csv")],
                   cwd=repo_root)
    save_torch({"step": 1}, data / "other.pt")
    assert [p.name for p in data.iterdir()] == ["other.pt"]


_LIVE_WRITER = """
import sys, time
from pipeline.files import atomic_path
with atomic_path(sys.argv[1]) as tmp:
    tmp.write_bytes(b"in progress")
    print(tmp.name, flush=True)
    time.sleep(60)
"""


def test_a_writer_in_another_pid_namespace_keeps_its_temp(tmp_path, repo_root):
    # containers of one pod share the host name and a volume, not their pids: there the live
    # writer's pid is not alive, and its temp (a feature cache being written) was removed under it
    unshare = shutil.which("unshare")
    if not unshare or subprocess.run([unshare, "-pf", "--mount-proc", "true"], capture_output=True).returncode:
        pytest.skip("cannot make a pid namespace here (unshare -pf): the check across containers is not exercised")
    target = tmp_path / "features.npy"
    live = subprocess.Popen([sys.executable, "-c", _LIVE_WRITER, str(target)], cwd=repo_root, stdout=subprocess.PIPE,
                            text=True)
    try:
        temp = tmp_path / live.stdout.readline().strip()
        other = subprocess.run([unshare, "-pf", "--mount-proc", sys.executable, "-c",
                                f"from pipeline.files import write_bytes; write_bytes({str(target)!r}, b'x')"],
                               cwd=repo_root, capture_output=True, text=True)
        assert other.returncode == 0, other.stderr
        assert temp.read_bytes() == b"in progress"
    finally:
        live.kill()
        live.wait()


def test_a_host_name_with_any_characters_makes_a_temp_name_that_parses(monkeypatch):
    # 'ci+runner': the '+' ended the parse early and a dead writer's temp was never removed;
    # 'pod/a': every atomic write failed on a name with a '/' in it
    for host in ("ci+runner", "pod/a", "x@y"):
        monkeypatch.setattr(files.socket, "gethostname", lambda: host)
        space = files._pid_space()
        assert not set(space) & set("/+@") and space.split(".")[0] == host.replace("+", "_").replace("/", "_").replace("@", "_")


def test_ctrl_c_while_a_folder_is_swapped_in_waits_until_it_is_done(tmp_path, monkeypatch):
    # Ctrl-C between the renames (or in the old folder's removal) left the old folder beside the
    # new one, or no folder at all, though the new one was whole
    import signal as signals

    out = tmp_path / "generated"
    out.mkdir()
    (out / "old.jpg").write_bytes(b"old")
    real = os.replace

    def interrupted_replace(src, dst):
        os.kill(os.getpid(), signals.SIGINT)  # arrives while the first rename runs
        monkeypatch.setattr(files.os, "replace", real)
        real(src, dst)

    with pytest.raises(KeyboardInterrupt):
        with atomic_dir(out) as tmp:
            (tmp / "new.jpg").write_bytes(b"new")
            monkeypatch.setattr(files.os, "replace", interrupted_replace)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["generated"]
    assert [p.name for p in out.iterdir()] == ["new.jpg"]


def test_a_folder_where_a_file_is_written_is_refused_before_the_write(tmp_path):
    # a folder in the feature cache where a file goes: the rename failed after the work, with a traceback
    cache = FeatureCache(tmp_path, "offline", say=lambda s: None)
    path = cache.path("x", "k")
    path.mkdir()
    with pytest.raises(PipelineError, match=f"^{path} is a folder where the features cache keeps a file; move it"):
        cache.get("x", "k", lambda: pytest.fail("computed first: the work lost"))
    with pytest.raises(PipelineError, match=f"^{path} is a folder where a file is to be written; move it away"):
        with atomic_path(path):  # any other output of the stages
            pytest.fail("written")
    assert [p.name for p in tmp_path.iterdir()] == [path.name] and path.is_dir()  # kept, and nothing else written


def test_a_file_where_a_folder_is_written_is_refused(tmp_path):
    # `generate --out somefile`: the file was replaced by a folder, and kept as .somefile.old
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(PipelineError, match="notes.txt is a file; a folder is written there"):
        with atomic_dir(tmp_path / "notes.txt"):
            pass
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
