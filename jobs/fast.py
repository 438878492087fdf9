"""Every style in a few steps: LCM-distill a merged DMM model (one LoRA or one full copy, for all
its styles, the style index still an input) and save it as a DMMPipeline with TCDScheduler (fast.sampler).

  python jobs/fast.py --model $DMM_HOME/outputs/dmm-toy/merged --config jobs/configs/toy_fast.yaml
  python jobs/fast.py --model MERGED --config jobs/configs/toy_fast.yaml --set fast.steps=50 --set fast.mode=full
  python jobs/fast.py --model MERGED --config jobs/configs/toy_fast.yaml --output-dir /tmp/fast --no-eval
  python jobs/fast.py --model MERGED --config jobs/configs/toy_fast.yaml --dry-run   # check model, config, folders; print the memory plan
  ray job submit --working-dir . -- python jobs/fast.py --model MERGED --config jobs/configs/toy_fast.yaml

The config is a merge config (the one the model was merged with works): its `fast:` section, the
latent shards (`data:`; the same shards the merge used, no new data), `scaling:`, `evaluation:`
and `tracking:` apply. The result is <output_dir>/fast/model (or --output-dir/model; an output_dir URI: its
local staging folder's fast/model, as the merge's few-step stage), evaluated at
fast.eval_steps against the merge's own teachers (its dmm_merge.json) and registered in MLflow
under the merge's project and registered-model name as a new model version.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dmm_ray.console import add_verbose_argument, cli_main, refuse_empty, refuse_uris, set_verbosity
from dmm_ray.overrides import add_set_argument, literal_override

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "toy_fast.yaml"


@cli_main(interrupted="the training state stays in the output folder; re-run the same command to resume")
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="the merged model folder to distill (jobs/merge.py's <output_dir>/merged)")
    parser.add_argument(
        "--config", default=None, help=f"YAML merge config with a fast: section (default: {DEFAULT_CONFIG.relative_to(DEFAULT_CONFIG.parents[2])})"
    )
    add_set_argument(parser, "fast.steps=50")
    add_verbose_argument(parser)
    parser.add_argument(
        "--output-dir",
        default=None,
        help="where ray_results/, model/ and evaluation_<n>steps/ go (default: <output_dir>/fast; an output_dir URI: "
        "its local staging folder's fast/, as the merge's few-step stage)",
    )
    parser.add_argument("--no-eval", action="store_true", help="skip the FIDt evaluation (fast.eval_steps)")
    parser.add_argument("--no-track", action="store_true", help="no MLflow runs, no registered model version")
    parser.add_argument(
        "--restart",
        action="store_true",
        help="discard the training state in the output folder (a run from another model or with other settings) and train from the start",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="check the model folder, the config, the output folder, the MLflow store and the evaluation's inputs, "
        "print the per-worker memory plan (refused when it does not fit scaling.gpu_memory_gb), start nothing",
    )
    args = parser.parse_args(argv)
    refuse_empty(parser, args, "model", "config", "output_dir")
    refuse_uris(parser, args, output_dir="folder")  # fast.output_dir's own check, naming the flag the user gave
    set_verbosity(args.verbose)
    from dmm_ray.paths import expand

    # `$DMM_HOME` and `~` expand in these as in every path (README "how paths resolve"), also when quoted:
    # `--model '$DMM_HOME/outputs/dmm-toy/merged'`, the example --model's own error gives, was "no such folder"
    args.model = expand(args.model)
    config = expand(args.config) if args.config else str(DEFAULT_CONFIG)

    from dmm_ray.config import load_config
    from dmm_ray.fast.job import FastError, check_model_folder, require_local_model, run_fast

    try:  # a URI was read as the local Path `s3:/bucket/x/merged`: "no such folder", for a model that is there
        require_local_model(args.model)  # (its error names the merge's local copy where this machine has one)
    except FastError as error:
        parser.error(str(error))
    from dmm_ray.merged_model import read_record
    from dmm_ray.output_lock import check_not_being_replaced

    check_not_being_replaced(args.model)  # a merge's <output_dir>/merged while that merge runs: before it is read at all
    check_model_folder(args.model)  # before anything slow
    cfg = load_config(config, args.overrides)  # the user's --set alone first: a bad one is refused naming its own key
    if args.output_dir:  # (applied with them, `--set fast=lora` was blamed on --output-dir's fast.output_dir)
        # as given: load_config resolves it as every path (dmm_ray.paths.resolve: `~` and $DMM_HOME expanded, then
        # against the current directory); Path.resolve() made `--output-dir=~/x` a folder named `~` in it
        cfg = load_config(config, [*args.overrides, literal_override("fast.output_dir", args.output_dir)])
    cfg = cfg.with_absolute_paths()
    from dmm_ray.output_folders import fast_synthesized

    # the merge's synthesized sets where the merge's own few-step stage reads them (an output_dir URI: at the URI, not
    # beside the staging folder's merged model, where jobs/fast.py looked and was refused)
    cfg = cfg.model_copy(update={"fast": cfg.fast.model_copy(update={"synthesized": fast_synthesized(cfg)})})
    record = read_record(Path(args.model))
    update = {"enabled": False} if args.no_track else {}
    if record.get("name"):  # MLflow: the merge's own project, and a new version of its registered model
        # (unless the config names them: fields the user left unset hold the config's `name`)
        update.update({k: record["name"] for k in ("project", "registered_model_name") if k not in cfg.tracking.model_fields_set})
    cfg = cfg.model_copy(update={"tracking": cfg.tracking.model_copy(update=update)})
    from dmm_ray.fast.job import fast_dir
    from dmm_ray.paths import check_writable_folder
    from dmm_ray.tracking import check_tracking

    check_writable_folder(fast_dir(cfg), "--output-dir" if args.output_dir else "the few-step stage's folder (fast.output_dir)")
    check_tracking(cfg.tracking)  # a store MLflow cannot open, or an sqlite folder that cannot be written
    from dmm_ray.paths import sqlite_path, temporary_dir_warning

    db = sqlite_path(cfg.tracking.tracking_uri) if cfg.tracking.enabled else None
    warning = temporary_dir_warning({"fast model": str(fast_dir(cfg) / "model"), "MLflow store": str(db) if db else None})
    if warning:  # a relative --output-dir under `ray job submit`: as jobs/merge.py's locations warn
        print(warning.strip(), flush=True)
    from dmm_ray.ray_session import check_address

    check_address(cfg.scaling.ray_address)  # as jobs/merge.py: an address where no Ray answers, said by --dry-run too
    if not args.no_eval and cfg.fast.eval_steps:
        # its prompts and feature extractor: not only after the training. This job evaluates at fast.eval_steps
        # whatever evaluation.enabled says (a merge's few-step stage follows it), so that is not the way out
        cfg.evaluation.check_ready(off="pass --no-eval (or set fast.eval_steps: [])")
    if args.dry_run:  # as jobs/merge.py --dry-run: what run_fast checks before Ray, and the plan, nothing started
        from dmm_ray.fast.job import check_before_ray
        from dmm_ray.memory_plan import describe

        print(f"config: {Path(config).resolve()}\nmodel:  {Path(args.model).resolve()}", flush=True)
        styles, plan, _ = check_before_ray(cfg, args.model)  # a layout that does not fit: refused with its own plan
        # what run_fast finds in its folder: its fast.lock held by a running job, training state from another model or
        # with other settings (refused as the run refuses them; --restart discards the state), a finished run (nothing to do)
        from dmm_ray.fast.job import check_before_run

        found = check_before_run(cfg, args.model, evaluate=not args.no_eval, restart=args.restart)
        print(describe(cfg, plan), flush=True)
        for line in found:
            print(line)
        print(f"OK: {len(styles)} styles, {cfg.fast.num_workers} worker(s)")
        return 0
    tracker = None
    if cfg.tracking.enabled:
        from dmm_ray.tracking import make_tracker

        tracker = make_tracker(cfg)
    print(f"config: {Path(config).resolve()}\nmodel:  {Path(args.model).resolve()}\nshards: {cfg.data.shards}", flush=True)
    result = run_fast(cfg, args.model, tracker=tracker, evaluate=not args.no_eval, restart=args.restart)
    print(f"few-step model: {result.model_path}" + (" (already complete: nothing run)" if result.already_complete else ""))
    for steps, ev in sorted(result.evaluations.items()):
        print(f"  {steps} steps: FIDt {ev.fidt:.2f} (ref {ev.fidt_ref:.2f}, ratio {ev.ratio:.3f})")
    if result.model_uri:
        print(f"MLflow: {result.model_uri}")
    print(f"serve:  DMM_MODEL={result.model_path} serve run serve.app   (default_steps follows the model)")
    if result.tracking_failed:  # the work is done; MLflow, an observer, did not record it (as jobs/export.py: 3)
        print(f"warning: {result.tracking_failed}", file=sys.stderr, flush=True)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
