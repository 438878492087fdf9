"""SD1.5 or SDXL: which diffusers pipeline class fits a folder, read from its configs (no weights).

Everything that differs between the two families is chosen here once, so the merge, synthesis,
evaluation and Serve code load any base, teacher or merged model the same way (merged models:
`dmm_ray.pipeline.load_dmm_pipeline`, which builds on this module).
"""

from __future__ import annotations

import json
import logging
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


def pipeline_kwargs(cls) -> dict:
    """SD1.5 pipelines take a safety checker, which a merge never loads; SDXL has none."""
    from diffusers import StableDiffusionPipeline

    return {"safety_checker": None, "requires_safety_checker": False} if issubclass(cls, StableDiffusionPipeline) else {}


def merged_folder(path: str | Path) -> str | Path:
    """`path`, or its `.old` sibling when `path` is missing because a save of the merged model was
    interrupted between its two renames (dmm_ray/merged_model.py `swap_in`): the last good model, read in
    place. The next merge on that output_dir renames it back (`recover_merged`), the next few-step job on
    its folder a few-step model's (`dmm_ray.fast.job`)."""
    folder = Path(path)
    old = folder.with_name(folder.name + ".old")
    if "://" not in str(path) and not folder.exists() and (old / "unet" / "config.json").is_file():
        logging.getLogger(__name__).warning(
            "%s is missing but %s holds the previous merged model (a save was interrupted); loading that. "
            "Re-run the job that saved it on the same folder (jobs/merge.py; jobs/fast.py for a few-step model) to restore %s.",
            folder,
            old,
            folder.name,
        )
        return old
    return path


def load_plain_pipeline(path: str | Path, **kwargs):
    """A plain diffusers folder (a base, a teacher, the weighted-merge baseline), offline."""
    cls = base_pipeline_class(path)
    return cls.from_pretrained(str(path), **{"local_files_only": True, **pipeline_kwargs(cls), **kwargs})
