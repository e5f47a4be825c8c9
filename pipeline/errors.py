"""User-facing errors and the one place that turns them into a single line and an exit code."""
from __future__ import annotations

import errno
import functools
import os
import re
import signal
import sys
import threading
from pathlib import Path


class PipelineError(Exception):
    """Bad input or environment; the message names what and where, in one line."""


class DataError(PipelineError):
    """A data file is missing, truncated, corrupt or of the wrong shape."""


class FeatureError(PipelineError):
    """The feature extractor's weights or inputs are missing, corrupt or of the wrong kind."""


class ScoreError(PipelineError, ValueError):
    """Features that cannot be scored (NaN or inf, too few rows, all zeros): from the metrics, which
    stay usable as pure functions (a ValueError), and one line from a stage."""


class Stopped(KeyboardInterrupt):
    """SIGTERM: what `kill`, `timeout` and job schedulers send to stop a stage. Taken like Ctrl-C, so
    the temp outputs go and the MLflow row is marked KILLED (the default was to die on the spot)."""


REDELIVER_SECONDS = 0.05  # long after this hook has returned (microseconds), short for a person


_resends: list[threading.Timer] = []  # signals lost in a callback, to be sent again (_redeliver_lost_stops)
_resending = threading.RLock()  # a timer past its wait sends only while still in _resends (RLock: a
# signal handler that stands down may run inside _stand_down itself)


def _stand_down() -> None:
    """No signal sent again after all: a stop reached the stage's own code, or the stage ended
    (sent then, it would interrupt the stop's cleanup, or kill the process after its work)."""
    with _resending:
        while _resends:
            _resends.pop().cancel()


def _resend(signum: int) -> None:
    with _resending:
        if any(timer is threading.current_thread() for timer in _resends):
            os.kill(os.getpid(), signum)


def _stop(signum, frame):
    _stand_down()
    raise Stopped


def _interrupt(signum, frame):
    """Ctrl-C, as Python's own handler takes it."""
    _stand_down()
    raise KeyboardInterrupt


def _redeliver_lost_stops(previous_hook):
    """sys.unraisablehook for a stage: a signal whose handler ran inside a weakref or GC callback
    raised its Stopped (or KeyboardInterrupt) where Python only prints it, and the stage went on to
    finish and exit 0. Send the signal again, a moment later from a thread: the handler then runs in
    the stage's own code (sent from here, it would run inside this hook and be lost the same way)."""
    def hook(unraisable):
        if not isinstance(unraisable.exc_value, KeyboardInterrupt):
            previous_hook(unraisable)
        elif not _resends:  # one stop is enough
            signum = signal.SIGTERM if isinstance(unraisable.exc_value, Stopped) else signal.SIGINT
            again = threading.Timer(REDELIVER_SECONDS, _resend, (signum,))
            again.daemon = True
            _resends.append(again)
            again.start()
    return hook


def brief(e: BaseException) -> str:
    """An exception as one short line (torch's messages run to many lines; some are empty)."""
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:120]}"


FULL_DISK = (errno.ENOSPC, errno.EDQUOT)  # no space left, or the user's quota
NOT_ALLOWED = (errno.EACCES, errno.EPERM, errno.EROFS)  # no rights, or a read-only file system


def existing_folder(path: str | Path) -> Path | None:
    """The nearest folder above `path` that is there: the file an error names (a temp name) is gone
    by the time it is reported."""
    return next((d for d in Path(path).parents if d.exists()), None)


# what each stage's memory grows with: the line an out-of-memory error ends with
MEMORY_PARAMS = {"train": "train.batch_size (per process), train.gen_filters, train.disc_filters, "
                          "train.resnet_blocks or image_size",
                 "generate": "generate.batch_size", "evaluate": "evaluate.batch_size or evaluate.kid_subsets"}


def _size(count: float) -> str:
    """Bytes as people read them: 28.6 GiB, 512.0 MiB (not '0.0 GiB' for many small allocations)."""
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if count < 1024:
            return f"{count:.0f} {unit}" if unit == "bytes" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} TiB"


def out_of_memory(e: BaseException) -> str | None:
    """What an allocation that failed asked for ("" when it does not say); None for other errors.
    torch's CPU allocator raises a plain RuntimeError, CUDA's its OutOfMemoryError (matched by name:
    this module does not import torch)."""
    text = str(e)
    if isinstance(e, MemoryError):
        return ""
    if isinstance(e, RuntimeError) and "Storage size calculation overflowed" in text:
        return "it asked for more than a 64-bit size can count"  # sizes multiplied past 2**63 bytes
    if type(e).__name__ == "OutOfMemoryError" or (isinstance(e, RuntimeError) and "can't allocate memory" in text):
        cpu = re.search(r"tried to allocate (\d+) bytes", text)
        if cpu:
            return f"it asked for {_size(int(cpu[1]))} at once"
        gpu = re.search(r"Tried to allocate ([\d.]+ [KMGT]iB)", text)
        return f"it asked the GPU for {gpu[1]} more" if gpu else ""
    return None


def _while_starting(handler) -> bool:
    return getattr(handler, "__name__", "") == "_stopped_while_starting"


def _stage() -> str:
    return Path(sys.argv[0]).stem or "stage"


def _resume_hint() -> str:
    from pipeline.files import main_repo  # here: files imports this module

    if main_repo() == Path.cwd().resolve():
        return ": it resumes from its last finished epoch"
    # DVC runs queued and --temp experiments in a folder of their own, and deletes it
    return "; as a queued or --temp experiment it trains afresh: its checkpoint was in DVC's temp folder"


def cli(main):
    """Run a stage's main(): a PipelineError becomes `error: <message>` on stderr and exit 2,
    never a traceback (bugs still get their traceback); so are a full disk, an output it may not
    write and running out of memory; Ctrl-C one line too, and exit 130, and SIGTERM, exit 143."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        # not in a worker of torchrun's: its launcher stops the workers with SIGTERM, and reports
        main_thread = threading.current_thread() is threading.main_thread()
        catch = main_thread and "WORLD_SIZE" not in os.environ
        previous = signal.signal(signal.SIGTERM, _stop) if catch else None
        if _while_starting(previous):  # pipeline/__init__'s, for the imports: this process's own after
            previous = signal.SIG_DFL
        interrupt = signal.getsignal(signal.SIGINT) if main_thread else None
        if _while_starting(interrupt) or interrupt is signal.default_int_handler:
            signal.signal(signal.SIGINT, _interrupt)  # (not where Ctrl-C is ignored: a background job)
        previous_hook = sys.unraisablehook
        if catch:
            sys.unraisablehook = _redeliver_lost_stops(previous_hook)
        try:
            return main(*args, **kwargs)
        except PipelineError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        except (MemoryError, RuntimeError) as e:  # params that ask for more memory than there is
            asked = out_of_memory(e)
            if asked is None:
                raise
            stage = _stage()
            print(f"error: {stage}: out of memory{f' ({asked})' if asked else ''}; lower "
                  f"{MEMORY_PARAMS.get(stage, 'the sizes in params.yaml')} (no output was left half-written)",
                  file=sys.stderr)
            sys.exit(2)
        except OSError as e:
            if e.errno not in FULL_DISK + NOT_ALLOWED:
                raise
            # a full disk or a folder the stage may not write is no bug: say where, once. shutil
            # names the source first and the target second; the target was a temp name, gone by
            # now, so name the folder that is left
            target = e.filename2 or e.filename
            if e.errno in NOT_ALLOWED:
                temp = target and Path(target).name.startswith(".") and Path(target).name.endswith(".tmp")
                where = f": {Path(target).parent if temp else target}" if target else ""
                print(f"error: {_stage()}: {e.strerror}{where} (no output was left half-written)", file=sys.stderr)
                sys.exit(2)
            folder = existing_folder(target) if target else None
            where = f" in {folder}" if folder else ""
            print(f"error: {_stage()}: {e.strerror}{where}; free some space and run it again (no output "
                  f"was left half-written)", file=sys.stderr)
            sys.exit(2)
        except KeyboardInterrupt as e:  # every output is written to a temp name and renamed when whole
            if "WORLD_SIZE" in os.environ:  # a DDP worker, at any point: its launcher says it once for all
                sys.exit(128 + signal.SIGINT)
            stage = _stage()
            resume = _resume_hint() if stage == "train" else ""
            what = "stopped by SIGTERM" if isinstance(e, Stopped) else "interrupted"
            print(f"error: {stage}: {what}; no output was left half-written (run it again{resume})",
                  file=sys.stderr)
            sys.exit(128 + (signal.SIGTERM if isinstance(e, Stopped) else signal.SIGINT))  # as a shell reports it
        finally:
            _stand_down()
            if catch:
                signal.signal(signal.SIGTERM, previous)
                sys.unraisablehook = previous_hook
            if _while_starting(interrupt) or interrupt is signal.default_int_handler:
                signal.signal(signal.SIGINT, signal.default_int_handler)

    return wrapper
