"""argparse `type=` checks shared by the bench scripts: a bad value stops the script with
argparse's own one-line `error:` (after its usage line) before any work, instead of a traceback
from deep inside the measurement. Imports only the standard library (the GPU check must run on bare
torch)."""
from __future__ import annotations

import argparse
from pathlib import Path


def _at_least(low: int, what: str):
    def check(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < low:
            raise argparse.ArgumentTypeError(f"must be {what}, not {text!r}")
        return value
    return check


positive_int = _at_least(1, "a whole number above 0")
count = _at_least(0, "a whole number, 0 or more")  # 0: none


def positive_seconds(text: str) -> float:
    """A time budget: a finite number of seconds above 0 ("480", "0.5")."""
    try:
        value = float(text)
    except ValueError:
        value = None
    if value is None or not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number of seconds above 0, not {text!r}")
    return value


def positive_ints(text: str) -> list[int]:
    """Comma-separated whole numbers, each above 0 ("64,128")."""
    return [positive_int(part.strip()) for part in text.split(",") if part.strip()]


def keep_folder(text: str) -> Path:
    """--keep DIR: where to clone into DIR/repo and keep it; a DIR/repo already there, but for an
    empty folder, is refused (git clone would not clone into it)."""
    folder = Path(text).resolve()
    repo = folder / "repo"
    if repo.exists() and (not repo.is_dir() or any(repo.iterdir())):
        raise argparse.ArgumentTypeError(f"{folder / 'repo'} exists already: remove it or name another folder")
    return folder


if __name__ == "__main__":  # `--help`, as for the scripts beside it, printed nothing
    print(f"{__doc__}\n\n{Path(__file__).name} is a module the bench scripts import, not a script: see their --help.")
