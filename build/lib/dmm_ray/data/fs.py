"""One way to address files: a local path or any pyarrow filesystem URI (file://, s3://, gs://, hdfs://)."""

from __future__ import annotations

import os
import posixpath
from typing import Iterable

import pyarrow.fs as pafs


def resolve(path_or_uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it). Plain local paths (relative too) map to the local filesystem."""
    if "://" not in path_or_uri:
        return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(path_or_uri))
    try:
        return pafs.FileSystem.from_uri(path_or_uri)
    except Exception as e:  # pyarrow raises ArrowInvalid / OSError with terse messages
        raise ValueError(f"cannot open filesystem for {path_or_uri!r}: {e}") from e


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
    """Write to `path.tmp` then move into place, so a crash never leaves a half-written `path`."""
    tmp = path + ".tmp"
    with fs.open_output_stream(tmp) as f:
        f.write(data)
    fs.move(tmp, path)
