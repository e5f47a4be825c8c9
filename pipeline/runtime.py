"""Device, precision and seeding: decided once per stage, printed, never guessed again later."""
from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch

from pipeline.errors import PipelineError


def pick_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise PipelineError("params: 'device' is cuda but no CUDA device is available")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def cpu_has_amx() -> bool:
    """bf16 matmuls are fast on CPUs with AMX and slow without (measured: ~3× slower than fp32
    on an AVX2-only EPYC), so `auto` uses bf16 on the CPU only where the flag is there."""
    try:
        return "amx_bf16" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """None = plain fp32; else the dtype for torch.autocast."""
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    return torch.bfloat16 if cpu_has_amx() else None


def seed_everything(seed: int) -> torch.Generator:
    """One seed for Python, NumPy and torch; returns a torch.Generator for data sampling."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def describe(device: torch.device, dtype: torch.dtype | None) -> str:
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({os.cpu_count()} cores)"
    return f"{where}, {'bf16 autocast' if dtype else 'fp32'}"
