"""Check the README's MLflow UI walkthrough in headless Chromium, and take its screenshot.

    python bench/mlflow_ui.py [--repo DIR] [--screenshot docs/mlflow-compare.png]

Without --repo it clones this repository's HEAD into a temp folder and runs the README's two
experiments there, on a smaller recipe so it takes minutes (`dvc exp run -n cycle-5 -S
lambda_cycle=5`, then `cycle-10`). Then it starts `mlflow ui` on that store as the README says,
opens the README's address and checks that the page shows the experiment's training runs (MLflow's
model-training view), not its GenAI overview; opens the plain experiment address to show the
difference; and saves the comparison of the two runs (what ticking both and pressing Compare
opens) as the screenshot. Needs Debian's chromium (`apt-get install chromium`); prints a short
table last. Its temp folder (the clone, the UI's log, the browser's profiles) is removed at the
end; DIR's mlflow.db is read as it is (a DIR without one is refused, none is made).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["ingest.sample_photos=512", "ingest.sample_paintings=128", "train.epochs=2", "train.steps_per_epoch=24",
         "train.decay_from_epoch=1", "evaluate.baseline_images=256", "evaluate.kid_subset_size=128",
         "package.min_images=500"]
CHROMIUM = ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--hide-scrollbars", "--window-size=1400,1000"]
TRAINING_VIEW = "?workflowType=machine_learning"  # what the README's address ends with


def experiments(repo: Path, env: dict) -> None:
    if subprocess.run(["git", "clone", "-q", str(ROOT), str(repo)]).returncode:
        raise SystemExit(f"error: git clone of {ROOT} failed (its message above)")
    for name, cycle in (("cycle-5", 5), ("cycle-10", 10)):
        settings = [f"lambda_cycle={cycle}", *SMALL]
        if subprocess.run([sys.executable, "-m", "dvc", "exp", "run", "-n", name,
                           *[a for s in settings for a in ("-S", s)]], cwd=repo, env=env).returncode:
            raise SystemExit(f"error: dvc exp run -n {name} failed (its output above)")


def store(text: str) -> Path:
    """--repo: a folder with an mlflow.db."""
    repo = Path(text).resolve()
    if not (repo / "mlflow.db").is_file():
        raise argparse.ArgumentTypeError(f"{repo}: no mlflow.db there" if repo.is_dir() else f"{repo}: no such folder")
    return repo


def browser(args: list[str], profile: Path) -> str:
    res = subprocess.run([*CHROMIUM, f"--user-data-dir={profile}", "--virtual-time-budget=25000", *args],
                         capture_output=True, text=True, timeout=180)
    return res.stdout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repo", type=store, help="a repository whose mlflow.db holds runs named cycle-5 and cycle-10")
    ap.add_argument("--screenshot", type=Path, default=ROOT / "docs/mlflow-compare.png")
    args = ap.parse_args()
    if not shutil.which("chromium"):
        raise SystemExit("error: bench/mlflow_ui.py needs chromium (apt-get install chromium)")
    work = Path(tempfile.mkdtemp(prefix="mlflow-ui-"))
    try:
        walkthrough(args.repo, args.screenshot, work)
    finally:  # the clone, the UI's log and the browser's profiles
        shutil.rmtree(work, ignore_errors=True)


def walkthrough(repo: Path | None, screenshot: Path, work: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    shown = repo or "a clone of HEAD, in a temp folder (removed)"
    if repo is None:
        repo = work / "repo"
        experiments(repo, env)
    db = repo / "mlflow.db"
    with contextlib.closing(sqlite3.connect(f"{db.as_uri()}?mode=ro", uri=True)) as con:  # ro: never makes one
        exp = con.execute("select experiment_id from experiments where name = 'monet-cyclegan'").fetchone()
        runs = dict(con.execute("select name, run_uuid from runs where name in ('cycle-5', 'cycle-10') "
                                "and status = 'FINISHED' order by start_time"))
    if exp is None or len(runs) != 2:
        raise SystemExit(f"error: {db}: no finished runs named cycle-5 and cycle-10 in experiment monet-cyclegan")
    exp_id = exp[0]

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(work / "ui.log", "w")
    ui = subprocess.Popen(["mlflow", "ui", "--backend-store-uri", "sqlite:///mlflow.db", "--port", str(port)],
                          cwd=repo, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(180):
            try:
                urllib.request.urlopen(base + "/health", timeout=2).read()
                break
            except OSError:
                time.sleep(1)
        readme = f"{base}/#/experiments/{exp_id}{TRAINING_VIEW}"
        plain = f"{base}/#/experiments/{exp_id}"
        pages = {address: browser(["--dump-dom", address], work / f"profile-{i}")
                 for i, address in enumerate((readme, plain))}
        # the address the Compare button opens (the UI reads the lists as JSON, unquoted)
        compare = f"{base}/#/compare-runs?runs={json.dumps(list(runs.values()))}&experiments={json.dumps([str(exp_id)])}"
        screenshot.parent.mkdir(parents=True, exist_ok=True)
        browser([f"--screenshot={screenshot}", "--window-size=1400,1700", compare + "&" + TRAINING_VIEW[1:]],
                work / "profile-c")
    finally:
        os.killpg(ui.pid, 15)
        ui.wait(timeout=30)
        log.close()

    def shows(dom: str) -> str:
        text = re.sub(r"<[^>]+>", " ", dom)
        runs_listed = all(name in text for name in runs)
        genai = "Traces" in text and ("Usage" in text or "Detect Issues" in text)
        return "training runs" if runs_listed and not genai else ("GenAI overview" if genai else "neither")

    print(f"\nrepo: {shown}\nscreenshot: {screenshot}")
    print(f"\n{'address':<44} {'page shows':<16}")
    for address, dom in pages.items():
        print(f"{address.removeprefix(base):<44} {shows(dom):<16}")
    if shows(pages[readme]) != "training runs":
        raise SystemExit("error: the README's address does not open on the training runs")


if __name__ == "__main__":
    main()
