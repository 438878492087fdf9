"""Synthesis stage (paper 3.4, A.3): one Ray actor per teacher samples K images (fan-out) with the
paper's sampler; the latents become style-tagged shards for the short fine-tune of the student."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import ray
import torch


@ray.remote
class TeacherSynthesizer:
    """Hosts one teacher pipeline; generates latents (model space, i.e. VAE-scaled) for prompts."""

    def __init__(self, spec: dict, use_gpu: bool = False):
        from dmm_ray.pipeline import DMMPipeline
        from dmm_ray.teachers import TeacherSpec, load_teacher_pipeline

        torch.set_num_threads(1)
        self.spec = TeacherSpec.model_validate(spec)
        self.device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
        self.pipe = load_teacher_pipeline(self.spec).to(self.device)
        self.pipe.scheduler = DMMPipeline.paper_scheduler(self.pipe.scheduler)  # DPM-Solver++
        self.pipe.set_progress_bar_config(disable=True)

    def generate(self, prompts: list[str], seeds: list[int], num_inference_steps: int, guidance_scale: float,
                 height: int, width: int, batch_size: int, negative_prompt: str | None = None) -> np.ndarray:
        from dmm_ray.pipeline import PAPER_NEGATIVE_PROMPT

        negative = PAPER_NEGATIVE_PROMPT if negative_prompt is None else negative_prompt
        out = []
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start : start + batch_size]
            generators = [torch.Generator(self.device).manual_seed(s) for s in seeds[start : start + batch_size]]
            latents = self.pipe(
                chunk, negative_prompt=[negative] * len(chunk), num_inference_steps=num_inference_steps,
                guidance_scale=guidance_scale, height=height, width=width, generator=generators, output_type="latent",
            ).images  # (b, C, h, w): x0 in the space the UNet is trained in
            out.append(latents.float().cpu().numpy())
        return np.concatenate(out)


def synthesize(teachers: list, style_offset: int, prompts: list[str], out_dir: str | Path, images_per_teacher: int,
               num_inference_steps: int, guidance_scale: float, resolution: int, batch_size: int, seed: int = 0,
               use_gpu: bool = False, negative_prompt: str | None = None) -> dict[int, str]:
    """Fan out to one actor per teacher; write shards `out_dir/style_<i>`; returns {style index: shard dir}.
    Finished styles (complete shards) are not generated again."""
    from dmm_ray.data import fs as fsu
    from dmm_ray.data.shards import is_shard_complete, latent_table, write_shard

    if not prompts:
        raise ValueError("synthesis needs at least one prompt")
    out_dir = Path(out_dir)
    fs, _ = fsu.resolve(str(out_dir))
    chosen = [prompts[i % len(prompts)] for i in range(images_per_teacher)]
    seeds = [seed * 100003 + i for i in range(images_per_teacher)]
    pending, result = {}, {}
    for k, spec in enumerate(teachers):
        style = style_offset + k
        root = str((out_dir / f"style_{style}").resolve())
        result[style] = root
        if is_shard_complete(fs, root, 0):
            continue
        actor = TeacherSynthesizer.options(num_gpus=1 if use_gpu else 0, num_cpus=1).remote(spec.model_dump(), use_gpu)
        pending[style] = (actor.generate.remote(chosen, seeds, num_inference_steps, guidance_scale, resolution, resolution, batch_size, negative_prompt), root, spec.name)
    for style, (ref, root, name) in pending.items():
        latents = ray.get(ref)
        ids = [f"synth-{name}-{i}" for i in range(len(chosen))]
        write_shard(fs, root, 0, latent_table(latents, chosen, ids, styles=[style] * len(chosen)))
        print(f"synthesized {len(chosen)} samples from teacher {name!r} -> {root}", flush=True)
    return result
