"""The photo→Monet generator as a file: `train` saves it, `generate`, the MLflow model, the checks
of evaluate and package, and bench/ load it, and
`translate` turns uint8 photos into uint8 paintings for all of them (the training grid too).

The file holds the uncompiled module's state_dict and the config needed to rebuild it, so it
loads with `torch.load(weights_only=True)` and needs no training code or params.yaml.
"""
from __future__ import annotations

import functools
import pickle
from pathlib import Path
from typing import Callable, ContextManager

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.errors import DataError
from pipeline.files import save_torch
from pipeline.networks import define_generator, to_model_input, to_uint8
from pipeline.params import Params
from pipeline.runtime import uncompiled
from pipeline.shards import resize_uint8


def config_of(p: Params) -> dict:
    """Everything needed to rebuild a generator; stored beside its weights."""
    t = p.train
    return {"kind": t.generator, "image_size": p.image_size, "filters": t.gen_filters, "resnet_blocks": t.resnet_blocks,
            "upsample": t.upsample}


def build(config: dict) -> nn.Module:
    # files saved before train.upsample existed hold transposed convolutions, which is what they say
    return define_generator(config["kind"], config["image_size"], config["filters"], config["resnet_blocks"],
                            config.get("upsample", "transpose"))


def save(net: nn.Module, config: dict, path: Path) -> None:
    save_torch({"config": config, "state_dict": uncompiled(net).state_dict()}, path)


def load(path: Path, device: torch.device) -> tuple[nn.Module, dict]:
    """The generator saved at `path`, in eval mode on `device`, and its config."""
    try:
        saved = torch.load(path, map_location=device, weights_only=True)
        if not isinstance(saved, dict):  # a bare tensor or list in a .pt file
            raise TypeError(f"holds a {type(saved).__name__}")
        net = build(saved["config"])
        net.load_state_dict(saved["state_dict"])
    except FileNotFoundError:
        raise DataError(f"{path}: generator not found (run the train stage first)") from None
    except IsADirectoryError:
        raise DataError(f"{path}: a folder, not a generator file") from None
    except PermissionError:
        raise DataError(f"{path}: not readable (permission denied)") from None
    # OSError: a torch zip cut short can send its reader to seek before the file's start (EINVAL)
    except (KeyError, RuntimeError, TypeError, ValueError, EOFError, OSError, pickle.UnpicklingError) as e:
        raise DataError(f"{path}: not a generator saved by the train stage ({type(e).__name__})") from None
    return net.to(device).eval(), saved["config"]


@torch.no_grad()
def translate(net: nn.Module, photos: torch.Tensor, image_size: int, device: torch.device,
              autocast: Callable[[], ContextManager], out_size: int | None = None, batch_size: int = 64,
              channels_last: bool = False) -> torch.Tensor:
    """uint8 N×H×W×3 photos -> uint8 N×S×S×3 paintings on the CPU, S = out_size (default: H).

    Photos are resized to the generator's `image_size` and its output is upscaled (bicubic,
    before rounding) to `out_size`. The net runs in eval mode and gets its mode back after."""
    out_size = out_size or photos.shape[1]
    was_training = net.training
    net.eval()
    out = []
    try:
        for chunk in photos.split(batch_size):
            # a batch of one is convolved with other kernels than a batch of several (on an AVX2
            # CPU in fp32 it came out one level of 255 apart in a few values), so that a photo's
            # painting depended on the batch it fell in: painted beside a copy of itself, it is not
            alone = len(chunk) == 1
            x = to_model_input(resize_uint8(chunk.expand(2, *chunk.shape[1:]) if alone else chunk, image_size),
                               device, channels_last)
            with autocast():
                y = net(x).float()[:1 if alone else None]
            # upscaled 8 at a time: small float temporaries stay in the allocator's reuse
            # (measured 2× faster on the CPU than the whole batch at 256 px)
            out += [to_uint8(upscale(part, out_size)) for part in y.split(8)]
    finally:
        net.train(was_training)
    return torch.cat(out)


@functools.lru_cache(maxsize=8)
def _bicubic_matrix(size: int, out_size: int, device: torch.device) -> torch.Tensor:
    """(out_size, size): torch's bicubic upsampling (align_corners=False) along one axis, as the
    matrix it is, found by upsampling the identity: borders and weights exactly torch's."""
    eye = torch.eye(size, device=device)[None, None]  # (1, 1, size, size)
    return F.interpolate(eye, size=(size, out_size), mode="bicubic", align_corners=False)[0, 0].T.contiguous()


def upscale(y: torch.Tensor, out_size: int) -> torch.Tensor:
    """float N×C×S×S -> N×C×out×out, bicubic. Two small matmuls instead of F.interpolate's generic
    CPU kernel: 2.5× faster, equal up to float rounding (measured: 1 in 500,000 pixels moves by one
    level after quantisation)."""
    size = y.shape[-1]
    if size == out_size:
        return y
    a = _bicubic_matrix(size, out_size, y.device)
    return a @ y @ a.T  # rows, then columns
