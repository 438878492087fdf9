"""Where a merge's outputs live: its local work folder (the output_dir, or a URI output_dir's staging folder),
its few-step stage's folder and the synthesized sets that stage reads. A leaf of dmm_ray.merge and dmm_ray.fast.job, which both need them (the
merge runs the few-step stage; jobs/fast.py finds the folder the merge's stage wrote)."""

from __future__ import annotations

from pathlib import Path

from dmm_ray import paths
from dmm_ray.config import MergeConfig
from dmm_ray.data import fs as fsu


def output_location(cfg: MergeConfig) -> tuple[Path, str | None]:
    """(local folder the driver works in, output_dir URI or None). A local output_dir is both; for a
    URI (s3://, gs://, file://) the driver stages its local work in `$DMM_HOME/staging/<name>-<hash>`
    (lock, stage students, the merged model and evaluation outputs before upload), while the
    resumable state (Ray Train checkpoints, synthesized sets, fingerprints.json) and the uploaded
    results live at the URI."""
    fsu.check_location("output_dir", cfg.output_dir)
    if fsu.is_uri(cfg.output_dir):
        return paths.staging_dir(cfg.output_dir), cfg.output_dir.rstrip("/")
    return Path(cfg.output_dir), None


def fast_folder(cfg: MergeConfig, local: Path) -> Path:
    """The merge's few-step stage folder: fast.output_dir, else <local work folder>/fast (a URI
    output_dir's staging folder: the few-step model is not uploaded)."""
    return Path(cfg.fast.output_dir) if cfg.fast.output_dir else local / "fast"


def fast_synthesized(cfg: MergeConfig) -> str | None:
    """fast.synthesized as the few-step stage reads it, the merge's stage and jobs/fast.py alike: as set; else, for
    an output_dir URI whose teachers' synthesized sets the stage reads (fast.synthetic_fraction > 0, synthetic_source
    teachers), the URI's <output_dir>/synthesized, where the merge writes them (the model it distills is the staging
    folder's merged/, with no sets beside it); else None: beside the merged model (fast.job.synthesized_shards)."""
    f = cfg.fast
    remote = output_location(cfg)[1]
    if remote and not f.synthesized and f.synthetic_fraction > 0 and f.synthetic_source == "teachers":
        return fsu.location_join(remote, "synthesized")
    return f.synthesized
