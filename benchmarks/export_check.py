#!/usr/bin/env python
"""Is a baked export the merged model? Bake every style of a merged model into a single file, load it
back with diffusers' `from_single_file`, and compare its images to the merged model's with that style.

For each style: bake time (CPU), the single file's size, and, on the same prompts and seeds, the FID
between the baked model's and the merged model's images (feature net of the toy zoo, the repo's
`dmm_ray.evaluation.fid`), the largest pixel difference and the share of bit-identical 8-bit images.
For scale, the FID between two *different* seed sets of the merged model itself (the finite-sample
floor that any two independent sets of this size show) is printed beside it.

    python benchmarks/export_check.py --model /work/exps/curve/toy/steps_360/merged --zoo .zoo
    python benchmarks/export_check.py --model $DMM_HOME/outputs/dmm-toy/merged --zoo $DMM_HOME/zoo/full --out outputs/export_check.json

Settings default to the toy preset's evaluation (32 held-out prompts x 4 images, 10 DPM-Solver++ steps,
guidance 5, empty negative prompt).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main(argv=None) -> int:
    from dmm_ray.console import non_negative_int, positive_int, refuse_models_being_replaced

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, type=Path, help="merged model folder")
    p.add_argument("--zoo", required=True, type=Path, help="toy zoo folder (zoo.yaml: feature net, eval prompts, teachers)")
    p.add_argument("--prompts", type=positive_int, default=32, help="held-out prompts (first N of the zoo's eval_prompts)")
    p.add_argument("--images-per-prompt", type=positive_int, default=4, help="FID needs 2+ images per set: prompts x images-per-prompt >= 2")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed-a", type=non_negative_int, default=0, help="first seed set (EvalConfig.seed_a: 0 or more)")
    p.add_argument("--seed-b", type=non_negative_int, default=1_000_000, help="second seed set, for the merged-vs-merged floor (0 or more)")
    p.add_argument("--styles", help="comma-separated subset (default: all)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (tiny models: 1 is fastest on a busy machine)")
    p.add_argument("--out", type=Path, help="write the JSON report here")
    args = p.parse_args(argv)
    refuse_models_being_replaced(p, args, "model")  # refused while a running job's save may replace it

    from dmm_ray.evaluation.config import EvalConfig
    from dmm_ray.zoo.manifest import load_zoo_manifest

    zoo = load_zoo_manifest(args.zoo)  # its paths by the jobs' rule (`~`, `$DMM_HOME`), not joined to --zoo as written
    prompts = [line.strip() for line in zoo.eval_prompts.read_text().splitlines() if line.strip()][: args.prompts]
    # The evaluation's rule (a covariance needs 2+ images per set; seed sets A and B must not overlap), said
    # here: 1 prompt x 1 image died in fid.py only after the bake and all three sets were sampled
    try:
        EvalConfig(images_per_prompt=args.images_per_prompt, seed_a=args.seed_a, seed_b=args.seed_b).check_seed_sets(len(prompts))
    except ValueError as error:
        p.error(f"{error} (--prompts {args.prompts}: {len(prompts)} of the zoo's eval_prompts, --images-per-prompt {args.images_per_prompt})")

    import numpy as np
    import torch
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    from dmm_ray.evaluation.config import SamplerConfig
    from dmm_ray.evaluation.extractors import ZooFeatureExtractor
    from dmm_ray.evaluation.fid import fid_from_features
    from dmm_ray.evaluation.generation import generate_images
    from dmm_ray.export import bake, export_pipeline, provenance, write_config_folder
    from dmm_ray.pipeline import load_dmm_pipeline

    torch.set_num_threads(args.threads)
    extractor = ZooFeatureExtractor(zoo.feature_net, device="cpu")
    sampler = SamplerConfig(num_inference_steps=args.steps, guidance_scale=args.guidance, negative_prompt="")
    k = args.images_per_prompt
    pairs = [(pr, i * k + j) for i, pr in enumerate(prompts) for j in range(k)]

    def images(pipe, seed0, **call):
        out = []
        for s in range(0, len(pairs), args.batch_size):
            chunk = pairs[s : s + args.batch_size]
            out.append(generate_images(pipe, [c[0] for c in chunk], [seed0 + c[1] for c in chunk], sampler, call))
        return torch.cat(out)

    merged = load_dmm_pipeline(args.model)
    merged.set_progress_bar_config(disable=True)
    styles = args.styles.split(",") if args.styles else merged.styles
    xl = getattr(merged, "text_encoder_2", None) is not None
    cls = StableDiffusionXLPipeline if xl else StableDiffusionPipeline
    teacher_files = sorted((args.zoo / "teachers").glob("*.safetensors"))
    report = {
        "model": str(args.model),
        "zoo": str(args.zoo),
        "images_per_set": len(pairs),
        "steps": args.steps,
        "guidance": args.guidance,
        "styles": {},
    }
    # the baked files (a whole model each: GBs per style at SD1.5 size) were left in /tmp after every run
    workdir = tempfile.TemporaryDirectory(prefix="dmm-export-check-")
    tmp = Path(workdir.name)
    print(f"{len(styles)} styles x {len(pairs)} images; teacher single file: {teacher_files[0].name if teacher_files else '(none)'}", flush=True)
    header = f"{'style':8s} {'bake s':>7s} {'write s':>7s} {'MiB':>6s} {'FID baked/merged':>17s} {'max |px|':>8s} {'identical':>9s} {'FID floor':>9s}"
    print(header, flush=True)
    for name in styles:
        t0 = time.perf_counter()
        plain = bake(merged, style=name)
        bake_s = time.perf_counter() - t0
        t1 = time.perf_counter()
        path = export_pipeline(plain, tmp / f"{name}.safetensors", metadata=provenance(merged, str(args.model), style=name, model_dir=args.model))
        write_s = time.perf_counter() - t1
        config = write_config_folder(plain, tmp / f"{name}.config")
        extra = {} if xl else {"safety_checker": None, "requires_safety_checker": False}
        loaded = cls.from_single_file(str(path), config=str(config), local_files_only=True, **extra)
        loaded.scheduler = merged.scheduler
        loaded.set_progress_bar_config(disable=True)

        a = images(merged, args.seed_a, style=name)
        b = images(loaded, args.seed_a)
        c = images(merged, args.seed_b, style=name)
        fa, fb, fc = (extractor(x).double().numpy() for x in (a, b, c))
        ua, ub = ((x.clamp(0, 1) * 255).round().to(torch.uint8) for x in (a, b))
        row = {
            "bake_s": bake_s,
            "write_s": write_s,
            "file_bytes": path.stat().st_size,
            "fid_baked_vs_merged": fid_from_features(fb, fa),
            "max_abs_pixel_diff": float((a - b).abs().max()),
            "identical_uint8_images": int((ua == ub).flatten(1).all(dim=1).sum()),
            "fid_merged_seed_a_vs_seed_b": fid_from_features(fa, fc),
        }
        report["styles"][name] = row
        print(
            f"{name:8s} {bake_s:7.3f} {write_s:7.2f} {row['file_bytes'] / 2**20:6.2f} {row['fid_baked_vs_merged']:17.3g} "
            f"{row['max_abs_pixel_diff']:8.2e} {row['identical_uint8_images']:4d}/{len(pairs):<4d} {row['fid_merged_seed_a_vs_seed_b']:9.2f}",
            flush=True,
        )
        del loaded, plain
        path.unlink()  # loaded and measured: one style's file on disk at a time
    workdir.cleanup()
    if teacher_files:
        report["teacher_single_file"] = {"file": str(teacher_files[0]), "bytes": teacher_files[0].stat().st_size}
    sizes = [r["file_bytes"] for r in report["styles"].values()]
    bakes = [r["bake_s"] for r in report["styles"].values()]
    report["summary"] = {
        "bake_s_median": float(np.median(bakes)),
        "bake_s_max": float(max(bakes)),
        "baked_file_bytes": sizes[0],
        "teacher_file_bytes": report.get("teacher_single_file", {}).get("bytes"),
        "fid_baked_vs_merged_max": max(r["fid_baked_vs_merged"] for r in report["styles"].values()),
        "identical_images": sum(r["identical_uint8_images"] for r in report["styles"].values()),
        "images": len(pairs) * len(styles),
    }
    print(json.dumps(report["summary"], indent=1))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
