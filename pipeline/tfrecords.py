"""The competition's TFRecords, read and written with the `tfrecord` package (no TensorFlow).

Each record is a tf.train.Example with `image_name`, `image` (JPEG bytes) and `target` (bytes).
Three things the package does not do for us, on purpose here:
- it never checks the CRC32C checksums, so `verify` walks the framing and checks them first;
- given an index file it starts at a random record and wraps around, so we never pass one;
- its writer leaves the order of an Example's features to protobuf, which differs from process
  to process, so `write` serializes them in key order: equal examples, equal files.
"""
from __future__ import annotations

import io
import itertools
import re
import struct
from pathlib import Path
from typing import Iterable, Iterator, NamedTuple

import numpy as np
from PIL import Image, UnidentifiedImageError
from tfrecord import example_pb2
from tfrecord.reader import example_loader
from tfrecord.writer import TFRecordWriter

from pipeline.errors import DataError
from pipeline.files import atomic_path

SCHEMA = {"image_name": "byte", "image": "byte", "target": "byte"}
IMAGE_SHAPE = (256, 256, 3)
# a competition record is ~30 KB; even an uncompressed 256×256 RGB image is 192 KiB
MAX_RECORD = 16 << 20


class Example(NamedTuple):
    image_name: str
    image: bytes  # JPEG
    target: str


def _record(ex: Example) -> bytes:
    """The tf.train.Example of `ex`, its features in key order (protobuf's deterministic mode)."""
    proto = example_pb2.Example()
    for key, value in (("image_name", ex.image_name.encode()), ("image", ex.image), ("target", ex.target.encode())):
        proto.features.feature[key].bytes_list.value.append(value)
    return proto.SerializeToString(deterministic=True)


def write(path: str | Path, examples: Iterable[Example]) -> int:
    """Write examples to one TFRecord file atomically; returns the record count. The framing is
    TFRecord's: length, its masked CRC32C, the record, its masked CRC32C (the package's CRC)."""
    count = 0
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        for ex in examples:
            record = _record(ex)
            length = struct.pack("<Q", len(record))
            f.write(length + TFRecordWriter.masked_crc(length) + record + TFRecordWriter.masked_crc(record))
            count += 1
    return count


def _not_plain(start: bytes) -> str:
    """Why a file is no TFRecord from its first byte: corrupt, or compressed as TensorFlow can
    (TFRecordOptions GZIP or ZLIB), which the competition's are not."""
    if start[:2] == b"\x1f\x8b":
        return "a gzip-compressed file, as TensorFlow's GZIP option writes, or a corrupt one; decompress it first"
    if start[0] == 0x78 and int.from_bytes(start[:2], "big") % 31 == 0:
        return "a zlib-compressed file, as TensorFlow's ZLIB option writes, or a corrupt one; decompress it first"
    return "corrupt file"


def verify(path: str | Path, label: str | None = None) -> int:
    """Check framing and both masked CRC32Cs of every record, one record in memory at a time;
    returns the record count. A length the rest of the file cannot hold, or above MAX_RECORD,
    is refused before anything is read; so is a file of no record. Errors name the file as `label`
    (default: its path)."""
    path = Path(path)
    label = label or str(path)
    size, pos, count = path.stat().st_size, 0, 0
    with open(path, "rb") as f:
        while pos < size:
            where = f"{label}: record {count} at byte {pos}"
            header = f.read(12)
            if len(header) < 12:
                raise DataError(f"{where}: truncated record header")
            (length,) = struct.unpack("<Q", header[:8])
            if header[8:] != TFRecordWriter.masked_crc(header[:8]):
                why = _not_plain(header) if pos == 0 else "corrupt file"
                raise DataError(f"{where}: length checksum mismatch ({why})")
            if length + 4 > size - pos - 12:
                raise DataError(f"{where}: truncated (needs {length} bytes of data, the file has "
                                f"{max(size - pos - 16, 0)} left)")
            if length > MAX_RECORD:
                raise DataError(f"{where}: {length} bytes, larger than a 256x256 JPEG record can be "
                                f"({MAX_RECORD >> 20} MiB)")
            body, crc = f.read(length), f.read(4)
            if crc != TFRecordWriter.masked_crc(body):
                raise DataError(f"{where}: data checksum mismatch (corrupt file)")
            pos, count = pos + 16 + length, count + 1
    # a copy cut short at a record's end has whole checksums: what tells it is the count Kaggle's
    # names end with (photo00-352.tfrec holds 352), or, for a file named otherwise, no record at all
    if count == 0:
        raise DataError(f"{label}: holds no record (an empty file, or a copy cut short: copy it again)")
    named = re.fullmatch(r"(?:monet|photo)\d+-(\d+)\.tfrec", path.name, re.IGNORECASE)
    if named and count < int(named[1]):
        raise DataError(f"{label}: holds {count} records where its name says {int(named[1])} (a copy cut short "
                        f"at a record's end?); copy it again, or rename it if its name does not count its records")
    return count


def read(path: str | Path, label: str | None = None) -> Iterator[Example]:
    """Verified examples of one file, in file order; errors name it as `label` (default: its path)."""
    label = label or str(path)
    verify(path, label)
    # index_path=None: read sequentially from the start, no random wrap-around
    records = example_loader(str(path), None, description=list(SCHEMA))
    for i in itertools.count():
        try:
            rec = next(records)
        except StopIteration:
            return
        except Exception as e:  # the package raises KeyError (a field missing), TypeError, IndexError,
            # protobuf's DecodeError (not a tf.train.Example): all mean this is not a competition record
            raise DataError(f"{label}: record {i}: not a competition record ({type(e).__name__}: {e})") from None
        for key in SCHEMA:  # one bytes value each (several values come back as an array, ints as ints)
            if not isinstance(rec[key], bytes):
                raise DataError(f"{label}: record {i}: field '{key}' is not a single bytes value")
        text = {}
        for key in ("image_name", "target"):
            try:
                text[key] = rec[key].decode()
            except UnicodeDecodeError as e:
                raise DataError(f"{label}: record {i}: field '{key}' is not UTF-8 text ({e})") from None
        yield Example(text["image_name"], rec["image"], text["target"])


def decode_image(jpeg: bytes, where: str) -> np.ndarray:
    """JPEG bytes -> (256, 256, 3) uint8, or a DataError naming `where`. The size is checked from
    the header, before any pixel is decoded (a small file can declare a huge image)."""
    try:
        with Image.open(io.BytesIO(jpeg)) as img:
            mode, size = img.mode, img.size
            if mode == "RGB" and size == IMAGE_SHAPE[1::-1]:
                img.load()
                pixels = np.asarray(img)
    except UnidentifiedImageError:  # its message names the BytesIO object, an address
        raise DataError(f"{where}: image does not decode (bytes of no image format Pillow reads)") from None
    except Exception as e:  # PIL raises many types for broken data
        raise DataError(f"{where}: image does not decode ({type(e).__name__}: {e})") from None
    if mode != "RGB" or size != IMAGE_SHAPE[1::-1]:
        raise DataError(f"{where}: image is {size[0]}x{size[1]} {mode}, expected 256x256 RGB (3 channels)")
    return pixels


def encode_jpeg(pixels: np.ndarray, quality: int = 95) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()
