"""Zoo build configuration (pydantic, unknown keys fail naming the key) and the two presets."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .manifest import MANIFEST
from .styles import STYLES

TeacherFormat = Literal["diffusers", "single_file", "lora"]
MARKER = ".zoo_complete.json"  # written last by a finished build: {"fingerprint", "size", "seed", "threads"}
# torch threads of a zoo build unless --threads says otherwise; 2 built the README's zoo. Part of a zoo's
# identity beside the config's fingerprint: another thread count sums floats in another order, and
# every weight of the zoo comes out different (dmm_ray.zoo.build.default_threads).
ZOO_THREADS = 2


class TeacherPlan(BaseModel):
    """One teacher: the base fine-tuned on the image set restyled by `style`, saved as `format`."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    style: str
    format: TeacherFormat = "diffusers"
    train_text_encoder: bool = Field(False, description="fine-tune its own text encoder too (not allowed for LoRA)")

    @field_validator("style")
    @classmethod
    def _known_style(cls, v: str) -> str:
        if v not in STYLES:
            raise ValueError(f"unknown style {v!r}; known styles: {list(STYLES)}")
        return v

    @model_validator(mode="after")
    def _lora_keeps_base_text_encoder(self):
        if self.format == "lora" and self.train_text_encoder:
            raise ValueError(f"teacher {self.style!r}: format 'lora' trains only a UNet adapter; set train_text_encoder=false")
        return self


class ZooConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    size: Literal["micro", "full", "custom"] = "custom"
    seed: int = 0
    image_size: Literal[32] = 32
    teachers: list[TeacherPlan]
    disk_images: int = Field(gt=0, description="captioned images written to images/ (the on-disk image set)")
    pool_images: int = Field(gt=0, description="rendered + restyled images the VAE and feature net train on")
    base_scenes: int = Field(gt=0, description="distinct training scenes the base UNet sees (latents precomputed)")
    teacher_scenes: int = Field(gt=0, description="distinct scenes per teacher fine-tune")
    vae_steps: int = Field(gt=0)
    base_steps: int = Field(gt=0)
    teacher_steps: int = Field(gt=0)
    lora_steps: int = Field(gt=0)
    feature_steps: int = Field(gt=0)
    batch_size: int = Field(64, gt=0)
    vae_batch_size: int = Field(16, gt=0, description="small batches: more updates per CPU second for the VAE")
    vae_lr: float = 3e-3
    vae_object_weight: float = Field(4.0, ge=0, description="extra loss weight on object pixels")
    base_lr: float = 1e-3
    teacher_lr: float = 5e-4
    lora_lr: float = 3e-3
    # Rank 4 on SD_ADAPTER_TARGETS is 8.5% of the toy UNet's parameters, about what a rank-64 LoRA on the
    # same layers is of SD1.5's (7.2%); rank 8 was 17%, a LoRA twice as heavy as real ones relative to its base.
    lora_rank: int = Field(4, gt=0)
    base_ema: float = 0.995

    @model_validator(mode="after")
    def _distinct_styles(self):
        names = [t.style for t in self.teachers]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"teachers: style(s) {dup} listed more than once")
        if not names:
            raise ValueError("teachers: at least one teacher is needed")
        return self

    def fingerprint(self) -> str:
        return hashlib.sha1(json.dumps(self.model_dump(), sort_keys=True).encode()).hexdigest()[:16]


FULL_TEACHERS = [
    TeacherPlan(style="warm", format="diffusers"),
    TeacherPlan(style="cool", format="lora"),
    TeacherPlan(style="faded", format="single_file"),
    TeacherPlan(style="bright", format="diffusers"),
    TeacherPlan(style="noir", format="diffusers", train_text_encoder=True),
    TeacherPlan(style="neon", format="single_file"),
    TeacherPlan(style="pixel", format="lora"),
    TeacherPlan(style="sketch", format="diffusers"),
]

PRESETS: dict[str, dict] = {
    "full": dict(
        teachers=FULL_TEACHERS,
        disk_images=6000,
        pool_images=8192,
        base_scenes=16384,
        teacher_scenes=4096,
        vae_steps=1000,
        base_steps=2000,
        teacher_steps=120,
        lora_steps=120,
        feature_steps=250,
    ),
    # 3 styles, one per format, a few steps each: for integration tests (well under a minute).
    "micro": dict(
        teachers=[
            TeacherPlan(style="warm", format="diffusers"),
            TeacherPlan(style="noir", format="single_file"),
            TeacherPlan(style="sketch", format="lora"),
        ],
        disk_images=32,
        pool_images=128,
        base_scenes=128,
        teacher_scenes=64,
        vae_steps=4,
        base_steps=4,
        teacher_steps=2,
        lora_steps=2,
        feature_steps=4,
        batch_size=16,
    ),
}


def preset(size: str, seed: int = 0, **overrides) -> ZooConfig:
    if size not in PRESETS:
        raise ValueError(f"unknown zoo size {size!r}; known sizes: {list(PRESETS)}")
    return ZooConfig(size=size, seed=seed, **(PRESETS[size] | overrides))


def is_complete(out: str | Path) -> dict | None:
    """The completion record of a finished zoo at `out`, or None."""
    marker = Path(out) / MARKER
    if not marker.is_file() or not (Path(out) / MANIFEST).is_file():
        return None
    try:
        return json.loads(marker.read_text())
    except json.JSONDecodeError:
        return None


def built_threads(out: str | Path, done: dict) -> int | None:
    """The torch thread count the finished zoo at `out` (completion record `done`) was built with: its
    marker's, else its metrics.json's (zoos finished before the marker recorded it), else None."""
    if isinstance(done.get("threads"), int):
        return done["threads"]
    try:
        threads = json.loads((Path(out) / "metrics.json").read_text()).get("torch_threads")
    except (OSError, ValueError, AttributeError):
        return None
    return threads if isinstance(threads, int) else None


def outdated_preset(size: str, out: str | Path) -> str | None:
    """Why the finished zoo at `out` cannot serve as preset `size` (built from an older version of
    the preset, or with other torch threads than the preset's), or None: a missing or unfinished zoo
    is for the build to make or refuse."""
    done, wanted = is_complete(out), preset(size)
    if done is None:
        return None
    if done.get("fingerprint") == wanted.fingerprint():
        threads = built_threads(out, done)
        if threads in (None, ZOO_THREADS):
            return None
        return (
            f"{out} holds the {size!r} toy zoo built with {threads} torch thread(s) (`jobs/build_zoo.py --threads {threads}`), "
            f"not the {ZOO_THREADS} the preset is built with: its weights differ (float sums in another order); to use it, "
            f"give its folder (zoo: {out}), or move it elsewhere and the preset is built in its place"
        )
    if (done.get("size"), done.get("seed")) != (size, wanted.seed):  # e.g. `build_zoo.py --seed 1` into the default folder
        return (
            f"{out} holds a toy zoo of size {done.get('size')!r} with seed {done.get('seed')}, not the {size!r} preset "
            f"(seed {wanted.seed}) that `zoo: {size}` names; to use it, give its folder (zoo: {out}), "
            "or move it elsewhere and the preset is built in its place"
        )
    took = "about 11 min on 2 cores" if size == "full" else "about a minute"
    return (
        f"{out} holds a toy zoo built from an older version of the {size!r} preset; "
        f"rebuild it with `python jobs/build_zoo.py --out {out} --size {size} --force` ({took}) or remove the folder"
    )
