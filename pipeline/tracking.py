"""MLflow, and every call to it: one row per pipeline execution.

`train` opens the row before its first step (so the row's duration includes training, and an
unreachable server stops the stage before any work) and logs every param and the data set; when
its outputs are on disk it keys the row: hash(all params, the trained generator's bytes), and adds
the losses, the grid and the generator as an MLflow model. `evaluate` and `package` find the row
by that key and add to it; a killed training resumes its row. When only some stages rerun (say
`evaluate.*` changed), the key differs, so the first of them makes a new row and copies into it
what the stages DVC skips left on disk, where their results still hold (`stage_results`), so
every row is complete; a stage that finds its row fills in what it lacks the same way, and
`generate`, which has nothing of its own to log, does so when DVC will skip both stages after it.
A later stage that DVC may restore from its run-cache instead (its inputs were run before: a
retraining to weights made before) is filled in from the earlier row of the same generator and
inputs. Stages that DVC skips log nothing: no empty rows.

The store is `sqlite:///<main repo>/mlflow.db` unless MLFLOW_TRACKING_URI is set; the main repo is
DVC_ROOT (DVC points it at the parent repo inside `dvc exp run --temp`/queued runs), so temp and
queued experiments log into the same place as the workspace. Queued experiments run side by side
(`dvc queue start -j 2`), so every call to a SQLite store holds a file lock beside it: SQLite takes
one writer at a time, and two processes creating the store or the experiment at once collide.
A row is named after its DVC experiment, or, for a workspace run, after the commit and the time
it started.
"""
from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import sqlite3
import subprocess
import tempfile
import time
import urllib.parse
import urllib.request
import warnings
from pathlib import Path

import pandas as pd

from pipeline.errors import FULL_DISK, PipelineError, existing_folder
from pipeline.files import main_repo, signals_held, under_main_repo, write_json
from pipeline.params import Params, flatten
from pipeline.processes import dvc_execution
from pipeline.stage_results import all_hold, held_results, later_stages, trained_under_these_params

EXPERIMENT = "monet-cyclegan"
TRAINING_DONE = "training_done"  # the tag of a row whose training logged all it had to
# the tag of a row a retraining made from a finished checkpoint, naming the row that checkpoint names
# (the checkpoint is not rewritten, so the tag is how a rerun of that stopped retraining finds its row)
RETRAINED_FROM = "retrained_from_row"
MODEL_NAME = "photo2monet"  # the generator as an MLflow model: runs:/<run id>/photo2monet
KAGGLE_URL = "https://www.kaggle.com/competitions/gan-getting-started"
# MLflow 3's UI opens an experiment on its GenAI pages unless the address asks for the training view
TRAINING_VIEW = "?workflowType=machine_learning"
PROBE_SECONDS = 5  # an MLflow server that does not answer its health check in this long is down
GENERATOR_TAG = "generator_sha256"  # which generator a row's results come from (its bytes' hash, 16 hex)


def default_store() -> str:
    return f"sqlite:///{main_repo() / 'mlflow.db'}"


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI, else the repository's own store. A relative SQLite path in it
    (`sqlite:///mlflow.db`) is under the main repository, where it was typed: queued and --temp
    experiments run in .dvc/tmp/exps/..., and their rows would go to a store deleted with it."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        return default_store()
    if uri.startswith("sqlite:///"):  # an absolute path (sqlite:////srv/x.db) stays as it is
        return f"sqlite:///{under_main_repo(uri.removeprefix('sqlite:///'))}"
    return uri


def sqlite_file(uri: str) -> Path | None:
    """The database file of a SQLite store's address, without its options (`?timeout=5`), decoded
    as SQLAlchemy decodes it; None for another store."""
    if not uri.startswith("sqlite:///"):
        return None
    return Path(urllib.parse.unquote(uri.removeprefix("sqlite:///").partition("?")[0]))


def _without_password(uri: str) -> str:
    """`uri` fit for an error message: postgresql://user:secret@host/db -> postgresql://user:***@host/db."""
    parts = urllib.parse.urlsplit(uri)
    if parts.password is None:
        return uri
    return urllib.parse.urlunsplit(parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", ":***@", 1)))


def experiment_name() -> str:
    """The MLflow experiment the stages log into: MLFLOW_EXPERIMENT_NAME, else the pipeline's own
    (set but empty too: MLflow refuses an experiment named '')."""
    return os.environ.get("MLFLOW_EXPERIMENT_NAME") or EXPERIMENT


def check_store() -> None:
    """Fail fast, before a stage does any work, when MLFLOW_TRACKING_URI names a server that does
    not answer (MLflow itself would retry for minutes, and only after training), or a SQLite file
    MLflow could not write: in a folder that is not there or this user may not write, a file this
    user may not write, a folder."""
    if os.environ.get("MLFLOW_EXPERIMENT_ID") and not os.environ.get("MLFLOW_EXPERIMENT_NAME"):
        # MLflow's other way to name an experiment: the stages pick theirs by name (and make it)
        raise PipelineError(f"tracking: MLFLOW_EXPERIMENT_ID={os.environ['MLFLOW_EXPERIMENT_ID']} is set, but the "
                            f"pipeline names its experiment: set MLFLOW_EXPERIMENT_NAME to that experiment's name, "
                            f"or unset MLFLOW_EXPERIMENT_ID to log into '{EXPERIMENT}'")
    uri = tracking_uri()
    db = sqlite_file(uri)
    repo = str(main_repo())
    if uri.startswith(f"sqlite:///{repo}/") and ("?" in repo or urllib.parse.unquote(repo) != repo):
        # a store under the repository (the default, or a relative path): SQLAlchemy cuts its address
        # at '?' and decodes '%XX' (a repository in `q?mark/` logged into a file `q` beside it), and
        # MLflow makes the folder it names undecoded
        raise PipelineError(f"tracking: the repository's path {repo} holds '?' or '%XX', which MLflow's "
                            f"database layer reads as address syntax (it would log into another file); move "
                            f"the repository, or set MLFLOW_TRACKING_URI to a store whose path has neither")
    if db is not None:
        # what MLflow would only find when it first writes, after the work, as a traceback (or,
        # for a folder, after minutes of retries)
        if db.is_dir():
            problem, mend = "names a folder, not a file", "correct the address"
        elif not db.parent.is_dir():
            problem, mend = f"is in {db.parent}, which does not exist", "create it, correct the address"
        elif not os.access(db.parent, os.W_OK | os.X_OK):  # SQLite writes its journal beside the file
            problem, mend = f"is in {db.parent}, where this user may not write", "allow it, correct the address"
        elif db.exists() and not os.access(db, os.R_OK | os.W_OK):
            problem, mend = "is a file this user may not write", "allow it, correct the address"
        else:
            deleted = db.exists() and _deleted_in_sqlite(db)
            if deleted:  # else MLflow says so only when the stage first logs: evaluate's after its work
                raise PipelineError(_deleted_experiment(deleted))
            return
        if uri == default_store():
            raise PipelineError(f"tracking: its store {uri} {problem}; mend that, or set MLFLOW_TRACKING_URI "
                                f"to a store elsewhere")
        raise PipelineError(f"tracking: MLFLOW_TRACKING_URI={_without_password(uri)} {problem}; {mend}, or unset "
                            f"it to log into {default_store()}")
    if not uri.startswith(("http://", "https://")):
        return
    # a server behind basic auth named as http://user:password@host: urllib takes 'user:password@host'
    # for the host name; MLflow itself sends the credentials as a header
    parts = urllib.parse.urlsplit(uri)
    health = urllib.request.Request(urllib.parse.urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))
                                    .rstrip("/") + "/health")
    if parts.username is not None:
        token = f"{urllib.parse.unquote(parts.username)}:{urllib.parse.unquote(parts.password or '')}"
        health.add_header("Authorization", "Basic " + base64.b64encode(token.encode()).decode())
    try:
        with urllib.request.urlopen(health, timeout=PROBE_SECONDS) as answer:
            answer.read()
    except (OSError, ValueError) as e:  # URLError, HTTPError, timeouts and refused connections are OSErrors
        reason, shown = getattr(e, "reason", None) or e, _without_password(uri)
        raise PipelineError(f"tracking: no MLflow server answers at MLFLOW_TRACKING_URI={shown} ({reason}); "
                            f"start it, correct the address, or unset it to log into {default_store()}") from None


def check_generator(path: Path, stage: str) -> None:
    """Fail fast when the generator that names this execution's row is missing or no generator:
    `evaluate` and `package` would otherwise do all their work, then stop on it with a traceback,
    or log a file of garbage as the run's model (MLflow only warns when it does not load back)."""
    if not Path(path).is_file():
        raise PipelineError(f"{stage}: {path}: no generator (run the train stage first); {stage} finds "
                            f"its MLflow row by the generator's bytes")
    import torch

    from pipeline import generator_file

    generator_file.load(Path(path), torch.device("cpu"))  # DataError, one line, when it is no generator


class ServerLost(PipelineError):
    """The MLflow server stopped answering while a stage logged (after MLflow's own retries)."""


def _server_lost(e: BaseException, uri: str) -> ServerLost | None:
    """One line for MLflow's failure to reach its server once it has given up retrying (a chain of
    tracebacks, its address with the password in it), else None."""
    text = str(e)
    if not (type(e).__name__ == "MlflowException" and re.match(r"API request to \S+ failed with (timeout )?exception ", text)):
        return None
    errno_text = re.search(r"\[Errno -?\d+\] ([^\"')]+)", text)
    timed_out = " failed with timeout exception " in text or "timed out" in text.lower()
    why = errno_text[1].strip() if errno_text else "timed out" if timed_out else "no answer"
    return ServerLost(f"tracking: the MLflow server at MLFLOW_TRACKING_URI={_without_password(uri)} stopped "
                      f"answering ({why}, after MLflow's retries); start it and run the stage again (the "
                      f"run it was logging into is taken up again)")


_held = 0  # depth of _serialized in this process (flock is per open file: a nested open would block)
_seconds = 0.0  # time spent in MLflow calls by this process, reported by the stages


@contextlib.contextmanager
def _serialized():
    """Hold the store's lock (SQLite only) and count the time spent."""
    global _held, _seconds
    uri = tracking_uri()
    started = time.perf_counter()
    with contextlib.ExitStack() as stack:
        if sqlite_file(uri) and _held == 0:
            lock = stack.enter_context(open(f"{sqlite_file(uri)}.lock", "a"))
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        _held += 1
        try:
            yield
        except Exception as e:
            lost = None if isinstance(e, PipelineError) else _server_lost(e, uri)
            if lost:
                raise lost from None
            full = None if isinstance(e, PipelineError) else _full_disk(e, uri)
            if full is None:
                raise
            raise PipelineError(f"tracking: MLflow could not write to {full}: the disk is full; free some "
                                f"space and run the stage again") from None
        finally:
            _held -= 1
            if _held == 0:
                _seconds += time.perf_counter() - started


def _full_disk(e: BaseException | None, uri: str) -> str | None:
    """Where MLflow found the disk full, if that is what `e` or an error it came from says (a full
    SQLite store raises an MlflowException; MLflow's own try to mark the model failed, after a
    full artifact folder, raises one again), else None."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in FULL_DISK:
            target = e.filename2 or e.filename  # shutil names the target second: a temp file, gone now
            return str(existing_folder(target) or target) if target else _artifact_folder(uri)
        if "database or disk is full" in str(e):  # SQLite's SQLITE_FULL
            return str(sqlite_file(uri) or _without_password(uri))
        e = e.__cause__ or e.__context__
    return None


def _artifact_folder(uri: str) -> str:
    """The active row's artifacts (MLflow's copy into them names no file when the disk fills)."""
    run = _mlflow().active_run()
    where = run.info.artifact_uri if run else artifact_location(uri) or _without_password(uri)
    return urllib.request.url2pathname(urllib.parse.urlsplit(where).path) if where.startswith("file:") else where


def _mlflow():
    """mlflow, imported on first use (heavy: only the stages that log import it), the time counted."""
    global _seconds
    started = time.perf_counter()
    import mlflow
    import mlflow.data
    import mlflow.pyfunc

    # MLflow logs each SQLite error with its traceback, then raises it: the error is what the stage
    # shows (one line where it is the user's to mend, a full disk), and the log said it twice more
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)
    # MLflow prints a server's run and experiment pages as it ends a run, with the password that
    # MLFLOW_TRACKING_URI holds; report() says where the run is, without it
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    if _held == 0:  # inside _serialized the time is counted already
        _seconds += time.perf_counter() - started
    return mlflow


def report(stage: str) -> str:
    """One line for the stage's log: where it logged, what that cost, and the run's page (in
    `mlflow ui` on its default port for a local store)."""
    mlflow = _mlflow()
    uri = _without_password(tracking_uri())  # a log is no place for a server's password
    run = mlflow.last_active_run()
    parts = urllib.parse.urlsplit(uri)  # a page to open: the browser asks for the credentials itself
    ui = (urllib.parse.urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2])).rstrip("/")
          if uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000")
    page = f"{ui}/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}{TRAINING_VIEW}" if run else "?"
    return f"{stage}: logged to {uri} in {_seconds:.1f} s: {page}"


def run_key(params: Params, generator_path: str | Path) -> str:
    h = hashlib.sha256(params_key(params).encode())
    h.update(Path(generator_path).read_bytes())
    return h.hexdigest()[:16]


def generator_sha(generator_path: str | Path) -> str:
    return hashlib.sha256(Path(generator_path).read_bytes()).hexdigest()[:16]


def params_key(params: Params) -> str:
    return hashlib.sha256(json.dumps(flatten(params), sort_keys=True, default=str).encode()).hexdigest()[:16]


def run_name() -> str:
    """The DVC experiment's name, else `workspace@<commit> <date time>`: what a person recognises.
    Always set explicitly: MLflow's own random names repeat, because the stages seed `random`."""
    name = os.environ.get("DVC_EXP_NAME")
    if name:
        return name
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return f"workspace@{commit or 'no-commit'} {time.strftime('%Y-%m-%d %H:%M:%S')}"


def _exp_name() -> str:
    """The DVC experiment this execution is (the rows' `dvc_exp_name` tag), or "workspace"."""
    return os.environ.get("DVC_EXP_NAME") or "workspace"


def artifact_location(uri: str) -> str | None:
    """Where a new experiment in store `uri` keeps its artifacts: `mlartifacts/` beside a SQLite
    file, under the main repository for another database; a server decides for itself (None).
    MLflow's default for a database is ./mlruns under the working folder, which for a queued or --temp
    experiment is DVC's temp folder: its models and pictures went with it."""
    if uri.startswith(("http://", "https://", "databricks", "file:")) or "://" not in uri:
        return None  # a file store (a bare path too) keeps them inside itself
    db = sqlite_file(uri)
    return ((db.parent if db else main_repo()) / "mlartifacts").as_uri()


def _store_named(uri: str) -> str:
    """The store, as an error line names it: the default, or the address the user set (told by the
    address, not the variable: MLflow's set_tracking_uri sets the variable, to the default too)."""
    if uri == default_store():
        return f"its store {uri}"
    return f"MLFLOW_TRACKING_URI={_without_password(uri)} (unset, the pipeline logs into {default_store()})"


def _deleted_experiment(exp_id: str) -> str:
    """The line for an experiment deleted in the UI: MLflow will not log into it, nor make another
    of its name."""
    uri = _without_password(tracking_uri())
    return (f"tracking: the MLflow experiment '{experiment_name()}' in {uri} is deleted; restore it "
            f"(MLFLOW_TRACKING_URI={uri} mlflow experiments restore --experiment-id {exp_id}), or set "
            f"MLFLOW_EXPERIMENT_NAME to log into another experiment")


def _deleted_in_sqlite(db: Path) -> str | None:
    """The id of this pipeline's experiment in the SQLite store `db` when it is deleted, else None
    (read without MLflow, which takes seconds to import; a store MLflow has not made yet, or of
    another layout, is MLflow's to judge)."""
    try:
        with contextlib.closing(sqlite3.connect(f"{db.as_uri()}?mode=ro", uri=True)) as con:
            row = con.execute("select experiment_id from experiments where name = ? and lifecycle_stage = 'deleted'",
                              (experiment_name(),)).fetchone()
    except sqlite3.Error:
        return None
    return str(row[0]) if row else None


def _experiment_id(mlflow) -> str:
    mlflow.set_tracking_uri(tracking_uri())
    name = experiment_name()
    try:  # the first call that opens the store: what fails here is the store, as the user named it
        exp = mlflow.get_experiment_by_name(name)
    except Exception as e:  # e.g. a file store (MLflow 3 refuses them), a database without its driver
        if _full_disk(e, tracking_uri()) or _server_lost(e, tracking_uri()):
            raise  # _serialized says so
        said = f"{type(e).__name__}: {' '.join(str(e).split())}"  # MLflow's own advice, on one line
        store = _store_named(tracking_uri())
        if "syntax error" in said and {"'", '"'} <= set(str(Path.cwd())):
            # MLflow writes the working folder's ./mlruns, quoted by repr(), into the SQL that makes a
            # new store's first experiment: with both quotes in the path, that SQL does not parse
            said = (f"MLflow cannot make a new store from a folder whose path holds both ' and \" "
                    f"({Path.cwd()}); rename the folder ({said[:160]})")
        raise PipelineError(f"tracking: MLflow cannot use {store}: {said}") from None
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            raise PipelineError(_deleted_experiment(exp.experiment_id))
        return exp.experiment_id
    try:
        return mlflow.create_experiment(name, artifact_location=artifact_location(tracking_uri()))
    except Exception:  # a server store has no lock of ours: another queue worker made it meanwhile
        exp = mlflow.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def _row_by_key(mlflow, exp_id: str, key: str):
    """The row tagged with this execution's `pipeline_key` (see run_key), or None. Two executions
    of the same params train the same weights (queued side by side, say): the key is theirs both,
    so the row of this DVC experiment comes first, then the newest."""
    found = mlflow.search_runs([exp_id], filter_string=f"tags.pipeline_key = '{key}'",
                               order_by=["attributes.start_time DESC"], output_format="list")
    return next((r for r in found if r.data.tags.get("dvc_exp_name") == _exp_name()), found[0] if found else None)


def _failed_as(e: BaseException) -> str:
    """The status of a row whose stage raised `e`: KILLED on ^C, else FAILED."""
    return "KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED"


@contextlib.contextmanager
def _failing_ends(mlflow, keep_end_time: int | None = None):
    """Around work on the active row: an error ends the row FAILED (KILLED on ^C), under the store's
    lock, instead of leaving it for MLflow to close FINISHED when the process exits. With
    `keep_end_time` (a row that holds this stage's results, logged into again by a forced rerun)
    it ends FINISHED then, as it was. A full store that cannot take even that leaves the row as it
    is: the stage's own error is the line to show."""
    try:
        yield
    except BaseException as e:
        lost = isinstance(e, ServerLost)  # the server stopped answering: one quick try (_quick_requests)
        run = mlflow.active_run()
        try:
            with _quick_requests() if lost else contextlib.nullcontext(), _serialized():
                mlflow.end_run(_failed_as(e) if keep_end_time is None else "FINISHED")
                if keep_end_time is not None:
                    mlflow.MlflowClient().set_terminated(run.info.run_id, "FINISHED", end_time=keep_end_time)
        except Exception if lost else PipelineError:  # the disk full (_serialized says so), the server gone
            pass
        raise


@contextlib.contextmanager
def _environment(values: dict[str, str]):
    """os.environ with `values` set inside the block, and as it was after it."""
    before = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _quick_requests():
    """MLflow's requests to its server tried once, briefly: after it stopped answering, ending the
    row would wait out MLflow's retries a second time. end_run takes the row off MLflow's stack
    before it asks (MLflow ends what is on it as the process exits, waiting once more); unreached,
    the row stays RUNNING for the rerun to take up."""
    return _environment({"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"})


def logged_params(params: Params) -> dict[str, str]:
    """Every param as a row shows it: a whole number as params.yaml and `dvc exp show` write it
    (`lambda_cycle` 10, not the 10.0 the float field holds), so `params.lambda_cycle = '10'` in
    the UI's search box finds the runs `dvc exp run -S lambda_cycle=10` made."""
    def shown(value: object) -> str:
        whole = isinstance(value, float) and value.is_integer() and abs(value) < 1e15
        return str(int(value)) if whole else str(value)

    return {key: shown(value) for key, value in flatten(params).items()}


def _open(mlflow, stack: contextlib.ExitStack, run_id: str | None = None, exp_id: str | None = None,
          tags: dict[str, str] | None = None, **ending):
    """Resume the row `run_id`, or start a new one in `exp_id` with `tags`, and put it in _active's
    charge (`ending`: its keyword arguments) on `stack`. MLflow marks a row RUNNING as it opens it:
    a SIGTERM or Ctrl-C before _active held it left the row RUNNING for good (a FINISHED one too),
    so they wait until it does."""
    with signals_held():
        if run_id is not None:
            run = mlflow.start_run(run_id=run_id)
        else:
            run = mlflow.start_run(experiment_id=exp_id, run_name=run_name(),
                                   tags={**(tags or {}), "dvc_exp_name": _exp_name()})
        stack.enter_context(_active(run, **ending))
    return run


def _log_params_and_data(params: Params, manifest: Path) -> None:
    mlflow = _mlflow()
    mlflow.log_params(logged_params(params))
    log_dataset(params, manifest)


@contextlib.contextmanager
def start_training(params: Params, manifest: Path, resumed_row: str | None):
    """`train`, before its first step: this execution's row, to use as a context around training.
    A training that was killed (or failed) and is run again resumes its row, renamed after the
    execution that resumes it (`dvc exp run -n NAME`). Only when the training itself resumes from
    its checkpoint, and only the row that checkpoint names (`resumed_row`; "" for a checkpoint
    from before it named one: the newest unfinished row of these params), or, when that row's
    training finished, the row a stopped retraining from it made: one that starts afresh
    (the checkpoint deleted, or a queued experiment of the same params training beside it in a
    folder of its own) makes its own row, and never takes over another execution's unfinished one.
    (The stage has called check_store before loading the data.)"""
    mlflow = _mlflow()
    with contextlib.ExitStack() as stack:
        with _serialized():
            exp_id = _experiment_id(mlflow)
            key = params_key(params)
            unfinished = [] if resumed_row is None else [
                r for r in mlflow.search_runs([exp_id], filter_string=f"tags.training_of = '{key}'",
                                              output_format="list")
                if _training_unfinished(r) and (not resumed_row or resumed_row in (
                    r.info.run_id, r.data.tags.get(RETRAINED_FROM)))]
            if unfinished:
                run = _open(mlflow, stack, run_id=unfinished[0].info.run_id)
                mlflow.MlflowClient().update_run(run.info.run_id, name=run_name())
                mlflow.set_tag("dvc_exp_name", _exp_name())
            else:  # a checkpoint whose row finished is a retraining of it (`dvc repro -f`): a row of its own
                tags = {"training_of": key, **({RETRAINED_FROM: resumed_row} if resumed_row else {})}
                run = _open(mlflow, stack, exp_id=exp_id, tags=tags)
                _log_params_and_data(params, manifest)
        yield run
        with _serialized():  # its logging done: a later failure of evaluate or package does not reopen it
            mlflow.set_tag(TRAINING_DONE, "true")


def _existing_experiment(mlflow):
    """The pipeline's experiment in the store, or None; never makes a store (opening a SQLite file
    that is not there would create one, with no row to mark)."""
    uri = tracking_uri()
    if sqlite_file(uri) and not sqlite_file(uri).exists():
        return None
    mlflow.set_tracking_uri(uri)
    return mlflow.get_experiment_by_name(experiment_name())


def end_lost_training(params: Params, error: BaseException) -> None:
    """The stage's DDP launcher, after a worker failed: rank 0's row of this training is left
    RUNNING when rank 0 itself was killed outright; end it FAILED (KILLED on ^C). The unfinished
    rows of these params in this DVC experiment (or the workspace) are this training's."""
    try:
        mlflow = _mlflow()
        with _serialized():
            exp = _existing_experiment(mlflow)
            found = exp and mlflow.search_runs(
                [exp.experiment_id], filter_string=f"tags.training_of = '{params_key(params)}' and "
                f"attributes.status = 'RUNNING'", output_format="list")
            for r in found or []:
                if _training_unfinished(r) and r.data.tags.get("dvc_exp_name") == _exp_name():
                    mlflow.MlflowClient().set_terminated(r.info.run_id, _failed_as(error))
    except Exception:  # the stage's own error is the line to show, not a second one about the store
        pass


def _training_unfinished(row) -> bool:
    """A row whose training stopped before its results were logged: not keyed yet (finish_training),
    or keyed and then stopped while logging the rest (not FINISHED, and not tagged TRAINING_DONE: the
    later stages' results it holds may be copies finish_training made before it was stopped)."""
    if "pipeline_key" not in row.data.tags:
        return True
    return row.info.status != "FINISHED" and TRAINING_DONE not in row.data.tags


def finish_training(params: Params, generator_path: Path) -> None:
    """`train`, with its outputs on disk: key the row, so the later stages find it, and copy in the
    results of the later stages that still hold (a retraining to the same weights skips them)."""
    mlflow = _mlflow()
    with _serialized():
        sha, key = generator_sha(generator_path), run_key(params, generator_path)
        mlflow.set_tags({"pipeline_key": key, GENERATOR_TAG: sha})
        _note_row(key)
        _copy_held_results("train")
        _copy_restored_results("train", params, generator_path, sha)


@contextlib.contextmanager
def open_run(params: Params, generator_path: Path, stage: str, shards: Path, manifest: Path):
    """`evaluate`, `package` (and `generate`, below): the row of this execution, found by its key,
    else a new one with every param, the data set, the generator as a model; either way with the
    results of the other stages that still hold and are not in it yet. A context around the
    stage's logging into it."""
    mlflow = _mlflow()
    with contextlib.ExitStack() as stack:
        with _serialized():
            exp_id = _experiment_id(mlflow)
            key = run_key(params, generator_path)
            found = _row_by_key(mlflow, exp_id, key)
            if found:
                # a stage DVC skipped after train made the row is not in it: in a fresh clone, say,
                # generate reproduces the locked JPEGs and DVC skips evaluate (its metrics are in git)
                # a forced rerun (`dvc repro -f -s evaluate`) on a row that holds this stage's results:
                # if its logging fails, the row stays as it was (those results still stand)
                # (not a later stage of the execution that filled it: `dvc repro -f` reruns them all,
                # and train copied their results in when the lock said they held)
                ours = _filled_in_this_execution(key)
                kept = (found.info.end_time if found.info.status == "FINISHED" and _succeeded_for(found, stage)
                        and not ours else None)
                # a forced rerun (`dvc repro -f -s package`) of a row that is complete already: the row
                # is the execution that made it, and keeps its duration
                complete = (found.info.status == "FINISHED" and not ours
                            and any(k.startswith("package.") for k in found.data.metrics))
                run = _open(mlflow, stack, run_id=found.info.run_id,
                            keep_end_time=found.info.end_time if complete else None, kept_if_failed=kept)
                if f"{stage}.results_from" in found.data.tags:  # its own results follow: not another row's any more
                    mlflow.MlflowClient().delete_tag(run.info.run_id, f"{stage}.results_from")
                _copy_held_results(stage, logged=found.data.metrics)
                _copy_restored_results(stage, params, generator_path,
                                       found.data.tags.get(GENERATOR_TAG) or generator_sha(generator_path))
                _note_row(key, this_execution=not complete)  # a later rerun's stages after this one keep it too
            else:
                sha = generator_sha(generator_path)
                run = _open(mlflow, stack, exp_id=exp_id, tags={"pipeline_key": key, GENERATOR_TAG: sha})
                _log_params_and_data(params, manifest)
                log_generator_model(generator_path, shards, manifest, params.precision)
                _copy_held_results(stage)
                _copy_restored_results(stage, params, generator_path, sha)
                _note_row(key)
        yield run


def complete_row_if_rest_holds(params: Params, generator_path: Path, stage: str, later: tuple[str, ...],
                               shards: Path, manifest: Path) -> None:
    """`generate`, which logs nothing of its own, with its outputs on disk: when they are the
    locked ones and so every stage in `later` still holds, DVC skips them all (`dvc exp run -S
    generate.batch_size=32` makes the same JPEGs), and none of them would log this execution;
    `stage` then fills in its row, or makes it, as they would have. So it does when no stage of
    this execution has made its row yet (train did not run) and earlier rows of this generator
    hold the results of all of them under these params: DVC then restores them from its run-cache
    (it ran them before on these inputs), which the lock cannot tell (after `git checkout
    params.yaml` it is the last experiment's); a stage of them that does run logs its own results
    over the copies. Otherwise (other JPEGs, say) they run and make the row. Never for a generator
    that dvc.lock does not record as trained under these params (`dvc repro -s generate` after a
    change of train's params): the row would claim params its weights did not learn under."""
    if all_hold(later, stage) or (not _row_made(params, generator_path)
                                  and trained_under_these_params(str(generator_path), stage)
                                  and _all_in_earlier_rows(params, generator_path, stage, later)):
        with open_run(params, generator_path, stage, shards, manifest):
            pass
        print(report(stage))


def _all_in_earlier_rows(params: Params, generator_path: Path, stage: str, later: tuple[str, ...]) -> bool:
    mlflow = _mlflow()
    with _serialized():
        exp = _existing_experiment(mlflow)
        if exp is None:
            return False
        sources = _earlier_results(mlflow, exp.experiment_id, stage, params, generator_path,
                                   generator_sha(generator_path))
    with_results = [other for other, (_, files) in later_stages(stage, str(generator_path)).items()
                    if other in later and _metric_prefixes(files)]
    return bool(with_results) and all(other in sources for other in with_results)


ROW_NOTE = Path(".cache/mlflow-row.json")  # the row a stage last logged into: see _row_made


def _row_note(key: str) -> dict:
    return {"store": tracking_uri(), "experiment": experiment_name(), "key": key}


def _note_row(key: str, this_execution: bool = True) -> None:
    """Note the row a stage logs into, and with `this_execution` that the DVC command it runs under
    spans it (made it, or extends its end), so the stages after it in that command do too."""
    # a note to spare MLflow's import: a read-only checkout (or a file named .cache) goes without
    with contextlib.suppress(OSError, PipelineError):
        write_json(ROW_NOTE, {**_row_note(key), "execution": dvc_execution() if this_execution else None})


def _read_note() -> dict:
    try:
        note = json.loads(ROW_NOTE.read_text())
    except (OSError, ValueError):
        return {}
    return note if isinstance(note, dict) else {}


def _filled_in_this_execution(key: str) -> bool:
    """Whether the DVC command this stage runs under spans the row of `key`: a stage of it before
    this one made the row or extended it (by hand, with no DVC command to tell, never)."""
    note, execution = _read_note(), dvc_execution()
    return execution is not None and note.get("execution") == execution and _notes_row(note, key)


def _notes_row(note: dict, key: str) -> bool:
    return {k: note.get(k) for k in ("store", "experiment", "key")} == _row_note(key)


def _row_made(params: Params, generator_path: Path) -> bool:
    """Whether a stage made or filled the row of these params and generator in this store (train,
    when it ran in this execution), read from the note the stages leave in .cache/: loading MLflow
    to look costs generate 1.5 s, 1% of a first `dvc repro`."""
    store = sqlite_file(tracking_uri())
    return (store is None or store.exists()) and _notes_row(_read_note(), run_key(params, generator_path))


@contextlib.contextmanager
def failure_marks_row(params: Params, generator_path: Path, stage: str):
    """`generate`, `evaluate`, `package`: around their work, done before any row is open. If it
    fails (or ^C), the row of this execution, when train made one, is marked FAILED (KILLED) as a
    failing training marks it; none is made for it (no empty rows). A row that already holds this
    stage's results is left as it is: the stage succeeded for it before, and this is a forced rerun."""
    try:
        yield
    except BaseException as e:
        if isinstance(e, ServerLost):  # see _failing_ends
            raise
        try:
            mlflow = _mlflow()
            with _serialized():
                exp = _existing_experiment(mlflow)
                key = run_key(params, generator_path)
                found = exp and _row_by_key(mlflow, exp.experiment_id, key)
                # a row with this stage's results already in it is found by a forced rerun (`dvc repro
                # -f -s evaluate`): those results still stand, and DVC restores them from its run-cache
                # afterwards, with no stage run to mend the row
                # (generate logs nothing of its own: the results of the stages that read its JPEGs say it)
                # (unless a stage of this very command filled them in: `dvc repro -f` that fails)
                if found and (not _succeeded_for(found, stage) or _filled_in_this_execution(key)):
                    mlflow.MlflowClient().set_terminated(found.info.run_id, _failed_as(e))
        except Exception:  # the stage's own error is the line to show, not a second one about the store
            pass
        raise


def _succeeded_for(row, stage: str) -> bool:
    """Whether `row` holds `stage`'s results (generate logs nothing of its own: the results of the
    stages that read its JPEGs say it succeeded), its own: results copied from another row
    (`evaluate.results_from`) say nothing of this execution's stage."""
    proof = ("evaluate", "package") if stage == "generate" else (stage,)
    return any(k.startswith(f"{name}.") and f"{name}.results_from" not in row.data.tags
               for k in row.data.metrics for name in proof)


@contextlib.contextmanager
def _active(run, keep_end_time: int | None = None, kept_if_failed: int | None = None):
    """The run as a context, ended under the store's lock: FINISHED, or FAILED (KILLED on ^C)
    when the stage raised, so a broken execution is visible as such in the UI. With
    `keep_end_time`, FINISHED at that time (ms) instead of now; with `kept_if_failed`, FINISHED at
    that time if the stage raised (a forced rerun on a row that holds its results)."""
    mlflow = _mlflow()
    with _failing_ends(mlflow, kept_if_failed):
        yield run
    with _serialized():
        mlflow.end_run()
        if keep_end_time is not None:
            mlflow.MlflowClient().set_terminated(run.info.run_id, "FINISHED", end_time=keep_end_time)


def _metric_prefixes(files: list[Path]) -> tuple[str, ...]:
    """The names a stage's metrics files give its metrics in a row: `evaluate.json` logs `evaluate.*`."""
    return tuple(f"{path.stem}." for path in files if path.suffix == ".json")


def _copy_held_results(stage: str, logged=()) -> None:
    """Log the results of every other stage that still holds, but not one whose metrics are among
    `logged` (the row's metric names: a metrics file `evaluate.json` logs `evaluate.*`). Only those
    stages are checked: confirming one reads the folders it depends on (1.5 GB of shards)."""
    def wanted(other: str, files: list[Path]) -> bool:
        return bool(files) and not any(name.startswith(_metric_prefixes(files)) for name in logged)

    for other, files in held_results(stage, wanted=wanted).items():
        # its final values end its curves, as the stage itself logs them (train: at its last step),
        # not at step 0, a false first point before the curve's
        steps = [pd.read_csv(path).get("step", pd.Series()).dropna() for path in files if path.suffix == ".csv"]
        last = max((int(s.max()) for s in steps if not s.empty), default=None)
        for path in files:
            log_file(path, other, step=last)


# params that change no output's bytes (on the CPU: tests/test_end_to_end.py, where DVC skips what
# follows), so rows that differ in them alone hold the same later results; where other bytes come
# of them after all, DVC runs the later stages, which log their own over the copies
SAME_BYTES = ("generate.batch_size",)


def _earlier_results(mlflow, exp_id: str, stage: str, params: Params, generator_path: Path, sha: str,
                     this_row: str = "") -> dict[str, tuple[object, list[Path], tuple[str, ...]]]:
    """{stage after `stage` that has metrics of its own: (the newest FINISHED row but `this_row` of
    generator `sha` with its results and the params they depend on as these, its files, the
    prefixes of its metrics)}; a stage that no such row holds is left out."""
    flat = logged_params(params)
    earlier = [r for r in mlflow.search_runs(
        [exp_id], filter_string=f"tags.{GENERATOR_TAG} = '{sha}' and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"], output_format="list") if r.info.run_id != this_row]
    found = {}
    for other, (keys, files) in later_stages(stage, str(generator_path)).items():
        prefixes = _metric_prefixes(files)
        inputs = {k: v for k, v in flat.items() if (k in keys or k.split(".")[0] in keys) and k not in SAME_BYTES}
        source = next((r for r in earlier if all(r.data.params.get(k) == v for k, v in inputs.items())
                       and any(name.startswith(prefixes) for name in r.data.metrics)), None) if prefixes else None
        if source is not None:
            found[other] = (source, files, prefixes)
    return found


def _copy_restored_results(stage: str, params: Params, generator_path: Path, sha: str) -> None:
    """Into the active row, the results of each stage after `stage` that the row lacks, from the
    newest earlier FINISHED row of the same generator whose params that stage's results depend on
    are the same. DVC runs such a stage only if its inputs changed; otherwise it restores its
    outputs from the run-cache, the outputs that earlier execution logged, and nothing logs them
    here (a retraining to the weights of an execution run before: `dvc exp run -S
    train.log_every=25` changes no weight but reruns train). A stage that does run logs its own
    results over these. `sha` is the generator's generator_sha (computed once by the caller, which
    tags the row with it)."""
    mlflow = _mlflow()
    run = mlflow.active_run()
    logged = mlflow.get_run(run.info.run_id).data.metrics
    for other, (source, files, prefixes) in _earlier_results(mlflow, run.info.experiment_id, stage, params,
                                                             generator_path, sha, run.info.run_id).items():
        if any(name.startswith(prefixes) for name in logged):
            continue  # its results are in the row
        mlflow.log_metrics({k: v for k, v in source.data.metrics.items() if k.startswith(prefixes)})
        mlflow.set_tags({k: v for k, v in source.data.tags.items() if k.startswith(prefixes)}
                        | {f"{other}.results_from": source.info.run_id})
        pictures = {path.name for path in files if path.suffix == ".png"}
        with tempfile.TemporaryDirectory() as tmp:
            for artifact in mlflow.MlflowClient().list_artifacts(source.info.run_id):
                if artifact.path in pictures:
                    mlflow.log_artifact(mlflow.artifacts.download_artifacts(
                        run_id=source.info.run_id, artifact_path=artifact.path, dst_path=tmp))


def _dataset_source(source: str):
    """(MLflow dataset source, name) of `ingest.source`."""
    from mlflow.data.code_dataset_source import CodeDatasetSource
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.http_dataset_source import HTTPDatasetSource

    if source == "sample":
        return CodeDatasetSource({"renderer": "pipeline/sample.py"}), "embedded-sample"
    if source == "kaggle":
        return HTTPDatasetSource(KAGGLE_URL), "kaggle/gan-getting-started"
    path = under_main_repo(source).resolve()
    with warnings.catch_warnings():  # MLflow registers the local-file source twice and says so
        warnings.filterwarnings("ignore", message=".*interpreted in multiple ways", category=UserWarning)
        return resolve_dataset_source(str(path)), f"local/{path.name}"


def log_dataset(params: Params, manifest: Path) -> None:
    """The images trained on, as an MLflow dataset: the Dataset column names the source and a
    digest of the manifest (which images, from which records), the tags the counts."""
    mlflow = _mlflow()
    frame = pd.read_csv(manifest, dtype={"image_name": str}, keep_default_na=False)
    source, name = _dataset_source(params.ingest.source)
    counts = frame["domain"].value_counts()
    with warnings.catch_warnings(), _serialized():
        # MLflow's own notes on the schema it infers from the manifest's integer columns, and on
        # the pandas calls inside its digest: nothing a user of this pipeline can act on
        warnings.filterwarnings("ignore", message=".*integer column", category=UserWarning)
        warnings.filterwarnings("ignore", message=".*will be keyword-only")
        mlflow.log_input(mlflow.data.from_pandas(frame, source=source, name=name), context="training",
                         tags={"photos": str(int(counts.get("photo", 0))),
                               "paintings": str(int(counts.get("monet", 0)))})


def log_generator_model(generator_path: Path, shards: Path, manifest: Path, precision: str) -> None:
    """The photo→Monet generator as an MLflow model (pyfunc) with its signature and the first
    photo as the input example: `mlflow.pyfunc.load_model("runs:/<id>/photo2monet")` and
    `mlflow models serve -m runs:/<id>/photo2monet` work without this repository. `precision` (the
    param) goes with it: the model then runs as `generate` does on the machine it is loaded on."""
    mlflow = _mlflow()
    import numpy as np
    import torch

    from pipeline import served_model
    from pipeline.shards import iter_domain, read_manifest

    _, first_shard = next(iter_domain(shards, read_manifest(manifest), "photo"))
    example = first_shard[:1].numpy()  # 1×256×256×3 uint8

    # what the model's code imports (generator_file and the modules beneath it), pinned where it matters
    requirements = [f"mlflow=={mlflow.__version__}", f"torch=={torch.__version__.split('+')[0]}",
                    f"numpy=={np.__version__}", f"pandas=={pd.__version__}", "pyyaml", "tqdm"]
    with tempfile.TemporaryDirectory() as tmp, _serialized(), _without_progress_lines():
        code = Path(tmp) / "pipeline"  # the package's sources, without caches
        code.mkdir()
        for source in Path(__file__).parent.glob("*.py"):
            shutil.copy2(source, code / source.name)
        # a copy: with DVC's `cache.type: symlink` the file is a link into .dvc/cache, which MLflow
        # refuses as "outside the artifact directory"
        generator = Path(tmp) / generator_path.name
        shutil.copyfile(generator_path, generator)
        mlflow.pyfunc.log_model(name=MODEL_NAME, python_model=served_model.__file__,
                                artifacts={"generator": str(generator)}, code_paths=[str(code)],
                                signature=served_model.signature(), input_example=example,
                                pip_requirements=requirements, model_config={"precision": precision})


@contextlib.contextmanager
def _without_progress_lines():
    """log_model loads the model back to check the input example, and says so: an INFO line and a
    download progress bar in the stage's output, which tell its user nothing. Warnings still show."""
    logger = logging.getLogger("mlflow")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        with _environment({"MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}):
            yield
    finally:
        logger.setLevel(level)


def log_file(path: Path, stage: str, step: int | None = None) -> None:
    """A stage's metrics JSON (at `step`), curve CSV or picture, each the way its kind is logged."""
    if path.suffix == ".json":
        log_metrics_file(path, step=step)
    elif path.suffix == ".csv":
        log_curve(path, stage)
    else:
        log_artifact(path)


def log_metrics_file(path: str | Path, step: int | None = None) -> None:
    """Log the numeric entries of a stage's metrics JSON, prefixed by its name (`evaluate.fid`);
    text entries become tags."""
    mlflow = _mlflow()

    prefix = Path(path).stem
    data = json.loads(Path(path).read_text())
    numbers = {f"{prefix}.{k}": float(v) for k, v in data.items()
               if isinstance(v, (int, float)) and not isinstance(v, bool)}
    texts = {f"{prefix}.{k}": str(v) for k, v in data.items() if isinstance(v, (str, bool))}
    with _serialized():
        mlflow.log_metrics(numbers, step=step)
        if texts:
            mlflow.set_tags(texts)


def log_curve(path: str | Path, prefix: str) -> None:
    """A curve CSV (a `step` column and `loss_*` columns, one row per point) as metric histories; a
    curve without steps (a hand-made plot in dvc.yaml) at steps 0, 1, 2... in the file's order."""
    mlflow = _mlflow()
    with _serialized():
        for i, row in enumerate(pd.read_csv(path).to_dict("records")):
            step = row.get("step")
            mlflow.log_metrics({f"{prefix}.{k}": float(v) for k, v in row.items() if k.startswith("loss_")},
                               step=int(step) if pd.notna(step) else i)  # without steps: in the file's order


def log_tags(tags: dict[str, str]) -> None:
    mlflow = _mlflow()
    with _serialized():
        mlflow.set_tags(tags)


def log_artifact(path: str | Path) -> None:
    mlflow = _mlflow()
    with _serialized():
        mlflow.log_artifact(str(path))
