"""Sizes of the zoo's SD components, chosen for two CPU cores.

- Images 32 px; VAE with three encoder blocks (16, 32, 64) = two 2x downsamplings, so latents
  are (4, 8, 8) like SD's (4, 64, 64) at 1/8 scale. `dmm_ray.tiny.tiny_vae_config()`'s default
  two blocks downsample only 2x (32 px -> 16x16 latents, 4x the UNet cost), hence the third
  block; 16 channels at full resolution keep a VAE step at ~0.2-0.3 s for batch 64.
- UNet: `tiny_unet_config()` (blocks 32, 64; cross-attention dim 32; ~0.8M parameters).
- Tokenizer: the CLIP BPE tokenizer of `dmm_ray.tiny` over its default words plus every
  caption word, with `model_max_length=16`: the longest caption is 13 tokens with BOS/EOS, and
  attention over 16 instead of 77 text tokens makes a UNet step ~1.5x cheaper.
- Text encoder: tiny CLIP (2 layers, width 32), trained jointly with the base UNet (it costs
  little next to the UNet and lets the embedding separate the caption words the UNet must
  follow, instead of relying on random projections), then frozen and shared by the teachers,
  except those whose spec says they fine-tune their own (as some real SD fine-tunes do).
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from dmm_ray.tiny import DEFAULT_WORDS, SD_SCHEDULE, build_clip_tokenizer, tiny_text_encoder_config, tiny_unet_config, tiny_vae_config

from .scenes import CAPTION_WORDS

TOKENIZER_MAX_LENGTH = 16
VAE_BLOCKS = (16, 32, 64)
UNET_BLOCKS = (32, 64)
CROSS_ATTENTION_DIM = 32


def zoo_tokenizer() -> CLIPTokenizer:
    """Every caption word (and dmm_ray.tiny's default words) is one token."""
    return build_clip_tokenizer(list(DEFAULT_WORDS) + list(CAPTION_WORDS), model_max_length=TOKENIZER_MAX_LENGTH)


def zoo_components(seed: int, image_size: int = 32) -> dict:
    """Freshly initialised (seeded) components for `StableDiffusionPipeline(**c)`."""
    tokenizer = zoo_tokenizer()
    torch.manual_seed(seed)
    vae = AutoencoderKL(**tiny_vae_config(block_out_channels=VAE_BLOCKS, sample_size=image_size))
    latent_size = image_size // 2 ** (len(VAE_BLOCKS) - 1)
    torch.manual_seed(seed + 1)
    unet = UNet2DConditionModel(**tiny_unet_config(block_out_channels=UNET_BLOCKS, cross_attention_dim=CROSS_ATTENTION_DIM, sample_size=latent_size))
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(tiny_text_encoder_config(len(tokenizer), hidden_size=CROSS_ATTENTION_DIM))
    return dict(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=DPMSolverMultistepScheduler(**SD_SCHEDULE, algorithm_type="dpmsolver++"),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def tokenize(tokenizer: CLIPTokenizer, captions: list[str]) -> torch.Tensor:
    """(B, L) int64 ids padded to the tokenizer's max length, exactly as the data stream tokenizes."""
    from dmm_ray.data.stream import tokenize as tokenize_np

    return torch.from_numpy(tokenize_np(tokenizer, captions))
