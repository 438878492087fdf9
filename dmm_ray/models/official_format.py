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
import threading
from pathlib import Path

from safetensors.torch import load_file, save_file

from dmm_ray.merged_model import entries_staging, move_in, remove
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
    if kind not in ("model_merge", "model_merge_xl") and config.get("style_names"):
        # a dmm-ray merged model (StyleUNet) is a DMM model too, in diffusers' own layout: "not a DMM checkpoint" misled
        raise ValueError(
            "this is a dmm-ray merged model (its UNet config has style_names), not the official DMM layout: load it with "
            "dmm_ray.pipeline.load_dmm_pipeline(path) or DMMPipeline.from_pretrained(path), its UNet with StyleUNet.from_pretrained"
        )
    if kind not in ("model_merge", "model_merge_xl"):
        raise ValueError(f"not a DMM checkpoint: addition_embed_type is {kind!r}, expected 'model_merge' or 'model_merge_xl'")
    is_xl = kind == "model_merge_xl"
    if not isinstance(config.get("num_models"), int) or isinstance(config["num_models"], bool) or config["num_models"] < 1:
        raise ValueError(f"DMM checkpoint config: num_models (how many style prompts) must be a whole number >= 1, got {config.get('num_models')!r}")
    num_models = config["num_models"]
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
    # from_config, diffusers' own rule for a config: a key this diffusers' UNet does not take (one a newer diffusers
    # wrote) is dropped with a warning; StyleUNet(**config) failed on it with a bare TypeError
    unet = StyleUNet.from_config(our_config)
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
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"cannot save to {folder}: it is a file; give a folder path")
    state_dict = {k: v.detach().contiguous() for k, v in unet.state_dict().items()}
    official, config = ours_to_official(state_dict, dict(unet.config))
    config["_class_name"] = "UNet2DConditionModel"
    # Weights and config must come from one save: both are written into a hidden folder inside `folder`
    # and moved in together as DMMPipeline.save_pretrained's are (`merged_model.move_in`: the earlier files
    # set aside until both are in, put back on an error or Ctrl-C, and by the next save after a kill).
    # Renamed in one after the other under fixed `.tmp` names, a Ctrl-C or kill between the two renames, or
    # two saves into the folder at once (each renaming the other's files), left the weights of one save beside
    # the config of another, which no longer loaded. The folder itself is never renamed (a link, a mount point
    # or the working directory stays), and what else it holds stays. The staging name holds the pid, so saves
    # from two processes stage apart; threads of one process take turns.
    with _SAVE_LOCK:
        folder.mkdir(parents=True, exist_ok=True)
        staging = entries_staging(folder)
        try:
            staging.mkdir()
            save_file(official, str(staging / WEIGHTS))
            (staging / "config.json").write_text(json.dumps(config, indent=2, default=list))
            move_in(staging, folder)
        finally:
            remove(staging)


_SAVE_LOCK = threading.Lock()
