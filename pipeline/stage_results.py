"""Which DVC stages' recorded results still hold, read from dvc.yaml and dvc.lock (DVC itself is
not imported). A stage that opens a new MLflow row copies these into it, so the row is complete
even when DVC skipped the other stages: say only `evaluate.*` changed, then `evaluate` makes the
new row and fills it from `train` (before it) and `package` (after it, which DVC will skip).

A stage's results hold when DVC would not rerun it: dvc.lock still matches its command, deps,
params and outputs in dvc.yaml, params.yaml and on disk. A dep made by another stage holds when
that stage's results hold and the recorded hashes agree; one made by the stage running now is
hashed afresh (its lock entry is not written until it ends; a folder as DVC hashes one). Whatever
cannot be confirmed this way counts as not holding, so nothing stale is copied.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
from pathlib import Path

import yaml

from pipeline.params import read_yaml


KNOWN_HASHES = ".cache/stage_results-md5.json"  # see _KnownHashes


def held_results(running: str, root: Path = Path("."), wanted=lambda name, files: True) -> dict[str, list[Path]]:
    """{stage: its metrics and plots files} for every stage other than `running` whose results
    hold, in dvc.yaml order; {} outside a DVC workspace or before anything is locked. Only the
    stages `wanted(name, files)` are checked (the others only as the makers of their deps)."""
    check = _checker(running, root)
    if check is None:
        return {}
    held = {}
    for name, stage in check.declared.items():
        files = [root / path for path in _paths(stage, ("metrics", "plots"))]
        if name != running and wanted(name, files) and check.holds(name):
            held[name] = files
    check.known.save()
    return held


def all_hold(stages: list[str] | tuple[str, ...], running: str, root: Path = Path(".")) -> bool:
    """Whether every one of `stages` holds. Each is first checked without reading any output, so
    that one plainly out of date (an output missing, a param changed) spares hashing the folders
    of the others (1.5 GB of shards)."""
    check = _checker(running, root)
    if check is None or not all(name != running and check.plausible(name) for name in stages):
        return False
    held = all(check.holds(name) for name in stages)
    check.known.save()
    return held


def trained_under_these_params(made: str, running: str, root: Path = Path(".")) -> bool:
    """Whether `made` (the generator) is the output dvc.lock records for the stage that makes it,
    and that stage's entry still matches dvc.yaml and params.yaml, as do those of the stages before
    it: only `made` itself is read (its md5), no folder."""
    check = _checker(running, root)
    maker = check and check.maker.get(made)
    if not maker or not check.plausible(maker):
        return False
    recorded = next(o.get("md5") for o in check.locked[maker]["outs"] if o["path"] == made)
    return recorded is not None and _md5(root / made, check.known) == recorded


def _checker(running: str, root: Path) -> _Checker | None:
    try:
        pipeline, lock = read_yaml(root / "dvc.yaml"), read_yaml(root / "dvc.lock")
    except (OSError, ValueError, yaml.YAMLError):  # no dvc.yaml / dvc.lock, or one that does not parse
        return None
    return _Checker(root, pipeline.get("stages") or {}, (lock or {}).get("stages") or {}, running)


def later_stages(running: str, made_by_running: str, root: Path = Path(".")) -> dict[str, tuple[set[str], list[Path]]]:
    """{stage: (the params its results depend on, its metrics and plots files)} for each stage after
    `running` in dvc.yaml; {} outside a DVC workspace. The params are the stage's own and those of
    the stages that make its deps, recursively, except the stage that makes `made_by_running` (the
    generator), whose bytes stand for all of its inputs."""
    try:
        stages = read_yaml(root / "dvc.yaml").get("stages") or {}
    except (OSError, ValueError, AttributeError, yaml.YAMLError):
        return {}
    names = list(stages)
    if running not in names:
        return {}
    maker = {path: name for name, s in stages.items() for path in _paths(s, ("outs", "metrics", "plots"))}

    def params_of(name: str, seen: set[str]) -> set[str]:
        if name in seen or made_by_running in _paths(stages[name], ("outs",)):
            return set()
        seen.add(name)
        own = {e for e in stages[name].get("params") or [] if isinstance(e, str)}  # params.yaml keys
        return own.union(*(params_of(maker[d], seen) for d in stages[name].get("deps") or [] if d in maker))

    return {name: (params_of(name, set()), [root / path for path in _paths(stages[name], ("metrics", "plots"))])
            for name in names[names.index(running) + 1:]}


def _paths(stage: dict, kinds: tuple[str, ...]) -> list[str]:
    """Paths of a dvc.yaml stage's entries of `kinds` (entries are a path or {path: options})."""
    return [next(iter(e)) if isinstance(e, dict) else e for kind in kinds for e in stage.get(kind) or []]


class _KnownHashes:
    """Files' md5s by their path, size, mtime and inode, kept between stages in the repository's
    .cache/, as DVC keeps its own: every stage that logs checks the same output folders (the
    shards, 7,028 JPEGs), and reading them all again took 5% of a `dvc repro`. A file written
    again, or edited in place, has another mtime (or inode): it is read again."""
    def __init__(self, path: Path):
        self.path, self.used = path, {}
        try:
            self.known = json.loads(path.read_text())
            assert isinstance(self.known, dict)
        except Exception:  # none yet, or unreadable: everything is read
            self.known = {}
        self.loaded = dict(self.known)

    def md5(self, path: Path) -> str:
        st = path.stat()
        key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}"
        if key not in self.known:
            h = hashlib.md5()
            with open(path, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
            self.known[key] = h.hexdigest()
        self.used[key] = self.known[key]
        return self.used[key]

    def save(self) -> None:
        """The hashes this check used (so the file stays the size of the outputs), if any is new."""
        if self.used and self.used != self.loaded:
            from pipeline.files import write_json  # here: files imports errors, not this module's readers

            with contextlib.suppress(OSError):  # a cache: a read-only checkout goes without it
                write_json(self.path, self.used)


def _md5(path: Path, known: _KnownHashes) -> str | None:
    """DVC's hash of a file (plain md5 of its bytes) or of a folder (md5 of the JSON list of its
    files' relative paths and hashes, sorted by path, plus '.dir'); None when missing."""
    if path.is_dir():
        files = sorted(f.relative_to(path).as_posix() for f in path.rglob("*") if f.is_file())
        listing = [{"md5": known.md5(path / name), "relpath": name} for name in files]
        return hashlib.md5(json.dumps(listing, sort_keys=True).encode()).hexdigest() + ".dir"
    if not path.is_file():
        return None
    return known.md5(path)


class _Checker:
    def __init__(self, root: Path, declared: dict, locked: dict, running: str):
        self.root, self.declared, self.locked, self.running = root, declared, locked, running
        self.maker = {o["path"]: name for name, s in locked.items() for o in s.get("outs") or []}
        self.memo: dict[str, bool] = {}
        self.plausibility: dict[str, bool] = {}
        self.params: dict[str, object] = {}
        self.hashes: dict[str, str | None] = {}
        self.known = _KnownHashes(root / KNOWN_HASHES)

    def holds(self, name: str) -> bool:
        if name not in self.memo:
            self.memo[name] = False  # a cycle never confirms itself
            self.memo[name] = self.plausible(name) and self._bytes_hold(name)
        return self.memo[name]

    def plausible(self, name: str) -> bool:
        """What can be checked without reading an output: the stage's entry in dvc.lock matches
        dvc.yaml and params.yaml, its outputs and source deps are on disk, and the stages that make
        its other deps are plausible too. First, so that a stage whose results plainly do not hold
        (a fresh clone has no JPEGs) is not confirmed by hashing the shards it reads."""
        if name not in self.plausibility:
            self.plausibility[name] = False  # a cycle never confirms itself
            self.plausibility[name] = name != self.running and self._plausible(name)
        return self.plausibility[name]

    def _plausible(self, name: str) -> bool:
        stage, lock = self.declared.get(name), self.locked.get(name)
        if not stage or not lock:
            return False
        if " ".join(str(stage.get("cmd")).split()) != " ".join(str(lock.get("cmd")).split()):
            return False
        deps, outs = self._entries(lock, "deps"), self._entries(lock, "outs")
        if set(deps) != set(stage.get("deps") or []) or set(outs) != set(_paths(stage, ("outs", "metrics", "plots"))):
            return False
        if not self._params_hold(stage, lock) or not all(md5 is not None and (self.root / p).exists()
                                                         for p, md5 in {**deps, **outs}.items()):
            return False
        makers = {self.maker[p] for p in deps if p in self.maker} - {self.running}  # its outputs are fresh
        return all(self.plausible(maker) for maker in makers)

    def _bytes_hold(self, name: str) -> bool:
        # outputs by their bytes, folders too: shards or JPEGs changed by hand are not the ones
        # this stage's metrics were computed from (DVC would rerun it)
        lock = self.locked[name]
        return (all(self._dep_holds(p, md5) for p, md5 in self._entries(lock, "deps").items())
                and all(self._hash(p) == md5 for p, md5 in self._entries(lock, "outs").items()))

    @staticmethod
    def _entries(lock: dict, kind: str) -> dict[str, str | None]:
        return {e["path"]: e.get("md5") for e in lock.get(kind) or []}

    def _dep_holds(self, path: str, md5: str | None) -> bool:
        maker = self.maker.get(path)
        if maker and maker != self.running:  # another stage's output: that stage must hold too
            recorded = next(o.get("md5") for o in self.locked[maker]["outs"] if o["path"] == path)
            return recorded == md5 and self.holds(maker)
        return md5 is not None and self._hash(path) == md5  # a source file, or fresh from `running`

    def _hash(self, path: str) -> str | None:
        """_md5 of a path, once per check: a folder the running stage wrote (7,028 JPEGs) is a dep
        of both later stages."""
        if path not in self.hashes:
            self.hashes[path] = _md5(self.root / path, self.known)
        return self.hashes[path]

    def _params_hold(self, stage: dict, lock: dict) -> bool:
        declared = {}
        for entry in stage.get("params") or []:
            for file, keys in (entry.items() if isinstance(entry, dict) else [("params.yaml", [entry])]):
                declared.setdefault(file, set()).update(keys)
        recorded = lock.get("params") or {}
        if {f: set(k) for f, k in recorded.items()} != declared:
            return False
        return all(self._param(file, key) == value for file, values in recorded.items() for key, value in values.items())

    def _param(self, file: str, key: str) -> object:
        if file not in self.params:
            try:
                self.params[file] = read_yaml(self.root / file)
            except (OSError, ValueError, yaml.YAMLError):
                self.params[file] = None
        value = self.params[file]
        for part in key.split("."):
            if not isinstance(value, dict) or part not in value:
                return _MISSING
            value = value[part]
        return value


_MISSING = object()
