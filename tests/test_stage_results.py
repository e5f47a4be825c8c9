"""stage_results: which stages' recorded results still hold, from dvc.yaml + dvc.lock.

A toy pipeline a -> b -> c, its lock written the way DVC writes it (plain md5 of each file).
The real DVC lock format is exercised by the end-to-end test."""
import hashlib
import json

import pytest
import yaml

from pipeline.stage_results import held_results, later_stages, trained_under_these_params

PIPELINE = {"stages": {
    "a": {"cmd": "python a.py", "deps": ["a.py"], "params": ["seed", "a"],
          "outs": ["out_a.bin"], "metrics": [{"metrics/a.json": {"cache": False}}]},
    "b": {"cmd": "python b.py", "deps": ["out_a.bin", "b.py"], "params": ["b.lr"],
          "outs": ["out_b.bin"], "metrics": ["metrics/b.json"], "plots": ["metrics/b.csv"]},
    "c": {"cmd": "python c.py", "deps": ["out_b.bin", "c.py"],
          "metrics": ["metrics/c.json"]},
}}
PARAMS = {"seed": 0, "a": {"n": 3}, "b": {"lr": 0.5, "other": 1}}


def _md5(path):
    return hashlib.md5(path.read_bytes()).hexdigest()


def _lookup(params: dict, key: str):
    for part in key.split("."):
        params = params[part]
    return params


def _lock(root) -> dict:
    """What `dvc repro` would record now."""
    params = yaml.safe_load((root / "params.yaml").read_text())
    stages = {}
    for name, s in PIPELINE["stages"].items():
        outs = [next(iter(o)) if isinstance(o, dict) else o for k in ("outs", "metrics", "plots") for o in s.get(k, [])]
        keys = s.get("params", [])
        stages[name] = {
            "cmd": s["cmd"],
            "deps": [{"path": d, "hash": "md5", "md5": _md5(root / d), "size": 1} for d in s["deps"]],
            **({"params": {"params.yaml": {k: _lookup(params, k) for k in keys}}} if keys else {}),
            "outs": [{"path": o, "hash": "md5", "md5": _md5(root / o), "size": 1} for o in outs],
        }
    return {"schema": "2.0", "stages": stages}


@pytest.fixture
def ws(tmp_path):
    (tmp_path / "metrics").mkdir()
    for f in ("a.py", "b.py", "c.py", "out_a.bin", "out_b.bin", "metrics/a.json", "metrics/b.json",
              "metrics/b.csv", "metrics/c.json"):
        (tmp_path / f).write_text(f"contents of {f}\n")
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump(PIPELINE))
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(PARAMS))
    (tmp_path / "dvc.lock").write_text(yaml.safe_dump(_lock(tmp_path)))
    return tmp_path


def test_an_output_made_under_these_params_is_told_from_one_made_under_others(ws):
    # `dvc repro -s generate` after a change of train's params: generate made a row that claimed
    # params the generator was not trained under
    assert trained_under_these_params("out_b.bin", "c", ws)
    (ws / "params.yaml").write_text(yaml.safe_dump({**PARAMS, "b": {"lr": 0.1, "other": 1}}))  # b's param
    assert not trained_under_these_params("out_b.bin", "c", ws)
    (ws / "params.yaml").write_text(yaml.safe_dump({**PARAMS, "a": {"n": 4}}))  # a param of the stage before b
    assert not trained_under_these_params("out_b.bin", "c", ws)
    (ws / "params.yaml").write_text(yaml.safe_dump(PARAMS))
    (ws / "out_b.bin").write_text("other weights\n")  # not the bytes the lock records
    assert not trained_under_these_params("out_b.bin", "c", ws)
    assert not trained_under_these_params("nobody-makes-this", "c", ws)


def test_every_other_stage_holds_after_a_full_run(ws):
    held = held_results("b", ws)
    assert held == {"a": [ws / "metrics/a.json"], "c": [ws / "metrics/c.json"]}
    assert list(held_results("a", ws)) == ["b", "c"]


def test_running_stage_with_same_outputs_leaves_downstream_holding(ws):
    (ws / "out_a.bin").write_text("contents of out_a.bin\n")  # rewritten by the running stage, same bytes
    assert list(held_results("a", ws)) == ["b", "c"]


def test_running_stage_with_new_outputs_invalidates_everything_downstream(ws):
    (ws / "out_a.bin").write_text("new weights\n")
    assert held_results("a", ws) == {}  # b reads out_a.bin; c reads b's output


def test_a_changed_source_file_invalidates_its_stage_and_what_follows(ws):
    (ws / "b.py").write_text("changed\n")
    assert list(held_results("c", ws)) == ["a"]
    assert list(held_results("a", ws)) == []  # c depends on b, which will rerun


@pytest.mark.parametrize("change, not_held", [
    ({"b": {"lr": 0.1, "other": 1}}, {"b", "c"}),
    ({"b": {"lr": 0.5, "other": 2}}, set()),  # b tracks b.lr only
    ({"seed": 1}, {"a", "b", "c"}),
])
def test_params_count_by_the_keys_a_stage_declares(ws, change, not_held):
    (ws / "params.yaml").write_text(yaml.safe_dump({**PARAMS, **change}))
    held = set(held_results("nothing-running", ws))
    assert held == {"a", "b", "c"} - not_held


def test_an_edited_metrics_file_is_not_copied(ws):
    (ws / "metrics/c.json").write_text('{"edited": 1}\n')
    assert list(held_results("a", ws)) == ["b"]


def test_an_edited_output_folder_means_the_stage_reruns(ws):
    # a folder out (the shards, the generated JPEGs) is checked by its bytes like a file, not only
    # for being there: DVC would rerun its stage, so its metrics are no result of these outputs
    (ws / "out_a").mkdir()
    (ws / "out_a/x.jpg").write_bytes(b"jpeg")
    pipeline = yaml.safe_load((ws / "dvc.yaml").read_text())
    pipeline["stages"]["a"]["outs"].append("out_a")
    (ws / "dvc.yaml").write_text(yaml.safe_dump(pipeline))
    lock = yaml.safe_load((ws / "dvc.lock").read_text())
    lock["stages"]["a"]["outs"].append({"path": "out_a", "hash": "md5", "md5": _md5_of_folder(ws / "out_a")})
    (ws / "dvc.lock").write_text(yaml.safe_dump(lock))
    assert list(held_results("nothing-running", ws)) == ["a", "b", "c"]
    (ws / "out_a/x.jpg").write_bytes(b"JPEG")  # the same size, written again: its mtime tells
    assert list(held_results("nothing-running", ws)) == []  # b reads a's other output: unconfirmed


def _md5_of_folder(path):
    """DVC's hash of a folder (the end-to-end test checks stage_results' own against DVC's lock)."""
    listing = [{"md5": _md5(f), "relpath": f.relative_to(path).as_posix()} for f in sorted(path.rglob("*")) if f.is_file()]
    return hashlib.md5(json.dumps(listing, sort_keys=True).encode()).hexdigest() + ".dir"


def test_a_changed_command_or_dep_list_means_the_stage_reruns(ws):
    pipeline = yaml.safe_load((ws / "dvc.yaml").read_text())
    pipeline["stages"]["c"]["cmd"] = "python c.py --fast"
    pipeline["stages"]["b"]["deps"].append("a.py")
    (ws / "dvc.yaml").write_text(yaml.safe_dump(pipeline))
    assert list(held_results("nothing-running", ws)) == ["a"]


def test_outside_a_dvc_workspace_nothing_is_copied(ws):
    (ws / "dvc.lock").unlink()
    assert held_results("b", ws) == {}


@pytest.mark.parametrize("damaged", ["dvc.lock", "dvc.yaml", "params.yaml"])
def test_a_file_that_does_not_parse_confirms_nothing(ws, damaged):
    # a merge left its conflict markers: DVC refuses the file; nothing is copied, and no traceback
    text = (ws / damaged).read_text()
    (ws / damaged).write_text(f"<<<<<<< HEAD\n{text}=======\n{text}>>>>>>> other\n")
    assert held_results("nothing-running", ws) == {}
    if damaged == "dvc.yaml":
        assert later_stages("a", "out_a.bin", ws) == {}


def test_later_stages_name_the_params_their_results_depend_on(repo_root):
    # evaluate's JPEGs come from generate and its images from ingest: their params count too, but
    # not train's, whose generator's bytes stand for all of its inputs
    later = later_stages("train", "models/photo2monet.pt", repo_root)
    assert list(later) == ["generate", "evaluate", "package"]
    keys, files = later["evaluate"]
    assert {"evaluate", "generate", "precision", "device", "seed", "ingest"} <= keys
    assert not keys & {"train", "lambda_cycle", "image_size"}
    assert [f.name for f in files] == ["evaluate.json", "memorization.png"]
    assert later_stages("evaluate", "models/photo2monet.pt", repo_root).keys() == {"package"}
    assert later_stages("package", "models/photo2monet.pt", repo_root) == {}


def test_files_are_read_once_until_they_change(ws, monkeypatch):
    # every stage that logs checks the same output folders: their hashes are kept between stages
    import builtins

    from pipeline import stage_results

    assert list(held_results("b", ws)) == ["a", "c"]
    assert (ws / stage_results.KNOWN_HASHES).is_file()
    opened = []
    real_open = builtins.open
    monkeypatch.setattr(builtins, "open", lambda f, *a, **k: opened.append(str(f)) or real_open(f, *a, **k))
    assert list(held_results("b", ws)) == ["a", "c"]
    assert not [f for f in opened if f.endswith((".bin", ".py", ".json", ".csv"))], opened
    (ws / "out_a.bin").write_text("contents of out_a.bin\n")  # rewritten, same bytes: read again, holds
    assert list(held_results("b", ws)) == ["a", "c"]
    assert any(f.endswith("out_a.bin") for f in opened)


def _reads(monkeypatch) -> list[str]:
    """The files whose bytes stage_results hashes, by name, as they are read."""
    from pipeline import stage_results

    read, md5 = [], stage_results._KnownHashes.md5
    monkeypatch.setattr(stage_results._KnownHashes, "md5", lambda self, path: read.append(path.name) or md5(self, path))
    return read


def test_a_stage_plainly_out_of_date_spares_reading_what_the_others_depend_on(ws, monkeypatch):
    # a fresh clone at `train`: the JPEGs are not there yet, so nothing after them can hold, and
    # confirming that must not hash the 1.5 GB of shards they were made from
    from pipeline.stage_results import all_hold

    (ws / "out_b.bin").unlink()
    read = _reads(monkeypatch)
    assert not all_hold(["c"], "a", ws) and not all_hold(["b", "c"], "nothing-running", ws)
    assert held_results("a", ws) == {}
    assert read == []


def test_only_the_stages_asked_for_are_confirmed(ws, monkeypatch):
    # a row that has train's results already need not confirm train again (reading the shards)
    read = _reads(monkeypatch)
    assert list(held_results("c", ws, wanted=lambda name, files: name == "b")) == ["b"]
    assert "a.py" in read  # b reads a's output: a is confirmed as its maker
    read.clear()
    assert held_results("c", ws, wanted=lambda name, files: False) == {} and read == []
    from pipeline.stage_results import all_hold
    assert all_hold(["a", "b"], "c", ws) and not all_hold(["a", "b"], "b", ws)
