"""Stage 3, generate: every photo through the photo→Monet generator, saved as a 256×256 JPEG
named after the photo.

    python -m pipeline.generate --shards data/shards --manifest data/manifest.csv \\
        --generator models/photo2monet.pt --out data/generated

The generator runs at the resolution it was trained at (params `image_size`); when that is
below 256 its output is upscaled to the 256×256 the competition requires.
"""
from __future__ import annotations

import io
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch
from PIL import Image
from tqdm import tqdm

from pipeline import generator_file, shards, tracking
from pipeline.errors import cli
from pipeline.files import atomic_dir
from pipeline.params import load, stage_arguments
from pipeline.runtime import autocast, autocast_dtype, pick_device

OUTPUT_SIZE = 256


def jpeg_bytes(pixels: torch.Tensor, quality: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels.numpy()).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def write_jpegs(folder: Path, names: list[str], paintings: torch.Tensor, quality: int) -> int:
    for name, pixels in zip(names, paintings):
        (folder / f"{name}.jpg").write_bytes(jpeg_bytes(pixels, quality))
    return len(names)


def generate(shards_dir: Path, manifest_path: Path, generator_path: Path, out: Path, device_name: str,
             precision: str, batch_size: int, quality: int) -> int:
    device = pick_device(device_name)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # batches of one shape: pick the fastest convolutions once
    ctx = autocast(device, autocast_dtype(precision, device))
    net, config = generator_file.load(generator_path, device)
    manifest = shards.read_manifest(manifest_path)
    total = int((manifest["domain"] == "photo").sum())
    count = 0
    # JPEG encoding (Pillow releases the GIL) runs in a thread while the network does the next batch;
    # at most two batches wait for it, so memory stays bounded
    with atomic_dir(out) as tmp, ThreadPoolExecutor(max_workers=2) as encoder, \
            tqdm(total=total, desc="generate", unit="img", mininterval=2) as bar:
        waiting: list[Future] = []
        for names, photos in shards.iter_domain(shards_dir, manifest, "photo"):
            for k in range(0, len(photos), batch_size):
                paintings = generator_file.translate(net, photos[k:k + batch_size], config["image_size"], device,
                                                     ctx, out_size=OUTPUT_SIZE, batch_size=batch_size)
                waiting.append(encoder.submit(write_jpegs, tmp, names[k:k + batch_size], paintings, quality))
                while len(waiting) > 2 or (waiting and waiting[0].done()):
                    done = waiting.pop(0).result()
                    count += done
                    bar.update(done)
        for future in waiting:
            done = future.result()
            count += done
            bar.update(done)
    return count


@cli
def main(argv=None) -> None:
    ap = stage_arguments(__doc__)
    ap.add_argument("--generator", type=Path, required=True, help="the photo→Monet generator (from train)")
    ap.add_argument("--out", type=Path, required=True, help="folder for the generated JPEGs")
    args = ap.parse_args(argv)
    p = load(args.params)
    tracking.check_store()  # an unreachable MLflow server stops the stage before the work
    with tracking.failure_marks_row(p, args.generator, "generate"):
        count = generate(args.shards, args.manifest, args.generator, args.out, p.device, p.precision,
                         p.generate.batch_size, p.generate.jpeg_quality)
    print(f"generate: {count} JPEGs ({OUTPUT_SIZE}×{OUTPUT_SIZE}) -> {args.out}")
    # the same JPEGs as before (a param that does not change them): DVC skips both stages that log
    tracking.complete_row_if_rest_holds(p, args.generator, "generate", ("evaluate", "package"), args.shards,
                                        args.manifest)


if __name__ == "__main__":
    main()
