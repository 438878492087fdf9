"""Regional styles and panoramas: several styles in one image, ONE batched UNet pass per step.

A merged model holds every style in one network and a batch may carry a different style per
sample, so K regional styles need no model switching (MultiDiffusion, Bar-Tal et al. 2023;
Mixture-of-Diffusers, Jiménez 2023; the DMM paper's panoramas, Fig. 11/21):

    every denoising step:
        views  = K copies of the latent (regions) or K windows of it (panorama tiles)
        eps_v  = UNet(views, t, prompt_v, style_v)          # ONE call over the batch (x2 under CFG)
        eps    = sum_v  w_v * eps_v   (w_v: soft masks normalised to sum 1 at every latent pixel)
        latent = scheduler.step(eps, t, latent)             # diffusers' own loop, one step

The pipeline's own diffusers loop runs unchanged (encode_prompt, prepare_latents, the scheduler,
CFG, guidance_rescale, callbacks, decoding): for the duration of the call the StyleUNet's
`forward` is replaced by `RegionalUNet`, which expands the pipeline's batch into views, makes one
UNet forward over all of them (in chunks of `max_batch` rows when set), and blends the noise
predictions back onto the shared latent. CFG is linear, so blending before or after the guidance
combination is the same.

Public API (also `DMMPipeline.__call__(regions=, background=, style_map=, ...)`):
    Region(box=(x0, y0, x1, y1) | mask=..., style=... | style_weights=..., prompt=None, feather=None)
    sweep("noir", "neon")     a panorama style map: a mixture that moves from A to B left to right
"""

from __future__ import annotations

import math
import numbers
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn.functional as F

from dmm_ray.models.style_unet import StyleError, resolve_style
from dmm_ray.styles import is_per_prompt

__all__ = [
    "Region",
    "sweep",
    "RegionalPlan",
    "View",
    "build_region_views",
    "region_windows",
    "RegionalDecode",
    "build_panorama_views",
    "regional_call",
    "feathered",
    "default_feather",
    "gaussian_window",
    "window_starts",
    "uncovered",
    "boxes_uncovered",
    "RegionError",
]


class RegionError(ValueError):
    """A malformed region, mask, box or style map (the message names the region)."""


@dataclass
class Region:
    """One styled part of the canvas.

    box:    (x0, y0, x1, y1) as fractions of the canvas width/height, 0 <= x0 < x1 <= 1.
    mask:   soft mask in [0, 1] at image size (H, W) or latent size (H/f, W/f); a tensor,
            numpy array or PIL image (uint8 masks and 8-bit images are read as 0..255, uint16 masks and 16-bit
            images as 0..65535, a float "F" image as [0, 1]).
    style / style_weights: one style (name or index; a list is refused: it is not one style) or a mixture
            (a dict name -> weight, or N weights), as for `pipe(style=...)`.
    prompt: this region's own prompt (default: the call's prompt).
    feather: Gaussian sigma of the soft edge in image pixels (default: the call's `feather`).
    name:   used in error messages (default: "region <i>").
    """

    box: Sequence[float] | None = None
    mask: Any = None
    style: Any = None
    style_weights: Any = None
    prompt: str | None = None
    feather: float | None = None
    name: str | None = None


def sweep(start: Any, end: Any) -> Callable[[float], dict]:
    """Panorama style map: at horizontal position x in [0, 1] the mixture (1 - x)·start + x·end,
    interpolated in codebook space (paper 4.5). `start`/`end`: style names or indices."""

    def style_at(x: float) -> dict:
        x = min(max(float(x), 0.0), 1.0)
        return {start: 1.0 - x, end: x} if start != end else {start: 1.0}

    style_at.sweep = (start, end)  # type: ignore[attr-defined]
    return style_at


@dataclass
class View:
    """One row of the batched UNet call: a latent window, its style, prompt and blend weight."""

    y0: int
    y1: int
    x0: int
    x1: int
    style_row: torch.Tensor  # (N,) normalised style weights
    weight: torch.Tensor  # (y1 - y0, x1 - x0) float32, normalised over the canvas (sum over views = 1)
    prompt_index: int | None = None  # index into RegionalPlan.prompts, None = the call's prompt
    label: str = ""

    @property
    def window(self) -> tuple[slice, slice]:
        return slice(self.y0, self.y1), slice(self.x0, self.x1)


@dataclass
class RegionalPlan:
    views: list[View]
    latent_size: tuple[int, int]  # (h, w)
    prompts: list[str] = field(default_factory=list)
    max_batch: int | None = None
    windowed: bool = False  # views are tiles smaller than the canvas (SDXL: per-tile size ids)


# ---- geometry -------------------------------------------------------------------------------
def _gaussian_kernel(sigma: float) -> torch.Tensor:
    radius = max(1, int(math.ceil(3 * sigma)))
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (x / sigma) ** 2)  # not x**2 / sigma**2: a tiny sigma's square underflows to 0, and 0/0 is NaN
    return (k / k.sum()).float()


def feathered(mask: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian blur (separable, edge values replicated: a region touching the canvas edge stays
    solid there) of a (h, w) mask; sigma in latent pixels, 0 = hard edges."""
    if sigma <= 0:
        return mask.clone()
    x = mask[None, None].float()
    k = _gaussian_kernel(sigma).to(x.device)  # built on the CPU; conv2d wants it where the mask is (a CUDA mask)
    r = (k.numel() - 1) // 2
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="replicate"), k.view(1, 1, 1, -1))
    x = F.conv2d(F.pad(x, (0, 0, r, r), mode="replicate"), k.view(1, 1, -1, 1))
    return x[0, 0]


def _box_coverage(a: float, b: float, n: int) -> torch.Tensor:
    """Fraction of each of n equal cells of [0, 1] covered by [a, b]."""
    edges = torch.arange(n + 1, dtype=torch.float64) / n
    cover = torch.minimum(edges[1:], torch.tensor(b, dtype=torch.float64)) - torch.maximum(edges[:-1], torch.tensor(a, dtype=torch.float64))
    return (cover.clamp(min=0) * n).clamp(max=1).float()


def box_mask(box: Sequence[float], latent_size: tuple[int, int], label: str = "region") -> torch.Tensor:
    """(x0, y0, x1, y1) fractions -> (h, w) coverage mask (anti-aliased at cell edges)."""
    try:
        x0, y0, x1, y1 = (float(v) for v in box)
    except (TypeError, ValueError):
        raise RegionError(f"{label}: box must be 4 numbers (x0, y0, x1, y1) as fractions of the canvas, got {box!r}") from None
    if not all(math.isfinite(v) for v in (x0, y0, x1, y1)):
        raise RegionError(f"{label}: box values must be finite, got {list(box)}")
    if not (0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1):
        raise RegionError(f"{label}: box {list(box)} must be fractions of the canvas with 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1")
    h, w = latent_size
    mask = _box_coverage(y0, y1, h)[:, None] * _box_coverage(x0, x1, w)[None, :]
    if float(mask.max()) <= 0:  # a box whose share of a cell (x1 - x0 below ~1e-45, or such products) rounds to 0 in float32
        raise RegionError(f"{label}: its box {list(box)} covers nothing (all zero) on the {h}x{w} latent grid; widen it")
    return mask


# the integer masks read on an image's scale: 8-bit and 16-bit images (PNGs) and their arrays; a uint16 array was
# read as its raw values (refused above 1) while the same values as a 16-bit PIL image were read as 0..65535
IMAGE_SCALES = {torch.uint8: 255, torch.uint16: 65535}


def _as_mask_tensor(mask: Any, label: str) -> torch.Tensor:
    if hasattr(mask, "convert") and hasattr(mask, "size"):  # PIL image
        import numpy as np

        if mask.mode == "F":  # a float image holds the [0, 1] weights themselves: convert("L") would truncate 0.5 to 0
            mask = np.array(mask, dtype=np.float32)
        elif mask.mode.startswith("I;16"):  # a 16-bit image (a 16-bit PNG): convert("L") clips every value above 255 to 1
            mask = np.array(mask).astype(np.uint16)  # native byte order (I;16B is big-endian); read as a uint16 array below
        elif mask.mode == "I" and mask.getextrema()[1] > 255:  # 32-bit integers: their scale is unknown, and "L" would clip them
            raise RegionError(f"{label}: a 32-bit integer PIL image (mode I) with values above 255 has no known scale; pass a float array in [0, 1]")
        else:
            mask = np.array(mask.convert("L"))
    raw = torch.as_tensor(mask)
    if raw.device.type != "cpu":
        # the plan is built on the CPU (box masks, background, normalisation: tensors of latent size) and each
        # view's weight moved to the latents' device where it is used; a mask on the GPU would meet them there
        raw = raw.cpu()
    scale = IMAGE_SCALES.get(raw.dtype)
    if scale is not None:
        kind = str(raw.dtype).removeprefix("torch.")
        raw = raw.to(torch.int32)  # lossless; torch has no max() for uint16
        if raw.numel() and int(raw.max()) == 1:  # a 0/1 mask would weigh 1/255 (1/65535): almost nothing
            raise RegionError(
                f"{label}: a {kind} mask is read as 0..{scale} but this one's maximum is 1; pass mask * {scale}, or a bool or float mask"
            )
        t = raw.float() / scale
    elif raw.dtype == torch.bool:
        t = raw.float()
    else:
        t = raw.float()
    return _checked_mask(t, label, tuple(raw.shape))


def _checked_mask(t: torch.Tensor, label: str, shape: tuple) -> torch.Tensor:
    """A float mask -> (H, W), its values checked to be in [0, 1]; `shape`: as given, for the message."""
    while t.ndim > 2 and t.shape[0] == 1:  # (1, H, W) / (1, 1, H, W)
        t = t[0]
    if t.ndim != 2:
        raise RegionError(f"{label}: mask must be 2-D (H, W), got shape {tuple(shape)}")
    if not torch.isfinite(t).all() or t.min() < 0 or t.max() > 1:
        raise RegionError(f"{label}: mask values must be in [0, 1] (or uint8 0..255, uint16 0..65535)")
    return t


def region_mask(region: Region, image_size: tuple[int, int], latent_size: tuple[int, int], label: str) -> torch.Tensor:
    """A Region's hard (unfeathered) mask at latent size (h, w)."""
    if (region.box is None) == (region.mask is None):
        raise RegionError(f"{label}: give exactly one of box= or mask=")
    if region.box is not None:
        return box_mask(region.box, latent_size, label)  # refuses a box that covers nothing itself (Serve checks boxes with it)
    mask = _as_mask_tensor(region.mask, label)
    (H, W), (h, w) = image_size, latent_size
    if tuple(mask.shape) == (H, W):
        mask = F.adaptive_avg_pool2d(mask[None, None], (h, w))[0, 0] if (H, W) != (h, w) else mask
    elif tuple(mask.shape) != (h, w):
        raise RegionError(
            f"{label}: mask is {mask.shape[0]}x{mask.shape[1]} (HxW) but this image is {H}x{W} "
            f"(latent {h}x{w}); give the mask at image or latent size"
        )
    if float(mask.max()) <= 0:
        raise RegionError(f"{label}: its mask covers nothing (all zero)")
    return mask


def _check_one_style(style: Any, setting: str, mixture: str, style_names: Sequence[str], weights_ok: bool = False) -> None:
    """A region's style= (or background=, or a style_map entry's style) is one style: a list there is what
    `pipe(style=[...])` reads as one style per prompt, and `resolve_style` would read it as mixture weights
    ("2 entries" for two names of three styles, and [2, 0, 1] as the weights 2:0:1, silently). `mixture`:
    where a mixture goes instead, "{}" standing for the dict (style_weights={}, background={}, a style_map
    entry (x0, x1, {})). `weights_ok`: N numbers are a mixture's weights there (background=, which the call's
    style_weights= and Serve's regions fill; a style_map entry, whose style is all it has), names are not."""
    if not (isinstance(style, (list, tuple)) or getattr(style, "ndim", 0) >= 1):
        return
    items = style.tolist() if hasattr(style, "tolist") else list(style)
    if weights_ok and not any(isinstance(v, str) for v in items):
        return
    named = [style_names[v] if isinstance(v, int) and 0 <= v < len(style_names) else v for v in items]  # indices by name
    example = ", ".join(f"{name!r}: 0.5" for name in list(dict.fromkeys([*(v for v in named if isinstance(v, str)), *style_names]))[:2])
    what = "one style (a name or an index)" + (" or one weight per style" if weights_ok else "")
    raise StyleError(
        f"{setting} is {what}, got the list {items!r}; a part of the canvas has one style for every prompt: for a "
        f"mixture give {mixture.format('{' + example + '}')} (a dict name -> weight); known styles: {', '.join(style_names)}"
    )


def uncovered(union: torch.Tensor, vae_scale_factor: int) -> str | None:
    """The coverage rule of regions without a background (the pipeline's, and Serve's before a request
    reaches a model): a latent cell is covered when some region's hard mask is > 0 there, so a box that
    covers part of a cell covers it (its feathered weights, normalised to sum 1, fill the cell). None when
    every cell of `union` (the regions' hard masks summed, (h, w)) is covered, else what is left, for a message."""
    holes = union <= 0
    if not bool(holes.any()):
        return None
    y, x = (int(v) * vae_scale_factor for v in torch.nonzero(holes)[0])
    # a few cells (a mask's pinhole) would read "0%": the share to 2 digits, and where the first one is;
    # a few covered cells would read "100%", which says nothing is covered: tenths, rounded down, from 99.5%
    pct = float(holes.float().mean()) * 100
    if pct < 1:
        share = f"{pct:.2g}%"
    elif pct < 99.5 or pct == 100:
        share = f"{pct:.0f}%"
    else:
        share = f"{math.floor(pct * 10) / 10:.1f}%"
    return f"the regions leave {share} of the canvas uncovered ({int(holes.sum())} latent cell(s), the first at x={x}, y={y} px)"


def boxes_uncovered(
    boxes: Sequence[Sequence[float]], image_size: tuple[int, int], vae_scale_factor: int, labels: Sequence[str] | None = None
) -> str | None:
    """`uncovered` for boxes (fractions of an image of `image_size` (H, W)), as the pipeline draws them; a box
    the pipeline refuses (one that covers nothing at this size) is its RegionError, named by `labels[i]`
    (default "box <i>"), so Serve refuses it before it reaches a model."""
    latent = (image_size[0] // vae_scale_factor, image_size[1] // vae_scale_factor)
    labels = [f"box {i}" for i in range(len(boxes))] if labels is None else labels
    return uncovered(torch.stack([box_mask(b, latent, label) for b, label in zip(boxes, labels)]).sum(0), vae_scale_factor)


def _region_style(style_names: Sequence[str], region: Region, label: str) -> torch.Tensor:
    if (region.style is None) == (region.style_weights is None):
        raise StyleError(f"{label}: give exactly one of style= or style_weights=; known styles: {', '.join(style_names)}")
    if region.style is not None:
        _check_one_style(region.style, f"{label}: style=", "style_weights={}", style_names)
    try:
        return resolve_style(style_names, region.style if region.style is not None else region.style_weights)
    except StyleError as exc:
        raise StyleError(f"{label}: {exc}") from None


def default_feather(image_size: tuple[int, int], vae_scale_factor: int) -> float:
    """The regions' edge sigma in image pixels when a call gives no `feather`: max(VAE factor, min(H, W) / 16).
    Serve fills it in before batching, so a request that omits it and one that sends it share a forward."""
    H, W = image_size
    return max(float(vae_scale_factor), min(H, W) / 16)


def _check_feather(value: Any, label: str) -> float:
    """A feather sigma (the call's or a Region's): a finite real >= 0 in image pixels; a str or bool is refused, not converted."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value < 0:
        raise RegionError(f"{label} must be a finite sigma >= 0 in image pixels, got {value!r}")
    return float(value)


def build_region_views(
    regions: Sequence[Region],
    style_names: Sequence[str],
    image_size: tuple[int, int],
    vae_scale_factor: int,
    background: Any = None,
    feather: float | None = None,
) -> tuple[list[View], list[str]]:
    """Full-canvas views, one per region (+ background): feathered masks normalised to sum 1 at every
    latent pixel (`region_windows` crops them to windows)."""
    H, W = image_size
    latent = (H // vae_scale_factor, W // vae_scale_factor)
    if not isinstance(regions, (list, tuple)) or not regions:
        raise RegionError("regions must be a non-empty list of Region(...)")
    if feather is None:
        feather = default_feather(image_size, vae_scale_factor)
    _check_feather(feather, "feather")
    prompts: list[str] = []
    hard, soft, rows, prompt_idx, labels = [], [], [], [], []
    for i, region in enumerate(regions):
        if isinstance(region, dict):
            unknown = sorted(set(region) - set(Region.__dataclass_fields__), key=str)
            if unknown:  # Region(**region) would be a TypeError naming neither the region nor the fields it takes
                raise RegionError(f"region {i}: unknown field(s) {unknown}; a region's fields are {', '.join(Region.__dataclass_fields__)}")
            region = Region(**region)
        if not isinstance(region, Region):
            raise RegionError(f"region {i}: expected Region(...) or a dict of its fields, got {type(region).__name__}")
        label = f"region {i}" + (f" ({region.name})" if region.name else "")
        mask = region_mask(region, image_size, latent, label)
        rows.append(_region_style(style_names, region, label))
        sigma = feather if region.feather is None else _check_feather(region.feather, f"{label}: feather")
        hard.append(mask)
        soft.append(feathered(mask, sigma / vae_scale_factor))
        if region.prompt is not None:
            if not isinstance(region.prompt, str) or not region.prompt.strip():
                raise RegionError(f"{label}: prompt must be a non-empty string (or None for the call's prompt)")
            prompts.append(region.prompt)
            prompt_idx.append(len(prompts) - 1)
        else:
            prompt_idx.append(None)
        labels.append(label)
    union = torch.stack(hard).sum(0).clamp(max=1)
    if background is not None:
        _check_one_style(background, "background=", "background={}", style_names, weights_ok=True)
        try:
            bg_row = resolve_style(style_names, background)
        except StyleError as exc:
            raise StyleError(f"background: {exc}") from None
        bg_hard = 1 - union
        if float(bg_hard.max()) > 0:
            hard.append(bg_hard)
            soft.append(feathered(bg_hard, feather / vae_scale_factor))
            rows.append(bg_row)
            prompt_idx.append(None)
            labels.append("background")
    else:
        gap = uncovered(union, vae_scale_factor)
        if gap:
            raise RegionError(f"{gap}; add a region there or pass background=<style>")
    total = torch.stack(soft).sum(0)
    if float(total.min()) <= 0:  # cannot happen for covered pixels; kept as a guard
        raise RegionError("some latent pixels have zero total region weight; widen the regions or pass background=")
    views = [View(0, latent[0], 0, latent[1], row, s / total, p, lab) for row, s, p, lab in zip(rows, soft, prompt_idx, labels)]
    return views, prompts


def _centred_start(start: int, end: int, length: int, size: int) -> int:
    """Start of a window of `length` cells centred on [start, end) (length >= end - start), inside [0, size)."""
    return min(max((start + end - length) // 2, 0), size - length)


def region_windows(views: list[View], min_size: tuple[int, int], margin: int = 0) -> list[View]:
    """Crop full-canvas region views to windows around their weights (Mixture-of-Diffusers tiles).

    Each window holds every latent pixel where its view's weight is non-zero (a feathered mask's
    support is finite: the Gaussian kernel stops at 3 sigma), so the blend is unchanged. A window is
    at least `min_size` (the model's native size: the UNet works at the size it was trained at), and
    all views share one size (the largest), so they still batch into ONE UNet call. A view then
    sees its own part of the canvas and a margin, not the other regions' content: less of their
    style reaches it through self-attention and GroupNorm statistics, and a step costs the windows'
    area instead of K whole canvases. Where every window would be the whole canvas (a canvas at or
    below the native size), the views come back unchanged. `margin`: latent cells each window holds
    beyond its weight's support on every side (the regional decode's `DECODE_MARGIN`)."""
    h, w = views[0].weight.shape
    supports = []
    for v in views:
        rows = torch.nonzero(v.weight.sum(1) > 0).flatten()
        cols = torch.nonzero(v.weight.sum(0) > 0).flatten()
        supports.append((int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1))
    wh = min(h, max([min_size[0]] + [b - a + 2 * margin for a, b, _, _ in supports]))
    ww = min(w, max([min_size[1]] + [d - c + 2 * margin for _, _, c, d in supports]))
    if (wh, ww) == (h, w):
        return views
    out = []
    for v, (a, b, c, d) in zip(views, supports):
        y0, x0 = _centred_start(a, b, wh, h), _centred_start(c, d, ww, w)
        weight = v.weight[y0 : y0 + wh, x0 : x0 + ww].clone()  # (wh, ww): all of the view's weight
        out.append(View(y0, y0 + wh, x0, x0 + ww, v.style_row, weight, v.prompt_index, v.label))
    return out


def window_starts(size: int, window: int, stride: int) -> list[int]:
    """Start offsets of windows of `window` cells with `stride` covering [0, size); the last one flush with the end."""
    if window >= size:
        return [0]
    starts = list(range(0, size - window + 1, stride))
    if starts[-1] != size - window:
        starts.append(size - window)
    return starts


def gaussian_window(h: int, w: int, sigma_frac: float = 0.25) -> torch.Tensor:
    """Mixture-of-Diffusers tile weights: a 2-D Gaussian centred on the tile, sigma = sigma_frac x side."""

    def g(n: int) -> torch.Tensor:
        x = torch.arange(n, dtype=torch.float64) - (n - 1) / 2
        return torch.exp(-(x**2) / (2 * (sigma_frac * n) ** 2))

    return (g(h)[:, None] * g(w)[None, :]).float()


def _style_map_ranges(style_names: Sequence[str], style_map: Sequence) -> list[tuple[float, float, torch.Tensor]]:
    """A style map's (x0, x1, style) entries -> (x0, x1, style row), every entry checked at once (not
    only those a window's centre happens to reach)."""
    ranges = []
    for i, entry in enumerate(style_map):
        try:
            a, b, style = entry
            a, b = float(a), float(b)
        except (TypeError, ValueError):
            raise RegionError(f"style_map entries must be (x0, x1, style) with fractions 0 <= x0 < x1 <= 1, got {entry!r}") from None
        if not (0 <= a < b <= 1):
            raise RegionError(f"style_map entry {i} {entry!r}: need 0 <= x0 < x1 <= 1 (fractions of the width)")
        # a list of names ("noir and neon here") failed as weights: "one entry per style, got 2 entries"
        _check_one_style(style, f"style_map entry {i}: its style", f"({a:g}, {b:g}, {{}})", style_names, weights_ok=True)
        try:
            ranges.append((a, b, resolve_style(style_names, style)))
        except StyleError as exc:
            raise StyleError(f"style_map entry {i}: {exc}") from None
    return ranges


def _style_map_row(style_names: Sequence[str], style_map: Any, x: float, fallback: torch.Tensor | None, label: str) -> torch.Tensor:
    """The style row at x (a fraction of the width): `style_map` is a function x -> style or the
    checked ranges of `_style_map_ranges` (the first one holding x); else `fallback`."""
    if style_map is None:
        if fallback is None:
            raise StyleError(f"{label}: no style: pass style_map= or style=")
        return fallback
    if callable(style_map):
        try:
            return resolve_style(style_names, style_map(x))
        except StyleError as exc:
            raise StyleError(f"{label}: {exc}") from None
    for a, b, row in style_map:
        if a <= x < b or (x == 1.0 and b == 1.0):
            return row
    if fallback is not None:  # style= / style_weights=: the panorama's default, where the map names no style
        return fallback
    raise RegionError(f"{label}: style_map has no range covering x = {x:.3f} (fraction of the width)")


def build_panorama_views(
    style_names: Sequence[str],
    image_size: tuple[int, int],
    vae_scale_factor: int,
    window: int,
    stride: int | None = None,
    style_map: Any = None,
    default_style: torch.Tensor | None = None,
    sigma_frac: float = 0.25,
) -> list[View]:
    """Overlapping native-size windows over a wide (or tall) canvas; each window's style from the
    style map at its centre (x as a fraction of the width); Gaussian tile weights normalised to 1."""
    H, W = image_size
    h, w = H // vae_scale_factor, W // vae_scale_factor
    if style_map is not None and not callable(style_map) and (isinstance(style_map, (str, bytes, Mapping)) or not isinstance(style_map, Sequence)):
        raise RegionError(f"style_map must be a list of (x0, x1, style) ranges (fractions of the width) or a function x -> style, got {style_map!r}")
    if style_map is not None and not callable(style_map):
        style_map = _style_map_ranges(style_names, style_map)
    if stride is not None:
        if isinstance(stride, bool) or not isinstance(stride, numbers.Integral) or stride <= 0 or stride % vae_scale_factor:
            raise RegionError(f"window_stride must be a positive multiple of {vae_scale_factor} pixels (an int), got {stride!r}")
        if stride > window:  # windows that do not touch leave canvas between them that nothing denoises
            raise RegionError(
                f"window_stride {stride} px is larger than the window ({window} px): the canvas between windows would never "
                f"be denoised; use at most {window} px (default {window // 2} px, windows overlapping by half)"
            )
    win = window // vae_scale_factor
    step = max(1, win // 2 if stride is None else int(stride) // vae_scale_factor)  # a one-cell window: half of it is 0
    wh, ww = min(win, h), min(win, w)
    boxes = [(y, x) for y in window_starts(h, wh, step) for x in window_starts(w, ww, step)]
    tile = gaussian_window(wh, ww, sigma_frac)
    total = torch.zeros(h, w)
    for y, x in boxes:
        total[y : y + wh, x : x + ww] += tile
    views = []
    for k, (y, x) in enumerate(boxes):
        label = f"window {k} (x {x * vae_scale_factor}..{(x + ww) * vae_scale_factor} px)"
        centre = (x + ww / 2) / w
        row = _style_map_row(style_names, style_map, centre, default_style, label)
        views.append(View(y, y + wh, x, x + ww, row, tile / total[y : y + wh, x : x + ww], None, label))
    if style_map is not None and not callable(style_map):
        # a window takes the style of the first entry holding its centre: an entry that holds no centre, or whose
        # centres all go to an earlier overlapping entry of another style, would be dropped from the image, silently
        centres = sorted({(x + ww / 2) / w for _, x in boxes})
        held_by = [[c for c in centres if a <= c < b or (c == 1.0 and b == 1.0)] for a, b, _ in style_map]  # as _style_map_row reads a range
        first: dict[float, int] = {}  # window centre -> the entry whose style it takes
        for i, held in enumerate(held_by):
            for c in held:
                first.setdefault(c, i)
        for i, ((a, b, row), held) in enumerate(zip(style_map, held_by)):
            if not held:
                raise RegionError(
                    f"style_map entry {i} ({a:g}..{b:g}) holds no window's centre (windows centred at x = "
                    f"{', '.join(f'{c:.3f}' for c in centres)} of the width), so its style would not appear; a style map runs "
                    "across the width: widen the range or the canvas, or give a smaller window_stride="
                )
            if all(first[c] != i and not torch.equal(style_map[first[c]][2], row) for c in held):
                earlier = ", ".join(f"entry {j} ({style_map[j][0]:g}..{style_map[j][1]:g})" for j in sorted({first[c] for c in held}))
                raise RegionError(
                    f"style_map entry {i} ({a:g}..{b:g}) overlaps {earlier}, which come(s) first at every window centre it holds "
                    f"(x = {', '.join(f'{c:.3f}' for c in held)} of the width): a window takes the first range holding its centre, "
                    f"so entry {i}'s style would not appear; give ranges that do not overlap"
                )
    return views


# ---- the batched, blending UNet forward -------------------------------------------------------
PER_SAMPLE_SPATIAL = ("down_block_additional_residuals", "mid_block_additional_residual", "down_intrablock_additional_residuals")
# ControlNet / T2I-Adapter residuals: maps of the whole canvas, one row per pipeline sample


def _rows(value, index: torch.Tensor, batch: int):
    """A per-sample input of the pipeline's batch (a tensor of `batch` rows, or a list/tuple of them:
    IP-Adapter image embeds, ControlNet residuals) -> the views' rows (`index`); anything else as it is."""
    if isinstance(value, torch.Tensor) and value.ndim and value.shape[0] == batch:
        return value[index.to(value.device)]
    if isinstance(value, (list, tuple)):
        return type(value)(_rows(v, index, batch) for v in value)
    return value


def _tile_time_ids(time_ids: torch.Tensor, window: tuple[int, int], canvas: tuple[int, int]) -> torch.Tensor:
    """SDXL's (original h, w, crop top, left, target h, w) of the call -> those of a (wh, ww) window of the
    (h, w) latent canvas: both sizes scaled by the window's share of the canvas, the crop as given. The
    call's defaults (the canvas size) become the window's size; the call's own `original_size=` /
    `target_size=` (and their negative_ forms) keep their meaning instead of being dropped; a window
    that is the whole canvas keeps the call's ids unchanged."""
    (wh, ww), (h, w) = window, canvas
    num = torch.tensor([wh, ww, 1, 1, wh, ww], dtype=torch.float64, device=time_ids.device)
    den = torch.tensor([h, w, 1, 1, h, w], dtype=torch.float64, device=time_ids.device)
    return (time_ids.double() * num / den).to(time_ids.dtype)  # float64: H * wh overflows float16


class RegionalUNet:
    """Stands in for `unet.forward` during a call: pipeline batch (M, C, h, w) -> views -> ONE UNet
    forward (chunks of `max_batch` rows when set) -> blended noise prediction (M, C, h, w).

    The pipeline batch is [uncond images; cond images] under CFG, [images] without. View rows keep
    that order (half, image, view), so one full-canvas region reproduces plain generation exactly."""

    def __init__(
        self,
        unet,
        inner_forward,
        plan: RegionalPlan,
        num_images: int,
        style_embeds: torch.Tensor,
        prompt_embeds: torch.Tensor | None = None,
        pooled_embeds: torch.Tensor | None = None,
        vae_scale_factor: int = 8,
    ):
        self.unet, self.inner, self.plan, self.num_images = unet, inner_forward, plan, num_images
        self.style_embeds = style_embeds  # (V, d) codebook-space rows, one per view
        self.prompt_embeds = prompt_embeds  # (P, L, D) region prompts (cond half)
        self.pooled_embeds = pooled_embeds  # (P, D') SDXL pooled region prompts
        self.vae_scale_factor = vae_scale_factor
        self.calls = 0  # inner UNet forwards made

    def __call__(
        self, sample, timestep, encoder_hidden_states, *args, added_cond_kwargs=None, timestep_cond=None, return_dict: bool = True, **kwargs
    ):
        plan, B = self.plan, self.num_images
        M = sample.shape[0]
        if args:
            raise TypeError("RegionalUNet takes sample, timestep, encoder_hidden_states positionally, the rest by keyword")
        if M % B:
            raise RuntimeError(f"regional UNet got a batch of {M} for {B} images")
        halves = M // B  # 2 under classifier-free guidance ([uncond; cond]), else 1
        # view-major: each view's (= one style's) rows are consecutive, so the style adapters take
        # their one-style path (style_adapters.style_runs) instead of the dense N-style one
        rows = [(h * B + b, v, halves == 1 or h == 1) for v in range(len(plan.views)) for h in range(halves) for b in range(B)]
        crops, ehs, styles, text, tids, tconds, tsteps = [], [], [], [], [], [], []
        added = dict(added_cond_kwargs or {})
        per_sample_t = isinstance(timestep, torch.Tensor) and timestep.ndim > 0 and timestep.numel() == M
        for i, v, cond in rows:
            view = plan.views[v]
            crops.append(sample[i, :, view.y0 : view.y1, view.x0 : view.x1])
            use_region_prompt = cond and view.prompt_index is not None
            ehs.append(self.prompt_embeds[view.prompt_index] if use_region_prompt else encoder_hidden_states[i])
            styles.append(self.style_embeds[v])
            if "text_embeds" in added:
                text.append(self.pooled_embeds[view.prompt_index] if use_region_prompt else added["text_embeds"][i])
            if "time_ids" in added:
                tid = added["time_ids"][i]
                if plan.windowed:  # SDXL size conditioning of the tile, not of the whole panorama
                    tid = _tile_time_ids(tid, (view.y1 - view.y0, view.x1 - view.x0), plan.latent_size)
                tids.append(tid)
            if timestep_cond is not None:
                tconds.append(timestep_cond[i])
            if per_sample_t:
                tsteps.append(timestep[i])
        n = len(rows)
        if plan.windowed and any(kwargs.get(k) is not None for k in PER_SAMPLE_SPATIAL):
            raise RegionError(
                "ControlNet residuals are maps of the whole canvas: they go with whole-canvas region views only, "
                "not with region_window= or a panorama"
            )
        index = torch.tensor([i for i, _, _ in rows])  # the pipeline row of every view row
        chunk = n if not plan.max_batch else plan.max_batch
        outs = []
        for s in range(0, n, chunk):
            sl = slice(s, min(n, s + chunk))
            extra = {}
            if added:
                extra_added = {k: _rows(val, index[sl], M) for k, val in added.items() if k not in ("text_embeds", "time_ids")}
                if text:
                    extra_added["text_embeds"] = torch.stack(text[sl])
                if tids:
                    extra_added["time_ids"] = torch.stack(tids[sl])
                extra["added_cond_kwargs"] = extra_added
            if tconds:
                extra["timestep_cond"] = torch.stack(tconds[sl])
            t = torch.stack(tsteps[sl]) if per_sample_t else timestep
            out = self.inner(
                torch.stack(crops[sl]),
                t,
                torch.stack(ehs[sl]),
                style_embeds=torch.stack(styles[sl]),
                return_dict=False,
                **extra,
                **{k: _rows(val, index[sl], M) for k, val in kwargs.items()},
            )[0]
            self.calls += 1
            outs.append(out)
        eps = torch.cat(outs) if len(outs) > 1 else outs[0]
        blended = torch.zeros(sample.shape, dtype=torch.float32, device=sample.device)
        for j, (i, v, _) in enumerate(rows):
            view = plan.views[v]
            w = view.weight.to(device=sample.device)
            blended[i, :, view.y0 : view.y1, view.x0 : view.x1] += eps[j].float() * w
        blended = blended.to(eps.dtype)
        if not return_dict:
            return (blended,)
        from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

        return UNet2DConditionOutput(sample=blended)


DECODE_MARGIN = 2  # latent cells a decode window holds beyond its region's weight: the decoder's convs
# then see the neighbour's content at the window's edge instead of zero padding (no border at the seam)


class RegionalDecode:
    """Stands in for `vae.decode` during a call: each region's window of the final latent is decoded on
    its own, and the images are blended with the regions' weights (bilinear at image size, normalised).

    Why: the VAE decoder's GroupNorm statistics and mid-block attention span whatever it decodes. On a
    canvas whose parts have different styles, one decode pulls every part's colours towards the
    others'; a window decoded alone is decoded as an image of that style alone. Each window
    decodes as its region (`decoding_region`: the GroupNorms take the region's
    statistics, the attention only its keys), so the margin it holds of its neighbours
    (`DECODE_MARGIN`) gives its edge their content but not their colours. Windows that coincide
    are decoded once, so a canvas whose windows are all the whole canvas decodes exactly as the
    plain pipeline does."""

    def __init__(self, inner_decode, windows: list[tuple[tuple[int, int, int, int], torch.Tensor]], vae_scale_factor: int, vae):
        self.inner, self.f = inner_decode, vae_scale_factor
        self.windows = windows  # ((y0, y1, x0, x1) latent cells, (y1 - y0, x1 - x0) weight)
        self.vae = vae  # its decoder decodes each window as its region (decoding_region)

    def __call__(self, z, return_dict: bool = True, **kwargs):
        if len(self.windows) == 1:  # one window (the canvas): the plain decode, untouched
            return self.inner(z, return_dict=return_dict, **kwargs)
        f = self.f
        image = total = None
        # a window is native size plus the margin: decoded whole, also under `vae.enable_tiling()`, whose
        # tiles its region's weight would not map onto
        tiled = getattr(self.vae, "use_tiling", False)
        for (y0, y1, x0, x1), weight in self.windows:
            untiled = overridden(self.vae, "use_tiling", lambda _on: False) if tiled else nullcontext()
            with decoding_region(self.vae.decoder, weight), untiled:
                part = self.inner(z[..., y0:y1, x0:x1], return_dict=False, **kwargs)[0]  # (B, 3, (y1-y0)f, (x1-x0)f)
            w = F.interpolate(weight[None, None].to(part), scale_factor=f, mode="bilinear", align_corners=False)[0, 0]
            if image is None:
                image = torch.zeros((*part.shape[:2], z.shape[-2] * f, z.shape[-1] * f), dtype=torch.float32, device=part.device)
                total = torch.zeros(image.shape[-2:], dtype=torch.float32, device=part.device)
            image[..., y0 * f : y1 * f, x0 * f : x1 * f] += part.float() * w
            total[y0 * f : y1 * f, x0 * f : x1 * f] += w.float()
        image = (image / total.clamp(min=1e-12)).to(part.dtype)  # bilinear weights sum to ~1; exactly 1 after this
        if not return_dict:
            return (image,)
        from diffusers.models.autoencoders.vae import DecoderOutput

        return DecoderOutput(sample=image)


def _map_size(weight: torch.Tensor, x: torch.Tensor, token_dim: int) -> tuple[int, int]:
    """The (h, w) of the map `x` holds, a whole multiple of the (wh, ww) window `weight` covers:
    x is (B, C, h, w), or tokens with h*w along `token_dim`."""
    if x.ndim == 4:
        return tuple(x.shape[-2:])
    wh, ww = weight.shape
    scale = math.isqrt(x.shape[token_dim] // (wh * ww))
    return (wh * scale, ww * scale)


def _on_map(weight: torch.Tensor, size: tuple[int, int], device) -> torch.Tensor:
    """(wh, ww) window weight -> (h*w,) at a feature map's size (nearest: whole multiples)."""
    return F.interpolate(weight[None, None].to(device, torch.float32), size=size, mode="nearest").flatten()


class RegionAttention:
    """Stands in for a decoder attention block's forward while one region's window decodes: only the
    keys where the region weighs are attended to, so the margin a window holds of its neighbours is
    not read into the region's tokens (an additive -inf mask; the VAE's attention takes none of its own)."""

    def __init__(self, inner_forward, weight: torch.Tensor):
        self.inner, self.weight = inner_forward, weight  # weight: (wh, ww) latent cells of the window

    def __call__(self, hidden_states: torch.Tensor, *args, **kwargs):
        if kwargs.get("attention_mask") is not None:
            raise RuntimeError("RegionAttention: this attention already has a mask; the regional decode expects the VAE's maskless attention")
        keep = _on_map(self.weight, _map_size(self.weight, hidden_states, 1), hidden_states.device) > 0  # (h*w,)
        bias = torch.zeros(keep.shape, dtype=hidden_states.dtype, device=hidden_states.device).masked_fill(~keep, float("-inf"))
        kwargs["attention_mask"] = bias.expand(hidden_states.shape[0], 1, -1)  # (B, 1, keys): the same for every query
        return self.inner(hidden_states, *args, **kwargs)


@contextmanager
def decoding_region(decoder, weight: torch.Tensor):
    """While the VAE `decoder` decodes one region's window (weight: (wh, ww) latent cells): every
    GroupNorm takes the region's statistics (`RegionNorm`) and every attention block only the
    region's keys (`RegionAttention`)."""
    from diffusers.models.attention_processor import Attention

    with ExitStack() as stack:
        for m in decoder.modules():
            if isinstance(m, torch.nn.GroupNorm):
                stack.enter_context(overridden(m, "forward", lambda _inner, m=m: RegionNorm(m, weight)))
            elif isinstance(m, Attention):
                stack.enter_context(overridden(m, "forward", lambda inner: RegionAttention(inner, weight)))
        yield


class RegionNorm:
    """Stands in for a decoder GroupNorm's forward while one region's window decodes: the group
    statistics are weighted by the region's weight in the window, so the margin the window holds of
    its neighbours shapes the content at the edge but not the colours of the whole window. A weight
    of ones is the plain GroupNorm. Takes (B, C, h, w) maps and the (B, C, h*w) tokens of the
    mid-block attention's norm."""

    def __init__(self, norm: torch.nn.GroupNorm, weight: torch.Tensor):
        self.norm, self.weight = norm, weight  # weight: (wh, ww) latent cells of the window

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        norm = self.norm
        B, C = x.shape[:2]
        m = _on_map(self.weight, _map_size(self.weight, x, 2), x.device).reshape(1, 1, 1, -1)  # (B, C, N) tokens: N = h*w
        xg = x.float().reshape(B, norm.num_groups, C // norm.num_groups, -1)  # (B, G, C/G, S)
        total = m.sum() * xg.shape[2]
        mean = (xg * m).sum((2, 3), keepdim=True) / total
        var = ((xg - mean) ** 2 * m).sum((2, 3), keepdim=True) / total
        y = ((xg - mean) * torch.rsqrt(var + norm.eps)).reshape(x.shape)
        if norm.affine:
            shape = (1, C) + (1,) * (x.ndim - 2)
            y = y * norm.weight.float().view(shape) + norm.bias.float().view(shape)
        return y.to(x.dtype)


def decode_windows(views: list[View], native: tuple[int, int], margin: int = 0) -> list[tuple[tuple[int, int, int, int], torch.Tensor]]:
    """Full-canvas region views -> the windows `RegionalDecode` decodes: each region's native-size window
    (`region_windows`), `margin` latent cells wider than its weight's support on each side, views
    that share a window merged into one decode."""
    merged: dict[tuple[int, int, int, int], torch.Tensor] = {}
    for v in region_windows(views, native, margin):
        key = (v.y0, v.y1, v.x0, v.x1)
        merged[key] = merged[key] + v.weight if key in merged else v.weight.clone()
    return list(merged.items())


@contextmanager
def overridden(module, name: str, make: Callable[[Callable], Callable]):
    """Replace `module.<name>` (an instance attribute, so accelerate hooks stay below it) for one call."""
    previous = module.__dict__.get(name)
    wrapper = make(getattr(module, name))
    setattr(module, name, wrapper)
    try:
        yield wrapper
    finally:
        if previous is None:
            delattr(module, name)
        else:
            setattr(module, name, previous)


# ---- the pipeline entry point ----------------------------------------------------------------
def _region_window(region_window: Any, native: int, f: int) -> tuple[int, int] | None:
    """`region_window=` -> the smallest region view in latent pixels, or None for whole-canvas views.

    None (default): every region view is the whole canvas (MultiDiffusion: two regions of one style
    give the plain image); "native": windows of at least the model's native size around each region
    (`region_windows`); an int: windows of at least that many image pixels (a multiple of the VAE factor)."""
    if region_window is None:
        return None
    if region_window == "native":
        return (native // f, native // f)
    # numbers.Integral, as max_batch= and window_stride= take: a numpy integer is a whole number of pixels too
    if isinstance(region_window, bool) or not isinstance(region_window, numbers.Integral) or region_window < f or region_window % f:
        raise RegionError(
            f'region_window must be None (whole-canvas views), "native" ({native} px windows) or a positive multiple of {f} pixels, got {region_window!r}'
        )
    return (int(region_window) // f, int(region_window) // f)


def _canvas_size(pipe, kwargs: dict, native: int) -> tuple[int, int]:
    """The (height, width) the pipeline's own loop will draw, which the views are built for: the call's, else
    diffusers' default. That is the native size, except for a ControlNet pipeline: it draws at its control
    image's size (the image as its `control_image_processor` prepares it; the first ControlNet's with several),
    so the native size there gave a canvas of another size than the plain call's, the control image resized to it."""
    height, width = kwargs.get("height"), kwargs.get("width")
    processor, image = getattr(pipe, "control_image_processor", None), kwargs.get("image")
    if (not height or not width) and processor is not None and image is not None:
        from diffusers import MultiControlNetModel
        from diffusers.utils.torch_utils import unwrap_module  # a torch.compile'd ControlNet

        if isinstance(unwrap_module(pipe.controlnet), MultiControlNetModel) and isinstance(image, (list, tuple)):
            image = image[0]  # diffusers reads the size off the first ControlNet's prepared image
        prepared = processor.preprocess(image, height=height or None, width=width or None)
        return tuple(prepared.shape[-2:])
    return height or native, width or native


def regional_call(
    pipe,
    parent_call,
    prompt,
    *,
    regions=None,
    background=None,
    style=None,
    style_weights=None,
    style_map=None,
    window_stride=None,
    max_batch=None,
    feather=None,
    region_window=None,
    region_decode: bool = False,
    num_images_per_prompt: int = 1,
    kwargs: dict,
):
    """`pipe(prompt, regions=[...])` / `pipe(prompt, width=..., style_map=...)`: build the views,
    encode the region prompts, then run the pipeline's own diffusers loop with `RegionalUNet`."""
    from dmm_ray.models.style_unet import StyleUNet, inner_unet

    unet = inner_unet(pipe.unet)  # `pipe.unet = torch.compile(pipe.unet)`: the StyleUNet inside the compiled wrapper
    if not isinstance(unet, StyleUNet):
        raise TypeError(f"{type(pipe).__name__} needs a StyleUNet, got {type(unet).__name__}")
    names = unet.style_names
    if regions is not None and style_map is not None:
        raise RegionError("give regions= (styled parts of one canvas) or style_map= (a panorama's styles), not both")
    if style is not None and style_weights is not None:
        raise StyleError(f"pass at most one of style= or style_weights=; known styles: {', '.join(names)}")
    call_style = style if style is not None else style_weights
    if is_per_prompt(style, style_weights):
        raise StyleError(
            "with regions= or a panorama, style= / style_weights= is ONE style for every prompt (the background of "
            "regions, the default of a panorama), not a list per prompt; give each part its style with "
            "Region(style=...) or style_map="
        )
    if max_batch is not None and (isinstance(max_batch, bool) or not isinstance(max_batch, numbers.Integral) or max_batch < 1):
        raise RegionError(f"max_batch must be a positive integer, got {max_batch!r}")
    f = pipe.vae_scale_factor
    native = unet.config.sample_size * f
    height, width = _canvas_size(pipe, kwargs, native)
    step = math.lcm(f, 8)  # the VAE's factor, and diffusers' own rule (check_inputs: divisible by 8)
    if not all(isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v) and v > 0 and v % step == 0 for v in (height, width)):
        raise RegionError(f"height and width must be multiples of {step}, got {height}x{width}")
    # a whole float (height=512.0, which the plain call takes) as an int: the views' latent windows slice by it
    height, width = int(height), int(width)
    kwargs.update(height=height, width=width)
    latents = kwargs.get("latents")
    if isinstance(latents, torch.Tensor) and latents.ndim >= 2 and tuple(latents.shape[-2:]) != (height // f, width // f):
        # diffusers' loop draws at the given latents' size whatever height/width say; the views are built for
        # height x width, so the UNet saw part of the latent and the rest was never denoised (or a shape error)
        h, w = latents.shape[-2:]
        raise RegionError(
            f"latents= are {h}x{w} latent cells (a {h * f}x{w * f} image) but the canvas is {height}x{width} (height x width: "
            f"the call's, else the default), which the regions' views are built for; pass height={h * f}, width={w * f}"
        )

    if regions is not None:
        if window_stride is not None:  # the region path never reads it: a stride would silently do nothing
            raise RegionError(
                "window_stride= goes with a panorama (style_map=, or style= on a wide canvas); regions' views are "
                'the whole canvas, or windows around each region with region_window="native"'
            )
        if background is not None and call_style is not None:
            raise StyleError("with regions, give the background as background= or style=, not both")
        bg = background if background is not None else call_style
        window = _region_window(region_window, native, f)
        full, region_prompts = build_region_views(regions, names, (height, width), f, bg, feather)
        views = full if window is None else region_windows(full, window)  # the same list when the windows are the canvas
        plan = RegionalPlan(views, (height // f, width // f), region_prompts, max_batch, windowed=views is not full)
    else:
        if region_window is not None or region_decode:
            raise RegionError("region_window= and region_decode= go with regions=; a panorama's windows are set by window_stride=")
        if background is not None:
            raise RegionError("background= goes with regions=; for a panorama give style_map= (or style=)")
        if feather is not None:
            raise RegionError(
                "feather= goes with regions=; a panorama's windows blend with Gaussian tile weights over their overlap (window_stride=)"
            )
        default = None
        if call_style is not None:
            default = resolve_style(names, call_style)
        elif unet.num_styles == 1:
            default = resolve_style(names, 0)
        views = build_panorama_views(names, (height, width), f, native, window_stride, style_map, default)
        plan = RegionalPlan(views, (height // f, width // f), [], max_batch, windowed=True)

    batch_size = pipe._prompt_batch(prompt, kwargs)
    num_images = batch_size * num_images_per_prompt
    pipe._fill_negative(prompt, batch_size, kwargs)

    device = pipe._execution_device
    with torch.no_grad():
        rows = torch.stack([v.style_row for v in plan.views]).to(device)
        style_embeds = unet.style_embeds_for(style_weights=rows)
        prompt_embeds = pooled = None
        if plan.prompts:
            lora_scale = (kwargs.get("cross_attention_kwargs") or {}).get("scale")  # as the call encodes its own prompt
            encoded = pipe.encode_prompt(
                prompt=plan.prompts,
                device=device,
                num_images_per_prompt=1,
                do_classifier_free_guidance=False,
                lora_scale=lora_scale,
                clip_skip=kwargs.get("clip_skip"),
            )
            prompt_embeds = encoded[0]
            given = kwargs.get("prompt_embeds")
            if given is not None and given.shape[1] != prompt_embeds.shape[1]:  # one UNet batch holds both
                raise RegionError(
                    f"the regions' prompts encode to {prompt_embeds.shape[1]} tokens but prompt_embeds has {given.shape[1]}; "
                    "one UNet call needs one length: pass prompt= instead of prompt_embeds=, or leave the regions' prompts out"
                )
            if len(encoded) == 4:  # SDXL: (embeds, negative, pooled, negative pooled)
                pooled = encoded[2]
    decode = nullcontext()
    if regions is not None and region_decode:
        windows = decode_windows(full, (native // f, native // f), margin=DECODE_MARGIN)
        decode = overridden(pipe.vae, "decode", lambda inner: RegionalDecode(inner, windows, f, pipe.vae))
    fused = unet.fused_style(rows, enabled=pipe.fuse_styles)  # views of one style only (a single full region): as a plain call
    with (
        overridden(unet, "forward", lambda inner: RegionalUNet(unet, inner, plan, num_images, style_embeds, prompt_embeds, pooled, f)),
        decode,
        fused,
    ):
        out = parent_call(pipe, prompt=prompt, num_images_per_prompt=num_images_per_prompt, **kwargs)
    return out
