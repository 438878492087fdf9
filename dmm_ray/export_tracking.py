"""The MLflow side of exports (jobs/export.py): the merged model an export reads, the run it is
logged to, and the artifacts it leaves there.

`resolve_model` gives the local folder of a `--model` (a folder, its object-storage URI or a models:/ URI)
with the merge run and store it records; `export_target` picks the run and store an export is logged to (--run-id,
--tracking-uri, else the model's), and its `check()` (`check_run`) makes sure, before any work, that
the store holds that run; `log_export` logs the export, its config folder and its metadata under the
run's exports/ (with `tracking.quick_http`: MLflow's REST client without retries, for a store that did not answer).

Merge tracking (run tree, metrics, model registry) lives in `dmm_ray.tracking`; this module only uses
its store checks and model resolution.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping

from dmm_ray.tracking import TrackingError, check_tracking_store, is_mlflow_uri, local_model, quick_http


@contextlib.contextmanager
def resolve_model(model: str, tracking_uri: str | None = None, setting: str = "--model") -> Iterator[tuple[Path, str | None, str | None]]:
    """(local folder, run id, tracking uri) for a folder, an object-storage URI of one (s3://, gs://, file://)
    or an MLflow models:/ URI (read from `tracking_uri`, else the store already set, else
    sqlite:///$DMM_HOME/mlflow.db), for the length of the block: a downloaded model is removed at its end.
    The run and store of a folder are the ones its dmm_merge.json records (None without). A local path that
    does not exist or is a file, and a model that cannot be resolved, are a TrackingError naming `setting`."""
    if model.startswith(("models:/", "runs:/")):
        with contextlib.ExitStack() as stack:
            try:
                folder = stack.enter_context(local_model(model, tracking_uri))
                run = _registry_run(model)
            except Exception as exc:  # noqa: BLE001 - a missing registry entry, store, ...: say which
                raise TrackingError(f"cannot resolve {setting} {model}: {exc}") from exc
            yield folder, *run
        return
    from dmm_ray.data import fs as fsu
    from dmm_ray.merged_model import read_record

    if fsu.is_uri(model):
        # object storage (s3://, gs://, file://), as Serve and load_dmm_pipeline read a merged model: the playground's
        # export command names the served model's URI, and a --model the job could not read did not run as printed
        with contextlib.ExitStack() as stack:
            try:
                folder = stack.enter_context(fsu.fetched(model, model=True))  # a temporary download, removed at the block's end
                record = read_record(folder).get("mlflow") or {}
            except Exception as exc:  # noqa: BLE001 - no such folder, no credentials, a foreign dmm_merge.json: say which
                raise TrackingError(
                    f"cannot read {setting} {model}: {exc}; give a merged-model folder (local or object storage) or models:/<name>/<version>"
                ) from exc
            yield folder, record.get("run_id"), record.get("tracking_uri")
        return
    folder = Path(model).expanduser()
    if not is_mlflow_uri(model) and not folder.is_dir():
        problem = "is a file, not a folder" if folder.exists() else "does not exist"
        raise TrackingError(f"{setting} {model} {problem}; give jobs/merge.py's <output_dir>/merged or models:/<name>/<version>")
    try:
        record = read_record(folder).get("mlflow") or {}
        run = record.get("run_id"), record.get("tracking_uri")
    except Exception as exc:  # noqa: BLE001 - a dmm_merge.json that is not what a merge writes
        raise TrackingError(f"cannot resolve {setting} {model}: {exc}") from exc
    yield folder, *run


def _registry_run(model: str) -> tuple[str | None, str]:
    """(run id, tracking uri) of a models:/ or runs:/ URI, from the store resolve_model set."""
    import mlflow
    from mlflow import MlflowClient

    if model.startswith("runs:/"):
        return model.split("/")[1], mlflow.get_tracking_uri()
    from mlflow.store.artifact.utils.models import get_model_name_and_version

    client = MlflowClient()
    found = get_model_name_and_version(client, model)  # MLflow's own reading: /<version>, @alias, /latest, /<stage>
    if len(found) == 1:  # models:/<model id>: an MLflow 3 logged model, not a registered version
        return mlflow.get_logged_model(found[0]).source_run_id, mlflow.get_tracking_uri()
    return client.get_model_version(*found).run_id, mlflow.get_tracking_uri()


@dataclass(frozen=True)
class ExportTarget:
    """The MLflow run an export is logged to and its store, with where each came from, for the
    messages (`run_what`: "--run-id X", "the merge run X recorded in ..."; `uri_what`: "--tracking-uri",
    "the store recorded with the merge", ...). `run_id` None: the model records no run."""

    run_id: str | None
    tracking_uri: str
    run_what: str
    uri_what: str
    uri_given: bool = False  # --tracking-uri: checked by the caller already (check_tracking_store)

    def check(self) -> str | None:
        """Before any work: the store can be opened and holds the run (`check_run`); a TrackingError
        when not. A warning's text (for the caller to print) when an http(s) store does not answer now;
        None when the run is there, or without a run."""
        if self.run_id is None:
            return None
        if not self.uri_given:
            try:
                check_tracking_store(self.tracking_uri, f"the MLflow store ({self.uri_what})")
            except TrackingError as exc:
                raise TrackingError(f"{exc}; or name the store with --tracking-uri, or pass --no-track") from None
        return check_run(self.run_id, self.tracking_uri, self.run_what, self.uri_what)


def export_target(
    model: str, folder: Path, model_run_id: str | None, model_uri: str | None, run_id: str | None = None, tracking_uri: str | None = None
) -> ExportTarget:
    """Where an export of `model` (resolved to `folder`, whose run and store `resolve_model` found:
    `model_run_id`, `model_uri`) is logged: `run_id` (--run-id) else the model's run; `tracking_uri`
    (--tracking-uri) else the model's store, else sqlite:///$DMM_HOME/mlflow.db."""
    from dmm_ray.paths import default_tracking_uri

    registry = is_mlflow_uri(model)
    if run_id:
        run_what = f"--run-id {run_id}"
    elif registry:
        run_what = f"the run {model_run_id} that registered {model}"
    else:
        run_what = f"the merge run {model_run_id} recorded in {folder / 'dmm_merge.json'}"
    if tracking_uri:
        uri_what = "--tracking-uri"
    else:
        uri_what = "the registry's store" if registry else "the store recorded with the merge" if model_uri else "the default store"
    return ExportTarget(
        run_id=run_id or model_run_id,
        tracking_uri=tracking_uri or model_uri or default_tracking_uri(),
        run_what=run_what,
        uri_what=uri_what,
        uri_given=bool(tracking_uri),
    )


def check_run(run_id: str, uri: str, run_what: str, uri_what: str) -> str | None:
    """Before any work: the run the export will be logged to (`run_what` names it and where it came
    from) is in the store `uri` (`uri_what`: where that came from); a TrackingError (exit 2) when it is
    not, or is deleted. An sqlite database that does not exist is not created to find that out. An
    http(s) store that does not answer now is only a warning: its text is returned (the caller prints
    it), the export goes on, its logging is tried once after the write (no retries), and exits 3 when it
    fails, as before. None when the run is there."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from dmm_ray.paths import sqlite_path

    where = f"the MLflow store {uri} ({uri_what})"
    fix = "give a run of that store, name the store that has it with --tracking-uri, or pass --no-track"
    db = sqlite_path(uri, relative=True)
    if db is not None and not db.is_file():
        raise TrackingError(f"{run_what} is not in {where}: its database {db} does not exist; {fix}")
    remote = uri.startswith(("http://", "https://"))
    try:
        with quick_http():
            run = MlflowClient(uri).get_run(run_id)
    except Exception as exc:  # noqa: BLE001 - a missing run is bad input; a server that does not answer is not
        text = " ".join(str(exc).split())[:300] or type(exc).__name__
        if isinstance(exc, MlflowException) and exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            raise TrackingError(f"{run_what} is not in {where}; {fix}") from None
        if not remote:
            raise TrackingError(f"cannot read {run_what} from {where}: {text}; {fix}") from None
        return f"cannot check {run_what} in {where} now ({text}); exporting anyway; the logging is tried once after the write (exit 3 if it fails)"
    if run.info.lifecycle_stage == "deleted":
        raise TrackingError(f"{run_what} is deleted in {where}; restore it (mlflow runs restore --run-id {run_id}) or {fix}")
    return None


def log_export(out: Path, config_dir: Path | None, metadata: Mapping[str, str], run_id: str, tracking_uri: str, one_try: bool = False) -> None:
    """The export (file or folder), its config folder and its metadata as artifacts of `run_id` under
    exports/, and the tag `export_tag(out)` = its style (or mixture) on the run. `one_try`: no
    retries (`quick_http`), for a store that did not answer the check."""
    from mlflow import MlflowClient

    with quick_http(timeout_s=None) if one_try else contextlib.nullcontext():
        client = MlflowClient(tracking_uri)
        client.get_run(run_id)  # fails clearly when the run is not in this store
        if out.is_dir():
            client.log_artifacts(run_id, str(out), f"exports/{out.name}")
        else:
            client.log_artifact(run_id, str(out), "exports")
        if config_dir is not None and config_dir.is_dir():
            client.log_artifacts(run_id, str(config_dir), f"exports/{config_dir.name}")
        with tempfile.TemporaryDirectory() as tmp:
            record = Path(tmp) / f"{out.name}.json"
            record.write_text(json.dumps(dict(metadata), indent=1))
            client.log_artifact(run_id, str(record), "exports")
        client.set_tag(run_id, export_tag(out), metadata.get("dmm.style") or metadata.get("dmm.style_weights", ""))


def export_tag(out: Path) -> str:
    """The run tag naming an export: `dmm.export.<file name>`. MLflow refuses a tag key with other characters
    than letters, digits, `_ - . /`, spaces (and `:` off Windows); any other character of the name
    (`ink+neon.safetensors`, `a,b`) becomes `_`, so a valid --out never fails the logging."""
    import re

    return "dmm.export." + re.sub(r"[^\w.\- ]", "_", out.name)
