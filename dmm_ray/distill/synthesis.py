"""Synthesis stage (paper 3.4, A.3): one Ray actor per teacher samples K images (fan-out) with the
paper's sampler; the latents become style-tagged shards for the short fine-tune of the student.
The few-step stage uses the same fan-out on the merged model's own styles (`MergedStyle`)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
import ray
import torch
from pydantic import BaseModel

from dmm_ray.devices import resolve_device


class MergedStyle(BaseModel):
    """One style of a merged model, sampled like a teacher: the few-step stage's own trajectories
    (`fast.synthetic_source: merged`). `synthesize` takes it in place of a TeacherSpec."""

    name: str  # the style
    model: str  # the merged model folder
    kind: Literal["merged_style"] = "merged_style"


@ray.remote
class TeacherSynthesizer:
    """Hosts one teacher pipeline at a time; generates latents (model space, i.e. VAE-scaled) for
    prompts. An actor may serve several teachers one after the other (`load`), so a small machine
    runs as many actors as it has CPUs instead of one process per teacher."""

    def __init__(self, spec: dict | None = None, use_gpu: bool = False, threads: int = 1):
        from dmm_ray._quiet import no_loading_bars

        no_loading_bars()  # one bar per loaded teacher and actor says nothing; the driver shows synthesis progress
        torch.set_num_threads(max(1, threads))
        self.device = str(resolve_device("auto" if use_gpu else "cpu"))
        if spec is not None:
            self.load(spec)

    def load(self, spec: dict) -> None:
        from dmm_ray.pipeline import DMMPipeline, load_dmm_pipeline
        from dmm_ray.teachers import TeacherSpec, load_teacher_pipeline

        if spec.get("kind") == "merged_style":  # one style of a merged model: loaded once for all its styles
            same_model = isinstance(getattr(self, "spec", None), MergedStyle) and self.spec.model == spec["model"]
            self.spec = MergedStyle.model_validate(spec)
            self.call_kwargs = {"style": self.spec.name}
            if same_model:
                return
            self.pipe = load_dmm_pipeline(self.spec.model).to(self.device)
        else:
            self.spec = TeacherSpec.model_validate(spec)
            self.pipe = load_teacher_pipeline(self.spec).to(self.device)
            self.call_kwargs = {}
        self.pipe.scheduler = DMMPipeline.paper_scheduler(self.pipe.scheduler)  # DPM-Solver++
        self.pipe.set_progress_bar_config(disable=True)

    def load_and_generate(self, spec: dict, *args) -> np.ndarray:
        self.load(spec)
        return self.generate(*args)

    def generate(
        self,
        prompts: list[str],
        seeds: list[int],
        num_inference_steps: int,
        guidance_scale: float,
        height: int,
        width: int,
        batch_size: int,
        negative_prompt: str | None = None,
    ) -> np.ndarray:
        from dmm_ray.defaults import PAPER_NEGATIVE_PROMPT

        negative = PAPER_NEGATIVE_PROMPT if negative_prompt is None else negative_prompt
        out = []
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start : start + batch_size]
            generators = [torch.Generator(self.device).manual_seed(s) for s in seeds[start : start + batch_size]]
            latents = self.pipe(
                chunk,
                negative_prompt=[negative] * len(chunk),
                num_inference_steps=num_inference_steps,
                guidance_scale=guidance_scale,
                height=height,
                width=width,
                generator=generators,
                output_type="latent",
                **self.call_kwargs,
            ).images  # (b, C, h, w): x0 in the space the UNet is trained in
            out.append(latents.float().cpu().numpy())
        return np.concatenate(out)


def synthesis_seed(seed: int, row: int) -> int:
    """The generator seed of row `row` of every style's synthesized set (the few-step stage's rollout
    pairs redraw each row's starting noise from it)."""
    return seed * 100003 + row


def synthesize(
    teachers: list,
    style_offset: int,
    prompts: list[str],
    out_dir: str | Path,
    images_per_teacher: int,
    num_inference_steps: int,
    guidance_scale: float,
    resolution: int,
    batch_size: int,
    seed: int = 0,
    use_gpu: bool = False,
    negative_prompt: str | None = None,
    actors: int | None = None,
    cpus_per_actor: float = 1.0,
) -> dict[int, str]:
    """Fan out to `actors` Ray actors (default: one per teacher; teachers are dealt round-robin, each
    actor serves its teachers one after the other); write shards `out_dir/style_<i>`; returns
    {style index: shard dir}. Finished styles (complete shards) are not generated again."""
    from dmm_ray.data import fs as fsu
    from dmm_ray.data.shards import is_shard_complete, latent_table, write_shard

    if not prompts:
        raise ValueError("synthesis needs at least one prompt")
    fs, _ = fsu.resolve(str(out_dir))  # a local folder or a URI (written through pyarrow)
    chosen = [prompts[i % len(prompts)] for i in range(images_per_teacher)]
    seeds = [synthesis_seed(seed, i) for i in range(images_per_teacher)]
    todo, result = [], {}
    for k, spec in enumerate(teachers):
        style = style_offset + k
        root = str(fsu.location_join(out_dir, f"style_{style}")) if fsu.is_uri(out_dir) else str((Path(out_dir) / f"style_{style}").resolve())
        result[style] = root  # as given: the stream resolves it again
        root = fsu.resolve(root)[1]  # the path inside `fs`
        if not is_shard_complete(fs, root, 0):
            todo.append((style, root, spec))
    if not todo:
        return result
    n_actors = min(actors or len(todo), len(todo))
    pool = [
        TeacherSynthesizer.options(num_gpus=1 if use_gpu else 0, num_cpus=cpus_per_actor).remote(None, use_gpu, round(cpus_per_actor))
        for _ in range(n_actors)
    ]
    args = (chosen, seeds, num_inference_steps, guidance_scale, resolution, resolution, batch_size, negative_prompt)
    # An actor runs its calls in order: teacher k goes to actor k mod A, so every actor stays busy.
    pending = [
        (style, root, spec, pool[k % n_actors].load_and_generate.remote(spec.model_dump(), *args)) for k, (style, root, spec) in enumerate(todo)
    ]
    try:
        for style, root, spec, ref in pending:
            latents = ray.get(ref)
            ids = [f"synth-{spec.name}-{i}" for i in range(len(chosen))]
            write_shard(fs, root, 0, latent_table(latents, chosen, ids, styles=[style] * len(chosen)))
            source = f"the merged model's style {spec.name!r}" if isinstance(spec, MergedStyle) else f"teacher {spec.name!r}"
            print(f"synthesized {len(chosen)} samples from {source} -> {root}", flush=True)
    finally:  # a teacher that fails to load must not leave the pool holding its CPUs / GPUs in the driver's Ray
        for actor in pool:
            ray.kill(actor)
    return result


def synthesis_prompts(cfg) -> list[str]:
    """The prompts synthesis draws from: synthesis.prompts, else the captions of the first latent shard."""
    from dmm_ray.data.readers import read_prompts

    if cfg.synthesis.prompts:
        return read_prompts(cfg.synthesis.prompts)
    import pyarrow.parquet as pq

    from dmm_ray.data.shards import complete_shards

    fs, paths = complete_shards(cfg.data.shards)
    with fs.open_input_file(paths[0]) as f:
        captions = [c for c in pq.read_table(f, columns=["caption"])["caption"].to_pylist() if c]
    return captions


def synthesize_for(cfg, specs: list, style_offset: int, out_dir, images_per_style: int | None = None) -> dict[int, str]:
    """`synthesize` with a MergeConfig's settings: synthesis.* (sampler, prompts, batch, actors), the data
    resolution, the seed, the device. `specs`: TeacherSpecs (the merge) or MergedStyles (the few-step stage)."""
    s = cfg.synthesis
    return synthesize(
        specs,
        style_offset,
        synthesis_prompts(cfg),
        out_dir,
        images_per_style or s.images_per_teacher,
        s.num_inference_steps,
        s.guidance_scale,
        cfg.synthesis_resolution,
        s.batch_size,
        cfg.seed,
        cfg.scaling.use_gpu,
        s.negative_prompt,
        actors=s.actors,
        cpus_per_actor=s.cpus_per_actor,
    )
