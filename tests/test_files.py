import pytest
import torch

from pipeline.files import atomic_dir, atomic_path, save_torch, write_json


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


def test_save_torch_writes_the_same_bytes_whatever_the_temp_name(tmp_path):
    # torch.save(path) names its archive after the file; DVC must see equal tensors as equal files
    obj = {"w": torch.arange(6.0).reshape(2, 3), "step": 3}
    save_torch(obj, tmp_path / "a.pt")
    save_torch(obj, tmp_path / "b" / "other.pt")
    assert (tmp_path / "a.pt").read_bytes() == (tmp_path / "b" / "other.pt").read_bytes()
    assert torch.equal(torch.load(tmp_path / "a.pt", weights_only=True)["w"], obj["w"])
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["a.pt", "b", "other.pt"]  # no temp files left
