"""Glue between the merge driver and MLflow tracking (replaced by dmm_ray.tracking when evaluation lands)."""

from __future__ import annotations


class NullTracker:
    def start_stage(self, name, cfg):
        return None

    def finish_stage(self, cfg, result):
        return None


def make_tracker(cfg):
    return NullTracker()
