"""Tiny, seeded plugins built in code (no downloads): LoRA / LCM-LoRA files, ControlNets, IP-Adapter folders.

They have the real formats, so diffusers' own loaders read them (`load_lora_weights`,
`ControlNetModel`, `load_ip_adapter`); their weights are random (a "trained" adapter is only
needed to change the image, which is what the plugin tests check).
"""

from __future__ import annotations

from pathlib import Path

import torch

ATTENTION_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


def _plain_unet_like(unet):
    from diffusers import UNet2DConditionModel

    from dmm_ray.models.style_unet import STYLE_CONFIG_KEYS

    config = {k: v for k, v in dict(unet.config).items() if not k.startswith("_") and k not in STYLE_CONFIG_KEYS}
    if config.get("encoder_hid_dim_type") == "ip_image_proj":
        config["encoder_hid_dim_type"], config["encoder_hid_dim"] = None, None
    return UNet2DConditionModel(**config)


def make_lora(
    unet,
    out: str | Path,
    rank: int = 4,
    seed: int = 0,
    scale: float = 0.3,
    targets=ATTENTION_TARGETS,
    weight_name: str = "pytorch_lora_weights.safetensors",
) -> Path:
    """Write a random UNet LoRA for `unet`'s architecture (SD1.5 or SDXL) in diffusers' LoRA format;
    returns the file. `load_lora_weights(path)` reads it on the base, a merged or a baked model."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    host = _plain_unet_like(unet)
    host.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=list(targets), init_lora_weights=True))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in host.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * scale)
    state = get_peft_model_state_dict(host)
    out = Path(out)
    cls = StableDiffusionXLPipeline if unet.config.get("addition_embed_type") == "text_time" else StableDiffusionPipeline
    cls.save_lora_weights(out, unet_lora_layers=state, weight_name=weight_name, safe_serialization=True)
    return out / weight_name


def make_controlnet(unet, seed: int = 0, scale: float = 0.05, conditioning_channels=None):
    """`ControlNetModel.from_unet(unet)` with its zero-initialised output convs made random (a "trained"
    ControlNet). For the tiny VAE (2x downsampling) the conditioning embedding downsamples 2x too."""
    from diffusers import ControlNetModel

    vae_factor_channels = conditioning_channels or (16, 32)
    net = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=tuple(vae_factor_channels))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in [*net.controlnet_down_blocks, net.controlnet_mid_block, net.controlnet_cond_embedding.conv_out]:
            for p in module.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * scale)
    return net.eval()


def control_image(size: int, seed: int = 0):
    """A PIL edge-map-like control image: a white square outline on black."""
    import numpy as np
    from PIL import Image

    img = np.zeros((size, size, 3), dtype=np.uint8)
    a, b = size // 4, 3 * size // 4
    img[a:b, a] = img[a:b, b - 1] = img[a, a:b] = img[b - 1, a:b] = 255
    return Image.fromarray(img)


def reference_image(size: int = 32, seed: int = 0):
    """A random PIL reference image for IP-Adapter."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


def make_ip_adapter(unet, out: str | Path, seed: int = 0, image_size: int = 32, embed_dim: int = 32, scale: float = 0.3) -> Path:
    """An IP-Adapter folder for `unet`'s architecture, the layout `load_ip_adapter` reads:
    `out/ip_adapter.safetensors` (image_proj.* + ip_adapter.<k>.to_{k,v}_ip.weight for every
    cross-attention layer) and `out/image_encoder/` (a tiny CLIPVisionModelWithProjection).
    Load it with `pipe.load_ip_adapter(out, subfolder="", weight_name="ip_adapter.safetensors")`."""
    from safetensors.torch import save_file
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    out = Path(out)
    torch.manual_seed(seed)
    encoder = CLIPVisionModelWithProjection(
        CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=image_size,
            patch_size=8,
            projection_dim=embed_dim,
        )
    ).eval()
    encoder.save_pretrained(out / "image_encoder")
    g = torch.Generator().manual_seed(seed + 1)
    cross = unet.config.cross_attention_dim
    state = {
        "image_proj.proj.weight": torch.randn(4 * cross, embed_dim, generator=g) * scale,
        "image_proj.proj.bias": torch.randn(4 * cross, generator=g) * scale,
        "image_proj.norm.weight": torch.ones(cross),
        "image_proj.norm.bias": torch.zeros(cross),
    }
    key_id = 1
    blocks = list(unet.config.block_out_channels)
    for name in unet.attn_processors:  # the order diffusers' _convert_ip_adapter_attn_to_diffusers walks
        if name.endswith("attn1.processor"):
            continue
        if name.startswith("mid_block"):
            hidden = blocks[-1]
        elif name.startswith("up_blocks"):
            hidden = list(reversed(blocks))[int(name[len("up_blocks.")])]
        else:
            hidden = blocks[int(name[len("down_blocks.")])]
        state[f"ip_adapter.{key_id}.to_k_ip.weight"] = torch.randn(hidden, cross, generator=g) * scale
        state[f"ip_adapter.{key_id}.to_v_ip.weight"] = torch.randn(hidden, cross, generator=g) * scale
        key_id += 2
    save_file(state, str(out / "ip_adapter.safetensors"))
    return out
