"""Benchmark ingest against hostile input, and the default sample's ingest against a reference.

    python bench/ingest.py [--reference REV]

1. The bomb: a zip in the competition layout whose photo_tfrec/ holds one 2 GiB member of zeros
   (built here, not timed), given to `python -m pipeline.ingest` as `ingest.source`: seconds until
   it is refused and the peak memory of that process, against the budgets (5 s, 0.5 GiB).
2. The default sample's ingest (`params.yaml` as committed): seconds and peak memory, against the
   same ingest run by the code at REV in the same call (a git worktree; by default the commit
   before the archive checks and the streamed TFRecord verification).
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


def build_bomb(path: Path, size: int = 2 << 30) -> None:
    zeros = bytes(16 << 20)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        zf.writestr("monet_tfrec/monet00-1.tfrec", b"")
        with zf.open("photo_tfrec/photo00-352.tfrec", "w", force_zip64=True) as out:
            for _ in range(size // len(zeros)):
                out.write(zeros)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reference", default="553516f", help="git revision whose ingest is the reference")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="ingest-bench-") as tmp:
        tmp = Path(tmp)
        bomb = tmp / "bomb.zip"
        build_bomb(bomb)
        bomb_bytes = bomb.stat().st_size
        params = tmp / "bomb-params.yaml"
        raw = yaml.safe_load((ROOT / "params.yaml").read_text())
        params.write_text(yaml.safe_dump({**raw, "ingest": {**raw["ingest"], "source": str(bomb)}}))
        refused = measured(ingest_cmd(ROOT, tmp / "bomb", params), ROOT)
        assert refused["rc"] != 0, "the bomb was not refused"

        reference = tmp / "reference"
        subprocess.run(["git", "worktree", "add", "-q", "--detach", str(reference), args.reference], cwd=ROOT,
                       check=True)
        try:
            old = measured(ingest_cmd(reference, tmp / "old", reference / "params.yaml"), reference)
            new = measured(ingest_cmd(ROOT, tmp / "new", ROOT / "params.yaml"), ROOT)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(reference)], cwd=ROOT, check=True)

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
