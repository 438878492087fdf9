"""Finished jobs: a job that finished every stage records what it was asked in its folder, so the
same job submitted again does nothing (no second save, evaluation or MLflow model version).

The record holds the job's whole request (`asked`: its config as JSON, and whatever else decides
its result) and what it made (`info`: where the model is, its MLflow run or model URI). It counts
only while the model it names is still there; a job that starts anything removes it first, since
from then on the folder's model may change.
"""

from __future__ import annotations

import json
from pathlib import Path


def finished(folder: Path, name: str, asked: dict, models: list[Path], same=None) -> dict | None:
    """The record `name` in `folder` of a job that finished with exactly `asked` (compared as JSON; or
    by `same(recorded, asked)`, both as JSON), when every file in `models` (one file of each model it
    made) still exists; None otherwise."""
    try:
        record = json.loads((Path(folder) / name).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or not all(Path(m).is_file() for m in models):
        return None
    recorded, asked = record.get("asked"), _as_json(asked)
    if not (same(recorded, asked) if same and isinstance(recorded, dict) else recorded == asked):
        return None
    return record


def record_finished(folder: Path, name: str, asked: dict, **info) -> None:
    import pyarrow.fs as pafs

    from dmm_ray.data.fs import write_bytes_atomic

    write_bytes_atomic(pafs.LocalFileSystem(), str(Path(folder) / name), json.dumps({"asked": _as_json(asked), **info}, indent=1).encode())


def forget(folder: Path, name: str) -> None:
    (Path(folder) / name).unlink(missing_ok=True)


def _as_json(value):
    return json.loads(json.dumps(value))
