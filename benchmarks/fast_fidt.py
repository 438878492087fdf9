"""FIDt of any model folder at a given sampler, against the same teachers and reference as the merge's
evaluation (the teachers keep the config's evaluation sampler; cached): the few-step table's rows.

  python benchmarks/fast_fidt.py --model FAST/model --config jobs/configs/toy_fast.yaml --steps 2,4,8 --out outputs/fidt_fast
  python benchmarks/fast_fidt.py --model MERGED --config jobs/configs/toy_fast.yaml --steps 4 --guidance 5 --out outputs/fidt_dpm4   # fewer DPM steps, no distillation
  python benchmarks/fast_fidt.py --model FAST/model --config jobs/configs/toy_fast.yaml --steps 2,4,8 --scheduler LCMScheduler --out outputs/fidt_lcm  # another sampler
  python benchmarks/fast_fidt.py --model MERGED --config jobs/configs/toy_fast.yaml --steps 10 --guidance 5 --out outputs/fidt_ddim \
      --scheduler DDIMScheduler --scheduler-config '{"clip_sample": false, "timestep_spacing": "trailing"}'   # the LCM solver's own sampler
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dmm_ray.console import int_list, refuse_models_being_replaced  # noqa: E402


def with_scheduler(pipeline_factory, name: str, settings: dict | None = None):
    """The pipeline with its scheduler replaced by diffusers' `name`, built from the saved one's config
    plus `settings` (e.g. DDIMScheduler needs clip_sample False for latents: its default clamps x0 to [-1, 1])."""
    import diffusers

    pipe = pipeline_factory()
    pipe.scheduler = getattr(diffusers, name).from_config(pipe.scheduler.config, **(settings or {}))
    return pipe


def model_teachers(cfg, model: Path) -> list:
    """The teachers `model` is evaluated against: its own dmm_merge.json's (a few-step folder carries its
    merge's), else the record of the merged model its fast.json names, else --config's, said on stderr.
    Only the merged folder's was read: once that folder moved, the config's teachers were used without
    a word, though the few-step folder holds the record."""
    from dmm_ray.merged_model import recorded_teachers

    teachers = recorded_teachers(model)
    if teachers:
        return teachers
    merged = Path(json.loads((model / "fast.json").read_text())["distilled_from"]) if (model / "fast.json").is_file() else model
    teachers = recorded_teachers(merged) if merged != model else None
    if teachers:
        return teachers
    which = f"{model} does not" if merged == model else f"neither {model} nor the merged model it came from ({merged})"
    print(f"note: {which} record its teachers (dmm_merge.json); evaluating against --config's teachers", file=sys.stderr)
    return list(cfg.teachers)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--config", required=True, help="a merge config (its evaluation: section and teachers)")
    parser.add_argument("--steps", type=int_list, default="4", help="comma-separated step counts")
    parser.add_argument("--guidance", type=float, default=None, help="the model's CFG (default: its own)")
    parser.add_argument(
        "--scheduler", default=None, help="sample with this diffusers scheduler class (from the model's own config; default: the saved one)"
    )
    parser.add_argument(
        "--scheduler-config",
        type=json.loads,
        default=None,
        metavar="JSON",
        help='settings for --scheduler on top of the saved config, e.g. \'{"clip_sample": false, "timestep_spacing": "trailing"}\'',
    )
    parser.add_argument("--out", required=True)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args(argv)
    refuse_models_being_replaced(parser, args, "model")  # refused while a running job's save may replace it

    from dmm_ray.config import load_config
    from dmm_ray.fast.job import evaluate_fast
    from dmm_ray.pipeline import sampler_defaults

    cfg = load_config(args.config, args.overrides).with_absolute_paths()
    guidance = sampler_defaults(args.model)["guidance_scale"] if args.guidance is None else args.guidance
    cfg = cfg.model_copy(update={"fast": cfg.fast.model_copy(update={"guidance_scale": guidance})})
    model = Path(args.model).resolve()
    teachers = model_teachers(cfg, model)
    source = None
    if args.scheduler:
        import diffusers

        from dmm_ray.evaluation.sources import student_source

        if not (args.scheduler.endswith("Scheduler") and hasattr(diffusers, args.scheduler)):
            parser.error(
                f"--scheduler {args.scheduler!r} is not a diffusers scheduler class (e.g. TCDScheduler, LCMScheduler, DPMSolverMultistepScheduler)"
            )

        plain = student_source(model, cfg.evaluation.dtype)
        source = replace(plain, pipeline_factory=partial(with_scheduler, plain.pipeline_factory, args.scheduler, args.scheduler_config))
    results = evaluate_fast(cfg, model, teachers, args.steps, Path(args.out), source, args.scheduler)
    summary = {s: {"FIDt": r.fidt, "FIDt_ref": r.fidt_ref, "ratio": r.ratio, "diagonal": r.diagonal()} for s, r in results.items()}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "summary.json").write_text(json.dumps(summary, indent=1))
    for s, r in results.items():
        print(f"{s} steps, {args.scheduler or 'own scheduler'}, guidance {guidance:g}: FIDt {r.fidt:.2f}  ref {r.fidt_ref:.2f}  ratio {r.ratio:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
