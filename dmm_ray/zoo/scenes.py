"""Procedural captioned scenes: the toy stand-in for JourneyDB.

A scene is one or two objects (shape, colour, size, position, small rotation) on a solid
background, with a caption generated from the same ground truth, so caption <-> image
consistency is checkable exactly. Scene `i` of a split depends only on `(seed, split, i)`,
so any number of scenes can be generated on the fly, in any chunking, reproducibly.

Held-out captions: for every (colour, shape) pair exactly one single-object caption and one
two-object caption are reserved for evaluation (`eval_captions`); the training generator
never emits them, so the evaluation prompt list is disjoint from the training captions while
every colour, shape and background is still seen in training.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

SHAPES = ("circle", "square", "triangle", "ring", "cross", "star")
SHAPE_PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "ring": "rings", "cross": "crosses", "star": "stars"}
# Object colours (RGB in [0, 1]); none of them is also a background colour name.
COLOURS = {
    "red": (0.90, 0.10, 0.10),
    "green": (0.10, 0.72, 0.20),
    "blue": (0.15, 0.30, 0.95),
    "yellow": (0.95, 0.88, 0.10),
    "orange": (1.00, 0.55, 0.05),
    "purple": (0.58, 0.20, 0.80),
    "pink": (1.00, 0.52, 0.76),
    "cyan": (0.10, 0.85, 0.90),
}
BACKGROUNDS = {
    "black": (0.06, 0.06, 0.06),
    "white": (0.94, 0.94, 0.94),
    "gray": (0.50, 0.50, 0.50),
    "brown": (0.42, 0.28, 0.14),
}
# Object centre (x, y) in [0, 1] image coordinates, y pointing down.
POSITIONS = {"left": (0.28, 0.5), "right": (0.72, 0.5), "top": (0.5, 0.28), "bottom": (0.5, 0.72), "center": (0.5, 0.5)}
SIZES = {"small": 0.15, "large": 0.23}  # radius as a fraction of the image side
COUNTS = ("one", "two")
PAIR_POSITIONS = {"left": ("left", "right"), "top": ("top", "bottom")}  # two objects: a horizontal or vertical pair

# Every word a caption can contain (the zoo tokenizer turns each into one token).
CAPTION_WORDS = tuple(
    dict.fromkeys(["a", "two", "on", "in", "the", "with", "background", *SHAPES, *SHAPE_PLURALS.values(), *COLOURS, *BACKGROUNDS, *POSITIONS, *SIZES])
)
SPLITS = {"train": 0, "eval": 1, "feature": 2}


@dataclass(frozen=True)
class Scene:
    """Ground truth of one image; `caption` is derived from the other fields only."""

    shape: str
    colour: str
    background: str
    size: str
    position: str  # for count == "two": the first object's position ("left" -> left/right pair, "top" -> top/bottom pair)
    count: str
    cx: tuple[float, ...]  # object centres after jitter, one entry per object
    cy: tuple[float, ...]
    radius: float
    angle: float

    @property
    def caption(self) -> str:
        return caption_for(self.shape, self.colour, self.background, self.size, self.position, self.count)

    def to_record(self) -> dict:
        rec = asdict(self)
        rec["caption"] = self.caption
        return rec


def caption_for(shape: str, colour: str, background: str, size: str, position: str, count: str) -> str:
    if count == "one":
        where = "in" if position == "center" else "on"
        return f"a {size} {colour} {shape} {where} the {position} with a {background} background"
    if count == "two":
        return f"two {colour} {SHAPE_PLURALS[shape]} with a {background} background"
    raise ValueError(f"count must be one of {COUNTS}, got {count!r}")


def _held_out(shape: str, colour: str, background: str, size: str, position: str, count: str) -> bool:
    """Exactly one single-object and one two-object caption per (colour, shape) is held out."""
    c, s = list(COLOURS).index(colour), SHAPES.index(shape)
    bg = list(BACKGROUNDS)[(c + s) % len(BACKGROUNDS)]
    if count == "two":
        return background == list(BACKGROUNDS)[(c + 2 * s + 1) % len(BACKGROUNDS)]
    return background == bg and position == list(POSITIONS)[(2 * c + s) % len(POSITIONS)] and size == list(SIZES)[(c + s) % 2]


def eval_captions() -> list[str]:
    """The held-out prompt list (96 captions: one single- and one two-object caption per colour x shape)."""
    out = []
    for count in COUNTS:
        for colour in COLOURS:
            for shape in SHAPES:
                for background in BACKGROUNDS:
                    for size in SIZES if count == "one" else ("small",):
                        for position in POSITIONS if count == "one" else ("left",):
                            if _held_out(shape, colour, background, size, position, count):
                                out.append(caption_for(shape, colour, background, size, position, count))
    return out


def parse_caption(caption: str) -> dict:
    """Ground truth named by a caption (inverse of `caption_for`; used by the prompt-following check)."""
    words = caption.split()
    if words[0] == "two":
        plural = {v: k for k, v in SHAPE_PLURALS.items()}
        return {"count": "two", "colour": words[1], "shape": plural[words[2]], "background": words[5], "size": "small", "position": None}
    if words[0] == "a" and len(words) == 11:
        return {"count": "one", "size": words[1], "colour": words[2], "shape": words[3], "position": words[6], "background": words[9]}
    raise ValueError(f"not a zoo caption: {caption!r}")


def sample_scene(seed: int, index: int, split: str = "train") -> Scene:
    """Scene `index` of `split` for `seed`; resamples until it is not a held-out caption (train split)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")
    rng = np.random.default_rng([seed, SPLITS[split], index])
    while True:
        shape = SHAPES[rng.integers(len(SHAPES))]
        colour = list(COLOURS)[rng.integers(len(COLOURS))]
        background = list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
        count = "two" if rng.random() < 0.2 else "one"
        if count == "one":
            size = list(SIZES)[rng.integers(len(SIZES))]
            position = list(POSITIONS)[rng.integers(len(POSITIONS))]
            centres = [POSITIONS[position]]
        else:
            size = "small"
            position = list(PAIR_POSITIONS)[rng.integers(len(PAIR_POSITIONS))]
            centres = [POSITIONS[p] for p in PAIR_POSITIONS[position]]
        if split == "train" and _held_out(shape, colour, background, size, position, count):
            continue
        jitter = rng.uniform(-0.05, 0.05, size=(len(centres), 2))
        radius = SIZES[size] * rng.uniform(0.9, 1.1)
        angle = rng.uniform(-0.35, 0.35)
        return Scene(
            shape=shape,
            colour=colour,
            background=background,
            size=size,
            position=position,
            count=count,
            cx=tuple(float(c[0] + j[0]) for c, j in zip(centres, jitter)),
            cy=tuple(float(c[1] + j[1]) for c, j in zip(centres, jitter)),
            radius=float(radius),
            angle=float(angle),
        )


def sample_scenes(n: int, seed: int, split: str = "train", start: int = 0) -> list[Scene]:
    return [sample_scene(seed, i, split) for i in range(start, start + n)]


def scene_for_caption(caption: str, seed: int = 0) -> Scene:
    """A concrete scene matching a caption (centred placement, no jitter); for reference renders."""
    gt = parse_caption(caption)
    if gt["count"] == "one":
        centres = [POSITIONS[gt["position"]]]
        position = gt["position"]
    else:
        position = "left"
        centres = [POSITIONS[p] for p in PAIR_POSITIONS[position]]
    return Scene(
        shape=gt["shape"],
        colour=gt["colour"],
        background=gt["background"],
        size=gt["size"],
        position=position,
        count=gt["count"],
        cx=tuple(c[0] for c in centres),
        cy=tuple(c[1] for c in centres),
        radius=SIZES[gt["size"]],
        angle=0.0,
    )


def _shape_mask(shape: str, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Inside test in object coordinates (u, v scaled by the radius; v points down)."""
    r = torch.sqrt(u * u + v * v)
    if shape == "circle":
        return r <= 1.0
    if shape == "square":
        return torch.maximum(u.abs(), v.abs()) <= 0.82
    if shape == "triangle":  # apex up
        return (v <= 0.75) & (u.abs() <= 1.0 * (v + 1.0) / 1.75) & (v >= -1.0)
    if shape == "ring":
        return (r <= 1.0) & (r >= 0.58)
    if shape == "cross":
        return ((u.abs() <= 0.32) & (v.abs() <= 1.0)) | ((v.abs() <= 0.32) & (u.abs() <= 1.0))
    if shape == "star":  # five points, one pointing up
        theta = torch.atan2(u, -v)
        return r <= 0.48 + 0.52 * torch.cos(5 * theta).clamp(min=0) ** 1.5
    raise ValueError(f"unknown shape {shape!r}; known: {SHAPES}")


_TEMPLATE_EXTENT = 1.1  # templates cover u, v in [-1.1, 1.1]


@lru_cache(maxsize=4)
def shape_templates(resolution: int = 128) -> torch.Tensor:
    """(len(SHAPES), 1, R, R) anti-aliased masks of every shape in object coordinates."""
    hi = resolution * 4
    coords = (torch.arange(hi, dtype=torch.float32) + 0.5) / hi * 2 * _TEMPLATE_EXTENT - _TEMPLATE_EXTENT
    v, u = torch.meshgrid(coords, coords, indexing="ij")
    masks = torch.stack([_shape_mask(shape, u, v).float() for shape in SHAPES])[:, None]  # (S, 1, hi, hi)
    return F.avg_pool2d(masks, 4)


def render(scenes: list[Scene], image_size: int = 32, supersample: int = 2, chunk: int = 512) -> torch.Tensor:
    """Anti-aliased renders, (B, 3, image_size, image_size) float32 in [0, 1].

    Each object is the shape's template warped by one affine map (scale, rotation, offset)
    with `grid_sample`, which is ~100x faster than evaluating the shape per pixel.
    """
    templates = shape_templates()
    out_hw = image_size * supersample
    outs = []
    for lo in range(0, len(scenes), chunk):
        part = scenes[lo : lo + chunk]
        objs = [(k, i) for k, s in enumerate(part) for i in range(len(s.cx))]  # (scene, object) pairs
        sc = [part[k] for k, _ in objs]
        cx = torch.tensor([s.cx[i] for (_, i), s in zip(objs, sc)])
        cy = torch.tensor([s.cy[i] for (_, i), s in zip(objs, sc)])
        r = torch.tensor([s.radius for s in sc]) * _TEMPLATE_EXTENT
        a = torch.tensor([s.angle for s in sc])
        cos, sin = torch.cos(a), torch.sin(a)
        # image coords X, Y in [-1, 1] (x = (X + 1) / 2)  ->  template coords u = R(a) (x - c) / r
        theta = torch.stack(
            [
                torch.stack([cos / (2 * r), sin / (2 * r), (cos * (0.5 - cx) + sin * (0.5 - cy)) / r], -1),
                torch.stack([-sin / (2 * r), cos / (2 * r), (-sin * (0.5 - cx) + cos * (0.5 - cy)) / r], -1),
            ],
            1,
        )  # (n_obj, 2, 3)
        grid = F.affine_grid(theta, [len(objs), 1, out_hw, out_hw], align_corners=False)
        shape_idx = torch.tensor([SHAPES.index(s.shape) for s in sc])
        obj_cover = F.grid_sample(templates[shape_idx], grid, align_corners=False)  # (n_obj, 1, hw, hw)
        scene_idx = torch.tensor([k for k, _ in objs])
        first = torch.tensor([i == 0 for _, i in objs])
        cover = torch.zeros(len(part), 1, out_hw, out_hw)
        cover[scene_idx[first]] = obj_cover[first]
        cover[scene_idx[~first]] = torch.maximum(cover[scene_idx[~first]], obj_cover[~first])  # union of a pair
        cover = F.avg_pool2d(cover, supersample)  # (b, 1, S, S) coverage in [0, 1]
        fg = torch.tensor([COLOURS[s.colour] for s in part]).view(-1, 3, 1, 1)
        bg = torch.tensor([BACKGROUNDS[s.background] for s in part]).view(-1, 3, 1, 1)
        outs.append(bg * (1 - cover) + fg * cover)
    return torch.cat(outs) if outs else torch.empty(0, 3, image_size, image_size)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) in [0, 1] -> (B, H, W, 3) uint8 for PIL."""
    return (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
