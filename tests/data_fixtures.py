"""Small on-disk fixtures for the data tests, generated in code: a tiny base folder (VAE,
tokenizer, scheduler), a JourneyDB-layout tree and image folders with JSONL/CSV/parquet manifests."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

COLOURS = ["red", "green", "blue", "yellow", "purple", "orange"]
SHAPES = ["circle", "square", "triangle"]


def save_tiny_base(root: Path) -> Path:
    """The parts of a base SD folder the data area reads: vae/, tokenizer/, scheduler/."""
    from dmm_ray.tiny import tiny_sd_components

    c = tiny_sd_components(seed=0)
    c["vae"].save_pretrained(root / "vae")
    c["tokenizer"].save_pretrained(root / "tokenizer")
    c["scheduler"].save_pretrained(root / "scheduler")
    return root


def make_image(path: Path, i: int, size=(40, 32), fmt: str = "PNG") -> None:
    rng = np.random.default_rng(i)
    arr = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, format=fmt)


def caption(i: int) -> str:
    return f"a {COLOURS[i % len(COLOURS)]} {SHAPES[i % len(SHAPES)]} on the left"


def make_journeydb(
    root: Path, n: int = 10, broken: int | None = 3, missing: int | None = 6, empty_caption: int | None = 8, bad_line: bool = True
) -> Path:
    """JourneyDB as released: data/train/imgs/<folder>/<id>.jpg + a JSONL annotation file whose
    records carry img_path ("./<folder>/<id>.jpg"), prompt and Task2.Caption. Record `broken` points to
    a corrupt image, `missing` to a file that does not exist, `empty_caption` has no caption at all;
    odd records carry their caption only in Task2.Caption (empty prompt)."""
    imgs = root / "data" / "train" / "imgs"
    lines = []
    for i in range(n):
        rel = f"./{i % 2:03d}/img{i:04d}.jpg"
        if i == broken:
            (imgs / rel).parent.mkdir(parents=True, exist_ok=True)
            (imgs / rel).write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
        elif i != missing:
            make_image(imgs / rel, i, size=(40 + 8 * (i % 3), 32), fmt="JPEG")
        prompt = "" if i % 2 else caption(i) + ", photo"
        cap = "" if i == empty_caption else caption(i)
        rec = {
            "img_path": rel,
            "prompt": prompt if i != empty_caption else "",
            "Task1": {"Style": ["flat"], "Content": ["shape"]},
            "Task2": {"Caption": cap, "Question": [], "Answer": []},
        }
        lines.append(json.dumps(rec))
        if bad_line and i == 4:
            lines.append("{this is not json")
    ann = root / "data" / "train" / "train_anno.jsonl"
    ann.parent.mkdir(parents=True, exist_ok=True)
    ann.write_text("\n".join(lines) + "\n")
    return root


def make_folder(root: Path, n: int = 6, manifest: str = "jsonl") -> Path:
    """Generic image folder (the toy zoo's layout): images/ + manifest.{jsonl,csv,parquet} with id, file, caption."""
    rows = []
    for i in range(n):
        rel = f"images/{i:03d}.png"
        make_image(root / rel, 100 + i, size=(32, 32 + 4 * i))
        rows.append({"id": f"img-{i}", "file": rel, "caption": caption(i), "shape": SHAPES[i % 3]})
    if manifest == "jsonl":
        (root / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif manifest == "csv":
        import pandas as pd

        pd.DataFrame(rows).to_csv(root / "manifest.csv", index=False)
    elif manifest == "parquet":
        import pandas as pd

        pd.DataFrame(rows).to_parquet(root / "manifest.parquet", index=False)
    return root
