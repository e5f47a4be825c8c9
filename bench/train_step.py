"""Training-step and generation throughput of the CycleGAN under each precision / memory-format /
compile mode, as ratios against plain fp32 measured in the same run. Needs only torch and
pyyaml (no dvc, mlflow or tfrecord), so it also serves as the GPU check.

    python bench/train_step.py                       # CPU: the default recipe (64 px, small nets)
    python bench/train_step.py --recipe competition  # GPU: 256 px, ResNet-9, 64 filters, batch 8

Writes a CSV and a log under $OUT (or ./bench-out) and prints a short table last.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipeline.cyclegan import Trainer, build_nets  # noqa: E402  (torch + pyyaml only)
from pipeline.generator_file import translate  # noqa: E402
from pipeline.params import load  # noqa: E402
from pipeline.runtime import autocast, memory_format, place  # noqa: E402

RECIPES = {
    "default": {},  # params.yaml as committed
    "competition": {"image_size": 256, "generator": "resnet", "gen_filters": 64, "disc_filters": 64,
                    "resnet_blocks": 9, "batch_size": 8},
}


def configure(recipe: str):
    p = load(Path(__file__).resolve().parents[1] / "params.yaml")
    over = RECIPES[recipe]
    train = {k: v for k, v in over.items() if k != "image_size"}
    return dataclasses.replace(p, image_size=over.get("image_size", p.image_size),
                               train=dataclasses.replace(p.train, **train))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench_mode(p, device, dtype, channels_last: bool, compile_: bool, steps: int, warmup: int) -> dict:
    torch.manual_seed(0)
    nets = build_nets(p).map(lambda m: place(m, device, channels_last, compile_))
    trainer = Trainer(nets, p, device, dtype)
    b, s = p.train.batch_size, p.image_size
    fmt = memory_format(channels_last)
    x = (torch.rand(b, 3, s, s, device=device) * 2 - 1).contiguous(memory_format=fmt)
    y = (torch.rand(b, 3, s, s, device=device) * 2 - 1).contiguous(memory_format=fmt)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(warmup):
        trainer.train_step(x, y)
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        losses = trainer.train_step(x, y)
    sync(device)
    train_s = (time.perf_counter() - start) / steps
    # generation as the generate stage runs it: uint8 photos in, uint8 paintings out
    photos = torch.randint(0, 256, (4 * b, s, s, 3), dtype=torch.uint8)
    ctx = autocast(device, dtype)
    for i in range(4):  # one warm-up call, then three timed (translate returns on the CPU: synced)
        if i == 1:
            start = time.perf_counter()
        translate(nets.G, photos, s, device, ctx, batch_size=4 * b, channels_last=channels_last)
    gen_s = (time.perf_counter() - start) / 3
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    return {"train_img_s": b / train_s, "gen_img_s": 4 * b / gen_s, "peak_gib": peak,
            "finite": all(v == v and abs(v) < 1e6 for v in losses.values())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", choices=sorted(RECIPES), default=None,
                    help="default on CPU, competition on CUDA")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per mode")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile modes")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    recipe = args.recipe or ("competition" if device.type == "cuda" else "default")
    p = configure(recipe)
    steps = args.steps or (20 if device.type == "cuda" else 5)
    out = Path(os.environ.get("OUT", "bench-out"))
    out.mkdir(parents=True, exist_ok=True)
    torch.backends.cudnn.benchmark = True

    modes = [("fp32", None, False, False), ("fp32+channels_last", None, True, False),
             ("bf16", torch.bfloat16, False, False), ("bf16+channels_last", torch.bfloat16, True, False)]
    if device.type == "cuda" and not args.no_compile:
        modes.append(("bf16+channels_last+compile", torch.bfloat16, True, True))
    where = torch.cuda.get_device_name() if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    header = (f"torch {torch.__version__}, {where}; recipe {recipe}: {p.image_size} px, {p.train.generator} "
              f"f{p.train.gen_filters}/{p.train.resnet_blocks} blocks, D f{p.train.disc_filters}, "
              f"batch {p.train.batch_size}")
    print(header, flush=True)
    rows = []
    for name, dtype, cl, comp in modes:
        try:
            r = bench_mode(p, device, dtype, cl, comp, steps, warmup=3 if comp else 2)
        except Exception as e:  # a mode that fails on this machine is reported, not hidden
            r = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:80]}"}
        rows.append((name, r))
        print(name, r, flush=True)

    ref = rows[0][1]
    lines = [header, f"{'mode':<28} {'train img/s':>11} {'x fp32':>7} {'gen img/s':>10} {'x fp32':>7} {'peak GiB':>9}"]
    for name, r in rows:
        if "error" in r:
            lines.append(f"{name:<28} {r['error']}")
            continue
        lines.append(f"{name:<28} {r['train_img_s']:>11.1f} {r['train_img_s'] / ref['train_img_s']:>7.2f} "
                     f"{r['gen_img_s']:>10.1f} {r['gen_img_s'] / ref['gen_img_s']:>7.2f} {r['peak_gib']:>9.2f}"
                     f"{'' if r['finite'] else '  NON-FINITE LOSS'}")
    (out / "train_step.txt").write_text("\n".join(lines) + "\n")
    print("\n" + "\n".join(lines))


if __name__ == "__main__":
    main()
