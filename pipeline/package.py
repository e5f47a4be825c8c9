"""Stage 5, package: the submission zip Kaggle accepts, checked before it is written.

    python -m pipeline.package --images data/generated --out data/images.zip --metrics metrics/package.json \\
        --generator models/photo2monet.pt --shards data/shards --manifest data/manifest.csv

The competition wants 7,000–10,000 JPEGs of 256×256×3, flat (no folders) in `images.zip`.
"""
from __future__ import annotations

import hashlib
import re
import zipfile
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from pipeline import shards, tracking
from pipeline.errors import DataError, cli
from pipeline.files import atomic_path, check_outputs, write_json
from pipeline.params import Package, load, stage_arguments


def check_images(folder: Path, min_images: int, max_images: int) -> list[Path]:
    """All .jpg files of `folder`, each a 256×256 RGB JPEG; raises DataError naming the first bad one."""
    if not folder.is_dir():
        raise DataError(f"{folder}: folder of generated images not found (run the generate stage first)")
    entries = sorted(folder.iterdir())
    others = [e.name for e in entries if not (e.is_file() and e.suffix.lower() == ".jpg")]
    if others:
        raise DataError(f"{folder}: '{others[0]}' is not a .jpg file (the zip must hold JPEGs only, flat)")
    change = Package(min_images, max_images).outside(len(entries))
    if change:
        raise DataError(f"{folder}: {len(entries)} images; the submission needs {min_images}–{max_images} "
                        f"(package.min_images and package.max_images; {change} to package another image set)")
    lower = [e.name.lower() for e in entries]
    if len(set(lower)) != len(lower):
        raise DataError(f"{folder}: file names differ only in case; names must be unique")
    for path in tqdm(entries, desc="package check", unit="img", mininterval=2):
        try:
            with Image.open(path) as img:
                fmt, size, mode = img.format, img.size, img.mode
                img.verify()
        except Exception as e:
            raise DataError(f"{path}: not a readable image ({type(e).__name__}: {e})") from None
        if fmt != "JPEG" or size != (256, 256) or mode != "RGB":
            raise DataError(f"{path}: {fmt} {size[0]}x{size[1]} {mode}; expected a 256x256 RGB JPEG")
        damage = jpeg_damage(path.read_bytes())  # verify() reads the headers only
        if damage:
            raise DataError(f"{path}: a damaged JPEG ({damage}); run the generate stage again")
    return entries


# the markers libjpeg (Pillow's decoder) reads: segments with a length (the frames it decodes,
# lossless included, tables, scans, APPn, comments), and TEM and the restarts without one. Any
# other stops it.
_SEGMENTS = frozenset([0xC0, 0xC1, 0xC2, 0xC3, 0xC4, 0xC9, 0xCA, 0xCC, *range(0xDA, 0xDE), *range(0xE0, 0xF0), 0xFE])
_STANDALONE = frozenset([0x01, *range(0xD0, 0xD8)])
# in a scan's coded data FF 00 is a stuffed FF and FF Dn a restart, either after fill bytes (FF):
# the scan ends at the first FF run followed by anything else
_SCAN_END = re.compile(rb"\xff+[^\x00\xd0-\xd7\xff]")
CUT_SHORT = "cut short: no end-of-image marker"


def jpeg_damage(data: bytes) -> str | None:
    """What breaks a JPEG's marker structure between its start and its end-of-image marker, or
    None. A file cut short does, and so do bytes overwritten inside it wherever Pillow's decoder
    stops at them (an unknown marker), and more often than it does (stray bytes between segments,
    which libjpeg calls corrupt data and skips): a decode finds less and costs ten times as much.
    A few bytes overwritten inside the coded data may make no marker, and decode as a blemish in
    any reader. Bytes after the end-of-image marker are no damage."""
    if not data.startswith(b"\xff\xd8"):
        return "no start-of-image marker"
    pos, end = 2, len(data)
    while pos < end:
        if data[pos] != 0xFF:
            return f"no marker where one is due, at byte {pos}"
        at = pos
        while pos < end and data[pos] == 0xFF:  # fill bytes may come before a marker
            pos += 1
        if pos == end:
            break
        marker, pos = data[pos], pos + 1
        if marker == 0xD9:
            return None
        if marker in _STANDALONE:
            continue
        if marker not in _SEGMENTS:
            return f"marker FF{marker:02X} at byte {at}, where Pillow's decoder stops"
        if pos + 2 > end:
            break
        length = int.from_bytes(data[pos:pos + 2], "big")
        if length < 2:
            return f"a segment of length {length} at byte {at}"
        pos += length
        if marker == 0xDA and pos < end:  # a scan: its coded data runs to the next marker
            found = _SCAN_END.search(data, pos)
            pos = found.start() if found else end
    return CUT_SHORT


ZIP_TIME = (1980, 1, 1, 0, 0, 0)  # the earliest a zip can say: entries carry no file times


def write_zip(images: list[Path], out: Path) -> str:
    """Write the zip atomically (stored: JPEGs do not compress); returns its sha256. Entries get a
    fixed time and mode instead of the files', so the same JPEGs make the same zip, byte for byte
    (DVC then sees an unchanged output when a rerun reproduces the images)."""
    with atomic_path(out) as tmp:
        zf = zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED)
        try:
            for path in images:
                entry = zipfile.ZipInfo(path.name, date_time=ZIP_TIME)
                entry.external_attr = 0o644 << 16  # rw-r--r--, as extracted
                zf.writestr(entry, path.read_bytes())
        except BaseException:
            # not `with`: closing a zip with an entry half-written raises again, over the Ctrl-C
            # or the full disk being reported (three tracebacks); the temp file goes anyway
            fp, zf.fp = zf.fp, None  # so that its __del__ does not try to close it again
            fp.close()
            raise
        zf.close()
        digest = hashlib.sha256(tmp.read_bytes()).hexdigest()
    return digest


@cli
def main(argv=None) -> None:
    ap = stage_arguments(__doc__)
    ap.add_argument("--images", type=Path, required=True, help="folder of generated JPEGs")
    ap.add_argument("--out", type=Path, required=True, help="the submission zip to write")
    ap.add_argument("--metrics", type=Path, required=True, help="package summary JSON to write")
    ap.add_argument("--generator", type=Path, required=True, help="identifies the MLflow run")
    args = ap.parse_args(argv)
    p = load(args.params)
    check_outputs("package", {"out": args.out, "metrics": args.metrics})
    tracking.check_store()  # an unreachable MLflow server stops the stage before the work
    tracking.check_generator(args.generator, "package")
    shards.read_manifest(args.manifest)  # the row's data set: none (a killed ingest) stops it before the work
    with tracking.failure_marks_row(p, args.generator, "package"):
        images = check_images(args.images, p.package.min_images, p.package.max_images)
        digest = write_zip(images, args.out)
        summary = {"images": len(images), "zip_mb": round(args.out.stat().st_size / 2**20, 2)}  # numbers only
        write_json(args.metrics, summary)

    with tracking.open_run(p, args.generator, "package", args.shards, args.manifest):
        tracking.log_metrics_file(args.metrics)
        tracking.log_tags({"package.zip_sha256": digest})  # which file was submitted, in the row
    print(tracking.report("package"))
    print(f"package: {len(images)} JPEGs -> {args.out} ({summary['zip_mb']} MiB)")


if __name__ == "__main__":
    main()
