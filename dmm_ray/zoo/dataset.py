"""The on-disk image set (`images/*.png` + `images/manifest.jsonl`) and the eval prompt list.

The manifest is the format every data reader consumes: one JSON object per line with `id`,
`file` (relative to the manifest), `caption`, and the scene's ground truth (shape, colour,
background, size, position, count, cx, cy, radius, angle). More scenes than are written are
available on the fly from `scenes.sample_scenes(n, seed)` (the generator is unbounded).
"""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image
from tqdm.auto import tqdm

from .scenes import Scene, eval_captions, render, sample_scenes, to_uint8


def write_image_set(out_dir: str | Path, n: int, seed: int, image_size: int = 32, chunk: int = 1024, progress: bool = True) -> Path:
    """Write `n` training-split scenes as PNGs plus `manifest.jsonl`; returns the manifest path."""
    out_dir = Path(out_dir)
    (out_dir / "png").mkdir(parents=True, exist_ok=True)
    manifest = out_dir / "manifest.jsonl"
    with manifest.open("w") as fh, tqdm(total=n, desc="image set", disable=not progress, leave=False) as bar:
        for lo in range(0, n, chunk):
            scenes = sample_scenes(min(chunk, n - lo), seed, "train", start=lo)
            pixels = to_uint8(render(scenes, image_size))  # (b, H, W, 3)
            for k, (scene, px) in enumerate(zip(scenes, pixels)):
                image_id = f"{lo + k:06d}"
                rel = f"png/{image_id}.png"
                Image.fromarray(px).save(out_dir / rel, optimize=False)
                fh.write(json.dumps({"id": image_id, "file": rel, **scene.to_record()}) + "\n")
            bar.update(len(scenes))
    return manifest


def read_manifest(manifest: str | Path) -> list[dict]:
    path = Path(manifest)
    if not path.is_file():
        raise FileNotFoundError(f"image-set manifest not found: {path}")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    for i, row in enumerate(rows):
        missing = {"id", "file", "caption"} - row.keys()
        if missing:
            raise ValueError(f"{path}:{i + 1}: missing key(s) {sorted(missing)}")
    return rows


def scene_from_record(row: dict) -> Scene:
    fields = Scene.__dataclass_fields__
    return Scene(**{k: tuple(row[k]) if k in ("cx", "cy") else row[k] for k in fields})


def write_eval_prompts(path: str | Path) -> Path:
    path = Path(path)
    path.write_text("\n".join(eval_captions()) + "\n")
    return path
