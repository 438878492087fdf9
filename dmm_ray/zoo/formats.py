"""Saving teachers in the three real formats (diffusers folder, single file, base + LoRA)."""

from __future__ import annotations

from pathlib import Path

from diffusers import StableDiffusionPipeline

from dmm_ray.defaults import SD_ADAPTER_TARGETS
from dmm_ray.formats.single_file import export_single_file

LORA_TARGETS = list(SD_ADAPTER_TARGETS)  # the zoo's LoRA teachers adapt what the style adapters target by default


def save_teacher(pipe: StableDiffusionPipeline, fmt: str, teachers_dir: Path, name: str, lora_state: dict | None = None) -> dict:
    """Write one teacher; returns its manifest entry fields (paths relative to the zoo root)."""
    if fmt == "diffusers":
        pipe.save_pretrained(teachers_dir / name, safe_serialization=True)
        return {"format": "diffusers", "source": f"teachers/{name}"}
    if fmt == "single_file":
        export_single_file(pipe, teachers_dir / f"{name}.safetensors")
        return {"format": "single_file", "source": f"teachers/{name}.safetensors", "base": "base"}
    if fmt == "lora":
        if lora_state is None:
            raise ValueError(f"teacher {name!r}: format 'lora' needs the adapter state dict")
        StableDiffusionPipeline.save_lora_weights(teachers_dir / name, unet_lora_layers=lora_state, weight_name="pytorch_lora_weights.safetensors")
        return {"format": "lora", "source": f"teachers/{name}/pytorch_lora_weights.safetensors", "base": "base"}
    raise ValueError(f"teacher {name!r}: unknown format {fmt!r}; expected diffusers, single_file or lora")
