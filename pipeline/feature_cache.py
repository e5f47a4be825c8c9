"""Features of the reference images (the paintings, the untranslated photos, the ground-truth
paintings) computed once and reused: they do not change when only the model does, so a second
evaluation extracts the generated images' features alone. One file per (images, extractor and its
options), written atomically, with a digest of what it holds and what it was computed for; a file
that does not read back as that (damaged, or another file's bytes) is recomputed, never trusted."""
from __future__ import annotations

import hashlib
import io
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch

from pipeline.errors import PipelineError
from pipeline.files import write_bytes


def images_key(images: torch.Tensor) -> str:
    """What a set of uint8 images is, by its bytes."""
    return hashlib.sha256(images.contiguous().numpy().tobytes()).hexdigest()


def code_key(files: Iterable[str | Path], *versions: str) -> str:
    """What computed a cached array besides its inputs: these source files' bytes and the libraries'
    versions. DVC reruns evaluate when its code changes, but this cache lives outside DVC, so its
    keys must change too: the paintings' features from older code beside the generated images'
    from newer code would be another FID, silently."""
    h = hashlib.sha256()
    for f in files:
        h.update(Path(f).read_bytes())
    for version in versions:
        h.update(f"|{version}".encode())
    return h.hexdigest()[:16]


def stored_digest(file_name: str, arrays: dict[str, np.ndarray]) -> np.ndarray:
    """A SHA-256 (uint8) of `arrays` (names, dtypes, shapes, numbers) and of the file they are
    stored in: kept beside them, it tells a file read back as written from a damaged one or from
    another cache file copied over it (either gave other scores without a word)."""
    h = hashlib.sha256(file_name.encode())
    for name in sorted(arrays):
        array = np.ascontiguousarray(arrays[name])
        h.update(f"|{name}|{array.dtype.str}|{array.shape}|".encode())
        h.update(array.tobytes())
    return np.frombuffer(h.digest(), dtype=np.uint8)


class FeatureCache:
    def __init__(self, folder: Path, extractor_key: str, say: Callable[[str], None] = print):
        self.folder, self.extractor_key, self.say = folder, extractor_key, say

    def path(self, label: str, key: str) -> Path:
        digest = hashlib.sha256(f"{self.extractor_key}|{key}".encode()).hexdigest()[:32]
        return self.folder / f"{label}-{digest}.npz"

    def get(self, label: str, key: str, compute: Callable[[], np.ndarray], what: str = "features",
            shape: tuple[int, ...] | None = None) -> np.ndarray:
        """The features (or `what` else) of `label`'s images, identified by `key`: from the cache,
        else computed and cached. A file that does not read back as an array (of `shape`, when
        given) is computed again, never trusted."""
        path = self.path(label, key)
        if path.is_dir() and not path.is_symlink():  # said after the work, the work is lost
            raise PipelineError(f"{path} is a folder where the features cache keeps a file; move it away and run again")
        if path.exists():
            try:
                with np.load(path, allow_pickle=False) as stored:
                    array, check = stored["features"], stored["check"]
                if shape is not None and array.shape != shape:
                    raise ValueError(f"shape {array.shape}, not {shape}")
                if not np.array_equal(check, stored_digest(path.name, {"features": array})):
                    raise ValueError("its bytes are not those it was written with")
                self.say(f"evaluate: {label} {what} from the cache ({path})")
                return array
            except Exception as e:  # an empty file (a crash before the rename reached the disk) is EOFError
                self.say(f"evaluate: {path} does not read back ({type(e).__name__}: {e}); computing it again")
        array = compute()
        buffer = io.BytesIO()  # into memory first: numpy's writer says a full disk without its errno
        np.savez(buffer, features=array, check=stored_digest(path.name, {"features": array}))
        write_bytes(path, buffer.getbuffer())
        self.say(f"evaluate: {label} {what} computed and cached ({path})")
        return array
