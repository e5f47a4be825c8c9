"""The stages' one place for errors: a user's mistake or Ctrl-C is one line and an exit code."""
import sys

import pytest

from pipeline.errors import DataError, cli


def _stage(exc, monkeypatch, name="train"):
    monkeypatch.setattr(sys, "argv", [f"/repo/pipeline/{name}.py", "--shards", "data/shards"])  # as `python -m`

    @cli
    def main():
        raise exc

    with pytest.raises(SystemExit) as e:
        main()
    return e.value.code


def test_a_pipeline_error_is_one_line_and_exit_2(monkeypatch, capsys):
    assert _stage(DataError("data/x.tfrec: record 3: truncated"), monkeypatch) == 2
    assert capsys.readouterr().err == "error: data/x.tfrec: record 3: truncated\n"


@pytest.mark.parametrize("name, hint", [("train", ": it resumes from its last finished epoch"), ("evaluate", "")])
def test_ctrl_c_is_one_line_and_exit_130(name, hint, monkeypatch, capsys):
    assert _stage(KeyboardInterrupt(), monkeypatch, name) == 130
    said = capsys.readouterr().err
    assert said == f"error: {name}: interrupted; no output was left half-written (run it again{hint})\n"


def test_a_bug_keeps_its_traceback(monkeypatch):
    with pytest.raises(ZeroDivisionError):
        _stage(ZeroDivisionError("a bug"), monkeypatch)
