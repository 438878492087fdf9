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
        im = ImageOps.exif_transpose(im).convert("RGB")
    w, h = im.size
    scale = resolution / min(w, h)
    new_w, new_h = max(resolution, round(w * scale)), max(resolution, round(h * scale))
    if (new_w, new_h) != (w, h):
        im = im.resize((new_w, new_h), Image.Resampling.BICUBIC)
    left, top = (new_w - resolution) // 2, (new_h - resolution) // 2
    im = im.crop((left, top, left + resolution, top + resolution))
    return np.asarray(im, dtype=np.uint8)


def to_model_input(pixels: np.ndarray) -> np.ndarray:
    """(B, H, W, 3) uint8 -> (B, 3, H, W) float32 in [-1, 1], the VAE's input range."""
    x = pixels.astype(np.float32) / 127.5 - 1.0
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))
