"""Where dmm-ray keeps things by default, and the one rule for relative paths.

Default locations live under `$DMM_HOME` (default `~/.dmm-ray`), the same absolute folder whether a
job runs from a checkout or from the temporary working-dir copy of `ray job submit`:

    $DMM_HOME/zoo/<size>/          toy-zoo presets (`zoo: full` / `zoo: micro`), built on first use
    $DMM_HOME/outputs/<name>/      a merge's output_dir: merged/, latents/, stages/, evaluation/, ray_results/
    $DMM_HOME/mlflow.db            the MLflow store (artifacts in $DMM_HOME/mlartifacts/)
    $DMM_HOME/cache/fid/           FID statistics cache (the merge's evaluation, jobs/evaluate.py, style_mixing)

Relative paths resolve against the directory of the config file that names them; paths given on
the command line (`--set key=value`, CLI flags) against the current directory. `$DMM_HOME` and `~`
expand anywhere; URIs (`s3://...`) and absolute paths stay as they are. On a multi-node cluster
point DMM_HOME at a filesystem every node mounts (or give URIs).

    $DMM_HOME/staging/<name>-<hash>/  the driver's local work folder of a merge whose output_dir is a URI
    $DMM_HOME/cache/download/<hash>/  merged models (and stage students) downloaded from URIs before loading

A string that looks like a URI which lost a slash (`s3:/bucket/x`, `s3:`) is refused by `resolve`
instead of becoming a local folder named `s3:`.

A leaf module (os/pathlib only): config, tracking and serve all resolve through it.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from pathlib import Path
from typing import Optional

HOME_ENV = "DMM_HOME"
DEFAULT_HOME = "~/.dmm-ray"
SQLITE = "sqlite:///"
# `ray job submit --working-dir` unpacks the upload here; Ray deletes it with the job's session.
RAY_WORKING_DIR_MARKER = "/runtime_resources/working_dir_files/"

_HOME_VAR = re.compile(r"^(\$DMM_HOME|\$\{DMM_HOME\})(?=/|$)")


def dmm_home() -> Path:
    """`$DMM_HOME`, default `~/.dmm-ray`, as an absolute path (not created here)."""
    return Path(os.path.expanduser(os.environ.get(HOME_ENV) or DEFAULT_HOME)).resolve()


def zoo_dir(size: str) -> Path:
    return dmm_home() / "zoo" / size


def outputs_dir(name: str) -> Path:
    """The default `output_dir` of a merge named `name`."""
    return dmm_home() / "outputs" / name


def default_tracking_uri() -> str:
    return SQLITE + str(dmm_home() / "mlflow.db")


# Store URIs that MLflow reads by name, not as a path (mlflow.tracking.registry looks them up before any
# scheme): Databricks' default profile and the Unity Catalog model registries.
MLFLOW_NAMED_STORES = ("databricks", "databricks-uc", "uc")


def is_file_store(uri: str) -> bool:
    """Whether MLflow reads the tracking or registry store `uri` as a file store: a plain path or file:."""
    from urllib.parse import urlparse

    return uri not in MLFLOW_NAMED_STORES and urlparse(uri).scheme in ("", "file")


def fid_cache_dir() -> Path:
    return dmm_home() / "cache" / "fid"


def is_uri(path: str) -> bool:
    return "://" in str(path)


def is_mlflow_uri(uri: str) -> bool:
    """`models:/...`, `runs:/...` or any other URI MLflow downloads; a plain path is not."""
    return "://" in uri or uri.startswith(("models:/", "runs:/"))


# `scheme:/x` or `scheme:` alone: what `Path("s3://b/x")` leaves of a URI (a local folder named `s3:`)
_MANGLED_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+:(/(?!/)|$)")


def check_not_mangled(path: str, setting: str | None = None) -> None:
    """Refuse `s3:/bucket/x` / `s3:` (a URI missing a slash): it would become a local folder named `s3:`."""
    if not is_uri(path) and _MANGLED_URI.match(path.strip()) and not path.startswith(("models:/", "runs:/")):
        scheme = path.strip().split(":", 1)[0]
        where = f"{setting} " if setting else ""
        raise ValueError(
            f"{where}{path!r} looks like a URI that lost a slash: give {scheme}://bucket/path "
            f"(object storage through pyarrow) or a local path; it is not written to a local folder named {scheme + ':'!r}"
        )


def _uri_key(uri: str) -> str:
    tail = re.sub(r"[^A-Za-z0-9._-]+", "_", uri.rstrip("/").rsplit("/", 1)[-1])[:40] or "root"
    return f"{tail}-{hashlib.sha1(uri.rstrip('/').encode()).hexdigest()[:12]}"


def staging_dir(uri: str) -> Path:
    """The driver's local work folder for an `output_dir` URI (lock, stage students, the merged model
    before upload, evaluation outputs before upload)."""
    return _staging_root() / _uri_key(uri)


def _staging_root() -> Path:
    return dmm_home() / "staging"


def is_staging_dir(folder: str | Path) -> bool:
    """`folder` is an output_dir URI's staging folder (staging_dir), which is not itself the output_dir."""
    return Path(folder).resolve().parent == _staging_root().resolve()


def download_dir(uri: str) -> Path:
    """Where a folder at `uri` is downloaded before it is loaded (replaced by each download)."""
    return dmm_home() / "cache" / "download" / _uri_key(uri)


def expand(path: str) -> str:
    """`$DMM_HOME/...` (also when the variable is unset: its default) and `~/...` expanded."""
    path = _HOME_VAR.sub(lambda _: str(dmm_home()), path.strip())
    return os.path.expanduser(path)


def resolve(path: Optional[str], base: str | os.PathLike | None = None) -> Optional[str]:
    """THE rule: None and URIs unchanged; `$DMM_HOME`/`~` expanded; a relative path joined to
    `base` (a config file's folder; default: the current directory) and made absolute."""
    if path is None or is_uri(path):
        return path
    check_not_mangled(path)
    path = expand(path)
    if os.path.isabs(path):
        return os.path.normpath(path)
    return str((Path(base) if base is not None else Path.cwd()).joinpath(path).resolve())


def resolve_tracking_uri(uri: Optional[str], base: str | os.PathLike | None = None) -> Optional[str]:
    """A `sqlite:///relative.db` store, or a file store given as a plain relative path (`mlruns`, with
    MLFLOW_ALLOW_FILE_STORE=true), made absolute by `resolve` (other URIs unchanged): Ray Train workers
    log their per-step metrics from their own working directory."""
    if uri and not uri.startswith("file:") and is_file_store(uri):
        return resolve(uri, base)
    if uri is None or not uri.startswith(SQLITE):
        return uri
    db = uri[len(SQLITE) :]
    if db.startswith("/") or db == ":memory:":
        return uri
    return SQLITE + resolve(db, base)


def sqlite_path(uri: Optional[str], relative: bool = False) -> Optional[Path]:
    """The database file of an absolute `sqlite:///` URI (its `?query` dropped), else None.
    `relative=True`: a relative one too (`sqlite:///mlflow.db`: as SQLAlchemy opens it, against the
    current directory); never `:memory:` nor an empty path."""
    if not uri or not uri.startswith(SQLITE):
        return None
    db = uri[len(SQLITE) :].split("?")[0]
    if db.startswith("/") or (relative and db not in ("", ":memory:")):
        return Path(db)
    return None


class OutputPathError(ValueError):
    """An output location that cannot be written: a file where a folder goes, a read-only parent."""


def check_writable_folder(path: str | os.PathLike | None, setting: str) -> None:
    """Refuse, before any work, an output folder this process could not write: a file in its place,
    a file among its parents, or a parent where nothing can be created (read-only, `/proc`). Probes
    the nearest existing parent with a temporary folder it removes again, so it creates nothing
    (root passes `os.access` where a write still fails). URIs are left to their filesystem."""
    if path is None or is_uri(str(path)):
        return
    target = Path(expand(str(path))).absolute()
    if target.exists() and not target.is_dir():
        raise OutputPathError(f"{setting} {target} is a file, not a folder; give a folder path (it is created if missing)")
    parent = target
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise OutputPathError(f"{setting} {target}: {parent} is a file, so no folder can be created under it; give another path")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".dmm-write-check-", dir=parent))
    except OSError as error:
        raise OutputPathError(f"{setting} {target}: cannot write in {parent} ({error.strerror or error}); give a folder you can write to") from None


def ray_job_working_dir(cwd: str | os.PathLike | None = None) -> Optional[Path]:
    """The temporary working-dir copy this process runs in under `ray job submit --working-dir`, or None."""
    cwd = str(Path(cwd) if cwd is not None else Path.cwd())
    i = cwd.find(RAY_WORKING_DIR_MARKER)
    if i < 0:
        return None
    rest = cwd[i + len(RAY_WORKING_DIR_MARKER) :].split("/", 1)[0]  # the _ray_pkg_<hash> folder
    return Path(cwd[: i + len(RAY_WORKING_DIR_MARKER)] + rest)


def in_temporary_dir(path: Optional[str], cwd: str | os.PathLike | None = None) -> bool:
    """True when `path` lies inside the Ray job's temporary working dir (deleted with the session)."""
    tmp = ray_job_working_dir(cwd)
    if tmp is None or path is None or is_uri(path):
        return False
    try:
        Path(path).resolve().relative_to(tmp.resolve())
        return True
    except ValueError:
        return False


def temporary_dir_warning(named: dict[str, Optional[str]]) -> Optional[str]:
    """The printed locations' warning line for those of `named` (what -> path) that lie in the Ray job's
    temporary working dir (a relative --set or --output-dir under `ray job submit`), or None."""
    temporary = [what for what, path in named.items() if in_temporary_dir(path)]
    if not temporary:
        return None
    return (
        f"  WARNING: {', '.join(temporary)} lie(s) in Ray's temporary working dir {ray_job_working_dir()}, "
        "which Ray deletes with the job's session; leave them unset ($DMM_HOME) or give absolute paths"
    )
