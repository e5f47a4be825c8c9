import hashlib
import os
import shutil
import zipfile

import numpy as np
import pytest
from PIL import Image

from pipeline.errors import DataError
from pipeline.package import check_images, write_zip


def _jpegs(folder, n, size=(256, 256), mode="RGB", fmt="JPEG", suffix=".jpg"):
    folder.mkdir(exist_ok=True)
    for i in range(n):
        Image.fromarray(np.full((size[1], size[0], 3), i, np.uint8)).convert(mode).save(
            folder / f"img{i:03d}{suffix}", format=fmt)
    return folder


def test_good_folder_becomes_a_flat_zip(tmp_path):
    images = check_images(_jpegs(tmp_path / "gen", 6), 5, 10)
    digest = write_zip(images, tmp_path / "out/images.zip")
    with zipfile.ZipFile(tmp_path / "out/images.zip") as zf:
        assert sorted(zf.namelist()) == [f"img{i:03d}.jpg" for i in range(6)]
    assert digest == hashlib.sha256((tmp_path / "out/images.zip").read_bytes()).hexdigest()


def test_the_same_images_make_the_same_zip_whenever_they_were_written(tmp_path):
    first = check_images(_jpegs(tmp_path / "a", 6), 5, 10)
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    for k, path in enumerate(sorted((tmp_path / "b").iterdir())):
        os.utime(path, (1_000_000_000 + k, 1_000_000_000 + k))  # other times, as a rerun leaves them
        path.chmod(0o600)
    second = check_images(tmp_path / "b", 5, 10)
    assert write_zip(first, tmp_path / "1.zip") == write_zip(second, tmp_path / "2.zip")
    with zipfile.ZipFile(tmp_path / "2.zip") as zf:
        assert all(zf.read(e.filename) == (tmp_path / "b" / e.filename).read_bytes() for e in zf.infolist())
        assert all(e.compress_type == zipfile.ZIP_STORED for e in zf.infolist())


def test_too_few_images_refused(tmp_path):
    with pytest.raises(DataError, match=r"3 images; the submission needs 5–10 \(package.min_images and "
                                        r"package.max_images; lower package.min_images"):
        check_images(_jpegs(tmp_path / "gen", 3), 5, 10)


def test_too_many_images_say_which_bound_to_raise(tmp_path):
    with pytest.raises(DataError, match=r"12 images; the submission needs 5–10 \(package.min_images and "
                                        r"package.max_images; raise package.max_images"):
        check_images(_jpegs(tmp_path / "gen", 12), 5, 10)


def test_ctrl_c_while_the_zip_is_written_leaves_the_old_zip_and_one_exception(tmp_path, monkeypatch):
    # closing a zip with an entry half-written raised again over the KeyboardInterrupt: three
    # tracebacks (one from ZipFile.__del__) and exit 1 instead of errors.cli's line and 130
    import gc

    images = check_images(_jpegs(tmp_path / "gen", 6), 5, 10)
    out = tmp_path / "images.zip"
    out.write_bytes(b"the old zip")
    writes = []

    def interrupted(self, *args, **kwargs):
        writes.append(1)
        if len(writes) == 3:
            raise KeyboardInterrupt
        return real(self, *args, **kwargs)

    real = zipfile._ZipWriteFile.__init__
    monkeypatch.setattr(zipfile._ZipWriteFile, "__init__", interrupted)
    unraisable = []
    monkeypatch.setattr("sys.unraisablehook", unraisable.append)
    with pytest.raises(KeyboardInterrupt):
        write_zip(images, out)
    gc.collect()
    assert unraisable == [] and out.read_bytes() == b"the old zip"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gen", "images.zip"]


@pytest.mark.parametrize("kw, needle", [
    ({"size": (128, 256)}, "128x256 RGB"),
    ({"mode": "L"}, "256x256 L"),
    ({"fmt": "PNG", "suffix": ".jpg"}, "PNG 256x256"),
])
def test_wrong_images_are_named(tmp_path, kw, needle):
    gen = _jpegs(tmp_path / "gen", 5)
    _jpegs(tmp_path / "gen", 1, **kw)  # overwrites img000.jpg
    with pytest.raises(DataError, match=needle) as e:
        check_images(gen, 5, 10)
    assert "img000.jpg" in str(e.value)


def test_non_jpeg_entries_refused(tmp_path):
    gen = _jpegs(tmp_path / "gen", 5)
    (gen / "sub").mkdir()
    with pytest.raises(DataError, match="'sub' is not a .jpg"):
        check_images(gen, 5, 10)


def test_a_jpeg_cut_short_is_refused(tmp_path):
    # PIL's verify() reads a JPEG's headers only, and a truncated file passes it
    gen = _jpegs(tmp_path / "gen", 5)
    whole = (gen / "img002.jpg").read_bytes()
    (gen / "img002.jpg").write_bytes(whole[:len(whole) // 2])
    with pytest.raises(DataError, match=r"img002\.jpg: a JPEG cut short \(no end-of-image marker\)"):
        check_images(gen, 5, 10)
    (gen / "img002.jpg").write_bytes(whole + bytes(16))  # zeros after the marker, as some writers pad
    assert len(check_images(gen, 5, 10)) == 5


def test_out_naming_a_folder_is_one_line(tmp_path, repo_root, capsys):
    # `--out data/generated` (a slip): an IsADirectoryError traceback after the zip was written
    from pipeline import package

    (tmp_path / "gen").mkdir()
    with pytest.raises(SystemExit) as e:
        package.main(["--params", str(repo_root / "params.yaml"), "--images", str(tmp_path / "gen"), "--out",
                      str(tmp_path / "gen"), "--metrics", str(tmp_path / "m.json"), "--generator", "g.pt",
                      "--shards", "s", "--manifest", "m.csv"])
    assert e.value.code == 2
    assert capsys.readouterr().err == f"error: package: --out {tmp_path / 'gen'} is a folder; it names the file to write\n"
