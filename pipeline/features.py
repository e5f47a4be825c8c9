"""Image features for FID, KID and MiFID: the extractor a run uses, and extraction itself.

Which extractor is a param (`evaluate.extractor`), never a fallback:
- `fid-inception`: the FID Inception-v3 Kaggle's MiFID uses, with its weights from
  `fid_weights.find` (a named file, the hub cache, or a checked download); none to be had is an
  error. Its numbers are comparable to Kaggle's.
- `offline`: the same graph with a deterministic random init and BatchNorm statistics recomputed
  on the reference paintings, at a reduced input size. It runs anywhere, with no download; its
  numbers rank translations on the embedded sample but are not comparable to Kaggle's.
"""
from __future__ import annotations

import collections
import copy
import hashlib
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, TypeVar

import numpy as np
import pytorch_fid
import torch
import torchvision
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval
from torchvision.models.inception import BasicConv2d
from tqdm import tqdm

from pipeline import fid_inception, fid_weights
from pipeline.errors import FeatureError
from pipeline.feature_cache import code_key, images_key, stored_digest
from pipeline.files import save_torch
from pipeline.fid_inception import FEATURE_DIM, FID_IMAGE_SIZE, MIN_IMAGE_SIZE, FIDInceptionPool, build_fid_inception

OFFLINE_SEED = 0
CODE_FILES = (Path(__file__), Path(fid_inception.__file__))  # what computes the features


def code_version() -> str:
    """Part of every extractor's key: its features change with this code and these libraries (the
    offline extractor's random weights with torch's initialisation too)."""
    return code_key(CODE_FILES, f"torch {torch.__version__}", f"torchvision {torchvision.__version__}",
                    f"pytorch-fid {pytorch_fid.__version__}")


EXTRACTORS = ("offline", "fid-inception")
OFFLINE_IMAGE_SIZE = 75  # params.yaml's evaluate.offline_image_size (tested): the id `offline` stands for it


def offline_id(image_size: int) -> str:
    """The offline extractor's id: at another input size it scores on another scale (fid_vs_ground_truth
    1.96 at 75 px, 2.52 at 99 px on a tiny sample), so runs filtered by the id must not mix them."""
    return "offline" if int(image_size) == OFFLINE_IMAGE_SIZE else f"offline-{int(image_size)}px"


OTHER_FID_WEIGHTS = "fid-inception-other"  # the id of fid-inception with weights that are not the published file


@dataclass(frozen=True)
class Extractor:
    model: nn.Module      # eval mode; float NCHW in [0, 1] -> (N, 2048)
    id: str               # one of EXTRACTORS: what metrics files and MLflow tags say
    name: str             # the long description, for the log and MLflow
    comparable: bool      # True only for the published FID weights (their sha256)
    image_size: int       # input px the model resizes to (299, or the offline size)
    key: str              # what its features depend on besides the images (weights, options)
    runs: nn.Module       # what `extract` runs: `model`, or for the offline extractor `model` with
                          # its BatchNorms folded into the convs (see fold_batchnorm)


SMALL_INPUT = 128  # px: up to this input size extract runs one batch per core on the CPU (see _in_order)
FOLDED = "bn-folded"  # in the offline extractor's key: its cached features come from the folded network


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """`model` (eval mode) with the BatchNorm of each Inception conv block (conv -> BN -> ReLU)
    folded into the conv's weights and bias, in place. Returns `model`.

    The same features up to float rounding (1e-5 relative) and ~17% faster on the CPU. Used for
    the offline extractor only: the fid-inception features stay pytorch-fid's computation, the one
    whose numbers are compared with Kaggle's."""
    for block in model.modules():
        if isinstance(block, BasicConv2d) and isinstance(block.bn, nn.BatchNorm2d):
            block.conv = fuse_conv_bn_eval(block.conv.eval(), block.bn.eval())
            block.bn = nn.Identity()
    return model.eval()


def fid_extractor(path: Path, what: str, device: torch.device) -> Extractor:
    """The FID Inception-v3 with the weights at `path` (FeatureError when they are not usable)."""
    net = fid_weights.load_weights(path, what)
    digest = fid_weights.sha256(path)
    expected = fid_weights.FID_WEIGHTS_SHA256_PREFIX
    published = digest.startswith(expected)  # other weights in the same graph make other numbers
    note = "" if published else (f"; sha256 {digest[:8]}, NOT the published {expected}: not comparable to "
                                 f"Kaggle's MiFID")
    model = FIDInceptionPool(net, FID_IMAGE_SIZE).to(device).eval()
    # its own id: in evaluate.json, `dvc exp show` and the MLflow tag, scores of other weights are not
    # filed with Kaggle-comparable ones (the note alone was in the log and the description only)
    return Extractor(model=model, id="fid-inception" if published else OTHER_FID_WEIGHTS,
                     name=f"fid-inception-v3 ({fid_weights.FID_WEIGHTS_NAME}, from {path}{note})",
                     comparable=published, image_size=FID_IMAGE_SIZE,
                     key=f"fid-inception/{digest}/{FID_IMAGE_SIZE}/{code_version()}",
                     runs=model)


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
    batches (momentum=None), running the net in train mode for BatchNorm only; ends in eval. On
    the CPU on one thread, as the features are computed: with more, the statistics (so every
    offline score after them) depended on the core count of the run that first cached them."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    model.eval()
    for m in bns:
        m.train()
    cores = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)
    try:
        for batch in _batches_uint8(reference, batch_size):
            model(_to_input(batch, device))
    finally:
        model.eval()
        torch.set_num_threads(cores)


# The recalibrated statistics are the average of each batch's own (BatchNorm in train mode), so
# they depend on how the paintings are batched: fixed here, part of what the extractor is, never
# evaluate.batch_size (a speed setting; 32 instead of 64 moved the sample's fid_vs_ground_truth
# from 1.292 to 1.391)
RECALIBRATION_BATCH = 64
BATCHNORM_STATS = ("running_mean", "running_var", "num_batches_tracked")


def _batchnorm_stats(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.cpu() for k, v in model.state_dict().items() if k.endswith(BATCHNORM_STATS)}


def _stats_check(path: Path, stats: dict[str, torch.Tensor]) -> torch.Tensor:
    """The digest stored beside the statistics, as the feature cache stores one beside features."""
    return torch.tensor(stored_digest(path.name, {name: t.numpy() for name, t in stats.items()}))


def _save_batchnorm_stats(model: nn.Module, path: Path) -> None:
    stats = _batchnorm_stats(model)
    save_torch({"statistics": stats, "check": _stats_check(path, stats)}, path)


def _load_batchnorm_stats(model: nn.Module, path: Path, say: Callable[[str], None]) -> bool:
    """Put the BatchNorm statistics saved at `path` into `model`; False (and `model` untouched)
    when there is no such file or it does not read back as exactly these layers' statistics, as
    they were written."""
    if not path.exists():
        return False
    try:
        stored = torch.load(path, map_location="cpu", weights_only=True)
        saved, check = stored["statistics"], stored["check"]
        expected = _batchnorm_stats(model)
        if not isinstance(saved, dict) or saved.keys() != expected.keys() \
                or any(saved[k].shape != v.shape or saved[k].dtype != v.dtype for k, v in expected.items()):
            raise ValueError("not this network's BatchNorm statistics")
        if not torch.equal(check, _stats_check(path, saved)):
            raise ValueError("its numbers are not those it was written with")
    except Exception as e:  # any unreadable cache file is recomputed, never trusted
        say(f"evaluate: {path} does not read back ({type(e).__name__}); recalibrating BatchNorm")
        return False
    model.load_state_dict(saved, strict=False)
    say(f"evaluate: offline extractor's BatchNorm statistics from the cache ({path})")
    return True


def offline_extractor(reference: torch.Tensor, image_size: int, device: torch.device,
                      seed: int = OFFLINE_SEED, cache: Path | None = None,
                      say: Callable[[str], None] = print) -> Extractor:
    """The FID graph with a deterministic random init and BatchNorm recalibrated on `reference`,
    in batches of RECALIBRATION_BATCH.

    Without recalibration the BatchNorm layers hold identity statistics and the activations of a
    random net explode (FIDs ~1e23); with it they behave. Not comparable to Kaggle's numbers.
    With a `cache` folder the statistics are kept there, one small file per (seed, size,
    paintings), and read back instead of running the paintings through the net again."""
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
    # its BatchNorm statistics come from the paintings: their bytes are part of what it is
    # and the device's arithmetic: statistics a GPU computed are not a CPU's
    identity = (f"offline/{seed}/{int(image_size)}/bn{RECALIBRATION_BATCH}/{images_key(reference)}/"
                f"{code_version()}/{torch.device(device).type}")
    stats = cache / f"offline-batchnorm-{hashlib.sha256(identity.encode()).hexdigest()[:32]}.pt" if cache else None
    if stats is None or not _load_batchnorm_stats(model, stats, say):
        recalibrate_batchnorm(model, reference, RECALIBRATION_BATCH, device)
        if stats is not None:
            _save_batchnorm_stats(model, stats)
    model.eval()
    n = reference.shape[0]
    name = (f"OFFLINE random-init Inception-v3 (seed {seed}, BatchNorm recalibrated on {n} paintings in "
            f"batches of {RECALIBRATION_BATCH}, {int(image_size)} px) — not comparable to Kaggle MiFID")
    return Extractor(model=model, id=offline_id(image_size), name=name, comparable=False, image_size=int(image_size),
                     key=f"{identity}/{FOLDED}", runs=fold_batchnorm(copy.deepcopy(model)))


# ---------------------------------------------------------------------------------- public API

def load_extractor(kind: str, weights: str, download: bool, offline_image_size: int,
                   reference: torch.Tensor | None, device: torch.device,
                   cache: Path | None = None, say: Callable[[str], None] = print) -> Extractor:
    """The extractor `kind` names (one of EXTRACTORS): FeatureError when it cannot be had.
    `cache`: where the offline extractor keeps its BatchNorm statistics (see offline_extractor)."""
    device = torch.device(device)
    if kind == "fid-inception":
        return fid_extractor(*fid_weights.find(weights, download), device)
    if kind == "offline":
        return offline_extractor(reference, offline_image_size, device, cache=cache, say=say)
    raise FeatureError(f"evaluate.extractor is {kind!r}; expected one of {', '.join(EXTRACTORS)}")


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
    model = extractor.runs.to(device).eval()
    batches, total = _iter_batches(images, batch_size)

    def forward(batch: torch.Tensor) -> np.ndarray:
        x = _to_input(batch, device)
        if x.shape[0] == 0:
            return np.zeros((0, FEATURE_DIM), dtype=np.float64)
        with torch.inference_mode():  # per thread, as autograd's mode is
            return model(x).to(device="cpu", dtype=torch.float64).numpy()

    out: list[np.ndarray] = []
    with tqdm(total=total, desc=desc, unit="img") as bar:
        for features in _in_order(forward, batches, device, small=extractor.image_size <= SMALL_INPUT):
            out.append(features)
            bar.update(len(features))
    if not out:
        return np.zeros((0, FEATURE_DIM), dtype=np.float64)
    return np.concatenate(out, axis=0)


def _in_order(forward: Callable[[torch.Tensor], np.ndarray], batches: Iterable[torch.Tensor],
              device: torch.device, small: bool) -> Iterator[np.ndarray]:
    """forward(batch) for each batch, in order. On a CPU of several cores, when the network's
    input is `small`, one batch per core at a time, each on one thread: its maps, a few pixels
    across, leave several threads on one batch partly idle (1.19× the images per second on 2
    cores at 75 px: bench/features.py), and the features no longer depend on how many cores the
    machine has. At 299 px it gains little (7%) and a batch of 64 in flight holds about 1 GiB."""
    cores = torch.get_num_threads()
    if device.type != "cpu" or cores == 1 or not small:
        yield from map(forward, batches)
        return
    torch.set_num_threads(1)
    try:
        yield from ordered_map(forward, batches, cores)
    finally:
        torch.set_num_threads(cores)


T, R = TypeVar("T"), TypeVar("R")


def ordered_map(fn: Callable[[T], R], items: Iterable[T], threads: int) -> Iterator[R]:
    """fn(item) for each item, in order, computed by `threads` threads; at most one item waits
    beside those running, so what is in flight stays bounded."""
    with ThreadPoolExecutor(threads) as pool:
        running: collections.deque[Future] = collections.deque()
        for item in items:
            running.append(pool.submit(fn, item))
            if len(running) > threads:
                yield running.popleft().result()
        while running:
            yield running.popleft().result()
