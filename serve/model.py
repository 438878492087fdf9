"""The model-facing side of serving: load a merged DMM model, generate a batch of samples.

`StyleModelBackend` is plain Python (no Ray): the Serve deployment wraps it, tests call it
directly. One `generate(samples)` call runs ONE pipeline forward (`forward`) per group of samples that
share (steps, guidance, width, height, LoRA adapter set); styles, prompts and seeds may differ per
sample because the style is a per-sample embedding row and diffusers takes one generator per image.
LoRA adapters are model weights, not per-sample inputs, so samples with different adapter sets
(or weights) always run in separate forwards.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from serve.schemas import Sample, StyleInfo

logger = logging.getLogger(__name__)


class ModelLoadError(RuntimeError):
    """The configured model cannot be found or loaded (message says what to set)."""


def is_mlflow_uri(location: str) -> bool:
    return location.startswith(("models:/", "runs:/"))


def resolve_model_location(location: str, download_dir: str | Path | None = None) -> Path:
    """A merged-model folder, an MLflow `models:/name/version` URI, or an object-storage URI of a
    merged-model folder (s3://, gs://, file://; through pyarrow) -> a local folder (downloaded
    under `download_dir`, which the caller owns and deletes; default: a new temporary folder)."""
    if is_mlflow_uri(location):
        try:
            from dmm_ray.tracking import resolve_model_uri  # lazy: MLflow is only needed for registry URIs
        except ImportError as exc:
            raise ModelLoadError(
                f"model {location!r} is an MLflow URI but dmm_ray.tracking.resolve_model_uri is not available "
                f"({exc}); set DMM_MODEL to a merged-model folder instead"
            ) from exc
        path = Path(resolve_model_uri(location, dst=download_dir))
    elif "://" in location:  # object storage (s3://, gs://, file://): downloaded through pyarrow
        from dmm_ray.data import fs as fsu

        try:
            path = fsu.local_copy(location, Path(download_dir) / "model" if download_dir is not None else None, model=True)
        except (FileNotFoundError, OSError, ValueError) as exc:
            raise ModelLoadError(f"could not download the merged model {location!r}: {exc}") from exc
    else:
        path = Path(location)
    if not path.is_dir():
        raise ModelLoadError(
            f"merged-model folder {str(path)!r} does not exist; run `make demo` or `python jobs/merge.py` "
            "(write $DMM_HOME/outputs/dmm-toy/merged) "
            "or set DMM_MODEL to a merged-model folder or `models:/name/version`"
        )
    if not (path / "model_index.json").is_file() or not (path / "unet").is_dir():
        raise ModelLoadError(
            f"{str(path)!r} is not a merged-model folder: it needs model_index.json and unet/ (written by DMMPipeline.save_pretrained)"
        )
    return path


def check_not_replaced(path: Path) -> None:
    """A local merge's `<output_dir>/merged` (or a few-step `<folder>/model`) that a running job holds the lock of:
    its save replaces the folder, and a replica loading it then could load half of one model and half of the
    other. The replica refuses to start, naming the job, as for a missing model folder (its start fails; a
    replica started once that job is done loads the new model). A download is a copy, read whole."""
    from dmm_ray.output_lock import OutputDirBusyError, check_not_being_replaced

    try:
        check_not_being_replaced(path, flag="model")
    except OutputDirBusyError as exc:
        raise ModelLoadError(f"{exc} (the model setting: DMM_MODEL, or model= of serve run / serve/config.yaml)") from None


def read_style_descriptions(path: Path, style_names: Sequence[str]) -> list[str]:
    """Optional `styles.json` beside the weights: [{name, description}] or {name: description}."""
    file = path / "styles.json"
    if not file.is_file():
        return [""] * len(style_names)
    try:
        data = json.loads(file.read_text())
    except (OSError, ValueError) as error:  # optional: the model still serves, without descriptions
        logger.warning("%s is not readable JSON (%s); the styles are served without descriptions", file, error)
        return [""] * len(style_names)
    if isinstance(data, dict) and "styles" in data:
        data = data["styles"]
    if isinstance(data, list):
        data = {str(d.get("name")): d.get("description") for d in data if isinstance(d, dict)}
    if not isinstance(data, dict):
        return [""] * len(style_names)
    return [str(data.get(name) or "") for name in style_names]  # a null description is none, not "None"


def pick_device(device: str) -> str:
    from dmm_ray.devices import usable_device

    try:
        return str(usable_device(device, "device"))
    except ValueError as error:  # e.g. "cuda" on a replica without a GPU: say what Serve can change
        raise ModelLoadError(f"{error}; on Serve, 'auto' takes the replica's GPU when its ray_actor_options give it num_gpus") from None


def pipeline_param_bytes(pipe) -> int:
    """Weights of every module of the pipeline (SDXL's second text encoder included)."""
    import torch

    return sum(p.numel() * p.element_size() for m in pipe.components.values() if isinstance(m, torch.nn.Module) for p in m.parameters())


class StyleModelBackend:
    """A loaded DMMPipeline and its styles. `generate(samples) -> list of (H, W, 3) uint8`.

    A `models:/` / `runs:/` (or object-storage) model is downloaded into a temporary folder the
    backend owns and deletes as soon as the model is loaded (nothing reads it afterwards), so
    replacing the model, restarting replicas or killing `serve run` never leaves a copy of the
    weights behind. `close()` deletes it too (a failed load; idempotent)."""

    def __init__(self, location: str, device: str = "auto", lora_adapters: Optional[dict[str, str]] = None):
        import torch

        from dmm_ray.pipeline import load_dmm_pipeline, max_inference_steps

        self.download_dir: Optional[tempfile.TemporaryDirectory] = None
        if is_mlflow_uri(location) or "://" in location:
            self.download_dir = tempfile.TemporaryDirectory(prefix="dmm-serve-model-")
        try:
            path = resolve_model_location(location, self.download_dir.name if self.download_dir else None)
            if self.download_dir is None:
                check_not_replaced(path)
            self.device = pick_device(device)
            dtype = torch.float16 if self.device == "cuda" else torch.float32
            t0 = time.perf_counter()
            try:
                pipe = load_dmm_pipeline(path, dtype=dtype)  # DMMPipeline or DMMXLPipeline
            except Exception as exc:  # corrupt / foreign folder: say which folder
                raise ModelLoadError(f"could not load a DMMPipeline from {str(path)!r}: {exc}") from exc
        except BaseException:
            self.close()  # a failed load leaves no download behind
            raise
        self.pipe = pipe.to(self.device)
        self.pipe.set_progress_bar_config(disable=True)
        self.load_seconds = time.perf_counter() - t0
        self.path = path
        self.style_names: list[str] = list(self.pipe.styles)
        self.descriptions = read_style_descriptions(path, self.style_names)
        # the model's own sampler: TCDScheduler (or LCMScheduler), 4 steps, CFG off for a few-step model (dmm_ray/fast)
        self.sampler = dict(self.pipe.sampler_defaults) if hasattr(self.pipe, "sampler_defaults") else {}
        grid = max_inference_steps(self.pipe.scheduler)  # TCD / LCM: it samples no more steps than its training grid
        if grid is not None and "scheduler" in self.sampler:
            self.sampler["max_steps"] = grid
        self._active_lora: Optional[tuple] = ()  # None: unknown (a switch failed), set again by the next forward
        self.lora_switches = 0
        self.lora_names = self._load_lora(lora_adapters or {})
        self.close()  # everything is read from the download now: a replica killed later (SIGTERM, SIGKILL) leaves no copy in /tmp
        self.forward_groups: list[tuple] = []  # (group key, samples) of recent forwards (tests, counters)
        # Native image size: UNet latent size x VAE downsampling (512 for SD1.5, 32 for the tiny model).
        self.native_size = (
            int(self.pipe.unet.config.sample_size * self.pipe.vae_scale_factor),
            int(self.pipe.unet.config.sample_size * self.pipe.vae_scale_factor),
        )
        logger.info("loaded %s (%d styles) on %s in %.1fs", path, len(self.style_names), self.device, self.load_seconds)

    def close(self) -> None:
        """Delete the temporary download of a remote model (idempotent; the loaded weights stay usable
        in memory until the backend itself is dropped). `__init__` calls it once the model is loaded."""
        download, self.download_dir = getattr(self, "download_dir", None), None
        if download is not None:
            download.cleanup()
            logger.info("removed the downloaded model folder %s", download.name)

    def _load_lora(self, adapters: dict[str, str]) -> list[str]:
        """Preload every configured adapter (diffusers' load_lora_weights), all off until a request names one."""
        for name, location in adapters.items():
            path = Path(location)
            if not path.exists():
                raise ModelLoadError(f"LoRA adapter {name!r}: {location} does not exist (serve config lora_adapters)")
            try:
                if path.is_file():
                    self.pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name=name)
                else:
                    self.pipe.load_lora_weights(str(path), adapter_name=name)
            except Exception as exc:
                raise ModelLoadError(f"LoRA adapter {name!r}: could not load {location}: {exc}") from exc
        if adapters:
            self.pipe.disable_lora()
        return list(adapters)

    def _set_lora(self, lora: tuple) -> None:
        """Activate exactly this adapter set with these weights for the next forward (none: all off).
        A switch walks every adapted layer, so it is done only when the set changes. Until it succeeds the
        active set is unknown (None): a switch that raises (an adapter name set_adapters refuses) is redone
        in full by the next forward, instead of leaving the layers enabled under a "none" record."""
        if not self.lora_names or lora == self._active_lora:
            return
        previous, self._active_lora = self._active_lora, None
        if lora:
            if not previous:
                self.pipe.enable_lora()
            self.pipe.set_adapters([n for n, _ in lora], adapter_weights=[w for _, w in lora])
        else:
            self.pipe.disable_lora()
        self._active_lora = lora
        self.lora_switches += 1

    def param_bytes(self) -> int:
        """Bytes of every weight the pipeline holds (UNet, VAE, text encoder)."""
        return pipeline_param_bytes(self.pipe)

    def styles(self) -> list[StyleInfo]:
        return [StyleInfo(index=i, name=n, description=d) for i, (n, d) in enumerate(zip(self.style_names, self.descriptions))]

    def generate(self, samples: Sequence[Sample], stop: Optional[Callable[[], bool]] = None) -> list[np.ndarray]:
        """One pipeline forward (`forward`) per group of samples sharing `Sample.group_key()` (steps,
        guidance, size, regions, LoRA set); results in input order. `stop`: as for `forward`, shared by
        every group (the Serve replica groups a batch itself and calls `forward` with a stop per group)."""
        out: list[Optional[np.ndarray]] = [None] * len(samples)
        groups: dict[tuple, list[int]] = defaultdict(list)
        for i, s in enumerate(samples):
            groups[s.group_key()].append(i)
        for idx in groups.values():
            for i, image in zip(idx, self.forward([samples[i] for i in idx], stop)):
                out[i] = image
        return out  # type: ignore[return-value]

    def forward(self, batch: Sequence[Sample], stop: Optional[Callable[[], bool]] = None) -> list[np.ndarray]:
        """ONE pipeline forward over samples that share `group_key()` (ValueError otherwise: the forward
        takes one steps / guidance / size / regions / LoRA set); an (H, W, 3) uint8 image per sample, in order.

        `stop`: asked after every denoising step; once true, the forward skips its remaining steps
        (diffusers' `interrupt`) and `GenerationCancelled` is raised (every request of the forward timed
        out or went away: nobody reads the images, and the next batch should not wait behind them)."""
        import torch

        from dmm_ray.defaults import PAPER_NEGATIVE_PROMPT

        keys = {s.group_key() for s in batch}
        if len(keys) != 1:
            raise ValueError(f"forward takes samples of one group (steps, guidance, size, regions, LoRA); got {len(keys)} groups: use generate()")
        key = keys.pop()
        steps, guidance, width, height, regions, background, region_window, region_decode, feather, lora = key
        default_negative = self.sampler.get("negative_prompt", PAPER_NEGATIVE_PROMPT)  # the model's own (sampler.json)
        self._set_lora(lora)
        self.forward_groups = (self.forward_groups + [(key, len(batch))])[-1000:]
        # One CPU generator per image: the initial latents of image i depend only on its
        # own seed, so a mixed batch reproduces one-by-one generation.
        generators = [torch.Generator("cpu").manual_seed(s.seed) for s in batch]
        if regions:  # regional styles: the group shares its regions; one batched UNet pass per step
            from dmm_ray.regions import Region

            style = dict(
                regions=[Region(box=box, style_weights=list(w), prompt=p) for box, w, p in regions],
                background=None if background is None else list(background),
                region_window=None if region_window == "canvas" else region_window,
                region_decode=region_decode,
                feather=feather,
            )
        else:
            style = dict(style_weights=[list(s.weights) for s in batch])  # (B, N) one mixture per sample
        if stop is not None and stop():
            raise GenerationCancelled("every request of this batch was cancelled")
        result = self.pipe(
            callback_on_step_end=None if stop is None else _interrupt_when(stop),
            prompt=[s.prompt for s in batch],
            **style,
            negative_prompt=[default_negative if s.negative_prompt is None else s.negative_prompt for s in batch],
            num_inference_steps=steps,
            guidance_scale=guidance,
            width=width,
            height=height,
            generator=generators,
            output_type="np",
        )
        if self.pipe.interrupt:
            raise GenerationCancelled("every request of this batch was cancelled")
        return list((np.clip(result.images, 0, 1) * 255).round().astype(np.uint8))  # (H, W, 3) per sample


class GenerationCancelled(Exception):
    """A forward stopped early because nobody waits for its images any more."""


def _interrupt_when(stop: Callable[[], bool]):
    """diffusers' `callback_on_step_end`: set the pipeline's `interrupt` once `stop()` is true, so the
    loop skips its remaining UNet calls (the pipeline resets the flag at the start of each call)."""

    def callback(pipe, step, timestep, callback_kwargs):
        if stop():
            pipe._interrupt = True
        return callback_kwargs

    return callback
