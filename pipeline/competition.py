"""The competition's TFRecords from a local zip or folder, or from Kaggle, into `raw`
(monet_tfrec/*.tfrec and photo_tfrec/*.tfrec; TensorFlow's *.tfrecord names are taken too).

An archive is checked from its listing before a byte is extracted, because a hostile one can fill
the disk or memory or write outside the target: only the two TFRecord folders are taken (in a
zip at any depth, in a folder at its top or in one folder inside; the *_jpg copies and anything
else are skipped unread; two copies of the folders refuse it); links, names that climb out of the target and names given twice refuse
the whole archive; and sizes are capped. The competition's
TFRecords are about 190 MB in all (its zip is 386 MB with the JPEG copies) and none is above
about 10 MB, so a file above MAX_FILE (25× that) or a total above MAX_TOTAL (10×) is not this
competition's data, whatever its names say. The same caps hold for a folder. A member that
zipfile cannot extract (encrypted, or compressed in a way it does not know) is refused from the
listing too; one whose bytes turn out damaged while extracting is one error naming it.

Kaggle's archive is downloaded by pipeline/kaggle_download.py.
"""
from __future__ import annotations

import contextlib
import errno
import shutil
import stat
import tarfile
import zipfile
from pathlib import Path, PurePosixPath
from typing import Iterator

from pipeline.errors import DataError, PipelineError

COMPETITION = "gan-getting-started"
TFREC_DIRS = {"monet": "monet_tfrec", "photo": "photo_tfrec"}
JPEG_DIRS = ("monet_jpg", "photo_jpg")  # the same images as JPEG files, beside the TFRecords in the zip
MAX_FILE = 256 << 20
MAX_TOTAL = 2 << 30
# Kaggle names its files *.tfrec; TensorFlow's own writers and tutorials use the longer names
TFREC_SUFFIXES = (".tfrec", ".tfrecord", ".tfrecords")


def is_tfrecord(file_name: str) -> bool:
    """A TFRecord by its name, in any case (copies from Windows tools: '.TFREC'); macOS's
    resource-fork copies ('._<file>', which its Finder leaves on USB disks and network shares, and
    its zips under __MACOSX/) are not data."""
    return file_name.lower().endswith(TFREC_SUFFIXES) and not file_name.startswith("._")


def tfrecord_files(folder: Path) -> list[Path]:
    """The TFRecord files in `folder`, sorted; [] when there is no such folder. A folder it may
    not read is an error (PermissionError, which errors.cli says in one line), and so is a
    TFRecord's name on a broken link, a fifo or a device: none is skipped without a word."""
    if not folder.is_dir():
        return []
    found = sorted(f for f in folder.iterdir() if is_tfrecord(f.name))
    for f in found:
        if not f.is_file():
            what = "a link to nothing readable" if f.is_symlink() else "not a regular file"
            raise DataError(f"{f}: {what}; every TFRecord in {folder.name}/ is read, so put the file itself there")
    return found


def _mib(n: int) -> str:
    return f"{n / (1 << 20):,.0f} MiB"


def check_sizes(where: Path, sizes: dict[str, int]) -> None:
    """Refuse a file above MAX_FILE or a total above MAX_TOTAL (see the module's docstring)."""
    for name, size in sizes.items():
        if size > MAX_FILE:
            raise DataError(f"{where}: {name} is {_mib(size)}, above the {_mib(MAX_FILE)} a competition "
                            f"TFRecord can be (its largest is about 10 MB); refusing it")
    total = sum(sizes.values())
    if total > MAX_TOTAL:
        raise DataError(f"{where}: the TFRecords total {_mib(total)}, above the {_mib(MAX_TOTAL)} the "
                        f"competition's can be (about 190 MB); refusing them")


def _tfrecord(name: str) -> tuple[str, str] | None:
    """(the folder it sits in, 'monet_tfrec/<file>.tfrec') for a competition TFRecord at any depth
    (a zip of the extracted folder holds them one level down), or None. macOS's resource-fork
    copies (__MACOSX/...) are not data. `name` uses '/' (see _member_name)."""
    parts = PurePosixPath(name).parts
    if len(parts) < 2 or parts[-2] not in TFREC_DIRS.values() or not is_tfrecord(parts[-1]):
        return None
    if parts[0] == "__MACOSX":
        return None
    return "/".join(parts[:-2]), "/".join(parts[-2:])


def _places(roots) -> str:
    return ", ".join(f"'{r}/'" if r else "the top level" for r in roots)


def _member_name(info: zipfile.ZipInfo) -> str:
    """A member's name with '/' between folders: some Windows tools write backslashes."""
    return info.filename.replace("\\", "/")


# what Python's zipfile decompresses; others (Windows' Deflate64 for big files, Zstandard) it cannot
READABLE = {zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA}
METHODS = {9: "Deflate64", 93: "Zstandard", 95: "xz", 98: "PPMd", 99: "AES encryption"}


def _unreadable(info: zipfile.ZipInfo) -> str | None:
    """Why zipfile cannot extract a member the listing otherwise accepts, or None."""
    if info.flag_bits & 0x1:
        return "is encrypted (a password-protected archive)"
    if info.compress_type not in READABLE:
        method = METHODS.get(info.compress_type, f"compression method {info.compress_type}")
        return f"is compressed with {method}, which Python's zipfile cannot read"
    return None


def _hostile(info: zipfile.ZipInfo, name: str) -> str | None:
    """Why a member (`name`: see _member_name) must not be in a data archive at all, or None."""
    if name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        return "has an absolute name"
    if ".." in PurePosixPath(name).parts:
        return "climbs out of the target"
    if stat.S_ISLNK(info.external_attr >> 16):
        return "is a link"
    return None


# what zipfile raises, besides BadZipFile, for a damaged listing or local header it does not check
# itself: a "version needed" it does not know, a name flagged UTF-8 that is not, an offset that
# seeks before the file's start (OSError EINVAL), a header cut short
DAMAGED = (zipfile.BadZipFile, NotImplementedError, UnicodeDecodeError, ValueError, EOFError, OSError)
NAME_MAX = 255  # bytes in one path component, on the file systems the members are extracted to


def _open_zip(source: Path) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(source)
    except DAMAGED as e:
        if isinstance(e, OSError) and e.errno != errno.EINVAL:
            raise  # not found, permission denied: said by the caller's checks, or a real I/O error
        if _is_tar(source):  # .tar.gz and the like: Python reads them, but ingest takes zips
            raise DataError(f"{source}: a tar archive, not a zip; extract it and give the folder as "
                            f"ingest.source") from None
        raise DataError(f"{source}: not a readable zip ({type(e).__name__}: {e})") from None


def _is_tar(source: Path) -> bool:
    """A tar archive with a member (tarfile takes a file of zeros for an empty one)."""
    try:
        with tarfile.open(source) as tar:
            return tar.next() is not None
    except (tarfile.TarError, OSError, EOFError):
        return False


@contextlib.contextmanager
def open_checked(source: Path) -> Iterator[tuple[zipfile.ZipFile, list[tuple[zipfile.ZipInfo, str]]]]:
    """The open zip and the members to take, each with its name under `raw`, once the whole
    listing has passed the checks."""
    zf = _open_zip(source)
    try:
        with zf:
            members, seen = [(info, _member_name(info)) for info in zf.infolist()], set()
            for info, name in members:
                why = _hostile(info, name) or ("appears twice" if name in seen else None)
                if why:
                    raise DataError(f"{source}: member '{info.filename}' {why}; refusing the archive")
                seen.add(name)
            by_root: dict[str, list[tuple[zipfile.ZipInfo, str]]] = {}
            for info, name in members:
                if found := _tfrecord(name):
                    by_root.setdefault(found[0], []).append((info, found[1]))
            if len(by_root) > 1:
                raise DataError(f"{source}: TFRecord folders in {len(by_root)} places ({_places(sorted(by_root))}); "
                                f"an archive must hold one copy of the competition's data")
            root, taken = next(iter(by_root.items()), ("", []))
            for folder in TFREC_DIRS.values():
                if not any(name.startswith(f"{folder}/") for _, name in taken):
                    inner = next((info.filename for info, name in members if name.lower().endswith(".zip")), None)
                    hint = (f"; it holds {inner}: extract that and give it as ingest.source" if inner
                            else _jpeg_copies_hint(part for _, name in members
                                                   for part in PurePosixPath(name).parts[:2])
                            or f" (is this the {COMPETITION} zip?)")
                    raise DataError(f"{source}: no {folder}/*.tfrec inside{hint}")
            check_sizes(source, {info.filename: info.file_size for info, _ in taken})
            for info, name in taken:
                if why := _unreadable(info):
                    raise DataError(f"{source}: member '{info.filename}' {why}; extract the archive with "
                                    f"another tool and give its folder as ingest.source")
                if any(len(part.encode()) > NAME_MAX for part in PurePosixPath(name).parts):
                    raise DataError(f"{source}: member '{info.filename}' has a name over {NAME_MAX} bytes, "
                                    f"which no file can have; rename it")
            if root:
                print(f"ingest: {source}: taking the TFRecords under '{root}/'")
            yield zf, taken
    except zipfile.BadZipFile as e:  # a member's local header, found damaged on opening it
        raise DataError(f"{source}: not a readable zip ({e})") from None


def from_zip(source: Path, raw: Path) -> dict[str, str]:
    """Extract the TFRecords into `raw`; returns where each came from, for error messages."""
    with open_checked(source) as (zf, taken):
        for info, name in taken:
            # zipfile never yields more than the listed size, and checks the CRC at the end
            target = raw / name
            target.parent.mkdir(parents=True, exist_ok=True)
            with _open_member(zf, info, source) as src, open(target, "wb") as dst:
                while chunk := _read_member(src, source, info):
                    dst.write(chunk)
    return {name: f"{source}: {info.filename}" for info, name in taken}


def _open_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, source: Path):
    """zf.open(info); a member whose local header is damaged (or lies where no member can) is
    named in one line."""
    try:
        return zf.open(info)
    except DAMAGED as e:
        raise DataError(f"{source}: member '{info.filename}' cannot be read ({type(e).__name__}: {e}); "
                        f"get a fresh copy of the archive") from None


def _read_member(src, source: Path, info: zipfile.ZipInfo) -> bytes:
    """The next MiB of a member being extracted. Whatever reading it raises means damaged bytes
    (a bad CRC, or the decompressor's own error: zlib.error, LZMAError, OSError for bzip2,
    EOFError); a failing write to the target is not caught here."""
    try:
        return src.read(1 << 20)
    except Exception as e:
        kind = type(e).__name__ if type(e).__name__ != "error" else "zlib.error"  # zlib's class is `error`
        raise DataError(f"{source}: member '{info.filename}' is damaged ({kind}: {e}); "
                        f"get a fresh copy of the archive") from None


def _jpeg_copies_hint(folder_names) -> str:
    """For a zip or folder with the competition's JPEG copies (at the top or one folder down) but
    not its TFRecords."""
    copies = sorted(set(folder_names) & set(JPEG_DIRS))
    if not copies:
        return ""
    return (f"; it holds {' and '.join(f'{d}/' for d in copies)}, the JPEG copies, which ingest does not "
            f"read: it takes {TFREC_DIRS['monet']}/ and {TFREC_DIRS['photo']}/, as the {COMPETITION} zip has them")


def _folder_root(source: Path) -> Path:
    """`source` if it holds the TFRecord folders, else its one subfolder that does (the folder a
    zip of the data was extracted into)."""
    def holds(d: Path) -> bool:
        return any((d / folder).is_dir() for folder in TFREC_DIRS.values())

    if holds(source):
        return source
    inner = [d for d in sorted(source.iterdir()) if d.is_dir() and holds(d)]
    if len(inner) > 1:
        raise DataError(f"{source}: TFRecord folders in {len(inner)} places "
                        f"({_places(d.name for d in inner)}); pass the one to use")
    if inner:
        print(f"ingest: {source}: taking the TFRecords under '{inner[0].name}/'")
    return inner[0] if inner else source  # none: the check below names what is missing


def from_folder(source: Path, raw: Path) -> dict[str, str]:
    """Copy the TFRecords into `raw`; returns where each came from, for error messages."""
    source = _folder_root(source)
    files = {}
    for folder in TFREC_DIRS.values():
        found = tfrecord_files(source / folder)
        if not found:
            zips = sorted(f.name for f in source.glob("*.zip") if f.is_file())
            packed = sorted(f.name for f in (source / folder).glob("*")
                            if ".tfrec" in f.name.lower() and not f.name.startswith("._"))  # photo00.tfrec.gz
            hint = (f"; it holds {zips[0]}: give that zip as ingest.source" if zips
                    else f"; it holds {packed[0]}, not a TFRecord by its name: decompress it first" if packed
                    else _jpeg_copies_hint(d.name for d in [*source.glob("*"), *source.glob("*/*")] if d.is_dir())
                    or f" (is this the {COMPETITION} folder?)")
            raise DataError(f"{source / folder}: no .tfrec files{hint}")
        files.update({f"{folder}/{f.name}": f for f in found})
    check_sizes(source, {name: f.stat().st_size for name, f in files.items()})
    for name, f in files.items():
        (raw / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(f, raw / name)
    return {name: str(f) for name, f in files.items()}


def copy_local(source: Path, raw: Path) -> dict[str, str]:
    """Take the TFRecords from a local copy of the competition zip or its extracted folder;
    returns where each came from ('monet_tfrec/x.tfrec' -> the file, or the zip and its member)."""
    if not source.exists():
        raise PipelineError(f"ingest.source: {source} does not exist (expected 'sample', 'kaggle', "
                            f"or the competition zip / folder)")
    if not source.is_dir() and not source.is_file():  # a fifo would hang the reader; /dev/zero fill memory
        raise DataError(f"ingest.source: {source} is neither a file nor a folder")
    holds_both = source.is_dir() and any((source / folder).is_dir() for folder in TFREC_DIRS.values())
    part = "a TFRecord file" if is_tfrecord(source.name) and source.is_file() else (
        "a folder of TFRecords" if source.is_dir() and not holds_both and tfrecord_files(source) else None)
    if part:  # one of the two folders (or a file in it) given for the folder that holds both
        raise DataError(f"{source}: {part}; ingest.source takes the competition zip or the folder that "
                        f"holds {TFREC_DIRS['monet']}/ and {TFREC_DIRS['photo']}/ (here perhaps "
                        f"{source.parent if source.is_dir() else source.parent.parent})")
    return (from_folder if source.is_dir() else from_zip)(source, raw)
