"""Kaggle's competition zip, downloaded once into a cache that every ingest and experiment shares.

The download goes into a temp folder beside the cached zip and is renamed into place only when
complete and its listing checked, so the cache never holds part of a zip; a temp folder that a
killed download left is removed by the next one. Kaggle's client puts no timeout on its requests:
a network that takes the connection and never answers would hang the stage, so the client runs in
a thread, watched, and the stage gives up after STALL_SECONDS without a byte.
"""
from __future__ import annotations

import contextlib
import functools
import io
import json
import os
import re
import sys
import threading
import time
from pathlib import Path

from pipeline.competition import COMPETITION, open_checked
from pipeline.errors import DataError, PipelineError, brief
from pipeline.files import scratch_dir

STALL_SECONDS = 120.0
DOWNLOAD_CHUNK = 1 << 14  # bytes the client writes at a time (see _fetch)


class Unreachable(PipelineError):
    """Kaggle cannot be reached (no network, or no answer)."""


def kaggle_api():
    """An authenticated KaggleApi. Imported here: `import kaggle` itself tries to authenticate.
    Both print a page of sign-up help when no credentials are found (twice, the import's and
    ours), which the one error line below replaces; what they print otherwise is passed on."""
    def sign_in():
        from kaggle.api.kaggle_api_extended import KaggleApi

        api = KaggleApi()
        api.authenticate()  # online, for a token
        return api

    help_text = io.StringIO()
    try:
        # redirected here, in the main thread: a sign-in given up on keeps running in its thread
        with contextlib.redirect_stdout(help_text), contextlib.redirect_stderr(help_text):
            api = _watched(sign_in, "while signing in")
    except Unreachable:
        raise
    except SystemExit:  # the package exits when it finds no credentials
        token = _access_token_source()
        if token:  # the client checks a token online and passes over one Kaggle does not know
            raise PipelineError(f"ingest.source=kaggle: Kaggle did not accept the token in {token} (expired or "
                                f"mistyped?); create a new one at https://www.kaggle.com/settings") from None
        # the client reads a broken kaggle.json, or half of a username and key, as no credentials
        problem = _credentials_problem(_config_file())
        raise PipelineError(f"ingest.source=kaggle: {problem}" if problem else
                            "ingest.source=kaggle: no Kaggle credentials found; set KAGGLE_API_TOKEN "
                            "or KAGGLE_USERNAME/KAGGLE_KEY, or save ~/.kaggle/kaggle.json") from None
    except Exception as e:  # a token is checked online: no network, or a token Kaggle does not know
        if _unreachable(e):
            raise Unreachable(f"ingest.source=kaggle: cannot reach Kaggle to sign in ({_cause(e)})") from None
        status = _http_status(e)
        if status is None and (problem := _credentials_problem(_config_file())):  # kaggle.json holds a list, say
            raise PipelineError(f"ingest.source=kaggle: {problem}") from None
        why = f"Kaggle refused the credentials (HTTP {status})" if status in (401, 403) else f"{type(e).__name__}: {e}"
        raise PipelineError(f"ingest.source=kaggle: signing in to Kaggle failed: {why}") from None
    # what it says when it signs in (a warning, say), once: the import signs in too, and says it again
    said = help_text.getvalue()
    half = len(said) // 2
    print(said[:half] if said[:half] == said[half:] else said, end="", file=sys.stderr)
    return api


def _access_token_source() -> str | None:
    """Where an API token is set for the client to find (its own order), or None."""
    if os.environ.get("KAGGLE_API_TOKEN"):
        return "KAGGLE_API_TOKEN"
    for name in ("access_token", "access_token.txt"):
        token = Path.home() / ".kaggle" / name
        if token.is_file() and token.read_text(errors="replace").strip():  # the client skips an empty one
            return f"~/.kaggle/{name}"
    return None


def _config_file() -> Path:
    """The kaggle.json the client reads (its own rule: KAGGLE_CONFIG_DIR, else ~/.kaggle)."""
    loaded = sys.modules.get("kaggle.api.kaggle_api_extended")
    if loaded is not None:
        return Path(loaded.KaggleApi.config)
    return Path(os.environ.get("KAGGLE_CONFIG_DIR") or Path.home() / ".kaggle") / "kaggle.json"


def _credentials_problem(config: Path) -> str | None:
    """What is wrong with credentials that are there but broken or half given, or None."""
    found: dict[str, str] = {}
    if config.exists():
        try:
            data = json.loads(config.read_text())
        except OSError as e:
            return f"{config} cannot be read ({e.strerror})"
        except ValueError as e:  # not JSON, or not UTF-8
            return f"{config} is not valid JSON ({str(e).splitlines()[0]})"
        if not isinstance(data, dict):
            return f"{config} is not a JSON object with 'username' and 'key'"
        found = {k: f"'{k}' in {config}" for k in ("username", "key") if data.get(k)}
    found.update({k: f"KAGGLE_{k.upper()}" for k in ("username", "key") if os.environ.get(f"KAGGLE_{k.upper()}")})
    if len(found) == 1:
        [(have, where)] = found.items()
        missing = "key" if have == "username" else "username"
        return (f"a Kaggle {have} is set ({where}) but no {missing}; set KAGGLE_{missing.upper()} or add "
                f"'{missing}' to {config}")
    if config.exists() and not found:
        return f"{config} holds no 'username' and 'key'"
    return None


def download(cache: Path, api_factory=kaggle_api) -> Path:
    """The competition's zip in `cache`: the one downloaded before, else downloaded now."""
    archive = cache / f"{COMPETITION}.zip"
    if archive.is_file():
        print(f"ingest: {COMPETITION} from the download cache ({archive}; delete it to download again)")
        return archive
    offline = (f"; with no network here, download {COMPETITION}.zip elsewhere and put it at {archive}, "
               f"or give its path as ingest.source")
    try:
        api = api_factory()
        with scratch_dir(archive) as tmp:
            zips = _fetch(api, tmp)
            try:
                with open_checked(zips[0]):  # a download that fails the checks is never cached
                    pass
            except DataError as e:  # it names the temp folder, gone by the time the line is read
                raise DataError(f"ingest.source=kaggle: the download of {COMPETITION} is not a whole zip "
                                f"({str(e).removeprefix(str(zips[0]) + ': ')}); nothing was cached: run "
                                f"ingest again to download it again") from None
            zips[0].replace(archive)  # one rename: the cache never holds part of a zip
    except Unreachable as e:
        raise Unreachable(f"{e}{offline}") from None
    print(f"ingest: downloaded {COMPETITION} into the cache ({archive})")
    return archive


def _fetch(api, into: Path) -> list[Path]:
    if hasattr(api, "download_file"):
        # the client writes a chunk once it has all of it, 1 MiB by default: the watchdog, which
        # sees the file grow, took a download slower than 8.7 KB/s for one that had stalled
        api.download_file = functools.partial(api.download_file, chunk_size=DOWNLOAD_CHUNK)

    def fetch():
        api.competition_download_files(COMPETITION, path=str(into), quiet=False)

    def received():
        total = 0
        for f in into.rglob("*"):
            with contextlib.suppress(OSError):  # a part renamed by the client while we look
                total += f.stat().st_size if f.is_file() else 0
        return total

    try:
        _watched(fetch, f"while downloading {COMPETITION}", progress=received)
    except SystemExit:
        raise PipelineError(f"ingest.source=kaggle: the Kaggle client gave up downloading {COMPETITION}") from None
    except Unreachable:
        raise
    except Exception as e:
        status = _http_status(e)
        if status == 403:
            raise PipelineError(
                f"ingest.source=kaggle: Kaggle refused {COMPETITION} (HTTP 403); accept the "
                f"rules at https://www.kaggle.com/competitions/{COMPETITION}/rules") from None
        if status == 401:  # a username and key are first checked here; a token goes before them
            raise PipelineError(
                f"ingest.source=kaggle: Kaggle refused the credentials (HTTP 401); check KAGGLE_KEY or "
                f"{_config_file()}, and that no expired token is set (KAGGLE_API_TOKEN or "
                f"~/.kaggle/access_token, which the client uses first)") from None
        if _unreachable(e):  # a username and key are not checked when signing in: here, first
            # (a break in the first 16 KiB, which the client writes at once, reads as never reached)
            what = f"the download of {COMPETITION} broke off" if received() else f"cannot reach Kaggle to download {COMPETITION}"
            raise Unreachable(f"ingest.source=kaggle: {what} ({_cause(e)})") from None
        raise PipelineError(f"ingest.source=kaggle: download of {COMPETITION} failed: {e}") from None
    zips = sorted(into.glob("*.zip"))
    if not zips:
        raise DataError(f"ingest.source=kaggle: the download of {COMPETITION} produced no zip")
    return zips


def _watched(call, what: str, progress=lambda: 0):
    """call()'s result, or its exception, from a thread that is given up on (left to the process's
    exit: a daemon) once `progress()` has not moved for STALL_SECONDS."""
    outcome: dict[str, object] = {}

    def run():
        try:
            outcome["result"] = call()
        except BaseException as e:  # SystemExit too: the client exits when it finds no credentials
            outcome["error"] = e

    worker = threading.Thread(target=run, name="kaggle", daemon=True)
    worker.start()
    last, since = progress(), time.monotonic()
    while worker.is_alive():
        worker.join(min(1.0, STALL_SECONDS))
        now = progress()
        if now != last:
            last, since = now, time.monotonic()
        elif worker.is_alive() and time.monotonic() - since > STALL_SECONDS:
            raise Unreachable(f"ingest.source=kaggle: no answer from Kaggle for {STALL_SECONDS:g} s {what}")
    if "error" in outcome:
        raise outcome["error"]
    return outcome.get("result")


def _unreachable(e: BaseException) -> bool:
    """No network, a name that does not resolve, a connection refused, reset or timed out."""
    import requests  # the Kaggle client's HTTP library, here once it has failed

    return isinstance(e, (ConnectionError, TimeoutError, requests.ConnectionError, requests.Timeout,
                          requests.exceptions.ChunkedEncodingError))


def _cause(e: BaseException) -> str:
    """requests' messages run to a paragraph, where the innermost cause's name says it."""
    causes = re.findall(r"Caused by (\w+)", str(e))
    return causes[-1] if causes else brief(e)


def _http_status(e: Exception) -> int | None:
    for obj in (e, getattr(e, "response", None)):
        for attr in ("status", "status_code"):
            value = getattr(obj, attr, None)
            if isinstance(value, int):
                return value
    return None
