"""SD1.5 or SDXL: which diffusers pipeline class fits a folder, read from its configs (no weights).

Everything that differs between the two families is chosen here once, so the merge, synthesis,
evaluation and Serve code load any base, teacher or merged model the same way.
"""

from __future__ import annotations

import json
from pathlib import Path


def is_sdxl(folder: str | Path) -> bool:
    """True for an SDXL-architecture pipeline folder (a second text encoder and text_time conditioning)."""
    folder = Path(folder)
    index = folder / "model_index.json"
    if index.is_file() and "text_encoder_2" in json.loads(index.read_text()):
        return True
    unet = folder / "unet" / "config.json"
    return unet.is_file() and json.loads(unet.read_text()).get("addition_embed_type") == "text_time"


def base_pipeline_class(folder: str | Path):
    """StableDiffusionPipeline or StableDiffusionXLPipeline for a plain (teacher/base) folder."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    return StableDiffusionXLPipeline if is_sdxl(folder) else StableDiffusionPipeline


def dmm_pipeline_class(folder: str | Path):
    """DMMPipeline or DMMXLPipeline for a merged (or base) folder."""
    from dmm_ray.pipeline import DMMPipeline, DMMXLPipeline

    return DMMXLPipeline if is_sdxl(folder) else DMMPipeline


def pipeline_kwargs(cls) -> dict:
    """SD1.5 pipelines take a safety checker, which a merge never loads; SDXL has none."""
    from diffusers import StableDiffusionPipeline

    return {"safety_checker": None, "requires_safety_checker": False} if issubclass(cls, StableDiffusionPipeline) else {}


def load_dmm_pipeline(path: str | Path, **kwargs):
    """A merged model folder as DMMPipeline / DMMXLPipeline, offline."""
    cls = dmm_pipeline_class(path)
    return cls.from_pretrained(str(path), **{"local_files_only": True, **pipeline_kwargs(cls), **kwargs})


def load_plain_pipeline(path: str | Path, **kwargs):
    """A plain diffusers folder (a base, a teacher, the weighted-merge baseline), offline."""
    cls = base_pipeline_class(path)
    return cls.from_pretrained(str(path), **{"local_files_only": True, **pipeline_kwargs(cls), **kwargs})
