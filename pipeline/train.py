"""Stage 2, train: a CycleGAN between the photo and Monet shards.

    python -m pipeline.train --shards data/shards --manifest data/manifest.csv \\
        --generator models/photo2monet.pt --reverse-generator models/monet2photo.pt \\
        --checkpoint .cache/train/checkpoint.pt --metrics metrics/train.json \\
        --curve metrics/train_curve.csv --grid metrics/grid.png

Resumes from --checkpoint when it was written for the same params, data and training code; that
file is not a DVC output (dvc.yaml says why). With `train.processes: N` > 1 it starts N DDP
workers of itself (torch.distributed.run); or run it under torchrun yourself:

    torchrun --standalone --nproc_per_node=8 -m pipeline.train --shards data/shards ...
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import signal
import sys
import time
from pathlib import Path

import pandas as pd
import torch
from PIL import Image
from torchvision.utils import make_grid
from tqdm import tqdm

from pipeline import distributed, generator_file, shards, tracking
from pipeline.cyclegan import LossMeter, Trainer, build_nets
from pipeline.distributed import World
from pipeline.errors import PipelineError, brief, cli, out_of_memory
from pipeline.files import atomic_path, check_outputs, save_torch, write_json
from pipeline.params import Params, flatten, load, stage_arguments
from pipeline.runtime import (autocast_dtype, pick_device, place, rng_state, seed_everything, set_rng_state,
                              stream_seed, uncompiled)

TRAIN_KEYS = ("seed", "image_size", "lambda_cycle", "lambda_identity", "precision", "train.")  # data: the manifest
RANK_ERROR_GRACE_SECONDS = 10.0  # see _grace_for_rank_0
RANDOM_OPS, BATCHES = 0, 1  # the random streams of a rank besides the init (stream_seed)
NOT_TRAINING = ("train.processes", "train.log_every", "train.grid_size")  # change no weight (processes: checked apart)


# The code that decides the weights: every module this stage runs but the MLflow ones (tracking,
# stage_results, served_model; tests/test_layout.py keeps the list whole). DVC reruns train when
# any module changes; a finished checkpoint of other training code must not stand in for a new run.
WEIGHTS_CODE = ("train", "cyclegan", "networks", "diffaugment", "distributed", "runtime", "generator_file",
                "shards", "sample", "processes", "params", "yaml12", "files", "errors")
CODE_DIR = Path(__file__).parent


def fingerprint(p: Params, manifest_path: Path, arithmetic: str, code_dir: Path = CODE_DIR) -> str:
    """What a checkpoint must match to be resumed: the training params, the data, the code, and
    `arithmetic`, the device and autocast dtype it trains in (`device: auto` and `precision: auto`
    resolve per machine: a CPU checkpoint did not load on CUDA, and a bf16 one went on in fp32)."""
    relevant = {k: v for k, v in flatten(p).items() if k.startswith(TRAIN_KEYS) and k not in NOT_TRAINING}
    h = hashlib.sha256(json.dumps({**relevant, "arithmetic": arithmetic}, sort_keys=True).encode())
    h.update(manifest_path.read_bytes())
    for module in WEIGHTS_CODE:
        h.update((code_dir / f"{module}.py").read_bytes())
    return h.hexdigest()


def photo_grid(photos: torch.Tensor, generated: torch.Tensor, px: int = 128) -> Image.Image:
    """Top row the photos, bottom row their translations (uint8 N×H×W×3 each), upscaled to px."""
    both = torch.cat([photos, generated]).permute(0, 3, 1, 2).float()
    both = torch.nn.functional.interpolate(both, size=(px, px), mode="bilinear", align_corners=False)
    grid = make_grid(both, nrow=len(photos), padding=2, pad_value=255)
    return Image.fromarray(grid.clamp(0, 255).round().to(torch.uint8).permute(1, 2, 0).numpy())


def _read(checkpoint: Path) -> dict | None:
    """A checkpoint's state; None when there is none."""
    if not checkpoint.exists():
        return None
    try:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        if not isinstance(state, dict):
            raise TypeError(f"holds a {type(state).__name__}")
    except Exception as e:  # truncated, not a torch file, or not a checkpoint: kept for the user to judge
        raise PipelineError(f"train: {checkpoint} does not read back as a checkpoint ({brief(e)}); "
                            f"delete it to start afresh") from None
    return state


def _written_for(checkpoint: Path, resume_key: str) -> dict | None:
    """`checkpoint`'s state when it was written for this training (its params, data and code), else
    None. Memory-mapped: only what is looked at is read. Unreadable is None (train says why)."""
    try:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        return None
    return state if isinstance(state, dict) and state.get("fingerprint") == resume_key else None


def _step(state: dict) -> int | None:
    try:
        return int(state["trainer"]["step"])
    except (KeyError, TypeError, ValueError):
        return None


def _count_refusal(state: dict, checkpoint: Path, processes: int, total: int) -> str | None:
    """Why `processes` processes may not resume this training's checkpoint, or None: an unfinished
    run resumes only as it was split. A state of another layout is not judged here (loading it
    into the trainer says what is wrong)."""
    written, step = state.get("processes", 1), _step(state)
    if written == processes or step is None or step >= total:
        return None
    return (f"train: {checkpoint} stopped at step {step} of a run with {written} processes, and this run "
            f"has {processes}: set train.processes={written} to resume it, or delete it to start afresh")


def resumed_row(checkpoint: Path, resume_key: str, world: World, total: int) -> str | None:
    """Before rank 0 opens the MLflow row: when `checkpoint` was written for this training (its
    params, data and code), the row it logged into ("" if it names none), else None. A checkpoint
    these processes may not resume is refused here, not in training, where the refusal left a
    FAILED row that trained no step: rank 0 reads it, every rank raises."""
    state = _written_for(checkpoint, resume_key) if world.main else None
    refusal = distributed.broadcast(state and _count_refusal(state, checkpoint, world.size, total), world)
    if refusal:
        raise PipelineError(refusal)
    return None if state is None else str(state.get("row", ""))


def _resume(trainer: Trainer, checkpoint: Path, resume_key: str, world: World, total: int,
            data_gen: torch.Generator, print_fn) -> list[dict]:
    """Load a matching checkpoint into the trainer and this rank's RNGs; returns its history.
    Rank 0 reads it and hands it to the others: on several machines only rank 0's disk has it
    (rank 0 writes it), and every rank must resume from the same step."""
    state, error = None, None
    if world.main:
        try:
            state = _read(checkpoint)
        except PipelineError as e:
            error = str(e)
    state, error = distributed.broadcast((state, error), world)
    if error:
        raise PipelineError(error)
    if state is None:
        return []
    if state.get("fingerprint") != resume_key:
        print_fn(f"train: {checkpoint} was written for other params, data or training code; starting afresh")
        return []
    if state.get("processes", 1) != world.size and _step(state) is not None:  # else the load below says what is wrong
        refusal = _count_refusal(state, checkpoint, world.size, total)
        if refusal:
            raise PipelineError(refusal)
        print_fn(f"train: {checkpoint} is a finished run with {state.get('processes', 1)} processes; starting afresh")
        return []
    try:
        trainer.load_state_dict(state["trainer"])
        mine = state["ranks"][world.rank]
        trainer.load_pools_state(mine)
        data_gen.set_state(mine["data_rng"])
        set_rng_state(mine["rng"], trainer.device)
    except Exception as e:  # same params and data, but written by code whose networks or state differ
        raise PipelineError(f"train: {checkpoint} matches these params and data but does not load into "
                            f"this code's training state ({brief(e)}); finish it with the code that wrote it, "
                            f"or delete it to start afresh") from None
    print_fn(f"train: resuming from {checkpoint} at step {trainer.step}")
    return state["history"]


def train(p: Params, photos: torch.Tensor, monets: torch.Tensor, checkpoint: Path, resume_key: str,
          print_fn=print, world: World = World(), device: torch.device | None = None,
          row: str = "") -> tuple[Trainer, list[dict]]:
    """Train on uint8 N×H×W×3 photos and paintings at p.image_size, checkpointing every epoch;
    a checkpoint whose `resume_key` matches is resumed. Returns the trainer and per-epoch mean losses.
    In a DDP world every rank calls this; rank 0 alone writes the checkpoint, with `row`, the MLflow
    run it logs into (the run a resumed training goes on with)."""
    t = p.train
    device = device or pick_device(p.device)
    seed_everything(p.seed)
    nets = build_nets(p)  # the same init on every rank (and DDP starts from rank 0's)
    if world.rank:
        torch.manual_seed(stream_seed(p.seed, world.rank, RANDOM_OPS))  # each rank its own dropout, augmentation
    data_gen = torch.Generator(device).manual_seed(stream_seed(p.seed, world.rank, BATCHES))  # and its own batches
    # compiled inside DDP, so the generators' step can look through a discriminator's compiled
    # forward without joining DDP's gradient sync (runtime.local)
    nets = nets.map(lambda m: distributed.wrap(place(m, device, t.channels_last, t.compile), world, device))
    trainer = Trainer(nets, p, device, autocast_dtype(p.precision, device), rank=world.rank)
    total = t.epochs * t.steps_per_epoch
    history = _resume(trainer, checkpoint, resume_key, world, total, data_gen, print_fn)
    photos, monets = photos.to(device), monets.to(device)  # resident: batches are drawn on the device
    print_fn(f"train: {trainer.describe()}; {len(photos)} photos, {len(monets)} paintings at {p.image_size} px; "
             f"{t.generator} generator, {t.epochs}×{t.steps_per_epoch} steps of {t.batch_size}"
             + (f" per process × {world.size} processes" if world.size > 1 else ""))
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: pick the fastest convolutions once

    reduce_min = lambda x: distributed.minimum(x, world)  # noqa: E731
    meter = LossMeter(device)
    # a context: a bar left open by an error would print itself once more at exit, after the error line
    with tqdm(total=total, initial=trainer.step, desc="train", unit="step", mininterval=2,
              disable=not world.main) as bar:
        while trainer.step < total:
            epoch = trainer.step // t.steps_per_epoch
            meter.reset()
            started = time.perf_counter()
            for _ in range(t.steps_per_epoch):  # checkpoints are written at an epoch's end: a resume starts one
                meter.add(trainer.step + 1, trainer.train_on(photos, monets, data_gen))
                bar.update()
                if trainer.step % t.log_every == 0:  # the only host syncs: every log_every steps
                    meter.check(reduce_min)
                    means = meter.means()
                    bar.set_postfix(cyc=f"{means['loss_cycle']:.3f}", D=f"{means['loss_D_M']:.3f}", refresh=False)
            meter.check(reduce_min)
            means = meter.means(lambda x: distributed.sum_(x, world), world.size)
            history.append({"epoch": epoch + 1, "step": trainer.step, **means, "seconds": time.perf_counter() - started})
            ranks = distributed.gather({"data_rng": data_gen.get_state(), "rng": rng_state(device),
                                        **trainer.pools_state()}, world)
            if world.main:
                save_torch({"fingerprint": resume_key, "processes": world.size, "trainer": trainer.state_dict(),
                            "ranks": ranks, "history": history, "row": row}, checkpoint)
    if world.size > 1:
        _check_same_weights(trainer, world, print_fn)
    return trainer, history


def _check_same_weights(trainer: Trainer, world: World, print_fn) -> None:
    """DDP keeps every rank's weights equal; confirm it before rank 0 saves them for all."""
    h = hashlib.sha256()
    for net in trainer.nets.modules().values():
        for tensor in uncompiled(net).state_dict().values():
            h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    digests = distributed.gather(h.hexdigest(), world)
    if len(set(digests)) != 1:
        raise PipelineError(f"train: the weights differ between processes after training ({len(set(digests))} versions)")
    print_fn(f"train: weights identical on all {world.size} processes")


@cli
def main(argv=None) -> None:
    ap = stage_arguments(__doc__)
    ap.add_argument("--generator", type=Path, required=True, help="the photo→Monet generator to write")
    ap.add_argument("--reverse-generator", type=Path, required=True, help="the Monet→photo generator to write")
    ap.add_argument("--checkpoint", type=Path, required=True, help="resumable training state (not a DVC output)")
    ap.add_argument("--metrics", type=Path, required=True, help="training summary JSON to write")
    ap.add_argument("--curve", type=Path, required=True, help="per-epoch losses (CSV, a DVC plot)")
    ap.add_argument("--grid", type=Path, required=True, help="photo | generated sample grid (PNG)")
    argv = sys.argv[1:] if argv is None else argv
    args = ap.parse_args(argv)
    p = load(args.params)
    world = distributed.current()
    if world.main:
        check_outputs("train", {flag: getattr(args, flag.replace("-", "_")) for flag in (
            "generator", "reverse-generator", "checkpoint", "metrics", "curve", "grid")})
    if p.train.processes > 1 and world.size == 1:  # the stage itself starts the DDP workers
        tracking.check_store()
        distributed.check_devices(p.train.processes, pick_device(p.device))
        check_submission_size(p, args.manifest)
        try:
            distributed.launch(p.train.processes, "pipeline.train", argv)
        except (PipelineError, KeyboardInterrupt) as e:
            tracking.end_lost_training(p, e)
            raise
        return
    if world.size > 1 and world.size != p.train.processes:  # a plain torchrun: DVC records the params
        if not world.main:
            sys.exit(2)  # rank 0 says it
        raise PipelineError(f"train: torchrun started {world.size} processes, and train.processes is "
                            f"{p.train.processes}: set train.processes={world.size} (a run records the "
                            f"process count it trained with; the global batch is batch_size × processes)")
    if world.main:
        check_submission_size(p, args.manifest)
        tracking.check_store()  # an unreachable MLflow server stops the stage before any training
    try:
        run(p, args, world, distributed.start(world, pick_device(p.device)))
    except PipelineError:
        _grace_for_rank_0(world)
        raise
    except Exception as e:
        if distributed.peer_lost(e, world):
            line = distributed.lost_peer_line(e, world)
            if line is None:  # the stage's launcher names the process that died, in one line
                sys.exit(1)
            raise PipelineError(line) from None
        if out_of_memory(e) is not None:  # every rank asks for the same memory: errors.cli's line, once
            _grace_for_rank_0(world)
        raise
    finally:
        if world.size > 1:  # from here a Ctrl-C would only break the interpreter's exit (atexit tracebacks)
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        distributed.finish(world)


def _grace_for_rank_0(world: World) -> None:
    """What every rank finds (a damaged checkpoint, too little memory) rank 0 says, and the stage's
    launcher then stops the others: one line, not one per rank. An error of this rank alone is said
    after a while."""
    if not world.main and os.environ.get(distributed.LAUNCHER):
        time.sleep(RANK_ERROR_GRACE_SECONDS)


def check_submission_size(p: Params, manifest_path: Path) -> None:
    """generate paints one JPEG per photo, and package takes package.min_images to max_images of
    them: with other photo counts the pipeline would fail at its end, so say so before training."""
    photos = int((shards.read_manifest(manifest_path)["domain"] == "photo").sum())
    change = p.package.outside(photos)
    if change:
        raise PipelineError(f"train: {manifest_path} lists {photos} photos, and the submission takes "
                            f"{p.package.min_images}–{p.package.max_images} paintings, one per photo: {change} "
                            f"(package would refuse them after training)")


def run(p: Params, args: argparse.Namespace, world: World, device: torch.device) -> None:
    say = print if world.main else (lambda *_: None)
    manifest = shards.read_manifest(args.manifest)
    _, photos = shards.load_domain(args.shards, manifest, "photo", p.image_size)
    _, monets = shards.load_domain(args.shards, manifest, "monet", p.image_size)

    # rank 0 opens the MLflow row before the first step, so its duration includes training
    key = fingerprint(p, args.manifest, f"{device.type} {autocast_dtype(p.precision, device)}")
    resumed = resumed_row(args.checkpoint, key, world, p.train.epochs * p.train.steps_per_epoch)
    with (tracking.start_training(p, args.manifest, resumed)
          if world.main else contextlib.nullcontext()) as row:
        trainer, history = train(p, photos, monets, args.checkpoint, key, say, world, device,
                                 row=row.info.run_id if row else "")
        if not world.main:  # rank 0 alone writes outputs and logs
            return
        grid_photos = photos[: p.train.grid_size]
        save_outputs(p, args, trainer, history, grid_photos, len(photos), len(monets), world.size)

        tracking.finish_training(p, args.generator)
        tracking.log_curve(args.curve, "train")
        tracking.log_metrics_file(args.metrics, step=trainer.step)  # the final values end the curves
        tracking.log_artifact(args.grid)
        tracking.log_tags({"train.device_description": trainer.describe()})
        tracking.log_generator_model(args.generator, args.shards, args.manifest, p.precision)
    print(tracking.report("train"))
    print(f"train: {trainer.step} steps in {training_seconds(history):.0f} s -> {args.generator}, "
          f"{args.reverse_generator}")


def training_seconds(history: list[dict]) -> float:
    """The time the model took to train: its epochs', those before a resume included (a resumed
    finished run trains 0 s in the run that saves it)."""
    return sum(epoch["seconds"] for epoch in history)


def save_outputs(p: Params, args: argparse.Namespace, trainer: Trainer, history: list[dict], grid_photos: torch.Tensor,
                 photos: int, paintings: int, processes: int) -> None:
    """The generators, the grid, the loss curve and the metrics, each written atomically."""
    config = generator_file.config_of(p)
    photo2monet, monet2photo = trainer.generators()  # the weight averages when train.ema is on
    generator_file.save(photo2monet, config, args.generator)
    generator_file.save(monet2photo, config, args.reverse_generator)
    generated = generator_file.translate(photo2monet, grid_photos, p.image_size, trainer.device,
                                         trainer.autocast, channels_last=p.train.channels_last)
    with atomic_path(args.grid) as tmp:
        photo_grid(grid_photos, generated).save(tmp, format="PNG")
    with atomic_path(args.curve) as tmp:
        pd.DataFrame(history).to_csv(tmp, index=False)
    final = {k: v for k, v in history[-1].items() if k.startswith("loss_")}
    write_json(args.metrics, {**final, "steps": trainer.step, "seconds": round(training_seconds(history), 1),
                              "photos": photos, "paintings": paintings, "processes": processes,
                              "device": trainer.device.type, "precision": "bf16" if trainer.dtype else "fp32"})

if __name__ == "__main__":
    main()
