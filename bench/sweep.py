"""Benchmark a queued sweep: two experiments on two workers against the same two one after the other.

    python bench/sweep.py [--threads N] [--keep DIR]

Clones this repository's HEAD into a temp folder, sets a smaller recipe in params.yaml (so the
bench takes minutes) and runs its ingest once, so that both ways start from cached data. Then
runs `dvc exp run -S lambda_cycle=3` and `=5` one after the other (the reference), and queues
`lambda_cycle=4,6` and runs them with `dvc queue start -j 2` (other values: DVC's run cache
would restore known results instead of running). Prints the wall times, the ratio queued / one
after the other (below 1.0: the sweep gains), and checks that each of the four experiments made
one finished MLflow row: where one did not, its last line says so and it exits with status 1.
`--threads N` starts the queue's workers with OMP_NUM_THREADS=N (each experiment's share of the
cores); by default they get PyTorch's default, every core each.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import argtypes  # noqa: E402
SMALL = {"ingest": {"sample_photos": 1024, "sample_paintings": 300},
         "train": {"epochs": 2, "steps_per_epoch": 32, "decay_from_epoch": 1},
         "evaluate": {"baseline_images": 256, "kid_subset_size": 256},
         "package": {"min_images": 1000}}


def rows_problem(db: Path) -> str | None:
    """The error line where the experiments (lambda_cycle 3 and 5, then 4 and 6 queued) did not
    make one finished MLflow row each; None where they did."""
    if not db.is_file():
        return f"error: no MLflow store at {db}: the experiments logged nothing"
    with contextlib.closing(sqlite3.connect(f"{db.as_uri()}?mode=ro", uri=True)) as con:
        finished = dict(con.execute("select p.value, count(*) from runs r join params p on p.run_uuid = r.run_uuid "
                                    "where p.key = 'lambda_cycle' and r.status = 'FINISHED' group by p.value"))
    if finished != {"3": 1, "4": 1, "5": 1, "6": 1}:
        return f"error: not one finished MLflow row per experiment; finished rows per lambda_cycle: {finished}"
    return None


def dvc(repo: Path, env: dict, *args: str) -> str:
    res = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=repo, env=env, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"dvc {' '.join(args)} failed:\n{res.stdout[-2000:]}\n{res.stderr[-2000:]}")
    return res.stdout


def timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--keep", type=argtypes.keep_folder, metavar="DIR",
                    help="clone into DIR/repo and keep it (default: a temp folder, removed)")
    ap.add_argument("--threads", type=argtypes.positive_int,
                    help="OMP_NUM_THREADS for the queued experiments (default: unset)")
    args = ap.parse_args()
    work = args.keep or Path(tempfile.mkdtemp(prefix="sweep-bench-"))
    repo = work / "repo"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    env.update(GIT_AUTHOR_NAME="bench", GIT_AUTHOR_EMAIL="bench@localhost", GIT_COMMITTER_NAME="bench",
               GIT_COMMITTER_EMAIL="bench@localhost")
    try:
        if subprocess.run(["git", "clone", "-q", str(ROOT), str(repo)]).returncode:
            raise SystemExit(f"error: git clone of {ROOT} into {repo} failed (its message above)")
        params = yaml.safe_load((repo / "params.yaml").read_text())
        for section, values in SMALL.items():
            params[section].update(values)
        (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        subprocess.run(["git", "commit", "-qam", "bench: smaller recipe"], cwd=repo, env=env, check=True)
        dvc(repo, env, "repro", "ingest")  # cached: every experiment restores it

        one_after_other = sum(timed(lambda c=c: dvc(repo, env, "exp", "run", "-S", f"lambda_cycle={c}")) for c in (3, 5))
        dvc(repo, env, "exp", "run", "--queue", "-S", "lambda_cycle=4,6")

        def queued() -> None:
            # the workers' output to a file, not to a pipe of ours: a worker that outlives its queue
            # (DVC's do, now and then) would hold the pipe open, and subprocess.run would wait forever
            with open(work / "queue.log", "ab") as log:
                subprocess.run([sys.executable, "-m", "dvc", "queue", "start", "-j", "2"], cwd=repo, check=True,
                               env={**env, "OMP_NUM_THREADS": str(args.threads)} if args.threads else env,
                               stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
            while True:
                status = dvc(repo, env, "queue", "status")
                finished = status.count("Success") + status.count("Failed")
                if finished >= 2 and "Queued" not in status and "Running" not in status:
                    break
                time.sleep(2)
            if status.count("Success") != 2:
                raise SystemExit(f"queued experiments failed:\n{status}")

        parallel = timed(queued)
        problem = rows_problem(repo / "mlflow.db")
        if args.keep:
            print(f"\nrepo: {repo}")
        if not problem:  # else the last line says what is wrong
            print("MLflow rows: one finished row per experiment")
        print(f"\n{'way':<40} {'seconds':>8} {'ratio':>6}")
        print(f"{'two experiments one after the other':<40} {one_after_other:>8.1f} {1.0:>6.3f}")
        way = f"two queued, -j 2, OMP_NUM_THREADS={args.threads or 'unset'}"
        print(f"{way:<40} {parallel:>8.1f} {parallel / one_after_other:>6.3f}")
        if problem:
            raise SystemExit(problem)
    finally:  # a failed step too (its message says which): its clone, DVC cache and store are gigabytes
        if not args.keep:
            if (repo / ".dvc").is_dir():  # queue workers still training in it (a failure or ^C while they ran)
                subprocess.run([sys.executable, "-m", "dvc", "queue", "stop", "--kill"], cwd=repo, env=env,
                               capture_output=True)
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
