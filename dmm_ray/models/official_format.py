"""Interop with the published DMM checkpoints (MCG-NJU/DMM, a diffusers fork).

Their UNet config says `addition_embed_type: "model_merge"` (SD1.5) or `"model_merge_xl"` (SDXL)
with `num_models: N`; weights hold `model_embedding.weight` (N, 1280) and an `add_embedding`
TimestepEmbedding(1280, 1280) (SD1.5). In the XL variant `add_embedding` stays SDXL's text_time
embedding and the style MLP is a second TimestepEmbedding, `add_embedding2` (no underscore: the fork's
`DMMUNet2DConditionModel`). dmm-ray before this fix wrote it as `add_embedding_2`; such files still load.
Our StyleUNet keeps the same numbers under `class_embedding.codebook` / `class_embedding.mlp`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from safetensors.torch import load_file, save_file

from dmm_ray.models.style_unet import StyleUNet

WEIGHTS = "diffusion_pytorch_model.safetensors"
WEIGHTS_INDEX = WEIGHTS + ".index.json"  # diffusers' save_pretrained shards a UNet over max_shard_size (10 GB: an fp32 SDXL UNet)
_OURS_CODEBOOK = "class_embedding.codebook.weight"
_OURS_MLP = "class_embedding.mlp."


_LEGACY_XL_MLP = "add_embedding_2."  # what dmm-ray wrote for the XL style MLP before it matched the fork's name


def _mlp_prefix(is_xl: bool) -> str:
    return "add_embedding2." if is_xl else "add_embedding."


def official_to_ours(state_dict: dict, config: dict) -> tuple[dict, dict]:
    """Map an official DMM UNet (state dict, config) to StyleUNet's (state dict, config)."""
    kind = config.get("addition_embed_type")
    if kind not in ("model_merge", "model_merge_xl"):
        raise ValueError(f"not a DMM checkpoint: addition_embed_type is {kind!r}, expected 'model_merge' or 'model_merge_xl'")
    is_xl = kind == "model_merge_xl"
    num_models = int(config["num_models"])
    config = {k: v for k, v in config.items() if k not in ("num_models", "_class_name", "_diffusers_version")}
    config["addition_embed_type"] = "text_time" if is_xl else None
    config.setdefault("style_names", [f"style_{i}" for i in range(num_models)])
    mlp = _mlp_prefix(is_xl)
    ours = {}
    for key, value in state_dict.items():
        if key == "model_embedding.weight":
            ours[_OURS_CODEBOOK] = value
        elif key.startswith(mlp):
            ours[_OURS_MLP + key[len(mlp) :]] = value
        elif is_xl and key.startswith(_LEGACY_XL_MLP):
            ours[_OURS_MLP + key[len(_LEGACY_XL_MLP) :]] = value
        else:
            ours[key] = value
    if _OURS_CODEBOOK not in ours:
        raise ValueError("DMM checkpoint has no model_embedding.weight")
    return ours, config


def ours_to_official(state_dict: dict, config: dict) -> tuple[dict, dict]:
    """Inverse of `official_to_ours`."""
    is_xl = config.get("addition_embed_type") == "text_time"
    mlp = _mlp_prefix(is_xl)
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    config["num_models"] = len(config["style_names"])
    config["addition_embed_type"] = "model_merge_xl" if is_xl else "model_merge"
    official = {}
    for key, value in state_dict.items():
        if key == _OURS_CODEBOOK:
            official["model_embedding.weight"] = value
        elif key.startswith(_OURS_MLP):
            official[mlp + key[len(_OURS_MLP) :]] = value
        else:
            official[key] = value
    return official, config


def _official_state_dict(folder: Path) -> dict:
    """The weights of a `unet/` folder: diffusion_pytorch_model.safetensors, or the shards its
    diffusion_pytorch_model.safetensors.index.json lists (diffusers' sharded layout)."""
    if (folder / WEIGHTS).is_file():
        return load_file(str(folder / WEIGHTS))
    if not (folder / WEIGHTS_INDEX).is_file():
        raise FileNotFoundError(f"{folder} holds no UNet weights: neither {WEIGHTS} nor the index of its shards, {WEIGHTS_INDEX}")
    shards = sorted(set(json.loads((folder / WEIGHTS_INDEX).read_text())["weight_map"].values()))
    missing = [s for s in shards if Path(s).name != s or not (folder / s).is_file()]  # a name with a folder in it is not a shard here
    if missing:
        raise FileNotFoundError(f"{folder / WEIGHTS_INDEX} lists shard(s) {missing} that are not in {folder}; copy the folder again")
    state: dict = {}
    for shard in shards:
        state.update(load_file(str(folder / shard)))
    return state


def load_official_unet(folder: str | Path) -> StyleUNet:
    """Load a DMM `unet/` folder (config.json + diffusion_pytorch_model.safetensors, or its shards and
    their index) into a StyleUNet."""
    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text())
    state_dict, our_config = official_to_ours(_official_state_dict(folder), config)
    unet = StyleUNet(**our_config)
    unet.load_state_dict(state_dict, strict=True)
    return unet.eval()


def save_official_unet(unet: StyleUNet, folder: str | Path) -> None:
    """Write a StyleUNet in the official DMM layout (loadable by their diffusers fork)."""
    extensions = [k for k in ("style_film", "style_adapter_rank") if unet.config.get(k)]
    if extensions:
        raise ValueError(
            f"the official DMM layout holds only the style codebook and MLP; this model uses {extensions} "
            "(dmm-ray extensions). Save it with save_pretrained, or bake one style into a stock checkpoint "
            "with jobs/export.py"
        )
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state_dict = {k: v.detach().contiguous() for k, v in unet.state_dict().items()}
    official, config = ours_to_official(state_dict, dict(unet.config))
    config["_class_name"] = "UNet2DConditionModel"
    # Both files are written beside their names and renamed in only once both are complete: written in
    # place, a save that failed part-way (a full disk, a Ctrl-C) left a torn weights file where an
    # earlier save's was, and that folder no longer loaded.
    staged = {folder / WEIGHTS: folder / (WEIGHTS + ".tmp"), folder / "config.json": folder / "config.json.tmp"}
    try:
        save_file(official, str(staged[folder / WEIGHTS]))
        staged[folder / "config.json"].write_text(json.dumps(config, indent=2, default=list))
        for path, tmp in staged.items():
            os.replace(tmp, path)
    finally:
        for tmp in staged.values():
            tmp.unlink(missing_ok=True)
