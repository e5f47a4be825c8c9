"""The competition's TFRecords, read and written with the `tfrecord` package (no TensorFlow).

Each record is a tf.train.Example with `image_name`, `image` (JPEG bytes) and `target` (bytes).
Two things the package does not do for us, on purpose here:
- it never checks the CRC32C checksums, so `verify` walks the framing and checks them first;
- given an index file it starts at a random record and wraps around, so we never pass one.
"""
from __future__ import annotations

import io
import struct
from pathlib import Path
from typing import Iterable, Iterator, NamedTuple

import numpy as np
from PIL import Image
from tfrecord.reader import example_loader
from tfrecord.writer import TFRecordWriter

from pipeline.errors import DataError
from pipeline.files import atomic_path

SCHEMA = {"image_name": "byte", "image": "byte", "target": "byte"}
IMAGE_SHAPE = (256, 256, 3)


class Example(NamedTuple):
    image_name: str
    image: bytes  # JPEG
    target: str


def write(path: str | Path, examples: Iterable[Example]) -> int:
    """Write examples to one TFRecord file atomically; returns the record count."""
    count = 0
    with atomic_path(path) as tmp:
        writer = TFRecordWriter(str(tmp))
        try:
            for ex in examples:
                writer.write({
                    "image_name": (ex.image_name.encode(), "byte"),
                    "image": (ex.image, "byte"),
                    "target": (ex.target.encode(), "byte"),
                })
                count += 1
        finally:
            writer.close()
    return count


def verify(path: str | Path) -> int:
    """Check framing and both masked CRC32Cs of every record; returns the record count."""
    data = Path(path).read_bytes()
    pos, count = 0, 0
    while pos < len(data):
        where = f"{path}: record {count} at byte {pos}"
        if pos + 12 > len(data):
            raise DataError(f"{where}: truncated record header")
        header = data[pos:pos + 8]
        (length,) = struct.unpack("<Q", header)
        if data[pos + 8:pos + 12] != TFRecordWriter.masked_crc(header):
            raise DataError(f"{where}: length checksum mismatch (corrupt file)")
        body_start, body_end = pos + 12, pos + 12 + length
        if body_end + 4 > len(data):
            raise DataError(f"{where}: truncated (needs {length} bytes of data)")
        if data[body_end:body_end + 4] != TFRecordWriter.masked_crc(data[body_start:body_end]):
            raise DataError(f"{where}: data checksum mismatch (corrupt file)")
        pos, count = body_end + 4, count + 1
    return count


def read(path: str | Path) -> Iterator[Example]:
    """Verified examples of one file, in file order."""
    verify(path)
    # index_path=None: read sequentially from the start, no random wrap-around
    for i, rec in enumerate(example_loader(str(path), None, description=list(SCHEMA))):
        try:
            yield Example(bytes(rec["image_name"]).decode(), bytes(rec["image"]), bytes(rec["target"]).decode())
        except (KeyError, UnicodeDecodeError) as e:
            raise DataError(f"{path}: record {i}: bad field ({e})") from None


def decode_image(jpeg: bytes, where: str) -> np.ndarray:
    """JPEG bytes -> (256, 256, 3) uint8, or a DataError naming `where`."""
    try:
        with Image.open(io.BytesIO(jpeg)) as img:
            img.load()
            mode, size = img.mode, img.size
            pixels = np.asarray(img)
    except Exception as e:  # PIL raises many types for broken data
        raise DataError(f"{where}: image does not decode ({type(e).__name__}: {e})") from None
    if mode != "RGB" or pixels.shape != IMAGE_SHAPE:
        raise DataError(f"{where}: image is {size[0]}x{size[1]} {mode}, expected 256x256 RGB (3 channels)")
    return pixels


def encode_jpeg(pixels: np.ndarray, quality: int = 95) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()
