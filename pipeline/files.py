"""Atomic writes: a killed stage leaves either the old file or the new one, never half of one."""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Iterator

from pipeline.errors import FULL_DISK, PipelineError


def _read_umask() -> int:
    mask = os.umask(0o022)  # the only way to read it before Python 3.13; set straight back
    os.umask(mask)
    return mask


# mkstemp and mkdtemp make their files 0600 and folders 0700 whatever the umask: outputs get the
# modes a plain open() and mkdir() would give them, so a group or a shared folder can read them.
# Read once, at import: no thread runs yet that could create a file while the umask is changed
_UMASK = _read_umask()
FILE_MODE, DIR_MODE = 0o666 & ~_UMASK, 0o777 & ~_UMASK


@contextlib.contextmanager
def _full_disk_names(path: Path) -> Iterator[None]:
    """A write that fails for want of space says so without a file name (the name is on open, not
    on write); give it the output's, which errors.cli prints."""
    try:
        yield
    except OSError as e:
        if e.errno in FULL_DISK and not e.filename:
            raise OSError(e.errno, e.strerror, str(path)) from None
        raise


def _alive(pid: int) -> bool:
    if os.name != "posix":  # elsewhere os.kill(pid, 0) would end the process: assume it lives
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's
        return True
    return True


def _make_folder(folder: Path) -> None:
    """mkdir -p `folder` for an output; a file in its way (`touch .cache/features`) is one line
    naming that file, not a FileExistsError or NotADirectoryError traceback."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        blocking = next((p for p in (folder, *folder.parents) if p.exists() and not p.is_dir()), folder)
        raise PipelineError(f"{blocking} is a file where a folder is needed (for {folder}); move it away") from None


def _pid_space() -> str:
    """Where a writer's pid means something: the host name, and a digest of this boot's id and of
    the pid namespace. Containers of one pod share a host name but not their pids; machines named
    alike ("vm") may share a disk."""
    ids = [socket.gethostname()]
    for read, source in ((Path.read_text, "/proc/sys/kernel/random/boot_id"), (os.readlink, "/proc/self/ns/pid")):
        try:
            ids.append(str(read(Path(source))))
        except OSError:  # not Linux: the host name alone
            ids.append("")
    host = re.sub(r"[^A-Za-z0-9.-]", "_", ids[0])  # a file name's part: no '/', nor the '+' and '@' it is parsed by
    return f"{host}.{hashlib.md5('|'.join(ids).encode()).hexdigest()[:8]}"


PID_SPACE = _pid_space()


# a temp name: `.<output's name>.<pid>@<PID_SPACE>+<random>.tmp` (PID_SPACE holds no '@' nor '+')
_TEMP_NAME = re.compile(r"\..+\.(\d+)@([A-Za-z0-9._-]+)\+[^/]*\.tmp")


def sweep_stale_temps(folder: Path) -> None:
    """Remove the temp files and folders that writers in `folder` left when they were killed
    outright (kill -9, the OOM killer: no `finally` runs), which would pile up: ingest's are 1.5 GB.
    Only those whose process is gone; a live writer's (a queue worker's feature cache) stays, and
    so does any of another host or container (its pids are not ours to check)."""
    for stale in folder.glob(".*.tmp"):
        writer = _TEMP_NAME.fullmatch(stale.name)
        if writer and writer[2] == PID_SPACE and not _alive(int(writer[1])):
            if stale.is_dir() and not stale.is_symlink():
                shutil.rmtree(stale, ignore_errors=True)
            else:
                stale.unlink(missing_ok=True)


def _temp_beside(path: Path) -> str:
    """The prefix of a temp name beside `path` (hidden, with the writer's pid and PID_SPACE), after
    sweeping the folder of what killed writers left."""
    sweep_stale_temps(path.parent)
    return f".{path.name}.{os.getpid()}@{PID_SPACE}+"


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temp path beside `path`; on success it replaces `path` in one rename."""
    path = Path(path)
    _make_folder(path.parent)
    if path.is_dir() and not path.is_symlink():  # the rename would fail after the work, with a traceback
        raise PipelineError(f"{path} is a folder where a file is to be written; move it away and run again")
    fd, tmp = tempfile.mkstemp(prefix=_temp_beside(path), suffix=".tmp", dir=path.parent)
    os.fchmod(fd, FILE_MODE)
    os.close(fd)
    tmp = Path(tmp)
    try:
        with _full_disk_names(path):
            yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_json(path: str | Path, obj: object) -> None:
    write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def save_torch(obj: object, path: str | Path) -> None:
    """torch.save, atomically and byte-for-byte reproducible: given a path, torch names the archive
    inside after the file (here a random temp name), so equal tensors would give different bytes
    and DVC would rerun every stage downstream; given a file object it writes the same bytes. It
    writes into memory first: torch's writer turns a full disk into an opaque RuntimeError
    ('unexpected pos'), a plain write says ENOSPC (errors.cli makes that one line)."""
    import torch  # here: ingest refuses a hostile archive from its listing before paying for torch (ingest.py)

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    write_bytes(path, buffer.getbuffer())


@contextlib.contextmanager
def scratch_dir(path: str | Path) -> Iterator[Path]:
    """Yield a fresh temp folder beside `path`, removed afterwards (or, after a kill -9, by the
    next writer of `path`: see _temp_beside)."""
    path = Path(path)
    _make_folder(path.parent)
    tmp = Path(tempfile.mkdtemp(prefix=_temp_beside(path), suffix=".tmp", dir=path.parent))
    tmp.chmod(DIR_MODE)
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a fresh temp folder beside `path`; on success it replaces `path` whole.

    A stage that fills a folder (shards, generated JPEGs) builds it here first, so a killed
    run never leaves a folder that looks complete."""
    path = Path(path)
    if path.exists() and not path.is_dir():  # `--out somefile`: it would be replaced without a word
        raise PipelineError(f"{path} is a file; a folder is written there")
    with scratch_dir(path) as tmp:
        with _full_disk_names(path):
            yield tmp
        old = path.with_name(f".{path.name}.old")
        # the swap and the old folder's removal (7,028 files: a second) as one step: a Ctrl-C or
        # SIGTERM in it waits until it is done, so none leaves the old folder beside the new one
        with signals_held():
            shutil.rmtree(old, ignore_errors=True)
            if path.exists():
                os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """SIGINT and SIGTERM taken as they would be only once the block is done (handlers can only be
    set in the main thread: elsewhere nothing is held). Not a signal mask: torch's threads would
    take the signal, and Python runs its handler in the main thread at once."""
    import signal
    import threading

    held = (signal.SIGINT, signal.SIGTERM)
    # (None: a handler set outside Python, which could not be put back)
    if threading.current_thread() is not threading.main_thread() or None in map(signal.getsignal, held):
        yield
        return
    arrived: list[int] = []
    before = {s: signal.signal(s, lambda signum, frame: arrived.append(signum)) for s in held}
    try:
        yield
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)
        if arrived:
            handler = before[arrived[0]]
            if callable(handler):
                handler(arrived[0], None)  # Ctrl-C's KeyboardInterrupt, errors.cli's Stopped
            elif handler == signal.SIG_DFL:
                os.kill(os.getpid(), arrived[0])  # ends the process, as it would have


def check_outputs(stage: str, files: dict[str, Path], folders: dict[str, Path] | None = None) -> None:
    """Before a stage's work: each output flag names a path it can take (a file output is not a
    folder there, a folder output not a file) and its own (two flags on one path would leave one
    output holding the other's bytes). Found after the work, it was a traceback and the work lost."""
    folders = folders or {}
    seen: dict[Path, str] = {}
    # what a killed run of any stage left beside these outputs: DVC restores its outputs from its
    # cache without running it, so its own next write, which would sweep them, may never come
    for folder in {path.parent for path in {**files, **folders}.values() if path.parent.is_dir()}:
        sweep_stale_temps(folder)
    for flag, path in {**files, **folders}.items():
        if flag in files and path.is_dir():
            raise PipelineError(f"{stage}: --{flag} {path} is a folder; it names the file to write")
        if flag in folders and path.exists() and not path.is_dir():
            raise PipelineError(f"{stage}: --{flag} {path} is a file; it names the folder to write")
        same = seen.setdefault(path.resolve(), flag)
        if same != flag:
            raise PipelineError(f"{stage}: --{same} and --{flag} are both {path}; each names an output of its own")


def main_repo() -> Path:
    """The repository the user works in, also from inside `dvc exp run --temp` and queued runs
    (DVC runs those in .dvc/tmp/exps/... and names the main repo in DVC_ROOT): where the MLflow
    store and the feature cache live, shared by every experiment."""
    root = os.environ.get("DVC_ROOT")
    if root:
        return Path(root).resolve()
    cwd = Path.cwd().resolve()
    parts = cwd.parts
    for i in range(len(parts) - 2):  # .../<repo>/.dvc/tmp/exps/... -> <repo>
        if parts[i:i + 3] == (".dvc", "tmp", "exps"):
            return Path(*parts[:i])
    return cwd


def under_main_repo(path: str | Path) -> Path:
    """A path from params as the user means it: a relative one under the main repository, so that
    it names the same file from `dvc exp run --temp` and queued runs (DVC copies no untracked
    file into .dvc/tmp/exps/...); an absolute one as it is."""
    return main_repo() / Path(path).expanduser()  # pathlib: an absolute right side wins
