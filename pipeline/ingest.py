"""Stage 1, ingest: competition TFRecords (embedded sample, Kaggle, or a local copy) ->
verified uint8 tensor shards + a manifest.

    python -m pipeline.ingest --raw data/raw --shards data/shards --manifest data/manifest.csv \\
        --download-cache .cache/downloads
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline import competition, kaggle_download, sample
from pipeline.competition import TFREC_DIRS
from pipeline.errors import DataError, cli
from pipeline.files import atomic_dir, atomic_path, check_outputs, main_repo, under_main_repo
from pipeline.params import MIN_IMAGES, Params, load, stage_arguments
from pipeline.processes import worker_pool

if TYPE_CHECKING:
    import pandas as pd

SAMPLE_FILES = {"monet": 5, "photo": 20}  # the Kaggle data has 5 Monet and 20 photo TFRecord files
# torch (which `tfrecord` and `shards` import) costs 0.5 GiB and 3 s to load: the functions that
# need it import it themselves, so a hostile archive is refused from its listing before that


# --- sources: each fills `raw` with monet_tfrec/*.tfrec and photo_tfrec/*.tfrec ---------------

def _render_chunk(args: tuple[int, str, list[int]]) -> list[bytes]:
    from pipeline import tfrecords

    seed, domain, positions = args
    index = sample.monet_index if domain == "monet" else sample.photo_index
    style = "monet" if domain == "monet" else "photo"
    pixels = sample.render_batch(seed, [index(i) for i in positions], style)
    return [tfrecords.encode_jpeg(p) for p in pixels]


def write_sample(raw: Path, seed: int, counts: dict[str, int], workers: int) -> None:
    """Render the embedded sample in the Kaggle layout and TFRecord schema."""
    from pipeline import tfrecords

    with worker_pool(workers) as pool:
        for domain, count in counts.items():
            files = min(SAMPLE_FILES[domain], count)
            for k in range(files):
                positions = list(range(k * count // files, (k + 1) * count // files))
                chunks = [(seed, domain, positions[j:j + 32]) for j in range(0, len(positions), 32)]
                jpegs = [j for chunk in pool.map(_render_chunk, chunks) for j in chunk]
                examples = (tfrecords.Example(sample.sample_name(seed, domain, i), jpeg, domain)
                            for i, jpeg in zip(positions, jpegs))
                path = raw / TFREC_DIRS[domain] / f"{domain}{k:02d}-{len(positions)}.tfrec"
                path.parent.mkdir(parents=True, exist_ok=True)
                tfrecords.write(path, examples)
                print(f"ingest: wrote {path.name} ({len(positions)} {domain} images)", flush=True)


# --- reading: every source goes through here ----------------------------------------------

def check_counts(manifest: pd.DataFrame, source: str) -> None:
    """At least MIN_IMAGES photos and paintings: evaluate's FID and KID need a covariance of each."""
    counts = manifest["domain"].value_counts()
    for domain, folder in TFREC_DIRS.items():
        if counts.get(domain, 0) < MIN_IMAGES:
            raise DataError(f"ingest.source {source}: {folder} holds {counts.get(domain, 0)} image(s); the "
                            f"pipeline needs at least {MIN_IMAGES} photos and {MIN_IMAGES} paintings (FID "
                            f"compares the covariances of two sets)")


def read_raw(raw: Path, shards_dir: Path, shard_size: int,
             origins: dict[str, str] | None = None) -> pd.DataFrame:
    """Verify, decode and check every record; write shards; return the manifest. Errors name each
    file as `origins` says it came in ('photo_tfrec/x.tfrec' -> the user's file or zip member)."""
    import pandas as pd
    from tqdm import tqdm

    from pipeline import shards, tfrecords

    def where_file(name: str) -> str:
        return (origins or {}).get(name, str(raw / name))

    manifest = []
    for domain, folder in TFREC_DIRS.items():
        files = competition.tfrecord_files(raw / folder)
        if not files:
            raise DataError(f"{raw / folder}: no .tfrec files")

        def examples():
            for f in files:
                label = where_file(f"{folder}/{f.name}")
                for i, ex in enumerate(tfrecords.read(f, label)):
                    check_name = shards.check_photo_name if domain == "photo" else shards.check_painting_name
                    check_name(ex.image_name, f"{label}: record {i}")
                    row = {"image_name": ex.image_name, "tfrecord": f"{folder}/{f.name}", "record": i}
                    yield row, tfrecords.decode_image(ex.image, f"{label}: record {i} ({ex.image_name})")

        progress = tqdm(examples(), desc=f"ingest {domain}", unit="img", mininterval=2)
        manifest += shards.write_domain(progress, shards_dir, domain, shard_size)
    frame = pd.DataFrame(manifest, columns=shards.MANIFEST_COLUMNS)
    for _, group in frame.groupby("domain"):
        shards.check_unique(group, lambda row: f"{where_file(row['tfrecord'])}: record {row['record']}")
    return frame


def ingest(p: Params, raw: Path, shards_dir: Path, manifest_path: Path, download_cache: Path,
           api_factory=kaggle_download.kaggle_api) -> pd.DataFrame:
    source = p.ingest.source
    with atomic_dir(raw) as tmp_raw:
        origins: dict[str, str] = {}  # the user's file or zip member of each TFRecord, for error lines
        if source == "sample":
            counts = {"monet": p.ingest.sample_paintings, "photo": p.ingest.sample_photos}
            write_sample(tmp_raw, p.seed, counts, workers=os.cpu_count() or 1)
        elif source == "kaggle":
            archive = kaggle_download.download(download_cache, api_factory)
            try:
                origins = competition.from_zip(archive, tmp_raw)
            except DataError as e:  # checked from its listing when cached: its bytes are damaged
                raise DataError(f"{e} (the cached download: delete it to download again)") from None
        else:
            origins = competition.copy_local(under_main_repo(source), tmp_raw)
        with atomic_dir(shards_dir) as tmp_shards:
            manifest = read_raw(tmp_raw, tmp_shards, p.ingest.shard_size, origins)
            check_counts(manifest, source)
            manifest["tfrecord"] = manifest["tfrecord"].map(lambda t: f"{raw.name}/{t}")
            # the new shards go into place now and the manifest that indexes them last: killed in
            # between, ingest must not leave the old manifest beside the new shards, which the later
            # stages would read without a word (a missing manifest they refuse)
            manifest_path.unlink(missing_ok=True)
    with atomic_path(manifest_path) as tmp:
        manifest.to_csv(tmp, index=False)
    return manifest


@cli
def main(argv=None) -> None:
    ap = stage_arguments(__doc__, reads_shards=False)
    ap.add_argument("--raw", type=Path, required=True, help="folder for the competition TFRecords")
    ap.add_argument("--shards", type=Path, required=True, help="folder for the uint8 tensor shards")
    ap.add_argument("--manifest", type=Path, required=True, help="CSV index of every image")
    ap.add_argument("--download-cache", type=Path, required=True,
                    help="folder for Kaggle's archive, downloaded once (relative paths: under the main repository)")
    args = ap.parse_args(argv)
    p = load(args.params)
    check_outputs("ingest", {"manifest": args.manifest}, {"raw": args.raw, "shards": args.shards})
    manifest = ingest(p, args.raw, args.shards, args.manifest, main_repo() / args.download_cache)
    counts = manifest["domain"].value_counts().to_dict()
    print(f"ingest: {counts.get('photo', 0)} photos, {counts.get('monet', 0)} paintings -> {args.shards}")


if __name__ == "__main__":
    main()
