#!/usr/bin/env python
"""Style-mixing studies with the FID machinery.

Table 3: DMM with equal style weights over --group vs the weighted merge of the same teachers
(built with jobs/weighted_merge.py, or here if --weighted-merge does not exist yet); FID to each
group teacher and to their union. Fig. 10: --sweep A,B interpolates A -> B with weights
0.0, 0.1, ..., 1.0 and plots FID to A (rising) and to B (falling).

  python jobs/style_mixing.py --model $DMM_HOME/outputs/dmm-toy/merged --teachers $DMM_HOME/zoo/full/zoo.yaml \\
      --group warm,cool,faded,bright --sweep noir,neon --out outputs/mixing
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from dmm_ray.console import add_verbose_argument, cli_main, expand_path_args, given_options, refuse_empty, refuse_uris, set_verbosity
from dmm_ray.overrides import add_set_argument


def _positive_int(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number; give a number of sampling steps >= 1, e.g. 4") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"{n} is not a number of sampling steps; give 1 or more, e.g. 4")
    return n


def _guidance(text: str) -> float:
    try:
        g = float(text)
    except ValueError:
        g = math.nan
    if not math.isfinite(g) or g < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a CFG scale; give a number >= 0, e.g. 1 (CFG off) or 5")
    return g


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--model",
        required=True,
        help="merged model folder, an object-storage URI of one (s3://, gs://, file://, as Serve reads it) or models:/name/version (a URI is downloaded into a temporary folder, removed when the job ends)",
    )
    p.add_argument(
        "--tracking-uri", default=None, help="MLflow store a models:/ --model is read from (default: the merge job's, sqlite:///$DMM_HOME/mlflow.db)"
    )
    p.add_argument("--teachers", required=True, help="zoo.yaml or a merge config")
    p.add_argument("--group", help="comma-separated styles to mix (Table 3), e.g. warm,cool,faded,bright")
    p.add_argument(
        "--weighted-merge",
        help="weighted-merge folder of the same group at equal weights (jobs/weighted_merge.py --out; built here if missing or empty; "
        "one of other teachers or weights is refused). Default: OUT/weighted_merge, built there, and rebuilt when it holds another mix",
    )
    p.add_argument(
        "--score-ensemble",
        action="store_true",
        help="add a row: the group teachers' score ensemble (mean of their noise predictions every step; "
        "what distill.mixture_fraction trains the mix towards; costs one UNet pass per teacher per step)",
    )
    p.add_argument("--sweep", help="two comma-separated styles A,B for the interpolation sweep (Fig. 10)")
    p.add_argument("--config", help="YAML with EvalConfig fields (or a merge config; see --section)")
    # as jobs/evaluate.py's: a merge config as --config is refused with the advice to add it
    p.add_argument("--section", default=None, help="read EvalConfig from this key of --config (a merge config: 'evaluation')")
    add_set_argument(p, "sampler.num_inference_steps=10")
    p.add_argument("--out", default="outputs/mixing", help="output folder, relative to the current directory (default: outputs/mixing)")
    p.add_argument("--no-ray", action="store_true", help="generate in this process instead of Ray actors")
    p.add_argument(
        "--student-steps",
        type=_positive_int,
        help="sample the model (not the teachers) with this many steps, e.g. 4 for a "
        "few-step model (jobs/fast.py); default: the evaluation sampler's",
    )
    p.add_argument(
        "--student-guidance",
        type=_guidance,
        help="the model's CFG scale (default: with --student-steps the model's own, 1 for a few-step model; else the evaluation sampler's)",
    )
    add_verbose_argument(p)
    return p


def _styles(option: str, text: str, known: list[str], count: int | None = None) -> list[str]:
    """--group / --sweep -> style names, checked against the teachers before any image is made."""
    from dmm_ray.styles import StyleError

    names = [x.strip() for x in text.split(",") if x.strip()]
    unknown = [x for x in names if x not in known]
    if unknown:
        raise StyleError(f"{option}: unknown style(s) {unknown}; the teachers are {known}")
    if count is not None and len(names) != count:
        raise StyleError(f"{option} takes exactly {count} comma-separated styles, e.g. {option} {known[0]},{known[-1]}; got {text!r}")
    twice = sorted({n for n in names if names.count(n) > 1})  # (was "needs at least two different styles" for warm,warm,cool)
    if twice:
        raise StyleError(f"{option} names {twice} more than once (in {text!r}); give each style once")
    if len(names) < 2:
        raise StyleError(f"{option} needs at least two different styles, got {text!r}")
    return names


@cli_main(interrupted="finished FID statistics stay cached and a complete weighted merge stays in its folder; re-run the same command to go on")
def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    refuse_empty(parser, args, "model", "teachers", "group", "weighted_merge", "sweep", "config", "section", "out", "tracking_uri")
    expand_path_args(args, "model", "teachers", "config", "out", "weighted_merge")
    refuse_uris(parser, args, out="folder", weighted_merge="folder")
    set_verbosity(args.verbose)
    if args.section and not args.config:
        parser.error("--section names a key of --config; give --config too")
    if not args.group and not args.sweep:
        print("error: give --group (Table 3) and/or --sweep A,B (Fig. 10)", file=sys.stderr)
        return 2
    if not args.group and (given := given_options(parser, args, "weighted_merge", "score_ensemble")):
        parser.error(
            f"{' and '.join(given)} {'go' if len(given) > 1 else 'goes'} with --group (rows of the group's mix, Table 3); "
            f"give --group A,B,... too, or leave {' and '.join(given)} out"
        )
    from dmm_ray.baselines.weighted_merge import plan_group_merge
    from dmm_ray.evaluation.config import load_eval_config
    from dmm_ray.evaluation.sources import load_eval_setup
    from dmm_ray.paths import check_writable_folder
    from dmm_ray.tracking import check_tracking_store, is_mlflow_uri, local_model

    setup = load_eval_setup(args.teachers)
    known = [t.name for t in setup.teachers]
    group = _styles("--group", args.group, known) if args.group else None
    pair = _styles("--sweep", args.sweep, known, count=2) if args.sweep else None
    check_writable_folder(args.out, "--out")
    if args.tracking_uri and is_mlflow_uri(args.model):
        check_tracking_store(args.tracking_uri, "--tracking-uri")  # before any image, not at the download
    specs = {s.name: s for s in setup.teachers}
    wm_plan = plan_group_merge([specs[g] for g in group], args.out, args.weighted_merge) if group else None
    cfg = load_eval_config(args.config, args.overrides + (["use_ray=false"] if args.no_ray else []), args.section, defaults=setup.defaults)
    cfg.check_seed_sets(len(cfg.load_prompts()))  # FID needs 2+ images per set: said before a download or the weighted merge
    if group and args.score_ensemble:  # teachers that do not share a text encoder: refused before the weighted merge or any image
        from dmm_ray.baselines.score_ensemble import check_shared_text_encoder

        check_shared_text_encoder([specs[g] for g in group])
    from dmm_ray.output_lock import check_not_being_replaced

    check_not_being_replaced(args.model)  # a merge's <output_dir>/merged (a few-step <folder>/model) while its job runs
    with local_model(args.model, args.tracking_uri) as model_path:  # a models:/ download is removed afterwards
        return _compare(args, cfg, setup, model_path, group, pair, wm_plan)


def _compare(args, cfg, setup, model_path: Path, group, pair, wm_plan=None) -> int:
    from dmm_ray.evaluation.api import check_still_sampled, default_extractor, sources_provenance
    from dmm_ray.evaluation.mixing import interpolation_sweep, mixing_comparison
    from dmm_ray.evaluation.sources import pipeline_folder_source, student_source, teacher_sources

    student = student_source(model_path, cfg.dtype)
    # the model as its sampling starts: a merge started after this job (it checks merge.lock only at its start) may save
    # another model there while the studies sample it, each load reading whichever is there then
    made_by = sources_provenance(model_path, args.model, setup.teachers)
    from dmm_ray.styles import StyleError

    for option, names in (("--group", group), ("--sweep", pair)):  # before the weighted merge, a teacher checksum or an image
        missing = [n for n in names or () if n not in student.style_names]
        if missing:
            raise StyleError(f"{option}: the model {args.model} has no style(s) {missing}; its styles are {student.style_names}")
    if args.student_steps is not None or args.student_guidance is not None:  # the few-step model at its own sampler; teachers unchanged
        from dmm_ray.fast.job import OwnSampler
        from dmm_ray.pipeline import sampler_defaults

        own = sampler_defaults(model_path)
        # unset steps are the evaluation sampler's, as without either flag (--student-guidance alone took the
        # model's own record's, 25 for a model without one, and changed the step count with the CFG scale)
        student.pipeline_factory = OwnSampler.factory(
            student.pipeline_factory,
            cfg.sampler.num_inference_steps if args.student_steps is None else args.student_steps,
            own["guidance_scale"] if args.student_guidance is None else args.student_guidance,
        )
    teachers = {t.name: t for t in teacher_sources(setup.teachers, cfg.dtype)}
    specs = {s.name: s for s in setup.teachers}  # TeacherSpecs by name (weighted merge, score ensemble)
    extractor = default_extractor(cfg)
    out = Path(args.out)
    if group:
        wm_dir, why = wm_plan
        if why:
            from dmm_ray.baselines.weighted_merge import weighted_merge_teachers

            print(f"building the weighted merge of {group} at equal weights in {wm_dir} ({why})", flush=True)
            weighted_merge_teachers([specs[g] for g in group], None, wm_dir, setting="--weighted-merge" if args.weighted_merge else "--out")
        else:
            print(f"using the weighted merge of {group} at equal weights in {wm_dir}", flush=True)
        references = {}
        if args.score_ensemble:
            from dmm_ray.evaluation.sources import score_ensemble_source

            references["score ensemble"] = score_ensemble_source([specs[g] for g in group], cfg.dtype)
        res = mixing_comparison(
            student,
            list(teachers.values()),
            group,
            pipeline_folder_source("weighted merge", wm_dir, cacheable=True, dtype=cfg.dtype),
            cfg,
            extractor,
            references=references,
        )
        check_still_sampled(model_path, made_by)
        print(res.format_table())
        print("written:", res.write(out))
    if pair:
        a, b = pair
        sweep = interpolation_sweep(student, teachers[a], teachers[b], cfg, extractor)
        check_still_sampled(model_path, made_by)
        for w, fa, fb in zip(sweep.weights, sweep.fid_a, sweep.fid_b):
            print(f"w({b})={w:.1f}  FID to {a}: {fa:9.4f}  FID to {b}: {fb:9.4f}")
        print("written:", sweep.write(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
