"""Test hook: `distill.fail_at_step` kills one worker once, to prove a merge survives a lost worker.

The fault-tolerance test (tests/test_merge.py) sets it; a marker file under output_dir makes the
fault happen once, so the restarted worker group resumes from the last checkpoint and finishes.
"""

from __future__ import annotations

import os
import time


def maybe_kill_worker(cfg, stage: str, step: int, rank: int, world: int) -> None:
    """Exit this process at `distill.fail_at_step` on worker 1 (worker 0 alone), the first time only."""
    if cfg.distill.fail_at_step is None or step != cfg.distill.fail_at_step or rank != min(1, world - 1):
        return
    from dmm_ray.data import fs as fsu

    marker_fs, marker = fsu.resolve(str(fsu.location_join(cfg.output_dir, f".failed_once_{stage}")))
    if fsu.exists(marker_fs, marker):
        return
    marker_fs.create_dir(marker.rsplit("/", 1)[0], recursive=True)
    fsu.write_bytes_atomic(marker_fs, marker, str(step).encode())
    print(f"[rank {rank}] fault injection: killing this worker at step {step}", flush=True)
    time.sleep(10)  # crash a moment *after* the last checkpoint was reported, as a real fault would
    os._exit(1)
