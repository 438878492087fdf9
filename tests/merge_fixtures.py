"""A tiny merging world for tests: base, N perturbed teachers, random latent shards, a config."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

from dmm_ray.tiny import tiny_sd_components, tiny_sdxl_components

REPO = Path(__file__).resolve().parents[1]
CAPTIONS = ["a red circle", "a blue square", "a green triangle on a white background", "two yellow stars"]


def build_world(root: Path, num_teachers: int = 2, rows: int = 64, names=None, sdxl: bool = False) -> dict:
    """SD1.5-architecture by default; `sdxl=True`: two text encoders and text_time conditioning."""
    from pyarrow import fs as pafs

    from dmm_ray.data.shards import latent_table, write_shard

    pipeline_class, components = (StableDiffusionXLPipeline, tiny_sdxl_components) if sdxl else (StableDiffusionPipeline, tiny_sd_components)
    root.mkdir(parents=True, exist_ok=True)
    base = root / "base"
    if not base.exists():
        pipeline_class(**components(seed=0)).save_pretrained(base)
    names = names or [f"style{i}" for i in range(num_teachers)]
    teachers = []
    for i, name in enumerate(names):
        path = root / "teachers" / name
        if not path.exists():
            c = components(seed=0)
            g = torch.Generator().manual_seed(100 + i)
            with torch.no_grad():
                for p in c["unet"].parameters():
                    p.add_(0.02 * torch.randn(p.shape, generator=g))
            pipeline_class(**c).save_pretrained(path)
        teachers.append({"name": name, "source": str(path)})
    shards = root / "shards"
    if not shards.exists():
        rng = np.random.default_rng(0)
        latents = rng.standard_normal((rows, 4, 8, 8)).astype(np.float32)
        caps = [CAPTIONS[i % len(CAPTIONS)] for i in range(rows)]
        write_shard(pafs.LocalFileSystem(), str(shards.resolve()), 0, latent_table(latents, caps, [f"r{i}" for i in range(rows)]))
    return {"base": str(base), "teachers": teachers, "shards": str(shards.resolve())}


def tiny_merge_config(world: dict, out: Path, **sections) -> dict:
    config = {
        "name": "test-merge",
        "output_dir": str(out),
        "teachers": world["teachers"],
        "student": {"base": world["base"]},
        "data": {"base": world["base"], "shards": world["shards"], "stream": {"batch_size": 4}, "encode": {"resolution": 32}},
        "distill": {"steps": 2, "checkpoint_every": 1, "log_every": 1, "lr": 1e-4},
        "scaling": {"workers_per_teacher": 1, "cpus_per_worker": 0.5},
        "synthesis": {
            "images_per_teacher": 4,
            "num_inference_steps": 2,
            "batch_size": 4,
            "finetune_steps": 2,
            "finetune_batch_size": 2,
            "resolution": 32,
        },
        "evaluation": {"enabled": False},  # the tiny world has no prompts or feature net; tests that evaluate say so
    }
    for key, value in sections.items():
        config[key] = {**config.get(key, {}), **value} if isinstance(value, dict) else value
    return config


def noised_batch(b: int, seed: int = 0) -> dict:
    """A seeded training batch of 8x8 latents, as the data stream yields it (tiny text ids, one caption)."""
    from dmm_ray.tiny import training_noise_scheduler

    g = torch.Generator().manual_seed(seed)
    sched = training_noise_scheduler()
    x0 = torch.randn(b, 4, 8, 8, generator=g)
    eps = torch.randn(b, 4, 8, 8, generator=g)
    t = torch.randint(0, 1000, (b,), generator=g)
    return {
        "noisy_latents": sched.add_noise(x0, eps, t),
        "timesteps": t,
        "noise": eps,
        "latents": x0,
        "input_ids": torch.randint(0, 50, (b, 77), generator=g),
        "captions": ["a red circle"] * b,
    }


def fail_weight_writes_after(monkeypatch, first: int, error: BaseException) -> list[str]:
    """Every safetensors weights file after the first `first` raises `error` (a full disk, a Ctrl-C
    mid-save) once it has written part of the file: diffusers writes through safetensors.torch.save_file,
    transformers through its own import of it. Returns the paths tried."""
    import safetensors.torch
    import transformers.modeling_utils

    real, tried = safetensors.torch.save_file, []

    def save_file(tensors, filename, *args, **kwargs):
        tried.append(str(filename))
        if len(tried) > first:
            Path(filename).write_bytes(b"half")
            raise error
        return real(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "save_file", save_file)
    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", save_file)
    return tried


def kill_between_save_and_record(monkeypatch) -> None:
    """The merge process dies between its save's swap and its completion record (SystemExit): the crash window
    a re-run must find the saved model by its own record; `monkeypatch.undo()` or re-setting
    merge.record_complete ends it."""
    from dmm_ray import merge

    record_complete = merge.record_complete

    def killed(cfg, out, result, fast_pending=False, evaluate_pending=False, request=None):  # the process dies after the swap
        if evaluate_pending:
            raise SystemExit("killed between the save's swap and its record")
        record_complete(cfg, out, result, fast_pending=fast_pending, evaluate_pending=evaluate_pending, request=request)

    monkeypatch.setattr(merge, "record_complete", killed)


def hold_in_another_process(folder: Path, **kwargs) -> subprocess.Popen:
    """A real second process holding `folder`'s lock as a running job does (output_lock.hold; `kwargs`: its name,
    job, ...), until killed."""
    code = (
        "import sys, time\nfrom dmm_ray import output_lock\n"
        f"with output_lock.hold({str(folder)!r}, warn=lambda line: None, **{kwargs!r}):\n"
        "    print('held', flush=True)\n    time.sleep(300)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def save_another_model(merged: Path) -> None:
    """Replace the merged model `merged` as a merge's save does (merged_model.staged: written beside it, then two
    renames) with another one: the same parts, its UNet's weights moved (a reader's model replaced under it)."""
    import shutil

    from dmm_ray.merged_model import staged
    from dmm_ray.models.style_unet import StyleUNet

    with staged(merged) as tmp:
        shutil.copytree(merged, tmp, dirs_exist_ok=True)
        unet = StyleUNet.from_pretrained(merged / "unet")
        with torch.no_grad():
            unet.conv_in.weight.add_(0.05)
        unet.save_pretrained(tmp / "unet")
