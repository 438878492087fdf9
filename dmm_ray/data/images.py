"""Image bytes -> square uint8 pixels at the training resolution (resize short side, centre-crop)."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageOps

# Skip reasons found when opening images (counted by the encoder, never fatal).
MISSING_FILE = "missing_file"
UNREADABLE_IMAGE = "unreadable_image"  # truncated / corrupt / not an image
READ_ERROR = "read_error"  # the file exists but could not be read (permissions, network)


def preprocess_image(data: bytes, resolution: int) -> np.ndarray:
    """Decode `data` and return (resolution, resolution, 3) uint8 RGB.

    Resize so the short side equals `resolution` (bicubic, like SD training), then centre-crop.
    Raises PIL / OSError errors for undecodable input (the caller counts them).
    """
    with Image.open(io.BytesIO(data)) as im:
        im.load()  # force full decode here: truncated files fail now, not later
        im = _to_rgb(ImageOps.exif_transpose(im))
    w, h = im.size
    scale = resolution / min(w, h)
    new_w, new_h = max(resolution, round(w * scale)), max(resolution, round(h * scale))
    left, top = (new_w - resolution) // 2, (new_h - resolution) // 2
    if new_w * new_h > 16 * resolution * resolution:  # a strip (1 x 2000 at 512: a 512 x 1,024,000 intermediate, GBs):
        sx, sy = w / new_w, h / new_h  # resize only the crop's source region, the same geometry (to a level or so)
        box = (left * sx, top * sy, (left + resolution) * sx, (top + resolution) * sy)
        return np.asarray(im.resize((resolution, resolution), Image.Resampling.BICUBIC, box=box), dtype=np.uint8)
    if (new_w, new_h) != (w, h):
        im = im.resize((new_w, new_h), Image.Resampling.BICUBIC)
    im = im.crop((left, top, left + resolution, top + resolution))
    return np.asarray(im, dtype=np.uint8)


def _to_rgb(im: Image.Image) -> Image.Image:
    """8-bit RGB. 16-bit and float greyscale (PNG `I;16`, `I`, TIFF `F`) are rescaled first: PIL's own
    conversion clips them at 255 (a 16-bit ramp came out almost all white, a 0..1 float image black)."""
    if im.mode.startswith("I") or im.mode == "F":
        a = np.asarray(im, dtype=np.float64)
        top = 65535.0 if im.mode.startswith("I;16") or (im.mode == "I" and a.max() > 255) else 255.0
        if im.mode == "F" and a.max() <= 1.0:
            top = 1.0
        im = Image.fromarray(np.clip(np.rint(a * (255.0 / top)), 0, 255).astype(np.uint8), "L")
    return im.convert("RGB")


def to_model_input(pixels: np.ndarray) -> np.ndarray:
    """(B, H, W, 3) uint8 -> (B, 3, H, W) float32 in [-1, 1], the VAE's input range."""
    x = pixels.astype(np.float32) / 127.5 - 1.0
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))
