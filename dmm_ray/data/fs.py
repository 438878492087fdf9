"""One way to address files: a local path or any pyarrow filesystem URI (file://, s3://, gs://, hdfs://).

THE resolver of locations (`resolve`: a location -> (pyarrow FileSystem, path)), and the helpers that
move whole folders between object storage and a local folder (`upload_dir`, `download_dir`,
`local_copy`): the merge job's `output_dir`, `data.shards` and merged models go through here. A folder
(a model, an evaluation, a stage's student) is replaced at a URI as a local model is (`upload_model`,
`recover_model`, `model_to_read`): the new one beside it first, the previous one kept aside until the new
one is in.
Plain local paths map to pyarrow's LocalFileSystem and behave exactly like the local folder.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import logging
import os
import posixpath
import re
import shutil
import uuid
from pathlib import Path, PurePosixPath
from typing import Iterable, Optional

import pyarrow.fs as pafs

MODEL_MARKER = "model_index.json"  # what makes a diffusers folder loadable: copied last, deleted first
# S3's CopyObject, pyarrow's copy_file there, refuses a source over 5 GiB (a shard of an fp32 SDXL UNet is up to 10 GB)
SERVER_COPY_LIMIT = 5 * 1024**3
# GCS has no such limit: its server-side copy is objects.rewrite, which copies an object of any size, in several
# requests for a large one (a rewriteToken until done: https://cloud.google.com/storage/docs/json_api/v1/objects/rewrite),
# and both pyarrow's GcsFileSystem.CopyFile (RewriteObjectBlocking, arrow/cpp/src/arrow/filesystem/gcsfs.cc) and
# gcsfs's cp_file (rewriteTo in a loop until done) run it to the end. Its stores: pyarrow's (type_name "gcs") or fsspec's.
UNLIMITED_COPY_PROTOCOLS = ("gs", "gcs")

# schemes pyarrow.fs.FileSystem.from_uri opens (object stores need pyarrow built with them, and credentials)
SUPPORTED_SCHEMES = ("file", "s3", "gs", "gcs", "hdfs", "viewfs", "abfs", "abfss")


def is_uri(location) -> bool:
    return "://" in str(location)


def scheme_of(location) -> str:
    """A URI's scheme, lower case (`s3` of `S3://b/x`); "" for a plain path."""
    return str(location).split("://", 1)[0].lower() if is_uri(location) else ""


def is_pyarrow_uri(location) -> bool:
    """A URI whose scheme pyarrow opens (SUPPORTED_SCHEMES: s3://, gs://, file://, ...), not an MLflow one."""
    return scheme_of(location) in SUPPORTED_SCHEMES


def check_location(setting: str, location: str) -> None:
    """A clear error, naming `setting`, for a location that is neither a local path nor a URI that
    pyarrow can open (`s3:/b` / `s3:` would otherwise become a local folder named `s3:`). No network."""
    from dmm_ray.paths import check_not_mangled

    check_not_mangled(location, setting)
    if is_uri(location):
        scheme = scheme_of(location)
        if scheme not in SUPPORTED_SCHEMES:
            raise ValueError(
                f"{setting} {location!r}: scheme {scheme + '://'!r} is not supported; give a local path or a URI "
                f"pyarrow opens: {', '.join(s + '://' for s in SUPPORTED_SCHEMES)}"
            )
        if problem := _uri_syntax_problem(location):
            raise ValueError(f"{setting} {location!r}: {problem}")


def _uri_syntax_problem(uri: str) -> Optional[str]:
    """What in `uri` pyarrow reads as something other than its path, silently, or None. pyarrow drops a
    fragment ('#' and all after it) and a file:// URI's query ('?' ...): `file:///runs/a#1/model` was the
    folder /runs/a, which an upload empties. pyarrow decodes %23 and %3F (and %20) in the path. A file://
    URI's one option, `?use_mmap=true`, is a query pyarrow reads."""
    if "#" in uri:
        return "'#' starts a URI fragment, which pyarrow drops with everything after it; write a '#' in a name as %23"
    if scheme_of(uri) == "file" and "?" in uri:
        if any(option.split("=", 1)[0] != "use_mmap" for option in uri.split("?", 1)[1].split("&")):
            return (
                "'?' starts a URI query, which pyarrow drops from a file:// URI with everything after it (its one option is use_mmap); "
                "write a '?' in a name as %3F"
            )
    return None


def require_local(setting: str, location, what: str = "folder") -> Path:
    """`location` as a local Path, or a clear error naming `setting` when it is a URI (`what`: a local "folder",
    or "path" for a setting that may name a file)."""
    if location is not None and is_uri(location):
        raise ValueError(
            f"{setting} {str(location)!r} is a URI, but {setting} must be a local {what} "
            "(URIs are supported for output_dir, data.shards and loading a merged model)"
        )
    check_location(setting, str(location))
    return Path(location)


def resolve(path_or_uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it). Plain local paths (relative too) map to the local filesystem."""
    path_or_uri = str(path_or_uri)
    if "://" not in path_or_uri:
        return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(path_or_uri))
    if problem := _uri_syntax_problem(path_or_uri):
        raise ValueError(f"{path_or_uri!r}: {problem}")
    try:
        return pafs.FileSystem.from_uri(path_or_uri)
    except Exception as e:  # pyarrow raises ArrowInvalid / OSError with terse messages
        hint = "; a URI writes a space in a name as %20 (or give a local path)" if " " in path_or_uri else ""
        raise ValueError(f"cannot open filesystem for {path_or_uri!r}: {e}{hint}") from e


def join(base: str, *parts: str) -> str:
    """Join paths inside one filesystem (always '/', pyarrow paths are posix-style)."""
    return posixpath.join(base, *(p.lstrip("/") for p in parts))


def exists(fs: pafs.FileSystem, path: str) -> bool:
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def is_dir(fs: pafs.FileSystem, path: str) -> bool:
    return fs.get_file_info(path).type == pafs.FileType.Directory


def list_files(fs: pafs.FileSystem, path: str, suffixes: Iterable[str], recursive: bool = False) -> list[str]:
    """Sorted files under `path` whose names end with one of `suffixes` (sorted = deterministic shard order)."""
    suffixes = tuple(suffixes)
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=recursive, allow_not_found=True))
    return sorted(i.path for i in infos if i.type == pafs.FileType.File and i.path.endswith(suffixes))


def read_bytes(fs: pafs.FileSystem, path: str) -> bytes:
    with fs.open_input_stream(path) as f:
        return f.read()


def write_bytes_atomic(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    """Write to `path.tmp` then move into place, so a crash never leaves a half-written `path`. A write
    that fails or is interrupted removes its `path.tmp` (a killed one's is overwritten by the next write
    of `path`; no reader lists `.tmp` files)."""
    tmp = path + ".tmp"
    try:
        with fs.open_output_stream(tmp) as f:  # an object store's stream publishes what it got on close, error or not
            f.write(data)
        fs.move(tmp, path)
    except BaseException:
        try:
            fs.delete_file(tmp)
        except Exception:  # none was created, or the store is gone: the error that stopped the write is the one to show
            pass
        raise


def location_join(location, *parts: str):
    """`location / parts`: a Path for a local location, a string for a URI (never `Path(uri)`, which
    turns `s3://b/x` into the local path `s3:/b/x`)."""
    if is_uri(location):
        return "/".join([str(location).rstrip("/")] + [p.strip("/") for p in parts])
    return Path(location).joinpath(*parts)


def delete(fs: pafs.FileSystem, path: str) -> bool:
    """Remove a file or a folder (recursively); False when there was nothing."""
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.Directory:
        fs.delete_dir(path)
        return True
    if info.type == pafs.FileType.File:
        fs.delete_file(path)
        return True
    return False


def has_entries(fs: pafs.FileSystem, path: str) -> bool:
    """A folder holding anything (object stores: any object under the prefix)."""
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        return False
    return bool(fs.get_file_info(pafs.FileSelector(path, recursive=False, allow_not_found=True)))


def _local_files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in Path(folder).rglob("*") if p.is_file())


def upload_dir(local: str | os.PathLike, fs: pafs.FileSystem, path: str, last: Iterable[str] = ("model_index.json",)) -> list[str]:
    """Replace the folder `path` on `fs` with a copy of the local folder `local`. Files named in `last`
    (default: a pipeline's model_index.json, what makes the folder loadable) are copied after every
    other file, so an upload cut short leaves a folder that refuses to load rather than a mix of
    two models. Returns the relative paths copied."""
    local = Path(local)
    if not local.is_dir():
        raise FileNotFoundError(f"cannot upload {local}: not a folder")
    files = _local_files(local)
    last = set(last)
    ordered = [f for f in files if Path(f).name not in last] + [f for f in files if Path(f).name in last]
    if fs.get_file_info(path).type == pafs.FileType.Directory:
        fs.delete_dir_contents(path, missing_dir_ok=True)
    fs.create_dir(path, recursive=True)
    source = pafs.LocalFileSystem()
    made = {path}
    for rel in ordered:
        dest = join(path, rel.replace(os.sep, "/"))
        parent = posixpath.dirname(dest)
        if parent not in made:
            fs.create_dir(parent, recursive=True)
            made.add(parent)
        pafs.copy_files(str(local / rel), dest, source_filesystem=source, destination_filesystem=fs)
    return ordered


def _listing(fs: pafs.FileSystem, path: str) -> dict[str, tuple]:
    """{relative path: (its path on `fs`, size, modification time)} of every file under the folder `path` on
    `fs`: what a download of it copies, and what says whether the folder changed while it was copied."""
    listed = {}
    for info in fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True)):
        if info.type == pafs.FileType.File:
            # some filesystems (fsspec's) list "/bucket/x" for "bucket/x": compare without the leading "/"
            listed[posixpath.relpath(info.path.lstrip("/"), path.strip("/") or ".")] = (info.path, info.size, info.mtime_ns)
    return listed


def download_dir(fs: pafs.FileSystem, path: str, local: str | os.PathLike, model: str | None = None) -> Path:
    """Copy the folder `path` on `fs` into the local folder `local` (replaced: downloaded to a sibling
    first, then moved into place, so an interrupted download never passes for a complete one). `model`: the
    folder is a model, named so in errors (the location as the user gave it). A model copy is complete as an
    upload's is (upload_model): it needs MODEL_MARKER, copied last, and the folder listed again once copied must
    be the one it copied (every file's size and time), else it is refused (FileNotFoundError) before it moves into
    place. A copy taken while a local merge's save swapped the folder (its two renames, then the previous model
    removed: a file:// model, which the marker alone cannot tell, as both models have one) or an upload replaced
    it held files of two models, or lost some, and passed for a model."""
    local = Path(local)
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        raise FileNotFoundError(f"{path!r} is not a folder on {fs.type_name} filesystem")
    listed = _listing(fs, path)
    changed = f"{model} changed while it was downloaded (a merge is saving or uploading a model there); load it again"
    if model is not None and MODEL_MARKER not in listed:  # model_to_read found it complete: replaced since
        raise FileNotFoundError(changed)
    from dmm_ray.output_lock import left_by_killed

    for stale in left_by_killed(local.parent, f"{glob.escape(local.name)}.part-*", rf"{re.escape(local.name)}\.part-(\d+)-[0-9a-f]+"):
        shutil.rmtree(stale, ignore_errors=True)  # a killed download's (its own name: nothing else removes it)
    tmp = local.with_name(f"{local.name}.part-{os.getpid()}-{uuid.uuid4().hex[:8]}")  # the pid: see left_by_killed
    aside = local.with_name(f"{local.name}.part-{os.getpid()}-{uuid.uuid4().hex[:8]}")  # the earlier copy, removed at the end
    tmp.mkdir(parents=True)
    try:
        for rel in sorted(listed, key=lambda rel: (model is not None and rel == MODEL_MARKER, rel)):  # a model's marker last
            dest = tmp / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            try:
                pafs.copy_files(listed[rel][0], str(dest), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
            except FileNotFoundError:  # removed since it was listed: a model replaced meanwhile
                if model is None:
                    raise
                raise FileNotFoundError(changed) from None
        if model is not None and _listing(fs, path) != listed:
            raise FileNotFoundError(changed)
        # Two processes on a node download one location into one folder (local_copy's default): the earlier copy is
        # moved aside in one step, not removed in place (a process loading from it lost its files part-way), and a copy
        # another download moved in meanwhile is kept, as fresh as this one (this move failed: Directory not empty).
        with contextlib.suppress(FileNotFoundError):  # none, or another download moved it aside first
            os.replace(local, aside)
        try:
            os.replace(tmp, local)
        except OSError as error:
            if error.errno not in (errno.ENOTEMPTY, errno.EEXIST) or not local.is_dir():
                raise
    finally:
        for left in (tmp, aside):
            if left.exists():
                shutil.rmtree(left, ignore_errors=True)
    return local


def model_siblings(path: str) -> tuple[str, str]:
    """(`merged.tmp`, `merged.old`) beside the model folder `path` on its filesystem: where `upload_model`
    uploads the new model and keeps the previous one (the names merged_model.save_siblings gives locally)."""
    from dmm_ray.merged_model import save_siblings

    path = path.rstrip("/")
    tmp, old = save_siblings(PurePosixPath(path))
    return str(tmp), str(old)


def _complete(fs: pafs.FileSystem, path: str, marker: str = MODEL_MARKER) -> bool:
    return fs.get_file_info(join(path, marker)).type == pafs.FileType.File


def _server_copy_limited(fs: pafs.FileSystem) -> bool:
    """Does `fs`'s server-side copy (copy_file) refuse a file over SERVER_COPY_LIMIT? Every store but GCS is
    taken to, as S3 does (streaming is correct everywhere, only slower); on GCS a 10 GB shard was streamed
    through this machine twice (aside, then in) for nothing."""
    if isinstance(fs, pafs.SubTreeFileSystem):
        fs = fs.base_fs
    if fs.type_name in UNLIMITED_COPY_PROTOCOLS:  # pyarrow's GcsFileSystem
        return False
    protocol = getattr(getattr(getattr(fs, "handler", None), "fs", None), "protocol", None)  # an fsspec one: PyFileSystem(FSSpecHandler)
    protocols = (protocol,) if isinstance(protocol, str) else tuple(protocol or ())
    return not set(protocols) & set(UNLIMITED_COPY_PROTOCOLS)


def _copy_model(fs: pafs.FileSystem, src: str, dest: str, marker: str = MODEL_MARKER) -> None:
    """Copy the folder `src` to `dest` inside `fs`, `marker` last: server-side where the store can
    (S3 CopyObject, GCS rewrite: no data through this machine), streamed through it for a file over
    SERVER_COPY_LIMIT where the store's copy has that limit (`_server_copy_limited`)."""
    files = [(rel, size) for rel, (_, size, _) in _listing(fs, src).items()]
    files.sort(key=lambda f: (posixpath.basename(f[0]) == marker, f[0]))
    made, limited = set(), _server_copy_limited(fs)
    for rel, size in files:
        source, dest_file = join(src, rel), join(dest, rel)
        if (parent := posixpath.dirname(dest_file)) not in made:
            fs.create_dir(parent, recursive=True)
            made.add(parent)
        if limited and size is not None and size > SERVER_COPY_LIMIT:
            with fs.open_input_stream(source) as reader, fs.open_output_stream(dest_file) as writer:
                while chunk := reader.read(64 * 1024**2):
                    writer.write(chunk)
        else:
            fs.copy_file(source, dest_file)


def _delete_model(fs: pafs.FileSystem, path: str, marker: str = MODEL_MARKER) -> bool:
    """`delete`, `marker` first: a folder deleted part-way never passes for a complete one."""
    if _complete(fs, path, marker):
        fs.delete_file(join(path, marker))
    return delete(fs, path)


def upload_model(local: str | os.PathLike, fs: pafs.FileSystem, path: str, marker: str = MODEL_MARKER) -> list[str]:
    """Replace the folder `path` on `fs` with the local folder `local`, never leaving less than the previous
    complete folder there: an object store has no atomic rename, and emptying `path` before the upload
    (upload_dir) left nothing at all when the upload failed. `marker`: the file whose presence makes the
    folder complete (a model's MODEL_MARKER; an evaluation's fid_matrix.json), which `local` must hold.
    The new folder goes to `path.tmp` first (marker last: complete only once all of it is there); then the
    previous one is copied aside to `path.old`, `path` emptied (marker first), `path.tmp` copied in (marker
    last), and both siblings removed. A failure or Ctrl-C puts the previous folder back (`recover_model`),
    and so does the next merge (its start) where that could not finish; until then readers of a model load
    `path.old` (`model_to_read`). Returns the files uploaded."""
    if not (Path(local) / marker).is_file():  # else the swap removed the previous folder and left none complete
        reason = f"it has no {marker}, the file that marks it complete" if Path(local).is_dir() else "not a folder"
        raise FileNotFoundError(f"cannot upload {local}: {reason}")
    tmp, old = model_siblings(path)
    try:
        uploaded = upload_dir(local, fs, tmp, last=(marker,))
        if _complete(fs, path, marker):  # the previous folder, aside (an incomplete path with a complete old: old is the last good one)
            _delete_model(fs, old, marker)
            _copy_model(fs, path, old, marker)
        _delete_model(fs, path, marker)
        _copy_model(fs, tmp, path, marker)
    except BaseException:
        with contextlib.suppress(Exception):  # the store may be gone: the error that stopped the upload is the one to show
            recover_model(fs, path, marker)
        raise
    for sibling in (old, tmp):
        _delete_model(fs, sibling, marker)
    return uploaded


def recover_model(fs: pafs.FileSystem, path: str, marker: str = MODEL_MARKER, dry_run: bool = False) -> list[str]:
    """Undo an `upload_model` of `path` that was interrupted: `path` incomplete (no `marker`) while
    `path.old` is complete -> copy it back; then remove `path.tmp` / `path.old`. Returns what it did (for
    the log). Call only while no upload of `path` can be under way (the merge: at its start). `dry_run`
    (the merge's --dry-run): change nothing, return what a run would do."""
    tmp, old = model_siblings(path)
    done = []
    restore = not _complete(fs, path, marker) and _complete(fs, old, marker)
    if restore:
        if not dry_run:
            _delete_model(fs, path, marker)
            _copy_model(fs, old, path, marker)
            _delete_model(fs, old, marker)  # the move's second half: not a leftover to report
        done.append(
            f"{'a run would first restore' if dry_run else 'restored'} {path} from {posixpath.basename(old)} (an upload that replaced it was interrupted)"
        )
    for stale in (tmp,) if restore else (tmp, old):  # (restored: `old` is `path` now)
        if exists(fs, stale) if dry_run else _delete_model(fs, stale, marker):
            done.append(f"{'a run would first remove' if dry_run else 'removed'} {stale} left behind by an interrupted upload")
    return done


def model_to_read(fs: pafs.FileSystem, path: str, shown: Optional[str] = None) -> str:
    """The folder on `fs` to read the model at `path` from: `path` when complete (it holds MODEL_MARKER),
    else its complete `path.old` while an interrupted `upload_model` left it there (a warning), else a
    FileNotFoundError naming `shown` (the location as the user gave it; default `path`) and the fix.
    Writes nothing: readers never repair a folder a merge may be writing."""
    shown = shown or path
    if _complete(fs, path):
        return path
    old = model_siblings(path)[1]
    if _complete(fs, old):
        logging.getLogger(__name__).warning(
            "%s holds no complete model (an upload was interrupted while it replaced it, or one is under way); loading the "
            "previous model from %s. The next merge on that output_dir puts it back (or re-run the merge to upload its model again).",
            shown,
            shown.rstrip("/") + ".old",
        )
        return old
    if not is_dir(fs, path):
        raise FileNotFoundError(f"{shown} does not exist (or is not a folder)")
    raise FileNotFoundError(
        f"{shown} is not a complete model: it has no {MODEL_MARKER} (an upload that was cut short or is under way) and no "
        "complete previous model beside it; re-run the merge that writes it (jobs/merge.py with that output_dir) to upload it again"
    )


def upload(local: str | os.PathLike, uri: str, marker: str = MODEL_MARKER) -> list[str]:
    """`upload_model` to a location given as a URI (or a local path): the previous folder there is kept
    until the new one is complete (`marker`: the file that marks it complete)."""
    return upload_model(local, *resolve(uri), marker=marker)


def local_copy(location, dest: Optional[str | os.PathLike] = None, model: bool = False) -> Path:
    """A local folder with the contents of `location`: a local path as it is; a URI downloaded to
    `dest` (default `$DMM_HOME/cache/download/<name>-<hash>`, refreshed by every call). `model`: a model
    folder (a merged model), read as `model_to_read` says: a half-uploaded one is never downloaded."""
    if not is_uri(location):
        return Path(location)
    from dmm_ray.paths import download_dir as default_dest

    fs, path = resolve(str(location))
    if model:
        path = model_to_read(fs, path, str(location))
    elif fs.get_file_info(path).type != pafs.FileType.Directory:
        raise FileNotFoundError(f"{location} does not exist (or is not a folder)")
    return download_dir(fs, path, dest if dest is not None else default_dest(str(location)), model=str(location) if model else None)


class fetched:
    """`with fetched(location) as folder:` a local folder for `location`; a URI is downloaded to a
    temporary folder deleted on exit (for what is read into memory at once: a stage's student, a
    training state). Safe when several processes on one node fetch the same URI."""

    def __init__(self, location, model: bool = False):
        self.location = location
        self.model = model  # a model folder: see local_copy
        self._tmp: Optional[str] = None

    def __enter__(self) -> Path:
        if not is_uri(self.location):
            return Path(self.location)
        import tempfile

        self._tmp = tempfile.mkdtemp(prefix="dmm-fetch-")
        try:
            return local_copy(self.location, Path(self._tmp) / "folder", model=self.model)
        except BaseException:  # __exit__ runs only after __enter__ returned: a refused or failed download left its folder
            self.__exit__()
            raise

    def __exit__(self, *exc) -> None:
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
