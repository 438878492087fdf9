"""Shared set-up for the throughput benchmarks: one DistillStep with all three losses on
synthetic noised batches, built identically inside and outside Ray Train."""

from __future__ import annotations

import copy

import torch

from dmm_ray.distill.step import DistillStep, LossSettings
from dmm_ray.models.discriminator import MultiClassDiscriminator
from dmm_ray.models.style_unet import StyleUNet


def build_benchmark_step(base: str | None, batch_size: int, num_styles: int = 2, device: str = "cpu", seed: int = 0, latent_size: int | None = None):
    """(step, opt_student, opt_disc, batches): `batches(n)` yields n synthetic noised batches."""
    from diffusers import DDPMScheduler, StableDiffusionPipeline

    from dmm_ray.tiny import tiny_sd_components, training_noise_scheduler

    torch.manual_seed(seed)
    if base:
        pipe = StableDiffusionPipeline.from_pretrained(base, safety_checker=None, requires_safety_checker=False, local_files_only=True)
        unet, text, tok = pipe.unet, pipe.text_encoder, pipe.tokenizer
        scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        side = pipe.unet.config.sample_size or 8
    else:
        c = tiny_sd_components(seed)
        unet, text, tok, scheduler, side = c["unet"], c["text_encoder"], c["tokenizer"], training_noise_scheduler(), 8
    teacher = copy.deepcopy(unet).requires_grad_(False).eval().to(device)
    student = StyleUNet.from_unet(unet, [f"s{i}" for i in range(num_styles)]).to(device).train()
    disc = MultiClassDiscriminator(unet, num_styles).to(device)
    text = text.requires_grad_(False).eval().to(device)
    step = DistillStep(student, text, teacher, text, scheduler, LossSettings(), num_styles, disc)
    opt_s = torch.optim.AdamW(student.parameters(), lr=1e-5)
    opt_d = torch.optim.AdamW(disc.head.parameters(), lr=1e-5)
    ids = torch.tensor(tok(["a red circle on a blue background"] * batch_size, padding="max_length", max_length=tok.model_max_length).input_ids)
    channels = unet.config.in_channels
    side = latent_size or side

    def batches(n: int):
        g = torch.Generator().manual_seed(seed)
        for _ in range(n):
            x0 = torch.randn(batch_size, channels, side, side, generator=g)
            eps = torch.randn(x0.shape, generator=g)
            t = torch.randint(0, scheduler.config.num_train_timesteps, (batch_size,), generator=g)
            yield {"noisy_latents": scheduler.add_noise(x0, eps, t).to(device), "timesteps": t.to(device), "input_ids": ids.to(device)}

    return step, opt_s, opt_d, batches


def peak_memory_mb(device: str = "cpu") -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def timed_steps(step, opt_s, opt_d, batches, steps: int, warmup: int, style: int = 1) -> float:
    """Samples per second over `steps` timed steps after `warmup` untimed ones."""
    import time

    it = batches(warmup + steps)
    n = 0
    for k, batch in enumerate(it):
        if k == warmup:
            start = time.perf_counter()
        ids = torch.full((batch["noisy_latents"].shape[0],), style, dtype=torch.long, device=batch["noisy_latents"].device)
        step.run([batch], [ids], opt_s, opt_d)
        if k >= warmup:
            n += batch["noisy_latents"].shape[0]
    return n / (time.perf_counter() - start)
