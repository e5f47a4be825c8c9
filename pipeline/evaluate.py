"""Stage 4, evaluate: how good the generated JPEGs are, against the Monet paintings.

    python -m pipeline.evaluate --shards data/shards --manifest data/manifest.csv \\
        --images data/generated --generator models/photo2monet.pt --out metrics/evaluate.json \\
        --memorization metrics/memorization.png --features-cache .cache/features

Scores, under the extractor `evaluate.extractor` names (`offline` or `fid-inception`; its id is
in the metrics and the MLflow row, and no other is ever used in its place):
- MiFID as the competition defines it, its FID and memorisation distance, and KID;
- baselines on the first `evaluate.baseline_images` photos, scored like the generated set on the
  same number of images: the untranslated photos (`fid_identity`), and on the embedded sample
  their scenes rendered as paintings, the perfect translation (`fid_ground_truth`).
  `fid_vs_ground_truth` = FID of those generated images / fid_ground_truth: 1.0 is as good as a
  perfect translation. `pair_l1` is the plain pixel error to that ground truth;
- a picture of the generated images nearest to a training painting (`--memorization`).
The reference images' features are cached (`--features-cache`, under the main repository).
"""
from __future__ import annotations

import io
import math
import os
from pathlib import Path
from typing import Iterator

import numpy as np
import PIL
import torch
from PIL import Image

from pipeline import memorization, sample, shards, tracking
from pipeline.errors import DataError, ScoreError, cli
from pipeline.feature_cache import FeatureCache, code_key, images_key
from pipeline.features import (OTHER_FID_WEIGHTS, SMALL_INPUT, Extractor, extract, load_extractor,
                               ordered_map)
from pipeline.fid_inception import FEATURE_DIM
from pipeline.files import check_outputs, main_repo, write_json
from pipeline.metrics import fid, kid, mifid, nearest_real
from pipeline.params import Params, load, stage_arguments
from pipeline.runtime import pick_device

PAIR_IMAGES = 256  # ground-truth scenes for pair_l1
SHOWN = 8          # generated images shown beside their nearest painting
# Kaggle and the sample have 300 paintings; against a handful the scores grow by orders of
# magnitude (2 sample paintings: FID 1.6e11) and say little, so below this count evaluate says so
FEW_PAINTINGS = 100


def read_jpegs(folder: Path, names: list[str], batch_size: int, threads: int = 1) -> Iterator[torch.Tensor]:
    """uint8 N×256×256×3 batches of `<name>.jpg` in the order of `names`, decoded by `threads`
    threads, a batch each, while the caller works on the one before (Pillow releases the GIL while
    it decodes)."""
    def decode(batch_names: list[str]) -> torch.Tensor:
        batch = []
        for name in batch_names:
            path = folder / f"{name}.jpg"
            try:
                with Image.open(path) as img:
                    kind = (img.format, *img.size, img.mode)
                    pixels = np.asarray(img) if kind == ("JPEG", 256, 256, "RGB") else None
            except FileNotFoundError:
                raise DataError(f"{path}: generated image missing (run the generate stage)") from None
            except Exception as e:  # Pillow raises many types for a damaged file
                raise DataError(f"{path}: generated image does not decode ({type(e).__name__}: {e}); "
                                f"run the generate stage again") from None
            if pixels is None:  # scored as it was converted, it was an image package would refuse
                raise DataError(f"{path}: generated image is a {kind[0]} {kind[1]}x{kind[2]} {kind[3]}; expected a "
                                f"256x256 RGB JPEG, as generate writes and package takes")
            batch.append(pixels)
        return torch.from_numpy(np.stack(batch))

    yield from ordered_map(decode, (names[k:k + batch_size] for k in range(0, len(names), batch_size)), threads)


def first_photos(shards_dir: Path, manifest, count: int) -> torch.Tensor:
    """The first `count` photos of the manifest, uint8 N×256×256×3."""
    parts, have = [], 0
    for _, images in shards.iter_domain(shards_dir, manifest, "photo"):
        parts.append(images[:count - have].clone())
        have += len(parts[-1])
        if have == count:
            break
    return torch.cat(parts)


def check_sample_names(photo_names: list[str], seed: int) -> None:
    """The manifest's photos are the embedded sample's for this seed: the first 16, in order, stand
    for the rest (the manifest's names are checked whole as it is read)."""
    expected = [sample.sample_name(seed, "photo", i) for i in range(min(len(photo_names), 16))]
    if photo_names[:len(expected)] != expected:
        raise DataError("manifest photo names do not match the embedded sample for this seed")


def as_jpeg(images: np.ndarray, quality: int) -> torch.Tensor:
    """uint8 N×H×W×3 images as they come back from JPEGs of `quality` (how generate saves)."""
    out = []
    for pixels in images:
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="JPEG", quality=quality)
        with Image.open(buf) as img:
            out.append(np.asarray(img.convert("RGB")))
    return torch.from_numpy(np.stack(out))


def pair_l1(generated: torch.Tensor, photos: torch.Tensor, truth: torch.Tensor) -> dict[str, float]:
    """Mean |generated − ground-truth painting| on a 0–1 scale, and the same for the untranslated photos."""
    truth = truth.float()
    return {"pair_l1": float((generated.float() - truth).abs().mean() / 255),
            "pair_l1_identity": float((photos.float() - truth).abs().mean() / 255)}


def evaluate(p: Params, shards_dir: Path, manifest_path: Path, images: Path, cache_dir: Path,
             picture: Path | None = None, say=print) -> tuple[dict, Extractor]:
    """The metrics, and the extractor (its long description goes to MLflow; the metrics hold its id)."""
    e = p.evaluate
    device = pick_device(p.device)
    manifest = shards.read_manifest(manifest_path)
    _, paintings = shards.load_domain(shards_dir, manifest, "monet")
    names = manifest.loc[manifest["domain"] == "photo", "image_name"].tolist()
    on_sample = p.ingest.source == "sample"
    if on_sample:
        check_sample_names(names, p.seed)
    extractor = load_extractor(e.extractor, e.weights, e.download, e.offline_image_size, paintings, device,
                               cache=cache_dir, say=say)
    say(f"evaluate: extractor {extractor.id}: {extractor.name}")
    # the device and the batch size too: the arithmetic rounds otherwise (features agree to float
    # rounding, not bit for bit), and cached features of another batch size made the same params
    # give scores that differed in their 7th digit, by what was cached first. So does the CPU's
    # thread count above SMALL_INPUT px, where every core works on each batch (features.extract)
    threads = f"/threads{torch.get_num_threads()}" if device.type == "cpu" and extractor.image_size > SMALL_INPUT else ""
    cache = FeatureCache(cache_dir, f"{extractor.key}/{device.type}/batch{e.batch_size}{threads}", say)

    def features(images, desc: str) -> np.ndarray:
        return extract(extractor, images, e.batch_size, device, desc=f"features: {desc}")

    real = cache.get("paintings", images_key(paintings), lambda: features(paintings, "paintings"),
                     shape=(len(paintings), FEATURE_DIM))
    if np.ptp(real, axis=0).max() == 0:  # every FID would be 0, every ratio 0/0
        raise ScoreError(f"evaluate: the extractor gives all {len(real)} paintings the same features: it tells "
                         f"no images apart (weights of the right shapes but degenerate?); nothing can be scored")
    if len(real) < FEW_PAINTINGS:
        said = " (the offline extractor's BatchNorm statistics come from them too)" if extractor.id.startswith("offline") else ""
        say(f"evaluate: warning: {len(real)} paintings: scores against so few are far larger and noisier "
            f"than against hundreds{said}; compare runs on the same image sets only")
    # on the CPU the network takes every core; beside a GPU the host's cores are free to decode
    # (one thread decoded 850 images/s on an H200 machine: over a quarter of the stage)
    decoders = 1 if device.type == "cpu" else os.cpu_count() or 1
    generated = features(read_jpegs(images, names, e.batch_size, decoders), "generated")
    result = {**mifid(generated, real), **kid(generated, real, e.kid_subsets, e.kid_subset_size),
              "extractor": extractor.id, "generated_images": len(generated), "paintings": len(real)}

    # baselines on the first n photos, against the generated images of the same photos
    n = min(e.baseline_images, len(names))
    photos = first_photos(shards_dir, manifest, n)
    fid_subset = fid(generated[:n], real)
    identity = cache.get("photos", images_key(photos), lambda: features(photos, "photos (untranslated)"),
                         shape=(n, FEATURE_DIM))
    result.update(baseline_images=n, fid_subset=fid_subset, fid_identity=fid(identity, real))
    if result["fid_identity"] > 0:
        result["fid_vs_identity"] = fid_subset / result["fid_identity"]
    else:  # was a ZeroDivisionError traceback after all of the work
        say(f"evaluate: warning: the first {n} photos, untranslated, already score FID 0 against the paintings "
            f"(the same images in both sets?): fid_vs_identity has no scale and is left out")
    if on_sample:
        result.update(ground_truth(p, cache, names, photos, images, features, n, fid_subset, real))
    unbounded = [k for k, v in result.items() if isinstance(v, float) and not math.isfinite(v)]
    if unbounded:  # json.dumps would write Infinity or NaN: not JSON, and no score to compare
        raise ScoreError(f"evaluate: {', '.join(unbounded)} came out {result[unbounded[0]]}, not a number to "
                         f"compare (features that overflow or tell no images apart?); no output was written")

    if picture is not None:
        distance, nearest = nearest_real(generated, real)
        shown = memorization.closest(distance, SHOWN)
        gen_pixels = next(read_jpegs(images, [names[i] for i in shown], len(shown))) if shown else []
        memorization.draw([g.numpy() for g in gen_pixels], [paintings[nearest[i]].numpy() for i in shown],
                          [float(distance[i]) for i in shown], distance, picture)
    return result, extractor


def ground_truth(p: Params, cache: FeatureCache, names: list[str], photos: torch.Tensor, images: Path, features,
                 n: int, fid_subset: float, real: np.ndarray) -> dict:
    """The sample's yardstick: the first n photos' scenes rendered as paintings, scored alike."""
    rendered: dict[int, np.ndarray] = {}

    def render(count: int) -> np.ndarray:
        if count not in rendered:
            rendered[count] = sample.render_parallel(p.seed, [sample.photo_index(i) for i in range(count)], "monet")
        return rendered[count]

    # scored exactly like the generated set: saved as JPEGs of the same quality first (the offline
    # extractor is sensitive to JPEG noise). The renders are a pure function of (seed, scene,
    # sample.py), and their JPEGs of this module's as_jpeg and Pillow's encoder, so that, with the
    # quality, is their identity for the cache.
    quality = p.generate.jpeg_quality
    code = code_key((sample.__file__, __file__), f"Pillow {PIL.__version__}")
    truth = cache.get("ground-truth", f"{p.seed}/{n}/{quality}/{code}",
                      lambda: features(as_jpeg(render(n), quality), "ground truth (rendered)"),
                      shape=(n, FEATURE_DIM))
    result = {"fid_ground_truth": fid(truth, real)}
    result["fid_vs_ground_truth"] = fid_subset / result["fid_ground_truth"]
    # pair_l1's renders are cached too: rendering them was the one reference cost left in a second
    # evaluation (1.9 s of about 60). The cache's key names the extractor, which they do not need.
    k = min(PAIR_IMAGES, n)
    truth_pixels = torch.from_numpy(cache.get("ground-truth", f"pixels/{p.seed}/{k}/{code}",
                                              lambda: render(n)[:k] if n in rendered else render(k), what="pixels",
                                              shape=(k, *photos.shape[1:])))
    generated = next(read_jpegs(images, names[:k], k))
    return {**result, **pair_l1(generated, photos[:k], truth_pixels)}


@cli
def main(argv=None) -> None:
    ap = stage_arguments(__doc__)
    ap.add_argument("--images", type=Path, required=True, help="folder of generated JPEGs")
    ap.add_argument("--generator", type=Path, required=True, help="identifies the MLflow run")
    ap.add_argument("--out", type=Path, required=True, help="metrics JSON to write")
    ap.add_argument("--memorization", type=Path, required=True, help="the memorization picture (PNG) to write")
    ap.add_argument("--features-cache", type=Path, required=True,
                    help="folder for the reference images' features (relative paths: under the main repository)")
    args = ap.parse_args(argv)
    p = load(args.params)
    check_outputs("evaluate", {"out": args.out, "memorization": args.memorization})
    tracking.check_store()  # an unreachable MLflow server stops the stage before the work
    tracking.check_generator(args.generator, "evaluate")
    with tracking.failure_marks_row(p, args.generator, "evaluate"):
        result, extractor = evaluate(p, args.shards, args.manifest, args.images,
                                     main_repo() / args.features_cache, args.memorization)
        # numbers to 7 significant digits and short ids only: `dvc exp show` stays readable
        write_json(args.out, {k: float(f"{v:.7g}") if isinstance(v, float) else v for k, v in result.items()})

    with tracking.open_run(p, args.generator, "evaluate", args.shards, args.manifest):
        tracking.log_metrics_file(args.out)
        tracking.log_artifact(args.memorization)
        tracking.log_tags({"evaluate.extractor_description": extractor.name})
    print(tracking.report("evaluate"))
    label = ("FID Inception" if extractor.comparable else
             "FID Inception, NOT the published weights: not comparable to Kaggle" if extractor.id == OTHER_FID_WEIGHTS
             else "OFFLINE extractor: not comparable to Kaggle")
    truth = f"  FID/ground truth {result['fid_vs_ground_truth']:.3f}" if "fid_vs_ground_truth" in result else ""
    print(f"evaluate: MiFID {result['mifid']:.2f}  FID {result['fid']:.2f}  KID {result['kid_mean']:.4g}"
          f"{truth}  distance {result['distance']:.4f}  [{label}]")


if __name__ == "__main__":
    main()
