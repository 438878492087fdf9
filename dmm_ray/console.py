"""What the jobs print: one timestamped line per event, `[dmm-<job> HH:MM:SS] message`."""

from __future__ import annotations

import contextlib
import functools
import os
import sys
import time
from pathlib import Path

from dmm_ray.output_lock import OutputDirBusyError


def say(job: str, msg: str) -> None:
    print(f"[dmm-{job} {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def int_list(text: str) -> list[int]:
    """argparse `type=` for a comma-separated list of positive integers (`--steps 2,4,8`): a bad entry is
    a usage error naming it, not a ValueError traceback."""
    import argparse

    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, e.g. 2,4,8; got {text!r}")
    return values


def positive_int(text: str) -> int:
    """argparse `type=` for a count that must be at least 1 (`--repeats 5`): 0 timed runs left a median of
    nothing, a StatisticsError traceback after the models were built and warmed up."""
    import argparse

    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, e.g. 5; got {text!r}")
    return value


def non_negative_int(text: str) -> int:
    """argparse `type=` for a value that may be 0 but not below (a seed: `--seed-a 0`): the models that
    take it refuse a negative one in pydantic's several-line validation dump, naming the field, not the option."""
    import argparse

    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer of 0 or more, e.g. 0; got {text!r}")
    return value


def _float_at_least(text: str, low: float, above: bool, high: float | None, expected: str) -> float:
    """A finite number from `low` (`above`: excluded) up to `high` (or no limit), else a usage error saying `expected`."""
    import argparse
    import math

    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < low or (above and value == low) or (high is not None and value > high):
        raise argparse.ArgumentTypeError(f"expected {expected}; got {text!r}")
    return value


def positive_float(text: str) -> float:
    """argparse `type=` for a length or rate above 0 (`--overload-s 10`)."""
    return _float_at_least(text, 0.0, True, None, "a number above 0, e.g. 10")


def non_negative_float(text: str) -> float:
    """argparse `type=` for a factor where 0 means "none" (`--overload 0`), never below."""
    return _float_at_least(text, 0.0, False, None, "a number of 0 or more, e.g. 10 (0: none)")


def fraction(text: str) -> float:
    """argparse `type=` for a share between 0 and 1 (`--malformed 0.1`)."""
    return _float_at_least(text, 0.0, False, 1.0, "a share between 0 and 1, e.g. 0.1")


def int_list_or_none(text: str) -> list[int]:
    """int_list, where an empty value means "none" (`--lora-ks ''` skips those runs) instead of an error."""
    return int_list(text) if text.strip() else []


def add_verbose_argument(parser) -> None:
    parser.add_argument(
        "--verbose",
        action="store_true",
        help="show everything: library notices, model-loading bars, Ray Train's INFO lines (also DMM_VERBOSE=1); "
        "by default they stay in Ray's log files or are dropped (dmm_ray/_quiet.py)",
    )


def refuse_empty(parser, args, *names: str) -> None:
    """`--out ""` and the like (an unset shell variable) would silently mean the default: refuse them."""
    for name in names:
        if getattr(args, name, None) is not None and not str(getattr(args, name)).strip():
            parser.error(f"--{name.replace('_', '-')} is empty; give a value or leave the option out")


def expand_path_args(args, *names: str) -> None:
    """`$DMM_HOME` and `~` expanded in these path options (dmm_ray.paths.expand, the rule of every path),
    also when the shell left them alone: quoted (`--model '$DMM_HOME/outputs/dmm-toy/merged'`) or after `=`."""
    from dmm_ray.paths import expand

    for name in names:
        value = getattr(args, name, None)
        if isinstance(value, str):
            setattr(args, name, expand(value))


def refuse_models_being_replaced(parser, args, *names: str) -> None:
    """A script without cli_main (a benchmark) reading the model folders of these options (dests): a usage error
    (exit 2) naming the job and lock file while a running job may be replacing one (a merge's <output_dir>/merged,
    a few-step <folder>/model: output_lock.check_not_being_replaced, the jobs' rule), else it would measure half of
    one model and half of the next. An option left unset is skipped."""
    from dmm_ray.output_lock import OutputDirBusyError, check_not_being_replaced

    for name in names:
        if getattr(args, name, None) is None:
            continue
        try:
            check_not_being_replaced(getattr(args, name), flag=f"--{name.replace('_', '-')}")
        except OutputDirBusyError as error:
            parser.error(str(error))


def refuse_uris(parser, args, **what: str) -> None:
    """Options (dests) that must name a local folder or file (`what`: "folder" or "path", as data.fs.require_local
    says it): a URI given to one is a usage error (exit 2) naming it, before any work. Path("s3://b/x") is the local
    s3:/b/x, so such a job wrote into a folder named `s3:` in the current one. Unset options and `none` are skipped."""
    from dmm_ray.data.fs import require_local

    for name, kind in what.items():
        value = getattr(args, name, None)
        if value is None or str(value).lower() == "none":
            continue
        try:
            require_local(f"--{name.replace('_', '-')}", value, what=kind)
        except ValueError as error:
            parser.error(str(error))


def given_options(parser, args, *names: str) -> list[str]:
    """The options among `names` (dests) that the command line set to other than their defaults, as
    written (`--registered-name`): for refusing options that only apply with another one."""
    return [f"--{n.replace('_', '-')}" for n in names if getattr(args, n) != parser.get_default(n)]


def set_verbosity(verbose: bool) -> None:
    """A job's driver: `--verbose` (or DMM_VERBOSE=1, which Ray workers inherit) keeps every notice;
    else the driver loads and registers models without per-file progress bars."""
    from dmm_ray import _quiet

    if verbose or os.environ.get("DMM_VERBOSE"):
        os.environ["DMM_VERBOSE"] = "1"
        _quiet.uninstall()
        return
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    _quiet.no_loading_bars()


class _SigtermAsInterrupt:
    """The process's one SIGTERM owner: the outermost `cli_main(interrupted=...)` arms it
    (`take`) and gives it back (`release`); `install` (re)places the handler while armed."""

    def __init__(self):
        self.armed = False  # a job's driver owns SIGTERM now
        self.received = False  # the interrupt came from a SIGTERM, not a Ctrl-C
        self.previous = None  # the handler before ours, restored on release

    def take(self) -> bool:
        """Arm for this job unless an outer job has (or off the main thread): True if this call owns it."""
        import threading

        owner = not self.armed and threading.current_thread() is threading.main_thread()
        self.armed = self.armed or owner
        return owner

    def install(self) -> None:
        import signal
        import threading

        if not self.armed or threading.current_thread() is not threading.main_thread():
            return

        def on_sigterm(signum, frame):
            self.received = True
            signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends the process at once
            handler = signal.getsignal(signal.SIGINT)
            if callable(handler):
                handler(signal.SIGINT, frame)
            else:
                raise KeyboardInterrupt

        if self.previous is None:
            self.previous = signal.getsignal(signal.SIGTERM)
        signal.signal(signal.SIGTERM, on_sigterm)

    def release(self) -> None:
        import signal

        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)
        self.armed, self.received, self.previous = False, False, None


_SIGTERM = _SigtermAsInterrupt()


def sigterm_as_interrupt() -> None:
    """In a job's driver (`cli_main` calls it first, `ray_session.ensure_ray` again right after
    `ray.init`, which installs Ray's own handler): SIGTERM (`ray job stop`, `kill`, a scheduler's
    preemption) is answered as a Ctrl-C is, through the SIGINT handler of the moment (during training
    Ray Train's, which aborts the run cleanly; else a KeyboardInterrupt), and the job exits 143 with its
    "terminated (SIGTERM)" line. Ray's driver handler printed a C++ stack dump and exited 130 in
    training, 1 elsewhere, or aborted (134); Python's default ends the process with no clean-up. A
    second SIGTERM ends the process at once. Only where `cli_main(interrupted=...)` armed it, in the
    main thread: never in a library user's process."""
    _SIGTERM.install()


@contextlib.contextmanager
def interrupt_note(text: str):
    """A step inside a job that keeps other things than the job does (the toy zoo's build inside a
    merge): a Ctrl-C or SIGTERM during the block prints `text` instead of the job's `interrupted` line."""
    try:
        yield
    except KeyboardInterrupt as stop:
        if not hasattr(stop, "dmm_note"):  # the innermost step's note wins
            stop.dmm_note = text
        raise


# the project's code: its package and the sibling folders of jobs and services (a checkout, or Ray's working-dir copy)
_PROJECT_DIRS = tuple(str(Path(__file__).resolve().parent.parent / name) + os.sep for name in ("dmm_ray", "serve", "jobs", "benchmarks"))


def _raised_by_project(error: BaseException) -> bool:
    """Whether the project's own code raised `error` (the innermost frame of its traceback): a plain
    ValueError there (`require_local`, an evaluation's `check_ready`) is a message written for the
    user, not another library's error that may be a bug and wants its traceback."""
    tb = error.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    return str(Path(tb.tb_frame.f_code.co_filename).resolve()).startswith(_PROJECT_DIRS)


def cli_main(main=None, *, interrupted: str | None = None):
    """A job's `main(argv) -> int`: a user error (a bad config, path, style, model or teacher: the
    project's errors are ValueErrors; missing or unwritable files are OSErrors; a busy output folder)
    prints one `error: ...` line and returns 2 instead of a traceback. DMM_VERBOSE=1 (or a job's
    `--verbose`) keeps the traceback, for a bug report. `interrupted`: a Ctrl-C prints this line
    (what was kept, how to resume) and returns 130; a SIGTERM the same way, returning 143
    (`sigterm_as_interrupt`). `@cli_main` or `@cli_main(interrupted=...)`."""
    if main is None:
        return functools.partial(cli_main, interrupted=interrupted)

    @functools.wraps(main)
    def wrapper(argv=None) -> int:
        # the outermost job arms it (a job's main called inside another's leaves it to that one)
        owner = interrupted is not None and _SIGTERM.take()
        try:
            sigterm_as_interrupt()  # from the start; a job that starts Ray installs it again after ray.init
            return main(argv)
        except (ValueError, OSError, OutputDirBusyError) as error:
            if os.environ.get("DMM_VERBOSE"):
                raise
            message = str(error).strip() or type(error).__name__
            # the project's own errors and missing files say all there is; another library's may be a bug
            ours = type(error).__module__.startswith("dmm_ray") or isinstance(error, OSError) or _raised_by_project(error)
            print(f"error: {message}" + ("" if ours else "\n(the traceback: DMM_VERBOSE=1)"), file=sys.stderr)
            return 2
        except KeyboardInterrupt as stop:
            if interrupted is None:
                raise
            terminated = _SIGTERM.received
            note = getattr(stop, "dmm_note", interrupted)  # a step's own (interrupt_note), else the job's
            print(f"\n{'terminated (SIGTERM)' if terminated else 'interrupted'}: {note}", file=sys.stderr)
            return 143 if terminated else 130
        finally:
            if owner:
                _SIGTERM.release()

    return wrapper
