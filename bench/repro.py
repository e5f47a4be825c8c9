"""Benchmark the default pipeline as a newcomer runs it: `dvc repro` in a fresh clone.

    python bench/repro.py [--keep DIR]

Clones this repository's HEAD into a temp folder (set-up excluded: it uses the installed
packages) and runs `dvc repro --force` (every stage runs: the pipeline is deterministic on the
CPU, so where the committed dvc.lock came from this very code, a plain `dvc repro` rebuilds the
model and images to the same bytes and then skips evaluate, whose outputs are in git), then
`dvc repro`, then the evaluate stage four more times (`dvc repro -f -s evaluate`), alternately
with the features cache emptied and kept (kept: the reference images' features come from the
cache, the generated ones are extracted again, as for a new model). Prints each stage's time,
the peak memory of the largest process, and the quality line, each as a ratio against its
budget: 10 min and 4 GiB for the first repro, 10 s for the second, 90 s for evaluate (in the
first repro), 0.8 for the median cached evaluate against the median with the cache emptied (at
least 20% faster), the sample's yardstick fid_vs_ground_truth (1.0 = as good as a perfect
translation) against 1.15, and the time the stages spent in MLflow calls (each prints it) as a
share of the first repro against 5%.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import argtypes  # noqa: E402
BUDGETS = {"repro_s": 600.0, "peak_gib": 4.0, "second_repro_s": 10.0, "evaluate_s": 90.0, "cached_evaluate": 0.8,
           "fid_vs_ground_truth": 1.15, "logging_share": 0.05}
ROUNDS = 2  # evaluations with the features cache emptied and kept, alternated
LOGGED = re.compile(r"^(\w+): logged to \S+ in ([0-9.]+) s")  # each logging stage's last MLflow line


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
    ap.add_argument("--keep", type=argtypes.keep_folder, metavar="DIR",
                    help="clone into DIR/repo and keep it (default: a temp folder, removed)")
    args = ap.parse_args()
    work = args.keep or Path(tempfile.mkdtemp(prefix="repro-bench-"))
    clone = work / "repo"
    if subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)]).returncode:
        raise SystemExit(f"error: git clone of {ROOT} into {clone} failed (its message above)")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    env["TORCH_HOME"] = str(work / "torch-home")  # no cached FID weights: what a new machine has
    env["PYTHONUNBUFFERED"] = "1"  # stage lines arrive as they happen, so the stage timings hold
    log = work / "repro.log"

    first, stages = run_timed([sys.executable, "-m", "dvc", "repro", "--force"], clone, env, log)
    logging_s = sum(float(m.group(2)) for m in map(LOGGED.match, log.read_text().splitlines()) if m)
    peak_gib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
    second, _ = run_timed([sys.executable, "-m", "dvc", "repro"], clone, env, log)
    metrics = json.loads((clone / "metrics/evaluate.json").read_text())
    evaluate_s = dict(stages)["evaluate"]
    # The cached line: the evaluate stage with the features cache emptied (a first evaluation) and
    # kept (a second one, as for a new model), alternated ROUNDS times, so both are measured in the
    # same state of this shared machine. Each time is the stage's own section of DVC's output.
    def evaluate_again() -> float:
        _, again = run_timed([sys.executable, "-m", "dvc", "repro", "-f", "-s", "evaluate"], clone, env, log)
        return dict(again)["evaluate"]

    emptied, cached = [], []
    for _ in range(ROUNDS):
        shutil.rmtree(clone / ".cache" / "features")
        emptied.append(evaluate_again())
        cached.append(evaluate_again())

    print(f"\nlog: {log}")
    print(f"{'stage':<10} {'seconds':>8}")
    for name, seconds in stages:
        print(f"{name:<10} {seconds:>8.1f}")
    print(f"evaluate, features cache emptied: {', '.join(f'{t:.1f}' for t in emptied)} s; "
          f"cached: {', '.join(f'{t:.1f}' for t in cached)} s")
    rows = [("first dvc repro (s)", first, BUDGETS["repro_s"]),
            ("peak RSS, largest process (GiB)", peak_gib, BUDGETS["peak_gib"]),
            ("second dvc repro (s)", second, BUDGETS["second_repro_s"]),
            ("evaluate (s)", evaluate_s, BUDGETS["evaluate_s"]),
            (f"evaluate, cached / emptied (x{ROUNDS})", statistics.median(cached) / statistics.median(emptied),
             BUDGETS["cached_evaluate"]),
            ("fid_vs_ground_truth", metrics["fid_vs_ground_truth"], BUDGETS["fid_vs_ground_truth"]),
            ("MLflow logging / first dvc repro", logging_s / first, BUDGETS["logging_share"])]
    print(f"\n{'measure':<34} {'value':>9} {'budget':>8} {'ratio':>6}")
    for name, value, budget in rows:
        print(f"{name:<34} {value:>9.4g} {budget:>8.2f} {value / budget:>6.3f}{'' if value <= budget else '  OVER'}")
    print(f"\nextractor {metrics['extractor']}: fid {metrics['fid']:.2f}, mifid {metrics['mifid']:.2f}, "
          f"kid {metrics['kid_mean']:.4g} ± {metrics['kid_std']:.2g}; on the first {metrics['baseline_images']} photos: "
          f"fid {metrics['fid_subset']:.2f}, ground truth {metrics['fid_ground_truth']:.2f}, untranslated "
          f"{metrics['fid_identity']:.2f}; pair_l1 {metrics['pair_l1']:.4f} (identity {metrics['pair_l1_identity']:.4f})")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
