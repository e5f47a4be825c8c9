import hashlib
import io
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


def test_a_jpeg_cut_short_or_damaged_inside_is_refused(tmp_path):
    # PIL's verify() reads a JPEG's headers only: a truncated file passes it, and so did one whose
    # data was overwritten inside (the zip then held an image no reader decodes)
    gen = _jpegs(tmp_path / "gen", 5)
    noisy = np.random.default_rng(0).integers(0, 256, (256, 256, 3), np.uint8)  # data enough to damage
    Image.fromarray(noisy).save(gen / "img002.jpg", quality=95)
    whole = (gen / "img002.jpg").read_bytes()
    (gen / "img002.jpg").write_bytes(whole[:len(whole) // 2])
    with pytest.raises(DataError, match=r"img002\.jpg: a damaged JPEG \(cut short: no end-of-image marker\); "
                                        r"run the generate stage again$"):
        check_images(gen, 5, 10)
    middle = len(whole) // 2
    damaged = whole[:middle] + np.random.default_rng(1).integers(0, 256, 2000, np.uint8).tobytes() + whole[middle + 2000:]
    (gen / "img002.jpg").write_bytes(damaged)
    with pytest.raises(DataError, match=r"img002\.jpg: a damaged JPEG \((marker FF.. at byte \d+, where Pillow's decoder "
                                        r"stops|no marker where one is due, at byte \d+)\); run the generate stage again$"):
        check_images(gen, 5, 10)
    # bytes after the end-of-image marker: zeros as some writers pad, or anything else, are no damage
    # ("a JPEG cut short" was the line for the latter)
    for tail in (bytes(16), b"trailer"):
        (gen / "img002.jpg").write_bytes(whole + tail)
        assert len(check_images(gen, 5, 10)) == 5


@pytest.mark.parametrize("options", [{}, {"progressive": True}, {"restart_marker_rows": 1}, {"optimize": True},
                                     {"comment": b"c", "icc_profile": b"p" * 100, "exif": b"Exif\0\0"},
                                     {"quality": 10, "subsampling": 0}])
def test_every_overwrite_pillow_cannot_decode_is_refused_and_whole_jpegs_pass(options):
    # Pillow's own decoder is the reference: what it stops at, the structural check must refuse;
    # every cut must be refused; and a whole JPEG of each of these encodings (another set to package) passes
    from pipeline.package import CUT_SHORT, jpeg_damage

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (256, 256, 3), np.uint8)).save(buf, "JPEG", **options)
    whole = buf.getvalue()
    assert jpeg_damage(whole) is None and jpeg_damage(whole + b"tail") is None
    # fill bytes (FF) before a marker, a restart or a stuffed FF 00 in the coded data: libjpeg skips
    # them, and the check refused the first two
    stuffed = whole.index(b"\xff\x00", whole.index(b"\xff\xda"))
    filled = [whole[:stuffed] + b"\xff" + whole[stuffed:], whole[:-2] + b"\xff\xff" + whole[-2:]]
    if b"\xff\xd0" in whole:
        filled.append(whole.replace(b"\xff\xd0", b"\xff\xff\xd0", 1))
    for data in filled:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
        assert jpeg_damage(data) is None
    assert jpeg_damage(whole[:1]) == "no start-of-image marker"
    assert {jpeg_damage(whole[:cut]) for cut in [*range(2, 30), *range(30, len(whole) - 1, 331)]} == {CUT_SHORT}
    undecodable = 0
    for seed in range(60):
        at, count = len(whole) * (seed % 5 + 2) // 8, (2000, 50, 5)[seed % 3]
        noise = np.random.default_rng(seed).integers(0, 256, count, np.uint8).tobytes()
        damaged = whole[:at] + noise + whole[at + count:]
        try:
            with Image.open(io.BytesIO(damaged)) as img:
                img.load()
        except (OSError, SyntaxError):
            undecodable += 1
            assert jpeg_damage(damaged), (options, seed)
    assert undecodable >= 10  # the reference found damage to compare with


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
