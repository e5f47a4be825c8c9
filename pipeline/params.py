"""params.yaml loaded into frozen, typed structures; unknown keys and wrong types are rejected
before any stage does work."""
from __future__ import annotations

import argparse
import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from pipeline import yaml12
from pipeline.errors import PipelineError
from pipeline.sample import MONET_COUNT, PHOTO_COUNT


class ParamsError(PipelineError, ValueError):
    """A params.yaml problem; its message names the key and what is wrong."""


MIN_IMAGES = 2  # of each domain: FID and KID compare two sets' covariances, which need two images


# Every default below is params.yaml's committed value (tested), so a params file that leaves a
# key out runs the recipe params.yaml describes.


@dataclass(frozen=True)
class Ingest:
    source: str = "sample"
    shard_size: int = 1024
    sample_photos: int = PHOTO_COUNT  # the embedded sample renders at most these many scenes
    sample_paintings: int = MONET_COUNT

    def check(self) -> None:
        _require(bool(self.source), "ingest.source", "must not be empty")
        _require(MIN_IMAGES <= self.sample_photos <= PHOTO_COUNT, "ingest.sample_photos",
                 f"must be in [{MIN_IMAGES}, {PHOTO_COUNT}] (the photos the embedded sample can render)")
        _require(MIN_IMAGES <= self.sample_paintings <= MONET_COUNT, "ingest.sample_paintings",
                 f"must be in [{MIN_IMAGES}, {MONET_COUNT}] (the paintings the embedded sample can render)")
        _require(self.shard_size > 0, "ingest.shard_size", "must be > 0")


DIFFAUGMENT_POLICIES = ("color", "translation", "cutout")  # pipeline/diffaugment.py


@dataclass(frozen=True)
class Train:
    generator: str = "resnet"
    gen_filters: int = 16
    disc_filters: int = 16
    resnet_blocks: int = 4
    gan_loss: str = "lsgan"
    epochs: int = 4
    steps_per_epoch: int = 80
    batch_size: int = 8
    lr: float = 2e-4
    beta1: float = 0.5
    decay_from_epoch: int = 2
    pool_size: int = 50
    compile: bool = False
    channels_last: bool = False
    grid_size: int = 8
    processes: int = 1
    log_every: int = 50
    diffaugment: str = ""
    ema: float = 0.0
    upsample: str = "resize"

    def check(self) -> None:
        _choice(self.generator, "train.generator", ("resnet", "unet"))
        _choice(self.gan_loss, "train.gan_loss", ("lsgan", "bce"))
        for name in ("gen_filters", "disc_filters", "epochs", "steps_per_epoch", "batch_size", "grid_size",
                     "processes", "log_every"):
            _require(getattr(self, name) > 0, f"train.{name}", "must be > 0")
        _require(self.resnet_blocks >= 0, "train.resnet_blocks", "must be >= 0")
        _require(self.pool_size >= 0, "train.pool_size", "must be >= 0")
        # Adam's step: above 1 a step overshoots any weight (and from about 1.7e38 torch's float32 step
        # overflowed with a traceback)
        _require(0 < self.lr <= 1, "train.lr", "must be in (0, 1] (Adam's step size; the recipes use 0.0002)")
        _require(0 <= self.beta1 < 1, "train.beta1", "must be in [0, 1)")
        _require(0 <= self.decay_from_epoch <= self.epochs, "train.decay_from_epoch",
                 f"must be in [0, train.epochs={self.epochs}]")
        unknown = [name for name in self.diffaugment_policy if name not in DIFFAUGMENT_POLICIES]
        _require(not unknown, "train.diffaugment", f"has unknown {', '.join(map(repr, unknown))}; expected a "
                 f"comma-separated list of {', '.join(DIFFAUGMENT_POLICIES)}, or empty")
        _require(0 <= self.ema < 1, "train.ema", "must be in [0, 1) (0: off)")
        _choice(self.upsample, "train.upsample", ("transpose", "resize"))

    @property
    def diffaugment_policy(self) -> tuple[str, ...]:
        """'color, translation' -> ('color', 'translation')."""
        return tuple(name.strip() for name in self.diffaugment.split(",") if name.strip())


@dataclass(frozen=True)
class Generate:
    batch_size: int = 64
    jpeg_quality: int = 95

    def check(self) -> None:
        _require(self.batch_size > 0, "generate.batch_size", "must be > 0")
        _require(1 <= self.jpeg_quality <= 100, "generate.jpeg_quality", "must be in [1, 100]")


@dataclass(frozen=True)
class Evaluate:
    extractor: str = "offline"
    weights: str = ""
    download: bool = True
    offline_image_size: int = 75
    batch_size: int = 64
    baseline_images: int = 1000
    kid_subsets: int = 100
    kid_subset_size: int = 1000

    def check(self) -> None:
        _choice(self.extractor, "evaluate.extractor", ("offline", "fid-inception"))
        # Inception-v3's stride-2 stem and reductions need at least 75 px
        # and above the FID network's own 299 px a random network only costs more time and memory
        _require(75 <= self.offline_image_size <= 299, "evaluate.offline_image_size", "must be in [75, 299]")
        _require(self.batch_size > 0, "evaluate.batch_size", "must be > 0")
        _require(self.baseline_images >= 2, "evaluate.baseline_images", "must be >= 2 (a covariance needs two)")
        _require(self.kid_subsets > 0, "evaluate.kid_subsets", "must be > 0")
        _require(self.kid_subset_size >= 2, "evaluate.kid_subset_size", "must be >= 2")


@dataclass(frozen=True)
class Package:
    min_images: int = 7000
    max_images: int = 10000

    def check(self) -> None:
        _require(0 < self.min_images <= self.max_images, "package.min_images",
                 "must be > 0 and <= package.max_images")

    def outside(self, images: int) -> str | None:
        """How to change these bounds so that `images` JPEGs make a submission; None when they do."""
        if images < self.min_images:
            return "lower package.min_images"
        return "raise package.max_images" if images > self.max_images else None


@dataclass(frozen=True)
class Params:
    seed: int = 0
    image_size: int = 64
    lambda_cycle: float = 10.0
    lambda_identity: float = 0.5
    device: str = "auto"
    precision: str = "auto"
    ingest: Ingest = field(default_factory=Ingest)
    train: Train = field(default_factory=Train)
    generate: Generate = field(default_factory=Generate)
    evaluate: Evaluate = field(default_factory=Evaluate)
    package: Package = field(default_factory=Package)

    def check(self) -> None:
        _require(0 <= self.seed < 2**32, "seed", "must be in [0, 2**32 - 1] (NumPy's seeds are 32-bit)")
        # the ResNet generator halves the size twice, the U-Net down to 1×1
        _require(32 <= self.image_size <= 256 and self.image_size % 32 == 0, "image_size",
                 "must be a multiple of 32 between 32 and 256")
        _require(self.train.generator != "unet" or self.image_size & (self.image_size - 1) == 0, "image_size",
                 f"is {self.image_size}; the unet generator halves it down to 1×1, so it must be 32, 64, 128 or 256")
        _require(self.lambda_cycle >= 0, "lambda_cycle", "must be >= 0")
        _require(self.lambda_identity >= 0, "lambda_identity", "must be >= 0")
        _choice(self.device, "device", ("auto", "cpu", "cuda"))
        _choice(self.precision, "precision", ("auto", "bf16", "fp32"))
        for section in (self.ingest, self.train, self.generate, self.evaluate, self.package):
            section.check()


def _require(ok: bool, key: str, what: str) -> None:
    if not ok:
        raise ParamsError(f"params: '{key}' {what}")


def _choice(value: str, key: str, allowed: tuple[str, ...]) -> None:
    _require(value in allowed, key, f"is {value!r}; expected one of {', '.join(allowed)}")


def _build(cls, raw: object, prefix: str, source: str = "params.yaml"):
    """Build dataclass `cls` from a mapping, rejecting unknown keys and wrong types."""
    where = prefix.rstrip(".") or source
    if not isinstance(raw, dict):
        raise ParamsError(f"params: '{where}' must be a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - known, key=str)  # keys may be numbers too (`1: 2`)
    if unknown:
        raise ParamsError(f"params: unknown key '{prefix}{unknown[0]}' (known: {', '.join(sorted(known))})")
    values = {}
    for name, value in raw.items():
        kind = hints[name]
        key = f"{prefix}{name}"
        if dataclasses.is_dataclass(kind):
            values[name] = _build(kind, value, f"{key}.")
        else:
            values[name] = _coerce(value, kind, key)
    return cls(**values)


def _coerce(value: object, kind: type, key: str):
    # bool is a subclass of int: never let `true` pass as a number or 1 as a switch
    if kind is bool:
        ok = isinstance(value, bool)
    elif kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
        # torch and NumPy hold sizes and counts in 64 bits: beyond that a stage failed late, with a traceback
        if ok and not -2**63 <= value < 2**63:
            raise ParamsError(f"params: '{key}' must be a whole number from -2**63 to 2**63 - 1 (torch and NumPy "
                              f"count in 64 bits), got {value}")
    elif kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        try:
            value = float(value) if ok else value
        except OverflowError:  # a whole number of 309 digits or more
            value = math.inf
        if ok and not math.isfinite(value):  # .inf and .nan are YAML floats, but no rate or weight
            raise ParamsError(f"params: '{key}' must be a finite number, got {value!r}")
    elif kind is str:
        ok = isinstance(value, str)
    else:  # pragma: no cover - a new field type needs a rule here
        raise TypeError(f"no rule for {kind}")
    if not ok:
        expected = "true or false" if kind is bool else kind.__name__
        raise ParamsError(f"params: '{key}' must be {expected}, got {value!r} ({type(value).__name__})")
    return value


def parse(raw: object, source: str = "params.yaml") -> Params:
    params = _build(Params, raw if raw is not None else {}, "", source)
    params.check()
    return params


def read_yaml(path: str | Path) -> object:
    """A YAML file (params.yaml, dvc.yaml, dvc.lock) as plain Python values, with the YAML 1.2
    rules DVC reads and writes them with (`lr: 1e-05` is a float); every reader of these files
    goes through here so that they all read values alike."""
    return yaml12.read(path)


def read_file(path: Path) -> object:
    """A params file's values as YAML reads them; one line for a file that cannot be read."""
    try:
        return read_yaml(path)
    except FileNotFoundError:
        raise ParamsError(f"params: {path} not found") from None
    except IsADirectoryError:
        raise ParamsError(f"params: {path} is a folder, not a params file") from None
    except UnicodeDecodeError as e:
        byte = e.object[e.start:e.start + 1]
        raise ParamsError(f"params: {path} is not UTF-8 text (byte {e.start}: {byte!r})") from None
    except yaml.YAMLError as e:
        raise ParamsError(f"params: {path} is not valid YAML: {yaml12.one_line(e)}") from None


def load(path: str | Path = "params.yaml") -> Params:
    path = Path(path)
    raw = read_file(path)
    if path.resolve() == Path("params.yaml").resolve():  # DVC's, which every line of the README names
        return parse(raw)
    try:
        return parse(raw, str(path))
    except ParamsError as e:  # a stage run by hand with --params: say which file
        if str(e).startswith(f"params: '{path}' "):  # names it already: it is no mapping
            raise
        raise ParamsError(f"{e} (in {path})") from None


def flatten(params: Params) -> dict[str, object]:
    """{'train.lr': 0.0002, 'lambda_cycle': 10.0, ...} for MLflow."""
    out: dict[str, object] = {}

    def walk(obj, prefix):
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value):
                walk(value, f"{prefix}{f.name}.")
            else:
                out[f"{prefix}{f.name}"] = value

    walk(params, "")
    return out


def stage_arguments(doc: str, reads_shards: bool = True) -> argparse.ArgumentParser:
    """A stage's command line: its description, --params and, for the stages after ingest, the
    shards and manifest it reads."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml", help="the params file (default: params.yaml)")
    if reads_shards:
        ap.add_argument("--shards", type=Path, required=True, help="folder of the uint8 image shards (from ingest)")
        ap.add_argument("--manifest", type=Path, required=True, help="the shards' index, CSV (from ingest)")
    return ap
