"""Archives that fight back: refused from their listing, before a byte is extracted, with one
line naming the archive and the member; and TFRecords read one record at a time."""
import os
import re
import stat
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest

from pipeline import competition, ingest, tfrecords
from pipeline.errors import DataError
from pipeline.params import parse
from tfrecord.writer import TFRecordWriter

ZEROS = bytes(16 << 20)


def _tiny_tfrec(folder, domain: str) -> bytes:
    """One TFRecord file of two flat 256×256 images (the fewest ingest takes), as bytes."""
    jpegs = [tfrecords.encode_jpeg(np.full((256, 256, 3), value, np.uint8)) for value in (90, 160)]
    tfrecords.write(folder / f"{domain}.tfrec", [tfrecords.Example(f"{domain}{i}", jpeg, domain)
                                                 for i, jpeg in enumerate(jpegs)])
    return (folder / f"{domain}.tfrec").read_bytes()


def _zip(path, members: dict[str, bytes | int], links: dict[str, str] = {}):
    """A zip of `members` (an int: that many zero bytes, streamed) and symlink entries."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        for name, data in members.items():
            if isinstance(data, int):
                with zf.open(name, "w", force_zip64=True) as out:
                    for left in range(data, 0, -len(ZEROS)):
                        out.write(ZEROS[:min(left, len(ZEROS))])
            else:
                zf.writestr(name, data)
        for name, target in links.items():
            info = zipfile.ZipInfo(name)
            info.create_system, info.external_attr = 3, (stat.S_IFLNK | 0o777) << 16
            zf.writestr(info, target)
    return path


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tfrec")
    return {"monet_tfrec/monet00-2.tfrec": _tiny_tfrec(folder, "monet"),
            "photo_tfrec/photo00-2.tfrec": _tiny_tfrec(folder, "photo")}


def _ingest(tmp_path, source):
    p = parse({"ingest": {"source": str(source)}})
    return ingest.ingest(p, tmp_path / "data/raw", tmp_path / "data/shards", tmp_path / "data/manifest.csv",
                         tmp_path / "cache")


def _refused(tmp_path, archive, needle):
    with pytest.raises(DataError, match=needle) as e:
        _ingest(tmp_path, archive)
    assert str(archive) in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "data").exists() or not any((tmp_path / "data").iterdir())  # nothing written


def test_a_bomb_is_refused_from_its_listing(tmp_path, good, monkeypatch):
    # one member of zeros just above the cap (the bench uses the 2 GiB one): never opened
    archive = _zip(tmp_path / "bomb.zip", {**good, "photo_tfrec/photo01-9.tfrec": competition.MAX_FILE + 1})
    assert archive.stat().st_size < 2 << 20
    opened = []
    monkeypatch.setattr(zipfile.ZipFile, "open", lambda self, *a, **k: opened.append(a) or 1 / 0)
    _refused(tmp_path, archive, r"photo_tfrec/photo01-9.tfrec is 256 MiB, above the 256 MiB")
    assert not opened


def test_right_names_but_far_too_large_in_all(tmp_path, good):
    each = competition.MAX_FILE - (8 << 20)  # every member under the file cap, the total above
    count = competition.MAX_TOTAL // each + 1
    archive = _zip(tmp_path / "big.zip", {**good, **{f"photo_tfrec/photo{k:02d}.tfrec": each for k in range(count)}})
    _refused(tmp_path, archive, r"the TFRecords total 2,\d+ MiB, above the 2,048 MiB")


@pytest.mark.parametrize("name, why", [
    ("../escape.tfrec", r"climbs out of the target"),
    ("photo_tfrec/../../escape.tfrec", r"climbs out of the target"),
    ("/tmp/escape.tfrec", r"has an absolute name"),
    ("C:/escape.tfrec", r"has an absolute name"),
    ("monet_tfrec/monet00-2.tfrec", r"appears twice"),
    ("monet_tfrec\\monet00-2.tfrec", r"appears twice"),  # the same file, as a Windows tool may write it
])
def test_hostile_names_refuse_the_archive(tmp_path, good, name, why):
    archive = tmp_path / "hostile.zip"
    with pytest.warns(UserWarning) if name in good else _no_warning():  # zipfile warns on a duplicate
        _zip(archive, good)
        with zipfile.ZipFile(archive, "a") as zf:
            zf.writestr(name, b"x")
    _refused(tmp_path, archive, re.escape(f"member '{name}' ") + why + "; refusing the archive")
    assert not (tmp_path / "escape.tfrec").exists() and not (tmp_path.parent / "escape.tfrec").exists()


def test_a_link_refuses_the_archive(tmp_path, good):
    archive = _zip(tmp_path / "link.zip", good, links={"photo_tfrec/photo01-1.tfrec": "/etc/passwd"})
    _refused(tmp_path, archive, "member 'photo_tfrec/photo01-1.tfrec' is a link")


def test_other_members_are_skipped_unread(tmp_path, good, monkeypatch):
    # the Kaggle zip also holds the JPEG copies: not read, whatever their size
    archive = _zip(tmp_path / "with-jpgs.zip", {**good, "photo_jpg/x.jpg": b"jpeg", "big/zeros.bin": 64 << 20})
    opened = []
    real_open = zipfile.ZipFile.open
    monkeypatch.setattr(zipfile.ZipFile, "open", lambda self, m, *a, **k: opened.append(getattr(m, "filename", m))
                        or real_open(self, m, *a, **k))
    manifest = _ingest(tmp_path, archive)
    assert len(manifest) == 4 and sorted(opened) == sorted(good)


def _patch_headers(archive, method: int | None = None, encrypted: bool = False):
    """Rewrite every member's compression method and/or set its encrypted flag, in its local header
    and its central directory entry (zipfile writes neither Deflate64 nor encrypted members)."""
    data = bytearray(archive.read_bytes())
    end = data.rfind(b"PK\5\6")
    headers = [(info.header_offset, 6) for info in zipfile.ZipFile(archive).infolist()]  # local: flags at +6
    at = struct.unpack("<I", data[end + 16:end + 20])[0]  # the central directory: flags at +8
    while (at := data.find(b"PK\1\2", at)) != -1:
        headers.append((at, 8))
        at += 4
    for at, flags in headers:
        if encrypted:
            bits = struct.unpack("<H", data[at + flags:at + flags + 2])[0]
            data[at + flags:at + flags + 2] = struct.pack("<H", bits | 1)
        if method is not None:
            data[at + flags + 2:at + flags + 4] = struct.pack("<H", method)
    archive.write_bytes(bytes(data))
    return archive


@pytest.mark.parametrize("method, encrypted, why", [
    (9, False, "is compressed with Deflate64, which Python's zipfile cannot read"),  # Windows, big files
    (93, False, "is compressed with Zstandard, which Python's zipfile cannot read"),
    (None, True, r"is encrypted \(a password-protected archive\)"),
])
def test_members_zipfile_cannot_extract_are_refused_from_the_listing(tmp_path, good, monkeypatch, method,
                                                                      encrypted, why):
    archive = _patch_headers(_zip(tmp_path / "other.zip", good), method, encrypted)
    opened = []
    monkeypatch.setattr(zipfile.ZipFile, "open", lambda self, *a, **k: opened.append(a) or 1 / 0)
    _refused(tmp_path, archive, f"member 'monet_tfrec/monet00-2.tfrec' {why}; extract the archive with another "
                                f"tool and give its folder as ingest.source")
    assert not opened


@pytest.mark.parametrize("method", [zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA])
def test_a_damaged_member_is_one_line_naming_it(tmp_path, good, method):
    # bytes changed inside the compressed data: a bad CRC, or the decompressor's own error
    # (zlib.error, OSError, LZMAError), never a traceback
    archive = tmp_path / "damaged.zip"
    with zipfile.ZipFile(archive, "w", method) as zf:
        for name, data in good.items():
            zf.writestr(name, data)
    info = zipfile.ZipFile(archive).getinfo("photo_tfrec/photo00-2.tfrec")
    data = bytearray(archive.read_bytes())
    middle = info.header_offset + 30 + len(info.filename.encode()) + info.compress_size // 2
    data[middle:middle + 16] = bytes(range(16))
    archive.write_bytes(bytes(data))
    _refused(tmp_path, archive, r"member 'photo_tfrec/photo00-2.tfrec' is damaged \(\w[\w.]*: .+\); get a "
                                r"fresh copy of the archive$")


def _folder(root, members: dict[str, bytes]):
    for name, data in members.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root


def test_the_data_one_folder_down_is_taken(tmp_path, good):
    # a zip of the extracted folder (as macOS's Compress makes it, with its __MACOSX copies)
    inner = {f"gan-getting-started/{name}": data for name, data in good.items()}
    junk = {f"__MACOSX/gan-getting-started/{name.replace('/', '/._')}": b"\0\5\26\7" for name in good}
    archive = _zip(tmp_path / "zipped-folder.zip", {**inner, **junk})
    manifest = _ingest(tmp_path / "a", archive)
    assert sorted(set(manifest["tfrecord"])) == sorted(f"raw/{name}" for name in good)
    for name, data in good.items():
        assert (tmp_path / "a/data/raw" / name).read_bytes() == data
    # written by a Windows tool that separates with backslashes
    windows = _zip(tmp_path / "windows.zip", {name.replace("/", "\\"): data for name, data in inner.items()})
    assert sorted(_ingest(tmp_path / "w", windows)["tfrecord"]) == sorted(manifest["tfrecord"])
    # and the folder a zip was extracted into
    comp = _folder(tmp_path / "extracted", inner)
    assert sorted(_ingest(tmp_path / "b", comp)["tfrecord"]) == sorted(manifest["tfrecord"])


def test_macos_litter_in_a_folder_is_not_data(tmp_path, good):
    # Finder leaves '._<file>' resource forks and .DS_Store on USB disks and network shares
    litter = {f"{name.rsplit('/', 1)[0]}/._{name.rsplit('/', 1)[1]}": b"\0\5\26\7" + bytes(78) for name in good}
    comp = _folder(tmp_path / "comp", {**good, **litter, "monet_tfrec/.DS_Store": b"\0\0\0\1Bud1"})
    manifest = _ingest(tmp_path / "a", comp)
    assert sorted(set(manifest["tfrecord"])) == sorted(f"raw/{name}" for name in good)
    # and the same litter in a zip of the folder's contents
    assert sorted(_ingest(tmp_path / "z", _zip(tmp_path / "litter.zip", {**good, **litter}))["tfrecord"]) \
        == sorted(manifest["tfrecord"])


@pytest.mark.parametrize("suffix", [".tfrecord", ".tfrecords"])
def test_tensorflows_longer_names_are_tfrecords_too(tmp_path, good, suffix):
    renamed = {name.replace(".tfrec", suffix): data for name, data in good.items()}
    for source in (_folder(tmp_path / "comp", renamed), _zip(tmp_path / "renamed.zip", renamed)):
        manifest = _ingest(tmp_path / f"out-{source.name}", source)
        assert sorted(set(manifest["tfrecord"])) == sorted(f"raw/{name}" for name in renamed)


def test_two_copies_of_the_data_are_refused(tmp_path, good):
    twice = {**good, **{f"copy/{name}": data for name, data in good.items()}}
    _refused(tmp_path, _zip(tmp_path / "twice.zip", twice),
             re.escape("TFRecord folders in 2 places (the top level, 'copy/')"))
    comp = _folder(tmp_path / "comp", {f"{d}/{name}": data for name, data in good.items() for d in ("a", "b")})
    _refused(tmp_path, comp, re.escape("TFRecord folders in 2 places ('a/', 'b/'); pass the one to use"))


def test_a_folder_with_an_oversized_file_is_refused(tmp_path, good):
    comp = _folder(tmp_path / "comp", good)
    with open(comp / "photo_tfrec/huge.tfrec", "wb") as f:  # sparse: no disk used
        f.truncate(competition.MAX_FILE + 1)
    with pytest.raises(DataError, match="huge.tfrec is 256 MiB, above"):
        _ingest(tmp_path, comp)


def test_a_record_longer_than_the_file_is_refused_at_once(tmp_path):
    header = struct.pack("<Q", 1 << 40)
    path = tmp_path / "x.tfrec"
    path.write_bytes(header + TFRecordWriter.masked_crc(header) + b"\0" * 64)
    with pytest.raises(DataError, match=r"record 0 at byte 0: truncated \(needs 1099511627776 bytes"):
        tfrecords.verify(path)


def test_a_record_too_large_for_an_image_is_refused(tmp_path):
    body = bytes(tfrecords.MAX_RECORD + 1)
    header = struct.pack("<Q", len(body))
    path = tmp_path / "x.tfrec"
    path.write_bytes(header + TFRecordWriter.masked_crc(header) + body + TFRecordWriter.masked_crc(body))
    with pytest.raises(DataError, match="larger than a 256x256 JPEG record can be"):
        tfrecords.verify(path)


def test_an_image_declaring_a_huge_size_is_refused_before_decoding():
    jpeg = bytearray(tfrecords.encode_jpeg(np.zeros((256, 256, 3), np.uint8)))
    sof = jpeg.index(b"\xff\xc0")  # baseline frame header: length, precision, height, width
    jpeg[sof + 5:sof + 9] = struct.pack(">HH", 9000, 9000)  # under Pillow's own bomb limit
    with pytest.raises(DataError, match="image is 9000x9000 RGB, expected 256x256"):
        tfrecords.decode_image(bytes(jpeg), "f.tfrec: record 0")


class _no_warning:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _damaged_listing(archive, how: str):
    """Damage the zip's listing the ways zipfile answers with other errors than BadZipFile."""
    data = bytearray(archive.read_bytes())
    end = data.rfind(b"PK\5\6")
    central = data.find(b"PK\1\2")
    if how == "version":      # "version needed to extract" beyond any zip: NotImplementedError
        data[central + 6:central + 8] = struct.pack("<H", 200)
    elif how == "offset":     # the directory said to start 1,000 bytes later: a seek before byte 0
        at = struct.unpack_from("<I", data, end + 16)[0]
        struct.pack_into("<I", data, end + 16, at + 1000)
    elif how == "utf-8":      # a member flagged UTF-8 whose name is not
        data = data.replace("photo_jpg/é.jpg".encode(), b"photo_jpg/\xe9\xff.jpg")
    archive.write_bytes(bytes(data))
    return archive


@pytest.mark.parametrize("how", ["version", "offset", "utf-8"])
def test_a_damaged_listing_is_one_line(tmp_path, good, how):
    archive = _damaged_listing(_zip(tmp_path / f"{how}.zip", {**good, "photo_jpg/é.jpg": b"x"}), how)
    _refused(tmp_path, archive, r"(not a readable zip|cannot be read) \(\w+: .+\)")


def test_a_file_of_zeros_is_not_called_a_tar_archive(tmp_path):
    # tarfile reads zeros as an empty archive: a download cut short or a preallocated file is no tar
    archive = tmp_path / "zeros.zip"
    archive.write_bytes(bytes(4096))
    _refused(tmp_path, archive, r"zeros\.zip: not a readable zip")


def test_a_tfrecord_name_no_file_can_have_is_refused_from_the_listing(tmp_path, good):
    long_name = "photo_tfrec/" + "a" * 300 + ".tfrec"
    archive = _zip(tmp_path / "long.zip", {**good, long_name: good["photo_tfrec/photo00-2.tfrec"],
                                           "photo_jpg/" + "b" * 300 + ".jpg": b"x"})  # never extracted: fine
    _refused(tmp_path, archive, re.escape(f"member '{long_name}' has a name over 255 bytes"))


def test_a_zip_inside_the_zip_or_folder_is_named(tmp_path, good):
    # the competition zip zipped again, or the folder it was downloaded into: say where the data is
    inner = _zip(tmp_path / "gan-getting-started.zip", good)
    outer = _zip(tmp_path / "outer.zip", {"gan-getting-started.zip": inner.read_bytes()})
    _refused(tmp_path / "a", outer, r"no monet_tfrec/\*\.tfrec inside; it holds gan-getting-started\.zip: extract that")
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    inner.rename(downloads / inner.name)
    _refused(tmp_path / "b", downloads, r"downloads/monet_tfrec: no \.tfrec files; it holds gan-getting-started\.zip: "
                                        r"give that zip as ingest\.source")


def test_capital_suffixes_are_tfrecords_too(tmp_path, good):
    # a copy made by a Windows tool: one file of the folder named '.TFREC' was dropped without a word
    renamed = {"monet_tfrec/monet00-2.TFREC": good["monet_tfrec/monet00-2.tfrec"],
               "photo_tfrec/photo00-2.Tfrec": good["photo_tfrec/photo00-2.tfrec"]}
    for source in (_folder(tmp_path / "comp", renamed), _zip(tmp_path / "capitals.zip", renamed)):
        manifest = _ingest(tmp_path / f"out-{source.name}", source)
        assert sorted(set(manifest["tfrecord"])) == sorted(f"raw/{name}" for name in renamed)
        assert (manifest["domain"] == "photo").sum() == 2 and (manifest["domain"] == "monet").sum() == 2


@pytest.mark.parametrize("make, needle", [
    (lambda f: f.symlink_to(f.parent / "gone.tfrec"), "a link to nothing readable"),
    (lambda f: f.symlink_to(f), "a link to nothing readable"),  # a loop
    (lambda f: os.mkfifo(f), "not a regular file"),
])
def test_a_tfrecord_name_on_no_readable_file_is_refused(tmp_path, good, make, needle):
    # it was skipped, and its images left out of the data without a word
    comp = _folder(tmp_path / "comp", good)
    make(comp / "photo_tfrec/photo01-2.tfrec")
    _refused(tmp_path, comp, re.escape(f"{comp / 'photo_tfrec/photo01-2.tfrec'}: {needle}"))


def test_a_source_that_is_neither_file_nor_folder_is_refused(tmp_path):
    os.mkfifo(tmp_path / "gan-getting-started.zip")  # reading it hung for ever; /dev/zero filled memory
    for source in (tmp_path / "gan-getting-started.zip", Path("/dev/zero")):
        with pytest.raises(DataError, match=re.escape(f"ingest.source: {source} is neither a file nor a folder")):
            _ingest(tmp_path, source)


def test_a_tfrecord_folder_it_may_not_read_is_not_called_empty(tmp_path, good, monkeypatch):
    # Path.glob took the folder it may not list for an empty one: "no .tfrec files (is this the
    # gan-getting-started folder?)". Root reads any folder, so the refusal is simulated
    comp = _folder(tmp_path / "comp", good)
    listing = Path.iterdir

    def refused(self):
        if self.name == "photo_tfrec":
            raise PermissionError(13, "Permission denied", str(self))
        return listing(self)

    monkeypatch.setattr(Path, "iterdir", refused)
    with pytest.raises(PermissionError):
        _ingest(tmp_path, comp)


def test_an_empty_tfrecord_is_refused_not_read_as_no_images(tmp_path, good):
    # a copy cut short at a record's end (here: before its first) has no bad checksum to find, and
    # its photos were missing without a word: the stage went on with the others
    empty = {**good, "photo_tfrec/photo01-352.tfrec": b""}
    for source in (_folder(tmp_path / "comp", empty), _zip(tmp_path / "empty.zip", empty)):
        _refused(tmp_path / f"out-{source.name}", source,
                 r"photo_tfrec/photo01-352.tfrec'?: holds no record \(an empty file, or a copy cut short")


def test_a_tfrecord_cut_at_a_record_end_is_told_by_the_count_in_its_name(tmp_path, good):
    # whole checksums, one record fewer than Kaggle's name says: its photo was lost without a word
    cut = good["photo_tfrec/photo00-2.tfrec"]
    cut = cut[:16 + int.from_bytes(cut[:8], "little")]  # the first record only
    for name in ("photo00-2.tfrec", "PHOTO00-2.TFREC"):
        short = {"monet_tfrec/monet00-2.tfrec": good["monet_tfrec/monet00-2.tfrec"], f"photo_tfrec/{name}": cut,
                 "photo_tfrec/photo01-2.tfrec": good["photo_tfrec/photo00-2.tfrec"]}
        for source in (_folder(tmp_path / f"comp-{name}", short), _zip(tmp_path / f"short-{name}.zip", short)):
            _refused(tmp_path / f"out-{source.name}", source,
                     rf"photo_tfrec/{name}'?: holds 1 records where its name says 2 \(a copy cut short at a "
                     rf"record's end\?\); copy it again, or rename it if its name does not count its records$")
    # a name that counts nothing, or more records than it counts, is read as it is
    def records(*names):
        path = tmp_path / "records.tfrec"
        jpeg = tfrecords.encode_jpeg(np.full((256, 256, 3), 90, np.uint8))
        tfrecords.write(path, [tfrecords.Example(name, jpeg, "photo") for name in names])
        return path.read_bytes()

    renamed = {"monet_tfrec/monet00-2.tfrec": good["monet_tfrec/monet00-2.tfrec"],
               "photo_tfrec/photos.tfrec": records("a"), "photo_tfrec/photo02-1.tfrec": records("b", "c"),
               "photo_tfrec/photos_2023-12.tfrec": records("d")}  # a date, not a count
    manifest = _ingest(tmp_path / "renamed", _folder(tmp_path / "renamed-comp", renamed))
    assert sorted(manifest.loc[manifest["domain"] == "photo", "image_name"]) == ["a", "b", "c", "d"]


def test_a_compressed_tfrecord_folder_is_told_to_decompress(tmp_path, good):
    import gzip

    packed = {**good, "photo_tfrec/photo00-2.tfrec.gz": gzip.compress(good["photo_tfrec/photo00-2.tfrec"])}
    del packed["photo_tfrec/photo00-2.tfrec"]
    comp = _folder(tmp_path / "comp", packed)
    _refused(tmp_path, comp, re.escape(f"{comp / 'photo_tfrec'}: no .tfrec files; it holds photo00-2.tfrec.gz, "
                                       "not a TFRecord by its name: decompress it first"))
