"""Ray Train step throughput vs a plain single-process PyTorch loop doing identical work.

  python benchmarks/train_throughput.py [--base .zoo/base] [--batch 16] [--steps 20]
  python benchmarks/train_throughput.py --dry-run     # real SD1.5 architecture on meta tensors

Both sides run the same DistillStep (score + feature + adversarial losses, discriminator step)
on the same synthetic batches; the ratio isolates what Ray Train (worker process, DDP wrapper,
report) costs per worker. Target: >= 0.9.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCHMARKS.parent))
sys.path.insert(0, str(BENCHMARKS))  # step_setup.py: a benchmark helper, not library code


def _ray_worker(config: dict) -> None:
    import ray.train
    import ray.train.torch
    import torch
    from step_setup import build_benchmark_step, peak_memory_mb, timed_steps

    torch.set_num_threads(config["threads"])
    step, opt_s, opt_d, batches = build_benchmark_step(config["base"], config["batch"])
    step.student = ray.train.torch.prepare_model(step.student)  # the DDP wrapper the real loop uses
    rate = timed_steps(step, opt_s, opt_d, batches, config["steps"], config["warmup"])
    import tempfile

    # Ray Train V2 keeps the metrics of reports that carry a checkpoint: attach an empty one.
    ray.train.report({"samples_per_s": rate, "peak_mb": peak_memory_mb()}, checkpoint=ray.train.Checkpoint.from_directory(tempfile.mkdtemp()))


def run(base: str | None, batch: int, steps: int, warmup: int, threads: int) -> dict:
    import tempfile

    import ray
    import torch
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from step_setup import build_benchmark_step, peak_memory_mb, timed_steps

    torch.set_num_threads(threads)
    base = str(Path(base).resolve()) if base else None  # Ray workers run in another directory
    step, opt_s, opt_d, batches = build_benchmark_step(base, batch)
    plain = timed_steps(step, opt_s, opt_d, batches, steps, warmup)
    plain_mb = peak_memory_mb()
    del step, opt_s, opt_d
    import os

    # the Train worker imports step_setup from here too
    pythonpath = os.pathsep.join([str(BENCHMARKS), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    ray.init(
        address="local", num_cpus=max(2, threads), include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": {"PYTHONPATH": pythonpath}}
    )
    trainer = TorchTrainer(
        _ray_worker,
        train_loop_config=dict(base=base, batch=batch, steps=steps, warmup=warmup, threads=threads),
        scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": threads}),
        run_config=RunConfig(storage_path=tempfile.mkdtemp(prefix="dmm-bench-")),
    )
    metrics = trainer.fit().metrics
    ray.shutdown()
    return {
        "batch": batch,
        "plain_samples_per_s": plain,
        "ray_samples_per_s": metrics["samples_per_s"],
        "ratio": metrics["samples_per_s"] / plain,
        "plain_peak_mb": plain_mb,
        "ray_worker_peak_mb": metrics["peak_mb"],
    }


def dry_run(num_styles: int = 8, batch: int = 20) -> dict:
    """Parameters and static memory per worker for real SD1.5 (no weights: meta tensors)."""
    import torch
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from dmm_ray.models.discriminator import MultiClassDiscriminator
    from dmm_ray.models.style_unet import StyleUNet

    with torch.device("meta"):
        unet = UNet2DConditionModel(cross_attention_dim=768, attention_head_dim=8, sample_size=64)
        student = StyleUNet(**{k: v for k, v in unet.config.items() if not k.startswith("_")}, style_names=[f"s{i}" for i in range(num_styles)])
        disc = MultiClassDiscriminator(unet, num_styles)
        text = CLIPTextModel(
            CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12, projection_dim=768)
        )  # SD1.5: CLIP ViT-L/14 text tower

    def count(m, trainable=None):
        return sum(p.numel() for p in m.parameters() if trainable is None or p.requires_grad == trainable)

    p_student, p_teacher, p_text = count(student), count(unet), count(text)
    p_head, p_backbone = count(disc, True), count(disc, False)
    gb = 1024**3
    # student: fp32 weights + grads + AdamW (2 moments) = 16 B/param; frozen nets in bf16 = 2 B/param
    static = (16 * (p_student + p_head) + 2 * (p_teacher + p_backbone + 2 * p_text)) / gb
    return {
        "student_params": p_student,
        "extra_style_params": p_student - p_teacher,
        "teacher_params": p_teacher,
        "text_encoder_params": p_text,
        "disc_head_params": p_head,
        "disc_backbone_params_frozen": p_backbone,
        "static_memory_gb_per_worker": round(static, 2),
        "note": f"activations for batch {batch} at 64x64 latents come on top (bf16 autocast; measure with --base on a GPU)",
    }


def main(argv=None):
    from dmm_ray.console import positive_int

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default=None, help="diffusers base folder (default: tiny in-code components)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=positive_int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dry-run", action="store_true", help="print SD1.5 parameter counts and memory per worker, run nothing")
    args = parser.parse_args(argv)
    result = dry_run() if args.dry_run else run(args.base, args.batch, args.steps, args.warmup, args.threads)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
