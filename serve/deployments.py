"""Ray Serve deployments: the batched style model and the FastAPI style-router ingress.

StyleModel takes ONE sample per call and `@serve.batch` gathers concurrent samples - from
different requests, prompts and styles - into one forward (the style is a per-sample
embedding row, so nothing forces a batch to share a style).
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import threading
import time
from collections import Counter, defaultdict, deque
from typing import Optional, Sequence

import numpy as np
from ray import serve
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError
from ray.serve.config import BackpressureConfig
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

from serve.config import ServeConfig
from serve.model import GenerationCancelled, StyleModelBackend
from serve.router import ModelInfo, Overloaded, SampleFailed, StylesChanged, create_api
from serve.schemas import RequestError, Sample, StyleInfo, resolve_lora

logger = logging.getLogger("ray.serve")

# Replica-death errors the router retries on another replica, at most `max_retries` times per
# image: a killed replica must not turn the requests it held into 5xx while a healthy replica
# exists, but a request that itself crashes replicas must not take down one replica after another.
RETRYABLE = (ActorDiedError, ActorUnavailableError, RayActorError)


def check_sample(sample: Sample, style_names: Sequence[str], lora_names: Sequence[str] = ()) -> None:
    """The model's own guard (the router checks the same first): weights or LoRA adapters that would
    poison a batch are this sample's client error (422), never the batch's; weights resolved against
    another model's style list are `StylesChanged` (they would give another style's image)."""
    if sample.styles and tuple(sample.styles) != tuple(style_names):
        raise StylesChanged(f"the model was reloaded with other styles (now {list(style_names)}, was {list(sample.styles)}); retry")
    num_styles = len(style_names)
    resolve_lora(dict(sample.lora), lora_names)  # preloaded adapters, finite weights in [-10, 10]
    mixtures = [("weights", sample.weights)]
    if sample.background is not None:
        mixtures.append(("background weights", sample.background))
    mixtures += [(f"regions[{i}] weights", r[1]) for i, r in enumerate(sample.regions)]
    for name, w in mixtures:
        if len(w) != num_styles:
            raise RequestError(422, f"{name} has {len(w)} entries; the model has {num_styles} styles")
        if not all(math.isfinite(x) and x >= 0 for x in w) or not math.isclose(sum(w), 1.0, abs_tol=1e-6):
            raise RequestError(422, f"{name} must be finite, >= 0 and sum to 1 (got {list(w)!r})")


@serve.deployment(name="StyleModel")
class StyleModel:
    def __init__(
        self,
        model: str,
        device: str = "auto",
        max_batch_size: int = 8,
        batch_wait_timeout_s: float = 0.02,
        lora_adapters: dict | None = None,
        cfg: dict | None = None,
    ):
        self.backend = StyleModelBackend(model, device, lora_adapters=lora_adapters)
        if cfg is not None:  # the ServeConfig's set fields: size limits below the model's native size fail the deploy, not each request
            ServeConfig.model_validate(cfg).check_native_size(self.backend.native_size)
        self.lora_split_batches = 0  # @serve.batch batches that held more than one LoRA set (run as separate forwards)
        self.generate_batch.set_max_batch_size(max_batch_size)
        self.generate_batch.set_batch_wait_timeout_s(batch_wait_timeout_s)
        self.batch_sizes: Counter = Counter()
        self.mixed_style_batches = 0
        self.sample_failures: Counter = Counter()  # "client" (4xx) / "server" (500) per failed sample
        self.forward_s: dict[int, deque] = defaultdict(lambda: deque(maxlen=1000))  # batch size -> seconds
        self._cancelled: dict[int, threading.Event] = {}  # id(sample) -> set when its request is cancelled
        self.cancelled_forwards = 0  # forwards stopped early because nobody waited for them

    def info(self) -> dict:
        """Styles, native size, and batching counters (tests and the benchmark read them)."""
        return {
            "styles": [s.model_dump() for s in self.backend.styles()],
            "native_size": list(self.backend.native_size),
            "vae_scale_factor": int(self.backend.pipe.vae_scale_factor),
            "device": self.backend.device,
            "pid": os.getpid(),
            "batch_sizes": dict(self.batch_sizes),
            "mixed_style_batches": self.mixed_style_batches,
            "lora": list(self.backend.lora_names),
            "sampler": dict(getattr(self.backend, "sampler", {}) or {}),
            "lora_split_batches": self.lora_split_batches,
            "sample_failures": dict(self.sample_failures),
            "cancelled_forwards": self.cancelled_forwards,
            "forward_s": {k: list(v) for k, v in self.forward_s.items()},
            "load_seconds": self.backend.load_seconds,
            "rss_bytes": rss_bytes(),
            "param_bytes": self.backend.param_bytes(),
        }

    async def generate(self, sample: Sample) -> np.ndarray:
        """One image. Joins a shared batch; a failure of this sample raises here, for this request only.
        A cancelled call (the request timed out at the proxy, or its client went away) marks its
        sample, and a forward whose samples are all marked stops at its next step (the batch's other
        forwards run on)."""
        cancelled = self._cancelled[id(sample)] = threading.Event()
        try:
            result = await self.generate_batch(sample)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        finally:
            self._cancelled.pop(id(sample), None)
        if isinstance(result, BaseException):
            raise result
        return result

    def _stop_when_all_cancelled(self, samples: Sequence[Sample]):
        """`stop` for the backend: true once every sample of the forward has been cancelled."""
        events = [self._cancelled.get(id(s)) for s in samples]
        if any(e is None for e in events):  # called without `generate` (a test's direct batch): never stop
            return None
        return lambda: all(e.is_set() for e in events)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.02)
    async def generate_batch(self, samples: list[Sample]) -> list:
        """An image or an exception per sample: one bad sample never fails the others' requests."""
        self.batch_sizes[len(samples)] += 1
        if len({repr(s.weights) for s in samples}) > 1:
            self.mixed_style_batches += 1
        if len({s.lora for s in samples}) > 1:
            self.lora_split_batches += 1
        out: list = [None] * len(samples)
        good = []
        for i, s in enumerate(samples):
            try:
                check_sample(s, self.backend.style_names, self.backend.lora_names)
                good.append(i)
            except Exception as exc:  # a malformed sample (only a direct handle caller can send one)
                self.sample_failures["client"] += 1
                out[i] = exc if isinstance(exc, RequestError) else RequestError(422, f"malformed sample: {type(exc).__name__}")
        # One backend forward per group (samples sharing steps, guidance, size, regions and LoRA set: one
        # pipeline call takes one of each), each with its own stop: a group whose
        # requests were all cancelled stops at its next step even while another group's requests still
        # wait (one stop for the whole batch kept a cancelled 50-step group running ahead of them), and a
        # forward that raises retries only its own group's samples one by one.
        groups: dict[tuple, list[int]] = defaultdict(list)
        for i in good:
            groups[samples[i].group_key()].append(i)
        t0, stopped = time.perf_counter(), 0
        for idx in groups.values():
            group = [samples[i] for i in idx]
            try:  # off the event loop, so the replica keeps queueing the next batch
                images = await asyncio.to_thread(self.backend.forward, group, self._stop_when_all_cancelled(group))
            except GenerationCancelled:
                stopped += 1
                images = [GenerationCancelled("cancelled") for _ in idx]
            except Exception:
                # Something in the group broke the forward: run each sample alone so only the culprit fails.
                logger.warning("forward of %d samples failed; retrying them one by one", len(idx), exc_info=True)
                images = [await self._alone(samples[i]) for i in idx]
            for i, image in zip(idx, images):
                out[i] = image
        if stopped:
            self.cancelled_forwards += stopped
            logger.info("%d forward(s) of a batch of %d stopped early: every request in them was cancelled", stopped, len(good))
        elif good:
            self.forward_s[len(good)].append(time.perf_counter() - t0)
        return out

    async def _alone(self, sample: Sample):
        try:
            return (await asyncio.to_thread(self.backend.forward, [sample]))[0]
        except Exception as exc:
            self.sample_failures["server"] += 1
            logger.error("sample failed alone (prompt %s): %s", repr(sample.prompt)[:80], exc, exc_info=True)
            return SampleFailed("the model failed to generate this image")


def rss_bytes() -> int:
    """Resident memory of this process."""
    import psutil

    return psutil.Process().memory_info().rss


# How long the router trusts one read of the model deployment's Serve status (`serve.status()`, a call to the
# Serve controller): a handle call waiting for a replica reads it at most this often, so a model that cannot
# start a replica is a 503 within about this long, and the controller gets one read per router per period.
STATUS_TTL_S = 1.0


class ModelStatus:
    """Whether the model deployment is stuck without a replica: Serve counts its replica starts as failing
    (status UNHEALTHY or DEPLOY_FAILED, trigger REPLICA_STARTUP_FAILED: e.g. its model folder was deleted
    after a first start) and none is RUNNING. A handle call then waits for a replica that may never come:
    Serve's router does not fail it (the deployment had started once, so Serve keeps it "available") and the
    request would end only at the proxy's request_timeout_s, as a 408. A restart after a replica death
    (trigger HEALTH_CHECK_FAILED) or a rollout is not this state: those calls wait, as before."""

    def __init__(self, app_name: str, deployment_name: str, ttl_s: float = STATUS_TTL_S):
        self.app_name, self.deployment_name, self.ttl_s = app_name, deployment_name, ttl_s
        self._read_at = -math.inf
        self._reason: Optional[str] = None
        self._lock = asyncio.Lock()  # concurrent waiting calls share one read

    async def cannot_start(self) -> Optional[str]:
        """Serve's message on the failing starts (for the log) while no replica can take a call, else None."""
        async with self._lock:
            if time.monotonic() - self._read_at >= self.ttl_s:
                reason = await asyncio.to_thread(self._read)  # serve.status() blocks: off the event loop
                if reason and not self._reason:
                    logger.error("the model deployment cannot start a replica; /generate answers 503 until one starts: %s", reason)
                self._reason, self._read_at = reason, time.monotonic()
            return self._reason

    def _read(self) -> Optional[str]:
        try:
            app = serve.status().applications.get(self.app_name)
        except Exception as exc:  # the controller unreachable for a moment: no verdict, the call waits on
            logger.warning("could not read the Serve status of %s: %s: %s", self.deployment_name, type(exc).__name__, exc)
            return None
        deployment = app.deployments.get(self.deployment_name) if app is not None else None
        if deployment is None:
            return None
        starts_failing = deployment.status in ("UNHEALTHY", "DEPLOY_FAILED") and deployment.status_trigger == "REPLICA_STARTUP_FAILED"
        running = sum(n for state, n in deployment.replica_states.items() if state == "RUNNING")  # str enums or str keys
        if starts_failing and not running:
            return deployment.message or "its replicas fail to start"
        return None


class HandleService:
    """GenerationService over a DeploymentHandle to StyleModel: one call per image, retried on replica
    death at most `retries` times, and so is the info call; a full model queue (Serve's max_queued_requests),
    an info call whose replicas kept dying, or a call waiting for a replica while the deployment cannot start
    one (`status`, a ModelStatus; None: no such check) is `Overloaded` (503)."""

    def __init__(self, model_handle, retries: int = 1, retry_after_s: float = 2.0, status: Optional[ModelStatus] = None):
        self.model = model_handle
        self.retries = retries
        self.retry_after_s = retry_after_s
        self.status = status
        self._status_reads: set[asyncio.Future] = set()  # reads of `status` a call outlived, still running
        self._info: ModelInfo | None = None

    async def _answer(self, response):
        """The result of a handle call. While it is unanswered, the model's status is read every `ttl_s`:
        if no replica can start, the call is cancelled and this is a 503 + Retry-After (a call that a
        RUNNING replica holds, however long its generation takes, is never cut off)."""
        if self.status is None:
            return await response
        task = asyncio.ensure_future(response)
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=self.status.ttl_s)
                if done:
                    return task.result()
                # the read races the call: serve.status() waits on the Serve controller with no timeout (a busy or
                # restarting one: seconds), and an answer that comes meanwhile must not wait for it. A read the call
                # outlives goes on (the next waiting call shares it) and is kept referenced until it ends
                check = asyncio.ensure_future(self.status.cannot_start())
                self._status_reads.add(check)
                check.add_done_callback(self._status_reads.discard)
                await asyncio.wait({task, check}, return_when=asyncio.FIRST_COMPLETED)
                if task.done():
                    return task.result()
                if check.result():
                    raise Overloaded("the model cannot start a replica now (see the server log); retry later", self.retry_after_s)
        finally:
            if not task.done():
                task.cancel()  # cancels the handle call too (the request's assignment, or its replica's work)

    async def info(self, refresh: bool = False) -> ModelInfo:
        if self._info is None or refresh:
            raw = await self._ask_info()
            self._info = ModelInfo(
                [StyleInfo(**s) for s in raw["styles"]],
                tuple(raw["native_size"]),
                list(raw.get("lora", [])),
                dict(raw.get("sampler") or {}),
                int(raw["vae_scale_factor"]),
            )
        return self._info

    async def _ask_info(self) -> dict:
        """The model's info, asked again on another (or the restarted) replica when the one asked died
        during the call, at most `retries` times; then 503 + Retry-After: a replica death is the server's
        passing state (Serve restarts the replica), not a fault of the request, and never a 500."""
        for attempt in range(self.retries + 1):
            try:
                return await self._answer(self.model.info.remote())
            except (BackPressureError, DeploymentUnavailableError) as exc:  # a full model queue: 503, as for generate
                raise Overloaded("the model is at capacity; retry later", self.retry_after_s) from exc
            except RETRYABLE as exc:
                if attempt == self.retries:
                    logger.error("model replica lost %d time(s) while reading the model's info: %s", attempt + 1, exc)
                    raise Overloaded("the model's replica was lost and is restarting; retry later", self.retry_after_s) from exc
                logger.warning("model replica lost (%s) while reading the model's info; asking another replica", type(exc).__name__)
                await asyncio.sleep(0.2 * (attempt + 1))
        raise AssertionError("unreachable")

    async def _one(self, sample: Sample) -> np.ndarray:
        for attempt in range(self.retries + 1):
            try:
                return await self._answer(self.model.generate.remote(sample))
            except (BackPressureError, DeploymentUnavailableError) as exc:
                raise Overloaded("the model is at capacity; retry later", self.retry_after_s) from exc
            except RETRYABLE as exc:
                if attempt == self.retries:
                    logger.error("model replica lost %d time(s) on one sample; failing its request: %s", attempt + 1, exc)
                    raise SampleFailed("the model replica failed while generating this image") from exc
                logger.warning("model replica lost (%s); retrying sample on another replica", type(exc).__name__)
                await asyncio.sleep(0.2 * (attempt + 1))
            except StylesChanged as exc:  # the model was reloaded with other styles: the route reads them again
                self._info = None
                raise StylesChanged(exc.message, self.retry_after_s) from None
            except Overloaded:  # _answer's own 503 (no replica can start): kept whole, with its Retry-After
                raise
            except RequestError as exc:  # the replica's own check: this sample's client error
                raise RequestError(exc.status, exc.message) from None
            except SampleFailed as exc:
                raise SampleFailed(exc.message) from None
        raise AssertionError("unreachable")

    async def generate(self, samples: Sequence[Sample]) -> list[np.ndarray]:
        # Fan out per image so the model's @serve.batch can mix them with other requests' images;
        # the first failure cancels the request's other images (no work for an answer nobody reads).
        tasks = [asyncio.ensure_future(self._one(s)) for s in samples]
        try:
            return list(await asyncio.gather(*tasks))
        finally:
            for t in tasks:
                t.cancel()


@serve.deployment(name="StyleRouter", ray_actor_options={"num_cpus": 0.25})
@serve.ingress()
class StyleRouter:
    def __init__(self, model_handle, cfg: dict):
        self.cfg = ServeConfig.model_validate(cfg)
        status = ModelStatus(model_handle.app_name, model_handle.deployment_name)
        self.service = HandleService(model_handle, retries=self.cfg.max_retries, retry_after_s=self.cfg.retry_after_s, status=status)

    def __serve_build_asgi_app__(self):
        return create_api(self.service, self.cfg)


def build_deployments(cfg: ServeConfig):
    """ServeConfig -> the bound application (router -> model). Binding only: no model is loaded here."""
    # Overload: each router replica queues at most `max_queued_requests` images for the model
    # (then BackPressureError -> 503 + Retry-After from the router); the HTTP proxy queues at most
    # `router_max_queued_requests` requests for the router (then Serve's own 503 + Retry-After).
    backpressure = BackpressureConfig(status_code=503, retry_after_s=cfg.retry_after_s)
    # Only the fields the user set: a size limit left unset follows the model's native size (ServeConfig.limits_for),
    # which a full dump would turn into a set 768. The model location resolved here, once, for both deployments: a
    # relative folder (or $DMM_HOME) resolved again in the router replica's working directory and environment made
    # /export_command name another folder than the one the model replica loads
    location = cfg.model_location()
    settings = cfg.model_dump(exclude_unset=True) | {"model": location}
    model_options = dict(
        ray_actor_options={"num_cpus": cfg.num_cpus, "num_gpus": cfg.replica_num_gpus()},
        max_ongoing_requests=cfg.max_ongoing_requests,
        max_queued_requests=cfg.max_queued_requests,
        backpressure_config=backpressure,
    )
    if cfg.num_replicas != 1:
        # Left unset at 1 so a Serve config file may give autoscaling_config instead.
        model_options["num_replicas"] = cfg.num_replicas
    model = StyleModel.options(**model_options).bind(
        location, cfg.device, cfg.max_batch_size, cfg.batch_wait_timeout_s, cfg.lora_locations(), settings
    )
    router = StyleRouter.options(
        max_ongoing_requests=cfg.router_max_ongoing_requests,
        max_queued_requests=cfg.router_max_queued_requests,
        backpressure_config=backpressure,
    )
    return router.bind(model, settings)
