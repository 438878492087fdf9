"""Images per second of the few-step model vs the merged model, one style at batch 8, in one process.

  python benchmarks/fast_speed.py --merged MERGED --fast FAST_MODEL [--style noir] [--batch 8] [--repeats 5]

Rows: the merged model at its default sampler (--merged-steps DPM-Solver++ steps, CFG --merged-guidance:
two UNet passes per step), the merged model at the few-step count with CFG (the naive shortcut), and the
few-step model at its own sampler (TCD or LCM scheduler, CFG off: one UNet pass per step). Calls alternate
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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--merged", required=True)
    parser.add_argument("--fast", required=True)
    parser.add_argument("--style", default=None, help="default: the first style")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--merged-steps", type=int, default=10, help="the merged model's default sampler (toy: 10)")
    parser.add_argument("--merged-guidance", type=float, default=5.0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--size", type=int, default=None, help="image side (default: the model's native size)")
    parser.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the UNet forward and the VAE decode of BOTH models (inductor; compiled in the warm-up call)",
    )
    args = parser.parse_args(argv)

    import torch

    from dmm_ray.pipeline import load_dmm_pipeline

    torch.set_num_threads(args.threads)
    merged, fast = load_dmm_pipeline(args.merged), load_dmm_pipeline(args.fast)
    for p in (merged, fast):
        p.set_progress_bar_config(disable=True)
    style = args.style or merged.styles[0]
    fs = fast.sampler_defaults
    rows = {
        f"merged, {args.merged_steps} DPM-Solver++ steps, CFG {args.merged_guidance:g}": (merged, args.merged_steps, args.merged_guidance),
        f"merged, {fs['num_inference_steps']} DPM-Solver++ steps, CFG {args.merged_guidance:g}": (
            merged,
            fs["num_inference_steps"],
            args.merged_guidance,
        ),
        f"few-step, {fs['num_inference_steps']} {fs['scheduler'].replace('Scheduler', '')} steps, CFG off": (
            fast,
            fs["num_inference_steps"],
            fs["guidance_scale"],
        ),
    }
    kw = {"height": args.size, "width": args.size} if args.size else {}
    prompts = ["a red circle on a blue background"] * args.batch

    parts = {}  # (pipe id, part) -> seconds in the current call

    def timed(pipe, module, method, part):
        inner = getattr(module, method)

        def wrapper(*a, **k):
            t0 = time.perf_counter()
            try:
                return inner(*a, **k)
            finally:
                parts[part] = parts.get(part, 0.0) + time.perf_counter() - t0

        setattr(module, method, wrapper)

    for p in (merged, fast):
        if args.compile:  # the bound methods, so the timing wrappers below still see every call
            p.unet.forward = torch.compile(p.unet.forward)
            p.vae.decode = torch.compile(p.vae.decode)
        timed(p, p.text_encoder, "forward", "text encoder")
        timed(p, p.unet, "forward", "UNet")
        timed(p, p.vae, "decode", "VAE decode")

    def call(pipe, steps, guidance):
        parts.clear()
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
        total = time.perf_counter() - t0
        return total, {**parts, "rest": total - sum(parts.values())}

    times = {name: [] for name in rows}
    split = {name: [] for name in rows}
    for name, (pipe, steps, guidance) in rows.items():
        call(pipe, steps, guidance)  # warm-up
    for _ in range(args.repeats):
        for name, (pipe, steps, guidance) in rows.items():
            total, per_part = call(pipe, steps, guidance)
            times[name].append(total)
            split[name].append(per_part)
    base = base_unet = None
    print(
        f"style {style!r}, batch {args.batch}, {args.threads} torch thread(s), median of {args.repeats}"
        + (", UNet and VAE decode under torch.compile" if args.compile else "")
    )
    for name, ts in times.items():
        ips = args.batch / statistics.median(ts)
        base = base or ips
        ms = {part: 1000 * statistics.median(d[part] for d in split[name]) for part in split[name][0]}
        base_unet = base_unet or ms["UNet"]
        print(
            f"  {name:<45} {ips:8.1f} images/s   x{ips / base:.2f}   per call, ms: "
            + ", ".join(f"{part} {v:.0f}" for part, v in ms.items())
            + f"   (UNet alone x{base_unet / ms['UNet']:.2f})"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
