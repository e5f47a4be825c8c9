"""Many processes, one training: PyTorch's DistributedDataParallel on its own launcher.

`train.processes: N` > 1 makes the train stage start N workers of itself with
`torch.distributed.run` (so `dvc repro` and `dvc exp run -S train.processes=8` work unchanged);
a plain `torchrun --nproc_per_node=N -m pipeline.train ...` works too. NCCL with one GPU per
process on CUDA, gloo on the CPU. Each process draws its own batches; gradients are averaged,
so the weights stay identical on every rank, and rank 0 alone writes outputs.
"""
from __future__ import annotations

import contextlib
import inspect
import logging
import os
import re
import signal
import sys
import tempfile
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from pipeline.errors import PipelineError, Stopped
from pipeline.processes import die_with_parent

TIMEOUT = timedelta(minutes=10)  # a collective that waits longer than this fails instead of hanging
LAUNCHER = "PIPELINE_TRAIN_LAUNCHER"  # the pid of the stage that started the workers (it reports their failures)


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def current() -> World:
    """This process's place, from the variables torchrun sets (one process when unset)."""
    env = os.environ
    if "WORLD_SIZE" not in env:
        return World()
    return World(rank=int(env["RANK"]), size=int(env["WORLD_SIZE"]), local_rank=int(env["LOCAL_RANK"]),
                 local_size=int(env.get("LOCAL_WORLD_SIZE", env["WORLD_SIZE"])))


def launch(processes: int, module: str, argv: list[str]) -> None:
    """Run `python -m module argv` in `processes` workers on this machine with torch.distributed.run;
    a failed or killed worker stops them all and raises one PipelineError."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    stage = module.rsplit(".", 1)[-1]
    # each worker's share of the cores (torchrun would set 1 and warn); `start` sets torch's too
    os.environ.setdefault("OMP_NUM_THREADS", str(core_share(processes, os.cpu_count() or 1)))
    os.environ[LAUNCHER] = str(os.getpid())
    # the launcher keeps its workers' error reports in a log folder, by default a new /tmp/torchelastic_*
    # that every run leaves behind: here one that goes when the run ends (the reports are read by then)
    with tempfile.TemporaryDirectory(prefix="torchelastic_") as logs, _quiet_launcher():
        args = get_args_parser().parse_args(["--standalone", f"--nproc_per_node={processes}", "--max_restarts=0",
                                             f"--log-dir={logs}", "--module", module, *argv])
        try:
            run(args)
        except ChildFailedError as e:
            if getattr(e.failures.get(0), "exitcode", None) == 2:  # rank 0's own error line, said already
                sys.exit(2)
            rank, failure = e.get_first_failure()
            how = f"signal {failure.signal_name()}" if failure.exitcode < 0 else f"exit code {failure.exitcode}"
            raise PipelineError(f"{stage}: worker {rank} of {processes} failed ({how}); every worker was "
                                f"stopped") from None
        except SignalException as e:  # the launcher itself was signalled; it stopped the workers
            if e.sigval == signal.SIGINT:
                raise KeyboardInterrupt from None  # Ctrl-C: said in one line by the stage, as without DDP
            if e.sigval == signal.SIGTERM:
                raise Stopped from None
            raise PipelineError(f"{stage}: stopped by {signal.Signals(e.sigval).name}; every worker was "
                                f"stopped") from None


@contextlib.contextmanager
def _quiet_launcher():
    """The launcher's own log lines (a worker 'failed (exitcode: -9)', 'sending process closing
    signal') off: the stage says what happened in one line. Each of its loggers has a level of its
    own, so each is set."""
    loggers = [logging.getLogger(name) for name in list(logging.root.manager.loggerDict)
               if name.startswith(("torch.distributed.elastic", "torch.distributed.run", "torch.distributed.launcher"))]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def lost_peer_line(e: BaseException, world: World) -> str | None:
    """What a worker whose collective failed because another went away says, or None to say
    nothing: under the stage's own launcher, which names the process that died in one line."""
    if os.environ.get(LAUNCHER):
        return None
    # gloo's messages start with its source file: "[/__w/pytorch/.../pair.cc:545] Read error ..."
    why = re.sub(r"^\[[^\]]*\] ", "", str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__)
    return f"train: process {world.rank} lost contact with the others ({why[:100]})"


def _die_with_launcher() -> None:
    """torchrun starts each worker in a session of its own, so a kill -9 of the launcher, or of the
    process group DVC runs it in, left the workers training, and rank 0 writing outputs for a stage
    that had failed. On Linux the kernel now kills a worker when its launcher dies."""
    # the stage's launcher passes its pid, to end a worker it left before this was armed (a plain
    # torchrun's worker finds no one at the rendezvous instead: torchrun may be a container's pid 1)
    launcher = os.environ.get(LAUNCHER)
    die_with_parent(int(launcher) if launcher else None)


def check_devices(processes: int, device: torch.device) -> None:
    """On CUDA each process takes a GPU of its own: more processes on this machine than GPUs it
    sees is one clear line, before anything starts (not a worker failing to take a GPU that is
    not there)."""
    if device.type == "cuda" and processes > torch.cuda.device_count():
        raise PipelineError(f"train: {processes} processes need a GPU each, and this machine shows "
                            f"{torch.cuda.device_count()}: set train.processes (under torchrun: --nproc_per_node) "
                            f"to at most that")


def start(world: World, device: torch.device) -> torch.device:
    """Join the process group (when there is more than one process); returns this process's device.
    On the CPU each process takes its share of the cores: N processes with all cores each run
    several times slower than alone (measured: 7–8 s/step for two against 0.45 s alone)."""
    if device.type == "cuda":
        check_devices(world.local_size, device)
        device = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(device)
    elif world.size > 1:
        torch.set_num_threads(cpu_threads(world, os.environ, os.cpu_count() or 1))
    if world.size > 1:
        _die_with_launcher()
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=world.rank,
                                world_size=world.size, timeout=TIMEOUT)
    return device


def core_share(processes: int, cores: int) -> int:
    """The cores each of `processes` workers on this machine takes."""
    return max(1, cores // processes)


def cpu_threads(world: World, environ, cores: int) -> int:
    """A CPU worker's threads: the OMP_NUM_THREADS the user set (a sweep's `OMP_NUM_THREADS=1 dvc
    queue start -j 2`), else its share of the cores. A plain torchrun with several workers here
    sets OMP_NUM_THREADS=1 itself when it is unset (and warns), so there 1 reads as its default."""
    share = core_share(world.local_size, cores)
    told = environ.get("OMP_NUM_THREADS", "").strip()
    if not told.isdigit() or int(told) < 1:
        return share
    if told == "1" and world.local_size > 1 and not environ.get(LAUNCHER):
        return share
    return int(told)


def peer_lost(e: BaseException, world: World) -> bool:
    """Did a collective fail because another process went away (the launcher reports which)?"""
    if world.size == 1:
        return False
    return isinstance(e, dist.DistError) or (isinstance(e, RuntimeError) and any(
        word in str(e) for word in ("gloo", "NCCL", "Connection reset", "Connection closed")))


def finish(world: World) -> None:
    if world.size > 1 and dist.is_initialized():
        dist.destroy_process_group()


def wrap(net: nn.Module, world: World, device: torch.device) -> nn.Module:
    """DistributedDataParallel around `net` when there are several processes; `net` itself otherwise."""
    if world.size == 1:
        return net
    # no buffer changes in training (the resize taps are constants, InstanceNorm keeps no running
    # statistics): nothing to send from rank 0 before each forward. PyTorch 2.13 renamed the option
    # (the old name warns, once a worker; the new one still sends the buffers once, at the start,
    # which for constants changes nothing); the GPU image's 2.11 knows only the old one
    names = inspect.signature(DistributedDataParallel).parameters
    no_sync = {"forward_sync_buffers" if "forward_sync_buffers" in names else "broadcast_buffers": False}
    return DistributedDataParallel(net, device_ids=[device] if device.type == "cuda" else None, **no_sync)


def gather(obj: object, world: World) -> list:
    """Every rank's `obj`, in rank order (a one-item list for one process)."""
    if world.size == 1:
        return [obj]
    out: list = [None] * world.size
    dist.all_gather_object(out, obj)
    return out


def broadcast(obj: object, world: World) -> object:
    """Rank 0's `obj` on every rank (`obj` itself for one process)."""
    if world.size == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def sum_(tensor: torch.Tensor, world: World) -> torch.Tensor:
    """The sum of `tensor` over all ranks (in place), `tensor` for one process."""
    if world.size > 1:
        dist.all_reduce(tensor)
    return tensor


def minimum(tensor: torch.Tensor, world: World) -> torch.Tensor:
    if world.size > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
    return tensor
