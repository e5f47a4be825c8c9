"""The GPU check: training and generation throughput of the pipeline's own code paths, each as a
ratio against a reference measured in the same run. Needs only torch (+ pyyaml, pillow, pandas,
numpy, tqdm): no dvc, mlflow or tfrecord, so it runs on a bare GPU machine; the evaluate rows also
need pytorch-fid (a 15 kB wheel: `pip install pytorch-fid==0.3.0`).

    python bench/train_step.py                        # CPU: the default recipe (params.yaml)
    python bench/train_step.py --recipe competition   # the README's competition command (the CUDA default)
    python bench/train_step.py --generate 7028        # also generate + package that many images
    python bench/train_step.py --evaluate 7028        # also the evaluate stage on that many sample photos

Training rows, in pairs (photo + painting) per second:
- reference: the reference CycleGAN implementation's recipe on the same networks: fp32, eager,
  batch 1, each batch copied from the host, `.item()` on every loss after every step, each batch
  through a network in a call of its own (`one_call_per_batch`), a resize upsampling computed at
  the doubled size (nearest 2×, pad, 3×3 conv: `direct_resize`);
- pipeline: the train stage's step as the recipe configures it (batch size, precision `auto`,
  channels_last, compile), images resident on the device, losses read every `log_every` steps;
- one row per precision / memory-format mode of that step, to see what each buys; where the recipe
  compiles, also compiled without channels_last, and on CUDA compiled with CUDA graphs
  (`mode="reduce-overhead"`, which the train stage does not use): candidates for the GPU recipe.
Generation: the generate stage's `generate()` and package's check and zip over synthetic photos,
against the implementation they replaced (sequential JPEG encoding, F.interpolate's bicubic,
large float temporaries, resize upsampling at the doubled size), kept below as `reference_generate`.
Evaluation (`--evaluate N`, which also needs pytorch-fid, the extractor's graph; without it the
table says so): the evaluate stage of the default recipe (offline extractor) on the
first N photos of the embedded sample, each run a fresh process (imports included; MLflow and DVC
left out, which this machine may not have): first with the features cache empty, then with it
kept; on CUDA the first run on the CPU is the reference.

Writes its log and the table under $OUT, else under a new temp folder (never into the working
tree; the output names it); prints the table last.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from unittest import mock

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
import yaml
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
NAME = 50  # width of the table's first column
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
import argtypes  # noqa: E402
import readme_recipes  # noqa: E402
from pipeline import cyclegan, generator_file, sample, shards  # noqa: E402
from pipeline.cyclegan import LossMeter, Trainer, build_nets  # noqa: E402
from pipeline.errors import PipelineError  # noqa: E402
from pipeline.generate import generate  # noqa: E402
from pipeline.networks import ResizeConv2d, to_model_input  # noqa: E402
from pipeline.package import check_images, write_zip  # noqa: E402
from pipeline.params import Params, parse, read_file  # noqa: E402
from pipeline.runtime import autocast, autocast_dtype, place  # noqa: E402


def recipe(name: str, device: torch.device) -> Params:
    """params.yaml, with the README's command `name` applied ("default": as committed)."""
    raw = read_file(ROOT / "params.yaml")
    if name != "default":
        raw = readme_recipes.apply(raw, {**readme_recipes.overrides(name), "device": device.type})
    return parse(raw)


def direct_resize(net: torch.nn.Module) -> torch.nn.Module:
    """`net` computing each resize upsampling the direct way, as the reference implementation
    would: nearest 2×, reflection pad, 3×3 conv at the doubled size (the same function)."""
    for m in net.modules():
        if isinstance(m, ResizeConv2d):
            m.at_input_size = False
    return net


def one_call_per_batch(net: torch.nn.Module, *batches: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The reference implementation's way where the train step calls `cyclegan.together`."""
    return tuple(net(b) for b in batches)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def pairs_per_second(p: Params, device: torch.device, dtype, reference: bool, steps: int, warmup: int,
                     graphs: bool = False) -> dict:
    """Time `steps` training steps (after `warmup`); the reference reads every loss every step.
    `graphs`: compiled with CUDA graphs instead of the train stage's default mode."""
    t = p.train
    torch.manual_seed(0)
    if graphs:
        nets = build_nets(p).map(lambda m: torch.compile(place(m, device, t.channels_last), dynamic=False,
                                                         mode="reduce-overhead"))
    else:
        nets = build_nets(p).map(lambda m: place(direct_resize(m) if reference else m, device, t.channels_last,
                                                 t.compile))
    trainer = Trainer(nets, p, device, dtype)
    data = torch.randint(0, 256, (64, p.image_size, p.image_size, 3), dtype=torch.uint8)
    gen = torch.Generator().manual_seed(0)
    if not reference:  # the train stage keeps the images on the device and draws batches there
        data, gen = data.to(device), torch.Generator(device).manual_seed(0)
    meter = LossMeter(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with mock.patch.object(cyclegan, "together", one_call_per_batch if reference else cyclegan.together):
        seconds = timed_steps(trainer, data, gen, meter, t.log_every, reference, steps, warmup, device, graphs)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    return {"pairs_s": t.batch_size / seconds, "peak_gib": peak}


def timed_steps(trainer: Trainer, data: torch.Tensor, gen: torch.Generator, meter: LossMeter, log_every: int,
                reference: bool, steps: int, warmup: int, device: torch.device, graphs: bool = False) -> float:
    """Seconds per training step, over `steps` steps after `warmup`."""
    for i in range(warmup + steps):
        if i == warmup:
            sync(device)
            start = time.perf_counter()
        if graphs:  # a new step: the graphs may reuse the memory of the last step's outputs
            torch.compiler.cudagraph_mark_step_begin()
        losses = trainer.train_on(data, data, gen)
        if reference:
            losses = {k: v.item() for k, v in losses.items()}
        else:
            meter.add(i + 1, losses)
            if (i + 1) % log_every == 0:
                meter.check()
    if not reference:
        meter.check()
    sync(device)
    return (time.perf_counter() - start) / steps


def training_rows(p: Params, device: torch.device, steps: int, rounds: int, compile_ok: bool) -> list[tuple[str, dict]]:
    """The reference and the pipeline rows measured in turns, `rounds` times (the median is kept:
    a shared machine's speed drifts), then each mode once."""
    fp32, bf16 = None, torch.bfloat16
    auto = autocast_dtype(p.precision, device)
    ref_p = dataclasses.replace(p, train=dataclasses.replace(p.train, batch_size=1, channels_last=False, compile=False))
    pipeline_p = p if compile_ok else dataclasses.replace(p, train=dataclasses.replace(p.train, compile=False))
    plain = dataclasses.replace(p, train=dataclasses.replace(p.train, channels_last=False, compile=False))
    cl = dataclasses.replace(plain, train=dataclasses.replace(plain.train, channels_last=True))
    pipeline_name = (f"pipeline ({'bf16' if auto else 'fp32'}, batch {p.train.batch_size}"
                     f"{', channels_last' if p.train.channels_last else ''}"
                     f"{', compile' if pipeline_p.train.compile else ''})")
    runs = [("reference (fp32, batch 1, .item())", ref_p, fp32, True, rounds, False),
            (pipeline_name, pipeline_p, auto, False, rounds, False),
            ("fp32", plain, fp32, False, 1, False), ("fp32+channels_last", cl, fp32, False, 1, False),
            ("bf16", plain, bf16, False, 1, False), ("bf16+channels_last", cl, bf16, False, 1, False)]
    if pipeline_p.train.compile:  # what the recipe's compiled step might do better
        compiled = dataclasses.replace(plain, train=dataclasses.replace(plain.train, compile=True))
        runs.append(("bf16+compile", compiled, bf16, False, 1, False))
        if device.type == "cuda":
            runs.append(("bf16+channels_last+compile, CUDA graphs", pipeline_p, bf16, False, 1, True))
    results: dict[str, list[dict]] = {name: [] for name, *_ in runs}
    for round_ in range(rounds):
        for name, params, dtype, reference, repeats, graphs in runs:
            if round_ >= repeats:
                continue
            warmup = 5 if params.train.compile else 2
            try:
                r = pairs_per_second(params, device, dtype, reference, steps, warmup, graphs)
            except Exception as e:  # a mode that fails on this machine is reported, not hidden
                r = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:80]}"}
            print(name, r, flush=True)
            results[name].append(r)
    rows = []
    for name, rs in results.items():
        ok = sorted([r for r in rs if "error" not in r] or rs, key=lambda r: r.get("pairs_s", 0))
        rows.append((name, ok[len(ok) // 2]))
    return rows


def synthetic_photos(folder: Path, count: int) -> tuple[Path, Path]:
    """Shards and manifest of `count` random 256×256 photos, as ingest writes them."""
    g = torch.Generator().manual_seed(0)
    base = torch.randint(0, 256, (64, 256, 256, 3), dtype=torch.uint8, generator=g)

    def items():
        for i in range(count):
            yield {"image_name": f"p{i:05d}", "tfrecord": "synthetic", "record": i}, base[i % 64].roll(i, 0).numpy()

    rows = shards.write_domain(items(), folder / "shards", "photo", shard_size=1024)
    pd.DataFrame(rows, columns=shards.MANIFEST_COLUMNS).to_csv(folder / "manifest.csv", index=False)
    return folder / "shards", folder / "manifest.csv"


def reference_generate(shards_dir: Path, manifest_path: Path, generator_path: Path, out: Path,
                       device: torch.device, precision: str, batch_size: int, quality: int) -> int:
    """The generate stage as it was before it was made faster: the same images, made sequentially
    (under the same autocast as the stage, so that the rows compare the implementations)."""
    ctx = autocast(device, autocast_dtype(precision, device))
    net, config = generator_file.load(generator_path, device)
    direct_resize(net)
    manifest = shards.read_manifest(manifest_path)
    out.mkdir(parents=True)
    count = 0
    with torch.no_grad():
        for names, photos in shards.iter_domain(shards_dir, manifest, "photo"):
            photos = photos.clone()  # it loaded shards whole into memory
            for k in range(0, len(photos), batch_size):
                chunk = photos[k:k + batch_size]
                small = []
                for part in chunk.split(256):
                    x = F.interpolate(part.permute(0, 3, 1, 2).float(), size=(config["image_size"],) * 2,
                                      mode="bilinear", antialias=True, align_corners=False)
                    small.append(x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous())
                with ctx():
                    y = net(to_model_input(torch.cat(small), device)).float()
                if config["image_size"] != 256:
                    y = F.interpolate(y, size=(256, 256), mode="bicubic", align_corners=False)
                pixels = ((y.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()
                for name, px in zip(names[k:k + batch_size], pixels):
                    buf = io.BytesIO()
                    Image.fromarray(px.numpy()).save(buf, format="JPEG", quality=quality)
                    (out / f"{name}.jpg").write_bytes(buf.getvalue())
                count += len(pixels)
    return count


def generation_rows(p: Params, device: torch.device, count: int, work: Path) -> list[tuple[str, dict]]:
    shards_dir, manifest = synthetic_photos(work, count)
    torch.manual_seed(0)
    generator_path = work / "generator.pt"
    config = generator_file.config_of(p)
    generator_file.save(generator_file.build(config), config, generator_path)
    rows = []
    for name, run in (("reference generate + package", reference_generate), ("pipeline generate + package", None)):
        out = work / name.split()[0]
        sync(device)
        start = time.perf_counter()
        if run:
            run(shards_dir, manifest, generator_path, out, device, p.precision, p.generate.batch_size,
                p.generate.jpeg_quality)
        else:
            generate(shards_dir, manifest, generator_path, out, device.type, p.precision, p.generate.batch_size,
                     p.generate.jpeg_quality)
        generate_s = time.perf_counter() - start
        write_zip(check_images(out, 1, 10**6), work / f"{name.split()[0]}.zip")
        rows.append((name, {"seconds": time.perf_counter() - start, "generate_s": generate_s}))
        print(name, rows[-1][1], flush=True)
    a, b = (sorted((work / d).iterdir()) for d in ("reference", "pipeline"))
    diffs = [np.abs(np.asarray(Image.open(x), dtype=float) - np.asarray(Image.open(y), dtype=float)).mean()
             for x, y in zip(a[:200], b[:200])]
    rows.append(("images: mean |pipeline - reference|", {"levels": sum(diffs) / len(diffs)}))
    return rows


def sample_data(folder: Path, seed: int, photos: int, paintings: int) -> tuple[Path, Path]:
    """Shards and manifest of the embedded sample as ingest makes them (rendered, then through a
    JPEG of quality 95 as its TFRecords hold them), without the tfrecord package."""
    from pipeline.evaluate import as_jpeg  # needs pytorch-fid (evaluation_rows checks)
    rows = []
    with ThreadPoolExecutor(os.cpu_count()) as pool:  # Pillow releases the GIL while it codes
        for domain, count, index in (("monet", paintings, sample.monet_index), ("photo", photos, sample.photo_index)):
            rendered = sample.render_parallel(seed, [index(i) for i in range(count)], domain)
            pixels = torch.cat(list(pool.map(lambda k: as_jpeg(rendered[k:k + 256], 95), range(0, count, 256))))
            items = (({"image_name": sample.sample_name(seed, domain, i), "tfrecord": "rendered", "record": i},
                      px.numpy()) for i, px in enumerate(pixels))
            rows += shards.write_domain(items, folder / "shards", domain, shard_size=1024)
    pd.DataFrame(rows, columns=shards.MANIFEST_COLUMNS).to_csv(folder / "manifest.csv", index=False)
    return folder / "shards", folder / "manifest.csv"


# the evaluate stage's work, as `python -m pipeline.evaluate` does it, less the MLflow logging
EVALUATE_STAGE = """
import json, sys
from pathlib import Path
from pipeline.evaluate import evaluate
from pipeline.params import load
params, shards, manifest, images, cache, picture, out = map(Path, sys.argv[1:])
result, _ = evaluate(load(params), shards, manifest, images, cache, picture)
out.write_text(json.dumps(result))
"""


def evaluation_rows(device: torch.device, count: int, work: Path, log: Path) -> list[tuple[str, dict]]:
    if importlib.util.find_spec("pytorch_fid") is None:  # the extractor's graph is pytorch-fid's
        return [("evaluate stage", {"error": "not run: needs pytorch-fid (pip install pytorch-fid==0.3.0)"})]
    raw = read_file(ROOT / "params.yaml")
    p = parse(raw)
    shards_dir, manifest = sample_data(work, p.seed, count, p.ingest.sample_paintings)
    torch.manual_seed(0)  # the images' quality does not change the stage's work: a fresh generator
    generator_path = work / "generator.pt"
    config = generator_file.config_of(p)
    generator_file.save(generator_file.build(config), config, generator_path)
    generate(shards_dir, manifest, generator_path, work / "generated", device.type, p.precision,
             p.generate.batch_size, p.generate.jpeg_quality)
    runs = [("first (features cache empty)", device.type, "cache"), ("cached (paintings, photos, truth)", device.type, "cache")]
    if device.type == "cuda":
        runs.insert(0, (f"first, on the CPU ({os.cpu_count()} cores)", "cpu", "cpu-cache"))
    rows = []
    for name, where, cache in runs:
        params = work / f"params-{where}.yaml"
        params.write_text(yaml.safe_dump({**raw, "device": where}, sort_keys=False))
        out = work / f"evaluate-{where}.json"
        args = [params, shards_dir, manifest, work / "generated", work / cache, work / "memorization.png", out]
        start = time.perf_counter()
        with open(log, "a") as f:
            f.write(f"\n== evaluate: {name}\n")
            f.flush()
            done = subprocess.run([sys.executable, "-c", EVALUATE_STAGE, *map(str, args)], cwd=ROOT, stdout=f,
                                  stderr=subprocess.STDOUT)
        seconds = time.perf_counter() - start
        if done.returncode:
            rows.append((name, {"error": f"exit {done.returncode}, see {log.name}"}))
        else:
            result = json.loads(out.read_text())
            rows.append((name, {"seconds": seconds, "fid_vs_ground_truth": result["fid_vs_ground_truth"]}))
        print(name, rows[-1][1], flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default=None, choices=["default", *readme_recipes.recipes()],
                    help="default (params.yaml) or a README command's name; default on CPU, competition on CUDA")
    ap.add_argument("--steps", type=argtypes.positive_int, default=None,
                    help="timed training steps per row (default 30 on CUDA, 5 on the CPU)")
    ap.add_argument("--generate", type=argtypes.count, default=None, metavar="N",
                    help="also time generate + package of N photos (CUDA default 7028, CPU default 0: none)")
    ap.add_argument("--evaluate", type=argtypes.count, default=None, metavar="N",
                    help="also time the evaluate stage on N sample photos (CUDA default 7028, CPU default 0: none)")
    ap.add_argument("--rounds", type=argtypes.positive_int, default=3,
                    help="turns of reference and pipeline rows (median kept)")
    ap.add_argument("--no-compile", action="store_true", help="the pipeline row without torch.compile")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as the train stage sets it (for every row, the reference too)
    name = args.recipe or ("competition" if device.type == "cuda" else "default")
    try:
        p = recipe(name, device)
    except PipelineError as error:  # params.yaml invalid: the stages' one line
        raise SystemExit(f"error: {error}") from None
    steps = args.steps if args.steps is not None else (30 if device.type == "cuda" else 5)
    count = args.generate if args.generate is not None else (7028 if device.type == "cuda" else 0)
    evaluate_count = args.evaluate if args.evaluate is not None else (7028 if device.type == "cuda" else 0)
    out = Path(os.environ["OUT"]) if os.environ.get("OUT") else Path(tempfile.mkdtemp(prefix="train-step-"))
    out.mkdir(parents=True, exist_ok=True)
    print(f"log and table: {out}", flush=True)
    where = torch.cuda.get_device_name() if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    t = p.train
    header = (f"torch {torch.__version__}, {where}; recipe {name}: {p.image_size} px, {t.generator} "
              f"f{t.gen_filters}/{t.resnet_blocks} blocks, D f{t.disc_filters}, batch {t.batch_size}")
    print(header, flush=True)
    train = training_rows(p, device, steps, args.rounds, compile_ok=not args.no_compile)
    ref = train[0][1].get("pairs_s")
    lines = [header, f"{'training step':<{NAME}} {'pairs/s':>9} {'x ref':>7} {'peak GiB':>9}"]
    for row_name, r in train:
        lines.append(f"{row_name:<{NAME}} {r['error']}" if "error" in r else
                     f"{row_name:<{NAME}} {r['pairs_s']:>9.2f} {r['pairs_s'] / ref:>7.2f} {r['peak_gib']:>9.2f}")
    if count:
        work = Path(tempfile.mkdtemp(prefix="bench-generate-"))
        try:
            gen = generation_rows(p, device, count, work)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        ref_s = gen[0][1]["seconds"]
        lines.append(f"{f'generate + package, {count} images':<{NAME}} {'seconds':>9} {'x ref':>7} {'generate':>9}")
        for row_name, r in gen[:2]:
            lines.append(f"{row_name:<{NAME}} {r['seconds']:>9.1f} {ref_s / r['seconds']:>7.2f} {r['generate_s']:>9.1f}")
        lines.append(f"{gen[2][0]:<{NAME}} {gen[2][1]['levels']:>9.3f}")
    if evaluate_count:
        work = Path(tempfile.mkdtemp(prefix="bench-evaluate-"))
        try:
            ev = evaluation_rows(device, evaluate_count, work, out / "evaluate.log")
        finally:
            shutil.rmtree(work, ignore_errors=True)
        ref_s = ev[0][1].get("seconds")
        lines.append(f"{f'evaluate stage, default recipe, {evaluate_count} photos':<{NAME}} {'seconds':>9} {'/ ref':>7} "
                     f"{'fid/gt':>9}")
        for row_name, r in ev:
            lines.append(f"{row_name:<{NAME}} {r['error']}" if "error" in r else
                         f"{row_name:<{NAME}} {r['seconds']:>9.1f} {r['seconds'] / ref_s if ref_s else float('nan'):>7.2f} "
                         f"{r['fid_vs_ground_truth']:>9.3f}")
    (out / "train_step.txt").write_text("\n".join(lines) + "\n")
    print("\n" + "\n".join(lines))


if __name__ == "__main__":
    main()
