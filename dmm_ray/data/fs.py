"""One way to address files: a local path or any pyarrow filesystem URI (file://, s3://, gs://, hdfs://).

THE resolver of locations (`resolve`: a location -> (pyarrow FileSystem, path)), and the helpers that
move whole folders between object storage and a local folder (`upload_dir`, `download_dir`,
`local_copy`): the merge job's `output_dir`, `data.shards` and merged models go through here.
Plain local paths map to pyarrow's LocalFileSystem and behave exactly like the local folder.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import os
import posixpath
import re
import shutil
import uuid
from pathlib import Path
from typing import Iterable, Optional

import pyarrow.fs as pafs

# schemes pyarrow.fs.FileSystem.from_uri opens (object stores need pyarrow built with them, and credentials)
SUPPORTED_SCHEMES = ("file", "s3", "gs", "gcs", "hdfs", "viewfs", "abfs", "abfss")


def is_uri(location) -> bool:
    return "://" in str(location)


def check_location(setting: str, location: str) -> None:
    """A clear error, naming `setting`, for a location that is neither a local path nor a URI that
    pyarrow can open (`s3:/b` / `s3:` would otherwise become a local folder named `s3:`). No network."""
    from dmm_ray.paths import check_not_mangled

    check_not_mangled(location, setting)
    if is_uri(location):
        scheme = location.split("://", 1)[0].lower()
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
    if uri.split("://", 1)[0].lower() == "file" and "?" in uri:
        if any(option.split("=", 1)[0] != "use_mmap" for option in uri.split("?", 1)[1].split("&")):
            return (
                "'?' starts a URI query, which pyarrow drops from a file:// URI with everything after it (its one option is use_mmap); "
                "write a '?' in a name as %3F"
            )
    return None


def require_local(setting: str, location) -> Path:
    """`location` as a local Path, or a clear error naming `setting` when it is a URI."""
    if location is not None and is_uri(location):
        raise ValueError(
            f"{setting} {str(location)!r} is a URI, but {setting} must be a local folder "
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


def download_dir(fs: pafs.FileSystem, path: str, local: str | os.PathLike) -> Path:
    """Copy the folder `path` on `fs` into the local folder `local` (replaced: downloaded to a sibling
    first, then moved into place, so an interrupted download never passes for a complete one)."""
    local = Path(local)
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        raise FileNotFoundError(f"{path!r} is not a folder on {fs.type_name} filesystem")
    from dmm_ray.output_lock import left_by_killed

    for stale in left_by_killed(local.parent, f"{glob.escape(local.name)}.part-*", rf"{re.escape(local.name)}\.part-(\d+)-[0-9a-f]+"):
        shutil.rmtree(stale, ignore_errors=True)  # a killed download's (its own name: nothing else removes it)
    tmp = local.with_name(f"{local.name}.part-{os.getpid()}-{uuid.uuid4().hex[:8]}")  # the pid: see left_by_killed
    aside = local.with_name(f"{local.name}.part-{os.getpid()}-{uuid.uuid4().hex[:8]}")  # the earlier copy, removed at the end
    tmp.mkdir(parents=True)
    try:
        for info in fs.get_file_info(pafs.FileSelector(path, recursive=True)):
            if info.type != pafs.FileType.File:
                continue
            # some filesystems (fsspec's) list "/bucket/x" for "bucket/x": compare without the leading "/"
            rel = posixpath.relpath(info.path.lstrip("/"), path.strip("/") or ".")
            dest = tmp / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            pafs.copy_files(info.path, str(dest), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
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


def upload(local: str | os.PathLike, uri: str, last: Iterable[str] = ("model_index.json",)) -> list[str]:
    """`upload_dir` to a location given as a URI (or a local path)."""
    fs, path = resolve(uri)
    return upload_dir(local, fs, path, last)


def local_copy(location, dest: Optional[str | os.PathLike] = None) -> Path:
    """A local folder with the contents of `location`: a local path as it is; a URI downloaded to
    `dest` (default `$DMM_HOME/cache/download/<name>-<hash>`, refreshed by every call)."""
    if not is_uri(location):
        return Path(location)
    from dmm_ray.paths import download_dir as default_dest

    fs, path = resolve(str(location))
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        raise FileNotFoundError(f"{location} does not exist (or is not a folder)")
    return download_dir(fs, path, dest if dest is not None else default_dest(str(location)))


class fetched:
    """`with fetched(location) as folder:` a local folder for `location`; a URI is downloaded to a
    temporary folder deleted on exit (for what is read into memory at once: a stage's student, a
    training state). Safe when several processes on one node fetch the same URI."""

    def __init__(self, location):
        self.location = location
        self._tmp: Optional[str] = None

    def __enter__(self) -> Path:
        if not is_uri(self.location):
            return Path(self.location)
        import tempfile

        self._tmp = tempfile.mkdtemp(prefix="dmm-fetch-")
        return local_copy(self.location, Path(self._tmp) / "folder")

    def __exit__(self, *exc) -> None:
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
