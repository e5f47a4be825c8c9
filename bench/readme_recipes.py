"""The README's commands, read from the README itself: every command of its bash blocks, and each
recipe (`dvc exp run -n NAME -S key=value ...`) as the param overrides it sets. The bench and the
tests run exactly what a user copies, so they follow the README when it changes."""
from __future__ import annotations

import copy
import re
import shlex
from pathlib import Path

from pipeline import yaml12

README = Path(__file__).resolve().parents[1] / "README.md"


def commands(readme: Path = README) -> list[list[str]]:
    """Every command of the README's bash blocks (continued lines joined), split as the shell
    would, comments dropped."""
    found = []
    for block in re.findall(r"```bash\n(.*?)```", readme.read_text(), flags=re.S):
        for command in block.replace("\\\n", " ").splitlines():
            if words := shlex.split(command, comments=True):
                found.append(words)
    return found


def recipes(readme: Path = README) -> dict[str, list[str]]:
    """{name: ["key=value", ...]} for every `dvc exp run -n NAME` command in the README's code blocks."""
    found = {}
    for words in commands(readme):
        if words[:3] == ["dvc", "exp", "run"] and "-n" in words:
            name = words[words.index("-n") + 1]
            found[name] = [words[i + 1] for i, w in enumerate(words) if w == "-S"]
    return found


def overrides(name: str, readme: Path = README) -> dict[str, object]:
    """{"train.batch_size": 8, ...}: the recipe's values as `dvc exp run -S` writes them into
    params.yaml, read back as DVC reads them (YAML 1.2; a key given twice keeps its last value)."""
    pairs = (setting.split("=", 1) for setting in recipes(readme)[name])
    return {key: yaml12.loads(value) for key, value in pairs}


def apply(raw: dict, over: dict[str, object]) -> dict:
    """A copy of the params mapping `raw` with the dotted keys of `over` set."""
    out = copy.deepcopy(raw)
    for key, value in over.items():
        *parents, leaf = key.split(".")
        node = out
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out


if __name__ == "__main__":  # `--help`, as for the scripts beside it, printed nothing
    print(f"{__doc__}\n\n{Path(__file__).name} is a module the bench scripts import, not a script: see their --help.")
