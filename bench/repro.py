"""Benchmark the default pipeline as a newcomer runs it: `dvc repro` in a fresh clone.

    python bench/repro.py [--keep DIR]

Clones this repository's HEAD into a temp folder (set-up excluded: it uses the installed
packages), runs `dvc repro` twice, and prints each stage's time, the peak memory of the largest
process, and the quality line, each as a ratio against its budget from the issue:
10 min and 4 GiB for the first repro, 10 s for the second, fid/fid_identity <= 0.70.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUDGETS = {"repro_s": 600.0, "peak_gib": 4.0, "second_repro_s": 10.0, "fid_vs_identity": 0.70}


def run_timed(cmd: list[str], cwd: Path, env: dict, log: Path) -> tuple[float, list[tuple[str, float]]]:
    """Run cmd, stream its output to `log`, and time each 'Running stage' section."""
    stages, started = [], time.perf_counter()
    last = (None, started)
    with open(log, "a") as out:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in proc.stdout:
            out.write(line)
            m = re.match(r"Running stage '(\w+)'", line)
            if m:
                now = time.perf_counter()
                if last[0]:
                    stages.append((last[0], now - last[1]))
                last = (m.group(1), now)
        if proc.wait() != 0:
            raise SystemExit(f"{' '.join(cmd)} failed; see {log}")
    total = time.perf_counter() - started
    if last[0]:
        stages.append((last[0], time.perf_counter() - last[1]))
    return total, stages


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--keep", type=Path, help="clone here and keep it (default: a temp folder, removed)")
    args = ap.parse_args()
    work = args.keep or Path(tempfile.mkdtemp(prefix="repro-bench-"))
    clone = work / "repo"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    env["TORCH_HOME"] = str(work / "torch-home")  # no cached FID weights: what a new machine has
    env["PYTHONUNBUFFERED"] = "1"  # stage lines arrive as they happen, so the stage timings hold
    log = work / "repro.log"

    first, stages = run_timed([sys.executable, "-m", "dvc", "repro"], clone, env, log)
    peak_gib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
    second, _ = run_timed([sys.executable, "-m", "dvc", "repro"], clone, env, log)
    metrics = json.loads((clone / "metrics/evaluate.json").read_text())

    print(f"\nlog: {log}")
    print(f"{'stage':<10} {'seconds':>8}")
    for name, seconds in stages:
        print(f"{name:<10} {seconds:>8.1f}")
    rows = [("first dvc repro (s)", first, BUDGETS["repro_s"]),
            ("peak RSS, largest process (GiB)", peak_gib, BUDGETS["peak_gib"]),
            ("second dvc repro (s)", second, BUDGETS["second_repro_s"]),
            ("fid / fid_identity", metrics["fid_vs_identity"], BUDGETS["fid_vs_identity"])]
    print(f"\n{'measure':<34} {'value':>9} {'budget':>8} {'ratio':>6}")
    for name, value, budget in rows:
        print(f"{name:<34} {value:>9.4g} {budget:>8.2f} {value / budget:>6.3f}{'' if value <= budget else '  OVER'}")
    print(f"\nfid {metrics['fid']:.2f}, fid_identity {metrics['fid_identity']:.2f}, mifid {metrics['mifid']:.2f}, "
          f"pair_l1 {metrics.get('pair_l1', float('nan')):.4f} (identity {metrics.get('pair_l1_identity', float('nan')):.4f})"
          f"\nextractor: {metrics['feature_extractor']}")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
