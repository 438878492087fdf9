"""Feature statistics for named image sets, with the teacher cache in front of the generators."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Sequence

from dmm_ray.evaluation.cache import CachedStats, StatsCache, stats_cache_key
from dmm_ray.evaluation.config import EvalConfig
from dmm_ray.evaluation.extractors import as_factory, extractor_name
from dmm_ray.evaluation.fid import FeatureStats
from dmm_ray.evaluation.generation import GenerationJob, WorkerPlan, run_plans

log = logging.getLogger(__name__)


@dataclass
class ModelSource:
    """A model to sample from: a name, a picklable pipeline factory and, for frozen models, a
    content checksum (`teacher_checksum(spec)`) that makes its statistics cacheable."""

    name: str
    pipeline_factory: Callable[[], Any]
    checksum: str | None = None


@dataclass
class StatsRequest:
    """Statistics of `source` on prompts x seed set `seed_set`, with extra pipeline kwargs."""

    key: str
    source: ModelSource
    seed_set: Literal["a", "b"]
    call_kwargs: dict = field(default_factory=dict)
    num_previews: int = 0
    worker_group: str | None = None  # requests with the same group share one worker (default: the source's name)


@dataclass
class StatsRun:
    stats: dict[str, CachedStats]
    generated: list[str]  # request keys that had to generate images (cache misses)


def collect_stats(requests: Sequence[StatsRequest], config: EvalConfig, extractor, prompts: Sequence[str]) -> StatsRun:
    """Look requests up in the cache (sources with a checksum only), generate the rest, fill the cache."""
    factory = as_factory(extractor)
    ext_name = extractor_name(extractor)
    cache = StatsCache(config.cache_dir)
    seeds = {s: config.seeds(s, len(prompts)) for s in ("a", "b")}
    out: dict[str, CachedStats] = {}
    misses: dict[str, tuple[StatsRequest, str | None, dict | None]] = {}
    for req in requests:
        cache_key = material = None
        if req.source.checksum is not None:
            cache_key, material = stats_cache_key(req.source.checksum, prompts, seeds[req.seed_set], config.sampler, ext_name, req.call_kwargs)
            hit = cache.load(cache_key)
            if hit is not None and hit.previews.shape[0] >= req.num_previews:
                log.info("FID cache hit for %s", req.key)
                out[req.key] = hit
                continue
        misses[req.key] = (req, cache_key, material)

    plans: dict[tuple[str, int], WorkerPlan] = {}
    for req, _, _ in misses.values():
        group = req.worker_group or req.source.name
        # one worker per group and model: a teacher named like another source (e.g. "student") keeps its own pipeline
        key = (group, id(req.source.pipeline_factory))
        plan = plans.setdefault(key, WorkerPlan(name=group, pipeline_factory=req.source.pipeline_factory, jobs=[]))
        plan.jobs.append(
            GenerationJob(
                key=req.key,
                prompts=tuple(prompts),
                seeds=tuple(tuple(s) for s in seeds[req.seed_set]),
                call_kwargs=dict(req.call_kwargs),
                num_previews=req.num_previews,
            )
        )
    kept: dict[str, CachedStats] = {}

    def keep(o) -> None:
        # Cached as each job finishes, not once all have: a Ctrl-C (or a job that fails) later in the
        # run kept none of the teachers already sampled, and the re-run sampled them all again.
        _, cache_key, material = misses[o.key]
        cached = kept[o.key] = CachedStats(stats=FeatureStats.from_features(o.features), previews=o.previews)
        if cache_key is not None:
            cache.save(cache_key, material, cached.stats, cached.previews)

    outputs = run_plans(
        list(plans.values()),
        factory,
        config.sampler,
        config.batch_size,
        use_ray=config.use_ray,
        num_cpus=config.worker_num_cpus,
        num_gpus=config.worker_num_gpus,
        device=config.device,
        on_result=keep,
    )
    for key in misses:
        if key not in kept:
            keep(outputs[key])
        out[key] = kept[key]
    for key, cached in out.items():  # hand out exactly the previews each request asked for
        want = next(r.num_previews for r in requests if r.key == key)
        cached.previews = cached.previews[:want]
    return StatsRun(stats=out, generated=list(misses))
