import os
import shutil
import struct
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import requests
import torch

from pipeline import competition, ingest, kaggle_download, shards, tfrecords
from pipeline.errors import DataError, PipelineError
from pipeline.params import parse


def _image(value: int, size=(256, 256, 3)) -> np.ndarray:
    return np.full(size, value, dtype=np.uint8)


def _write_competition(folder, n_monet=3, n_photo=4, bad=None):
    """A tiny competition folder in the Kaggle layout; `bad` = pixels for the last photo."""
    for domain, n in (("monet", n_monet), ("photo", n_photo)):
        examples = [tfrecords.Example(f"{domain}{i:03d}", tfrecords.encode_jpeg(_image(10 * i)), domain)
                    for i in range(n)]
        if bad is not None and domain == "photo":
            examples[-1] = tfrecords.Example("badimage", tfrecords.encode_jpeg(bad), domain)
        tfrecords.write(folder / competition.TFREC_DIRS[domain] / f"{domain}00-{n}.tfrec", examples)
    return folder


def test_tfrecord_round_trip_and_schema(tmp_path):
    jpeg = tfrecords.encode_jpeg(_image(7))
    path = tmp_path / "x.tfrec"
    assert tfrecords.write(path, [tfrecords.Example("abc", jpeg, "photo")] * 3) == 3
    assert tfrecords.verify(path) == 3
    got = list(tfrecords.read(path))
    assert got == [tfrecords.Example("abc", jpeg, "photo")] * 3
    assert np.array_equal(tfrecords.decode_image(got[0].image, "x"), np.asarray(
        __import__("PIL.Image").Image.open(__import__("io").BytesIO(jpeg))))


@pytest.mark.parametrize("damage, needle", [
    (lambda b: b[:-7], "truncated"),
    (lambda b: b[:40] + bytes([b[40] ^ 0xFF]) + b[41:], "data checksum mismatch"),
    (lambda b: bytes([b[0] ^ 0x01]) + b[1:], r"length checksum mismatch \(corrupt file\)"),
    # TensorFlow's compressed TFRecords (TFRecordOptions): not the competition's, and said so
    (lambda b: __import__("gzip").compress(b), "length checksum mismatch .a gzip-compressed file.*decompress it"),
    (lambda b: __import__("zlib").compress(b), "length checksum mismatch .a zlib-compressed file.*decompress it"),
])
def test_corrupt_tfrecord_is_named(tmp_path, damage, needle):
    path = tmp_path / "x.tfrec"
    tfrecords.write(path, [tfrecords.Example("a", tfrecords.encode_jpeg(_image(1)), "photo")] * 2)
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(DataError, match=needle) as e:
        list(tfrecords.read(path))
    assert str(path) in str(e.value)


def test_equal_examples_make_equal_files_in_every_process(tmp_path):
    # protobuf orders an Example's features differently from process to process unless asked
    # not to; the sample's data/raw then changed bytes (and DVC hash) on every ingest
    code = ("import sys; from pipeline import tfrecords; "
            "tfrecords.write(sys.argv[1], [tfrecords.Example(f'n{i}', bytes(range(i, i + 50)), 'photo') for i in range(4)])")
    paths = [tmp_path / f"{k}.tfrec" for k in range(5)]
    for path in paths:
        subprocess.run([sys.executable, "-c", code, str(path)], check=True)
    assert len({path.read_bytes() for path in paths}) == 1
    assert [ex.image_name for ex in tfrecords.read(paths[0])] == ["n0", "n1", "n2", "n3"]


def _raw_records(path, records):
    from tfrecord.writer import TFRecordWriter

    writer = TFRecordWriter(str(path))
    for record in records:
        writer.write(record)
    writer.close()


@pytest.mark.parametrize("bad, needle", [
    ({"image_name": (b"b", "byte"), "image": (b"jpeg", "byte")}, "record 1: not a competition record .*target"),
    ({"image_name": (b"b", "byte"), "image": ([1, 2], "int"), "target": (b"photo", "byte")},
     "record 1: field 'image' is not a single bytes value"),
    ({"image_name": ([b"b", b"c"], "byte"), "image": (b"jpeg", "byte"), "target": (b"photo", "byte")},
     "record 1: field 'image_name' is not a single bytes value"),
    ({"image_name": (b"\xff", "byte"), "image": (b"jpeg", "byte"), "target": (b"photo", "byte")},
     "record 1: field 'image_name' is not UTF-8 text"),
    ({"image_name": (b"b", "byte"), "image": (b"jpeg", "byte"), "target": (b"\xfe", "byte")},
     "record 1: field 'target' is not UTF-8 text"),
])
def test_a_record_outside_the_schema_is_named(tmp_path, bad, needle):
    good = {"image_name": (b"a", "byte"), "image": (tfrecords.encode_jpeg(_image(1)), "byte"), "target": (b"photo", "byte")}
    path = tmp_path / "x.tfrec"
    _raw_records(path, [good, bad])
    with pytest.raises(DataError, match=needle) as e:
        list(tfrecords.read(path, "mine.tfrec"))
    assert str(e.value).startswith("mine.tfrec: record 1")


def test_a_record_that_is_not_an_example_is_named(tmp_path):
    # valid framing and checksums around bytes that are not a tf.train.Example
    from tfrecord.writer import TFRecordWriter

    body = b"\xff\xff\xff not protobuf"
    path = tmp_path / "x.tfrec"
    path.write_bytes(struct.pack("<Q", len(body)) + TFRecordWriter.masked_crc(struct.pack("<Q", len(body)))
                     + body + TFRecordWriter.masked_crc(body))
    assert tfrecords.verify(path) == 1
    with pytest.raises(DataError, match="record 0: not a competition record"):
        list(tfrecords.read(path))


@pytest.mark.parametrize("pixels, needle", [
    (_image(5, (128, 128, 3)), "128x128 RGB"),
    (_image(5, (256, 256)), "256x256 L"),
])
def test_wrong_image_shape_is_named(pixels, needle):
    with pytest.raises(DataError, match=needle) as e:
        tfrecords.decode_image(tfrecords.encode_jpeg(pixels), "f.tfrec: record 3")
    assert "record 3" in str(e.value)


def test_undecodable_image():
    # Pillow's message named its BytesIO object, an address that changed from run to run
    with pytest.raises(DataError, match=r"^here: image does not decode \(bytes of no image format Pillow reads\)$"):
        tfrecords.decode_image(b"not a jpeg", "here")
    with pytest.raises(DataError, match=r"^here: image does not decode \((OSError|SyntaxError): [^<>]*\)$"):
        tfrecords.decode_image(tfrecords.encode_jpeg(np.zeros((256, 256, 3), np.uint8))[:400], "here")


def _run(tmp_path, source, **kw):
    p = parse({"ingest": {"source": str(source), "shard_size": 3}})
    return ingest.ingest(p, tmp_path / "data/raw", tmp_path / "data/shards", tmp_path / "data/manifest.csv",
                         tmp_path / "cache", **kw)


def test_local_folder_and_zip_give_same_shards(tmp_path):
    comp = _write_competition(tmp_path / "comp")
    m1 = _run(tmp_path / "a", comp)
    zpath = tmp_path / "gan-getting-started.zip"
    with zipfile.ZipFile(zpath, "w") as zf:
        for f in comp.rglob("*.tfrec"):
            zf.write(f, f.relative_to(comp).as_posix())
    m2 = _run(tmp_path / "b", zpath)
    assert m1.equals(m2)
    assert list(m1.columns) == shards.MANIFEST_COLUMNS
    assert (m1["domain"] == "photo").sum() == 4 and (m1["domain"] == "monet").sum() == 3
    names, photos = shards.load_domain(tmp_path / "a/data/shards", m1, "photo")
    assert names == [f"photo{i:03d}" for i in range(4)]
    assert photos.shape == (4, 256, 256, 3) and photos.dtype == torch.uint8
    assert abs(int(photos[2].float().mean()) - 20) <= 1  # JPEG of a flat grey 20
    assert len(list((tmp_path / "a/data/shards").glob("photo-*.pt"))) == 2  # shard_size 3


def test_bad_image_leaves_nothing_half_written(tmp_path):
    comp = _write_competition(tmp_path / "comp", bad=_image(3, (200, 256, 3)))
    with pytest.raises(DataError, match="badimage.*256x200 RGB") as e:
        _run(tmp_path, comp)
    # named as the user has it, not as the temp copy that is gone by now
    assert str(e.value).startswith(f"{comp / 'photo_tfrec/photo00-4.tfrec'}: record 3 (badimage)")
    data = tmp_path / "data"
    assert not (data / "manifest.csv").exists()
    assert not (data / "shards").exists() and not (data / "raw").exists()
    assert not list(data.iterdir())  # no temp folders left either


def test_errors_inside_a_zip_name_the_zip_and_member(tmp_path):
    comp = _write_competition(tmp_path / "comp", bad=_image(3, (200, 256, 3)))
    zpath = tmp_path / "data.zip"
    with zipfile.ZipFile(zpath, "w") as zf:
        for f in comp.rglob("*.tfrec"):
            zf.write(f, "gan/" + f.relative_to(comp).as_posix())
    with pytest.raises(DataError) as e:
        _run(tmp_path / "run", zpath)
    assert str(e.value).startswith(f"{zpath}: gan/photo_tfrec/photo00-4.tfrec: record 3 (badimage)")


def test_duplicate_names_rejected(tmp_path):
    comp = tmp_path / "comp"
    ex = tfrecords.Example("same", tfrecords.encode_jpeg(_image(1)), "monet")
    tfrecords.write(comp / "monet_tfrec/m.tfrec", [ex, ex])
    tfrecords.write(comp / "photo_tfrec/p.tfrec", [ex._replace(target="photo")])
    with pytest.raises(DataError, match=r"m\.tfrec: record 0: image_name 'same' appears twice "
                                         r"\(again at .*m\.tfrec: record 1\)") as e:
        _run(tmp_path, comp)
    assert str(e.value).startswith(str(comp / "monet_tfrec/m.tfrec"))


def _with_photo_names(folder, names):
    examples = [tfrecords.Example(name, tfrecords.encode_jpeg(_image(i)), "photo") for i, name in enumerate(names)]
    paintings = [tfrecords.Example(f"m{i}", tfrecords.encode_jpeg(_image(i)), "monet") for i in range(2)]
    tfrecords.write(folder / "monet_tfrec/m.tfrec", paintings)
    tfrecords.write(folder / "photo_tfrec/p.tfrec", examples)
    return folder


@pytest.mark.parametrize("name", ["../escape", "a/b", "a\\b", "", ".hidden", "tab\there", "x" * 201])
def test_photo_name_that_cannot_name_a_file_is_refused(tmp_path, name):
    # generate saves '<image_name>.jpg': '../escape' would land outside its folder
    comp = _with_photo_names(tmp_path / "comp", ["fine", name])
    with pytest.raises(DataError, match=r"p\.tfrec: record 1: image_name .* cannot name a file"):
        _run(tmp_path, comp)
    assert not list((tmp_path / "data").iterdir())


def test_a_painting_name_the_manifest_cannot_keep_is_refused(tmp_path):
    # a carriage return split its manifest row when read back: "row 2: domain 'x' is not one of ..."
    comp = tmp_path / "comp"
    paintings = [tfrecords.Example(name, tfrecords.encode_jpeg(_image(i)), "monet") for i, name in enumerate(["m1\rx", "m2"])]
    tfrecords.write(comp / "monet_tfrec/m.tfrec", paintings)
    tfrecords.write(comp / "photo_tfrec/p.tfrec", [tfrecords.Example(f"p{i}", tfrecords.encode_jpeg(_image(i)), "photo")
                                                   for i in range(2)])
    with pytest.raises(DataError, match=r"m\.tfrec: record 0: image_name 'm1\\rx' holds control characters"):
        _run(tmp_path, comp)
    assert not list((tmp_path / "data").iterdir())


def test_photo_names_differing_only_in_case_are_refused(tmp_path):
    comp = _with_photo_names(tmp_path / "comp", ["Scene1", "other", "scene1"])
    with pytest.raises(DataError, match=r"p\.tfrec: record 0: image_name 'Scene1' and 'scene1' "
                                         r"\(.*p\.tfrec: record 2\) differ only in case"):
        _run(tmp_path, comp)


def test_photo_names_differing_only_in_unicode_normalisation_are_refused(tmp_path):
    # 'café' as one character and as 'e' + a combining accent: one file name on macOS
    comp = _with_photo_names(tmp_path / "comp", ["caf\u00e9", "cafe\u0301"])
    with pytest.raises(DataError, match=r"p\.tfrec: record 0: image_name .* differ only in case or Unicode "
                                         r"normalisation"):
        _run(tmp_path, comp)


def test_names_pandas_would_read_as_missing_survive_the_manifest(tmp_path):
    names = ["NA", "null", "nan", "1e5", "0012", "Ünïcode name"]
    comp = _with_photo_names(tmp_path / "comp", names)
    _run(tmp_path, comp)
    manifest = shards.read_manifest(tmp_path / "data/manifest.csv")
    assert manifest.loc[manifest["domain"] == "photo", "image_name"].tolist() == names


@pytest.mark.parametrize("dvc_root", [False, True])
def test_a_relative_source_is_under_the_main_repository(tmp_path, monkeypatch, dvc_root):
    # `dvc exp run --temp` and queued runs execute in .dvc/tmp/exps/..., without untracked files
    repo = tmp_path / "repo"
    _write_competition(repo / "my data")
    queued = repo / ".dvc/tmp/exps/tmp1a2b"
    queued.mkdir(parents=True)
    monkeypatch.chdir(queued)
    if dvc_root:
        monkeypatch.setenv("DVC_ROOT", str(repo))
    else:
        monkeypatch.delenv("DVC_ROOT", raising=False)
    p = parse({"ingest": {"source": "my data"}})
    manifest = ingest.ingest(p, Path("data/raw"), Path("data/shards"), Path("data/manifest.csv"), tmp_path / "cache")
    assert (manifest["domain"] == "photo").sum() == 4 and (queued / "data/manifest.csv").exists()
    with pytest.raises(PipelineError, match=f"ingest.source: {repo / 'gone.zip'} does not exist"):
        ingest.ingest(parse({"ingest": {"source": "gone.zip"}}), Path("data/raw"), Path("data/shards"),
                      Path("data/manifest.csv"), tmp_path / "cache")


@pytest.mark.parametrize("n_monet, n_photo, folder", [(1, 4, "monet_tfrec"), (3, 1, "photo_tfrec")])
def test_a_set_too_small_to_score_is_refused_at_ingest(tmp_path, n_monet, n_photo, folder):
    # one photo trained and generated, then evaluate failed on a covariance of one row (a traceback)
    comp = _write_competition(tmp_path / "comp", n_monet=n_monet, n_photo=n_photo)
    with pytest.raises(DataError, match=rf"ingest.source {comp}: {folder} holds 1 image\(s\); the pipeline needs "
                                        rf"at least 2 photos and 2 paintings"):
        _run(tmp_path, comp)
    assert not (tmp_path / "data/shards").exists() and not (tmp_path / "data/manifest.csv").exists()


@pytest.mark.parametrize("given", ["photo_tfrec", "photo_tfrec/photo00-4.tfrec"])
def test_one_tfrecord_folder_or_file_names_the_folder_to_give(tmp_path, given):
    # a folder of TFRecords read "<it>/monet_tfrec: no .tfrec files"; a file read "not a readable zip"
    comp = _write_competition(tmp_path / "comp")
    kind = "a TFRecord file" if given.endswith(".tfrec") else "a folder of TFRecords"
    with pytest.raises(DataError, match=rf"^{comp / given}: {kind}; ingest.source takes the competition zip or the "
                                        rf"folder that holds monet_tfrec/ and photo_tfrec/ \(here perhaps {comp}\)$"):
        _run(tmp_path, comp / given)
    shutil.copy(comp / "photo_tfrec/photo00-4.tfrec", comp / "stray.tfrec")  # beside the two folders: fine
    assert len(_run(tmp_path / "whole", comp)) == 7


def test_a_tar_archive_is_named_as_one(tmp_path):
    comp = _write_competition(tmp_path / "comp")
    with tarfile.open(tmp_path / "comp.tar.gz", "w:gz") as tar:
        tar.add(comp, "gan-getting-started")
    with pytest.raises(DataError, match=r"comp.tar.gz: a tar archive, not a zip; extract it and give the folder"):
        _run(tmp_path / "run", tmp_path / "comp.tar.gz")


def test_missing_source_and_wrong_folder(tmp_path):
    with pytest.raises(PipelineError, match="does not exist"):
        _run(tmp_path, tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no .tfrec files"):
        _run(tmp_path, tmp_path / "empty")


NO_NETWORK = (r"; with no network here, download gan-getting-started\.zip elsewhere and put it at "
              r"\S*cache/gan-getting-started\.zip, or give its path as ingest\.source$")


def test_killed_before_its_manifest_is_written_ingest_leaves_no_old_one_beside_the_new_shards(tmp_path, monkeypatch):
    # the new shards went into place, then the new manifest: a kill in between left the old manifest
    # over the new shards, and generate named one seed's pixels after the other seed's photos
    first = parse({"seed": 0, "ingest": {"sample_photos": 5, "sample_paintings": 3}})
    out = [tmp_path / "raw", tmp_path / "shards", tmp_path / "manifest.csv", tmp_path / "cache"]
    ingest.ingest(first, *out)
    old_shards = (tmp_path / "shards/photo-000.pt").read_bytes()

    def killed(path):
        raise KeyboardInterrupt  # where kill -9 would stop it, the shards just renamed

    monkeypatch.setattr(ingest, "atomic_path", killed)
    with pytest.raises(KeyboardInterrupt):
        ingest.ingest(parse({"seed": 1, "ingest": {"sample_photos": 5, "sample_paintings": 3}}), *out)
    assert (tmp_path / "shards/photo-000.pt").read_bytes() != old_shards  # the new ones
    with pytest.raises(DataError, match="manifest not found"):
        shards.read_manifest(tmp_path / "manifest.csv")


def test_the_jpeg_copies_alone_are_named_as_such(tmp_path):
    # Kaggle's zip holds each image twice; a user who kept only the JPEG folders was asked "is this
    # the gan-getting-started folder?", which it is
    jpegs = tmp_path / "gan-getting-started"
    for folder in competition.JPEG_DIRS:
        (jpegs / folder).mkdir(parents=True)
        (jpegs / folder / "a.jpg").write_bytes(tfrecords.encode_jpeg(_image(1)))
    needle = (r"it holds monet_jpg/ and photo_jpg/, the JPEG copies, which ingest does not read: it takes "
              r"monet_tfrec/ and photo_tfrec/, as the gan-getting-started zip has them$")
    with pytest.raises(DataError, match=needle):
        _run(tmp_path / "a", jpegs)
    archive = shutil.make_archive(str(tmp_path / "jpegs"), "zip", tmp_path, jpegs.name)
    with pytest.raises(DataError, match=needle):
        _run(tmp_path / "b", archive)


class _FakeApi:
    """Kaggle's client as the pipeline uses it; `downloads` counts the archives it handed out."""
    downloads = 0

    def __init__(self, comp_zip=None, error=None, cut_after=None):
        self.comp_zip, self.error, self.cut_after = comp_zip, error, cut_after

    def competition_download_files(self, competition, path, quiet):
        assert competition == "gan-getting-started"
        if self.error:
            raise self.error
        data = self.comp_zip.read_bytes()
        out = Path(path) / f"{competition}.zip"
        if self.cut_after is not None:  # the connection drops: part of the file, then an error
            out.write_bytes(data[:self.cut_after])
            raise ConnectionError("connection reset by peer")
        out.write_bytes(data)
        _FakeApi.downloads += 1


def _competition_zip(tmp_path) -> Path:
    comp = _write_competition(tmp_path / "comp")
    zpath = tmp_path / "c.zip"
    with zipfile.ZipFile(zpath, "w") as zf:
        for f in comp.rglob("*.tfrec"):
            zf.write(f, f.relative_to(comp).as_posix())
    return zpath


def test_kaggle_download_path_downloads_once(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(_FakeApi, "downloads", 0)
    zpath = _competition_zip(tmp_path)
    m = _run(tmp_path / "k", "kaggle", api_factory=lambda: _FakeApi(zpath))
    assert len(m) == 7 and _FakeApi.downloads == 1
    cached = tmp_path / "k/cache/gan-getting-started.zip"
    assert cached.read_bytes() == zpath.read_bytes()
    # another ingest param, and a re-run: the cached archive, not a second download
    p = parse({"ingest": {"source": "kaggle", "shard_size": 2}})
    k = tmp_path / "k"
    m2 = ingest.ingest(p, k / "data/raw", k / "data/shards", k / "data/manifest.csv", k / "cache",
                       api_factory=lambda: _FakeApi(zpath))
    assert _FakeApi.downloads == 1 and len(m2) == 7
    assert "from the download cache" in capsys.readouterr().out


def test_a_download_that_never_starts_is_not_said_to_break_off(tmp_path):
    # a username and key are not checked when signing in: with no network the download is Kaggle's
    # first request, and "the download broke off" was the line for it
    error = requests.ConnectionError("HTTPSConnectionPool(host='www.kaggle.com', port=443): Max retries exceeded "
                                     "(Caused by NameResolutionError(\"Failed to resolve 'www.kaggle.com'\"))")
    with pytest.raises(PipelineError, match=r"^ingest\.source=kaggle: cannot reach Kaggle to download "
                                            r"gan-getting-started \(NameResolutionError\)" + NO_NETWORK):
        _run(tmp_path, "kaggle", api_factory=lambda: _FakeApi(error=error))
    assert not list((tmp_path / "cache").iterdir())


def test_what_the_client_says_when_signing_in_is_said_once(tmp_path):
    # `import kaggle` signs in as well as the stage: its warning on a kaggle.json others may read came twice
    (tmp_path / ".kaggle").mkdir()
    (tmp_path / ".kaggle/kaggle.json").write_text('{"username": "bob", "key": "0123456789abcdef"}')
    (tmp_path / ".kaggle/kaggle.json").chmod(0o644)
    env = {k: v for k, v in os.environ.items() if not k.startswith("KAGGLE_")}
    res = subprocess.run([sys.executable, "-c", "from pipeline import kaggle_download; kaggle_download.kaggle_api()"],
                         env={**env, "HOME": str(tmp_path)}, capture_output=True, text=True, timeout=120, check=True)
    warnings = [line for line in res.stderr.splitlines() if "readable by other users" in line]
    assert len(warnings) == 1, res.stderr


def test_interrupted_download_never_looks_complete(tmp_path, monkeypatch):
    monkeypatch.setattr(_FakeApi, "downloads", 0)
    zpath = _competition_zip(tmp_path)
    with pytest.raises(PipelineError, match=r"the download of gan-getting-started broke off \(ConnectionError: "
                                            r"connection reset by peer\)" + NO_NETWORK):
        _run(tmp_path, "kaggle", api_factory=lambda: _FakeApi(zpath, cut_after=100))
    cache = tmp_path / "cache"
    assert not (cache / "gan-getting-started.zip").exists() and not list(cache.iterdir())
    assert not (tmp_path / "data/raw").exists()
    # a download that completes but is not a zip is not cached either
    bad = tmp_path / "bad.zip"
    bad.write_bytes(b"<html>rate limited</html>")
    with pytest.raises(DataError, match="not a readable zip"):
        _run(tmp_path, "kaggle", api_factory=lambda: _FakeApi(bad))
    assert not list(cache.iterdir())
    assert len(_run(tmp_path, "kaggle", api_factory=lambda: _FakeApi(zpath))) == 7
    assert _FakeApi.downloads == 2  # the bad one, then the good one: nothing half-done was reused


def test_a_damaged_cached_download_says_how_to_download_again(tmp_path, monkeypatch):
    # the listing was checked before it was cached; a damaged byte inside a member shows only now
    monkeypatch.setattr(_FakeApi, "downloads", 0)
    zpath = _competition_zip(tmp_path)
    _run(tmp_path / "k", "kaggle", api_factory=lambda: _FakeApi(zpath))
    cached = tmp_path / "k/cache/gan-getting-started.zip"
    info = zipfile.ZipFile(cached).infolist()[0]
    data = bytearray(cached.read_bytes())
    data[info.header_offset + 30 + len(info.filename) + 100] ^= 0xFF
    cached.write_bytes(bytes(data))
    shutil.rmtree(tmp_path / "k/data")
    with pytest.raises(DataError, match=rf"^{cached}: member '{info.filename}' is damaged .*; get a fresh copy of the "
                                        rf"archive \(the cached download: delete it to download again\)$"):
        _run(tmp_path / "k", "kaggle", api_factory=lambda: _FakeApi(zpath))
    assert _FakeApi.downloads == 1 and not any((tmp_path / "k/data").iterdir())  # nothing written


class _Forbidden(Exception):
    status = 403


class _Unauthorized(Exception):
    status_code = 401


def test_kaggle_rules_not_accepted(tmp_path):
    with pytest.raises(PipelineError, match="HTTP 403.*accept the rules"):
        _run(tmp_path, "kaggle", api_factory=lambda: _FakeApi(error=_Forbidden("Forbidden")))
    assert not (tmp_path / "data/raw").exists()


def test_credentials_kaggle_refuses_at_the_download_are_not_called_the_rules(tmp_path):
    # a username and key are first checked by the download: HTTP 401 said "accept the rules"
    with pytest.raises(PipelineError, match=r"Kaggle refused the credentials \(HTTP 401\); check KAGGLE_KEY") as e:
        _run(tmp_path, "kaggle", api_factory=lambda: _FakeApi(error=_Unauthorized("Unauthorized")))
    assert "rules" not in str(e.value) and not (tmp_path / "data/raw").exists()


def test_a_download_cut_short_says_so_and_caches_nothing(tmp_path):
    # a server that sends no length and stops halfway: the line named the temp folder, already gone
    zpath = _competition_zip(tmp_path)
    half = tmp_path / "half.zip"
    half.write_bytes(zpath.read_bytes()[: zpath.stat().st_size // 2])
    with pytest.raises(DataError, match=r"^ingest.source=kaggle: the download of gan-getting-started is not a whole "
                                        r"zip \(not a readable zip .*\); nothing was cached") as e:
        _run(tmp_path, "kaggle", api_factory=lambda: _FakeApi(half))
    assert ".tmp" not in str(e.value) and not list((tmp_path / "cache").iterdir())


def test_a_slow_download_is_not_taken_for_a_stalled_one(tmp_path, monkeypatch):
    # the client wrote 1 MiB at a time: under 8.7 KB/s the file did not grow for 120 s and the
    # watchdog gave up on a download that was still arriving
    monkeypatch.setattr(kaggle_download, "STALL_SECONDS", 0.5)
    monkeypatch.setattr(kaggle_download, "DOWNLOAD_CHUNK", 2048)  # the tiny zip's scale of 16 KiB in 386 MB
    data = _competition_zip(tmp_path).read_bytes()

    class Trickling(_FakeApi):
        def download_file(self, response, outfile, http_client, quiet=True, resume=False, chunk_size=1 << 20):
            arrived, written = b"", 0
            with open(outfile, "wb") as out:
                for k in range(0, len(data), 1024):  # 1 KiB every 0.1 s, written a chunk at a time
                    arrived += data[k:k + 1024]
                    time.sleep(0.1)
                    if len(arrived) - written >= chunk_size:
                        out.write(arrived[written:])
                        out.flush()
                        written = len(arrived)
                out.write(arrived[written:])

        def competition_download_files(self, competition, path, quiet):
            self.download_file(None, str(Path(path) / f"{competition}.zip"), None, quiet)

    assert len(data) > 6 * 1024  # over 0.5 s of arrival
    manifest = _run(tmp_path, "kaggle", api_factory=Trickling)
    assert len(manifest) == 7


def _no_kaggle_credentials(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("KAGGLE_CONFIG_DIR", str(tmp_path / "nokaggle"))
    for var in ("KAGGLE_USERNAME", "KAGGLE_KEY", "KAGGLE_API_TOKEN"):
        monkeypatch.delenv(var, raising=False)


def test_kaggle_missing_credentials(tmp_path, monkeypatch, capsys):
    # the real client: with no credentials anywhere it raises SystemExit, which we turn into one line
    _no_kaggle_credentials(tmp_path, monkeypatch)
    with pytest.raises(PipelineError, match="no Kaggle credentials"):
        _run(tmp_path, "kaggle")
    out = capsys.readouterr()
    assert out.out == out.err == ""  # not the client's page of sign-up help beside the line


def test_an_empty_token_file_is_no_token(tmp_path, monkeypatch):
    # the client skips an empty ~/.kaggle/access_token: "did not accept the token" was the line
    _no_kaggle_credentials(tmp_path, monkeypatch)
    (tmp_path / ".kaggle").mkdir()
    (tmp_path / ".kaggle/access_token").write_text("\n")
    with pytest.raises(PipelineError, match="no Kaggle credentials"):
        _run(tmp_path, "kaggle")


@pytest.mark.parametrize("where", ["KAGGLE_API_TOKEN", "~/.kaggle/access_token"])
def test_a_token_kaggle_does_not_accept_is_said_so(where, tmp_path, monkeypatch, capsys):
    # the real client checks a token online and, when Kaggle does not know it, goes on as if there
    # were none: "no credentials found" was the line, beside a token the user had just set
    from kaggle.api.kaggle_api_extended import KaggleApi

    _no_kaggle_credentials(tmp_path, monkeypatch)
    if where == "KAGGLE_API_TOKEN":
        monkeypatch.setenv("KAGGLE_API_TOKEN", "KGAT_expired")
    else:
        (tmp_path / ".kaggle").mkdir()
        (tmp_path / ".kaggle/access_token").write_text("KGAT_expired\n")
    monkeypatch.setattr(KaggleApi, "_introspect_token", lambda self, token: None)  # what Kaggle says of it
    with pytest.raises(PipelineError, match=f"Kaggle did not accept the token in {where} .expired or mistyped"):
        _run(tmp_path, "kaggle")
    out = capsys.readouterr()
    assert out.out == out.err == ""


@pytest.mark.parametrize("error, needle", [
    (ConnectionError("Failed to resolve 'api.kaggle.com'"),
     r"cannot reach Kaggle to sign in \(ConnectionError: Failed to resolve 'api\.kaggle\.com'\)" + NO_NETWORK),
    (requests.ConnectionError(
        "HTTPSConnectionPool(host='api.kaggle.com', port=443): Max retries exceeded with url: /v1/x (Caused by "
        "NameResolutionError(\"<urllib3.connection.HTTPSConnection object>: Failed to resolve 'api.kaggle.com'\"))"),
     r"cannot reach Kaggle to sign in \(NameResolutionError\)" + NO_NETWORK),
    (_Unauthorized("Unauthorized"), "signing in to Kaggle failed: Kaggle refused the credentials \\(HTTP 401\\)"),
])
def test_kaggle_sign_in_that_fails_online_is_one_line(error, needle, tmp_path, monkeypatch):
    """A token is checked with Kaggle when the client signs in: no network, or a wrong token."""
    from kaggle.api.kaggle_api_extended import KaggleApi

    def refuse(self):
        raise error

    monkeypatch.setenv("KAGGLE_API_TOKEN", "not-a-token")
    monkeypatch.setattr(KaggleApi, "authenticate", refuse)
    with pytest.raises(PipelineError, match=needle):
        _run(tmp_path, "kaggle")
    assert not list((tmp_path / "data").iterdir())  # nothing written, no temp folder left


@pytest.mark.parametrize("kaggle_json, env, needle", [
    ('{"username": "bob", "key": ', {}, r"kaggle\.json is not valid JSON \(Expecting value: line 1 column 28"),
    ('{"username": "bob"}', {}, r"a Kaggle username is set \('username' in \S+kaggle\.json\) but no key; set "
                               r"KAGGLE_KEY or add 'key' to \S+kaggle\.json$"),
    ("[]", {}, r"kaggle\.json is not a JSON object with 'username' and 'key'$"),
    ("{}", {}, r"kaggle\.json holds no 'username' and 'key'$"),
    (None, {"KAGGLE_USERNAME": "bob"}, r"a Kaggle username is set \(KAGGLE_USERNAME\) but no key"),
    (None, {"KAGGLE_KEY": "0123"}, r"a Kaggle key is set \(KAGGLE_KEY\) but no username; set KAGGLE_USERNAME"),
])
def test_broken_or_half_given_kaggle_credentials_say_what_is_wrong(kaggle_json, env, needle, tmp_path,
                                                                     monkeypatch):
    # the client reads them as no credentials at all: "save ~/.kaggle/kaggle.json" was the line, to a
    # user who had saved it with a typo
    from kaggle.api.kaggle_api_extended import KaggleApi

    _no_kaggle_credentials(tmp_path, monkeypatch)
    config = tmp_path / ".kaggle/kaggle.json"
    config.parent.mkdir()
    if kaggle_json is not None:
        config.write_text(kaggle_json)
        config.chmod(0o600)
    monkeypatch.setattr(KaggleApi, "config", str(config))  # read once, when the client is first imported
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    with pytest.raises(PipelineError, match=r"^ingest\.source=kaggle: .*" + needle):
        _run(tmp_path, "kaggle")


def _blocked(event):
    """A Kaggle client call on a network that takes the connection and never answers."""
    def call(*args, **kwargs):
        event.wait(60)
    return call


def test_a_kaggle_that_never_answers_is_given_up_on(tmp_path, monkeypatch):
    # the client sets no timeout on its requests: the stage hung, silent, until killed
    from kaggle.api.kaggle_api_extended import KaggleApi

    monkeypatch.setattr(kaggle_download, "STALL_SECONDS", 0.5)
    monkeypatch.setenv("KAGGLE_API_TOKEN", "checked-online")
    never = __import__("threading").Event()
    monkeypatch.setattr(KaggleApi, "authenticate", _blocked(never))
    streams = sys.stdout, sys.stderr
    try:
        with pytest.raises(PipelineError, match=r"no answer from Kaggle for 0\.5 s while signing in" + NO_NETWORK):
            _run(tmp_path / "a", "kaggle")
        # the sign-in's output is held back while it runs; given up on, it must not keep the stage's
        # own error line from the terminal
        assert (sys.stdout, sys.stderr) == streams

        class Stalling(_FakeApi):
            def competition_download_files(self, competition, path, quiet):
                (Path(path) / f"{competition}.zip").write_bytes(b"PK" * 1000)  # a first part, then silence
                never.wait(60)

        with pytest.raises(PipelineError, match=r"no answer from Kaggle for 0\.5 s while downloading "
                                                r"gan-getting-started" + NO_NETWORK):
            _run(tmp_path / "b", "kaggle", api_factory=Stalling)
        assert not list((tmp_path / "b/cache").iterdir())  # no part of a zip, no temp folder
        assert not (tmp_path / "b/data/raw").exists()
    finally:
        never.set()


def test_a_download_killed_outright_leaves_nothing_the_next_one_keeps(tmp_path, repo_root):
    # kill -9 (or SIGTERM, or SIGHUP: no `finally` runs) left the part in .cache/downloads for good:
    # up to 386 MB a time
    cache = tmp_path / "cache"
    script = (f"from pathlib import Path\nimport time\nfrom pipeline import kaggle_download\n"
              f"class Api:\n"
              f"    def competition_download_files(self, competition, path, quiet):\n"
              f"        (Path(path) / 'part.zip').write_bytes(bytes(1 << 20))\n"
              f"        time.sleep(600)\n"
              f"kaggle_download.download(Path({str(cache)!r}), api_factory=Api)\n")
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=repo_root)
    try:
        for _ in range(600):
            if list(cache.glob(".*.tmp/part.zip")):
                break
            time.sleep(0.1)
        assert list(cache.glob(".*.tmp/part.zip")), "the download never started"
    finally:
        proc.kill()
        proc.wait()
    zpath = _competition_zip(tmp_path)
    assert len(_run(tmp_path, "kaggle", api_factory=lambda: _FakeApi(zpath))) == 7
    assert [f.name for f in cache.iterdir()] == ["gan-getting-started.zip"]


def test_kaggle_missing_credentials_is_one_line_from_the_stage(tmp_path, monkeypatch, repo_root):
    """The stage as DVC runs it, the `kaggle` package imported fresh (its import authenticates too)."""
    _no_kaggle_credentials(tmp_path, monkeypatch)
    (tmp_path / "params.yaml").write_text("ingest:\n  source: kaggle\n")
    monkeypatch.setenv("PYTHONPATH", str(repo_root))
    res = subprocess.run([sys.executable, "-m", "pipeline.ingest", "--raw", "raw", "--shards", "shards",
                          "--manifest", "manifest.csv", "--download-cache", "cache"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2
    assert res.stdout == "" and res.stderr.startswith("error: ingest.source=kaggle: no Kaggle credentials")
    assert len(res.stderr.splitlines()) == 1, res.stderr
    assert not [n for n in ("raw", "shards", "manifest.csv", "cache") if (tmp_path / n).exists()]


def test_sample_round_trip_in_the_kaggle_schema(tmp_path):
    from tfrecord.reader import example_loader

    from pipeline import sample

    p = parse({"ingest": {"source": "sample", "sample_photos": 5, "sample_paintings": 3, "shard_size": 4}})
    manifest = ingest.ingest(p, tmp_path / "raw", tmp_path / "shards", tmp_path / "manifest.csv", tmp_path / "cache")
    files = sorted((tmp_path / "raw/photo_tfrec").glob("*.tfrec"))
    assert [f.name for f in files] == [f"photo{k:02d}-1.tfrec" for k in range(5)]
    # read with the tfrecord package alone: exactly the competition's three byte features
    rec = next(iter(example_loader(str(files[0]), None)))
    assert set(rec) == {"image_name", "image", "target"}
    assert bytes(rec["target"]) == b"photo" and bytes(rec["image"])[:2] == b"\xff\xd8"  # a JPEG
    names, photos = shards.load_domain(tmp_path / "shards", manifest, "photo")
    assert names == [sample.sample_name(0, "photo", i) for i in range(5)]
    rendered = sample.render_batch(0, [sample.photo_index(i) for i in range(5)], "photo")
    err = np.abs(photos.numpy().astype(int) - rendered.astype(int)).mean()
    assert err < 4  # only JPEG (quality 95) loss between the render and the shard
    _, monets = shards.load_domain(tmp_path / "shards", manifest, "monet")
    truth = sample.render_batch(0, [sample.monet_index(i) for i in range(3)], "monet")
    assert np.abs(monets.numpy().astype(int) - truth.astype(int)).mean() < 6


def test_more_than_a_thousand_shards_read_back_in_manifest_order(tmp_path):
    # shard names carry 3 digits, so past 1,000 shards their names no longer sort in write order
    n = 1003
    items = [({"image_name": f"p{i:04d}", "tfrecord": "t", "record": i},
              np.full((2, 2, 3), i % 256, dtype=np.uint8)) for i in range(n)]
    rows = shards.write_domain(items, tmp_path, "photo", shard_size=1)
    manifest = pd.DataFrame(rows)[shards.MANIFEST_COLUMNS]
    names, images = shards.load_domain(tmp_path, manifest, "photo")
    assert names == [f"p{i:04d}" for i in range(n)]
    assert images[:, 0, 0, 0].tolist() == [i % 256 for i in range(n)]


def test_a_manifest_whose_rows_alternate_between_shards_reads_in_its_order(tmp_path):
    # grouped by shard, the pixels came back in another order than the names the manifest lists
    items = [({"image_name": f"p{i}", "tfrecord": "t", "record": i}, np.full((2, 2, 3), i, dtype=np.uint8))
             for i in range(4)]
    manifest = pd.DataFrame(shards.write_domain(items, tmp_path, "photo", shard_size=2))[shards.MANIFEST_COLUMNS]
    alternating = manifest.iloc[[0, 2, 1, 3]].reset_index(drop=True)  # photo-000, photo-001, photo-000, photo-001
    names, images = shards.load_domain(tmp_path, alternating, "photo")
    assert names == ["p0", "p2", "p1", "p3"] and images[:, 0, 0, 0].tolist() == [0, 2, 1, 3]


@pytest.fixture(scope="module")
def small_manifest(tmp_path_factory):
    """A manifest and shards as ingest writes them: 3 photos, 2 paintings, 32 px."""
    folder = tmp_path_factory.mktemp("manifest")
    rows = []
    for domain, n in (("photo", 3), ("monet", 2)):
        items = [({"image_name": f"{domain}{i}", "tfrecord": "t", "record": i},
                  np.full((32, 32, 3), 40 * i, dtype=np.uint8)) for i in range(n)]
        rows += shards.write_domain(items, folder / "shards", domain, shard_size=2)
    path = folder / "manifest.csv"
    pd.DataFrame(rows)[shards.MANIFEST_COLUMNS].to_csv(path, index=False)
    return folder, path


@pytest.mark.parametrize("edit, needle", [
    (lambda m: m.replace(b"photo1,", b"../../evil,"), r"row 2: image_name '../../evil' cannot name a file"),
    (lambda m: m.replace(b"photo2,", b"photo1,"), r"row 2: image_name 'photo1' appears twice \(again at .*row 3\)"),
    (lambda m: m.replace(b"photo,photo0", b"Photo,photo0"), r"row 1: domain 'Photo' is not one of monet, photo"),
    (lambda m: m.replace(b"photo-001.pt,0", b"photo-001.pt,-1"), r"row 3: offset '-1' is not a whole number"),
    (lambda m: m.replace(b"photo-001.pt,0", b"photo-001.pt,x"), r"row 3: offset 'x' is not a whole number"),
    (lambda m: m.replace(b"photo-001.pt,0", b"photo-001.pt,inf"), r"row 3: offset 'inf' is not a whole number"),
    (lambda m: m.replace(b"photo-001.pt,0", b"photo-001.pt,1e30"), r"row 3: offset '1e30' is not a whole number"),
    (lambda m: m.replace(b"photo-000.pt,1", b"photo-000.pt,0"),
     r"row 1: shard 'photo-000.pt' offset 0 is listed twice \(again at row 2\)"),
    (lambda m: m.replace(b"photo-001.pt", b"../manifest.csv"), r"row 3: shard '../manifest.csv' is not a shard"),
    (lambda m: m.replace(b"photo-001.pt", b"monet-000.pt"), r"row 3: shard 'monet-000.pt' is not a shard of its"),
    (lambda m: b"", r"not a readable manifest \(EmptyDataError"),
    (lambda m: m + b'"unclosed,quote\n', r"not a readable manifest \(ParserError"),
    (lambda m: bytes(range(256)) * 4, r"not a readable manifest"),
])
def test_a_damaged_or_edited_manifest_is_one_line(small_manifest, tmp_path, edit, needle):
    # every later stage trusts the manifest: generate writes '<image_name>.jpg' under its folder
    folder, path = small_manifest
    damaged = tmp_path / "manifest.csv"
    damaged.write_bytes(edit(path.read_bytes()))
    assert damaged.read_bytes() != path.read_bytes()
    with pytest.raises(DataError, match=needle) as e:
        shards.read_manifest(damaged)
    assert str(e.value).startswith(str(damaged)) and "\n" not in str(e.value)


@pytest.mark.parametrize("damage, needle", [
    ("truncated", r"not a readable shard \(\w+Error: .*\); run the ingest stage again"),
    ("random bytes", r"not a readable shard"),
    ("a dict", r"expected a uint8 N×H×W×3 tensor, got dict"),
    ("not square", r"expected uint8 N×H×W×3 with H = W, got torch.uint8 \(2, 20, 32, 3\)"),
])
def test_a_damaged_shard_is_one_line(small_manifest, tmp_path, damage, needle):
    folder, path = small_manifest
    shutil.copytree(folder / "shards", tmp_path / "shards")
    shard = tmp_path / "shards/photo-000.pt"
    if damage == "truncated":
        shard.write_bytes(shard.read_bytes()[:1000])
    elif damage == "random bytes":
        shard.write_bytes(np.random.default_rng(0).bytes(5000))
    else:
        torch.save({"a": 1} if damage == "a dict" else torch.zeros(2, 20, 32, 3, dtype=torch.uint8), shard)
    with pytest.raises(DataError, match=needle) as e:
        shards.load_domain(tmp_path / "shards", shards.read_manifest(path), "photo")
    assert str(e.value).startswith(str(shard))
