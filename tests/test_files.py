import pytest

from pipeline.files import atomic_dir, atomic_path, write_json


def test_atomic_path_keeps_old_file_when_writer_dies(tmp_path):
    target = tmp_path / "out.json"
    write_json(target, {"v": 1})
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert target.read_text().strip().startswith("{") and '"v": 1' in target.read_text()
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_atomic_dir_replaces_whole_or_not_at_all(tmp_path):
    target = tmp_path / "gen"
    with atomic_dir(target) as tmp:
        (tmp / "a.jpg").write_bytes(b"1")
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as tmp:
            (tmp / "b.jpg").write_bytes(b"2")
            raise RuntimeError("killed")
    assert sorted(p.name for p in target.iterdir()) == ["a.jpg"]
    with atomic_dir(target) as tmp:
        (tmp / "c.jpg").write_bytes(b"3")
    assert sorted(p.name for p in target.iterdir()) == ["c.jpg"]
    assert [p.name for p in tmp_path.iterdir()] == ["gen"]
