"""The few-step model's scheduler: one home for how it is built from the merged model's schedule."""

from __future__ import annotations

import inspect
from pathlib import Path


def few_step_scheduler(model_dir: str | Path, fast):
    """`fast.sampler`'s scheduler (TCD or LCM) on the merged model's training noise schedule, its
    timesteps on the solver grid the student was trained on (original_inference_steps = N)."""
    import diffusers

    from dmm_ray.defaults import FEW_STEP_SCHEDULERS

    scheduler_cls = getattr(diffusers, FEW_STEP_SCHEDULERS[fast.sampler])
    saved = scheduler_cls.load_config(Path(model_dir) / "scheduler")
    config = getattr(diffusers, saved["_class_name"]).from_config(saved).config  # with that class's defaults filled in, as the pipeline loads it
    keep = inspect.signature(scheduler_cls.__init__).parameters  # the training schedule's keys only (no DPM-Solver ones)
    return scheduler_cls.from_config(
        {k: v for k, v in config.items() if k in keep},
        timestep_scaling=fast.timestep_scaling,
        original_inference_steps=fast.num_ddim_timesteps,
    )
