"""Build the toy style zoo (image set, tiny SD base, N style teachers in three formats, feature net).

    python jobs/build_zoo.py                            # full zoo (8 teachers) in $DMM_HOME/zoo/full, cached
    python jobs/build_zoo.py --out .zoo                 # full zoo (8 teachers) in .zoo, cached
    python jobs/build_zoo.py --out /tmp/z --size micro  # 3 teachers, seconds (tests)
    python jobs/build_zoo.py --out .zoo --report        # M_ref, prompt following, grid PNG

A second call with the same --out/--size/--seed/--threads returns at once (another
--threads is refused: it builds other weights). The zoo is written to a
temporary sibling folder and renamed into place only when complete.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from dmm_ray.console import cli_main, expand_path_args, given_options, interrupt_note, refuse_empty

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@cli_main(interrupted="nothing was written under --out (the unfinished build is removed by the next one); the same command builds the zoo again")
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--out",
        default=None,
        help="zoo folder (created; reused when already complete); default: $DMM_HOME/zoo/<size>, the folder a merge config's `zoo: <size>` uses",
    )
    parser.add_argument("--size", choices=["micro", "full"], default="full", help="preset (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of every random choice (default: %(default)s)")
    parser.add_argument("--force", action="store_true", help="rebuild even if a finished zoo is at --out")
    parser.add_argument("--report", action="store_true", help="after building, print M_ref, prompt following and the grid path")
    parser.add_argument("--report-samples", type=int, default=256, help="images per teacher and seed set for --report's M_ref (default: %(default)s)")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: 2, whatever the cores or the load: the weights are bit-identical only for one "
        "thread count; 1 is cheaper on a busy machine, as tiny models on an oversubscribed CPU spend most of their time in "
        "OpenMP synchronisation, but builds a zoo with other weights)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    refuse_empty(parser, args, "out")
    # `$DMM_HOME` and `~` expand as in every path option, also quoted: the folder checked is the folder built
    expand_path_args(args, "out")
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be at least 1 (leave it out for the default, 2), got {args.threads}")
    if not 0 <= args.seed < 2**32:
        parser.error(f"--seed must be in [0, 2**32) (NumPy's seed range), got {args.seed}")
    if not args.report and given_options(parser, args, "report_samples"):
        parser.error("--report-samples sizes the --report (M_ref after the build); add --report, or leave --report-samples out")
    if args.report_samples < 2:
        parser.error(f"--report-samples must be at least 2 (a Fréchet distance needs a covariance), got {args.report_samples}")

    if args.quiet:  # also the libraries' own bars ("Writing model shards" when a text encoder is saved)
        from dmm_ray._quiet import no_loading_bars

        no_loading_bars()
    import torch

    from dmm_ray.zoo.build import ZooBuildError, build_zoo, default_threads, is_complete, zoo_lock

    torch.set_num_threads(args.threads if args.threads is not None else default_threads())
    from dmm_ray.zoo.config import preset

    config = preset(args.size, seed=args.seed)
    if args.out is None:
        from dmm_ray.paths import zoo_dir

        args.out = str(zoo_dir(args.size))
    from dmm_ray.paths import check_writable_folder

    try:
        check_writable_folder(args.out, "--out")
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    try:
        with zoo_lock(args.out):  # a merge building the same preset on first use waits for this build, and the other way round
            cached = is_complete(args.out) is not None and not args.force
            out = build_zoo(args.out, config, progress=not args.quiet, force=args.force)
    except ZooBuildError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    took = time.perf_counter() - t0
    metrics = json.loads((out / "metrics.json").read_text())
    print(f"zoo: {out} ({'cached' if cached else f'built in {took:.0f} s'}; manifest {out / 'zoo.yaml'})")
    print(f"VAE PSNR (dB, held-out scenes): {metrics['vae_psnr_db']}")
    if args.report:
        from dmm_ray.zoo.report import format_report, run_report

        # the zoo is finished by now: the job's own note ("nothing was written", "builds the zoo again") would be wrong
        note = f"the zoo at {out} is finished and kept; its report was stopped before report/report.json was written; the same command makes the report again"
        with interrupt_note(note):
            report = run_report(out, n_per_set=args.report_samples, progress=not args.quiet)
        print(format_report(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
