"""Getting and checking the FID Inception-v3 weights (`pt_inception-2015-12-05-6726825d.pth`).

Where they can come from, in the order `find` looks:
1. a local file the user named (`evaluate.weights`); missing or unusable -> FeatureError;
2. the torch hub cache: <torch.hub.get_dir()>/checkpoints/pt_inception-2015-12-05-6726825d.pth;
3. a download of pytorch-fid's release asset, checked against the SHA-256 prefix in its name and
   against the graph before it is cached (atomically, so no half file is ever cached).
Every file is checked to be a state dict of the FID graph before it is used.
"""
from __future__ import annotations

import hashlib
import socket
import threading
import zipfile
from pathlib import Path
from typing import Iterable, Mapping
from urllib.parse import urlparse

import torch
from pytorch_fid import inception as _pf
from torch import nn

from pipeline.errors import FeatureError
from pipeline.fid_inception import build_fid_inception
from pipeline.files import atomic_path, under_main_repo

FID_WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"
FID_WEIGHTS_URL = _pf.FID_WEIGHTS_URL           # pytorch-fid 0.3.0's release asset
FID_WEIGHTS_SHA256_PREFIX = "6726825d"           # the 8 hex digits in the file name
PROBE_TIMEOUT_S = 3.0


def hub_cache_path() -> Path:
    """Where torch.hub keeps the FID weights (follows TORCH_HOME / torch.hub.set_dir)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / FID_WEIGHTS_NAME


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _short(keys: Iterable[str], k: int = 3) -> str:
    keys = sorted(keys)
    more = f", … ({len(keys)} in all)" if len(keys) > k else ""
    return ", ".join(keys[:k]) + more


def load_weights(path: Path, what: str) -> nn.Module:
    """The FID graph with the weights in `path`; FeatureError (one line, naming it) otherwise."""
    if not path.exists():
        raise FeatureError(f"{what} {path}: file not found")
    if not path.is_file():
        raise FeatureError(f"{what} {path}: not a regular file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except PermissionError:
        raise FeatureError(f"{what} {path}: not readable (permission denied)") from None
    except Exception as e:  # truncated zip, pickle of arbitrary objects, garbage bytes, ...
        with open(path, "rb") as f:
            head = f.read(4)
        if not zipfile.is_zipfile(path) and not head.startswith((b"PK\x03\x04", b"\x80")):  # torch's zip (cut
            # short: no listing at its end), or its older pickle
            raise FeatureError(f"{what} {path}: not a torch file (neither torch's zip format nor a pickle)") from None
        if "Weights only load failed" in str(e):  # torch's advice to load it as a pickle, which may run code
            raise FeatureError(f"{what} {path}: holds Python objects besides tensors, which are not loaded; "
                               f"expected a state dict of the FID Inception-v3 graph") from None
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise FeatureError(f"{what} {path}: not a readable torch state dict ({first})") from None
    if not isinstance(state, Mapping) or not all(torch.is_tensor(v) for v in state.values()):
        raise FeatureError(f"{what} {path}: does not hold a state dict of tensors "
                           f"(got {type(state).__name__})")
    net = build_fid_inception()
    expected = net.state_dict()
    optional = {k for k in expected if k.endswith("num_batches_tracked")}
    missing = set(expected) - set(state) - optional
    unexpected = set(state) - set(expected)
    wrong = {k for k in set(state) & set(expected) if state[k].shape != expected[k].shape}
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing {_short(missing)}")
        if unexpected:
            parts.append(f"unexpected {_short(unexpected)}")
        if wrong:
            parts.append(f"wrong shape {_short(wrong)}")
        raise FeatureError(f"{what} {path}: not a state dict for the FID Inception-v3 graph "
                           f"({'; '.join(parts)})")
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise FeatureError(f"{what} {path}: does not load into the FID Inception-v3 graph "
                           f"({str(e).strip().splitlines()[0]})") from None
    if not all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point()):
        raise FeatureError(f"{what} {path}: contains NaN or inf weights")
    return net


def reachable(url: str, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """Can we open a TCP connection to the URL's host within `timeout` seconds (DNS included)?

    Runs in a daemon thread so that a resolver that hangs cannot hold us past the timeout.
    Local (file://) URLs are always reachable."""
    u = urlparse(url)
    if u.scheme == "file":
        return True
    if not u.hostname:
        return False
    port = u.port or (443 if u.scheme == "https" else 80)
    ok = threading.Event()

    def probe() -> None:
        try:
            with socket.create_connection((u.hostname, port), timeout=timeout):
                ok.set()
        except OSError:
            pass

    t = threading.Thread(target=probe, name="fid-weights-probe", daemon=True)
    t.start()
    t.join(timeout)
    return ok.is_set()


def download(dst: Path, url: str, hash_prefix: str) -> Path:
    """Checked download of the FID weights to `dst`, written atomically.

    A sha256 mismatch or a file that is not the FID graph raises FeatureError and leaves nothing
    behind; network errors propagate as OSError (the caller decides what that means)."""
    with atomic_path(dst) as tmp:
        try:
            torch.hub.download_url_to_file(url, str(tmp), hash_prefix=hash_prefix, progress=True)
        except RuntimeError as e:
            if "invalid hash value" in str(e):
                raise FeatureError(f"download {url}: sha256 does not start with {hash_prefix} "
                                   f"({str(e).strip()}); nothing was cached") from None
            raise
        load_weights(tmp, f"download {url} ->")   # the right graph, before it is cached
    return dst


def find(weights: str, download_ok: bool) -> tuple[Path, str]:
    """The weights file to use and how it was found ("weights file", "cached weights", ...).
    A named file (or the file of that name in a named folder) is returned even when it is missing,
    so that loading it fails loudly. With no file named, none cached and no download to be had:
    FeatureError saying where it looked and how to supply the file (never a quiet fallback to
    other weights)."""
    if weights:  # a relative path is under the main repository (also from queued experiments)
        path = under_main_repo(weights)
        if path.is_dir():  # a folder that holds the file, as a Kaggle dataset attached to a notebook is
            path = path / FID_WEIGHTS_NAME
        return path, "weights file"
    cached = hub_cache_path()
    if cached.exists():
        return cached, "cached weights (delete to re-download)"
    url = FID_WEIGHTS_URL
    if not download_ok:
        why = "evaluate.download is false"
    elif not reachable(url):
        why = f"{urlparse(url).hostname or url} is unreachable"
    else:
        try:
            download(cached, url, FID_WEIGHTS_SHA256_PREFIX)
            return cached, "downloaded weights"
        except OSError as e:  # network trouble after a good probe
            why = f"the download failed ({str(e).splitlines()[0][:80]})"
    raise FeatureError(
        f"evaluate.extractor=fid-inception: no {FID_WEIGHTS_NAME}: evaluate.weights is empty, the hub cache "
        f"has none ({cached}) and {why}; download it from {url} (on Kaggle: attach it as a dataset) "
        f"and pass its path with -S evaluate.weights=PATH, or use -S evaluate.extractor=offline")
