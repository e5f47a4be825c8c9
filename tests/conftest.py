import shutil
import tempfile
from pathlib import Path

import pytest

# The end-to-end tests write about 2.5 GB of repositories into the temp folder at their peak. A
# full disk shows up as dozens of unrelated errors, so the summary says how low free space went.
_least_free = {"bytes": None}


def _note_free_disk() -> None:
    free = shutil.disk_usage(tempfile.gettempdir()).free
    if _least_free["bytes"] is None or free < _least_free["bytes"]:
        _least_free["bytes"] = free


def pytest_runtest_logfinish(nodeid, location):
    _note_free_disk()


def pytest_terminal_summary(terminalreporter):
    _note_free_disk()
    terminalreporter.write_line(f"least free disk in {tempfile.gettempdir()} between tests: "
                                f"{_least_free['bytes'] / 2**30:.1f} GiB (the tests need about 3 GiB)")


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return Path(__file__).resolve().parents[1]
