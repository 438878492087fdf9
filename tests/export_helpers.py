"""Tiny merged models (SD1.5 and SDXL, with style FiLM) for the export and plugin tests, built in code."""

from __future__ import annotations

import json
from pathlib import Path

import torch

STYLES = ["ink", "neon", "pixel"]
MIXTURE = {"ink": 0.25, "neon": 0.75}
OTHER_MIXTURE = {"ink": 0.75, "pixel": 0.25}
SIZE = 16  # px: 8x8 latents with the tiny two-block VAE (one 2x downsampling)... 16 px -> 8x8
PROMPT = "a red circle on a blue background"
NEGATIVE = "low quality"


def randomise_style(unet, seed: int = 1, scale: float = 0.2) -> None:
    """A trained-looking style module: random codebook, MLP and (non-zero) FiLM, so every style differs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in unet.class_embedding.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)
        unet.class_embedding.codebook.weight.mul_(5)


def tiny_merged(arch: str = "sd15", film: bool = True, seed: int = 0, adapter_rank: int = 0, text_hidden_2: int = 48):
    """A DMMPipeline / DMMXLPipeline over tiny components with three styles. SDXL's two text encoders
    get different widths (32, `text_hidden_2`) as in real SDXL, so diffusers' single-file loader tells
    them apart (equal widths need `formats.single_file.sdxl_text_encoder_2`)."""
    from dmm_ray.models.style_unet import StyleUNet
    from dmm_ray.pipeline import DMMPipeline, DMMXLPipeline
    from dmm_ray.tiny import tiny_sd_components, tiny_sdxl_components

    if arch == "sdxl":
        c = tiny_sdxl_components(seed=seed, text_hidden_2=text_hidden_2)
        cls = DMMXLPipeline
    else:
        c = {k: v for k, v in tiny_sd_components(seed=seed).items() if k not in ("safety_checker", "feature_extractor", "requires_safety_checker")}
        cls = DMMPipeline
    student = StyleUNet.from_unet(
        c.pop("unet"), STYLES, style_film=film, adapter_rank=adapter_rank, adapter_targets=["to_q", "to_out.0", "conv1", "conv_out", "time_emb_proj"]
    )
    randomise_style(student, seed=seed + 1)
    if arch == "sdxl":
        pipe = cls(unet=student.eval(), **c)
    else:
        pipe = cls.from_components(student.eval(), c["vae"], c["text_encoder"], c["tokenizer"], c["scheduler"])
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_merged(pipe, folder: Path, teachers_root: Path | None = None, mlflow: dict | None = None) -> Path:
    """Save like jobs/merge.py does: the pipeline folder plus dmm_merge.json naming (tiny) teachers."""
    pipe.save_pretrained(folder, safe_serialization=True)
    teachers = []
    if teachers_root is not None:
        for i, name in enumerate(STYLES):
            source = teachers_root / f"{name}.bin"
            source.parent.mkdir(parents=True, exist_ok=True)
            source.write_bytes(bytes([i]) * 64)
            teachers.append({"name": name, "source": str(source), "format": "ckpt", "allow_pickle": True})
    record = {"name": "tiny-merge", "styles": STYLES, "teachers": teachers}
    if mlflow:
        record["mlflow"] = mlflow
    (folder / "dmm_merge.json").write_text(json.dumps(record))
    return folder


def gen(pipe, styled: bool = True, seed: int = 0, steps: int = 2, guidance: float = 5.0, **kwargs):
    """One image (np float, [0,1]) with fixed settings; `styled` pipes take style=/style_weights=."""
    import numpy as np

    if not styled:
        kwargs.pop("style", None)
        kwargs.pop("style_weights", None)
    out = pipe(
        PROMPT,
        negative_prompt=NEGATIVE,
        num_inference_steps=steps,
        guidance_scale=guidance,
        height=SIZE,
        width=SIZE,
        generator=torch.Generator().manual_seed(seed),
        output_type="np",
        **kwargs,
    ).images
    return np.asarray(out[0], dtype=np.float64)


def tree(root: Path) -> dict[str, bytes]:
    """Every file under `root` (relative path -> bytes; a file: {"": bytes}), to show nothing changed."""
    root = Path(root)
    if root.is_file():
        return {"": root.read_bytes()}
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def mlflow_store(folder: Path) -> tuple[str, str]:
    """(sqlite tracking URI, run id) of a new store under `folder` holding one run."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{folder}/mlflow.db"
    client = MlflowClient(uri)
    experiment = client.create_experiment("dmm-ray", artifact_location=str(folder / "artifacts"))
    return uri, client.create_run(experiment, run_name="merge").info.run_id
