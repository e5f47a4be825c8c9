"""Benchmark ingest against hostile input, and the default sample's ingest against a reference.

    python bench/ingest.py [--reference REV]

1. The bomb: a zip in the competition layout whose photo_tfrec/ holds one 2 GiB member of zeros
   (built here, not timed), given to `python -m pipeline.ingest` as `ingest.source`: seconds until
   it is refused and the peak memory of that process, against the budgets (5 s, 0.5 GiB).
2. The default sample's ingest (`params.yaml`): seconds and peak memory, against the same ingest
   run by the code at REV in the same call (a git worktree; by default the commit before the
   archive checks and the streamed TFRecord verification), with REV's params.yaml. Both files
   must set the same `seed` and `ingest` (the ingest stage's params), or the two ingests would
   do different work: where they differ it stops before any work, with one line.
Each command runs under a small wrapper that reports its own children's peak RSS.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
BUDGETS = {"bomb_s": 5.0, "bomb_peak_gib": 0.5}
# runs argv[1:], then prints its wall time and its children's peak RSS as the last stderr line
WRAPPER = ("import json, resource, subprocess, sys, time; t = time.perf_counter(); "
           "rc = subprocess.run(sys.argv[1:]).returncode; "
           "print(json.dumps({'rc': rc, 's': time.perf_counter() - t, "
           "'gib': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20}), file=sys.stderr)")


def measured(cmd: list[str], cwd: Path, env: dict | None = None) -> dict:
    res = subprocess.run([sys.executable, "-c", WRAPPER, *cmd], cwd=cwd, env=env, capture_output=True, text=True)
    out = json.loads(res.stderr.strip().splitlines()[-1])
    out["last_line"] = next((line for line in reversed(res.stderr.splitlines()[:-1]) if line.strip()), "")
    return out


def ingest_cmd(code: Path, work: Path, params: Path) -> list[str]:
    cmd = [sys.executable, "-m", "pipeline.ingest", "--params", str(params), "--raw", str(work / "raw"),
           "--shards", str(work / "shards"), "--manifest", str(work / "manifest.csv")]
    if "--download-cache" in (code / "pipeline/ingest.py").read_text():
        cmd += ["--download-cache", str(work / "cache")]
    return cmd


def revision(text: str) -> str:
    """--reference: a commit of this repository."""
    found = subprocess.run(["git", "rev-parse", "--verify", "--quiet", f"{text}^{{commit}}"], cwd=ROOT,
                           capture_output=True)
    if found.returncode != 0:
        raise argparse.ArgumentTypeError(f"{text!r} is no commit of {ROOT}")
    return text


def ingest_params(text: str) -> dict:
    """{"seed": 0, "ingest.source": "sample", ...}: the params of the ingest stage (dvc.yaml's `seed`
    and `ingest`, what its work depends on) in a params.yaml's text."""
    raw = yaml.safe_load(text) or {}
    return {"seed": raw.get("seed"), **{f"ingest.{k}": v for k, v in (raw.get("ingest") or {}).items()}}


def same_ingest_params(rev: str) -> None:
    """Stop with one line where the working tree's params.yaml sets other ingest params than REV's."""
    theirs = subprocess.run(["git", "show", f"{rev}:params.yaml"], cwd=ROOT, capture_output=True, text=True)
    if theirs.returncode != 0:
        raise SystemExit(f"error: --reference {rev} has no params.yaml")
    ours, theirs = ingest_params((ROOT / "params.yaml").read_text()), ingest_params(theirs.stdout)
    differ = [f"{k} {ours.get(k)} (at {rev}: {theirs.get(k)})" for k in sorted(ours.keys() | theirs.keys())
              if ours.get(k) != theirs.get(k)]
    if differ:
        raise SystemExit(f"error: params.yaml sets {', '.join(differ)}: the two ingests would do different work; "
                         f"measure with the reference's values")


def build_bomb(path: Path, size: int = 2 << 30) -> None:
    zeros = bytes(16 << 20)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        zf.writestr("monet_tfrec/monet00-1.tfrec", b"")
        with zf.open("photo_tfrec/photo00-352.tfrec", "w", force_zip64=True) as out:
            for _ in range(size // len(zeros)):
                out.write(zeros)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reference", type=revision, default="553516f", help="git revision whose ingest is the reference")
    args = ap.parse_args()
    same_ingest_params(args.reference)
    with tempfile.TemporaryDirectory(prefix="ingest-bench-") as tmp:
        tmp = Path(tmp)
        bomb = tmp / "bomb.zip"
        build_bomb(bomb)
        bomb_bytes = bomb.stat().st_size
        params = tmp / "bomb-params.yaml"
        raw = yaml.safe_load((ROOT / "params.yaml").read_text())
        params.write_text(yaml.safe_dump({**raw, "ingest": {**raw["ingest"], "source": str(bomb)}}))
        refused = measured(ingest_cmd(ROOT, tmp / "bomb", params), ROOT)
        if refused["rc"] == 0:
            raise SystemExit("error: the bomb was not refused")

        reference = tmp / "reference"
        subprocess.run(["git", "worktree", "add", "-q", "--detach", str(reference), args.reference], cwd=ROOT,
                       check=True)
        try:
            old = measured(ingest_cmd(reference, tmp / "old", reference / "params.yaml"), reference)
            new = measured(ingest_cmd(ROOT, tmp / "new", ROOT / "params.yaml"), ROOT)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(reference)], cwd=ROOT, check=True)
        for which, r in ((args.reference, old), ("the working tree", new)):
            if r["rc"] != 0:
                raise SystemExit(f"error: the ingest of {which} failed: {r['last_line']}")

    print(f"\nbomb ({bomb_bytes / 2**20:.1f} MiB zip, one 2 GiB member): {refused['last_line']}")
    print(f"\n{'measure':<36} {'value':>8} {'against':>8} {'ratio':>6}")
    rows = [("bomb refused after (s)", refused["s"], BUDGETS["bomb_s"]),
            ("bomb peak RSS (GiB)", refused["gib"], BUDGETS["bomb_peak_gib"]),
            (f"sample ingest (s), vs {args.reference}", new["s"], old["s"]),
            (f"sample ingest peak (GiB), vs {args.reference}", new["gib"], old["gib"])]
    for name, value, against in rows:
        print(f"{name:<36} {value:>8.3g} {against:>8.3g} {value / against:>6.3f}")


if __name__ == "__main__":
    main()
