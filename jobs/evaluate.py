#!/usr/bin/env python
"""Evaluate a merged model against its teachers: FID matrix M, reference M_ref, FIDt (paper 4.1).

  python jobs/evaluate.py --model $DMM_HOME/outputs/dmm-toy/merged --teachers $DMM_HOME/zoo/full/zoo.yaml
  python jobs/evaluate.py --model MERGED --teachers jobs/configs/toy.yaml --config jobs/configs/toy.yaml --section evaluation
  ray job submit --working-dir . -- python jobs/evaluate.py --model ... --teachers ... --set images_per_prompt=50

Teacher statistics are cached (EvalConfig.cache_dir), so re-running after another merge only
samples the student. Writes fid_matrix.json, M.csv, M_ref.csv, fid_heatmaps.png, style_grid.png
to --out and prints FIDt, FIDt_ref and their ratio. --track logs it all to MLflow as a stage.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dmm_ray.console import add_verbose_argument, cli_main, expand_path_args, given_options, refuse_empty, refuse_uris, set_verbosity
from dmm_ray.overrides import add_set_argument, literal_override


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--model",
        help="merged model folder, an object-storage URI of one (s3://, gs://, file://, as Serve reads it) or MLflow URI (models:/name/version, read from --tracking-uri's store); a URI is downloaded into a temporary folder, removed when the job ends; omit with --reference-only",
    )
    p.add_argument("--teachers", required=True, help="zoo.yaml (paths relative to it) or a merge config (its teachers and evaluation: section)")
    p.add_argument("--config", help="YAML with EvalConfig fields (or a merge config; see --section)")
    p.add_argument("--section", default=None, help="read EvalConfig from this key of --config (a merge config: 'evaluation')")
    add_set_argument(p, "sampler.num_inference_steps=10")
    p.add_argument(
        "--out",
        help="output folder (default: EvalConfig.output_dir; with a merge config as --teachers, that merge's own evaluation "
        "folder, for its merged model at its evaluation: settings only, under its merge.lock)",
    )
    p.add_argument("--no-ray", action="store_true", help="generate in this process instead of Ray actors")
    p.add_argument("--reference-only", action="store_true", help="only compute (and cache) the teacher reference M_ref")
    p.add_argument("--track", action="store_true", help="log to MLflow (stage 'evaluation' under --project)")
    p.add_argument("--tracking-uri", default=None, help="MLflow store (default: the merge job's, sqlite:///$DMM_HOME/mlflow.db)")
    p.add_argument(
        "--project", default="dmm-merge", help="MLflow parent run (merge project) name (default: dmm-merge; a merge's is its name, e.g. dmm-toy)"
    )
    add_verbose_argument(p)
    return p


def few_step_sampler(model_path, cfg, overrides: list[str]) -> tuple[int, float] | None:
    """(steps, guidance) a few-step model (its sampler.json names TCD or LCM) is sampled with: its own
    record's, each unless `--set` names it (sampler.num_inference_steps / guidance_scale); the teachers
    keep the evaluation's sampler, as the few-step stage's evaluation does. It was sampled at the
    evaluation's sampler (toy.yaml: 10 steps at CFG 5), which a 4-step, CFG-off model is not made for:
    a meaningless FIDt. None for any other model (a merged one samples with the teachers' sampler)."""
    from dmm_ray.defaults import FEW_STEP_SCHEDULERS
    from dmm_ray.overrides import parse_override
    from dmm_ray.pipeline import sampler_defaults

    own = sampler_defaults(model_path)  # a ValueError naming a broken sampler.json
    if own["scheduler"] not in FEW_STEP_SCHEDULERS.values():
        return None
    given = set()
    for text in overrides:
        path, value = parse_override(text)
        if path == ["sampler"] and isinstance(value, dict):
            given |= set(value)
        elif path[-1] in ("num_inference_steps", "guidance_scale") and path[:-1] in ([], ["sampler"]):
            given.add(path[-1])
    steps = cfg.sampler.num_inference_steps if "num_inference_steps" in given else own["num_inference_steps"]
    guidance = cfg.sampler.guidance_scale if "guidance_scale" in given else own["guidance_scale"]
    source = {k: "--set" if k in given else "its sampler.json" for k in ("num_inference_steps", "guidance_scale")}
    print(
        f"{model_path} is a few-step model ({own['scheduler']}): sampled at {steps} steps ({source['num_inference_steps']}), "
        f"guidance {guidance} ({source['guidance_scale']}); the teachers at the evaluation's {cfg.sampler.num_inference_steps} steps, "
        f"guidance {cfg.sampler.guidance_scale} (--set sampler.num_inference_steps / sampler.guidance_scale sets both)",
        flush=True,
    )
    return steps, guidance


# EvalConfig fields that decide how an evaluation runs, not what it measures
RUN_ONLY_FIELDS = (
    "enabled",
    "batch_size",
    "cache_dir",
    "output_dir",
    "use_ray",
    "num_student_workers",
    "worker_num_cpus",
    "worker_num_gpus",
    "device",
)


def merge_folder_to_lock(parser, args, setup, cfg) -> Path | None:
    """With a merge config as --teachers and no --out, the results go to the merge's own evaluation folder
    (its evaluation.output_dir, default <output_dir>/evaluation), where they replaced the merge's results
    whatever model or settings were scored, also while that merge ran. They may go there only as that
    merge's evaluation again: its merged model at the settings of its evaluation: section (how it runs aside);
    another model or other settings is a usage error naming --out. Returns the merge's local work folder,
    whose merge.lock the evaluation then holds (dmm_ray/output_lock.py), or None when the results go elsewhere."""
    merge = setup.merge
    if merge is None or args.reference_only or Path(cfg.output_dir).resolve() != Path(merge.evaluation.output_dir).resolve():
        return None
    from dmm_ray.merge import output_location

    local = output_location(merge.with_absolute_paths())[0]
    own = (local / "merged").resolve()
    problems = []
    if "://" in args.model or Path(args.model).resolve() != own:
        problems.append(f"--model {args.model} is not its merged model {own}")
    asked, merged = cfg.model_dump(exclude=set(RUN_ONLY_FIELDS)), merge.evaluation.model_dump(exclude=set(RUN_ONLY_FIELDS))
    changed = [k for k in asked if asked[k] != merged[k]]
    if changed:
        problems.append(f"{', '.join(changed)} differ from its evaluation: section")
    if problems:
        parser.error(
            f"--teachers {args.teachers} is a merge config: without --out the results go to that merge's own evaluation folder "
            f"{Path(cfg.output_dir).resolve()}, and would replace its results, but {'; '.join(problems)}. "
            "Give --out OUT for this evaluation's results"
        )
    return local


@cli_main(interrupted="the statistics already computed stay in cache_dir; the same command reuses them")
def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    refuse_empty(parser, args, "model", "teachers", "config", "section", "out", "tracking_uri", "project")
    expand_path_args(args, "model", "teachers", "config", "out")
    refuse_uris(parser, args, out="folder")  # before the teachers are read (as export and style_mixing refuse theirs)
    if args.model and args.reference_only:  # the model would be sampled and scored, then its numbers dropped
        parser.error("--reference-only computes M_ref from the teachers alone: leave --model out (or drop --reference-only to evaluate it)")
    if args.reference_only and args.out:  # M_ref goes to cache_dir and the terminal: --out would stay empty
        parser.error(
            "--reference-only writes no files (M_ref is cached in cache_dir and printed): leave --out out, or give --model to write the matrices there"
        )
    if args.section and not args.config:
        parser.error("--section names a key of --config; give --config too")
    if not args.track and given_options(parser, args, "project"):  # it names the run --track logs to: alone it would be ignored
        parser.error("--project only applies with --track (log the evaluation to MLflow under that project); add --track, or leave --project out")
    set_verbosity(args.verbose)
    from dmm_ray.evaluation.api import evaluate_merge
    from dmm_ray.evaluation.config import load_eval_config
    from dmm_ray.evaluation.outputs import format_table
    from dmm_ray.evaluation.sources import load_eval_setup
    from dmm_ray.paths import check_writable_folder

    if not args.model and not args.reference_only:
        print("error: give --model (a merged model) or --reference-only", file=sys.stderr)
        return 2
    setup = load_eval_setup(args.teachers)
    from dmm_ray.teachers import check_teacher_files

    check_teacher_files(setup.teachers)  # present and intact, each error naming its teacher, before any sampling
    extra = []
    if args.no_ray:
        extra.append("use_ray=false")
    if args.out:
        extra.append(literal_override("output_dir", args.out))  # a path: not read as YAML (`runs #3`, `2024`)
    cfg = load_eval_config(args.config, args.overrides + extra, args.section, defaults=setup.defaults)
    if not args.reference_only:  # (M_ref alone writes nothing there: a read-only cwd's default outputs/eval refused it)
        from dmm_ray.data.fs import require_local

        try:  # --config's output_dir (--out's: refused above); write_outputs refuses it too, but once every image was sampled
            require_local("output_dir", cfg.output_dir)
        except ValueError as error:
            parser.error(str(error))
        check_writable_folder(cfg.output_dir, "--out" if args.out else "output_dir")  # before minutes of sampling
    check_writable_folder(cfg.cache_dir, "cache_dir")
    merge_folder = merge_folder_to_lock(parser, args, setup, cfg)
    tracking = None
    if args.track:
        from dmm_ray.paths import default_tracking_uri
        from dmm_ray.tracking import check_tracking, tracking_from_options

        # a --project TrackingConfig refuses is a one-line error naming --project, as in weighted_merge.py
        tracking = tracking_from_options(
            {"tracking_uri": "--tracking-uri", "project": "--project"},
            tracking_uri=args.tracking_uri or default_tracking_uri(),
            project=args.project,
        )
        check_tracking(tracking, "--tracking-uri")

    from dmm_ray.models.style_unet import merged_style_names
    from dmm_ray.tracking import MergeTracker, local_model

    tracker = None
    from contextlib import nullcontext

    from dmm_ray import output_lock

    # writing into the merge's own evaluation folder: its merge.lock, as the merge's evaluate stage holds it (a
    # running merge refuses this job, naming itself, and a merge started meanwhile refuses to start)
    # (recorded as an evaluation's: readers of the merged model are not refused by it, and a merge's refusal says so)
    guard = output_lock.hold(merge_folder, job=output_lock.EVALUATION, fix="--out OUT", holder="merge") if merge_folder else nullcontext()
    if not merge_folder and args.model:  # (holding the lock, the evaluation reads its model safely)
        output_lock.check_not_being_replaced(args.model)  # a merge's <output_dir>/merged, a few-step <folder>/model, while its job runs
    with guard, local_model(args.model or None, args.tracking_uri) as model_path:  # a models:/ download is removed afterwards
        if tracking is not None:
            # Opened before any image is sampled (after a models:/ download, which reads the store with its own
            # registry): an http(s) server that never answers is refused now (MergeTracker._first_contact), as
            # a merge's is before it trains; opened after the evaluation, it failed the job once every image was made.
            tracker = MergeTracker(tracking)
        student_sampler = None
        if model_path is not None:
            merged_style_names(model_path)  # a merged model (StyleUNet), not a plain diffusers folder: say so now
            student_sampler = few_step_sampler(model_path, cfg, args.overrides)
        result = evaluate_merge(
            model_path,
            setup.teachers,
            cfg,
            print_table=False,
            model_name=args.model,
            student_sampler=student_sampler,
            check_replaced=not merge_folder,
        )
    if args.reference_only:
        print("M_ref (rows: teacher i seed set A, columns: teacher j seed set B):")
        for name, row in zip(result.style_names, result.ref_matrix):
            print(f"  {name:<16} " + " ".join(f"{v:10.4f}" for v in row))
        print(f"FIDt_ref = {result.fidt_ref:.4f}")
        result.files = {}
    else:
        print(format_table(result))
        print(f"outputs: {Path(cfg.output_dir).resolve()}")
    if tracker is not None:
        try:
            with tracker.project(), tracker.stage("evaluation", config=cfg, params={"model": args.model or ""}):
                if args.reference_only:
                    tracker.log_metrics({"FIDt_ref": result.fidt_ref})
                else:
                    tracker.log_evaluation(result)
        except Exception as error:  # noqa: BLE001 - MLflow is an observer: a store that fails now undoes none of the work
            # (it was a traceback, exit 1, after every image was sampled and the files written); as jobs/export.py: exit 3
            first = str(error).strip().splitlines()[0] if str(error).strip() else "no message"
            done = "M_ref is computed and cached" if args.reference_only else f"the evaluation is written ({Path(cfg.output_dir).resolve()})"
            print(
                f"warning: {done} but not logged to MLflow at {tracking.tracking_uri} ({type(error).__name__}: {first}); "
                "once the store answers, the same command logs it: "
                + (
                    "it reads M_ref from cache_dir"
                    if args.reference_only
                    else "it samples the model again (the teachers' statistics come from cache_dir) and logs that evaluation"
                ),
                file=sys.stderr,
            )
            return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
