"""Stage 5, package: the submission zip Kaggle accepts, checked before it is written.

    python -m pipeline.package --images data/generated --out data/images.zip --metrics metrics/package.json \\
        --generator models/photo2monet.pt --shards data/shards --manifest data/manifest.csv

The competition wants 7,000–10,000 JPEGs of 256×256×3, flat (no folders) in `images.zip`.
"""
from __future__ import annotations

import hashlib
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
        if not _ends_whole(path):  # verify() reads the headers only: a cut-off JPEG passes it
            raise DataError(f"{path}: a JPEG cut short (no end-of-image marker); run the generate stage again")
    return entries


def _ends_whole(path: Path) -> bool:
    """Does the JPEG end with its end-of-image marker (FF D9; some writers pad zeros after it)?"""
    with open(path, "rb") as f:
        f.seek(max(0, path.stat().st_size - 64))
        return f.read().rstrip(b"\0").endswith(b"\xff\xd9")


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
