"""Latent parquet shards on disk or object storage, committed so a half-written shard is never
mistaken for a finished one.

Layout of a shard folder:
    _encode.json             what produced the shards (resolution, VAE, dtype, shard size, record count)
    _complete.json           written by the encode LAST, once every shard is committed:
                             {"shards", "rows", "records"} (what a finished set holds)
    shard-00000.parquet      columns latent list<float32> (C*h*w, scaled), latent_shape list<int32>
                             ([C, h, w]), caption string, source_id string (+ optional style int)
    shard-00000.done.json    commit marker, written LAST: {"rows", "bytes", "skipped": {reason: n}}

A shard counts as complete only if its marker exists and the parquet footer's row count and
file size match the marker. The parquet is written to `.tmp` and moved into place first, so a
crash at any point leaves either no marker (shard redone) or a complete shard. A crash mid-encode
leaves some shards committed and no `_complete.json`: `shard_set_state` says the set is partial, so
the merge finishes the encode instead of training on a subset.
"""

from __future__ import annotations

import io
import json
import logging
import posixpath
import re
from collections import Counter
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from dmm_ray.data import fs as fsu

log = logging.getLogger(__name__)

META_NAME = "_encode.json"
MANIFEST_NAME = "_complete.json"
_SHARD_RE = re.compile(r"shard-(\d+)\.parquet")  # the whole file name (fullmatch), see shard_indices

LATENT_SCHEMA = pa.schema(
    [
        ("latent", pa.list_(pa.float32())),
        ("latent_shape", pa.list_(pa.int32())),
        ("caption", pa.string()),
        ("source_id", pa.string()),
    ]
)


def shard_path(root: str, index: int) -> str:
    return fsu.join(root, f"shard-{index:05d}.parquet")


def marker_path(root: str, index: int) -> str:
    return fsu.join(root, f"shard-{index:05d}.done.json")


def latent_table(latents: np.ndarray, captions: Sequence[str], source_ids: Sequence[str], styles: Optional[Sequence[int]] = None) -> pa.Table:
    """(N, C, h, w) float latents (already scaled) + per-row text -> a table in the shard schema."""
    latents = np.asarray(latents, dtype=np.float32)
    if latents.ndim != 4:
        raise ValueError(f"latents must be (N, C, h, w), got shape {latents.shape}")
    n, shape = latents.shape[0], list(latents.shape[1:])
    flat = pa.array(latents.reshape(-1), type=pa.float32())
    offsets = pa.array(np.arange(n + 1, dtype=np.int32) * int(np.prod(shape)), type=pa.int32())
    columns = {
        "latent": pa.ListArray.from_arrays(offsets, flat),
        "latent_shape": pa.array([shape] * n, type=pa.list_(pa.int32())),
        "caption": pa.array(list(captions), type=pa.string()),
        "source_id": pa.array(list(source_ids), type=pa.string()),
    }
    if styles is not None:
        columns["style"] = pa.array(list(styles), type=pa.int64())
    return pa.table(columns)


def empty_table() -> pa.Table:
    return LATENT_SCHEMA.empty_table()


def write_shard(fs: pafs.FileSystem, root: str, index: int, table: pa.Table, skipped: Optional[dict] = None) -> None:
    """Write and commit one shard (parquet via .tmp + move, then the marker)."""
    path = shard_path(root, index)
    fs.create_dir(root, recursive=True)
    buf = io.BytesIO()
    pq.write_table(table, buf)
    data = buf.getvalue()
    fsu.write_bytes_atomic(fs, path, data)
    marker = {"rows": table.num_rows, "bytes": len(data), "skipped": dict(skipped or {})}
    fsu.write_bytes_atomic(fs, marker_path(root, index), json.dumps(marker).encode())


def read_marker(fs: pafs.FileSystem, root: str, index: int) -> Optional[dict]:
    try:
        marker = json.loads(fsu.read_bytes(fs, marker_path(root, index)))
    except (FileNotFoundError, OSError, json.JSONDecodeError):
        return None
    return marker if isinstance(marker, dict) and {"rows", "bytes"} <= marker.keys() else None


def is_shard_complete(fs: pafs.FileSystem, root: str, index: int) -> bool:
    """True only for a committed shard whose parquet still matches its marker."""
    marker = read_marker(fs, root, index)
    if marker is None:
        return False
    path = shard_path(root, index)
    info = fs.get_file_info(path)
    if info.type != pafs.FileType.File or info.size != marker["bytes"]:
        return False
    try:
        with fs.open_input_file(path) as f:
            return pq.ParquetFile(f).metadata.num_rows == marker["rows"]
    except Exception:  # truncated footer, not parquet at all
        return False


def shard_indices(fs: pafs.FileSystem, root: str) -> list[int]:
    """Indices of every shard-*.parquet present (complete or not), sorted. Only the exact names `shard_path`
    writes count: a stray `backup-shard-00000.parquet` or `shard-0.parquet` stood for shard 0 a second
    time, and the stream read that shard's rows twice."""
    found = set()
    for p in fsu.list_files(fs, root, (".parquet",)):
        name = posixpath.basename(p)
        if (m := _SHARD_RE.fullmatch(name)) and posixpath.basename(shard_path(root, int(m.group(1)))) == name:
            found.add(int(m.group(1)))
    return sorted(found)


def set_shard_indices(fs: pafs.FileSystem, root: str) -> tuple[list[int], list[int]]:
    """(the set's shard indices present, those beyond it): a set with a shard count (`expected_shards`) is
    shards 0..count-1; a shard-*.parquet beyond it (copied in, left by another encode) is not its, and
    was read, counted and fingerprinted beside the set that `shard_set_state` called complete without it."""
    present = shard_indices(fs, root)
    count = expected_shards(fs, root)[0]
    return ([i for i in present if i < count], [i for i in present if i >= count]) if count is not None else (present, [])


def expected_shards(fs: pafs.FileSystem, root: str) -> tuple[Optional[int], Optional[int]]:
    """(shards, rows) the set under `root` holds: its manifest's (`_complete.json`: the finished encode),
    else the shard count of the encode that started (`_encode.json`: records / shard_size; rows unknown),
    else (None, None): shards with neither record (written by other code) are whatever is there."""
    manifest, meta = read_manifest(fs, root), read_meta(fs, root)
    if manifest is not None:
        return int(manifest["shards"]), int(manifest["rows"])
    if meta and meta.get("records") and meta.get("shard_size"):
        return -(-int(meta["records"]) // int(meta["shard_size"])), None
    return None, None


def complete_shards(shards: str, *, require: bool = True) -> tuple[pafs.FileSystem, list[str]]:
    """(filesystem, paths) of the set's complete, non-empty shards under `shards`; incomplete ones and
    those beyond the set (`set_shard_indices`) are logged and left out. With `require`, no complete
    shard at all is an error."""
    fs, root = fsu.resolve(shards)
    paths, incomplete = [], []
    ours, beyond = set_shard_indices(fs, root)
    if beyond:
        log.warning(
            "ignoring %d shard(s) in %s beyond its encoded set (shards 0-%d, by its %s / %s): %s",
            len(beyond),
            shards,
            expected_shards(fs, root)[0] - 1,
            MANIFEST_NAME,
            META_NAME,
            beyond[:10],
        )
    for i in ours:
        if is_shard_complete(fs, root, i):
            if read_marker(fs, root, i)["rows"] > 0:
                paths.append(shard_path(root, i))
        else:
            incomplete.append(i)
    if incomplete:
        log.warning("ignoring %d incomplete shard(s) in %s: %s (re-run encode_latents to finish them)", len(incomplete), shards, incomplete[:10])
    if require and not paths:
        raise FileNotFoundError(f"no complete latent shards in {shards!r} (run jobs/encode_latents.py first)")
    return fs, paths


def skipped_totals(fs: pafs.FileSystem, root: str, indices: Sequence[int]) -> Counter:
    """Sum of the per-reason skip counts recorded in the markers of `indices`."""
    total: Counter = Counter()
    for i in indices:
        marker = read_marker(fs, root, i)
        if marker:
            total.update(marker.get("skipped", {}))
    return total


def read_meta(fs: pafs.FileSystem, root: str) -> Optional[dict]:
    try:
        return json.loads(fsu.read_bytes(fs, fsu.join(root, META_NAME)))
    except (FileNotFoundError, OSError):
        return None


def write_meta(fs: pafs.FileSystem, root: str, meta: dict) -> None:
    fs.create_dir(root, recursive=True)
    fsu.write_bytes_atomic(fs, fsu.join(root, META_NAME), json.dumps(meta, indent=1, sort_keys=True).encode())


def write_manifest(fs: pafs.FileSystem, root: str, shards: int, rows: int, records: int) -> None:
    """Record a finished encode: `shards` shards (0..shards-1) holding `rows` latents of `records` records."""
    manifest = {"shards": shards, "rows": rows, "records": records}
    fsu.write_bytes_atomic(fs, fsu.join(root, MANIFEST_NAME), json.dumps(manifest, indent=1).encode())


def read_manifest(fs: pafs.FileSystem, root: str) -> Optional[dict]:
    try:
        manifest = json.loads(fsu.read_bytes(fs, fsu.join(root, MANIFEST_NAME)))
    except (FileNotFoundError, OSError, json.JSONDecodeError):
        return None
    return manifest if isinstance(manifest, dict) and {"shards", "rows"} <= manifest.keys() else None


def remove_manifest(fs: pafs.FileSystem, root: str) -> None:
    try:
        fs.delete_file(fsu.join(root, MANIFEST_NAME))
    except (FileNotFoundError, OSError):
        pass


@dataclass
class ShardSetState:
    """`status`: "complete" (safe to train on), "partial" (an encode that did not finish) or "empty"."""

    status: str
    shards: int  # complete shards present
    rows: int  # latents in them
    expected_shards: Optional[int] = None
    expected_rows: Optional[int] = None

    def detail(self) -> str:
        if self.status == "empty":
            return "no complete shards"
        text = f"{self.shards} of {self.expected_shards if self.expected_shards is not None else '?'} shards complete"
        if self.expected_rows is not None:
            text += f", {self.rows} of {self.expected_rows} latents"
        return text


def shard_set_state(shards: str) -> ShardSetState:
    """Is the latent set under `shards` whole? Checked against `_complete.json` (shard and row count of
    the finished encode); without it against `_encode.json` (an encode that started: its record count
    fixes the shard count; sets encoded before the manifest existed pass when every shard is there).
    Shards with neither record (written by other code) count as complete when any is."""
    fs, root = fsu.resolve(shards)
    try:
        present = shard_indices(fs, root)
    except (FileNotFoundError, OSError):
        present = []
    done = {i: read_marker(fs, root, i)["rows"] for i in present if is_shard_complete(fs, root, i)}
    expected, expected_rows = expected_shards(fs, root)
    if expected is None:
        rows = sum(done.values())
        return ShardSetState("complete" if rows else "empty", len(done), rows)
    ours = {i: n for i, n in done.items() if i < expected}  # (as set_shard_indices)
    rows = sum(ours.values())
    whole = len(ours) == expected and (expected_rows is None or rows == expected_rows)
    status = "complete" if whole else ("partial" if ours else "empty")
    return ShardSetState(status, len(ours), rows, expected, expected_rows)
