"""The zoo's style transforms: each teacher is the base fine-tuned on the image set restyled by one.

All transforms are deterministic functions of the image (no randomness, so nothing to seed),
map (B, 3, H, W) float in [0, 1] to the same shape and range, and are vectorised in torch.

Like the paper's Table 4 (four mutually similar "realistic" models plus very different ones),
the styles come in two groups:
- `grade` (mutually similar photo colour grades that keep shapes and colours recognisable):
  warm, cool, faded, bright;
- `distinct` (very different renderings): noir, neon, pixel, sketch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

_LUMA = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)


def luma(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) -> (B, 1, H, W) Rec.601 luma."""
    return (x * _LUMA.to(x)).sum(1, keepdim=True)


def saturate(x: torch.Tensor, factor: float) -> torch.Tensor:
    y = luma(x)
    return (y + factor * (x - y)).clamp(0, 1)


def edges(x: torch.Tensor) -> torch.Tensor:
    """Sobel gradient magnitude, max over channels: (B, 3, H, W) -> (B, 1, H, W), ~[0, 1] at a hard step."""
    kx = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]]).to(x) / 4
    k = torch.stack([kx, kx.T])[:, None].repeat(3, 1, 1, 1)  # (6, 1, 3, 3): (gx, gy) per channel
    g = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), k, groups=3).view(x.shape[0], 3, 2, *x.shape[2:])
    return g.pow(2).sum(2).sqrt().amax(1, keepdim=True)


def _vignette(x: torch.Tensor, strength: float) -> torch.Tensor:
    h, w = x.shape[-2:]
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
    return x * (1 - strength * (xx**2 + yy**2) / 2).to(x)


def warm(x: torch.Tensor) -> torch.Tensor:
    """Golden-hour grade: red/yellow lifted, blue pulled down."""
    return (x * torch.tensor([0.95, 0.88, 0.62]).view(1, 3, 1, 1).to(x) + torch.tensor([0.12, 0.07, 0.0]).view(1, 3, 1, 1).to(x)).clamp(0, 1)


def cool(x: torch.Tensor) -> torch.Tensor:
    """Moonlight grade: blue/cyan lifted, red pulled down."""
    return (x * torch.tensor([0.62, 0.88, 0.95]).view(1, 3, 1, 1).to(x) + torch.tensor([0.0, 0.06, 0.14]).view(1, 3, 1, 1).to(x)).clamp(0, 1)


def faded(x: torch.Tensor) -> torch.Tensor:
    """Matte film: lifted blacks, lowered whites, 40% desaturated."""
    return (0.2 + 0.62 * saturate(x, 0.6)).clamp(0, 1)


def bright(x: torch.Tensor) -> torch.Tensor:
    """High-key exposure: gamma 0.55 lifts shadows and midtones."""
    return x.clamp(1e-6, 1).pow(0.55)


def noir(x: torch.Tensor) -> torch.Tensor:
    """High-contrast black and white with a vignette."""
    y = torch.sigmoid((luma(x) - 0.45) * 9)
    return _vignette(y, 0.5).repeat(1, 3, 1, 1).clamp(0, 1)


def neon(x: torch.Tensor) -> torch.Tensor:
    """Glowing outlines on black: edges coloured by the fully saturated local colour, plus a soft glow."""
    e = edges(x)
    line = (e * 2.5).clamp(0, 1)
    glow = F.avg_pool2d(line, 5, stride=1, padding=2, count_include_pad=False)
    hue = saturate(F.max_pool2d(x, 3, stride=1, padding=1), 2.0)
    return ((line + 0.6 * glow).clamp(0, 1) * (0.25 + 0.75 * hue)).clamp(0, 1)


def pixel(x: torch.Tensor) -> torch.Tensor:
    """Pixel art: 4x4 blocks, each channel quantised to 3 levels."""
    small = F.avg_pool2d(x, 4)
    q = (small * 2).round() / 2
    return F.interpolate(q, scale_factor=4, mode="nearest")


def sketch(x: torch.Tensor) -> torch.Tensor:
    """Pencil sketch: dark outlines and diagonal hatching of dark areas on cream paper."""
    h, w = x.shape[-2:]
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    hatch = (((xx + yy) % 4) == 0).to(x)[None, None]  # (1, 1, H, W) diagonal lines every 4 px
    dark = (1 - luma(x)).clamp(0, 1)
    ink = ((edges(x) * 2.0).clamp(0, 1) + 0.55 * hatch * (dark > 0.45).to(x)).clamp(0, 1)
    paper = torch.tensor([0.97, 0.94, 0.86]).view(1, 3, 1, 1).to(x)
    return paper * (1 - 0.85 * ink)


@dataclass(frozen=True)
class Style:
    name: str
    description: str
    group: str  # "grade" (mutually similar) or "distinct"
    transform: Callable[[torch.Tensor], torch.Tensor]
    keeps_colour: bool  # whether the object / background colour stays identifiable (feature-net colour labels)


STYLES: dict[str, Style] = {
    s.name: s
    for s in [
        Style("warm", "golden-hour colour grade (reds/yellows up, blue down)", "grade", warm, True),
        Style("cool", "moonlight colour grade (blue/cyan up, red down)", "grade", cool, True),
        Style("faded", "matte film: lifted blacks, lowered whites, desaturated", "grade", faded, True),
        Style("bright", "high-key exposure (gamma 0.55)", "grade", bright, True),
        Style("noir", "high-contrast black and white with a vignette", "distinct", noir, False),
        Style("neon", "glowing saturated outlines on black", "distinct", neon, False),
        Style("pixel", "pixel art: 4x4 blocks, 3 levels per channel", "distinct", pixel, True),
        Style("sketch", "pencil outlines and hatching on cream paper", "distinct", sketch, False),
    ]
}


def get_style(name: str) -> Style:
    try:
        return STYLES[name]
    except KeyError:
        raise KeyError(f"unknown zoo style {name!r}; known styles: {list(STYLES)}") from None


def apply_style(name: str | None, images: torch.Tensor) -> torch.Tensor:
    """Restyle (B, 3, H, W) images in [0, 1]; `None` or "none" returns them unchanged (the base data)."""
    if name in (None, "none"):
        return images
    return get_style(name).transform(images)
