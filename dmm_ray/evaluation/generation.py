"""Image generation for FID: jobs, the worker that runs them, and the Ray fan-out.

A worker owns one pipeline (built by a *pipeline factory*, a picklable zero-argument callable,
e.g. `partial(load_teacher_pipeline, spec)` or `partial(DMMPipeline.from_pretrained, path)`) and
one feature extractor. It turns each `GenerationJob` (prompts x seeds, plus extra call kwargs
such as `style=`) into FID features right away, so only (n, D) features and a few preview
images leave the worker — never the full image set.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from dmm_ray.devices import resolve_device
from dmm_ray.evaluation.config import SamplerConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GenerationJob:
    """Images for prompts[p] with seeds[p][k]; `call_kwargs` go to the pipeline call (e.g. style=)."""

    key: str  # caller's id for the result, e.g. "student/anime" or "teacher/anime/B"
    prompts: tuple[str, ...]
    seeds: tuple[tuple[int, ...], ...]
    call_kwargs: dict = field(default_factory=dict)
    num_previews: int = 0  # first-seed images of the first `num_previews` prompts are returned

    @property
    def num_images(self) -> int:
        return sum(len(s) for s in self.seeds)


@dataclass
class JobOutput:
    key: str
    features: np.ndarray  # (n, D) float64
    previews: np.ndarray  # (num_previews, H, W, 3) uint8
    num_images: int


def _to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) in [0, 1] -> (B, H, W, 3) uint8."""
    return (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def generate_images(pipe, prompts: Sequence[str], seeds: Sequence[int], sampler: SamplerConfig, call_kwargs: dict | None = None) -> torch.Tensor:
    """One pipeline call: prompts[b] with its own CPU generator seeds[b] -> (B, 3, H, W) in [0, 1].

    A CPU generator per image makes each image depend only on its seed (not on the batch it
    landed in, nor on the device), so teacher caches stay valid across batch sizes and machines.
    """
    generators = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
    kwargs = dict(
        prompt=list(prompts),
        negative_prompt=[sampler.negative_prompt] * len(prompts),
        num_inference_steps=sampler.num_inference_steps,
        guidance_scale=sampler.guidance_scale,
        generator=generators,
        output_type="pt",
    )
    if sampler.height is not None:
        kwargs["height"] = sampler.height
    if sampler.width is not None:
        kwargs["width"] = sampler.width
    kwargs.update(call_kwargs or {})
    with torch.no_grad():
        out = pipe(**kwargs)
    images = out.images if hasattr(out, "images") else out[0]
    if isinstance(images, np.ndarray):  # a pipeline that ignored output_type="pt"
        images = torch.from_numpy(images).permute(0, 3, 1, 2)
    return images.float()  # (B, 3, H, W) in [0, 1]


class GenerationWorker:
    """Hosts one pipeline + one extractor; runs generation jobs. Used in-process or as a Ray actor."""

    def __init__(self, pipeline_factory: Callable[[], Any], extractor_factory: Callable[[], Any], device: str = "auto"):
        from dmm_ray._quiet import in_ray_actor, no_loading_bars

        if in_ray_actor():  # the driver shows the evaluation's progress; per-actor loading bars interleave
            no_loading_bars()
        self.device = resolve_device(device)
        self.pipe = pipeline_factory()
        if hasattr(self.pipe, "to"):
            self.pipe = self.pipe.to(self.device)
        if hasattr(self.pipe, "set_progress_bar_config"):
            self.pipe.set_progress_bar_config(disable=True)
        self.extractor = extractor_factory()

    def run(self, jobs: Sequence[GenerationJob], sampler: SamplerConfig, batch_size: int, progress: bool = False) -> list[JobOutput]:
        return [self.run_job(job, sampler, batch_size, progress) for job in jobs]

    def run_job(self, job: GenerationJob, sampler: SamplerConfig, batch_size: int, progress: bool = False) -> JobOutput:
        pairs = [(p, s) for p, seeds in zip(job.prompts, job.seeds) for s in seeds]  # prompt-major order
        preview_at = {sum(len(s) for s in job.seeds[:p]): p for p in range(min(job.num_previews, len(job.prompts)))}
        feats, previews = [], {}
        for start in tqdm(range(0, len(pairs), batch_size), desc=job.key, disable=not progress, leave=False):
            chunk = pairs[start : start + batch_size]
            images = generate_images(self.pipe, [p for p, _ in chunk], [s for _, s in chunk], sampler, job.call_kwargs)
            feats.append(self.extractor(images.cpu()).detach().cpu().double().numpy())  # (b, D)
            for idx in range(start, start + len(chunk)):
                if idx in preview_at:
                    previews[preview_at[idx]] = _to_uint8(images[idx - start : idx - start + 1])[0]
        preview_arr = np.stack([previews[p] for p in sorted(previews)]) if previews else np.zeros((0, 1, 1, 3), np.uint8)
        return JobOutput(key=job.key, features=np.concatenate(feats), previews=preview_arr, num_images=len(pairs))


@dataclass
class WorkerPlan:
    """One worker: its pipeline factory and the jobs it runs."""

    name: str
    pipeline_factory: Callable[[], Any]
    jobs: list[GenerationJob]


def run_plans(
    plans: Sequence[WorkerPlan],
    extractor_factory: Callable[[], Any],
    sampler: SamplerConfig,
    batch_size: int,
    use_ray: bool = True,
    num_cpus: float = 1.0,
    num_gpus: float = 0.0,
    device: str = "auto",
    on_result: Callable[[JobOutput], None] | None = None,
) -> dict[str, JobOutput]:
    """Run every plan's jobs; with Ray, one actor per plan (fan-out), else one after another here.
    `on_result` gets each job's output as soon as it is done (the teacher cache saves it there)."""
    plans = [p for p in plans if p.jobs]
    results: dict[str, JobOutput] = {}
    total = sum(len(p.jobs) for p in plans)
    if not plans:
        return results
    bar = tqdm(total=total, desc="FID generation (jobs)", unit="job")
    try:
        if not use_ray:
            for plan in plans:
                worker = GenerationWorker(plan.pipeline_factory, extractor_factory, device)
                for job in plan.jobs:
                    results[job.key] = worker.run_job(job, sampler, batch_size)
                    if on_result is not None:
                        on_result(results[job.key])
                    bar.update(1)
                del worker
            return results

        import ray

        from dmm_ray.ray_session import ensure_ray

        ensure_ray()
        actor_cls = ray.remote(num_cpus=num_cpus, num_gpus=num_gpus)(GenerationWorker)
        pending: dict[Any, tuple[Any, WorkerPlan, int]] = {}
        actors = []
        try:
            for plan in plans:
                actor = actor_cls.remote(plan.pipeline_factory, extractor_factory, device)
                actors.append(actor)
                # One call per job so progress advances per job; the actor runs them in order.
                for i, job in enumerate(plan.jobs):
                    pending[actor.run_job.remote(job, sampler, batch_size)] = (actor, plan, i)
            remaining_per_actor = {id(a): sum(1 for v in pending.values() if v[0] is a) for a in actors}
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1)
                actor, plan, _ = pending.pop(done[0])
                out = ray.get(done[0])
                results[out.key] = out
                if on_result is not None:
                    on_result(out)
                bar.update(1)
                remaining_per_actor[id(actor)] -= 1
                if remaining_per_actor[id(actor)] == 0:
                    # Free its CPUs/GPU now so actors still waiting for resources can start.
                    ray.kill(actor)
        finally:
            for actor in actors:
                ray.kill(actor)
        return results
    finally:
        bar.close()
