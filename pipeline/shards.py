"""uint8 image shards (torch tensors, N×256×256×3) and the manifest that indexes them."""
from __future__ import annotations

import re
import unicodedata
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from pipeline.errors import DataError, brief
from pipeline.files import save_torch

DOMAINS = ("monet", "photo")
MANIFEST_COLUMNS = ["domain", "image_name", "shard", "offset", "tfrecord", "record"]
MAX_NAME_BYTES = 200  # a photo's JPEG is '<image_name>.jpg'; file systems stop at 255 bytes
SHARD_NAME = re.compile(r"(monet|photo)-\d{3,}\.pt")  # shard_name's


def shard_name(domain: str, k: int) -> str:
    return f"{domain}-{k:03d}.pt"


def write_domain(items: Iterable[tuple[dict, np.ndarray]], out_dir: Path, domain: str,
                 shard_size: int) -> list[dict]:
    """Group images into shards of `shard_size`; returns manifest rows with shard/offset filled."""
    manifest, batch, k = [], [], 0

    def flush():
        nonlocal batch, k
        save_torch(torch.from_numpy(np.stack(batch)), out_dir / shard_name(domain, k))
        batch, k = [], k + 1

    for row, pixels in items:
        manifest.append({**row, "domain": domain, "shard": shard_name(domain, k), "offset": len(batch)})
        batch.append(pixels)
        if len(batch) == shard_size:
            flush()
    if batch:
        flush()
    return manifest


def check_photo_name(name: str, where: str) -> None:
    """generate saves each photo as '<image_name>.jpg' in one folder: the name must be a plain
    file name there (Kaggle's are 10 hex digits; a name like '../x' would write outside it)."""
    if (not name or name.startswith(".") or len(name.encode()) > MAX_NAME_BYTES
            or any(c in "/\\" for c in name) or _has_control_character(name)):
        raise DataError(f"{where}: image_name {name!r} cannot name a file (generate saves '<image_name>.jpg'): "
                        f"no '/', '\\', control characters or leading '.', at most {MAX_NAME_BYTES} bytes")


def _has_control_character(name: str) -> bool:
    return any(ord(c) < 32 or ord(c) == 127 for c in name)


def check_painting_name(name: str, where: str) -> None:
    """A painting's name is no file name, but it is a manifest cell: a control character in it (a
    bare carriage return) splits the row when the CSV is read back."""
    if _has_control_character(name):
        raise DataError(f"{where}: image_name {name!r} holds control characters, which the manifest cannot keep")


def check_unique(group: pd.DataFrame, where) -> None:
    """Each image_name once per domain; photo names also once ignoring case and Unicode
    normalisation (each becomes a JPEG). `where(row)` names a manifest row's file and record."""
    names = group["image_name"]
    # macOS also takes a name and its other Unicode normalisation (é as one character or as e + ́)
    # for one file: compare photo names normalised and case-folded
    folded = names.map(lambda n: unicodedata.normalize("NFC", unicodedata.normalize("NFC", n).casefold()))
    for key in [names] + ([folded] if group["domain"].iloc[0] == "photo" else []):
        clash = key[key.duplicated(keep=False)]
        if clash.empty:
            continue
        first, again = (group.loc[i] for i in clash.index[clash == clash.iloc[0]][:2])
        if first["image_name"] == again["image_name"]:
            raise DataError(f"{where(first)}: image_name '{first['image_name']}' appears twice "
                            f"(again at {where(again)})")
        raise DataError(f"{where(first)}: image_name '{first['image_name']}' and '{again['image_name']}' "
                        f"({where(again)}) differ only in case or Unicode normalisation; their JPEGs would be one "
                        f"file where names ignore case (macOS, Windows) or normalisation (macOS)")


_EXPECTED = {"domain": f"is not one of {', '.join(DOMAINS)}",
             "offset": "is not a whole number from 0 up",
             "shard": "is not a shard of its domain (photo-000.pt, monet-001.pt, ...)"}


def read_manifest(path: str | Path) -> pd.DataFrame:
    """The manifest, checked as ingest wrote it: every later stage trusts its names (generate
    writes '<image_name>.jpg'), shards and offsets, so a damaged or edited one is one line."""
    try:
        manifest = pd.read_csv(path, dtype={c: str for c in ("image_name", "domain", "shard", "offset")},
                               keep_default_na=False)
    except FileNotFoundError:
        raise DataError(f"{path}: manifest not found (run the ingest stage first)") from None
    except IsADirectoryError:
        raise DataError(f"{path}: a folder, not a manifest (ingest writes it as a CSV file)") from None
    except (ValueError, UnicodeDecodeError) as e:  # pandas' ParserError and EmptyDataError are ValueErrors
        raise DataError(f"{path}: not a readable manifest ({brief(e)})") from None
    missing = set(MANIFEST_COLUMNS) - set(manifest.columns)
    if missing:
        raise DataError(f"{path}: manifest lacks columns {sorted(missing)}")

    def row(i: int) -> str:
        return f"{path}: row {i + 1}"

    def refuse(bad: pd.Series, what: str) -> None:
        if bad.any():
            i = int(bad.to_numpy().nonzero()[0][0])
            raise DataError(f"{row(i)}: {what} {manifest.iloc[i][what]!r} {_EXPECTED[what]}")

    refuse(~manifest["domain"].isin(DOMAINS), "domain")
    # digits as ingest writes them, and few enough for an int64 ('1e30' and 'inf' are numbers too)
    refuse(~manifest["offset"].str.fullmatch(r"[0-9]{1,18}"), "offset")
    manifest["offset"] = manifest["offset"].astype("int64")
    own = [bool(SHARD_NAME.fullmatch(s)) and s.startswith(f"{d}-")
           for s, d in zip(manifest["shard"], manifest["domain"])]
    refuse(~pd.Series(own, index=manifest.index), "shard")
    # two rows at one place would give the second name the first one's pixels
    again = manifest.duplicated(["shard", "offset"])
    if again.any():
        second = int(again.to_numpy().nonzero()[0][0])
        shard, offset = manifest.at[second, "shard"], manifest.at[second, "offset"]
        first = int(((manifest["shard"] == shard) & (manifest["offset"] == offset)).to_numpy().nonzero()[0][0])
        raise DataError(f"{row(first)}: shard {shard!r} offset {offset} is listed twice (again at row {second + 1})")
    names = manifest["image_name"].to_numpy()  # not .at[] per row: 7,028 lookups took 0.2 s a stage
    for i in (manifest["domain"] == "photo").to_numpy().nonzero()[0]:
        check_photo_name(names[i], row(int(i)))
    for _, group in manifest.groupby("domain"):
        check_unique(group, lambda r: row(int(r.name)))
    return manifest


def iter_domain(shards_dir: str | Path, manifest: pd.DataFrame, domain: str) -> Iterator[tuple[list[str], torch.Tensor]]:
    """Yield (image names, uint8 N×H×W×3 tensor) shard by shard, in manifest order. Shards are
    memory-mapped: a shard read whole, in order, is never copied into memory first."""
    rows = manifest[manifest["domain"] == domain]
    if rows.empty:
        raise DataError(f"manifest has no '{domain}' images")
    # in the order the manifest lists them (write_domain's), not by name: past 1,000 shards of a
    # domain, "photo-1000.pt" sorts before "photo-101.pt"; and run by run of one shard, so that a
    # manifest whose rows alternate between shards still reads in its order (evaluate pairs the
    # names it lists with the pixels read here)
    runs = (rows["shard"] != rows["shard"].shift()).cumsum()
    for _, group in rows.groupby(runs, sort=False):
        path = Path(shards_dir) / group["shard"].iloc[0]
        try:
            images = torch.load(path, weights_only=True, mmap=True)
        except FileNotFoundError:
            raise DataError(f"{path}: shard listed in the manifest is missing") from None
        except Exception as e:  # truncated, overwritten, not torch's: its loader's own errors
            raise DataError(f"{path}: not a readable shard ({brief(e)}); run the ingest "
                            f"stage again (dvc repro -f -s ingest)") from None
        if not torch.is_tensor(images):
            raise DataError(f"{path}: expected a uint8 N×H×W×3 tensor, got {type(images).__name__}")
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[-1] != 3 \
                or images.shape[1] != images.shape[2]:
            raise DataError(f"{path}: expected uint8 N×H×W×3 with H = W, got {images.dtype} {tuple(images.shape)}")
        offsets = group["offset"].to_numpy()
        if offsets.max() >= len(images):
            raise DataError(f"{path}: manifest offset {offsets.max()} beyond {len(images)} images")
        whole = len(offsets) == len(images) and (offsets == np.arange(len(images))).all()
        yield group["image_name"].tolist(), images if whole else images[torch.tensor(offsets)]


def load_domain(shards_dir: str | Path, manifest: pd.DataFrame, domain: str,
                size: int | None = None) -> tuple[list[str], torch.Tensor]:
    """All images of a domain as uint8 N×H×W×3, resized shard by shard to `size` (keeps memory low)."""
    names, parts = [], []
    for shard_names, images in iter_domain(shards_dir, manifest, domain):
        names += shard_names
        parts.append(images if size is None else resize_uint8(images, size))
    return names, torch.cat(parts)


def resize_uint8(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 N×H×W×3 -> uint8 N×size×size×3 (antialiased bilinear)."""
    if images.shape[1] == size and images.shape[2] == size:
        return images
    out = []
    # 16 images at a time: their float copies (12 MiB at 256 px) are reused by the allocator, where
    # larger ones are mapped and unmapped for each chunk (measured 2.3× slower at 256 images)
    for chunk in images.split(16):
        x = chunk.permute(0, 3, 1, 2).float()
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        out.append(x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous())
    return torch.cat(out)
