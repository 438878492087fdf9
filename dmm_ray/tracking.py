"""MLflow tracking for merge projects.

Run tree: one parent run per merge project (found again by its `dmm.project` tag, so a later
incremental merge lands under the same parent) and one nested run per stage (initial merge,
each incremental merge, baselines, evaluation). Each stage logs its full config as params and
as a YAML artifact, per-step training metrics, FIDt / FIDt_ref / FIDt_ratio, one diagonal-FID
metric per style (`fid_diag/<style>`), the matrices and plots as artifacts, and the merged model
as an MLflow pyfunc model (the diffusers folder rides along as an artifact) registered under
`registered_model_name`, so `resolve_model_uri("models:/<name>/<version>")` (used by Serve)
returns a local diffusers folder.

Default store: `sqlite:///$DMM_HOME/mlflow.db` (`dmm_ray.paths`; DMM_HOME defaults to ~/.dmm-ray),
the same file from a checkout and from a Ray job; browse with
`mlflow ui --backend-store-uri sqlite:///$HOME/.dmm-ray/mlflow.db`.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import json
import logging
import math
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator, Mapping

from pydantic import BaseModel

from dmm_ray.config import TrackingConfig  # noqa: F401  (re-exported: the tracking section's type)
from dmm_ray.paths import is_mlflow_uri  # (jobs and tests import it from here too)

log = logging.getLogger(__name__)
# The model registry the user named ($MLFLOW_REGISTRY_URI) when this module was imported: MLflow's
# set_registry_uri, which the tracker calls, rewrites the variable for the rest of the process.
_USER_REGISTRY_URI = os.environ.get("MLFLOW_REGISTRY_URI") or None

PROJECT_TAG = "dmm.project"
STAGE_TAG = "dmm.stage"
OUTPUT_TAG = "dmm.output_dir"  # a stage run's output_dir: its resumed and stale runs
MODEL_ARTIFACT = "merged_model"
EXPERIMENT_KIND_TAG, MODEL_TRAINING = "mlflow.experimentKind", "custom_model_development"  # the UI's experiment type
_ANSWERED: set[str] = set()  # http(s) stores that answered this process once (MergeTracker._first_contact)
MAX_PARAM_LEN = 6000  # MLflow's param value limit (SQL stores)
MAX_METRIC_NAME_LEN = 250  # MLflow's limit on a metric's name (a longer one is an MlflowException)


class TrackingError(ValueError):
    """A tracking setting MLflow can never use (a store it cannot open, a name its registry refuses)."""


def check_tracking_store(uri: str, setting: str, registry: bool = False) -> None:
    """Before any work: a store this MLflow cannot open at all is a TrackingError naming `setting`: a
    file store (a plain path or file://, which MLflow 3 refuses), an http(s) URI without a server, an
    unknown scheme, a database whose driver is not installed. Nothing is contacted or created: an
    sqlite store's folder is checked by `paths.check_writable_folder`, and a server that does not
    answer now is an outage the tracker rides out (BufferedMetricLogger), not a config error.
    `registry`: `uri` is only a model registry (tracking.registry_uri), such as Unity Catalog's
    databricks-uc, which is no tracking store."""
    from urllib.parse import urlparse

    if uri.startswith("sqlite:"):
        # SQLAlchemy's sqlite URL is sqlite:/// + a file path; sqlite://x.db and sqlite:x.db are parse
        # errors it raised only when the tracker opened the store (after a dry run said OK), and
        # sqlite:// or sqlite:///:memory: is a store in this process's memory: every run logged to it
        # was gone when the job ended (and the Train workers, in other processes, had none).
        db = uri[len("sqlite:") :].split("?")[0]
        if not db.startswith("///") or db[3:] in ("", ":memory:"):
            raise TrackingError(
                f"{setting} {uri!r} is not an sqlite database file: write sqlite:////ABSOLUTE/PATH/mlflow.db or "
                "sqlite:///RELATIVE/PATH/mlflow.db (default: sqlite:///$DMM_HOME/mlflow.db); an in-memory store "
                "(sqlite://, sqlite:///:memory:) would lose every run when the job ends"
            )
        return
    from dmm_ray.paths import is_file_store

    if is_file_store(uri):  # not MLflow's named stores: `databricks` is no folder
        from mlflow.environment_variables import MLFLOW_ALLOW_FILE_STORE

        if not MLFLOW_ALLOW_FILE_STORE.get():
            raise TrackingError(
                f"{setting} {uri!r} is a file store, which MLflow {_mlflow().__version__} refuses; use sqlite:///PATH/mlflow.db "
                "(default: sqlite:///$DMM_HOME/mlflow.db) or an http(s) tracking server (or set MLFLOW_ALLOW_FILE_STORE=true)"
            )
        from dmm_ray.paths import check_writable_folder

        check_writable_folder(urlparse(uri).path if uri.startswith("file:") else uri, setting)
        return
    if urlparse(uri).scheme in ("http", "https"):
        # MLflow builds a REST store for any http(s) URI: one without a server (http://, http:///path)
        # or with a port that is no port failed only at the first request, as "Invalid url".
        parsed = urlparse(uri)
        try:
            problem = None if parsed.hostname else "names no tracking server (no host)"
            parsed.port  # noqa: B018 - raises ValueError for a port that is no number in 0-65535
        except ValueError:
            problem = "has a port that is not a number from 0 to 65535"
        if problem:
            raise TrackingError(
                f"{setting} {uri!r} {problem}: write http(s)://HOST[:PORT], e.g. http://localhost:5000 "
                "(a server started by `mlflow server --port 5000`)"
            )
    try:  # what MlflowClient(uri) builds: a RestStore for http(s) contacts nothing yet
        from mlflow.tracking._model_registry.utils import _get_store as registry_store
        from mlflow.tracking._tracking_service.utils import _get_store as tracking_store
    except ImportError:  # a later MLflow moved them: MLflow's own error will tell, at first use
        return
    for store in (registry_store,) if registry else (tracking_store, registry_store):
        try:
            store(uri)
        except Exception as error:  # noqa: BLE001 - any refusal: say which setting
            text = " ".join(str(error).split())[:300] or type(error).__name__
            raise TrackingError(f"{setting} {uri!r}: MLflow cannot open this store ({type(error).__name__}: {text})") from None


def check_registered_name(name: str, setting: str) -> None:
    """A name MLflow's model registry would refuse, as a TrackingError naming `setting`."""
    from dmm_ray.config import registered_name_problem

    if problem := registered_name_problem(name):
        raise TrackingError(f"{setting}: {problem}")


def tracking_from_options(options: Mapping[str, str], **values: Any) -> TrackingConfig:
    """A job's --track flags as a TrackingConfig (`values`: its fields, e.g. project=args.project), before any
    work: a value it refuses (a --project with both ' and ", or ending in a backslash) is a TrackingError naming
    the flag (`options`: field -> flag, e.g. {"project": "--project"}) in one line, not pydantic's dump naming
    the field. The store itself is `check_tracking`'s."""
    from pydantic import ValidationError

    try:
        return TrackingConfig(**values)
    except ValidationError as error:
        raise TrackingError(
            "; ".join(f"{options.get(str(e['loc'][0]), e['loc'][0])}: {e['msg'].removeprefix('Value error, ')}" for e in error.errors())
        ) from None


def check_tracking(tracking: TrackingConfig, uri_setting: str = "tracking.tracking_uri") -> None:
    """Before any work, an enabled tracking section's store and registry: an sqlite database's folder
    can be written (`paths.check_writable_folder`), any other store passes `check_tracking_store`.
    `uri_setting`: how errors name the store (a job's flag, e.g. --tracking-uri)."""
    from dmm_ray.paths import check_writable_folder, sqlite_path

    if not tracking.enabled:
        return
    for setting, uri in ((uri_setting, tracking.tracking_uri), ("tracking.registry_uri", tracking.registry_uri)):
        if uri is not None and (db := sqlite_path(uri)) is not None:
            check_writable_folder(db.parent, f"the folder of {setting}'s database")
        elif uri is not None:
            check_tracking_store(uri, setting, registry=setting == "tracking.registry_uri")


def _mlflow():
    import mlflow

    return mlflow


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}; lists become JSON strings."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, BaseModel):
            v = v.model_dump(mode="json")
        if isinstance(v, Mapping):
            out.update(flatten(v, key + "."))
        elif isinstance(v, (list, tuple)):
            out[key] = json.dumps(v, default=str)
        else:
            out[key] = v
    return out


_METRIC_BAD = re.compile(r"[^A-Za-z0-9_\-. /]")


def param_value(value: Any) -> str:
    """`value` as a param MLflow takes: its text, or one over MAX_PARAM_LEN cut to fit and ended by
    its length and digest. A plain cut made two merges whose long values (a list of eval prompts or
    of teachers) differ only past the cut look the same in MLflow's compare view; the digest tells
    them apart (a stage's config.yaml holds the whole value)."""
    text = str(value)
    if len(text) <= MAX_PARAM_LEN:
        return text
    tail = f"... [{len(text)} chars, sha256 {hashlib.sha256(text.encode()).hexdigest()[:16]}]"
    return text[: MAX_PARAM_LEN - len(tail)] + tail


def filter_literal(value: str) -> str:
    """`value` as a string literal of MLflow's search-filter grammar, which has no escapes: quoted with
    ' unless it holds one (`bob's-merge`), else with ". `TrackingConfig` refuses a project with both."""
    return f'"{value}"' if "'" in value else f"'{value}'"


def metric_name(name: str) -> str:
    """MLflow metric names allow letters, digits, _ - . space and /; replace anything else by _. MLflow
    also refuses a name that a path normalisation would change (its file store keeps metrics as files):
    an empty, `.` or `..` part, as `fid_diag/<style>` has for a style named `a/`, `x//y` or `..` (the
    merge's evaluation failed when it logged them), so each character of such a part becomes _ too."""
    parts = _METRIC_BAD.sub("_", name).split("/")
    return "/".join(part if part not in ("", ".", "..") else "_" * max(len(part), 1) for part in parts)


def metric_names(names) -> dict[str, str]:
    """Each of `names` (metrics logged together: `fid_diag/<style>` for every style) -> its `metric_name`, one
    per name. Names that `metric_name` makes equal (styles `a:b` and `a_b`, or `水墨` and `油画`, both
    `fid_diag/__`) overwrote one another in MLflow, so each of them it changed ends with `-` and 8 hex digits
    of its own sha256 (the same in every run), while one it kept stays as it is. A name over MLflow's 250
    characters (a long style name), which failed the stage's logging, is cut to make room for that digest."""
    clean = {name: metric_name(name) for name in names}
    counts = collections.Counter(clean.values())
    out = {}
    for name, cleaned in clean.items():
        if len(cleaned) > MAX_METRIC_NAME_LEN or (counts[cleaned] > 1 and cleaned != name):
            tail = "-" + hashlib.sha256(name.encode()).hexdigest()[:8]
            cleaned = cleaned[: MAX_METRIC_NAME_LEN - len(tail)] + tail
        out[name] = cleaned
    return out


def _without_disabled(d: Mapping[str, Any]) -> dict:
    """`d` with every section whose `enabled` is False cut down to that key (the run's params list
    what shaped the run; config.yaml keeps the whole tree)."""
    out = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            v = {"enabled": False} if v.get("enabled") is False else _without_disabled(v)
        out[k] = v
    return out


def _config_dict(config: Any) -> dict:
    if isinstance(config, BaseModel):
        return config.model_dump(mode="json")
    if isinstance(config, Mapping):
        return dict(config)
    raise TypeError(f"config must be a pydantic model or a mapping, got {type(config).__name__}")


@contextlib.contextmanager
def quick_http(timeout_s: int | None = 10) -> Iterator[None]:
    """MLflow's REST client without its retries (minutes against a server that is down) and, unless
    `timeout_s` is None, with a short per-request timeout: for a check, or a store that just failed one."""
    settings = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"}
    if timeout_s is not None:
        settings["MLFLOW_HTTP_REQUEST_TIMEOUT"] = str(timeout_s)
    saved = {k: os.environ.get(k) for k in settings}
    os.environ.update(settings)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def _sqlite_setup_lock(uri: str) -> Iterator[None]:
    """Held (an flock on the database's folder: no file is left behind) while a tracker opens an sqlite
    store and gets or creates its experiment. MLflow creates and migrates a new database's tables
    without a lock: of jobs started together on a fresh store (a sweep, a merge beside an evaluation)
    all but one failed with sqlite3.OperationalError "duplicate column name: step". Other stores pass."""
    from dmm_ray.paths import sqlite_path

    db = sqlite_path(uri, relative=True)
    if db is None or not db.parent.is_dir():  # (a missing folder: MLflow's own error says so)
        yield
        return
    import fcntl

    try:
        fd = os.open(db.parent, os.O_RDONLY)
    except OSError:  # a folder this user cannot read, yet may write: open the store as before, unserialised
        yield
        return
    try:
        with contextlib.suppress(OSError):  # a file system without flock (some FUSE mounts): as before, unserialised
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


class MergeTracker:
    """Thin, explicit wrapper over MLflow for one merge project. With `enabled=False` every
    method is a no-op, so jobs call it unconditionally."""

    def __init__(self, config: TrackingConfig | None = None):
        self.config = config or TrackingConfig()
        self.enabled = self.config.enabled
        self.parent_run_id: str | None = None
        self._parent_was_finished = False  # the project's parent run was FINISHED when this job resumed it
        self.experiment_id: str | None = None
        if self.enabled:
            mlflow = _mlflow()
            mlflow.set_tracking_uri(self.config.tracking_uri)
            mlflow.set_registry_uri(self.config.registry_uri or self.config.tracking_uri)
            with _sqlite_setup_lock(self.config.tracking_uri):
                self._open_experiment(mlflow)

    def _open_experiment(self, mlflow) -> None:
        """Get or create the experiment (`experiment_id`), typed as model training."""
        exp = self._first_contact(lambda: mlflow.get_experiment_by_name(self.config.experiment))
        if exp is not None and exp.lifecycle_stage == "deleted":
            # Deleted in the UI, its name still taken: MLflow refused the first run only when a stage
            # opened (after a merge's encode), with an MlflowException and no way out.
            uri, eid = self.config.tracking_uri, exp.experiment_id
            raise TrackingError(
                f"the MLflow experiment {self.config.experiment!r} (id {eid}) in {uri} was deleted: restore it "
                f"(MLFLOW_TRACKING_URI={uri} mlflow experiments restore --experiment-id {eid}) or, in a merge config, "
                "name another experiment (tracking.experiment)"
            )
        self.experiment_id = (
            exp.experiment_id
            if exp is not None
            else mlflow.create_experiment(self.config.experiment, artifact_location=self.config.artifact_location)
        )
        if exp is None or exp.tags.get(EXPERIMENT_KIND_TAG) != MODEL_TRAINING:
            # Model training, not GenAI: `mlflow ui` opens the experiment on its runs table, not on an empty traces view.
            mlflow.MlflowClient().set_experiment_tag(self.experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING)

    def _first_contact(self, call):
        """`call()`, this tracker's first request to its store. An http(s) server that never answered
        this process is a TrackingError naming the store at once: with MLflow's retries it was four
        minutes of retry warnings and then MLflow's own error (a merge had checked everything else, and
        a dry run had said OK). A store that answered before (the merge's, when its few-step stage opens
        a tracker an hour later) keeps MLflow's retries: that is an outage, ridden out."""
        uri = self.config.tracking_uri
        if not uri.startswith(("http://", "https://")) or uri in _ANSWERED:
            return call()
        from mlflow.exceptions import MlflowException

        try:
            with quick_http(timeout_s=30):
                answer = call()
            _ANSWERED.add(uri)
            return answer
        except MlflowException as error:
            text = " ".join(str(error).split())[:300]
            raise TrackingError(
                f"the MLflow tracking store {uri!r} cannot be used: {text}; start its server (mlflow server ...), "
                "name one that runs (tracking.uri, or the job's --tracking-uri), or run untracked (a merge: tracking.enabled: false)"
            ) from None

    # --- run tree -------------------------------------------------------------------------
    def find_project_run(self):
        """The newest parent run of this project (an MLflow Run: its id and status), if one exists."""
        mlflow = _mlflow()
        runs = mlflow.search_runs(
            experiment_ids=[self.experiment_id],
            filter_string=f"tags.`{PROJECT_TAG}` = {filter_literal(self.config.project)} and tags.`dmm.kind` = 'project'",
            order_by=["attributes.start_time DESC"],
            max_results=1,
            output_format="list",
        )
        return runs[0] if runs else None

    @contextlib.contextmanager
    def project(self, params: Mapping[str, Any] | None = None, new: bool = False) -> Iterator[Any]:
        """Open (or resume) the project's parent run; stages opened inside nest under it.

        The parent run stands for the project. A job that fails or is interrupted after it resumed a
        FINISHED parent gives it back FINISHED (`parent_end_status`): its own stage run says FAILED or
        KILLED, and one failed evaluation or export does not mark a project with a good merge FAILED."""
        if not self.enabled:
            yield None
            return
        mlflow = _mlflow()
        found = None if new else self.find_project_run()
        run_id = found.info.run_id if found else None
        self._parent_was_finished = found is not None and found.info.status == "FINISHED"
        tags = {PROJECT_TAG: self.config.project, "dmm.kind": "project"}
        with mlflow.start_run(run_id=run_id, experiment_id=self.experiment_id, run_name=self.config.project, tags=tags) as run:
            self.parent_run_id = run.info.run_id
            if params:
                self.log_params(params)
            try:
                yield run
            except (Exception, KeyboardInterrupt) as error:  # not GeneratorExit: a dropped generator ends nothing
                _end_if_active(run.info.run_id, self.parent_end_status(run_status(error)))
                raise

    def parent_end_status(self, failure: str) -> str:
        """The status a failed or interrupted job leaves on the project's parent run: FINISHED when the
        parent was FINISHED before this job resumed it, else the job's own (`failure`)."""
        return "FINISHED" if self._parent_was_finished else failure

    @contextlib.contextmanager
    def stage(
        self,
        name: str,
        config: Any = None,
        params: Mapping[str, Any] | None = None,
        tags: Mapping[str, str] | None = None,
        run_name: str | None = None,
    ) -> Iterator[Any]:
        """A nested run for one stage (e.g. 'initial-merge', 'incremental-1', 'weighted-merge'), tagged
        STAGE_TAG `name` and called `run_name` (default: `name`)."""
        if not self.enabled:
            yield None
            return
        mlflow = _mlflow()
        if mlflow.active_run() is None:
            raise RuntimeError("open the project run first: `with tracker.project(): with tracker.stage(...)`")
        tags = {PROJECT_TAG: self.config.project, STAGE_TAG: name, "dmm.kind": "stage", **(tags or {})}
        with mlflow.start_run(run_name=run_name or name, nested=True, experiment_id=self.experiment_id, tags=tags) as run:
            try:  # the config too: a Ctrl-C while it is logged is KILLED, as one later in the stage
                if config is not None:
                    self.log_config(config)
                if params:
                    self.log_params(params)
                yield run
            except (Exception, KeyboardInterrupt) as error:  # KILLED for an interrupt, as abort() (MLflow's own exit says FAILED)
                _end_if_active(run.info.run_id, run_status(error))
                raise

    # --- logging --------------------------------------------------------------------------
    def log_params(self, params: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        _mlflow().log_params({k: param_value(v) for k, v in flatten(params).items()})

    def log_config(self, config: Any, name: str = "config") -> None:
        """Every config field as a param (dotted keys; a section switched off, `enabled: false`, only as
        `<section>.enabled`: its settings did nothing) plus the whole tree as `<name>.yaml`."""
        if not self.enabled:
            return
        import yaml

        d = _config_dict(config)
        self.log_params(_without_disabled(d))
        _mlflow().log_text(yaml.safe_dump(d, sort_keys=False), f"{name}.yaml")

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        if not self.enabled:
            return
        values = {k: float(v) for k, v in metrics.items() if v is not None and math.isfinite(float(v))}
        names = metric_names(values)
        clean = {names[k]: v for k, v in values.items()}
        _mlflow().log_metrics(clean, step=step)

    def log_artifacts(self, local_dir: str | Path, artifact_path: str | None = None) -> None:
        if self.enabled:
            _mlflow().log_artifacts(str(local_dir), artifact_path)

    def log_evaluation(self, result, artifact_path: str = "evaluation", step: int | None = None) -> None:
        """FIDt, FIDt_ref, FIDt_ratio, fid_diag/<style>, fid_ref_diag/<style>; the files the evaluation
        wrote (`result.files`: matrices and plots) as artifacts.

        `result`: a `dmm_ray.evaluation.matrix.EvalResult` (read by attribute: tracking imports nothing
        from evaluation, it only records what the evaluation stage produced).
        """
        if not self.enabled:
            return
        metrics = {"FIDt": result.fidt, "FIDt_ref": result.fidt_ref, "FIDt_ratio": result.ratio}
        metrics.update({f"fid_diag/{s}": v for s, v in result.diagonal().items()})
        metrics.update({f"fid_ref_diag/{s}": v for s, v in result.ref_diagonal().items()})
        self.log_metrics(metrics, step=step)
        self.log_evaluation_files(result, artifact_path)

    def log_evaluation_files(self, result, artifact_path: str = "evaluation") -> None:
        """The files the evaluation wrote (`result.files`: matrices and plots) as artifacts."""
        if not self.enabled:
            return
        for p in (getattr(result, "files", None) or {}).values():
            _mlflow().log_artifact(str(p), artifact_path)

    def log_merged_model(
        self, model_dir: str | Path, registered_name: str | None = "__config__", description: str = "", tags: Mapping[str, Any] | None = None
    ) -> str:
        """Log the merged diffusers folder as a pyfunc model; register it, with `description` and `tags`
        on the new version. Returns a model URI (`models:/<name>/<version>` when registered, else the
        logged model's URI)."""
        if not self.enabled:
            return str(Path(model_dir).resolve())
        import mlflow.pyfunc

        model_dir = Path(model_dir)
        if not (model_dir / "model_index.json").is_file():
            raise FileNotFoundError(f"'{model_dir}' is not a diffusers pipeline folder (no model_index.json)")
        name = self.config.registered_model_name if registered_name == "__config__" else registered_name
        import warnings

        from dmm_ray.mlflow_model import MODEL_CONFIG, DMMPyfuncModel, model_signature

        with warnings.catch_warnings():
            # no input example: MLflow would load the pipeline and generate with it at log time
            warnings.filterwarnings("ignore", message=".*input example was not provided")
            info = mlflow.pyfunc.log_model(
                name=MODEL_ARTIFACT,
                python_model=DMMPyfuncModel(),
                artifacts={"pipeline": str(model_dir)},
                # Explicit requirements: MLflow's inference would import and probe the whole env (slow, noisy).
                pip_requirements=["dmm-ray", "diffusers", "torch", "transformers"],
                # without a params schema MLflow drops predict(params={"num_inference_steps": n}) with a warning
                signature=model_signature(),
                # the keys load_model(model_config=...) may override (MLflow ignores undeclared ones)
                model_config=dict(MODEL_CONFIG),
                registered_model_name=name,
            )
        if name:
            version = info.registered_model_version
            from mlflow import MlflowClient

            client = MlflowClient()
            if description:
                client.update_model_version(name, str(version), description=description)
            for key, value in (tags or {}).items():
                client.set_model_version_tag(name, str(version), key, str(value))
            return f"models:/{name}/{version}"
        return info.model_uri


class BufferedMetricLogger:
    """Per-step training metrics that never raise into the training loop.

    `write(entries)` sends [(metrics, step, timestamp_ms), ...] (at most `batch_limit` metrics per
    call) to the tracking store. When it raises (MLflow server down, SQLite locked) ONE warning is
    logged, training goes on, and the steps wait in a bounded buffer (`max_buffered` steps; the
    oldest are dropped beyond that). The next attempt comes `retry_s` later (doubling up to 5
    minutes) on a later call; when the store answers again the buffered steps are written in order.
    `close()` tries once more and drops what is left. Only the first problem is a warning; later
    ones (drops, the final count) are info lines.
    `write=None` is a no-op logger (not rank 0, or tracking off)."""

    def __init__(self, write=None, max_buffered: int = 1000, retry_s: float = 30.0, batch_limit: int = 1000, what: str = "MLflow", clock=None):
        self._write, self.max_buffered, self.batch_limit, self.what = write, max_buffered, batch_limit, what
        self.retry_s, self._backoff, self._next_try = retry_s, retry_s, 0.0
        self._clock = clock or time.monotonic
        self.buffer: collections.deque = collections.deque()
        self.failing = False
        self.written = self.dropped = self.warnings = 0
        self._warned_down = self._warned_dropped = False

    def _warn(self, message: str) -> None:
        """The first problem is a warning; later ones (more drops, the final count) are info lines."""
        self.warnings += 1
        (log.warning if self.warnings == 1 else log.info)(message)

    def __call__(self, metrics: Mapping[str, float], step: int) -> None:
        if self._write is None:
            return
        self.buffer.append((dict(metrics), step, int(time.time() * 1000)))
        while len(self.buffer) > self.max_buffered:
            self.buffer.popleft()
            self.dropped += 1
            if not self._warned_dropped:
                self._warned_dropped = True
                self._warn(
                    f"{self.what} is still unreachable: more than {self.max_buffered} steps of training metrics are "
                    "waiting, so the oldest are dropped from now on (training goes on)"
                )
        if self.failing and self._clock() < self._next_try:
            return
        self.flush()

    def flush(self) -> bool:
        """Write every buffered step; False (and nothing raised) if the store is unreachable."""
        try:
            while self.buffer:
                chunk, size = [], 0
                for entry in self.buffer:
                    if chunk and size + len(entry[0]) > self.batch_limit:
                        break
                    chunk.append(entry)
                    size += len(entry[0])
                self._write(chunk)
                for _ in chunk:
                    self.buffer.popleft()
                self.written += len(chunk)
        except Exception as error:  # any failure of the store: never a reason to stop (or retry) training
            if not self._warned_down:
                self._warned_down = True
                self._warn(
                    f"{self.what} did not take the training metrics ({type(error).__name__}: {str(error)[:300]}); "
                    f"training goes on: up to {self.max_buffered} steps of metrics are kept and written when it "
                    "answers again, older ones and any left at the end of training are dropped (this warning is "
                    "shown once)"
                )
            if self.failing:
                self._backoff = min(2 * self._backoff, 300.0)
            self.failing, self._next_try = True, self._clock() + self._backoff
            return False
        if self.failing:
            log.info("%s answers again: buffered training metrics written", self.what)
        self.failing, self._backoff = False, self.retry_s
        return True

    def close(self) -> None:
        """Last attempt at the end of training; whatever is still buffered is dropped with one warning."""
        if self._write is None or not self.buffer:
            return
        if not self.flush():
            self.dropped += len(self.buffer)
            self._warn(
                f"{self.what} is unreachable at the end of training: {len(self.buffer)} buffered step(s) of "
                "metrics were dropped (the merge itself is unaffected)"
            )
            self.buffer.clear()


def worker_metric_logger(tracking: dict | None, rank: int):
    """Rank 0's per-step metric logger: a `BufferedMetricLogger`, so an MLflow outage (server down,
    SQLite locked) costs one warning and buffered metrics, never an exception (or a Ray Train retry).
    `tracking`: the stage's {"uri", "run_id", "prefix", "retry_s"} (None: tracking off). The distillation
    and the few-step stage's workers both log through it."""
    if not tracking or rank != 0 or not tracking.get("run_id"):
        return BufferedMetricLogger(None)
    # A down HTTP server must not stall a step for minutes of MLflow's default retries (user settings win).
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    uri, run_id = tracking["uri"], tracking["run_id"]
    prefix = tracking.get("prefix", "")
    client = None

    def write(entries: list):
        nonlocal client
        from mlflow.entities import Metric
        from mlflow.tracking import MlflowClient

        if client is None:
            client = MlflowClient(uri)
        client.log_batch(run_id, metrics=[Metric(prefix + k, float(v), ts, step) for metrics, step, ts in entries for k, v in metrics.items()])

    return BufferedMetricLogger(write, retry_s=tracking.get("retry_s", 30.0), what=f"MLflow ({uri})")


def resolve_model_uri(uri: str, dst: str | Path | None = None, tracking_uri: str | None = None) -> Path:
    """A local diffusers folder for `uri`: a local path, `models:/<name>/<version|alias>`, `runs:/...`,
    or any MLflow artifact URI of a logged merged model (downloaded under `dst`).

    The store is `tracking_uri`, else the one already set (mlflow.set_tracking_uri or
    $MLFLOW_TRACKING_URI), else the default store `sqlite:///$DMM_HOME/mlflow.db`."""
    local = Path(uri).expanduser()
    if not is_mlflow_uri(uri):
        if not local.exists():
            raise FileNotFoundError(f"model path '{uri}' does not exist")
        return _find_pipeline_folder(local, uri)

    mlflow = _mlflow()
    # Store: the argument, else one already chosen (mlflow.set_tracking_uri / $MLFLOW_TRACKING_URI),
    # else the project's default store in $DMM_HOME (MLflow's own default would be ./mlruns).
    if tracking_uri is None and not _tracking_uri_is_set():
        tracking_uri = TrackingConfig().tracking_uri
    # An explicit store is read with its own registry unless the user named another one: mlflow.set_registry_uri
    # writes $MLFLOW_REGISTRY_URI too, so the variable now may be an earlier tracker's store, not the user's.
    registry_uri = (_USER_REGISTRY_URI or tracking_uri) if tracking_uri is not None else mlflow.get_registry_uri()
    if uri.startswith(("models:/", "runs:/")):  # read from the store: one that does not exist is not created to find that out
        from dmm_ray.paths import sqlite_path

        store = registry_uri if uri.startswith("models:/") else (tracking_uri or mlflow.get_tracking_uri())
        db = sqlite_path(store, relative=True)
        if db is not None and not db.is_file():
            raise FileNotFoundError(
                f"could not resolve model URI '{uri}': the MLflow store {store} does not exist (no database {db}); "
                "name the store the merge logged to (--tracking-uri, $MLFLOW_TRACKING_URI; default sqlite:///$DMM_HOME/mlflow.db)"
            )
    if tracking_uri is not None:
        mlflow.set_tracking_uri(tracking_uri)
        mlflow.set_registry_uri(registry_uri)
    made = dst is None
    dst = Path(tempfile.mkdtemp(prefix="dmm-model-")) if made else Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    try:
        path = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dst)))
    except Exception as e:
        if made:  # nothing of a failed download stays behind
            shutil.rmtree(dst, ignore_errors=True)
        raise FileNotFoundError(f"could not resolve model URI '{uri}' with tracking URI '{mlflow.get_tracking_uri()}': {e}") from e
    return _find_pipeline_folder(path, uri)


@contextlib.contextmanager
def local_model(uri: str | None, tracking_uri: str | None = None) -> Iterator[Path | None]:
    """`resolve_model_uri` for a job: the model as a local folder for the length of the block. A local
    path is used as it is; an MLflow URI is downloaded into a temporary folder that the end of the
    block removes, errors included (a job never leaves a model copy in /tmp). None gives None.
    An object-storage URI of a merged model (s3://, gs://, file://: a merge's <output_dir URI>/merged) is
    downloaded through pyarrow as Serve, jobs/export.py and load_dmm_pipeline read it (fsu.fetched): while
    an upload replaces it, or after one was cut short, the complete previous model, never a half-uploaded one
    (MLflow's download read whatever was there: 'holds no diffusers pipeline folder')."""
    if uri is None or not is_mlflow_uri(uri):
        yield None if uri is None else resolve_model_uri(uri)
        return
    from dmm_ray.data import fs as fsu

    if fsu.is_pyarrow_uri(uri):
        with fsu.fetched(uri, model=True) as folder:
            yield folder
        return
    with tempfile.TemporaryDirectory(prefix="dmm-model-") as tmp:
        yield resolve_model_uri(uri, dst=tmp, tracking_uri=tracking_uri)


def _tracking_uri_is_set() -> bool:
    from mlflow.tracking import is_tracking_uri_set  # mlflow.set_tracking_uri() or $MLFLOW_TRACKING_URI

    return is_tracking_uri_set()


def _find_pipeline_folder(path: Path, uri: str) -> Path:
    if (path / "model_index.json").is_file():
        return path
    candidates = sorted(p.parent for p in path.rglob("model_index.json"))
    if not candidates:
        raise FileNotFoundError(f"'{uri}' holds no diffusers pipeline folder (no model_index.json under {path})")
    return candidates[0]


# --- driver glue for jobs/merge.py (replaces dmm_ray.tracking_hooks) ---------------------------
class StageTracker(MergeTracker):
    """Imperative stage API for the merge driver:

    handle = tracker.start_stage("merge", cfg)   # parent (resumed by project name) + nested run;
                                                 # handle = {"uri", "run_id", ...} for Train workers
    ... workers: MlflowClient(handle["uri"]).log_batch(handle["run_id"], ...) per step ...
    tracker.finish_stage(cfg, result)  # log result.evaluation (FIDt & artifacts), register the model
    """

    def __init__(self, config: TrackingConfig | None = None):
        super().__init__(config)
        self._stack = contextlib.ExitStack()
        self.stage_run_id: str | None = None
        self.stage_name = "merge"

    def start_stage(
        self, name: str, cfg: Any = None, output: str | Path | None = None, run_name: str | None = None, params: Mapping[str, Any] | None = None
    ) -> dict | None:
        """`output`: the folder whose lock the caller holds, the run's OUTPUT_TAG (default: cfg.output_dir);
        `run_name`: the run's name in the runs table (default: `name`, its STAGE_TAG); `params`: logged on
        the stage run besides cfg's. A failure here (the store refuses the config, a Ctrl-C) ends the runs
        it opened as `abort` does: the caller's own abort only covers what follows, and a project run left
        open was ended FINISHED by MLflow's exit hook."""
        if not self.enabled:
            return None
        mlflow = _mlflow()
        output = output or getattr(cfg, "output_dir", None)
        tags = {OUTPUT_TAG: str(output)} if output else {}
        if output:
            self.close_stale_runs(str(output), name)
        try:
            if mlflow.active_run() is None:
                self._stack.enter_context(self.project())
            run = self._stack.enter_context(self.stage(name, config=cfg, params=params, tags=tags, run_name=run_name))
        except BaseException as error:
            self.abort(error)
            raise
        self.stage_run_id, self.stage_name = run.info.run_id, name
        return {"uri": self.config.tracking_uri, "run_id": run.info.run_id, "parent_run_id": self.parent_run_id, "experiment_id": self.experiment_id}

    def close_stale_runs(self, output: str, stage: str) -> None:
        """Stage runs of `output` still RUNNING belong to a job that died without ending them (SIGKILL,
        the OOM killer, a lost node): the caller holds the lock of its kind of job (a merge: the
        folder's merge.lock; the few-step stage: its fast.lock, dmm_ray/output_lock.py), so none of that
        kind is alive. Mark them KILLED. A few-step job may run beside a merge of the same folder, so
        each kind closes only its own runs."""
        if ("'" in output and '"' in output) or output.endswith("\\"):  # no literal of MLflow's filter grammar can hold it
            return
        from mlflow import MlflowClient

        kind = f"tags.`{STAGE_TAG}` {'=' if stage == 'fast' else '!='} 'fast'"
        client = MlflowClient()
        stale = client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.`{OUTPUT_TAG}` = {filter_literal(output)} and {kind} and attributes.status = 'RUNNING'",
            max_results=100,
        )
        for run in stale:
            log.info("MLflow run %s (%s) of %s was left RUNNING by a merge that died: marked KILLED", run.info.run_id, run.info.run_name, output)
            client.set_terminated(run.info.run_id, "KILLED")

    def finish_stage(self, cfg: Any, result: Any) -> Any:
        """Log what the merge produced (its evaluation if it ran, stage metrics, seconds), register the
        model, close the stage and project runs. Only observes: the evaluation itself is a merge stage
        (`dmm_ray.merge.evaluate_stage`) and runs with or without tracking. Returns result.evaluation."""
        evaluation = getattr(result, "evaluation", None)
        try:
            if self.enabled:
                if evaluation is not None:
                    self.log_evaluation(evaluation)
                for stage, m in (getattr(result, "stage_metrics", {}) or {}).items():
                    # at the stage's last step: its workers logged the same names per step, so a value
                    # without a step would add a stray point at step 0 to each curve
                    step = m.get("step")
                    numbers = {f"{stage}/{k}": v for k, v in m.items() if isinstance(v, (int, float))}
                    self.log_metrics(numbers, step=int(step) if isinstance(step, (int, float)) else None)
                if getattr(result, "seconds", None):
                    self.log_metrics({"seconds": result.seconds})
                # dmm.merged_path: where the model is (`location`: an output_dir URI's <uri>/merged, not the driver's staging copy)
                where = getattr(result, "location", None) or result.merged_path
                version = version_record(self.stage_name, result.merged_path, evaluation, where)
                if not self.complete_earlier_registration(result.merged_path, **version):
                    self.log_merged_model(result.merged_path, **version)
        except BaseException as error:
            self.abort(error)
            raise
        self.close()
        return evaluation

    def complete_earlier_registration(self, model_dir: str | Path, description: str = "", tags: Mapping[str, Any] | None = None) -> str | None:
        """A merge's re-run of its stages after the save (dmm_ray.merge.saved_before_evaluate), or a few-step run's
        after its save (dmm_ray.fast.job.saved_by_this_training), whose first run had registered the model, then
        stopped before its job recorded it (killed, or the store failed after the registration): that version, logged
        by the stage run the model's dmm_merge.json names (the run that saved it), gets this run's `description` and
        `tags`, and its `models:/<name>/<version>` is returned; registering the model again made a second version of
        it. None when this stage run saved the model, or that run registered no version under the configured name."""
        name = self.config.registered_model_name
        from dmm_ray.merged_model import read_record

        try:
            saved_by = (read_record(model_dir).get("mlflow") or {}).get("run_id")
        except (ValueError, AttributeError):  # a record that is no JSON object
            saved_by = None
        if not name or not saved_by or saved_by == self.stage_run_id:
            return None
        from mlflow import MlflowClient

        client = MlflowClient()
        # by run only (a run id is hex; a registered name may hold quotes the filter would have to escape)
        versions = [v for v in client.search_model_versions(f"run_id = '{saved_by}'") if v.name == name]
        if not versions:
            return None
        version = str(max(int(v.version) for v in versions))
        if description:
            client.update_model_version(name, version, description=description)
        for key, value in (tags or {}).items():
            client.set_model_version_tag(name, version, key, str(value))
        log.warning(
            "%s version %s (registered by MLflow run %s, which saved this model) is this model: not registered again", name, version, saved_by
        )
        return f"models:/{name}/{version}"

    def close(self) -> None:
        """End the stage and project runs this tracker opened (FINISHED)."""
        self._stack.close()

    def abort(self, error: BaseException | None = None) -> None:
        """End the open runs after `error` stopped the driver: KILLED for an interrupt (re-running
        resumes), FAILED for anything else (`run_status`); the project's parent run as
        `parent_end_status` says (FINISHED again when it was FINISHED before this job). A store that
        fails now leaves them as they are there (a later job's close_stale_runs marks them KILLED); it
        never raises over `error`."""
        status = "FAILED" if error is None else run_status(error)
        if self.enabled:
            mlflow = _mlflow()
            while (active := mlflow.active_run()) is not None:
                try:
                    mlflow.end_run(status=self.parent_end_status(status) if active.info.run_id == self.parent_run_id else status)
                except Exception as failure:  # noqa: BLE001 - the store failing: end_run took the run off MLflow's stack first
                    # a raise here hid `error` (the caller re-raises it) and left the parent run on MLflow's stack, so
                    # the dropped project() generator tried the store again when collected ("Exception ignored in ...")
                    log.info("MLflow run %s could not be ended %s in the store: %s", active.info.run_id, status, failure)
        self._stack = contextlib.ExitStack()


def version_record(stage: str, merged_path: str | Path, evaluation: Any = None, location: str | Path | None = None) -> dict:
    """`description` and `tags` for a registered version: the stage, styles and FIDt that made it
    (the Models page shows nothing else to tell versions of one project apart). `location`: where the
    model is, for the `dmm.merged_path` tag (default `merged_path`, the local folder read here)."""
    try:
        record = json.loads((Path(merged_path) / "dmm_merge.json").read_text())
    except (OSError, ValueError):
        record = {}
    styles = [str(s) for s in record.get("styles") or []]
    tags = {STAGE_TAG: stage, "dmm.styles": ",".join(styles), "dmm.merged_path": str(location or merged_path)}
    description = f"{stage}: {len(styles)} style(s) ({', '.join(styles)})"
    if evaluation is not None:
        tags.update({"FIDt": f"{evaluation.fidt:.4f}", "FIDt_ref": f"{evaluation.fidt_ref:.4f}", "FIDt_ratio": f"{evaluation.ratio:.4f}"})
        description += f"; FIDt {evaluation.fidt:.2f}, FIDt_ref {evaluation.fidt_ref:.2f}, ratio {evaluation.ratio:.3f}"
    return {"description": description, "tags": tags}


def _end_if_active(run_id: str, status: str) -> None:
    """End run `run_id` with `status` if it is still the active run (abort() or an inner block may have
    ended it; MLflow's own context exit checks the same before it ends a run FAILED)."""
    mlflow = _mlflow()
    active = mlflow.active_run()
    if active is not None and active.info.run_id == run_id:
        mlflow.end_run(status=status)


def run_status(error: BaseException) -> str:
    """The MLflow status of runs an exception ends: KILLED for an interrupt (Ctrl-C, and SIGTERM,
    which Ray's driver turns into one; re-running resumes), FAILED for anything else."""
    return "KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED"


def make_tracker(cfg) -> StageTracker:
    """The merge driver's tracker from a MergeConfig's typed `tracking:` section (project and
    registered model default to cfg.name: MergeConfig fills them)."""
    return StageTracker(cfg.tracking)
