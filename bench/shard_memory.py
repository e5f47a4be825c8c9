"""Peak memory of the stages that read the image shards: memory-mapped (how the pipeline opens
them, `torch.load(..., mmap=True)`) against read whole (the same code with mmap off), in one run.

    python bench/shard_memory.py --repo DIR    # a repository after `dvc repro` (data/, models/)

generate and evaluate run as dvc.yaml runs them, writing to a temp folder; for train, its
loading of the shards (both domains resized to image_size; training itself holds only those).
Each runs in its own process; the peak is the largest resident set of it and its children.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ingest import measured  # noqa: E402  (bench/ingest.py: a command's time and peak RSS)

# runs the Python code in argv[2] with torch.load's mmap forced on or off (argv[1])
RUN = ("import sys, torch; real = torch.load; "
       "torch.load = lambda *a, **k: real(*a, **{**k, 'mmap': sys.argv[1] == 'mmap'}); exec(sys.argv[2])")
LOAD_FOR_TRAIN = ("from pipeline import shards; from pipeline.params import load; "
                  "p = load('params.yaml'); m = shards.read_manifest('data/manifest.csv'); "
                  "[shards.load_domain('data/shards', m, d, p.image_size) for d in ('photo', 'monet')]")


def stage(module: str, *args: str) -> str:
    """Code that runs `python -m module args`."""
    return f"import runpy; sys.argv = {[module, *args]!r}; runpy.run_module({module!r}, run_name='__main__')"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repo", type=Path, required=True)
    args = ap.parse_args()
    repo = args.repo.resolve()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        stages = {
            "train (loading the shards)": lambda mode: LOAD_FOR_TRAIN,
            "generate": lambda mode: stage("pipeline.generate", "--shards", "data/shards", "--manifest",
                                           "data/manifest.csv", "--generator", "models/photo2monet.pt",
                                           "--out", str(tmp / f"generated-{mode}")),
            "evaluate": lambda mode: stage("pipeline.evaluate", "--shards", "data/shards", "--manifest",
                                           "data/manifest.csv", "--images", "data/generated", "--generator",
                                           "models/photo2monet.pt", "--out", str(tmp / f"e-{mode}.json"),
                                           "--memorization", str(tmp / f"m-{mode}.png"),
                                           "--features-cache", str(tmp / f"features-{mode}")),
        }
        for name, command in stages.items():
            whole, mapped = (measured([sys.executable, "-c", RUN, mode, command(mode)], repo)
                             for mode in ("whole", "mmap"))
            for r in (whole, mapped):
                assert r["rc"] == 0, f"{name} failed: {r['last_line']}"
            rows.append((name, whole, mapped))
    print(f"\n{'stage':<28} {'whole GiB':>9} {'mmap GiB':>9} {'ratio':>6} {'whole s':>8} {'mmap s':>7}")
    for name, whole, mapped in rows:
        print(f"{name:<28} {whole['gib']:>9.3f} {mapped['gib']:>9.3f} {mapped['gib'] / whole['gib']:>6.3f} "
              f"{whole['s']:>8.1f} {mapped['s']:>7.1f}")


if __name__ == "__main__":
    main()
