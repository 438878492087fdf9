#!/usr/bin/env python
"""Weighted-merge baseline: the parameter-space weighted sum of N teacher checkpoints, saved as a
diffusers folder (what supermerger / diffusers' CheckpointMerger do; paper Fig. 8, Table 3 "WM").

  python jobs/weighted_merge.py --teachers $DMM_HOME/zoo/full/zoo.yaml --names noir,neon --weights 0.5,0.5 --out outputs/wm

Weights must be >= 0 and sum to 1 (default: equal). --track logs the folder to MLflow as a
'weighted-merge' stage and registers it.
"""

from __future__ import annotations

import argparse
import sys

from dmm_ray.console import add_verbose_argument, cli_main, expand_path_args, given_options, refuse_empty, set_verbosity


def _csv(s: str | None):
    return None if s is None else [x.strip() for x in s.split(",") if x.strip()]


def _weights(text: str, names: list[str]) -> list[float]:
    """--weights -> one number per teacher, by position. An empty entry is refused, not skipped: skipping
    it moved each later weight onto the teacher before it (`--names a,b,c --weights 0.5,,0.2,0.3`
    merged a 0.5, b 0.2, c 0.3)."""
    from dmm_ray.baselines.weighted_merge import MergeWeightsError

    parts = [x.strip() for x in text.split(",")]
    empty = [i + 1 for i, x in enumerate(parts) if not x]
    if empty:
        raise MergeWeightsError(
            f"entry {', '.join(map(str, empty))} of {len(parts)} is empty (two commas in a row, or one at either end); "
            f"give one weight per teacher ({', '.join(names)}), in that order, separated by single commas"
        )
    return [float(x) for x in parts]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teachers", required=True, help="zoo.yaml or a merge config")
    p.add_argument("--names", help="comma-separated teacher names to merge (default: all)")
    p.add_argument("--weights", help="comma-separated weights, one per teacher, >= 0, summing to 1 (default: equal)")
    p.add_argument("--out", required=True, help="output diffusers folder: new, empty, or an earlier weighted merge (replaced)")
    p.add_argument("--no-text-encoder", action="store_true", help="keep the first teacher's text encoder instead of merging them")
    p.add_argument("--track", action="store_true", help="log + register in MLflow")
    p.add_argument("--tracking-uri", default=None, help="MLflow store (default: the merge job's, sqlite:///$DMM_HOME/mlflow.db)")
    p.add_argument("--project", default="dmm-merge", help="MLflow parent run (merge project) name with --track (default: dmm-merge)")
    p.add_argument("--registered-name", default="dmm-weighted-merge", help="MLflow registered model name with --track (default: dmm-weighted-merge)")
    add_verbose_argument(p)
    return p


TRACKING_OPTIONS = {"tracking_uri": "--tracking-uri", "project": "--project", "registered_model_name": "--registered-name"}


def version_description(names: list[str], weights: list[float], out) -> dict:
    """`description` and `tags` of the registered version, as a merge's (`dmm_ray.tracking.version_record`): the
    Models page showed a weighted merge's version with neither, so nothing told one mix from another."""
    from dmm_ray.tracking import version_record

    record = version_record("weighted-merge", out)  # its stage and path tags; the folder records no styles: the teachers'
    record["tags"].update({"dmm.styles": ",".join(names), "dmm.weights": ",".join(f"{w:g}" for w in weights)})
    mix = ", ".join(f"{n} {w:g}" for n, w in zip(names, weights))
    record["description"] = f"weighted-merge: {len(names)} teacher(s) ({mix})"
    return record


def _tracking_config(args):
    """--track: the store, the project and the registered name, checked before any teacher is loaded (MLflow
    would refuse them only after the merge was written); the TrackingConfig the job logs with. A --project
    TrackingConfig refuses (both ' and ", a trailing backslash: MLflow's run search cannot find it again)
    was refused only after the merge was written, where the config was first built."""
    from dmm_ray.paths import default_tracking_uri
    from dmm_ray.tracking import check_registered_name, check_tracking, tracking_from_options

    check_registered_name(args.registered_name, "--registered-name")
    tracking = tracking_from_options(
        TRACKING_OPTIONS,
        tracking_uri=args.tracking_uri or default_tracking_uri(),
        project=args.project,
        registered_model_name=args.registered_name,
    )
    check_tracking(tracking, "--tracking-uri")
    return tracking


@cli_main(interrupted="--out keeps the previous weighted merge (if any) until a complete new one replaces it; re-run the same command")
def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    refuse_empty(
        parser, args, "teachers", "weights", "out", "tracking_uri", "project"
    )  # --names "" and --registered-name "": their own messages below
    expand_path_args(args, "teachers", "out")
    if not args.track:  # they only say where and how --track logs: without it they would be ignored
        if given := given_options(parser, args, "tracking_uri", "project", "registered_name"):
            parser.error(f"{', '.join(given)} only apply with --track (log + register in MLflow); add --track, or leave {' and '.join(given)} out")
    set_verbosity(args.verbose)
    from dmm_ray.baselines.weighted_merge import MergeWeightsError, check_output, validate_weights, weighted_merge_teachers
    from dmm_ray.evaluation.sources import load_eval_setup

    check_output(args.out, "--out")  # before a teacher is loaded
    tracking = _tracking_config(args) if args.track else None

    specs = load_eval_setup(args.teachers).teachers
    known = {s.name: s for s in specs}
    if args.names is not None:
        names = _csv(args.names)
        twice = sorted({n for n in names if names.count(n) > 1})
        if not names or twice:
            problem = f"lists {twice} more than once" if twice else "is empty"
            print(
                f"error: --names {args.names!r} {problem}; give each teacher once, comma-separated, from {list(known)} (or leave --names out to merge all)",
                file=sys.stderr,
            )
            return 2
        unknown = [n for n in names if n not in known]
        if unknown:
            print(f"error: unknown teacher(s) {unknown}; known: {list(known)}", file=sys.stderr)
            return 2
        specs = [known[n] for n in names]
    names = [s.name for s in specs]
    try:
        weights = validate_weights(_weights(args.weights, names) if args.weights else None, names)
    except (MergeWeightsError, ValueError) as e:
        print(f"error: --weights {args.weights}: {e}", file=sys.stderr)
        return 2
    tracker = None
    if tracking is not None:
        from dmm_ray.tracking import MergeTracker

        # opened before the merge: an http(s) server that never answers is refused now (MergeTracker._first_contact), not after it
        tracker = MergeTracker(tracking)
    out = weighted_merge_teachers(specs, weights, args.out, merge_text_encoder=not args.no_text_encoder, setting="--out")
    print(f"weighted merge of {dict(zip([s.name for s in specs], weights))} -> {out}")
    if tracker is not None:
        names = [s.name for s in specs]
        with tracker.project(), tracker.stage("weighted-merge", params={"teachers": names, "weights": weights}):
            print("registered:", tracker.log_merged_model(out, **version_description(names, weights, out)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
