"""On-disk cache of teacher feature statistics.

Teachers are frozen, so their FID statistics depend only on (teacher checksum, prompts, seeds,
sampler settings, extractor). Keying on exactly those means re-evaluations and incremental
merges regenerate only the student's images. Entries are `<key>.npz` (mu, sigma, n, previews)
plus `<key>.json` (the human-readable key material), written atomically.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from dmm_ray.evaluation.config import SamplerConfig
from dmm_ray.evaluation.fid import FeatureStats
from dmm_ray.output_lock import left_by_killed

CACHE_FORMAT = 2


@dataclass
class CachedStats:
    stats: FeatureStats
    previews: np.ndarray  # (k, H, W, 3) uint8


def stats_cache_key(
    model_key: str,
    prompts: Sequence[str],
    seeds: Sequence[Sequence[int]],
    sampler: SamplerConfig,
    extractor_name: str,
    call_kwargs: dict | None = None,
) -> tuple[str, dict]:
    """Key over everything that decides the images and features (not how many previews are kept:
    a cached entry with too few previews is treated as a miss by the caller)."""
    material = {
        "format": CACHE_FORMAT,
        "model": model_key,
        "prompts": list(prompts),
        "seeds": [list(map(int, s)) for s in seeds],
        "sampler": sampler.model_dump(),
        "extractor": extractor_name,
        "call_kwargs": call_kwargs or {},
    }
    digest = hashlib.sha256(json.dumps(material, sort_keys=True, default=str).encode()).hexdigest()
    return digest, material


class StatsCache:
    def __init__(self, root: str | Path):
        self.root = Path(root)

    def _paths(self, key: str) -> tuple[Path, Path]:
        return self.root / f"{key}.npz", self.root / f"{key}.json"

    def load(self, key: str) -> CachedStats | None:
        npz, _ = self._paths(key)
        if not npz.is_file():
            return None
        try:
            with np.load(npz) as d:
                return CachedStats(stats=FeatureStats.from_npz_dict(d), previews=np.array(d["previews"]))
        except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile):
            return None  # a torn or foreign file (empty: EOFError; cut short: BadZipFile): treat as a miss and regenerate

    def save(self, key: str, material: dict, stats: FeatureStats, previews: np.ndarray) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        npz, meta = self._paths(key)
        # a name of its own (not `<key>.npz.tmp`): two evaluations filling the same entry at once
        # (a merge's and a jobs/evaluate.py) would otherwise write into one file
        for stale in left_by_killed(self.root, "tmp-*.npz.tmp", r"tmp-(\d+)-.*\.npz\.tmp"):  # a killed save's, full-size
            stale.unlink(missing_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=f"tmp-{os.getpid()}-", suffix=".npz.tmp")  # the pid: see left_by_killed
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(f, previews=previews, **stats.to_npz_dict())
            os.replace(tmp, npz)
        except BaseException:  # a failed write or a Ctrl-C: each left a full-size, uniquely named .npz.tmp behind
            Path(tmp).unlink(missing_ok=True)
            raise
        meta.write_text(json.dumps(material, indent=1, default=str))
