"""The stages' one place for errors: a user's mistake or Ctrl-C is one line and an exit code."""
import errno
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


def test_a_full_disk_is_one_line_naming_the_folder_left_and_exit_2(tmp_path, monkeypatch, capsys):
    # as shutil.copyfile says it: the source, then the target (a temp name inside a temp folder, gone)
    gone = tmp_path / "data" / ".raw.x1.tmp" / "photo_tfrec" / "p.tfrec"
    (tmp_path / "data").mkdir()
    full = OSError(errno.ENOSPC, "No space left on device", "/src/p.tfrec", None, str(gone))
    assert _stage(full, monkeypatch, "ingest") == 2
    assert capsys.readouterr().err == (f"error: ingest: No space left on device in {tmp_path / 'data'}; free some "
                                       f"space and run it again (no output was left half-written)\n")

