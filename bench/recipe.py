"""Which recipe options pay, measured on the embedded sample against the sample's ground truth.

    python bench/recipe.py [--seconds 480] [--images 1000] [--data data] [--picture docs/recipe.png]
                           [--ceilings 64,128] [--unsharp 100,200] [--generator FILE] [--ceilings-only]

Configurations: today's default (params.yaml), each option alone (DiffAugment, the weight
average, transposed-convolution upsampling: the default before resize-convolution), then the
combination of the options that beat the default alone. Each trains from the same seed for the
same wall-clock budget (`--seconds`; its steps are the budget times its own speed, measured first
over a few steps, with the default schedule's shape: constant for half the steps, then linear to
zero), translates the first `--images` photos, saves and re-reads them as generate's JPEGs, and
is scored as evaluate scores: fid_vs_ground_truth (FID of those images / FID of their scenes'
ground-truth paintings, with the default offline extractor; 1.0 = as good as a perfect
translation), KID, and training pairs/s, each also as a ratio to the default's, measured in the
same run. `--picture`: the same photos through the default and the best configuration, one row
each.

Ceilings: the ground-truth paintings themselves, resized to N px and upscaled back to 256 px
exactly as `generate` treats a generator's input and output (`translate` with an identity
network), scored the same way: what the perfect translation scores when it is made at N px, the
mark for a generator working at N px (not a strict bound: a generator's own high-frequency
artefacts can land either side of it). `--ceilings-only` prints just those (no training).

`--unsharp`: the same ceilings after Pillow's unsharp mask (radius 2, each percent asked), a
test of the yardstick rather than a recipe: sharpening adds no translation, so a ceiling it moves
(measured: 64 px from 1.29 to 0.96 at 200%, the full-size ground truth from 1.0 to 171 at 100%)
shows how much of a score is the energy of fine detail rather than the translation.
`--generator models/photo2monet.pt` scores a trained generator's images the same way beside them
(as `generate` makes them, then sharpened likewise).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFilter
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
import argtypes  # noqa: E402
from pipeline import evaluate, generator_file, sample, shards  # noqa: E402
from pipeline.errors import PipelineError  # noqa: E402
from pipeline import train as train_stage  # noqa: E402
from pipeline.cyclegan import Trainer, build_nets  # noqa: E402
from pipeline.features import extract, load_extractor  # noqa: E402
from pipeline.generator_file import translate  # noqa: E402
from pipeline.metrics import fid, kid  # noqa: E402
from pipeline.params import Params, load  # noqa: E402
from pipeline.runtime import autocast, autocast_dtype, pick_device  # noqa: E402

# each against the default (train.upsample: resize): transpose is the default it replaced
OPTIONS = {"diffaugment": {"diffaugment": "color,translation,cutout"}, "ema": {"ema": 0.999},
           "transpose": {"upsample": "transpose"}}


def with_train(p: Params, **changes) -> Params:
    return dataclasses.replace(p, train=dataclasses.replace(p.train, **changes))


def through_size(images: torch.Tensor, size: int, device: torch.device) -> torch.Tensor:
    """uint8 N×256×256×3 images as a perfect generator working at `size` px would output them:
    resized to `size` as photos are, then upscaled to 256 px as generated images are."""
    return translate(nn.Identity(), images, size, device, contextlib.nullcontext, out_size=images.shape[1])


def sharpened(images: torch.Tensor, percent: int, radius: float = 2) -> torch.Tensor:
    """uint8 N×H×W×3 images through Pillow's unsharp mask (threshold 0): fine detail amplified."""
    mask = ImageFilter.UnsharpMask(radius, percent, 0)
    return torch.from_numpy(np.stack([np.asarray(Image.fromarray(a).filter(mask)) for a in images.numpy()]))


def steps_per_second(p: Params, photos, monets, device, probe: int = 16) -> float:
    torch.manual_seed(p.seed)
    trainer = Trainer(build_nets(p), p, device, autocast_dtype(p.precision, device))
    gen = torch.Generator(device).manual_seed(p.seed)
    trainer.train_on(photos, monets, gen)  # warm-up
    started = time.perf_counter()
    for _ in range(probe):
        trainer.train_on(photos, monets, gen)
    return probe / (time.perf_counter() - started)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=argtypes.positive_seconds, default=480, help="training budget of every configuration")
    ap.add_argument("--images", type=argtypes.positive_int, default=1000, help="photos translated and scored")
    ap.add_argument("--data", type=Path, default=ROOT / "data", help="folder with shards/ and manifest.csv (ingested)")
    ap.add_argument("--picture", type=Path, help="PNG: the same photos through the default and the best")
    ap.add_argument("--ceilings", type=argtypes.positive_ints, default="64,128",
                    help="comma-separated px: score the ground truth through a generator of that size")
    ap.add_argument("--unsharp", type=argtypes.positive_ints, default=[],
                    help="comma-separated percent: also score each ceiling after an unsharp mask (radius 2)")
    ap.add_argument("--generator", type=Path, help="also score this generator file's images (and sharpened)")
    ap.add_argument("--ceilings-only", action="store_true", help="print the ceilings only (no training)")
    args = ap.parse_args()
    try:  # params.yaml invalid, data not ingested, or damaged: the stages' one line
        p = load(ROOT / "params.yaml")
        device = pick_device(p.device)
        e, quality = p.evaluate, p.generate.jpeg_quality
        manifest = shards.read_manifest(args.data / "manifest.csv")
        _, photos = shards.load_domain(args.data / "shards", manifest, "photo", p.image_size)
        _, monets = shards.load_domain(args.data / "shards", manifest, "monet", p.image_size)
        _, paintings = shards.load_domain(args.data / "shards", manifest, "monet")
        n = min(args.images, len(photos))
        first = evaluate.first_photos(args.data / "shards", manifest, n)
        trained = generator_file.load(args.generator, device) if args.generator else None
    except PipelineError as error:
        raise SystemExit(f"error: {error}") from None

    extractor = load_extractor("offline", "", False, e.offline_image_size, paintings, device)
    features = lambda images, what: extract(extractor, images, e.batch_size, device, desc=what)  # noqa: E731
    real = features(paintings, "paintings")
    rendered = torch.from_numpy(sample.render_parallel(p.seed, [sample.photo_index(i) for i in range(n)], "monet"))
    fid_truth = fid(features(evaluate.as_jpeg(rendered.numpy(), quality), "ground truth"), real)
    ceilings = {}

    def score(name: str, made: torch.Tensor) -> None:  # as made, then after each unsharp mask asked
        for percent in [0, *args.unsharp]:
            label = name + (f", unsharp {percent}%" if percent else "")
            images = sharpened(made, percent) if percent else made
            ceilings[label] = fid(features(evaluate.as_jpeg(images.numpy(), quality), label), real) / fid_truth

    for size in args.ceilings:
        score(f"{size} px", through_size(rendered, size, device))
    if trained:
        net, config = trained
        ctx = autocast(device, autocast_dtype(p.precision, device))
        score(f"generator {args.generator}", translate(net, first, config["image_size"], device, ctx, out_size=256,
                                                       batch_size=p.generate.batch_size))  # as `generate` makes them
    print(f"\nfid_ground_truth {fid_truth:.2f} on the first {n} photos; extractor offline\n")
    width = max(34, *map(len, ceilings))
    print(f"{'ground truth through, or generator':<{width}} {'fid/gt':>7}")
    for label, ratio in ceilings.items():
        print(f"{label:<{width}} {ratio:>7.3f}")
    if args.ceilings_only:
        return

    results, outputs = {}, {}

    def run(name: str, changes: dict) -> None:
        q = with_train(p, **changes)
        speed = steps_per_second(q, photos, monets, device)
        steps = max(4, int(args.seconds * speed) // 4 * 4)
        q = with_train(q, epochs=4, steps_per_epoch=steps // 4, decay_from_epoch=2)
        print(f"\n{name}: {changes or 'params.yaml'}; {speed:.2f} steps/s -> {steps} steps", flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            started = time.perf_counter()
            trainer, _ = train_stage.train(q, photos, monets, Path(tmp) / "ckpt.pt", name, device=device)
            seconds = time.perf_counter() - started
        G = trainer.generators()[0]
        dtype = autocast_dtype(q.precision, device)
        generated = translate(G, first, q.image_size, device, autocast(device, dtype), out_size=256)
        outputs[name] = evaluate.as_jpeg(generated.numpy(), quality)
        gen_features = features(outputs[name], f"{name}: generated")
        k = kid(gen_features, real, e.kid_subsets, min(e.kid_subset_size, n, len(real)))
        results[name] = {"steps": steps, "pairs_per_s": steps * q.train.batch_size / seconds,
                         "fid_vs_ground_truth": fid(gen_features, real) / fid_truth, "kid": k["kid_mean"]}

    run("default", {})
    for name, changes in OPTIONS.items():
        run(name, changes)
    better = [name for name in OPTIONS if results[name]["fid_vs_ground_truth"] < results["default"]["fid_vs_ground_truth"]]
    if len(better) > 1:
        run("+".join(better), {k: v for name in better for k, v in OPTIONS[name].items()})

    base = results["default"]
    print(f"\nfid_ground_truth {fid_truth:.2f} on the first {n} photos; budget {args.seconds:.0f} s each; "
          f"extractor offline\n")
    print(f"{'configuration':<28} {'steps':>6} {'pairs/s':>8} {'ratio':>6} {'fid/gt':>7} {'ratio':>6} "
          f"{'KID':>9} {'ratio':>6}")
    for name, r in results.items():
        print(f"{name:<28} {r['steps']:>6} {r['pairs_per_s']:>8.2f} {r['pairs_per_s'] / base['pairs_per_s']:>6.3f} "
              f"{r['fid_vs_ground_truth']:>7.3f} {r['fid_vs_ground_truth'] / base['fid_vs_ground_truth']:>6.3f} "
              f"{r['kid']:>9.4g} {r['kid'] / base['kid']:>6.3f}")
    if args.picture:
        best = min(results, key=lambda name: results[name]["fid_vs_ground_truth"])
        rows = [first[:6].numpy(), outputs["default"][:6].numpy(), outputs[best][:6].numpy()]
        picture = np.concatenate([np.concatenate(list(row), axis=1) for row in rows], axis=0)  # 3 rows of 6
        args.picture.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(picture).resize((6 * 128, 3 * 128), Image.BICUBIC).save(args.picture)
        print(f"\n{args.picture}: rows: photos, default, {best}")


if __name__ == "__main__":
    main()
