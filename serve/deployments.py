"""Ray Serve deployments: the batched style model and the FastAPI style-router ingress.

StyleModel takes ONE sample per call and `@serve.batch` gathers concurrent samples - from
different requests, prompts and styles - into one forward (the style is a per-sample
embedding row, so nothing forces a batch to share a style).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import Counter, defaultdict, deque
from typing import Sequence

import numpy as np
from ray import serve
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

from serve.config import ServeConfig
from serve.model import StyleModelBackend
from serve.router import ModelInfo, create_api
from serve.schemas import Sample, StyleInfo

logger = logging.getLogger("ray.serve")

# Replica-death errors the router retries on another replica (a killed or crashed replica
# must not turn the requests it held into 5xx while a healthy replica exists).
RETRYABLE = (ActorDiedError, ActorUnavailableError, RayActorError)


@serve.deployment(name="StyleModel")
class StyleModel:
    def __init__(self, model: str, device: str = "auto", max_batch_size: int = 8, batch_wait_timeout_s: float = 0.02,
                 lora_adapters: dict | None = None):
        self.backend = StyleModelBackend(model, device, lora_adapters=lora_adapters)
        self.lora_split_batches = 0  # @serve.batch batches that held more than one LoRA set (run as separate forwards)
        self.generate.set_max_batch_size(max_batch_size)
        self.generate.set_batch_wait_timeout_s(batch_wait_timeout_s)
        self.batch_sizes: Counter = Counter()
        self.mixed_style_batches = 0
        self.forward_s: dict[int, deque] = defaultdict(lambda: deque(maxlen=1000))  # batch size -> seconds

    def info(self) -> dict:
        """Styles, native size, and batching counters (tests and the benchmark read them)."""
        return {
            "styles": [s.model_dump() for s in self.backend.styles()],
            "native_size": list(self.backend.native_size),
            "device": self.backend.device,
            "pid": os.getpid(),
            "batch_sizes": dict(self.batch_sizes),
            "mixed_style_batches": self.mixed_style_batches,
            "lora": list(self.backend.lora_names),
            "lora_split_batches": self.lora_split_batches,
            "forward_s": {k: list(v) for k, v in self.forward_s.items()},
            "load_seconds": self.backend.load_seconds,
            "rss_bytes": rss_bytes(),
            "param_bytes": self.backend.param_bytes(),
        }

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.02)
    async def generate(self, samples: list[Sample]) -> list[np.ndarray]:
        self.batch_sizes[len(samples)] += 1
        if len({s.weights for s in samples}) > 1:
            self.mixed_style_batches += 1
        if len({s.lora for s in samples}) > 1:
            self.lora_split_batches += 1
        # The forward runs off the event loop so the replica keeps queueing the next batch.
        t0 = time.perf_counter()
        images = await asyncio.to_thread(self.backend.generate, samples)
        self.forward_s[len(samples)].append(time.perf_counter() - t0)
        return images


def rss_bytes() -> int:
    """Resident memory of this process."""
    import psutil

    return psutil.Process().memory_info().rss


class HandleService:
    """GenerationService over a DeploymentHandle to StyleModel: one call per image, retried on replica death."""

    def __init__(self, model_handle, retries: int = 3):
        self.model = model_handle
        self.retries = retries
        self._info: ModelInfo | None = None

    async def info(self, refresh: bool = False) -> ModelInfo:
        if self._info is None or refresh:
            raw = await self.model.info.remote()
            self._info = ModelInfo([StyleInfo(**s) for s in raw["styles"]], tuple(raw["native_size"]), list(raw.get("lora", [])))
        return self._info

    async def _one(self, sample: Sample) -> np.ndarray:
        for attempt in range(self.retries + 1):
            try:
                return await self.model.generate.remote(sample)
            except RETRYABLE as exc:
                if attempt == self.retries:
                    raise
                logger.warning("model replica lost (%s); retrying sample on another replica", type(exc).__name__)
                await asyncio.sleep(0.2 * (attempt + 1))
        raise AssertionError("unreachable")

    async def generate(self, samples: Sequence[Sample]) -> list[np.ndarray]:
        # Fan out per image so the model's @serve.batch can mix them with other requests' images.
        return list(await asyncio.gather(*(self._one(s) for s in samples)))


@serve.deployment(name="StyleRouter", ray_actor_options={"num_cpus": 0.25})
@serve.ingress()
class StyleRouter:
    def __init__(self, model_handle, cfg: dict):
        self.cfg = ServeConfig.model_validate(cfg)
        self.service = HandleService(model_handle)

    def __serve_build_asgi_app__(self):
        return create_api(self.service, self.cfg)


def build_deployments(cfg: ServeConfig):
    """ServeConfig -> the bound application (router -> model). Binding only: no model is loaded here."""
    model_options = dict(
        ray_actor_options={"num_cpus": cfg.num_cpus, "num_gpus": cfg.replica_num_gpus()},
        max_ongoing_requests=cfg.max_ongoing_requests,
    )
    if cfg.num_replicas != 1:
        # Left unset at 1 so a Serve config file may give autoscaling_config instead.
        model_options["num_replicas"] = cfg.num_replicas
    model = StyleModel.options(**model_options).bind(
        cfg.model_location(), cfg.device, cfg.max_batch_size, cfg.batch_wait_timeout_s, cfg.lora_locations()
    )
    router = StyleRouter.options(max_ongoing_requests=cfg.router_max_ongoing_requests)
    return router.bind(model, cfg.model_dump())
