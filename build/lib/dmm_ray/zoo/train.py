"""Training loops of the zoo: VAE, denoiser (base UNet + text encoder, full or LoRA teacher fine-tunes).

All loops draw every random number from one seeded `torch.Generator`, so a build is reproducible
for a given seed and thread count.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from diffusers.optimization import get_cosine_schedule_with_warmup
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm

from dmm_ray.tiny import training_noise_scheduler


def _progress(total: int, desc: str, enabled: bool):
    return tqdm(total=total, desc=desc, disable=not enabled, leave=False, dynamic_ncols=True)


def train_vae(
    vae: AutoencoderKL,
    images: torch.Tensor,
    steps: int,
    batch_size: int = 64,
    lr: float = 2e-3,
    kl_weight: float = 1e-6,
    object_weight: float = 4.0,
    seed: int = 0,
    progress: bool = True,
) -> list[float]:
    """Reconstruction (object-weighted MSE on [-1, 1] images) + small KL, as SD's VAE minus its
    perceptual/GAN terms.

    images: (N, 3, H, W) in [0, 1]. Returns the loss per step.
    """
    gen = torch.Generator().manual_seed(seed)
    vae.train()
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=1e-4)
    sched = get_cosine_schedule_with_warmup(opt, max(1, steps // 20), steps)
    losses = []
    with _progress(steps, "vae", progress) as bar:
        for _ in range(steps):
            idx = torch.randint(len(images), (batch_size,), generator=gen)
            x = images[idx] * 2 - 1  # (B, 3, H, W) in [-1, 1]
            post = vae.encode(x).latent_dist
            z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen)  # (B, 4, h, w)
            rec = vae.decode(z).sample
            # Objects cover ~5-20% of a zoo image: up-weight pixels that differ from the image's
            # corner (background) colour so the few latents spent on objects are learned early.
            corner = x[:, :, :1, :1]  # (B, 3, 1, 1)
            weight = 1 + object_weight * ((x - corner).abs().amax(1, keepdim=True) > 0.1).float()  # (B, 1, H, W)
            loss = (weight * (rec - x) ** 2).mean() / weight.mean() + kl_weight * post.kl().mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
            opt.step()
            sched.step()
            losses.append(loss.item())
            bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
            bar.update()
    vae.eval()
    return losses


@torch.no_grad()
def encode_latents(vae: AutoencoderKL, images: torch.Tensor, batch_size: int = 512, scaled: bool = True) -> torch.Tensor:
    """(N, 3, H, W) in [0, 1] -> (N, C, h, w) posterior means, times `scaling_factor` when `scaled`."""
    out = [vae.encode(images[i : i + batch_size] * 2 - 1).latent_dist.mode() for i in range(0, len(images), batch_size)]
    z = torch.cat(out)
    return z * vae.config.scaling_factor if scaled else z


@torch.no_grad()
def decode_latents(vae: AutoencoderKL, latents: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """(N, C, h, w) scaled latents -> (N, 3, H, W) in [0, 1]."""
    out = [vae.decode(latents[i : i + batch_size] / vae.config.scaling_factor).sample for i in range(0, len(latents), batch_size)]
    return (torch.cat(out) / 2 + 0.5).clamp(0, 1)


@torch.no_grad()
def calibrate_scaling_factor(vae: AutoencoderKL, images: torch.Tensor) -> float:
    """Set `vae.config.scaling_factor` = 1 / std of the latents (SD's 0.18215 was chosen the same way)."""
    z = encode_latents(vae, images, scaled=False)
    factor = float(1.0 / z.flatten().std())
    vae.register_to_config(scaling_factor=factor)
    return factor


@torch.no_grad()
def psnr(vae: AutoencoderKL, images: torch.Tensor) -> float:
    """Mean PSNR (dB, images in [0, 1]) of encode -> decode round trips."""
    rec = decode_latents(vae, encode_latents(vae, images))
    mse = ((rec - images) ** 2).flatten(1).mean(1).clamp(min=1e-10)  # (N,)
    return float((10 * torch.log10(1.0 / mse)).mean())


def train_denoiser(
    unet: torch.nn.Module,
    text_encoder: torch.nn.Module,
    latents: torch.Tensor,
    input_ids: torch.Tensor,
    empty_ids: torch.Tensor,
    steps: int,
    batch_size: int = 64,
    lr: float = 1e-3,
    train_text_encoder: bool = False,
    ema_decay: float | None = None,
    caption_dropout: float = 0.1,
    seed: int = 0,
    desc: str = "unet",
    progress: bool = True,
) -> list[float]:
    """Epsilon-prediction training on the SD noise schedule (what SD and its fine-tunes use).

    latents: (N, 4, h, w) scaled; input_ids: (N, L); empty_ids: (L,) ids of "" for the
    classifier-free-guidance caption dropout. Only parameters with `requires_grad` train, so a
    UNet with a peft LoRA adapter trains just the adapter. With `ema_decay`, the trained
    parameters end as their exponential moving average.
    """
    gen = torch.Generator().manual_seed(seed)
    noise_scheduler = training_noise_scheduler()
    text_encoder.requires_grad_(train_text_encoder)
    params = [p for p in unet.parameters() if p.requires_grad] + [p for p in text_encoder.parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"{desc}: nothing to train (no parameter requires grad)")
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)
    sched = get_cosine_schedule_with_warmup(opt, max(1, steps // 20), steps)
    ema = EMAModel(params, decay=ema_decay, use_ema_warmup=True, power=3 / 4) if ema_decay else None
    unet.train()
    text_encoder.train(train_text_encoder)
    losses = []
    with _progress(steps, desc, progress) as bar:
        for _ in range(steps):
            idx = torch.randint(len(latents), (batch_size,), generator=gen)
            x0 = latents[idx]  # (B, 4, h, w)
            noise = torch.randn(x0.shape, generator=gen)
            t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (batch_size,), generator=gen)
            x_t = noise_scheduler.add_noise(x0, noise, t)
            ids = input_ids[idx].clone()  # (B, L)
            dropped = torch.rand(batch_size, generator=gen) < caption_dropout
            ids[dropped] = empty_ids
            with torch.set_grad_enabled(train_text_encoder):
                cond = text_encoder(ids)[0]  # (B, L, D)
            pred = unet(x_t, t, cond).sample
            loss = F.mse_loss(pred, noise)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            if ema is not None:
                ema.step(params)
            losses.append(loss.item())
            bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
            bar.update()
    if ema is not None:
        ema.copy_to(params)
    unet.eval()
    text_encoder.eval()
    text_encoder.requires_grad_(False)
    if not all(math.isfinite(v) for v in losses[-10:]):
        raise RuntimeError(f"{desc}: training diverged (last losses {losses[-10:]})")
    return losses
