"""`make demo`: the toy world end to end on local Ray.

1. build the toy zoo (cached: instant the second time)      python jobs/build_zoo.py  ($DMM_HOME/zoo/full)
2. merge its teachers into one model: the embedded default   python jobs/merge.py      (jobs/configs/toy.yaml)
3. print where the merged model, the MLflow store and the evaluation are, and the FIDt table.

Everything lands under $DMM_HOME (default ~/.dmm-ray; dmm_ray/paths.py), where `ray job submit
--working-dir . -- python jobs/merge.py`, `mlflow ui` and `serve run serve.app` find it too.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import subprocess
import sys
import threading
from pathlib import Path

from dmm_ray.console import cli_main, expand_path_args, refuse_empty
from dmm_ray.overrides import add_set_argument, literal_override

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO / "jobs" / "configs" / "toy.yaml"  # what jobs/merge.py runs without --config


class StepFailed(Exception):
    def __init__(self, step: str, code: int):
        code = 128 - code if code < 0 else code  # killed by signal N (Ctrl-C before its cli_main ran: -2): as a shell says, 128 + N
        said = "what it kept is above" if code in (130, 143) else "its error is above"  # interrupted (cli_main's codes)
        super().__init__(f"{step} stopped with exit code {code} ({said})")
        self.code = code


@contextlib.contextmanager
def step_owns_ctrl_c():
    """While a step runs: a Ctrl-C reaches it too (one process group), and the step answers it (the merge stops
    Ray Train, says what it kept and exits 130). The demo's KeyboardInterrupt killed the step 0.25 s later
    (subprocess.run) and ended in a traceback; the demo now waits for the step and stops with its exit code.
    A no-op handler, not SIG_IGN: a child inherits an ignored SIGINT, and would not answer the Ctrl-C. A SIGINT sent to
    the demo's process alone (not its group) is dropped meanwhile; SIGTERM still ends it."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, lambda signum, frame: None)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def run(script: str, *args: str) -> None:
    """Run REPO/`script` in the caller's folder, so that a relative --zoo / --set path means the same
    folder to every step and to the summary (it did not: the steps ran in the repository)."""
    print("+ " + " ".join(["python", script, *args]), flush=True)
    with step_owns_ctrl_c():
        code = subprocess.run([sys.executable, str(REPO / script), *args]).returncode
    if code:
        raise StepFailed(script, code)


@cli_main
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--zoo", default=None, help="zoo folder (default: the preset's, $DMM_HOME/zoo/full)")
    parser.add_argument(
        "--restart",
        action="store_true",
        help="passed to jobs/merge.py: discard the output dir's state made with other settings (checkpoints, synthesized sets) instead of refusing",
    )
    add_set_argument(parser, help="passed to jobs/merge.py")
    parser.add_argument("--verbose", action="store_true", help="passed to jobs/merge.py: show every library notice and Ray Train INFO line")
    args = parser.parse_args(argv)
    refuse_empty(parser, args, "zoo")  # `--zoo "$UNSET"` would build the default zoo (minutes), not use the one meant
    expand_path_args(args, "zoo")
    overrides = ([literal_override("zoo", Path(args.zoo).resolve())] if args.zoo else []) + args.overrides
    merge_args = ["jobs/merge.py"] + (["--restart"] if args.restart else []) + (["--verbose"] if args.verbose else [])
    for override in overrides:
        merge_args += ["--set", override]
    from dmm_ray.config import check_before_zoo_build, is_zoo_preset

    zoo = check_before_zoo_build(DEFAULT_CONFIG, overrides)  # a typo in --set: said now, not after the zoo's build (minutes)
    # the zoo the merge reads: a preset (toy.yaml's `zoo: full`, a --set zoo=micro) or --zoo's folder. The build step
    # built the full zoo whatever --set zoo= said: minutes for nothing before a micro zoo or a folder of the user's,
    # which is read as it is (the merge says how to build one that is missing; build_zoo.py refuses a folder it did not build)
    if zoo is not None and is_zoo_preset(zoo):
        build = ["--size", zoo]
    elif args.zoo and zoo is not None and Path(args.zoo).resolve() == Path(zoo):
        build = ["--out", args.zoo]
    else:
        build = None
    try:
        if build is not None:
            run("jobs/build_zoo.py", *build)
        run(*merge_args)
    except StepFailed as failed:  # the step printed its own error: no traceback of this driver on top
        print(f"demo: {failed}", file=sys.stderr)
        return failed.code

    from dmm_ray.config import load_config
    from dmm_ray.merge import locations

    where = locations(load_config(DEFAULT_CONFIG, overrides))
    print("\nDemo finished.")
    print(f"  merged model:   {where['merged model']}   (DMMPipeline.from_pretrained / serve run serve.app)")
    from dmm_ray.data.fs import location_join

    # (Path() of an output_dir URI printed s3:/bucket/x/evaluation; at a URI the merge uploads it to <output_dir>/evaluation)
    print(f"  evaluation:     {location_join(where['output_dir'], 'evaluation')}   (FID matrices, heatmaps, style x prompt grid)")
    print(f"  MLflow store:   {where['MLflow store']}   (mlflow ui --backend-store-uri {where['MLflow store']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
