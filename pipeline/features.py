"""The FID Inception-v3 feature extractor (2048-d pool features), as Kaggle's MiFID uses it.

The graph is pytorch-fid's port of the TF `2015-12-05` Inception (built from pytorch-fid's own
blocks) and the forward pass is the one of pytorch-fid's `InceptionV3` wrapper up to the final
average pool: bilinear resize to 299 px (align_corners=False), [0, 1] -> [-1, 1].

Weights, in this order:
1. `weights`: a local file the user named. Missing/unreadable/wrong graph -> FeatureError, never a
   fallback.
2. the torch hub cache: <torch.hub.get_dir()>/checkpoints/pt_inception-2015-12-05-6726825d.pth
3. with download=True: pytorch-fid's FID_WEIGHTS_URL, sha256-prefix checked, into the hub cache
   (temp file + atomic rename). Unreachable host -> fail over within seconds; bad hash -> error.
4. otherwise an OFFLINE extractor: the same graph, deterministic random init, BatchNorm statistics
   recomputed on the reference paintings, run at a reduced input size. Its numbers are labelled
   "OFFLINE ... not comparable to Kaggle MiFID" (Extractor.comparable is False).
"""
from __future__ import annotations

import hashlib
import logging
import os
import socket
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping
from urllib.parse import urlparse

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from pytorch_fid import inception as _pf

from pipeline.errors import PipelineError

log = logging.getLogger(__name__)

FID_WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"
FID_WEIGHTS_URL = _pf.FID_WEIGHTS_URL           # pytorch-fid 0.3.0's release asset
FID_WEIGHTS_SHA256_PREFIX = "6726825d"           # the 8 hex digits in the file name
FEATURE_DIM = 2048
FID_IMAGE_SIZE = 299
MIN_IMAGE_SIZE = 75                              # smallest input the Inception-v3 stem accepts
OFFLINE_SEED = 0
PROBE_TIMEOUT_S = 3.0


class FeatureError(PipelineError, RuntimeError):
    """A one-line, user-facing problem with the feature extractor's weights or inputs."""


@dataclass(frozen=True)
class Extractor:
    model: nn.Module      # eval mode; float NCHW in [0, 1] -> (N, 2048)
    name: str
    comparable: bool      # True only for the real FID weights
    image_size: int       # input px the model resizes to (299, or the offline size)


# --------------------------------------------------------------------------------------- graph

def build_fid_inception() -> nn.Module:
    """pytorch-fid's `fid_inception_v3()` without the download: torchvision's Inception3
    (1008 classes, no aux head, torchvision's weight init skipped) with the FID-patched blocks."""
    net = _pf._inception_v3(num_classes=1008, aux_logits=False, weights=None)
    net.Mixed_5b = _pf.FIDInceptionA(192, pool_features=32)
    net.Mixed_5c = _pf.FIDInceptionA(256, pool_features=64)
    net.Mixed_5d = _pf.FIDInceptionA(288, pool_features=64)
    net.Mixed_6b = _pf.FIDInceptionC(768, channels_7x7=128)
    net.Mixed_6c = _pf.FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6d = _pf.FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6e = _pf.FIDInceptionC(768, channels_7x7=192)
    net.Mixed_7b = _pf.FIDInceptionE_1(1280)
    net.Mixed_7c = _pf.FIDInceptionE_2(2048)
    return net


class FIDInceptionPool(nn.Module):
    """pytorch-fid's `InceptionV3` forward up to the 2048-d average pool (block index 3)."""

    def __init__(self, inception: nn.Module, image_size: int = FID_IMAGE_SIZE):
        super().__init__()
        self.inception = inception
        self.image_size = int(image_size)
        for p in self.parameters():
            p.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = self.inception
        x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear",
                          align_corners=False)
        x = 2 * x - 1                                     # [0, 1] -> [-1, 1]
        x = n.Conv2d_1a_3x3(x)                            # block 0
        x = n.Conv2d_2a_3x3(x)
        x = n.Conv2d_2b_3x3(x)
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = n.Conv2d_3b_1x1(x)                            # block 1
        x = n.Conv2d_4a_3x3(x)
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        for block in (n.Mixed_5b, n.Mixed_5c, n.Mixed_5d, n.Mixed_6a,   # block 2
                      n.Mixed_6b, n.Mixed_6c, n.Mixed_6d, n.Mixed_6e,
                      n.Mixed_7a, n.Mixed_7b, n.Mixed_7c):              # block 3
            x = block(x)
        return F.adaptive_avg_pool2d(x, output_size=(1, 1)).flatten(1)


# ------------------------------------------------------------------------------------- weights

def hub_cache_path() -> Path:
    """Where torch.hub keeps the FID weights (follows TORCH_HOME / torch.hub.set_dir)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / FID_WEIGHTS_NAME


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _short(keys: Iterable[str], k: int = 3) -> str:
    keys = sorted(keys)
    more = f", … ({len(keys)} in all)" if len(keys) > k else ""
    return ", ".join(keys[:k]) + more


def _load_fid_weights(path: Path, what: str) -> nn.Module:
    """The FID graph with the weights in `path`; FeatureError (one line, naming it) otherwise."""
    if not path.exists():
        raise FeatureError(f"{what} {path}: file not found")
    if not path.is_file():
        raise FeatureError(f"{what} {path}: not a regular file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except PermissionError:
        raise FeatureError(f"{what} {path}: not readable (permission denied)") from None
    except Exception as e:  # truncated zip, pickle of arbitrary objects, garbage bytes, ...
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise FeatureError(f"{what} {path}: not a readable torch state dict ({first})") from None
    if not isinstance(state, Mapping) or not all(torch.is_tensor(v) for v in state.values()):
        raise FeatureError(f"{what} {path}: does not hold a state dict of tensors "
                           f"(got {type(state).__name__})")
    net = build_fid_inception()
    expected = net.state_dict()
    optional = {k for k in expected if k.endswith("num_batches_tracked")}
    missing = set(expected) - set(state) - optional
    unexpected = set(state) - set(expected)
    wrong = {k for k in set(state) & set(expected) if state[k].shape != expected[k].shape}
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing {_short(missing)}")
        if unexpected:
            parts.append(f"unexpected {_short(unexpected)}")
        if wrong:
            parts.append(f"wrong shape {_short(wrong)}")
        raise FeatureError(f"{what} {path}: not a state dict for the FID Inception-v3 graph "
                           f"({'; '.join(parts)})")
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise FeatureError(f"{what} {path}: does not load into the FID Inception-v3 graph "
                           f"({str(e).strip().splitlines()[0]})") from None
    if not all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point()):
        raise FeatureError(f"{what} {path}: contains NaN or inf weights")
    return net


def _real_extractor(path: Path, what: str, device: torch.device) -> Extractor:
    net = _load_fid_weights(path, what)
    digest = _sha256(path)
    note = "" if digest.startswith(FID_WEIGHTS_SHA256_PREFIX) else (
        f"; sha256 {digest[:8]}, not the published {FID_WEIGHTS_SHA256_PREFIX}")
    model = FIDInceptionPool(net, FID_IMAGE_SIZE).to(device).eval()
    return Extractor(model=model, name=f"fid-inception-v3 ({FID_WEIGHTS_NAME}, from {path}{note})",
                     comparable=True, image_size=FID_IMAGE_SIZE)


def _reachable(url: str, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """Can we open a TCP connection to the URL's host within `timeout` seconds (DNS included)?

    Runs in a daemon thread so that a resolver that hangs cannot hold us past the timeout.
    Local (file://) URLs are always reachable."""
    u = urlparse(url)
    if u.scheme == "file":
        return True
    if not u.hostname:
        return False
    port = u.port or (443 if u.scheme == "https" else 80)
    ok = threading.Event()

    def probe() -> None:
        try:
            with socket.create_connection((u.hostname, port), timeout=timeout):
                ok.set()
        except OSError:
            pass

    t = threading.Thread(target=probe, name="fid-weights-probe", daemon=True)
    t.start()
    t.join(timeout)
    return ok.is_set()


def download_fid_weights(dst: Path, url: str | None = None,
                         hash_prefix: str | None = None) -> Path:
    """Checked download of the FID weights to `dst` (temp file beside it, then one rename).

    A sha256 mismatch or a file that is not the FID graph raises FeatureError and leaves nothing
    behind; network errors propagate as OSError (the caller decides whether to fall back)."""
    url = FID_WEIGHTS_URL if url is None else url
    hash_prefix = FID_WEIGHTS_SHA256_PREFIX if hash_prefix is None else hash_prefix
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        try:
            torch.hub.download_url_to_file(url, str(tmp), hash_prefix=hash_prefix, progress=True)
        except RuntimeError as e:
            if "invalid hash value" in str(e):
                raise FeatureError(f"download {url}: sha256 does not start with {hash_prefix} "
                                   f"({str(e).strip()}); nothing was cached") from None
            raise
        _load_fid_weights(tmp, f"download {url} ->")   # the right graph, before it is cached
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)
    return dst


# ------------------------------------------------------------------------------------- offline

def _batches_uint8(images: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    """Near-equal batches (none of size 1 unless N == 1: BatchNorm in train mode needs 2)."""
    n = images.shape[0]
    chunks = max(1, -(-n // max(1, batch_size)))
    return [b for b in torch.tensor_split(images, chunks) if b.shape[0] > 0]


def _to_input(batch: torch.Tensor, device: torch.device) -> torch.Tensor:
    if not torch.is_tensor(batch) or batch.dtype != torch.uint8 or batch.ndim != 4 \
            or batch.shape[-1] != 3:
        desc = (f"{batch.dtype} tensor of shape {tuple(batch.shape)}" if torch.is_tensor(batch)
                else type(batch).__name__)
        raise FeatureError(f"images must be uint8 tensors of shape (N, H, W, 3), got {desc}")
    return batch.to(device).permute(0, 3, 1, 2).float().div_(255.0)


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, reference: torch.Tensor, batch_size: int,
                          device: torch.device) -> None:
    """Recompute every BatchNorm's running mean/var as the plain average over the reference
    batches (momentum=None), running the net in train mode for BatchNorm only; ends in eval."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    model.eval()
    for m in bns:
        m.train()
    try:
        for batch in _batches_uint8(reference, batch_size):
            model(_to_input(batch, device))
    finally:
        model.eval()


def offline_extractor(reference: torch.Tensor, image_size: int, device: torch.device,
                      batch_size: int = 64, seed: int = OFFLINE_SEED) -> Extractor:
    """The FID graph with a deterministic random init and BatchNorm recalibrated on `reference`.

    Without recalibration the BatchNorm layers hold identity statistics and the activations of a
    random net explode (FIDs ~1e23); with it they behave. Not comparable to Kaggle's numbers."""
    if not MIN_IMAGE_SIZE <= int(image_size):
        raise FeatureError(f"offline_image_size {image_size}: Inception-v3 needs at least "
                           f"{MIN_IMAGE_SIZE} px")
    if reference is None or not torch.is_tensor(reference) or reference.ndim != 4 \
            or reference.shape[0] < 2:
        got = tuple(reference.shape) if torch.is_tensor(reference) else type(reference).__name__
        raise FeatureError(f"the offline extractor needs at least 2 reference paintings as a "
                           f"uint8 (N, H, W, 3) tensor to recalibrate BatchNorm, got {got}")
    with torch.random.fork_rng(devices=[]):                 # leave the caller's RNG alone
        torch.manual_seed(seed)
        net = build_fid_inception()
    model = FIDInceptionPool(net, image_size).to(device)
    recalibrate_batchnorm(model, reference, batch_size, device)
    n = reference.shape[0]
    name = (f"OFFLINE random-init Inception-v3 (seed {seed}, BatchNorm recalibrated on {n} "
            f"paintings, {int(image_size)} px) — not comparable to Kaggle MiFID")
    return Extractor(model=model, name=name, comparable=False, image_size=int(image_size))


# ---------------------------------------------------------------------------------- public API

def load_extractor(weights: str, download: bool, offline_image_size: int,
                   reference: torch.Tensor | None, device: torch.device,
                   batch_size: int = 64) -> Extractor:
    """The best extractor available: named file > hub cache > checked download > OFFLINE."""
    device = torch.device(device)
    if weights:
        return _real_extractor(Path(os.path.expanduser(weights)), "weights file", device)
    cached = hub_cache_path()
    if cached.exists():
        return _real_extractor(cached, "cached weights (delete to re-download)", device)
    if download:
        url = FID_WEIGHTS_URL
        if not _reachable(url):
            log.warning("FID weights: %s is unreachable; using the OFFLINE extractor",
                        urlparse(url).hostname or url)
        else:
            try:
                download_fid_weights(cached, url, FID_WEIGHTS_SHA256_PREFIX)
            except OSError as e:          # network trouble after a good probe: fall over
                log.warning("FID weights: download of %s failed (%s); using the OFFLINE "
                            "extractor", url, e)
            else:
                return _real_extractor(cached, "downloaded weights", device)
    return offline_extractor(reference, offline_image_size, device, batch_size)


def _iter_batches(images: Any, batch_size: int) -> tuple[Iterable[torch.Tensor], int | None]:
    if torch.is_tensor(images):
        if images.ndim != 4:
            _to_input(images, torch.device("cpu"))       # raises the uniform message
        return torch.split(images, max(1, batch_size)), images.shape[0]

    def rebatch() -> Iterable[torch.Tensor]:
        for batch in images:
            if torch.is_tensor(batch) and batch.ndim == 4 and batch.shape[0] > batch_size:
                yield from torch.split(batch, batch_size)
            else:
                yield batch

    total = None
    if hasattr(images, "__len__") and not hasattr(images, "shape"):
        try:
            total = sum(int(b.shape[0]) for b in images)  # a list of batches: cheap
        except Exception:
            total = None
    return rebatch(), total


def extract(extractor: Extractor, images: Any, batch_size: int, device: torch.device,
            desc: str = "features") -> np.ndarray:
    """float64 (N, 2048) pool features of uint8 (N, H, W, 3) images (a tensor or an iterable
    of such batches), with a progress bar."""
    device = torch.device(device)
    model = extractor.model.to(device).eval()
    batches, total = _iter_batches(images, batch_size)
    out: list[np.ndarray] = []
    with torch.inference_mode(), tqdm(total=total, desc=desc, unit="img") as bar:
        for batch in batches:
            x = _to_input(batch, device)
            if x.shape[0] == 0:
                continue
            out.append(model(x).to(device="cpu", dtype=torch.float64).numpy())
            bar.update(x.shape[0])
    if not out:
        return np.zeros((0, FEATURE_DIM), dtype=np.float64)
    return np.concatenate(out, axis=0)
