"""Device, precision, placement and seeding: each decided once, in one place, for every stage and
for bench/. A mode that is off (fp32, no channels_last, no compile) is a no-op, so callers never
branch on it."""
from __future__ import annotations

import contextlib
import functools
import os
import random
from pathlib import Path
from typing import Callable, ContextManager

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from pipeline.errors import PipelineError


def pick_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise PipelineError("params: 'device' is cuda but no CUDA device is available")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16")  # /proc/cpuinfo flags of CPUs with bf16 instructions


def cpu_has_bf16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Whether the CPU has bf16 instructions (AMX or AVX512-BF16). bf16 autocast is slow without
    them and fast with them (bench/train_step.py, the default recipe's training step against fp32:
    0.06× on an AVX2-only EPYC; 1.35× and 1.46× in two runs on an EPYC with AVX512-BF16, where the
    train stage ran in 84 s instead of 135 s with the same fid_vs_ground_truth; 1.63× on a Xeon with
    AMX, where training took 76 s instead of 116 s), so `auto` uses bf16 on the CPU only where the
    flags say so."""
    try:
        lines = cpuinfo.read_text().splitlines()
    except OSError:
        return False
    flags = {flag for line in lines if line.startswith("flags") for flag in line.partition(":")[2].split()}
    return any(flag in flags for flag in CPU_BF16_FLAGS)


def cuda_has_bf16() -> bool:
    """bf16 in the GPU's hardware (Ampere on): torch's is_bf16_supported() says yes by default
    where bf16 is only emulated (V100, T4), much slower than fp32 there."""
    try:
        return torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:  # torch before 2.4 has no such argument, and counted no emulation
        return torch.cuda.is_bf16_supported()


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """None = plain fp32; else the dtype for torch.autocast."""
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if cuda_has_bf16() else None
    return torch.bfloat16 if cpu_has_bf16() else None


def autocast(device: torch.device, dtype: torch.dtype | None) -> Callable[[], ContextManager]:
    """A context factory: `with ctx():` runs under autocast to `dtype`, or does nothing when None."""
    if dtype is None:
        return contextlib.nullcontext
    return functools.partial(torch.autocast, device.type, dtype=dtype)


def memory_format(channels_last: bool) -> torch.memory_format:
    return torch.channels_last if channels_last else torch.contiguous_format


def place(net: nn.Module, device: torch.device, channels_last: bool = False, compiled: bool = False) -> nn.Module:
    """`net` on `device` in its memory format, wrapped by torch.compile when asked. The compiled
    wrapper shares the parameters; `uncompiled()` gives back the module to save. Static shapes:
    the training step calls each network with a few fixed batch sizes (one and two batches at
    once), each of which gets its own graph, rather than one graph for any batch size."""
    net = net.to(device, memory_format=memory_format(channels_last))
    return torch.compile(net, dynamic=False) if compiled else net


def local(net: nn.Module) -> nn.Module:
    """`net` without its DistributedDataParallel wrapper: a forward that joins no gradient sync."""
    return net.module if isinstance(net, DistributedDataParallel) else net


def uncompiled(net: nn.Module) -> nn.Module:
    """The plain module under DDP and torch.compile wrappers: its state_dict has no `module.` or
    `_orig_mod.` prefixes, so it loads anywhere."""
    net = local(net)
    return getattr(net, "_orig_mod", net)


def seed_everything(seed: int) -> None:
    """One seed for Python, NumPy and torch (CUDA included)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def stream_seed(seed: int, *stream: int) -> int:
    """A 32-bit seed of its own for each `stream` (a rank, a purpose) of one run's `seed`: seeds
    like seed + rank made the batches' stream on one rank the dropout and augmentation stream of
    the next (and on rank 0 a replay of the weights' init). torch keeps 32 bits of a CPU seed."""
    return int(np.random.SeedSequence([seed, *stream]).generate_state(1)[0])


def rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    """The torch RNG states that drive training on `device` (dropout, sampling), as tensors, so a
    checkpoint holding them loads with weights_only=True."""
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def describe(device: torch.device, dtype: torch.dtype | None) -> str:
    # on the CPU the thread count is part of the arithmetic: sums split across threads round
    # differently, so the same params train other bytes with OMP_NUM_THREADS=1 than with 2
    threads = torch.get_num_threads()
    where = (torch.cuda.get_device_name(device) if device.type == "cuda"
             else f"cpu ({os.cpu_count()} cores, {threads} thread{'s' * (threads != 1)})")
    return f"{where}, {'bf16 autocast' if dtype else 'fp32'}"
