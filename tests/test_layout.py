"""The layout dvc.yaml and the imports must keep: stages never import each other, and each stage's
deps name every pipeline module its script runs, so DVC reruns it when any of them changes."""
import ast
from pathlib import Path

import pytest
import yaml

STAGES = ("ingest", "train", "generate", "evaluate", "package")


def _pipeline_imports(path: Path) -> set[str]:
    """pipeline.* modules imported anywhere in the file (function-level imports too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("pipeline.")}
        elif isinstance(node, ast.ImportFrom) and node.module == "pipeline":
            found |= {f"pipeline.{a.name}" for a in node.names}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("pipeline."):
            found.add(node.module)
    return found


def _module_file(root: Path, module: str) -> Path:
    return root / (module.replace(".", "/") + ".py")


def _closure(root: Path, module: str) -> set[str]:
    seen, todo = set(), [module]
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo += sorted(_pipeline_imports(_module_file(root, m)))
    return seen


@pytest.fixture(scope="module")
def dvc_stages(repo_root):
    return yaml.safe_load((repo_root / "dvc.yaml").read_text())["stages"]


def test_closure_follows_function_level_imports(repo_root):
    # evaluate imports tracking inside main(); tracking imports stage_results at the top
    assert {"pipeline.tracking", "pipeline.stage_results"} <= _closure(repo_root, "pipeline.evaluate")


@pytest.mark.parametrize("stage", STAGES)
def test_a_stage_script_imports_no_other_stage_script(repo_root, stage):
    others = {f"pipeline.{s}" for s in STAGES if s != stage}
    assert not _closure(repo_root, f"pipeline.{stage}") & others


@pytest.mark.parametrize("stage", STAGES)
def test_stage_deps_are_exactly_the_modules_its_script_runs(repo_root, dvc_stages, stage):
    deps = {d for d in dvc_stages[stage]["deps"] if d.startswith("pipeline/")}
    runs = {str(_module_file(repo_root, m).relative_to(repo_root)) for m in _closure(repo_root, f"pipeline.{stage}")}
    assert deps == runs, f"missing: {sorted(runs - deps)}, not imported: {sorted(deps - runs)}"
    assert f"python -m pipeline.{stage} " in dvc_stages[stage]["cmd"]


@pytest.mark.parametrize("stage", STAGES)
def test_every_output_a_stage_declares_is_passed_to_it_by_path(dvc_stages, stage):
    # paths live in dvc.yaml only: a script that built `models/<name>.pt` itself would drift from it
    s = dvc_stages[stage]
    declared = [next(iter(e)) if isinstance(e, dict) else e for k in ("outs", "metrics", "plots") for e in s.get(k, [])]
    cmd = s["cmd"].split()
    assert declared and all(path in cmd for path in declared), [p for p in declared if p not in cmd]


def test_the_train_fingerprint_hashes_every_module_train_runs_but_the_mlflow_ones(repo_root):
    # a module train starts importing is in the checkpoint's fingerprint unless it is added here
    from pipeline.train import WEIGHTS_CODE

    mlflow_only = {"pipeline.tracking", "pipeline.stage_results", "pipeline.served_model"}
    runs = _closure(repo_root, "pipeline.train")
    assert mlflow_only <= runs
    assert {f"pipeline.{m}" for m in WEIGHTS_CODE} == runs - mlflow_only


class _Parsed(Exception):
    def __init__(self, parser):
        self.parser = parser


@pytest.mark.parametrize("stage", STAGES)
def test_every_option_of_a_stage_says_what_it_is_in_help(stage, monkeypatch):
    import argparse
    import importlib

    def capture(parser, *args, **kwargs):
        raise _Parsed(parser)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    with pytest.raises(_Parsed) as parsed:
        importlib.import_module(f"pipeline.{stage}").main([])
    silent = [a.option_strings[0] for a in parsed.value.parser._actions if not a.help]
    assert not silent, f"{stage}: no help for {silent}"
