"""Peak memory of the stages that read the image shards: memory-mapped (how the pipeline opens
them, `torch.load(..., mmap=True)`) against read whole (the same code with mmap off), in one run.

    python bench/shard_memory.py --repo DIR    # a repository after `dvc repro` (data/, models/)

generate and evaluate run as dvc.yaml runs them, writing to a temp folder; for train, its
loading of the shards (both domains resized to image_size; training itself holds only those).
Each runs in its own process; the peak is the largest resident set of it and its children.
DIR is only read: the stages run in a temp folder that links to its code, params, data and
models, and each mode logs into a throwaway MLflow store of its own, so the repository's store
and .cache/ are left as they are.
"""
from __future__ import annotations

import argparse
import os
import subprocess
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


NEEDS = ("params.yaml", "pipeline", "data/manifest.csv", "data/shards", "data/generated", "models/photo2monet.pt")


def repository(text: str) -> Path:
    """--repo: a repository after `dvc repro`."""
    repo = Path(text).resolve()
    if not repo.is_dir():
        raise argparse.ArgumentTypeError(f"{repo}: no such folder")
    missing = next((need for need in NEEDS if not (repo / need).exists()), None)
    if missing:
        raise argparse.ArgumentTypeError(f"{repo}: no {missing} (a repository after `dvc repro`)")
    return repo


def workspace(repo: Path, tmp: Path) -> Path:
    """A folder for the stages that links to `repo`'s files (their .cache/ is not the repository's).
    No dvc.yaml nor dvc.lock in it: the stages then look for no earlier results to copy into their
    MLflow row, a check that hashes the shards (1.5 GB) in the first mode's run only, the second
    finding the hashes kept."""
    work = tmp / "repo"
    work.mkdir()
    for name in ("params.yaml", "pipeline", "data", "models"):
        (work / name).symlink_to(repo / name)
    return work


def environment(repo: Path, store: Path) -> dict:
    """The stages' environment: their rows go to a new MLflow store at `store`, one per mode, so
    that both modes do the same MLflow work (the first row of a store, its experiment made)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    # DVC_ROOT, as under dvc repro: relative paths in params.yaml (evaluate.weights) name the repository's files
    # no .pyc written: the stages import DIR's own pipeline/ through a link
    env.update(MLFLOW_TRACKING_URI=f"sqlite:///{store}", DVC_ROOT=str(repo), PYTHONDONTWRITEBYTECODE="1")
    # the store's tables made here, untimed: that takes seconds, and only the first stage to log would pay them
    subprocess.run([sys.executable, "-c", "import mlflow; mlflow.MlflowClient().search_experiments()"],
                   env=env, capture_output=True, check=True)
    return env


def stage(module: str, *args: str) -> str:
    """Code that runs `python -m module args`."""
    return f"import runpy; sys.argv = {[module, *args]!r}; runpy.run_module({module!r}, run_name='__main__')"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repo", type=repository, required=True, metavar="DIR", help="a repository after `dvc repro`")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        work = workspace(args.repo, tmp)
        envs = {mode: environment(args.repo, tmp / f"mlflow-{mode}.db") for mode in ("whole", "mmap")}
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
            whole, mapped = (measured([sys.executable, "-c", RUN, mode, command(mode)], work, envs[mode])
                             for mode in ("whole", "mmap"))
            for mode, r in (("whole", whole), ("mmap", mapped)):
                if r["rc"] != 0:
                    raise SystemExit(f"error: {name} ({mode}) failed: {r['last_line']}")
            rows.append((name, whole, mapped))
    print(f"\n{'stage':<28} {'whole GiB':>9} {'mmap GiB':>9} {'ratio':>6} {'whole s':>8} {'mmap s':>7}")
    for name, whole, mapped in rows:
        print(f"{name:<28} {whole['gib']:>9.3f} {mapped['gib']:>9.3f} {mapped['gib'] / whole['gib']:>6.3f} "
              f"{whole['s']:>8.1f} {mapped['s']:>7.1f}")


if __name__ == "__main__":
    main()
