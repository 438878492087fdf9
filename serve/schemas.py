"""HTTP request/response models and the request -> per-image samples resolution.

Shape checks (types, ranges that never change) live in the pydantic models; checks that
depend on the served model (known styles) or on ServeConfig limits live in
`resolve_request`, which raises `RequestError(status, message)` -> a 4xx JSON body.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from typing import Literal, Optional, Sequence, Union

from pydantic import BaseModel, ConfigDict, Field

from dmm_ray.defaults import PAPER_GUIDANCE, PAPER_STEPS
from dmm_ray.styles import StyleError, resolve
from serve.config import ServeConfig

# 2**31 - 1 so a seed fits every RNG (torch, numpy) and `seed + k` for k < max_images too.
MAX_SEED = 2**31 - 1 - 1024
# Regional styles: each region is one more row of the batched UNet call per step.
MAX_REGIONS = 8
MAX_LORA_WEIGHT = 10.0


class RequestError(Exception):
    """A client error: `status` (4xx) and a message that says what would be right."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message

    def __reduce__(self):  # crosses process boundaries (a model replica's per-sample error) intact
        return (type(self), (self.status, self.message))


class ErrorResponse(BaseModel):
    """Every 4xx/5xx body of the API: one readable message."""

    error: str = Field(..., description="what was wrong and what would be right")


class StyleInfo(BaseModel):
    index: int
    name: str
    description: str = ""


class StylesResponse(BaseModel):
    styles: list[StyleInfo]
    default_steps: int
    default_guidance: float
    sampler: str = Field(
        "DPMSolverMultistepScheduler",
        description="the model's scheduler: TCDScheduler or LCMScheduler for a few-step model (jobs/fast.py), DPMSolverMultistepScheduler for a merged one",
    )
    default_negative_prompt: str = Field("", description="the negative prompt used when a request gives none (the model's own)")
    default_width: int
    default_height: int
    limits: dict
    lora: list[str] = Field(default_factory=list, description="names of the preloaded LoRA adapters (`lora` in /generate)")


class RegionRequest(BaseModel):
    """One styled part of the image: a box in fractions of the canvas, its style, optionally its prompt."""

    model_config = ConfigDict(extra="forbid", strict=True)  # strict: `style: true` is a 422, never 1

    box: list[float] = Field(..., min_length=4, max_length=4, description="[x0, y0, x1, y1] as fractions of width/height, 0 <= x0 < x1 <= 1")
    style: Optional[Union[int, str]] = Field(None, description="style name or index of this region")
    weights: Optional[Union[dict[str, float], list[float]]] = Field(None, description="mixture over styles for this region")
    prompt: Optional[str] = Field(None, description="this region's own prompt; default: the request's prompt")


class GenerateRequest(BaseModel):
    """POST /generate body. Give `style` (name or index) OR `weights` (a mixture), not both."""

    model_config = ConfigDict(extra="forbid", strict=True)  # strict: `style: true` is a 422, never 1

    prompt: Union[str, list[str]] = Field(..., description="one prompt, or a list (one image set per prompt)")
    style: Optional[Union[int, str]] = Field(None, description="style name or index; default: style 0")
    weights: Optional[Union[dict[str, float], list[float]]] = Field(
        None, description="mixture over styles: {name: weight} or one weight per style; >= 0, normalised to sum 1"
    )
    negative_prompt: Optional[str] = Field(
        None, description="default: the model's own (its sampler.json: a merge's synthesis setting), else the paper's negative prompt"
    )
    steps: Optional[int] = Field(None, ge=1, description="num_inference_steps (default from server config)")
    guidance: Optional[float] = Field(None, ge=0, le=50, allow_inf_nan=False, description="classifier-free guidance scale")
    width: Optional[int] = Field(None, ge=8, description="multiple of 8; default: the model's native size")
    height: Optional[int] = Field(None, ge=8, description="multiple of 8; default: the model's native size")
    seed: Optional[int] = Field(None, ge=0, le=MAX_SEED, description="image k of the request uses seed + k; default random")
    num_images: int = Field(1, ge=1, description="images per prompt")
    response_format: Literal["auto", "png", "json"] = Field(
        "auto", description="auto: PNG when the request makes one image, else JSON with base64 PNGs"
    )
    regions: Optional[list[RegionRequest]] = Field(
        None,
        description="regional styles: [{box: [x0, y0, x1, y1] (fractions), style | weights, prompt?}]; the request's "
        "style/weights, if given, fill what the boxes leave (the background); one batched UNet pass per step",
    )
    region_window: Literal["canvas", "native"] = Field(
        "canvas",
        description="with regions: canvas = every region view is the whole canvas (two regions of one style give the plain image); "
        "native = each view a native-size window around its region (cheaper on canvases wider or taller than the model's native size)",
    )
    region_decode: bool = Field(
        False, description="with regions: decode each region's window of the final latent alone and blend the images (keeps each style's colours)"
    )
    feather: Optional[float] = Field(
        None,
        ge=0,
        le=1024,
        allow_inf_nan=False,
        description="with regions: Gaussian sigma of the regions' soft edges in image pixels, 0 = hard edges; default max(VAE factor, min(width, height) / 16)",
    )
    lora: Optional[dict[str, float]] = Field(
        None, description="LoRA adapters preloaded by the server (GET /styles lists them), {name: weight}; default none"
    )


class ExportCommandRequest(BaseModel):
    """POST /export_command body: the style (or mixture) whose `jobs/export.py` command to show."""

    model_config = ConfigDict(extra="forbid", strict=True)  # strict: `style: true` is a 422, never 1

    style: Optional[Union[int, str]] = Field(None, description="style name or index")
    weights: Optional[Union[dict[str, float], list[float]]] = Field(None, description="a mixture, as for /generate")
    format: Literal["single_file", "diffusers"] = Field("single_file", description="jobs/export.py --format")


class GeneratedImage(BaseModel):
    prompt: str
    seed: int
    png_base64: str


class RegionInfo(BaseModel):
    box: list[float]
    mixture: dict[str, float]
    prompt: Optional[str] = None


class GenerateResponse(BaseModel):
    images: list[GeneratedImage]
    seed: int
    mixture: dict[str, float]
    regions: Optional[list[RegionInfo]] = None
    steps: int
    guidance: float
    width: int
    height: int
    lora: dict[str, float] = Field(default_factory=dict)


@dataclass(frozen=True)
class Sample:
    """One image to generate: everything a model replica needs, per sample.

    `weights` has one entry per style (sums to 1); a batch may mix any samples that share
    (steps, guidance, width, height): the style is a per-sample embedding.
    """

    prompt: str
    negative_prompt: Optional[str]
    weights: tuple[float, ...]
    steps: int
    guidance: float
    width: int
    height: int
    seed: int
    # Regional styles: ((x0, y0, x1, y1), weights, prompt or None) per region; `background` (weights or
    # None) fills what the boxes leave. Samples batch together only with the same regions.
    regions: tuple = ()
    background: Optional[tuple[float, ...]] = None
    lora: tuple[tuple[str, float], ...] = ()  # preloaded adapters (name, weight), sorted; () = none
    region_window: str = "canvas"  # the regions' views: "canvas" or "native" (dmm_ray.regions, region_window=)
    region_decode: bool = False  # decode each region's window alone (dmm_ray.regions, region_decode=)
    # The regions' edge sigma in image pixels; resolve_request fills in the pipeline's default (None: the pipeline's)
    feather: Optional[float] = None
    # The model's style names, in order, that `weights` (and the regions') were resolved against: the replica
    # refuses the sample when its own differ (the model was reloaded with other styles). () = not checked.
    styles: tuple[str, ...] = ()

    def group_key(self) -> tuple:
        # Samples with different regions or LoRA sets never share a forward (both are set per forward).
        return (
            self.steps,
            self.guidance,
            self.width,
            self.height,
            self.regions,
            self.background,
            self.region_window,
            self.region_decode,
            self.feather,
            self.lora,
        )


@dataclass
class ResolvedRequest:
    samples: list[Sample]
    mixture: dict[str, float]
    seed: int
    response_format: str
    steps: int
    guidance: float
    width: int
    height: int
    prompts: list[str] = field(default_factory=list)
    regions: Optional[list[RegionInfo]] = None
    lora: dict[str, float] = field(default_factory=dict)


def resolve_lora(lora: Optional[dict[str, float]], known: Sequence[str]) -> tuple[tuple[str, float], ...]:
    """A request's `lora` -> sorted (name, weight) pairs of preloaded adapters (zero weights dropped)."""
    if not lora:
        return ()
    unknown = [name for name in lora if name not in known]
    if unknown:
        listed = ", ".join(repr(n) for n in known) if known else "none (the server preloads no LoRA adapters)"
        raise RequestError(422, f"unknown LoRA adapter(s) {unknown}; preloaded adapters: {listed}")
    bad = {n: w for n, w in lora.items() if w != w or abs(w) == float("inf") or abs(w) > MAX_LORA_WEIGHT}
    if bad:
        raise RequestError(422, f"LoRA weights must be finite numbers in [-{MAX_LORA_WEIGHT:g}, {MAX_LORA_WEIGHT:g}], got {bad}")
    return tuple(sorted((n, float(w)) for n, w in lora.items() if w != 0))


def check_encodable(where: str, text: str) -> None:
    """JSON's \\ud800-style escapes can carry a lone surrogate, which is no Unicode text: the tokenizer
    raises on it inside the model (a 500 for the request). A 422 naming the field instead."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise RequestError(
            422, f"{where} holds an unpaired surrogate (\\u{ord(text[error.start]):04x} at character {error.start}); send valid Unicode text"
        ) from None


def resolve_mixture(style_names: list[str], style, weights) -> list[float]:
    """(`style` | `weights`; neither: style 0) -> a normalised weight per style (`dmm_ray.styles.resolve`,
    the resolver the pipeline uses); its StyleError becomes a 422 naming the known styles."""
    try:
        return resolve(style_names, style, weights, default=0)
    except StyleError as error:
        raise RequestError(422, str(error)) from None


def resolve_request(
    req: GenerateRequest,
    style_names: list[str],
    cfg: ServeConfig,
    native_size: tuple[int, int],
    lora_names: Sequence[str] = (),
    *,
    vae_scale_factor: int,
) -> ResolvedRequest:
    """Check a request against the model and the limits; expand it into per-image samples.
    `vae_scale_factor`: the model's (image pixels per latent cell), for the regions' coverage."""
    lim = cfg.limits
    prompts = [req.prompt] if isinstance(req.prompt, str) else list(req.prompt)
    if not prompts:
        raise RequestError(422, "prompt list is empty; give at least one non-empty prompt")
    for i, p in enumerate(prompts):
        where = "prompt" if isinstance(req.prompt, str) else f"prompt[{i}]"
        if not p.strip():
            raise RequestError(422, f"{where} is empty; give a text prompt")
        if len(p) > lim.max_prompt_chars:
            raise RequestError(422, f"prompt has {len(p)} characters; the maximum is {lim.max_prompt_chars}")
        check_encodable(where, p)
    if req.negative_prompt is not None:
        if len(req.negative_prompt) > lim.max_prompt_chars:
            raise RequestError(422, f"negative_prompt longer than {lim.max_prompt_chars} characters")
        check_encodable("negative_prompt", req.negative_prompt)

    weights = resolve_mixture(style_names, req.style, req.weights)
    regions, background = (), None
    if req.regions is not None:
        regions = resolve_regions(req.regions, style_names, lim.max_prompt_chars)
        if req.style is not None or req.weights is not None:
            background = tuple(weights)
    else:
        for name, unset in (("region_window", "canvas"), ("region_decode", False), ("feather", None)):
            if getattr(req, name) != unset:
                raise RequestError(422, f"{name}={getattr(req, name)!r} goes with regions; give regions or leave {name} out")
    lora = resolve_lora(req.lora, list(lora_names))

    # cfg.default_steps: the router sets the model's own default; PAPER_STEPS only for a config without one
    steps = (cfg.default_steps if cfg.default_steps is not None else PAPER_STEPS) if req.steps is None else req.steps
    if steps > lim.max_steps:
        # A request without steps gets the server's default_steps: one above the limit (a merged model's 25 with
        # a few-step model's 10-step grid) is the config's to fix, not steps the request sent
        raise RequestError(
            422,
            f"steps={steps} is above the maximum {lim.max_steps}"
            + (
                ""
                if req.steps is not None
                else f" (the server's default_steps, as the request gives none: send steps of at most {lim.max_steps}, or lower default_steps in the serve config)"
            ),
        )
    width = native_size[0] if req.width is None else req.width
    height = native_size[1] if req.height is None else req.height
    for name, value, top in (("width", width, lim.max_width), ("height", height, lim.max_height)):
        if value % 8:  # the hint is within the limit (a multiple of 8 too): width=1001 suggested 1000, itself a 422 above 768
            raise RequestError(422, f"{name}={value} is not a multiple of 8 (try {min(max(8, value // 8 * 8), top)})")
        if value > top:
            given = getattr(req, name) is not None  # else the model's native size: the server's limits are too low for it
            raise RequestError(
                422,
                f"{name}={value} is above the maximum {top}"
                + ("" if given else f" (the model's native {name}, as the request gives none: send a smaller {name}, or raise limits.max_{name})"),
            )
    feather = req.feather
    if regions:
        # The pipeline's own rules, at this size's latent grid: a box that covers nothing there is refused (a
        # RegionError of the pipeline's was a 500), and without a background a box covering part of a latent cell
        # covers it (the exact area would refuse a sliver between boxes that the model renders).
        from dmm_ray.regions import RegionError, boxes_uncovered, default_feather

        if feather is None:  # the pipeline's default, filled in here: a request that sends it batches with one that omits it
            feather = default_feather((height, width), vae_scale_factor)

        try:
            gap = boxes_uncovered([r[0] for r in regions], (height, width), vae_scale_factor, [f"regions[{i}]" for i in range(len(regions))])
        except RegionError as error:
            raise RequestError(422, str(error)) from None
        if gap and background is None:
            raise RequestError(422, f"{gap}; add a region there or give `style`/`weights` for the background")
    total = len(prompts) * req.num_images
    if total > lim.max_images:
        raise RequestError(
            422,
            f"request asks for {total} images ({len(prompts)} prompt(s) x num_images={req.num_images}); the maximum is {lim.max_images}",
        )
    guidance = (cfg.default_guidance if cfg.default_guidance is not None else PAPER_GUIDANCE) if req.guidance is None else req.guidance
    seed = secrets.randbelow(MAX_SEED) if req.seed is None else req.seed

    samples = []
    k = 0
    for p in prompts:
        for _ in range(req.num_images):
            samples.append(
                Sample(
                    prompt=p,
                    negative_prompt=req.negative_prompt,
                    weights=tuple(weights),
                    steps=steps,
                    guidance=float(guidance),
                    width=width,
                    height=height,
                    seed=seed + k,
                    regions=regions,
                    background=background,
                    lora=lora,
                    region_window=req.region_window,
                    region_decode=req.region_decode,
                    feather=feather,
                    styles=tuple(style_names),
                )
            )
            k += 1
    fmt = req.response_format
    if fmt == "auto":
        fmt = "png" if len(samples) == 1 else "json"
    if fmt == "png" and len(samples) != 1:
        raise RequestError(422, f"response_format='png' needs exactly one image; this request makes {len(samples)}")
    mixture = named_mixture(style_names, weights)
    info = None
    if regions:
        mixture = {} if background is None else mixture
        info = [RegionInfo(box=list(box), mixture=named_mixture(style_names, w), prompt=p) for box, w, p in regions]
    return ResolvedRequest(samples, mixture, seed, fmt, steps, float(guidance), width, height, prompts, info, dict(lora))


def named_mixture(style_names: list[str], weights) -> dict[str, float]:
    """{name: weight} of a mixture, at 6 decimals; a weight that rounds to 0 is left out."""
    return {name: round(w, 6) for name, w in zip(style_names, weights) if round(w, 6) > 0}


def resolve_regions(regions: list[RegionRequest], style_names: list[str], max_prompt_chars: int) -> tuple:
    """Check each region (box, style, prompt); RequestError(422) naming the region: `regions[i]`."""
    if not regions:
        raise RequestError(422, "regions is empty; give at least one {box, style} or leave regions out")
    if len(regions) > MAX_REGIONS:
        raise RequestError(422, f"{len(regions)} regions; the maximum is {MAX_REGIONS}")
    out = []
    for i, r in enumerate(regions):
        where = f"regions[{i}]"
        x0, y0, x1, y1 = r.box
        if not all(v == v and abs(v) != float("inf") for v in r.box) or not (0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1):
            raise RequestError(
                422, f"{where}: box {r.box} must be [x0, y0, x1, y1] fractions of the canvas with 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1"
            )
        if r.style is None and r.weights is None:
            raise RequestError(
                422,
                f"{where}: give `style` (one style) or `weights` (a mixture); known styles: "
                + ", ".join(f"{k}={n!r}" for k, n in enumerate(style_names)),
            )
        try:
            w = resolve_mixture(style_names, r.style, r.weights)
        except RequestError as exc:
            raise RequestError(exc.status, f"{where}: {exc.message}") from None
        if r.prompt is not None and (not r.prompt.strip() or len(r.prompt) > max_prompt_chars):
            raise RequestError(422, f"{where}: prompt must be non-empty and at most {max_prompt_chars} characters (or left out)")
        if r.prompt is not None:
            check_encodable(f"{where}.prompt", r.prompt)
        out.append((tuple(float(v) for v in r.box), tuple(w), r.prompt))
    return tuple(out)
