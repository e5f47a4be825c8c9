"""Stage 2, train: a CycleGAN between the photo and Monet shards.

    python -m pipeline.train --shards data/shards --manifest data/manifest.csv --models models \\
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

from pipeline import shards
from pipeline.cyclegan import Trainer, build_nets, generator_config, to_model_input, to_uint8
from pipeline.errors import cli
from pipeline.files import atomic_path, write_json
from pipeline.params import Params, flatten, load
from pipeline.runtime import autocast_dtype, describe, pick_device, seed_everything

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


@torch.no_grad()
def translate(G: torch.nn.Module, photos_uint8: torch.Tensor, device: torch.device, autocast, batch_size: int = 64,
              channels_last: bool = False) -> torch.Tensor:
    G.eval()
    out = []
    for chunk in photos_uint8.split(batch_size):
        with autocast():
            out.append(to_uint8(G(to_model_input(chunk, device, channels_last))))
    G.train()
    return torch.cat(out)


def train(p: Params, photos: torch.Tensor, monets: torch.Tensor, checkpoint: Path, resume_key: str,
          print_fn=print) -> tuple[Trainer, list[dict]]:
    """Train on uint8 N×H×W×3 photos and paintings at p.image_size, checkpointing every epoch;
    a checkpoint whose `resume_key` matches is resumed. Returns the trainer and per-epoch mean losses."""
    t = p.train
    device = pick_device(p.device)
    dtype = autocast_dtype(p.precision, device)
    data_gen = seed_everything(p.seed)
    nets = build_nets(p)
    for m in nets.modules().values():
        m.to(device, memory_format=torch.channels_last if t.channels_last else torch.preserve_format)
    trainer = Trainer(nets, p, device, dtype)
    history: list[dict] = []
    if checkpoint.exists():
        state = torch.load(checkpoint, map_location=device, weights_only=False)
        if state.get("fingerprint") == resume_key:
            trainer.load_state_dict(state["trainer"])
            data_gen.set_state(state["data_rng"])
            torch.set_rng_state(state["torch_rng"])
            history = state["history"]
            print_fn(f"train: resuming from {checkpoint} at step {trainer.step}")
        else:
            print_fn(f"train: {checkpoint} was written for other params or data; starting afresh")
    if t.compile:
        for name, m in nets.modules().items():
            setattr(nets, name, torch.compile(m))
    print_fn(f"train: {describe(device, dtype)}; {len(photos)} photos, {len(monets)} paintings at {p.image_size} px; "
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
        with atomic_path(checkpoint) as tmp:
            torch.save({"fingerprint": resume_key, "trainer": trainer.state_dict(), "history": history,
                        "data_rng": data_gen.get_state(), "torch_rng": torch.get_rng_state()}, tmp)
    bar.close()
    return trainer, history


def save_generator(net: torch.nn.Module, config: dict, path: Path) -> None:
    net = getattr(net, "_orig_mod", net)
    with atomic_path(path) as tmp:
        torch.save({"config": config, "state_dict": net.state_dict()}, tmp)


@cli
def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--shards", type=Path, required=True)
    ap.add_argument("--manifest", type=Path, required=True)
    ap.add_argument("--models", type=Path, required=True, help="folder for the exported generators")
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

    config = generator_config(p)
    save_generator(trainer.nets.G, config, args.models / "photo2monet.pt")
    save_generator(trainer.nets.F, config, args.models / "monet2photo.pt")
    grid_photos = photos[: p.train.grid_size]
    generated = translate(trainer.nets.G, grid_photos, trainer.device, trainer.autocast,
                          channels_last=p.train.channels_last)
    with atomic_path(args.grid) as tmp:
        photo_grid(grid_photos, generated).save(tmp, format="PNG")
    with atomic_path(args.curve) as tmp:
        pd.DataFrame(history).to_csv(tmp, index=False)
    final = {k: v for k, v in history[-1].items() if k.startswith("loss_")}
    write_json(args.metrics, {**final, "steps": trainer.step, "seconds": round(seconds, 1),
                              "photos": len(photos), "paintings": len(monets),
                              "device": trainer.describe()})

    from pipeline import tracking  # mlflow only after the work is safely on disk

    with tracking.open_run(p, args.models / "photo2monet.pt"):
        import mlflow

        for record in history:
            mlflow.log_metrics({f"train.{k}": v for k, v in record.items() if k.startswith("loss_")},
                               step=record["step"])
        tracking.log_metrics_file(args.metrics, step=trainer.step)  # the final values end the curves
        mlflow.log_artifact(str(args.grid))
    print(f"train: {trainer.step} steps in {seconds:.0f} s -> {args.models}")


if __name__ == "__main__":
    main()
