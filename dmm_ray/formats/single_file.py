"""Export a diffusers SD pipeline to the original LDM single-file layout (as community sites ship).

diffusers reads this layout (`from_single_file`, `convert_ldm_*_checkpoint`) but does not write it.
The mapping below is the exact inverse of diffusers' converters for any block count and
`layers_per_block`, so export -> `StableDiffusionPipeline.from_single_file(path, config=folder)`
round-trips every weight bit-exactly (tested on tiny models).

SDXL (a pipeline with `text_encoder_2`) is written in SDXL's original layout: the UNet and VAE as
for SD1.5 (plus `label_emb` for the text_time embedding), the first text encoder under
`conditioner.embedders.0.transformer.`, the second in OpenCLIP layout under
`conditioner.embedders.1.model.` (fused `in_proj` q/k/v, `text_projection` transposed), which
`StableDiffusionXLPipeline.from_single_file(path, config=folder)` reads back, except where the two
encoders are equally wide (tiny or custom models, never real SDXL's 768 and 1280): see
`sdxl_text_encoder_2`, which the teacher loader passes in for such files.
"""

from __future__ import annotations

import glob
import os
import re
from pathlib import Path

import torch
from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING, LDM_UNET_KEY
from safetensors.torch import save_file

from dmm_ray.output_lock import left_by_killed

VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."
SDXL_CLIP_PREFIX = "conditioner.embedders.0.transformer."
SDXL_OPENCLIP_PREFIX = "conditioner.embedders.1.model."

_RESNET_TO_LDM = [
    ("norm1", "in_layers.0"),
    ("conv1", "in_layers.2"),
    ("norm2", "out_layers.0"),
    ("conv2", "out_layers.3"),
    ("time_emb_proj", "emb_layers.1"),
    ("conv_shortcut", "skip_connection"),
]


def _resnet(rest: str) -> str:
    for ours, ldm in _RESNET_TO_LDM:
        if rest.startswith(ours + "."):
            return ldm + rest[len(ours) :]
    raise KeyError(rest)


def unet_key_to_ldm(key: str, config) -> str:
    """diffusers UNet2DConditionModel key -> LDM `model.diffusion_model.*` key."""
    layers = DIFFUSERS_TO_LDM_MAPPING["unet"]["layers"]
    if key in layers:
        return LDM_UNET_KEY + layers[key]
    if config.get("addition_embed_type") == "text_time" and key.startswith("add_embedding."):
        return LDM_UNET_KEY + DIFFUSERS_TO_LDM_MAPPING["unet"]["addition_embed_type"][key]
    per_block = config["layers_per_block"] + 1  # LDM counts the down/upsampler as a layer
    if m := re.match(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key):
        block, kind, layer, rest = int(m[1]), m[2], int(m[3]), m[4]
        index = per_block * block + layer + 1
        return LDM_UNET_KEY + (f"input_blocks.{index}.0.{_resnet(rest)}" if kind == "resnets" else f"input_blocks.{index}.1.{rest}")
    if m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", key):
        return LDM_UNET_KEY + f"input_blocks.{per_block * (int(m[1]) + 1)}.0.op.{m[2]}"
    if m := re.match(r"mid_block\.resnets\.(\d+)\.(.*)", key):
        return LDM_UNET_KEY + f"middle_block.{2 * int(m[1])}.{_resnet(m[2])}"
    if m := re.match(r"mid_block\.attentions\.0\.(.*)", key):
        return LDM_UNET_KEY + f"middle_block.1.{m[1]}"
    if m := re.match(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key):
        block, kind, layer, rest = int(m[1]), m[2], int(m[3]), m[4]
        index = per_block * block + layer
        return LDM_UNET_KEY + (f"output_blocks.{index}.0.{_resnet(rest)}" if kind == "resnets" else f"output_blocks.{index}.1.{rest}")
    if m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)", key):
        block = int(m[1])
        has_attention = "CrossAttn" in config["up_block_types"][block]
        index = per_block * block + per_block - 1
        return LDM_UNET_KEY + f"output_blocks.{index}.{2 if has_attention else 1}.conv.{m[2]}"
    raise KeyError(f"UNet key {key!r} has no LDM single-file equivalent")


_VAE_ATTENTION_TO_LDM = [("group_norm.", "norm."), ("to_q.", "q."), ("to_k.", "k."), ("to_v.", "v."), ("to_out.0.", "proj_out.")]


def vae_key_to_ldm(key: str, config) -> str:
    """diffusers AutoencoderKL key -> LDM `first_stage_model.*` key."""
    direct = DIFFUSERS_TO_LDM_MAPPING["vae"]  # diffusers key -> LDM key for the top-level layers
    if key in direct:
        return VAE_PREFIX + direct[key]
    n_up = len(config["up_block_types"])
    if m := re.match(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", key):
        return VAE_PREFIX + f"encoder.down.{m[1]}.block.{m[2]}.{m[3].replace('conv_shortcut', 'nin_shortcut')}"
    if m := re.match(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", key):
        return VAE_PREFIX + f"encoder.down.{m[1]}.downsample.conv.{m[2]}"
    if m := re.match(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", key):
        return VAE_PREFIX + f"decoder.up.{n_up - 1 - int(m[1])}.block.{m[2]}.{m[3].replace('conv_shortcut', 'nin_shortcut')}"
    if m := re.match(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)", key):
        return VAE_PREFIX + f"decoder.up.{n_up - 1 - int(m[1])}.upsample.conv.{m[2]}"
    if m := re.match(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.*)", key):
        return VAE_PREFIX + f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3].replace('conv_shortcut', 'nin_shortcut')}"
    if m := re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.*)", key):
        rest = m[2]
        for ours, ldm in _VAE_ATTENTION_TO_LDM:
            if rest.startswith(ours):
                rest = ldm + rest[len(ours) :]
                break
        return VAE_PREFIX + f"{m[1]}.mid.attn_1.{rest}"
    raise KeyError(f"VAE key {key!r} has no LDM single-file equivalent")


_OPENCLIP_LAYER = [  # diffusers CLIP encoder layer -> OpenCLIP resblock (inverse of convert_open_clip_checkpoint)
    ("self_attn.out_proj.", "attn.out_proj."),
    ("layer_norm1.", "ln_1."),
    ("layer_norm2.", "ln_2."),
    ("mlp.fc1.", "mlp.c_fc."),
    ("mlp.fc2.", "mlp.c_proj."),
]
_OPENCLIP_TOP = {
    "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
    "text_model.embeddings.position_embedding.weight": "positional_embedding",
    "text_model.final_layer_norm.weight": "ln_final.weight",
    "text_model.final_layer_norm.bias": "ln_final.bias",
}


def open_clip_state_dict(text_encoder, prefix: str = SDXL_OPENCLIP_PREFIX) -> dict[str, torch.Tensor]:
    """A CLIPTextModelWithProjection's weights in OpenCLIP layout (SDXL's second text encoder)."""
    state = {}
    for key, value in text_encoder.state_dict().items():
        if key != "text_projection.weight" and not key.startswith("text_model."):
            key = "text_model." + key  # transformers 5 may drop the `text_model.` level
        state[key] = value
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        if key.endswith("position_ids"):
            continue
        if key == "text_projection.weight":
            out[prefix + "text_projection"] = value.T.contiguous()
        elif key in _OPENCLIP_TOP:
            out[prefix + _OPENCLIP_TOP[key]] = value
        elif m := re.match(r"text_model\.encoder\.layers\.(\d+)\.(.*)", key):
            layer, rest = int(m[1]), m[2]
            if pm := re.match(r"self_attn\.(q|k|v)_proj\.(weight|bias)", rest):
                qkv.setdefault((layer, pm[2]), {})[pm[1]] = value
                continue
            for ours, theirs in _OPENCLIP_LAYER:
                if rest.startswith(ours):
                    out[prefix + f"transformer.resblocks.{layer}.{theirs}{rest[len(ours) :]}"] = value
                    break
            else:
                raise KeyError(f"text encoder key {key!r} has no OpenCLIP equivalent")
        else:
            raise KeyError(f"text encoder key {key!r} has no OpenCLIP equivalent")
    for (layer, kind), parts in qkv.items():
        out[prefix + f"transformer.resblocks.{layer}.attn.in_proj_{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return out


def sdxl_text_encoder_2(path: str | os.PathLike, config_folder: str | os.PathLike, torch_dtype: torch.dtype | None = None):
    """SDXL's second text encoder (CLIPTextModelWithProjection) read from a single file's OpenCLIP keys,
    for `from_single_file(path, config=config_folder, text_encoder_2=...)`; None where diffusers reads it
    right itself: `config_folder` is not SDXL, or its two text encoders differ in width.

    diffusers picks the converter for `text_encoder_2` by width: a file whose first encoder
    (`conditioner.embedders.0.transformer.`) is as wide as the second gets the first encoder's weights
    converted into text_encoder_2, and `text_projection` (stored only under the OpenCLIP prefix) left
    unloaded on the meta device. Real SDXL (768 and 1280) never collides; tiny and custom models can."""
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint, load_single_file_checkpoint
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    folder = Path(config_folder)
    if not (folder / "text_encoder_2" / "config.json").is_file():
        return None  # not SDXL: one text encoder, nothing to confuse
    config = CLIPTextConfig.from_pretrained(folder / "text_encoder_2", local_files_only=True)
    first = CLIPTextConfig.from_pretrained(folder / "text_encoder", local_files_only=True)
    if first.hidden_size != config.hidden_size:
        return None
    checkpoint = load_single_file_checkpoint(str(path), local_files_only=True)
    if SDXL_OPENCLIP_PREFIX + "text_projection" not in checkpoint:
        raise ValueError(
            f"{Path(path).name} has no SDXL second text encoder with its projection ({SDXL_OPENCLIP_PREFIX}text_projection); "
            f"an SDXL single file stores it under {SDXL_OPENCLIP_PREFIX}"
        )
    model = CLIPTextModelWithProjection(config)
    # strict: every weight must come from the file (a missing one would stay randomly initialised)
    model.load_state_dict(convert_open_clip_checkpoint(model, checkpoint, prefix=SDXL_OPENCLIP_PREFIX), strict=True)
    model.eval()
    return model.to(dtype=torch_dtype) if torch_dtype is not None else model


FUSED_PROJECTION = re.compile(r"\.(to_qkv|to_kv|to_added_qkv)\.")


def is_fused_projection(key: str) -> bool:
    """Whether a state-dict key is one of diffusers' fused attention projections (`fuse_qkv_projections()`:
    `to_qkv`, `to_kv`, `to_added_qkv`): concatenated copies of `to_q` / `to_k` / `to_v`, which stay in the
    state dict beside them, also after `unfuse_qkv_projections()`. No checkpoint layout holds them: left in,
    they went into a single file under names no loader reads (the VAE's as `attn_1.to_qkto_v`), and `bake`
    failed on them."""
    return FUSED_PROJECTION.search(key) is not None


def to_ldm_state_dict(unet, vae, text_encoder, text_encoder_2=None) -> dict[str, torch.Tensor]:
    """The components' weights in one LDM-layout state dict (SDXL's layout when `text_encoder_2` is given);
    diffusers' fused attention projections are left out (`is_fused_projection`: `to_q`, `to_k`, `to_v` hold them)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in unet.state_dict().items():
        if not is_fused_projection(key):
            out[unet_key_to_ldm(key, unet.config)] = value
    for key, value in vae.state_dict().items():
        if is_fused_projection(key):
            continue
        ldm_key = vae_key_to_ldm(key, vae.config)
        if ".mid.attn_1." in ldm_key and ldm_key.endswith(".weight") and value.ndim == 2:
            value = value[:, :, None, None]  # LDM's attention projections are 1x1 convs
        out[ldm_key] = value
    for key, value in text_encoder.state_dict().items():
        # transformers 5 drops the `text_model.` level from CLIPTextModel keys; the LDM layout has it.
        key = key if key.startswith("text_model.") else "text_model." + key
        out[(SDXL_CLIP_PREFIX if text_encoder_2 is not None else CLIP_PREFIX) + key] = value
    if text_encoder_2 is not None:
        out.update(open_clip_state_dict(text_encoder_2))
    return out


def has_ip_adapter(unet) -> bool:
    """Whether diffusers' `load_ip_adapter` put an image projection on `unet`. Read from the module: the
    loader sets `config.encoder_hid_dim_type = "ip_image_proj"` as an attribute of the FrozenDict, so
    `config.get("encoder_hid_dim_type")` still reads None."""
    from diffusers.models.embeddings import MultiIPAdapterImageProjection

    return isinstance(getattr(unet, "encoder_hid_proj", None), MultiIPAdapterImageProjection)


def has_lora_layers(module) -> bool:
    """Whether PEFT's LoRA layers sit in `module`: read from the modules, not `peft_config`, which is empty
    once `delete_adapters` removed the last adapter while its layers (`to_q.base_layer`) stay."""
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:  # without peft no LoRA can be loaded
        return False
    return any(isinstance(m, BaseTunerLayer) for m in module.modules())


def loaded_lora(pipeline) -> str | None:
    """Why `pipeline`'s weights cannot be saved as they are, or None: LoRA layers (PEFT's, also after
    `fuse_lora`, which folds into them but keeps them) loaded on its UNet or text encoder(s). Their weights
    sit under names no model layout has (`to_q.base_layer.weight`, `to_q.lora_A.<name>.weight`): a diffusers
    loader would leave those layers at random weights."""
    names = [name for name in ("unet", "text_encoder", "text_encoder_2") if getattr(pipeline, name, None) is not None]
    with_lora = [name for name in names if has_lora_layers(getattr(pipeline, name))]
    if with_lora:
        return (
            f"the pipeline has LoRA layers loaded ({', '.join(with_lora)}), which no checkpoint holds: fold the LoRA in with "
            "pipe.fuse_lora() then pipe.unload_lora_weights() (the fused weights stay), or drop it with pipe.unload_lora_weights()"
        )
    return None


def loaded_plugins(pipeline) -> str | None:
    """Why `pipeline` cannot be written as a checkpoint as it is, or None: LoRA layers (`loaded_lora`) or an
    IP-Adapter loaded on it, whose weights sit under names no checkpoint layout has (`encoder_hid_proj.*`)."""
    problem = loaded_lora(pipeline)
    if problem:
        return problem
    if has_ip_adapter(pipeline.unet):
        return "the pipeline has an IP-Adapter loaded: pipe.unload_ip_adapter() first (the IP-Adapter ships as its own file)"
    return None


TMP_TAG = "export"  # a write in progress: `.<name>.export-<pid>.tmp` beside the file (as a folder export's siblings)


def export_single_file(pipeline, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> Path:
    """Write `pipeline` (unet, vae, text_encoder[, text_encoder_2]) as one LDM-layout .safetensors
    file, atomically (written to a hidden `.<name>.export-<pid>.tmp` and moved into place; what a killed
    export left there is removed); `metadata` (str -> str) goes into the safetensors header."""
    path = Path(path)
    if path.suffix.lower() != ".safetensors":  # NOISE.SAFETENSORS too, as jobs/export.py and the teacher loader read it
        raise ValueError(f"single-file export writes .safetensors, got {path.name!r}")
    from diffusers.utils.torch_utils import unwrap_module  # (models.style_unet.inner_unet: importing it here is a cycle)

    unet = unwrap_module(pipeline.unet)  # a compiled one's state dict keys are `_orig_mod.<layer>`, no LDM key
    if getattr(unet.config, "style_names", None) is not None:
        raise ValueError(
            "a merged StyleUNet has no single-file equivalent; bake one style first: dmm_ray.export.bake(pipe, style=...) or `python jobs/export.py`"
        )
    problem = loaded_plugins(pipeline)
    if problem:
        raise ValueError(f"cannot write {path.name}: {problem}")
    text_encoder_2 = getattr(pipeline, "text_encoder_2", None)
    state = {k: v.detach().contiguous().cpu() for k, v in to_ldm_state_dict(unet, pipeline.vae, pipeline.text_encoder, text_encoder_2).items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    # a hidden temp name of this process's own: two exports to one path at once both wrote `<path>.tmp`,
    # one renamed the other's (half-written) file into place and the other failed with FileNotFoundError
    tmp = path.with_name(f".{path.name}.{TMP_TAG}-{os.getpid()}.tmp")
    for stale in left_by_killed(path.parent, f".{glob.escape(path.name)}.{TMP_TAG}-*.tmp", rf"\.{re.escape(path.name)}\.{TMP_TAG}-(\d+)\.tmp"):
        stale.unlink(missing_ok=True)  # a full-size file a killed export left, which no later export's name matches
    try:
        save_file(state, str(tmp), metadata={"format": "pt", "exported_by": "dmm-ray", **(metadata or {})})
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # an ordinary file mode (the writer may create it private)
        os.replace(tmp, path)  # never leave a half-written file under the final name
    except BaseException:  # an error or Ctrl-C mid-write: its partial file goes too (an earlier one at `path` stays)
        tmp.unlink(missing_ok=True)
        raise
    return path
