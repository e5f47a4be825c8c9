"""The offline extractor's throughput on the CPU: `extract()` (one batch per core, each batch on
one thread) against the same folded network run batch after batch with every core on each batch
(how `extract` ran before), in turns `--rounds` times, medians; and how far their features differ.

    python bench/features.py                  # 2,048 images of 256 px, batches of 64, 2 rounds
    python bench/features.py --images 7028    # as many as the evaluate stage extracts

Random images: the network's cost does not depend on what they show. Prints its table last.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import argtypes  # noqa: E402
from pipeline.features import _to_input, extract, offline_extractor  # noqa: E402

CPU = torch.device("cpu")


def reference_extract(model: torch.nn.Module, images: torch.Tensor, batch_size: int) -> np.ndarray:
    """Batch after batch, every core on each (torch's default)."""
    with torch.inference_mode():
        return np.concatenate([model(_to_input(b, CPU)).double().numpy() for b in images.split(batch_size)])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=argtypes.positive_int, default=2048)
    ap.add_argument("--batch-size", type=argtypes.positive_int, default=64, help="evaluate.batch_size")
    ap.add_argument("--rounds", type=argtypes.positive_int, default=2)
    args = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    paintings = torch.randint(0, 256, (300, 256, 256, 3), dtype=torch.uint8, generator=g)
    images = torch.randint(0, 256, (args.images, 256, 256, 3), dtype=torch.uint8, generator=g)
    extractor = offline_extractor(paintings, 75, CPU, say=lambda s: None)
    model = extractor.runs.eval()
    runs = {"reference (every core on each batch)": lambda: reference_extract(model, images, args.batch_size),
            "extract (one batch per core, one thread each)": lambda: extract(extractor, images, args.batch_size, CPU,
                                                                            desc="extract")}
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    features = {}
    for _ in range(args.rounds):
        for name, run in runs.items():
            start = time.perf_counter()
            features[name] = run()
            seconds[name].append(time.perf_counter() - start)
            print(f"{name}: {args.images / seconds[name][-1]:.0f} img/s", flush=True)
    ref, new = features.values()
    rate = {name: args.images / statistics.median(s) for name, s in seconds.items()}
    ref_rate = next(iter(rate.values()))
    lines = [f"torch {torch.__version__}, {torch.get_num_threads()} cores; offline extractor (75 px), "
             f"{args.images} images, batches of {args.batch_size}, median of {args.rounds}",
             f"{'mode':<48} {'img/s':>7} {'x ref':>6}"]
    lines += [f"{name:<48} {r:>7.0f} {r / ref_rate:>6.2f}" for name, r in rate.items()]
    lines.append(f"{'features: max |difference| / max |feature|':<48} {np.abs(new - ref).max() / np.abs(ref).max():>7.1e}")
    print("\n" + "\n".join(lines))


if __name__ == "__main__":
    main()
