"""Stage 2, train: a CycleGAN between the photo and Monet shards.

    python -m pipeline.train --shards data/shards --manifest data/manifest.csv \\
        --generator models/photo2monet.pt --reverse-generator models/monet2photo.pt \\
        --checkpoint models/checkpoint.pt --metrics metrics/train.json \\
        --curve metrics/train_curve.csv --grid metrics/grid.png

Resumes from --checkpoint when it was written for the same params and data.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path

import pandas as pd
import torch
from PIL import Image
from torchvision.utils import make_grid
from tqdm import tqdm

from pipeline import generator_file, shards
from pipeline.cyclegan import Trainer, build_nets
from pipeline.errors import cli
from pipeline.files import atomic_path, save_torch, write_json
from pipeline.networks import to_model_input
from pipeline.params import Params, flatten, load
from pipeline.runtime import autocast_dtype, pick_device, place, rng_state, seed_everything, set_rng_state

TRAIN_KEYS = ("seed", "image_size", "lambda_cycle", "lambda_identity", "precision", "train.")  # data: the manifest


def fingerprint(p: Params, manifest_path: Path) -> str:
    """What a checkpoint must match to be resumed: the training params and the data."""
    relevant = {k: v for k, v in flatten(p).items() if k.startswith(TRAIN_KEYS)}
    h = hashlib.sha256(json.dumps(relevant, sort_keys=True).encode())
    h.update(manifest_path.read_bytes())
    return h.hexdigest()


def sample_batch(images: torch.Tensor, batch_size: int, gen: torch.Generator) -> torch.Tensor:
    """A random batch (with replacement) of uint8 N×H×W×3 images, each flipped left-right with p=1/2."""
    idx = torch.randint(len(images), (batch_size,), generator=gen)
    batch = images[idx]
    flip = torch.rand(batch_size, generator=gen) < 0.5
    batch[flip] = batch[flip].flip(2)
    return batch


def photo_grid(photos: torch.Tensor, generated: torch.Tensor, px: int = 128) -> Image.Image:
    """Top row the photos, bottom row their translations (uint8 N×H×W×3 each), upscaled to px."""
    both = torch.cat([photos, generated]).permute(0, 3, 1, 2).float()
    both = torch.nn.functional.interpolate(both, size=(px, px), mode="bilinear", align_corners=False)
    grid = make_grid(both, nrow=len(photos), padding=2, pad_value=255)
    return Image.fromarray(grid.clamp(0, 255).round().to(torch.uint8).permute(1, 2, 0).numpy())


def train(p: Params, photos: torch.Tensor, monets: torch.Tensor, checkpoint: Path, resume_key: str,
          print_fn=print) -> tuple[Trainer, list[dict]]:
    """Train on uint8 N×H×W×3 photos and paintings at p.image_size, checkpointing every epoch;
    a checkpoint whose `resume_key` matches is resumed. Returns the trainer and per-epoch mean losses."""
    t = p.train
    device = pick_device(p.device)
    data_gen = seed_everything(p.seed)
    nets = build_nets(p).map(lambda m: place(m, device, t.channels_last, t.compile))
    trainer = Trainer(nets, p, device, autocast_dtype(p.precision, device))
    history: list[dict] = []
    if checkpoint.exists():
        state = torch.load(checkpoint, map_location=device, weights_only=True)
        if state.get("fingerprint") == resume_key:
            trainer.load_state_dict(state["trainer"])
            data_gen.set_state(state["data_rng"])
            set_rng_state(state["rng"], device)
            history = state["history"]
            print_fn(f"train: resuming from {checkpoint} at step {trainer.step}")
        else:
            print_fn(f"train: {checkpoint} was written for other params or data; starting afresh")
    print_fn(f"train: {trainer.describe()}; {len(photos)} photos, {len(monets)} paintings at {p.image_size} px; "
             f"{t.generator} generator, {t.epochs}×{t.steps_per_epoch} steps of {t.batch_size}")

    total = t.epochs * t.steps_per_epoch
    bar = tqdm(total=total, initial=trainer.step, desc="train", unit="step", mininterval=2)
    while trainer.step < total:
        epoch = trainer.step // t.steps_per_epoch
        sums: dict[str, float] = {}
        started = time.perf_counter()
        steps = t.steps_per_epoch - trainer.step % t.steps_per_epoch  # fewer when resuming mid-epoch
        for _ in range(steps):
            real_P = to_model_input(sample_batch(photos, t.batch_size, data_gen), device, t.channels_last)
            real_M = to_model_input(sample_batch(monets, t.batch_size, data_gen), device, t.channels_last)
            losses = trainer.train_step(real_P, real_M)
            for k, v in losses.items():
                sums[k] = sums.get(k, 0.0) + v
            bar.update()
            bar.set_postfix(cyc=f"{losses['loss_cycle']:.3f}", D=f"{losses['loss_D_M']:.3f}", refresh=False)
        record = {"epoch": epoch + 1, "step": trainer.step, **{k: v / steps for k, v in sums.items()},
                  "seconds": time.perf_counter() - started}
        history.append(record)
        save_torch({"fingerprint": resume_key, "trainer": trainer.state_dict(), "history": history,
                    "data_rng": data_gen.get_state(), "rng": rng_state(device)}, checkpoint)
    bar.close()
    return trainer, history


@cli
def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--shards", type=Path, required=True)
    ap.add_argument("--manifest", type=Path, required=True)
    ap.add_argument("--generator", type=Path, required=True, help="the photo→Monet generator to write")
    ap.add_argument("--reverse-generator", type=Path, required=True, help="the Monet→photo generator to write")
    ap.add_argument("--checkpoint", type=Path, required=True, help="resumable training state")
    ap.add_argument("--metrics", type=Path, required=True)
    ap.add_argument("--curve", type=Path, required=True, help="per-epoch losses (CSV, a DVC plot)")
    ap.add_argument("--grid", type=Path, required=True, help="photo | generated sample grid (PNG)")
    args = ap.parse_args(argv)
    p = load(args.params)

    manifest = shards.read_manifest(args.manifest)
    _, photos = shards.load_domain(args.shards, manifest, "photo", p.image_size)
    _, monets = shards.load_domain(args.shards, manifest, "monet", p.image_size)

    started = time.perf_counter()
    trainer, history = train(p, photos, monets, args.checkpoint, fingerprint(p, args.manifest))
    seconds = time.perf_counter() - started

    config = generator_file.config_of(p)
    generator_file.save(trainer.nets.G, config, args.generator)
    generator_file.save(trainer.nets.F, config, args.reverse_generator)
    grid_photos = photos[: p.train.grid_size]
    generated = generator_file.translate(trainer.nets.G, grid_photos, p.image_size, trainer.device,
                                         trainer.autocast, channels_last=p.train.channels_last)
    with atomic_path(args.grid) as tmp:
        photo_grid(grid_photos, generated).save(tmp, format="PNG")
    with atomic_path(args.curve) as tmp:
        pd.DataFrame(history).to_csv(tmp, index=False)
    final = {k: v for k, v in history[-1].items() if k.startswith("loss_")}
    write_json(args.metrics, {**final, "steps": trainer.step, "seconds": round(seconds, 1),
                              "photos": len(photos), "paintings": len(monets),
                              "device": trainer.describe()})

    from pipeline import tracking  # mlflow only after the work is safely on disk

    with tracking.open_run(p, args.generator, stage="train"):
        tracking.log_curve(args.curve, "train")
        tracking.log_metrics_file(args.metrics, step=trainer.step)  # the final values end the curves
        tracking.log_artifact(args.grid)
    print(f"train: {trainer.step} steps in {seconds:.0f} s -> {args.generator}, {args.reverse_generator}")


if __name__ == "__main__":
    main()
