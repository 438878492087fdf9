"""DMMPipeline: StableDiffusionPipeline (and the SDXL one) with `style=` / `style_weights=`.

Regional styles (`regions=[Region(...)]`, `background=`) and panoramas (`style_map=`,
`window_stride=`, `max_batch=`) are in dmm_ray/regions.py.

Paper defaults (A.5): DPM-Solver++ 25 steps, CFG 7, negative prompt below. The style rows are
handed to the StyleUNet through `style_context`; under classifier-free guidance diffusers
doubles the batch ([uncond; cond]) and StyleUNet repeats the rows, so both halves carry the
prompt's own style.
"""

from __future__ import annotations

import contextlib
import logging
import numbers
import os
from pathlib import Path
from typing import Any, Sequence

import torch
from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

from dmm_ray.architectures import is_sdxl, merged_folder, pipeline_kwargs
from dmm_ray.defaults import (  # noqa: F401  (PAPER_* re-exported: the pipeline's public defaults)
    FEW_STEP_SCHEDULERS,
    LCM_GUIDANCE,
    LCM_STEPS,
    PAPER_GUIDANCE,
    PAPER_NEGATIVE_PROMPT,
    PAPER_SCHEDULER,
    PAPER_STEPS,
    SAMPLER_RECORD,
)
from dmm_ray.models.style_unet import StyleError, StyleUNet, inner_unet, resolve_style
from dmm_ray.styles import is_per_prompt


def sampler_defaults(folder=None, scheduler=None) -> dict:
    """The sampler a model folder asks for: {"scheduler", "num_inference_steps", "guidance_scale",
    "negative_prompt"} from its `sampler.json` (a merge writes its synthesis settings there, a few-step
    model its LCM settings), else the paper's (DPM-Solver++ 25 steps, CFG 7, the paper's negative
    prompt; a few-step scheduler (LCM, TCD) without a record: 4 steps, CFG off).

    `scheduler`: the one the pipeline samples with (default: the record's). The record's steps and
    guidance apply only to the kind of sampler they were written for: a merged model whose scheduler
    was swapped for TCD (its LCM-LoRA) gets 4 steps, CFG off, not its merge's 10 steps at CFG 5."""
    record = {}
    if folder is not None and (Path(str(folder)) / SAMPLER_RECORD).is_file():
        record = read_sampler_record(Path(str(folder)) / SAMPLER_RECORD)
    name = type(scheduler).__name__ if scheduler is not None else record.get("scheduler", PAPER_SCHEDULER)
    few_step = name in FEW_STEP_SCHEDULERS.values()
    out = {"scheduler": name, "num_inference_steps": PAPER_STEPS, "guidance_scale": PAPER_GUIDANCE, "negative_prompt": PAPER_NEGATIVE_PROMPT}
    if few_step:
        out.update(num_inference_steps=LCM_STEPS, guidance_scale=LCM_GUIDANCE)
    if record and (record.get("scheduler", name) in FEW_STEP_SCHEDULERS.values()) == few_step:
        out.update({k: record[k] for k in ("num_inference_steps", "guidance_scale") if k in record})  # a record may give only some
    if record.get("negative_prompt") is not None:
        out["negative_prompt"] = str(record["negative_prompt"])
    return out


def read_sampler_record(path: Path) -> dict:
    """A model's `sampler.json`: the keys it gives of {"scheduler", "num_inference_steps", "guidance_scale",
    "negative_prompt"}, checked. One that is not JSON, not an object, or holds a value of the wrong kind is a
    ValueError naming the file and what it should hold (a hand-edited record failed the first call with
    a bare JSONDecodeError / KeyError / AttributeError naming neither)."""
    import json
    import math

    want = (
        'a JSON object such as {"scheduler": "DPMSolverMultistepScheduler", "num_inference_steps": 10, "guidance_scale": 5.0, '
        '"negative_prompt": ""}: fix it, or delete it to sample with the paper\'s defaults'
    )
    try:
        record = json.loads(path.read_text())
    except ValueError as error:
        raise ValueError(f"{path} is not JSON ({error}); it should be {want}") from None
    if not isinstance(record, dict):
        raise ValueError(f"{path} holds a JSON {type(record).__name__}; it should be {want}")
    checks = {
        "scheduler": ("a scheduler class name", lambda v: isinstance(v, str)),
        "num_inference_steps": (
            "a whole number >= 1",
            lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 1 and float(v).is_integer(),
        ),
        "guidance_scale": ("a number", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)),
        "negative_prompt": ("text or null", lambda v: v is None or isinstance(v, str)),
    }
    for key, (kind, ok) in checks.items():
        if key in record and not ok(record[key]):
            raise ValueError(f"{path}: {key} is {record[key]!r}, not {kind}; it should be {want}")
    casts = {"num_inference_steps": int, "guidance_scale": float}
    return {k: casts.get(k, lambda v: v)(v) for k, v in record.items() if k in checks}


def max_inference_steps(scheduler) -> int | None:
    """The most steps `scheduler` samples, or None for no limit: a few-step model's TCD / LCM scheduler
    samples on its training grid (`original_inference_steps`) and refuses more steps than it has."""
    grid = getattr(getattr(scheduler, "config", None), "original_inference_steps", None)
    return None if grid is None else int(grid)


def sampler_record(num_inference_steps: int, guidance_scale: float, negative_prompt: str | None, scheduler: str = PAPER_SCHEDULER) -> dict:
    """What a merge writes to `sampler.json`: the settings its teachers were sampled with (synthesis)."""
    return {
        "scheduler": scheduler,
        "num_inference_steps": int(num_inference_steps),
        "guidance_scale": float(guidance_scale),
        "negative_prompt": PAPER_NEGATIVE_PROMPT if negative_prompt is None else negative_prompt,
    }


def style_rows(style_names: Sequence[str], batch_size: int, style=None, style_weights=None) -> torch.Tensor:
    """Per-prompt normalised style weights (batch_size, N) from the user's `style` / `style_weights`.

    `style`: a name or index for every prompt, or a list with one (name, index or dict) per prompt.
    `style_weights`: one mixture (dict name->weight, or a list of N weights) for every prompt, or a
    list with one mixture per prompt.
    """
    names = list(style_names)
    if (style is None) == (style_weights is None):
        raise StyleError(f"pass exactly one of style= or style_weights=; known styles: {', '.join(names)}")
    selection = style if style is not None else style_weights
    if is_per_prompt(style, style_weights):
        if len(selection) != batch_size:
            raise StyleError(f"got {len(selection)} styles for {batch_size} prompts; give one per prompt or a single style")
        return torch.stack([resolve_style(names, s) for s in selection])
    return resolve_style(names, selection)[None].repeat(batch_size, 1)


class _StyleCallMixin:
    """Shared by the SD1.5 and SDXL pipelines: resolve styles, then run diffusers' own loop."""

    # A call whose images all have one style (or one mixture) folds that style's adapters into the
    # UNet's layers for the call (`StyleUNet.fused_style`); False keeps the per-sample adapter path.
    fuse_styles: bool = True

    @property
    def styles(self) -> list[str]:
        return self.unet.style_names

    @property
    def sampler_defaults(self) -> dict:
        """{"scheduler", "num_inference_steps", "guidance_scale", "negative_prompt"} used when a call names
        none: the model's own `sampler.json` (a merge's synthesis settings; a few-step model's 4 steps,
        CFG off), else the paper's (25 steps, CFG 7, its negative prompt)."""
        key = (getattr(self.config, "_name_or_path", None), type(self.scheduler).__name__)
        cached = self.__dict__.get("_sampler_defaults")
        if cached is None or cached[0] != key:  # read sampler.json once per folder and scheduler, not on every call
            cached = (key, sampler_defaults(key[0], self.scheduler))
            self.__dict__["_sampler_defaults"] = cached
        return dict(cached[1])

    def save_pretrained(self, save_directory, *args, **kwargs):
        """diffusers' save, plus the model folder's `sampler.json` and `styles.json`: without the sampler
        record the saved copy would sample with the paper's defaults, not this model's. The records go in
        first: with `push_to_hub=True` diffusers uploads the folder at the end of its own save. A record
        this pipeline has none of (built from components, or its folder had none) is not left behind from
        an earlier save into the folder, whose model's sampler and style names it is not.
        A pipeline with LoRA layers loaded (a LoRA, the few-step model's `lcm_lora/`; also after `fuse_lora`,
        which keeps them) is refused before anything is written: diffusers wrote PEFT's layer names
        (`to_q.base_layer.weight`), and the folder loaded back with those layers' weights missing. So is one with
        an IP-Adapter loaded: the UNet's config kept `encoder_hid_dim_type` None (diffusers sets it as an attribute
        only), so the folder loaded back without the image projection and IP attention layers, beside the image
        encoder it wrote, and a call with `ip_adapter_image` failed with an AttributeError on None.
        A sampler record written for another scheduler than the pipeline's (a merged model saved with its LCM-LoRA
        fused in and TCD swapped in) is saved as the settings the pipeline samples with (`sampler_defaults`):
        copied, it named DPM-Solver at 10 steps with CFG beside the TCD scheduler, which whatever reads the folder's
        record (`sampler_defaults(folder)`: jobs/style_mixing.py's --student-steps) then sampled with.
        The save is written whole into a hidden folder inside `save_directory` (`.dmm-save-<pid>.tmp`) and only
        then moved in, entry by entry, in place of the earlier save's (`merged_model.move_in`): a save into a folder holding an
        earlier one that failed part-way (a module's save raising, a full disk, Ctrl-C) left the folder a mix of the
        two models; now it is left as it was. The folder itself is never renamed (it may be a mount point, a link or
        the working directory); what it holds beside the pipeline (dmm_merge.json, lcm_lora/, notes) stays, and
        `push_to_hub=True` uploads the save itself (to a repo named after `save_directory`), not those."""
        import json
        import shutil

        from dmm_ray.formats.single_file import loaded_plugins
        from dmm_ray.merged_model import STYLES_RECORD, entries_staging, move_in, remove

        problem = loaded_plugins(self)
        if problem:
            raise ValueError(f"cannot save to {save_directory}: {problem}")
        dest = Path(save_directory)
        if dest.exists() and not dest.is_dir():
            raise ValueError(f"cannot save to {dest}: it is a file; give a folder path")
        source = getattr(self.config, "_name_or_path", None)
        created = [p for p in (dest, *dest.parents) if not p.exists()]  # deepest first: removed again if the save fails
        dest.mkdir(parents=True, exist_ok=True)
        staging = entries_staging(dest)
        try:
            staging.mkdir()
            for name in (SAMPLER_RECORD, STYLES_RECORD):
                record = Path(str(source)) / name if source else None
                if record is None or not record.is_file():
                    continue  # an earlier save's record in the folder goes (`merged_model.move_in`): it is not this model's
                scheduler = type(self.scheduler).__name__
                if name == SAMPLER_RECORD and read_sampler_record(record).get("scheduler", scheduler) != scheduler:
                    own = self.sampler_defaults
                    text = sampler_record(own["num_inference_steps"], own["guidance_scale"], own["negative_prompt"], scheduler)
                    (staging / name).write_text(json.dumps(text, indent=1))
                else:
                    shutil.copyfile(record, staging / name)  # also from `dest` itself: saved over its own folder
            # the records go in first: with push_to_hub=True diffusers uploads the folder at the end of its own save,
            # to a repo named after the folder it writes unless repo_id says otherwise (this one's, not the staging's)
            kwargs.setdefault("repo_id", Path(os.path.abspath(dest)).name)
            super().save_pretrained(str(staging), *args, **kwargs)  # a str: diffusers splits it for the default repo_id
            move_in(staging, dest, drop=[n for n in (SAMPLER_RECORD, STYLES_RECORD) if not (staging / n).exists()])
        except BaseException:  # an error or Ctrl-C mid-save: the folder keeps the earlier save, whole
            remove(staging)
            for folder in created:
                with contextlib.suppress(OSError):
                    folder.rmdir()  # only if empty
            raise
        remove(staging)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """diffusers' loader. A Hub id is first resolved to its snapshot folder in the HF cache (`download`),
        which the pipeline keeps as its `_name_or_path`: the model's sampler.json and styles.json are read
        there (by `sampler_defaults`, copied by `save_pretrained`), not from a path the id names under the cwd."""
        source = str(pretrained_model_name_or_path)
        if not Path(source).is_dir() and source.count("/") <= 1:  # else diffusers' "neither a local path nor a repo id"
            source = cls.download(source, **kwargs)  # takes the kwargs it knows; components given are not fetched
        return super().from_pretrained(source, **kwargs)

    @classmethod
    def download(cls, pretrained_model_name, **kwargs):
        """diffusers' download of a Hub pipeline, plus the model's sampler.json and styles.json, which it
        leaves out (it fetches the components' files only)."""
        from huggingface_hub import snapshot_download

        from dmm_ray.merged_model import STYLES_RECORD

        folder = super().download(pretrained_model_name, **kwargs)
        missing = [name for name in (SAMPLER_RECORD, STYLES_RECORD) if not (Path(folder) / name).is_file()]
        if missing and not kwargs.get("local_files_only"):
            try:  # the snapshot's own commit (its folder name); a model without the records has nothing to fetch
                snapshot_download(
                    pretrained_model_name,
                    revision=Path(folder).name,
                    allow_patterns=missing,
                    cache_dir=kwargs.get("cache_dir"),
                    token=kwargs.get("token"),
                )
            except Exception as error:  # optional records: the model still loads, with the paper's sampler
                logging.getLogger(__name__).warning(
                    "could not fetch %s of %s (%s): sampling with the paper's defaults", missing, pretrained_model_name, error
                )
        return folder

    @classmethod
    def from_pipe(cls, pipeline, **kwargs):
        """diffusers' `from_pipe` (the source's modules, shared), keeping the source's `fuse_styles`: an attribute,
        not a component or config entry, so `from_pipe` dropped it and a pipeline made from one with
        `fuse_styles = False` (DMMImg2ImgPipeline.from_pipe, with_controlnet) folded styles again."""
        new = super().from_pipe(pipeline, **kwargs)
        fuse = getattr(pipeline, "fuse_styles", None)  # a stock source has none: the class's default
        if fuse is not None:
            new.fuse_styles = fuse
        return new

    @classmethod
    def _get_signature_types(cls):
        """diffusers' `from_pipe` carries a model over only when its type is the annotated one: a merged
        model's unet is a StyleUNet, not exactly a UNet2DConditionModel."""
        types = super()._get_signature_types()
        types["unet"] = (*types.get("unet", ()), StyleUNet)
        return types

    @staticmethod
    def _prompt_batch(prompt, kwargs: dict) -> int:
        """How many prompts a call has: a str is 1, a list its length, else `prompt_embeds`' batch."""
        if prompt is not None:
            if not isinstance(prompt, (str, list, tuple)) or not all(isinstance(p, str) for p in ([prompt] if isinstance(prompt, str) else prompt)):
                raise ValueError(f"prompt must be a str or a list of str, got {prompt!r:.80}")
            if not isinstance(prompt, str) and not prompt:  # the tokenizer failed on it with a bare IndexError
                raise ValueError("prompt is an empty list; give at least one prompt")
            return 1 if isinstance(prompt, str) else len(prompt)
        if kwargs.get("prompt_embeds") is None:
            raise ValueError("give prompt= (a str or a list of str) or prompt_embeds=")
        return kwargs["prompt_embeds"].shape[0]

    def _fill_negative(self, prompt, batch_size: int, kwargs: dict) -> None:
        """The model's own negative prompt where the call gives none. diffusers encodes a str negative
        once: with a list of prompts or a batch of `prompt_embeds` it must be one per prompt."""
        if kwargs.get("negative_prompt_embeds") is not None:
            return
        negative = self.sampler_defaults["negative_prompt"] if kwargs.get("negative_prompt") is None else kwargs["negative_prompt"]
        kwargs["negative_prompt"] = [negative] * batch_size if not isinstance(prompt, str) and isinstance(negative, str) else negative

    def _style_call(self, parent_call, prompt, style, style_weights, num_images_per_prompt, kwargs):
        unet = inner_unet(self.unet)  # `pipe.unet = torch.compile(pipe.unet)`: the StyleUNet inside the compiled wrapper
        if not isinstance(unet, StyleUNet):
            raise TypeError(f"{type(self).__name__} needs a StyleUNet, got {type(unet).__name__}")
        batch_size = self._prompt_batch(prompt, kwargs)
        if style is None and style_weights is None and unet.num_styles == 1:
            style = 0
        weights = style_rows(unet.style_names, batch_size, style, style_weights)  # (B, N)
        weights = weights.repeat_interleave(num_images_per_prompt, dim=0)  # (B * images, N)
        self._fill_negative(prompt, batch_size, kwargs)
        weights = weights.to(unet.device)
        with torch.no_grad():
            embeds = unet.style_embeds_for(style_weights=weights)
        with unet.style_context(embeds), unet.fused_style(weights, enabled=self.fuse_styles):
            return parent_call(self, prompt=prompt, num_images_per_prompt=num_images_per_prompt, **kwargs)

    @classmethod
    def from_base(cls, base_dir: str | Path, student: StyleUNet, **kwargs):
        """The merged pipeline: `student` inside the base folder's VAE, text encoder(s), tokenizer(s)
        and noise schedule (sampled with the paper's DPM-Solver++)."""
        pipe = cls.from_pretrained(str(base_dir), unet=student, **{"local_files_only": True, **pipeline_kwargs(cls), **kwargs})
        pipe.scheduler = cls.paper_scheduler(pipe.scheduler)
        return pipe

    @classmethod
    def from_official(cls, path: str | Path, **kwargs):
        """Load a published DMM pipeline folder: its unet in the official format, `model_merge` (SD1.5:
        DMMPipeline.from_official) or `model_merge_xl` (SDXL: DMMXLPipeline.from_official)."""
        import inspect

        from dmm_ray.models.official_format import load_official_unet

        folder_xl, class_xl = is_sdxl(path), "text_encoder_2" in inspect.signature(cls.__init__).parameters
        if folder_xl != class_xl:  # diffusers would load it anyway, dropping or missing a text encoder
            raise ValueError(
                f"'{path}' is an {'SDXL' if folder_xl else 'SD1.5'} pipeline folder: load it with {dmm_pipeline_class(path).__name__}.from_official"
            )
        unet = load_official_unet(Path(path) / "unet")
        # from_pretrained leaves a passed component in its own dtype; `dtype=` is diffusers' name for it since 0.42
        # (`torch_dtype=` deprecated): given as dtype=, the UNet stayed float32 beside a half-precision pipeline
        dtype = kwargs.get("torch_dtype") if kwargs.get("dtype") is None else kwargs["dtype"]
        dtype = dtype.get("unet", dtype.get("default")) if isinstance(dtype, dict) else dtype
        unet = unet if dtype is None else unet.to(dtype)
        return cls.from_pretrained(path, unet=unet, **{**pipeline_kwargs(cls), **kwargs})

    @classmethod
    def paper_scheduler(cls, scheduler) -> DPMSolverMultistepScheduler:
        """DPM-Solver++ with the given scheduler's noise schedule."""
        return DPMSolverMultistepScheduler.from_config(scheduler.config, algorithm_type="dpmsolver++")


def default_strength(parent_call):
    """The loop's own default `strength` (SDXL img2img: 0.3), None where it takes none. Read from its signature
    once per class, when _styled_call wraps the loop, not on every call."""
    import inspect

    parameter = inspect.signature(parent_call).parameters.get("strength")
    return None if parameter is None else parameter.default


def check_denoising_steps(pipe, strength_default, kwargs: dict) -> None:
    """A loop that starts from an image (img2img, inpainting, their ControlNet forms) denoises only the last
    int(num_inference_steps * strength) steps. Where that is 0 (2 steps at strength 0.3; the few-step model's own 4
    steps at strength 0.2), SD1.5 img2img and the ControlNet img2img / inpainting loops ran the UNet on an empty batch
    of timesteps and failed with "cannot reshape tensor of 0 elements": a ValueError naming both numbers instead.
    `strength_default`: the loop's own (default_strength), for a call that gives none."""
    import math

    if any(kwargs.get(key) is not None for key in ("timesteps", "sigmas", "denoising_start")):
        return  # a given schedule, or SDXL's denoising_start: strength does not set the steps
    strength = kwargs.get("strength", strength_default)
    steps = kwargs["num_inference_steps"]
    if not isinstance(strength, numbers.Real) or not 0 <= strength <= 1 or not isinstance(steps, numbers.Integral):
        return  # no strength, or one diffusers' own check names
    if int(steps * strength) >= 1:
        return
    fewest = (
        ""
        if strength <= 0
        else f" or num_inference_steps to at least {next(n for n in range(max(1, math.ceil(1 / strength)), 10**6) if int(n * strength) >= 1)}"
    )
    raise ValueError(
        f"num_inference_steps={steps} at strength={strength:g} denoises no step ({type(pipe).__name__} runs the last "
        f"int(num_inference_steps * strength) = 0 of them): raise strength to at least {math.ceil(1000 / steps) / 1000:g}{fewest}"
    )


def _styled_call(parent_call, regional: bool = True):
    """`__call__` for a style pipeline: resolve style/style_weights, then run the parent's loop.
    `regional=False`: a loop that starts from an image (img2img, inpainting) takes no regions= or panorama."""
    strength_default = None if regional else default_strength(parent_call)

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        *,  # the rest by keyword: diffusers' positional (prompt, height, width, ...) would bind style=
        style: Any = None,
        style_weights: Any = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        num_images_per_prompt: int = 1,
        regions: Any = None,
        background: Any = None,
        style_map: Any = None,
        window_stride: int | None = None,
        max_batch: int | None = None,
        feather: float | None = None,
        region_window: int | str | None = None,
        region_decode: bool = False,
        **kwargs,
    ):
        if isinstance(num_images_per_prompt, bool) or not isinstance(num_images_per_prompt, numbers.Integral) or num_images_per_prompt < 1:
            # 0 failed deep in the text encoder ("cannot reshape tensor of 0 elements"), 2.0 in repeat_interleave
            raise ValueError(f"num_images_per_prompt must be a whole number >= 1, got {num_images_per_prompt!r}")
        if num_inference_steps is None or guidance_scale is None:  # the model's own sampler (paper: 25, CFG 7; few-step: 4, CFG off)
            defaults = self.sampler_defaults
            num_inference_steps = defaults["num_inference_steps"] if num_inference_steps is None else num_inference_steps
            guidance_scale = defaults["guidance_scale"] if guidance_scale is None else guidance_scale
        kwargs.update(num_inference_steps=num_inference_steps, guidance_scale=guidance_scale)
        most = max_inference_steps(self.scheduler)
        if most is not None and kwargs.get("timesteps") is None and kwargs.get("sigmas") is None and num_inference_steps > most:
            # diffusers' TCD / LCM error told a text-to-image call to "increase `strength`", which it does not take
            raise ValueError(
                f"num_inference_steps={num_inference_steps}: this few-step model's {type(self.scheduler).__name__} samples at most {most} "
                f"steps (its training grid, original_inference_steps); give 1 to {most} (or none: the model's own, "
                f"{self.sampler_defaults['num_inference_steps']})"
            )
        if not regional:
            check_denoising_steps(self, strength_default, kwargs)
        if any(a is not None for a in (regions, style_map, window_stride, background, region_window)) or region_decode:
            if not regional:
                raise ValueError(
                    f"{type(self).__name__} starts from an image: regions= and panoramas (style_map=, window_stride=, background=, "
                    "region_window=, region_decode=) go with DMMPipeline / DMMXLPipeline; here give style= or style_weights="
                )
            # Regional styles / panoramas (dmm_ray/regions.py): one batched UNet call per step over all views.
            from dmm_ray.regions import regional_call

            return regional_call(
                self,
                parent_call,
                prompt,
                regions=regions,
                background=background,
                style=style,
                style_weights=style_weights,
                style_map=style_map,
                window_stride=window_stride,
                max_batch=max_batch,
                feather=feather,
                region_window=region_window,
                region_decode=region_decode,
                num_images_per_prompt=num_images_per_prompt,
                kwargs=kwargs,
            )
        if max_batch is not None:
            raise ValueError("max_batch= applies to regions= or a panorama (style_map=, window_stride=)")
        if feather is not None:  # not "or a panorama": a panorama refuses it too (its windows blend with tile weights)
            from dmm_ray.regions import RegionError

            raise RegionError("feather= goes with regions= (the regions' soft edges); a plain call or a panorama takes none")
        return self._style_call(parent_call, prompt, style, style_weights, num_images_per_prompt, kwargs)

    return __call__


class DMMPipeline(_StyleCallMixin, StableDiffusionPipeline):
    """Style-promptable SD1.5-architecture pipeline. `pipe(prompt, style="anime")`."""

    __call__ = _styled_call(StableDiffusionPipeline.__call__)

    @classmethod
    def from_components(cls, student: StyleUNet, vae, text_encoder, tokenizer, scheduler) -> "DMMPipeline":
        return cls(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=student,
            scheduler=cls.paper_scheduler(scheduler),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )


class DMMXLPipeline(_StyleCallMixin, StableDiffusionXLPipeline):
    """Style-promptable SDXL-architecture pipeline (SDXL's text_time embedding kept)."""

    __call__ = _styled_call(StableDiffusionXLPipeline.__call__)


def dmm_pipeline_class(folder: str | Path):
    """DMMPipeline or DMMXLPipeline for a merged (or base) folder."""
    return DMMXLPipeline if is_sdxl(folder) else DMMPipeline


def load_dmm_pipeline(path: str | Path, **kwargs):
    """A merged model folder as DMMPipeline / DMMXLPipeline, offline (see `architectures.merged_folder`).
    A URI (`s3://bucket/merges/toy/merged`, `file:///...`: jobs/merge.py's <output_dir>/merged) is
    first downloaded through pyarrow to `$DMM_HOME/cache/download/<name>-<hash>` (refreshed each load)."""
    if "://" in str(path):
        from dmm_ray.data import fs as fsu

        path = fsu.local_copy(str(path), model=True)  # never a half-uploaded folder (fsu.model_to_read)
    from dmm_ray.output_lock import reading

    with reading(path):  # a merge's save waits for this load before it replaces the folder (README "one merge per output_dir")
        path = merged_folder(path)
        cls = dmm_pipeline_class(path)
        return cls.from_pretrained(str(path), **{"local_files_only": True, **pipeline_kwargs(cls), **kwargs})
