"""Stage 4, evaluate: MiFID of the generated JPEGs against the Monet paintings, as Kaggle
defines it, plus the do-nothing baseline (untranslated photos) under the same extractor.

    python -m pipeline.evaluate --shards data/shards --manifest data/manifest.csv \\
        --images data/generated --generator models/photo2monet.pt --out metrics/evaluate.json

Which Inception weights were used is written beside the numbers (`feature_extractor`); numbers
from the offline extractor (no FID weights on this machine) are not comparable to Kaggle's.
On the embedded sample, each photo's scene can also be rendered as a painting, so the mean
absolute error to that ground truth (`pair_l1`) is a quality signal needing no pretrained network.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from PIL import Image

from pipeline import sample, shards
from pipeline.errors import DataError, cli
from pipeline.features import extract, load_extractor
from pipeline.files import write_json
from pipeline.metrics import fid, mifid
from pipeline.params import Params, load
from pipeline.runtime import pick_device

PAIR_IMAGES = 256  # sample scenes re-rendered as paintings for pair_l1 (~2 s of rendering)


def read_jpegs(folder: Path, names: list[str], batch_size: int) -> Iterator[torch.Tensor]:
    """uint8 N×256×256×3 batches of `<name>.jpg` in the order of `names`."""
    for k in range(0, len(names), batch_size):
        batch = []
        for name in names[k:k + batch_size]:
            path = folder / f"{name}.jpg"
            try:
                with Image.open(path) as img:
                    batch.append(np.asarray(img.convert("RGB")))
            except FileNotFoundError:
                raise DataError(f"{path}: generated image missing (run the generate stage)") from None
        yield torch.from_numpy(np.stack(batch))


def pair_l1(images: Path, photo_names: list[str], photos: torch.Tensor, seed: int) -> dict[str, float]:
    """Mean |generated − ground-truth painting| (0–1 scale) over the first PAIR_IMAGES sample scenes,
    and the same for the untranslated photos."""
    count = min(PAIR_IMAGES, len(photo_names), len(photos))
    expected = {sample.sample_name(seed, "photo", i): i for i in range(count)}
    if [photo_names[i] for i in range(count)] != list(expected):
        raise DataError("manifest photo names do not match the embedded sample for this seed")
    truth = torch.from_numpy(sample.render_batch(seed, [sample.photo_index(i) for i in range(count)], "monet")).float()
    generated = next(read_jpegs(images, photo_names[:count], count)).float()
    return {"pair_l1": float((generated - truth).abs().mean() / 255),
            "pair_l1_identity": float((photos[:count].float() - truth).abs().mean() / 255)}


def evaluate(p: Params, shards_dir: Path, manifest_path: Path, images: Path) -> dict:
    device = pick_device(p.device)
    manifest = shards.read_manifest(manifest_path)
    _, paintings = shards.load_domain(shards_dir, manifest, "monet")
    photo_names = manifest.loc[manifest["domain"] == "photo", "image_name"].tolist()
    e = p.evaluate
    extractor = load_extractor(e.weights, e.download, e.offline_image_size, paintings, device, e.batch_size)
    print(f"evaluate: feature extractor: {extractor.name}")

    real = extract(extractor, paintings, e.batch_size, device, desc="features: paintings")
    generated = extract(extractor, read_jpegs(images, photo_names, e.batch_size), e.batch_size, device,
                        desc="features: generated")
    photos_iter = (batch for _, shard in shards.iter_domain(shards_dir, manifest, "photo")
                   for batch in shard.split(e.batch_size))
    photos = extract(extractor, photos_iter, e.batch_size, device, desc="features: photos (baseline)")

    result = mifid(generated, real)
    result["fid_identity"] = fid(photos, real)
    result["fid_vs_identity"] = result["fid"] / result["fid_identity"]
    result.update(feature_extractor=extractor.name, comparable_to_kaggle=extractor.comparable,
                  generated_images=len(generated), paintings=len(real))
    if p.ingest.source == "sample":
        first = next(shards.iter_domain(shards_dir, manifest, "photo"))[1]
        result.update(pair_l1(images, photo_names, first, p.seed))
    return result


@cli
def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--shards", type=Path, required=True)
    ap.add_argument("--manifest", type=Path, required=True)
    ap.add_argument("--images", type=Path, required=True, help="folder of generated JPEGs")
    ap.add_argument("--generator", type=Path, required=True, help="identifies the MLflow run")
    ap.add_argument("--out", type=Path, required=True, help="metrics JSON to write")
    args = ap.parse_args(argv)
    p = load(args.params)
    result = evaluate(p, args.shards, args.manifest, args.images)
    write_json(args.out, result)

    from pipeline import tracking

    with tracking.open_run(p, args.generator, stage="evaluate"):
        tracking.log_metrics_file(args.out)
    print(f"evaluate: MiFID {result['mifid']:.2f}  FID {result['fid']:.2f}  (photos untranslated: FID "
          f"{result['fid_identity']:.2f})  distance {result['distance']:.4f}  [{extractor_label(result)}]")


def extractor_label(result: dict) -> str:
    return "FID Inception weights" if result["comparable_to_kaggle"] else "OFFLINE extractor: not comparable to Kaggle"


if __name__ == "__main__":
    main()
