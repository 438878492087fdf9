#!/usr/bin/env python
"""Is the data stream fast enough? Batches/s the noised-batch stream delivers vs. distillation steps/s.

Stream: synthetic latent shards -> build_latent_dataset (read_parquet + tokenise on Ray Data) ->
iter_noised_batches (per-sample t, eps, dropout; add_noise) exactly as a Train worker consumes it.
Step: one DMM distillation step (dmm_ray.distill.step.DistillStep, all three losses) at the same batch size: base and teacher
text-encoder forwards, teacher UNet forward with block features (no grad), StyleUNet student forward
with block features, score + feature + adversarial losses, backward, AdamW, discriminator step.

The stream must not be the bottleneck: ratio = stream batches/s / steps/s, target >= 3.

  PYTHONPATH=. python benchmarks/data_throughput.py --batch-size 20 --rows 2000
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # step_setup.py: a benchmark helper, not library code

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import torch


def parse_args(argv=None):
    from dmm_ray.console import positive_int

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # counts of at least 1: --shard-size 0 died in make_world (range() arg 3 must not be zero), --rows 0 found no
    # shard to stream, --batch-size 0 was pydantic's dump of DataConfig's stream.batch_size; all after the step was built
    p.add_argument("--batch-size", type=positive_int, default=20, help="samples per batch (paper: 20 per GPU)")
    p.add_argument("--rows", type=positive_int, default=2000, help="latent rows in the synthetic shards")
    p.add_argument("--shard-size", type=positive_int, default=500, help="latent rows per shard file")
    p.add_argument("--latent-hw", type=int, default=16, help="latent height/width (tiny VAE at 32 px: 16)")
    p.add_argument("--styles", type=int, default=8, help="number of styles in the student codebook")
    p.add_argument("--steps", type=positive_int, default=15, help="timed distillation steps (after 3 warm-up steps)")
    # 0 timed epochs measured no batch and printed "0.00 batches/s ... BELOW target" after the whole run
    p.add_argument("--epochs", type=positive_int, default=2, help="timed stream epochs (after one warm-up epoch)")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs for the local Ray instance (default: all)")
    p.add_argument("--torch-threads", type=int, default=None, help="torch intra-op threads for the step (default: torch's choice)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="device for the distillation step")
    return p.parse_args(argv)


def make_world(tmp: Path, args):
    """Tiny base folder (vae/tokenizer/scheduler) and synthetic latent shards."""
    import pyarrow.fs as pafs

    from dmm_ray.data import shards as sh
    from dmm_ray.tiny import tiny_sd_components

    comps = tiny_sd_components(seed=0)
    for name in ("vae", "tokenizer", "scheduler"):
        comps[name].save_pretrained(tmp / "base" / name)
    rng = np.random.default_rng(0)
    words = ["red", "green", "blue", "circle", "square", "triangle", "left", "right", "small", "large"]
    fs = pafs.LocalFileSystem()
    for k, start in enumerate(range(0, args.rows, args.shard_size)):
        n = min(args.shard_size, args.rows - start)
        lat = rng.standard_normal((n, 4, args.latent_hw, args.latent_hw)).astype(np.float32)
        caps = [" ".join(rng.choice(words, 6)) for _ in range(n)]
        sh.write_shard(fs, str(tmp / "shards"), k, sh.latent_table(lat, caps, [f"r{start + i}" for i in range(n)]))
    return comps


def stream_rate(cfg, epochs: int) -> tuple[float, int]:
    from ray.data import DataContext

    from dmm_ray.data.stream import build_latent_dataset, iter_noised_batches

    DataContext.get_current().execution_options.preserve_order = True  # as train_dataset_config() gives the Trainer
    ds = build_latent_dataset(cfg)
    for _ in iter_noised_batches(ds.iterator(), cfg, epoch=0):  # warm-up: worker processes, imports, tokenizer
        pass
    n, t0 = 0, time.perf_counter()
    for epoch in range(1, epochs + 1):
        for _ in iter_noised_batches(ds.iterator(), cfg, epoch=epoch):
            n += 1
    return n / (time.perf_counter() - t0), n


def step_rate(comps, args) -> float:
    """Steps/s of the real DistillStep (score + feature + adversarial losses, discriminator step)."""
    from step_setup import build_benchmark_step, timed_steps

    step, opt_s, opt_d, batches = build_benchmark_step(None, args.batch_size, num_styles=args.styles, device=args.device, latent_size=args.latent_hw)
    return timed_steps(step, opt_s, opt_d, batches, args.steps, warmup=3) / args.batch_size


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    import ray

    from dmm_ray.data.config import DataConfig
    from dmm_ray.ray_session import ensure_ray

    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        comps = make_world(tmp, args)
        cfg = DataConfig(
            base=str(tmp / "base"), shards=str(tmp / "shards"), stream=dict(batch_size=args.batch_size, shuffle_buffer=4 * args.batch_size)
        )
        ensure_ray(num_cpus=args.num_cpus, log_to_driver=False)
        try:
            sps = step_rate(comps, args)
            bps, n = stream_rate(cfg, args.epochs)
        finally:
            ray.shutdown()
    print(
        f"batch size {args.batch_size}, latents (4, {args.latent_hw}, {args.latent_hw}), {args.rows} rows, {args.styles} styles, step on {args.device} ({torch.get_num_threads()} torch threads), {os.cpu_count()} CPUs"
    )
    print(f"stream:       {bps:8.2f} batches/s  ({n} batches timed)")
    print(f"distillation: {sps:8.2f} steps/s   (DistillStep: student fwd+bwd, teacher fwd, 2 text encoders, discriminator)")
    ratio = bps / sps
    print(f"ratio stream/step = {ratio:.2f}  ({'OK' if ratio >= 3 else 'BELOW'} target >= 3)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
