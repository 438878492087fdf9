"""Rollout fine-tuning of the few-step model (an extension: neither in the DMM paper nor in LCM).

LCM teaches the student one solver skip at a time, on noised data; at sampling it runs its own
few-step chain, whose states it never saw in training, and its small per-step errors add up. This
phase closes that gap the way backward / trajectory distillation does (Imagine Flash, Kohler et al.
2024; Luhman & Luhman 2021 for the one-step case): the student runs its OWN sampler, the saved
model's scheduler at `fast.rollout_sampler_steps` with CFG off, from an initial noise whose endpoint under
the merged model's own sampler (its sampler.json: the merge's synthesis setting) is known, and the
loss is the squared distance of the two endpoints, backpropagated through every step of the chain.

The pairs are the merged model's samples of every style (`fast.synthetic_source: merged`'s sets:
`synthesize` draws row i of every style from the generator seed `synthesis_seed(seed, i)`),
so the target of a noir row is the merged model's noir image from that very noise.
"""

from __future__ import annotations

import torch


def initial_noise(seeds: list[int], shape: tuple[int, ...]) -> torch.Tensor:
    """(B, *shape): the pipeline's starting latents for one CPU generator per row (diffusers'
    `randn_tensor`, as `prepare_latents` draws them from a list of generators), before `init_noise_sigma`."""
    from diffusers.utils.torch_utils import randn_tensor

    return randn_tensor((len(seeds), *shape), generator=[torch.Generator("cpu").manual_seed(int(s)) for s in seeds])


def sampler_steps_at(fast, step: int) -> int:
    """The sampler's step count at rollout step `step`: fast.rollout_step_counts taken in turn."""
    counts = fast.rollout_step_counts
    return counts[step % len(counts)]


def rollout(unet, scheduler, noise: torch.Tensor, embeds: torch.Tensor, style_ids: torch.Tensor, steps: int, added_cond_kwargs=None):
    """The few-step pipeline's denoising loop, CFG off, differentiable: the latents
    `pipe(..., latents=noise, num_inference_steps=steps, guidance_scale=1, output_type="latent")` returns
    (`tests/test_fast.py` checks the two agree). `scheduler`: a copy the caller owns (its step
    index moves): TCD (the only sampler fast.rollout_steps accepts), at gamma 0 (the pipeline's eta
    default), so the chain is deterministic."""
    scheduler.set_timesteps(steps, device=noise.device)
    x = noise * scheduler.init_noise_sigma  # (B, C, h, w)
    for t in scheduler.timesteps:
        out = unet(scheduler.scale_model_input(x, t), t, encoder_hidden_states=embeds, style_ids=style_ids, added_cond_kwargs=added_cond_kwargs)
        x = scheduler.step(out.sample, t, x, eta=0.0, return_dict=False)[0]
    return x


def pair_rows(rows: dict, seed: int) -> dict:
    """The merged model's synthesized rows (numpy columns, `source_id` "synth-<style>-<row>") as rollout
    pairs: {"noise" (P, C, h, w), "target" (P, C, h, w), "style" (P,), "input_ids" (P, L), "captions"}.
    The noise of row i is redrawn from its synthesis seed, so each target is that noise's endpoint."""
    import numpy as np

    from dmm_ray.distill.synthesis import synthesis_seed

    target = torch.from_numpy(np.array(rows["latents"], dtype=np.float32))  # (P, C, h, w); a copy: Ray Data's arrays are read-only
    index = [int(str(s).rsplit("-", 1)[1]) for s in rows["source_id"]]
    return {
        "noise": initial_noise([synthesis_seed(seed, i) for i in index], tuple(target.shape[1:])),
        "target": target,
        "style": torch.from_numpy(np.asarray(rows["style"], dtype=np.int64)),
        "input_ids": torch.from_numpy(np.ascontiguousarray(rows["input_ids"], dtype=np.int64)),
        "captions": [str(c) for c in rows["caption"]],
    }


def pair_batch(pairs: dict, size: int, generator: torch.Generator, device) -> dict:
    """`size` pairs drawn uniformly (every style pooled), as a conditioner batch plus noise / target / style."""
    idx = torch.randint(0, len(pairs["captions"]), (size,), generator=generator)
    batch = {k: pairs[k][idx].to(device) for k in ("noise", "target", "style", "input_ids")}
    batch["captions"] = [pairs["captions"][i] for i in idx.tolist()]
    batch["noisy_latents"] = batch["noise"]  # the conditioners that need the latent size (SDXL) read it here
    return batch
