"""Weighted-merge baseline (paper Fig. 8 / Table 3 "WM"): the parameter-space weighted sum of N
teacher checkpoints, what supermerger and diffusers' CheckpointMerger do.

theta_merged = sum_k w_k theta_k, w_k >= 0, sum_k w_k = 1, for every floating-point tensor of
the UNet (and by default the text encoder); the VAE, tokenizer and scheduler come from the first
teacher (teachers share the latent space — validate_teachers checks that).
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

WEIGHT_TOLERANCE = 1e-6


RECORD = "weighted_merge.json"  # provenance beside the merged folder: what makes --out an earlier weighted merge


class MergeWeightsError(ValueError):
    pass


def validate_weights(weights: Sequence[float] | None, names: Sequence[str]) -> list[float]:
    """Weights for `names` (None: equal). Non-negative, finite, one per model, summing to 1."""
    n = len(names)
    if n == 0:
        raise MergeWeightsError("nothing to merge: no models given")
    if weights is None:
        return [1.0 / n] * n
    w = [float(x) for x in weights]
    if len(w) != n:
        raise MergeWeightsError(f"got {len(w)} weights for {n} models ({', '.join(names)}); give one weight per model")
    bad = {name: x for name, x in zip(names, w) if not math.isfinite(x) or x < 0}
    if bad:
        raise MergeWeightsError(f"merge weights must be finite and >= 0; bad: {bad}")
    total = sum(w)
    if abs(total - 1.0) > WEIGHT_TOLERANCE:
        raise MergeWeightsError(
            f"merge weights must sum to 1, got {total:.6g} for {dict(zip(names, w))}; e.g. normalise them: {[round(x / total, 6) for x in w] if total > 0 else 'use equal weights'}"
        )
    return w


def _fuse_adapters(module: nn.Module, name: str) -> nn.Module:
    """LoRA teachers: fold the adapter into the base weights so keys match a plain checkpoint."""
    if any("lora_" in k for k in module.state_dict()):
        if hasattr(module, "fuse_lora") and hasattr(module, "unload_lora"):
            module.fuse_lora()
            module.unload_lora()
        else:
            try:
                module = module.merge_and_unload()  # peft-wrapped text encoder
            except AttributeError as e:
                raise ValueError(f"teacher '{name}': has LoRA adapter weights that cannot be fused for merging") from e
    return module


def weighted_merge_state_dicts(state_dicts: Sequence[dict], weights: Sequence[float], names: Sequence[str]) -> dict:
    """Weighted sum of matching state dicts; float tensors accumulate in float64, then cast back."""
    keys = list(state_dicts[0])
    for name, sd in zip(names[1:], state_dicts[1:]):
        if set(sd) != set(keys):
            diff = sorted(set(sd) ^ set(keys))[:5]
            raise ValueError(f"'{name}' has different parameters from '{names[0]}' (e.g. {diff}); weighted merge needs one architecture")
    merged = {}
    for k in tqdm(keys, desc="weighted merge", leave=False, disable=len(keys) < 200):
        ref = state_dicts[0][k]
        for name, sd in zip(names[1:], state_dicts[1:]):
            if sd[k].shape != ref.shape:
                raise ValueError(f"'{k}' has shape {tuple(sd[k].shape)} in '{name}' but {tuple(ref.shape)} in '{names[0]}'")
        if not torch.is_floating_point(ref):
            merged[k] = ref.clone()  # integer buffers (e.g. position ids) are not averaged
            continue
        acc = torch.zeros(ref.shape, dtype=torch.float64)
        for w, sd in zip(weights, state_dicts):
            acc += w * sd[k].detach().to("cpu", torch.float64)
        merged[k] = acc.to(ref.dtype)
    return merged


def weighted_merge_modules(modules: Sequence[nn.Module], weights: Sequence[float] | None, names: Sequence[str] | None = None) -> nn.Module:
    """A copy of modules[0] holding the weighted sum of all modules' parameters."""
    names = list(names) if names is not None else [f"model_{k}" for k in range(len(modules))]
    w = validate_weights(weights, names)
    modules = [_fuse_adapters(m, n) for m, n in zip(modules, names)]
    merged = weighted_merge_state_dicts([m.state_dict() for m in modules], w, names)
    out = copy.deepcopy(modules[0])
    out.load_state_dict(merged)
    return out.eval()


def weighted_merge_pipelines(pipes: Sequence[Any], weights: Sequence[float] | None, names: Sequence[str], merge_text_encoder: bool = True):
    """StableDiffusionPipeline whose UNet (and text encoder) is the weighted sum of `pipes`'."""
    from diffusers import StableDiffusionPipeline

    unet = weighted_merge_modules([p.unet for p in pipes], weights, names)
    text_encoder = weighted_merge_modules([p.text_encoder for p in pipes], weights, names) if merge_text_encoder else pipes[0].text_encoder
    first = pipes[0]
    return StableDiffusionPipeline(
        vae=first.vae,
        text_encoder=text_encoder,
        tokenizer=first.tokenizer,
        unet=unet,
        scheduler=first.scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def check_output(output_dir: str | Path, setting: str = "output_dir") -> None:
    """Where a weighted merge may be saved: a new or empty folder, or an earlier weighted merge (it is
    replaced); never a merged model or anything else (save_pretrained would write into it)."""
    from dmm_ray.paths import OutputPathError, check_writable_folder

    check_writable_folder(output_dir, setting)
    folder = Path(output_dir).expanduser()
    if folder.is_dir() and any(folder.iterdir()) and not (folder / RECORD).is_file():
        raise OutputPathError(f"{setting} {folder} holds other files and is not an earlier weighted merge (no {RECORD}); give a new or empty folder")


def weighted_merge_teachers(specs: Sequence[Any], weights: Sequence[float] | None, output_dir: str | Path, merge_text_encoder: bool = True) -> Path:
    """Load TeacherSpecs, merge them, save a diffusers folder (+ weighted_merge.json provenance)."""
    from dmm_ray.teachers import load_teacher_pipeline, teacher_checksum

    names = [s.name for s in specs]
    w = validate_weights(weights, names)  # fail before loading anything
    check_output(output_dir)
    pipes = [load_teacher_pipeline(s) for s in tqdm(specs, desc="loading teachers")]
    merged = weighted_merge_pipelines(pipes, w, names, merge_text_encoder)
    out = Path(output_dir)
    merged.save_pretrained(out, safe_serialization=True)
    (out / RECORD).write_text(
        json.dumps(
            {
                "teachers": names,
                "weights": w,
                "checksums": [teacher_checksum(s) for s in specs],
                "merge_text_encoder": merge_text_encoder,
            },
            indent=1,
        )
    )
    return out
