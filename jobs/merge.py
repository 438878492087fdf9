"""Merge N teacher checkpoints into one style-promptable model (DMM) on Ray.

  python jobs/merge.py --config jobs/configs/toy.yaml [--set distill.steps=10 ...]
  ray job submit --working-dir . -- python jobs/merge.py --config jobs/configs/toy.yaml
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML preset, e.g. jobs/configs/toy.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value by dotted key, e.g. --set distill.steps=10 (repeatable)")
    parser.add_argument("--dry-run", action="store_true", help="validate the config and teachers, print the plan, start nothing")
    args = parser.parse_args(argv)

    from dmm_ray.config import ConfigError, load_config
    from dmm_ray.teachers import TeacherError

    try:
        cfg = load_config(args.config, args.overrides)
        from dmm_ray.merge import run_merge, validate_before_ray

        if args.dry_run:
            validate_before_ray(cfg)
            print(cfg.model_dump_json(indent=2))
            print(f"OK: {len(cfg.teachers)} teachers, {cfg.num_workers} workers")
            return 0
        from dmm_ray.tracking import make_tracker

        result = run_merge(cfg, tracker=make_tracker(cfg))
    except (ConfigError, TeacherError, FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"\nmerged model: {result.merged_path}\nstyles: {[t.name for t in cfg.teachers]}\ntime: {result.seconds:.0f} s")
    for stage, metrics in result.stage_metrics.items():
        losses = {k: round(v, 5) for k, v in metrics.items() if isinstance(v, float) and k.startswith("loss")}
        print(f"{stage}: {losses}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
