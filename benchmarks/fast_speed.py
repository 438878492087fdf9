"""Images per second of the few-step model vs the merged model, one style at batch 8, in one process.

  python benchmarks/fast_speed.py --merged MERGED --fast FAST_MODEL [--style noir] [--batch 8] [--repeats 5]
  python benchmarks/fast_speed.py --arch sd15 --size 128 --repeats 3      # SD1.5-size random weights, no model folders
  python benchmarks/fast_speed.py --arch sd15 --size 512 --device cuda --dtype float16   # the same on a GPU at 512 px

Rows: the merged model at its default sampler (its sampler.json: the toy merge's 10 DPM-Solver++ steps at
CFG 5, the paper's 25 at CFG 7; or --merged-steps / --merged-guidance: two UNet passes per step), the
merged model at the few-step count with CFG (the naive shortcut), and the few-step model at its own
sampler (TCD or LCM scheduler, CFG off: one UNet pass per step). `--arch sd15` times the same three
rows on ONE randomly initialised model of the SD1.5 architecture (the 860M-parameter UNet with the
style codebook, CLIP ViT-L, the SD VAE; nothing is downloaded): a few-step model distilled from a
merged model has the merged model's architecture, so the work per image depends only on the
sampler, and random weights cost what trained ones do. `--arch tiny` is the same on tiny
components (the test suite runs it). Calls alternate
between the models and each row reports the median of --repeats timed calls after one warm-up, so
load from other processes hits every row alike (on a shared machine the ratio is the figure to trust).
Each row also splits its time per call into text encoder, UNet, VAE decode and the rest (the
scheduler, the pipeline's own code): the UNet column is what step distillation can shrink, the
VAE decode and the text encoder are paid once per image whatever the sampler.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dmm_ray.console import positive_int, refuse_models_being_replaced  # noqa: E402

ARCHS = ("sd15", "tiny")


def random_pipelines(arch: str, num_styles: int = 8):
    """(merged, few-step) DMMPipelines over ONE randomly initialised set of modules of `arch`: the
    merged one samples with DPM-Solver++ (no sampler.json: the paper's 25 steps at CFG 7), the
    few-step one with TCD (4 steps, CFG off), as a saved few-step model does."""
    from diffusers import TCDScheduler

    from dmm_ray.models.style_unet import StyleUNet
    from dmm_ray.pipeline import DMMPipeline
    from dmm_ray.random_weights import random_sd15_components
    from dmm_ray.tiny import SD_SCHEDULE, tiny_sd_components

    components = random_sd15_components() if arch == "sd15" else tiny_sd_components()
    names = [f"style_{i}" for i in range(num_styles)]
    components["unet"] = StyleUNet.from_unet(components["unet"], names).eval()
    merged = DMMPipeline(**components)  # DPM-Solver++ (both builders' scheduler)
    fast = DMMPipeline(**{**components, "scheduler": TCDScheduler(**SD_SCHEDULE)})
    return merged, fast


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--merged", help="the merged model's folder")
    parser.add_argument("--fast", help="the few-step model's folder (jobs/fast.py's output)")
    parser.add_argument(
        "--arch",
        choices=sorted(ARCHS),
        help="instead of --merged / --fast: one randomly initialised model of this architecture, sampled both ways",
    )
    parser.add_argument("--style", default=None, help="default: the first style")
    parser.add_argument("--batch", type=positive_int, default=8)
    parser.add_argument("--repeats", type=positive_int, default=5)
    parser.add_argument("--merged-steps", type=int, default=None, help="default: the merged model's own sampler (toy merge: 10; paper: 25)")
    parser.add_argument("--merged-guidance", type=float, default=None, help="default: the merged model's own (toy merge: 5; paper: 7)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu", help="cpu, or cuda (a GPU: e.g. --arch sd15 --size 512 --dtype float16)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"], help="both models' weights")
    parser.add_argument("--size", type=int, default=None, help="image side (default: the model's native size)")
    parser.add_argument(
        "--per-sample",
        action="store_true",
        help="also time both models with the per-sample style adapters (fuse_styles off: the path before a one-style call "
        "folded its style into the layers), and print what the fold gains",
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the UNet forward and the VAE decode of BOTH models (inductor; compiled in the warm-up call)",
    )
    args = parser.parse_args(argv)
    if (args.arch and (args.merged or args.fast)) or (not args.arch and not (args.merged and args.fast)):
        parser.error("give --merged MERGED and --fast FAST_MODEL, or --arch (random weights) alone")
    refuse_models_being_replaced(parser, args, "merged", "fast")  # refused while a running job's save may replace it

    import torch

    from dmm_ray.pipeline import load_dmm_pipeline

    torch.set_num_threads(args.threads)
    if args.arch == "sd15":
        torch.set_flush_denormal(True)  # random SD1.5 weights: keep subnormal floats from slowing the CPU
    if args.arch:
        merged, fast = random_pipelines(args.arch)
    else:
        merged, fast = load_dmm_pipeline(args.merged), load_dmm_pipeline(args.fast)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    for p in (merged, fast):
        p.set_progress_bar_config(disable=True)
        p.to(device, dtype)  # --arch: shared modules, moved by the first
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)  # GPU work is asynchronous: time it whole
    style = args.style or merged.styles[0]
    ms, fs = merged.sampler_defaults, fast.sampler_defaults
    m_steps = ms["num_inference_steps"] if args.merged_steps is None else args.merged_steps
    m_cfg = ms["guidance_scale"] if args.merged_guidance is None else args.merged_guidance
    rows = {
        f"merged, {m_steps} DPM-Solver++ steps, CFG {m_cfg:g}": (merged, m_steps, m_cfg),
        f"merged, {fs['num_inference_steps']} DPM-Solver++ steps, CFG {m_cfg:g}": (merged, fs["num_inference_steps"], m_cfg),
        f"few-step, {fs['num_inference_steps']} {fs['scheduler'].replace('Scheduler', '')} steps, CFG off": (
            fast,
            fs["num_inference_steps"],
            fs["guidance_scale"],
        ),
    }
    if args.per_sample:  # same work per image, the adapters run per sample instead of folded
        rows[f"merged, {m_steps} steps, CFG {m_cfg:g}, per-sample adapters"] = (merged, m_steps, m_cfg, False)
        rows[f"few-step, {fs['num_inference_steps']} steps, per-sample adapters"] = (fast, fs["num_inference_steps"], fs["guidance_scale"], False)
    kw = {"height": args.size, "width": args.size} if args.size else {}
    prompts = ["a red circle on a blue background"] * args.batch

    parts = {}  # part -> seconds in the current call

    def timed(module, method, part):
        inner = getattr(module, method)

        def wrapper(*a, **k):
            sync()
            t0 = time.perf_counter()
            try:
                return inner(*a, **k)
            finally:
                sync()
                parts[part] = parts.get(part, 0.0) + time.perf_counter() - t0

        setattr(module, method, wrapper)

    wrapped = set()  # --arch: both pipelines share one set of modules; wrap (and compile) each once
    for p in (merged, fast):
        for module, method, part in ((p.unet, "forward", "UNet"), (p.vae, "decode", "VAE decode"), (p.text_encoder, "forward", "text encoder")):
            if id(module) in wrapped:
                continue
            wrapped.add(id(module))
            if args.compile and part != "text encoder":  # the bound methods, so the timing wrappers still see every call
                setattr(module, method, torch.compile(getattr(module, method)))
            timed(module, method, part)

    def call(pipe, steps, guidance, fuse=True):
        parts.clear()
        pipe.fuse_styles = fuse
        t0 = time.perf_counter()
        pipe(
            prompts,
            style=style,
            num_inference_steps=steps,
            guidance_scale=guidance,
            negative_prompt=[""] * args.batch,
            generator=torch.Generator().manual_seed(0),
            output_type="np",
            **kw,
        )
        sync()
        total = time.perf_counter() - t0
        return total, {**parts, "rest": total - sum(parts.values())}

    times = {name: [] for name in rows}
    split = {name: [] for name in rows}
    for name, row in rows.items():
        call(*row)  # warm-up
    for _ in range(args.repeats):
        for name, row in rows.items():
            total, per_part = call(*row)
            times[name].append(total)
            split[name].append(per_part)
    base = base_unet = None
    size = args.size or merged.unet.config.sample_size * merged.vae_scale_factor
    print(
        (
            f"{args.arch} architecture, random weights ({sum(t.numel() for t in merged.unet.parameters()) / 1e6:.1f}M UNet parameters); "
            if args.arch
            else ""
        )
        + f"{size}x{size} px, style {style!r}, batch {args.batch}, {args.dtype} on {device}"
        + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else f", {args.threads} torch thread(s)")
        + f", median of {args.repeats}"
        + (", UNet and VAE decode under torch.compile" if args.compile else "")
    )
    for name, ts in times.items():
        ips = args.batch / statistics.median(ts)
        base = base or ips
        ms = {part: 1000 * statistics.median(d[part] for d in split[name]) for part in split[name][0]}
        base_unet = base_unet or ms["UNet"]
        print(
            f"  {name:<45} {ips:8.3g} images/s   x{ips / base:.2f}   per call, ms: "
            + ", ".join(f"{part} {v:.0f}" for part, v in ms.items())
            + f"   (UNet alone x{base_unet / ms['UNet']:.2f})"
        )
    if args.per_sample:
        names = list(times)
        med = [statistics.median(times[n]) for n in names]
        print(
            f"  one style folded into the layers vs per-sample adapters: merged x{med[3] / med[0]:.2f} faster, "
            f"few-step x{med[4] / med[2]:.2f}; few-step / merged: x{med[0] / med[2]:.2f} folded, x{med[3] / med[4]:.2f} per-sample"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
