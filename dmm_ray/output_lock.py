"""One merge per `output_dir` at a time: a lock file beside the merge's state (and the same rule for
the few-step job's folder, `fast.lock`, and a weighted merge's `--out`, a hidden lock beside it).

`<output_dir>/merge.lock` holds {"host", "pid", "started", "job"} of the merge that owns the folder ("job": the
kind of job, so a refusal names it: a merge, or jobs/evaluate.py writing into the merge's evaluation folder;
a lock file written before it was recorded has none, and is read as the kind the reader expects). It is
created with O_CREAT | O_EXCL (atomic: of two merges starting together exactly one gets it) and
removed when the merge returns or raises. A second merge on the same folder refuses before Ray
starts, naming the owner. A lock left by a merge that died without cleaning up (SIGKILL, a crash,
a reboot) is recognised when its owner ran on this host and that process is gone (or the pid now
belongs to a process started after the lock): it is taken over with a warning. A lock from another
host cannot be checked from here and always refuses; the message says how to remove it.
"""

from __future__ import annotations

import json
import os
import socket
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

LOCK_NAME = "merge.lock"
FAST_LOCK = "fast.lock"  # one few-step job per folder (dmm_ray/fast/job.py); not merge.lock: fast.output_dir may be the merge's output_dir
_CLOCK_SLACK_S = 2.0  # process start times from the OS are coarse (boot time in whole seconds)


class OutputDirBusyError(RuntimeError):
    """Another merge (alive, or on another host) holds `output_dir`."""


def lock_path(out: Path, name: str = LOCK_NAME) -> Path:
    return Path(out) / name


def read_owner(path: Path) -> Optional[dict]:
    """The lock's {"host", "pid", "started"}, or None if there is none; unreadable content -> {}."""
    try:
        owner = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}
    return owner if isinstance(owner, dict) else {}


def _process_start(pid: int) -> Optional[float]:
    try:
        import psutil

        return psutil.Process(pid).create_time()
    except Exception:  # no psutil, no such process, access denied: the caller decides by os.kill alone
        return None


def owner_alive(owner: dict) -> bool:
    """Is the lock's owner a running process on this host? (Only meaningful for this host's locks.)"""
    pid = owner.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        pass
    started, locked = _process_start(pid), owner.get("started")
    if started is not None and isinstance(locked, (int, float)) and started > locked + _CLOCK_SLACK_S:
        return False  # the pid was reused by a process that started after the lock (e.g. after a reboot)
    return True


def left_by_killed(folder: Path, glob: str, pattern: str) -> list[Path]:
    """The entries of `folder` matching `glob` whose name's `pattern` (its first group a pid) names a
    process that no longer runs on this host, last changed before this process started: what a killed
    run (SIGKILL, OOM) left behind under a name of its own, which nothing else removes. The age keeps a
    file another host's live process is writing now, in a folder the nodes share under a pid free here."""
    import re

    started = _process_start(os.getpid())
    found = []
    for entry in folder.glob(glob) if folder.is_dir() else ():
        match = re.fullmatch(pattern, entry.name)
        if not match or int(match[1]) == os.getpid() or owner_alive({"pid": int(match[1])}):
            continue
        try:
            if started is None or entry.lstat().st_mtime < started:
                found.append(entry)
        except OSError:  # gone meanwhile
            pass
    return found


def describe(owner: dict) -> str:
    when = owner.get("started")
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(when)) if isinstance(when, (int, float)) else "?"
    return f"host {owner.get('host', '?')}, pid {owner.get('pid', '?')}, started {since}"


def _create(path: Path, owner: dict) -> bool:
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(owner))
    return True


def acquire(
    out: Path,
    warn=print,
    name: str = LOCK_NAME,
    job: str = "merge",
    what: str | None = None,
    fix: str = "--set output_dir=NEW_DIR",
    holder: str | None = None,
) -> dict:
    """Take `out`'s lock (the file `name` in it) or raise OutputDirBusyError naming its owner. `job` names the
    kind of job taking it (recorded in the lock, so another job's refusal names it), `what` the folder it guards
    (default "output_dir <out>") and `fix` the way to write elsewhere; `holder` the kind of job a lock file
    without its kind is taken to be (default `job`). Returns the owner record written."""
    path = lock_path(out, name)
    what = what or f"output_dir {out}"
    path.parent.mkdir(parents=True, exist_ok=True)
    me = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time(), "job": job}
    for _ in range(3):  # a stale lock taken over, then a race with another merge taking it over too
        if _create(path, me):
            return me
        owner = read_owner(path)
        if owner is None:
            continue  # released between our two looks
        busy = _busy(path, owner, job, what, fix, holder)
        if busy is not None:
            raise busy
        warn(f"warning: taking over the stale lock {path} of {_a(holder_kind(owner, holder or job))} that is no longer running ({describe(owner)})")
        try:
            path.unlink()
        except FileNotFoundError:
            pass
    raise OutputDirBusyError(f"could not take the lock {path}: other jobs keep taking it; run one {job} at a time on {what}")


def holder_kind(owner: dict, expected: str) -> str:
    """The kind of job the lock record says holds it ("merge", "evaluation", "few-step job", ...); `expected`
    for a lock file written before the kind was recorded (or unreadable): what the reader took it to be."""
    kind = owner.get("job")
    return kind if isinstance(kind, str) and kind else expected


def _a(kind: str) -> str:
    return f"{'an' if kind[:1].lower() in 'aeiou' else 'a'} {kind}"


def _busy(path: Path, owner: dict, job: str, what: str, fix: str, holder: str | None = None) -> Optional[OutputDirBusyError]:
    """The refusal of a lock at `path` that `owner` holds, or None when it is stale (its owner ran on this
    host and is gone): `acquire` raises it, and `check` says it for a --dry-run. `job`: the kind of job refused
    (it would write elsewhere with `fix`); the holder is named by the kind its record gives, else `holder`
    (default `job`: one merge refusing another)."""
    kind = holder_kind(owner, holder or job)
    by = f"another {kind}" if kind == job else _a(kind)  # an evaluation refused by a merge is not refused by "another evaluation"
    if owner.get("host") != socket.gethostname():
        return OutputDirBusyError(
            f"{what} is in use by {by} ({describe(owner)}; lock file {path}). "
            f"Wait for it to finish, or write this {job} elsewhere ({fix}). "
            f"If that {kind} is no longer running, delete {path} and run again."
        )
    if owner_alive(owner):
        return OutputDirBusyError(
            f"{what} is in use by {by} ({describe(owner)}; lock file {path}). "
            f"Wait for it to finish (or stop it: kill {owner.get('pid')}), or write this {job} elsewhere ({fix})."
        )
    return None


def check(
    out: Path, name: str = LOCK_NAME, job: str = "merge", what: str | None = None, fix: str = "--set output_dir=NEW_DIR", holder: str | None = None
) -> Optional[str]:
    """What `acquire` would do, taking nothing and writing nothing (a job's --dry-run): raise the
    OutputDirBusyError it would raise (a running job, or one on another host, holds the lock); return
    the line it would warn with when it would take over a stale lock; None when the folder is free.
    `holder`: the kind of job a lock without a recorded kind is taken to be (default `job`), for a job that
    reads another kind's lock (a merge reading its few-step folder's fast.lock)."""
    path = lock_path(out, name)
    owner = read_owner(path)
    if owner is None:
        return None
    busy = _busy(path, owner, job, what or f"output_dir {out}", fix, holder)
    if busy is not None:
        raise busy
    return f"a run would take over the stale lock {path} of {_a(holder_kind(owner, holder or job))} that is no longer running ({describe(owner)})"


def release(out: Path, owner: dict, name: str = LOCK_NAME) -> None:
    """Remove `out`'s lock if it is still `owner`'s (never another job's)."""
    path = lock_path(out, name)
    current = read_owner(path)
    if current and current.get("pid") == owner["pid"] and current.get("host") == owner["host"] and current.get("started") == owner["started"]:
        path.unlink(missing_ok=True)


@contextmanager
def hold(out: Path, warn=print, name: str = LOCK_NAME, **options) -> Iterator[dict]:
    """`with hold(out):` the job's body; the lock is released when it returns or raises (`options`: acquire's
    job, what, fix, holder)."""
    owner = acquire(out, warn, name, **options)
    try:
        yield owner
    finally:
        release(out, owner, name)


EVALUATION = "evaluation"  # jobs/evaluate.py holding a merge's merge.lock to write into its evaluation folder: it reads the model, never replaces it


def check_not_being_replaced(model: Path, flag: str = "--model") -> None:
    """For a job that reads a model folder another job may be replacing (jobs/fast.py, jobs/evaluate.py,
    jobs/export.py, Serve's model backend): raise OutputDirBusyError naming the owner while a running job (or one
    on another host) holds the folder's lock. A merge's merged model (`<output_dir>/merged`): that output_dir's
    merge.lock, which a merge holds from before Ray starts, and its save replaces the folder (and an incremental
    merge into its own output_dir replaces its own previous model). A few-step model (`<few-step folder>/model`):
    that folder's fast.lock, which jobs/fast.py or a merge's few-step stage holds while its save replaces it. A
    job reading the folder then could read half of one model and half of the other. Refused rather than taken:
    the lock is exclusive, and holding it to read would refuse every other reader and need write access to the
    job's folder. A stale lock (its owner gone from this host), a merge.lock that an evaluation holds (it only
    reads the model, and keeps merges out while it does) and a folder of another name are no obstacle, and so is
    a location that is no local folder (a URI, `models:/`, `runs:/`: read as a downloaded copy)."""
    from dmm_ray.paths import is_mlflow_uri

    if is_mlflow_uri(str(model)):
        return
    model = Path(model).resolve()
    guards = {  # folder name -> (its job's lock beside it, what the folder is, the kind of job that replaces it)
        "merged": (LOCK_NAME, f"the merged model of output_dir {model.parent}", "merge"),
        "model": (FAST_LOCK, f"the few-step model of the few-step folder {model.parent}", "few-step job"),
    }
    if model.name not in guards:
        return
    name, what, replacer = guards[model.name]
    path = lock_path(model.parent, name)
    owner = read_owner(path)
    if owner is None:
        return
    kind = holder_kind(owner, "job")  # a lock file without its kind: a merge's, or an evaluation's before they were told apart
    if kind == EVALUATION:
        return
    here = owner.get("host") == socket.gethostname()
    if here and not owner_alive(owner):
        return
    raise OutputDirBusyError(
        f"{flag} {model} is {what}, whose {name} {_a('running ' + kind)} holds "
        f"({describe(owner)}; lock file {path}): a {replacer} there replaces that folder when it saves, and this job "
        "could read it half-way. Wait for it to finish"
        + (f" (or stop it: kill {owner.get('pid')})" if here else f" (if it is no longer running, delete {path})")
        + f", or give {flag} a copy of the model made while no {replacer} runs there."
    )
