"""Prompt conditioning of one model (student, teacher or discriminator backbone) for a training batch.

A conditioner maps a batch from the noised stream to the UNet's conditioning:
    encoder_hidden_states  (B, L, D)
    added_cond_kwargs      None (SD1.5) or {"text_embeds": (B, P), "time_ids": (B, 6)} (SDXL)
SD1.5 reads the stream's token ids (tokenised once by Ray Data). SDXL tokenises the batch's captions
with both of the model's own tokenizers and runs diffusers' own `encode_prompt` (penultimate hidden
states of both encoders, concatenated; pooled output of the second). The size ids are
(H, W, 0, 0, H, W) in pixels: latents are centre-trained crops at the target size.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn


class ClipConditioner:
    """SD1.5: one CLIP text encoder on the stream's `input_ids`."""

    def __init__(self, text_encoder: nn.Module):
        self.text_encoder = text_encoder

    @torch.no_grad()
    def __call__(self, batch: dict) -> tuple[torch.Tensor, dict | None]:
        return self.text_encoder(batch["input_ids"])[0], None  # (B, L, D)


class SDXLConditioner:
    """SDXL: two text encoders + pooled text embedding + size/crop time ids."""

    def __init__(self, text_encoder, text_encoder_2, tokenizer, tokenizer_2, vae_scale_factor: int):
        from diffusers import StableDiffusionXLPipeline

        # A text-only pipeline: diffusers' encode_prompt is the reference SDXL prompt encoding.
        self.pipe = StableDiffusionXLPipeline(
            vae=None,
            text_encoder=text_encoder,
            text_encoder_2=text_encoder_2,
            tokenizer=tokenizer,
            tokenizer_2=tokenizer_2,
            unet=None,
            scheduler=None,
        )
        self.text_encoder, self.text_encoder_2 = text_encoder, text_encoder_2
        self.vae_scale_factor = vae_scale_factor

    @torch.no_grad()
    def __call__(self, batch: dict) -> tuple[torch.Tensor, dict]:
        latents = batch["noisy_latents"]  # (B, C, h, w)
        device = latents.device
        embeds, _, pooled, _ = self.pipe.encode_prompt(list(batch["captions"]), device=device, do_classifier_free_guidance=False)
        h, w = (s * self.vae_scale_factor for s in latents.shape[-2:])
        time_ids = torch.tensor([h, w, 0, 0, h, w], dtype=embeds.dtype, device=device).repeat(latents.shape[0], 1)  # (B, 6)
        return embeds, {"text_embeds": pooled, "time_ids": time_ids}  # (B, L, D1+D2), (B, P), (B, 6)


def as_conditioner(model_or_conditioner):
    """Accept a plain CLIP text encoder (SD1.5) where a conditioner is expected."""
    return ClipConditioner(model_or_conditioner) if isinstance(model_or_conditioner, nn.Module) else model_or_conditioner


def vae_scale_factor(base_dir) -> int:
    """Pixels per latent cell of the base's VAE (8 for SD1.5/SDXL, 4 for the toy zoo)."""
    return 2 ** (len(json.loads((Path(base_dir) / "vae" / "config.json").read_text())["block_out_channels"]) - 1)


def conditioner_for(parts, scale_factor: int, device=None):
    """The conditioner of a loaded pipeline (or anything with text_encoder[_2] / tokenizer[_2]), frozen."""

    def frozen(encoder):
        encoder = encoder.requires_grad_(False).eval()
        return encoder if device is None else encoder.to(device)

    if getattr(parts, "text_encoder_2", None) is None:
        return ClipConditioner(frozen(parts.text_encoder))
    return SDXLConditioner(frozen(parts.text_encoder), frozen(parts.text_encoder_2), parts.tokenizer, parts.tokenizer_2, scale_factor)


def load_base_conditioner(base_dir, device=None):
    """The student's frozen conditioner: the base folder's own text encoder(s) and tokenizer(s)."""
    from dmm_ray.architectures import load_plain_pipeline

    text_only = load_plain_pipeline(base_dir, unet=None, vae=None)  # UNet and VAE weights are not read
    return conditioner_for(text_only, vae_scale_factor(base_dir), device)
