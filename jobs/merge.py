"""Merge N teacher checkpoints into one style-promptable model (DMM) on Ray.

  python jobs/merge.py                                   # the embedded default: jobs/configs/toy.yaml
  python jobs/merge.py --config jobs/configs/toy.yaml --set distill.steps=10
  python jobs/merge.py --config jobs/configs/toy.yaml --dry-run --deep   # check config + teachers (every tensor finite)
  python jobs/merge.py --config jobs/configs/sd15_8styles_1gpu.yaml --dry-run   # ... and print the per-worker memory plans
  ray job submit --working-dir . -- python jobs/merge.py

Without --config the toy preset runs: its zoo is built on first use and cached, and the zoo,
outputs, latents and MLflow store live under $DMM_HOME (default ~/.dmm-ray; dmm_ray/paths.py),
the same folders from a checkout and from a Ray job's temporary working dir. Relative paths in a
config file resolve against the file's folder; relative --set paths against the current directory.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dmm_ray.console import add_verbose_argument, cli_main, refuse_empty, set_verbosity
from dmm_ray.overrides import add_set_argument

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "toy.yaml"


@cli_main(interrupted="the last good merged model and the checkpoints stay in output_dir; re-run the same command to resume")
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--config", default=None, help=f"YAML preset (default: the embedded toy preset, {DEFAULT_CONFIG.relative_to(DEFAULT_CONFIG.parents[2])})"
    )
    add_set_argument(parser, "distill.steps=10")
    add_verbose_argument(parser)
    parser.add_argument(
        "--restart",
        action="store_true",
        help="discard output_dir's resumable state (checkpoints, synthesized "
        "sets) made with other settings; the last merged model stays until the new one replaces it",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="validate the config and teachers, print the plan, start nothing "
        "(a zoo preset must be built already); teachers' files are checked cheaply: present, safetensors "
        "headers and sizes intact (truncated files), .ckpt only with allow_pickle",
    )
    parser.add_argument(
        "--deep",
        action="store_true",
        help="with --dry-run: also read every tensor of every teacher and fail on "
        "NaN/Inf, naming the teacher, file and tensor (reads all the weights: minutes on real checkpoints)",
    )
    args = parser.parse_args(argv)
    refuse_empty(parser, args, "config")
    set_verbosity(args.verbose)
    if args.deep and not args.dry_run:
        parser.error("--deep goes with --dry-run (it checks every teacher tensor, then starts nothing)")
    from dmm_ray.paths import expand

    config = expand(args.config) if args.config else str(DEFAULT_CONFIG)  # `$DMM_HOME`, `~`: as in every path, quoted too

    from dmm_ray.config import load_config

    print(f"config: {Path(config).resolve()}" + ("" if args.config else " (the embedded default; --config to choose another)"), flush=True)
    cfg = load_config(config, args.overrides, build_zoo=not args.dry_run)
    from dmm_ray.merge import check_before_run, check_writable_outputs, format_locations, run_merge, validate_before_ray

    print(format_locations(cfg, "locations"), flush=True)
    check_writable_outputs(cfg)  # before the MLflow store or Ray exist
    from dmm_ray.ray_session import check_address

    check_address(cfg.scaling.ray_address)  # an address where no Ray answers: said now, not after minutes of GCS retries
    if args.dry_run:
        from dmm_ray.fingerprint import hashing_once

        with hashing_once():  # as run_merge: each teacher hashed once by the checks below (check_before_run, validate_before_ray)
            from dmm_ray.memory_plan import MemoryPlanError, describe_config
            from dmm_ray.merge import as_read_before_it_starts

            # an incremental merge's previous model where the run reads it: a killed save's merged.old it puts back first
            # (check_before_run says so); the records the run compares take the config as given
            read = as_read_before_it_starts(cfg)
            try:
                validate_before_ray(read, deep=args.deep, restart=args.restart)
            except MemoryPlanError:  # a layout that does not fit: refused with its own plan
                raise
            except (ValueError, OSError):  # the plan needs no weights or data: a layout can be planned before they are here
                print(describe_config(read), flush=True)
                raise
            print(describe_config(read), flush=True)  # every kind of worker: teachers', the regulariser's, the few-step stage's
            if args.deep:
                print(f"--deep: every tensor of the {len(cfg.teachers)} teachers is finite", flush=True)
            # what the run finds in output_dir: its lock held by a running merge, state of other settings (refused,
            # as the run refuses them), a finished merge (the run would do nothing): said by the dry run too
            found = check_before_run(cfg, restart=args.restart)
            print(cfg.model_dump_json(indent=2))
            from dmm_ray.merge import describe_layout

            print(describe_layout(read))
            for line in found:
                print(line)
            print(f"OK: {len(cfg.teachers)} teachers, {cfg.num_workers} workers")
            return 0
    from dmm_ray.tracking import make_tracker

    result = run_merge(cfg, tracker=make_tracker(cfg), restart=args.restart)
    from dmm_ray.models.style_unet import merged_style_names

    styles = merged_style_names(result.merged_path)  # an incremental merge: the old styles too
    took = "already complete (nothing run)" if result.already_complete else f"{result.seconds:.0f} s"
    print(f"\nmerged model: {result.location or result.merged_path}\nstyles: {styles}\ntime: {took}")
    for stage, metrics in result.stage_metrics.items():
        losses = {k: round(v, 5) for k, v in metrics.items() if isinstance(v, float) and k.startswith("loss")}
        print(f"{stage}: {metrics.get('seconds', 0):.0f} s" + (f", {losses}" if losses else ""))
    print(format_locations(cfg, "results"), flush=True)
    if result.tracking_failed:  # the work is done; MLflow, an observer, did not record it (as jobs/export.py: 3)
        print(f"warning: {result.tracking_failed}", file=sys.stderr, flush=True)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
