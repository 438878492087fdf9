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

import glob
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


def _guard(model) -> Optional[tuple[str, str, str]]:
    """(the lock beside it, what the folder is, the kind of job that replaces it) of a model folder a job's save
    replaces: a merge's `<output_dir>/merged`, a few-step `<folder>/model`; None for any other folder, and for a
    location that is no local folder (a URI, `models:/`, `runs:/`: read as a downloaded copy)."""
    from dmm_ray.paths import is_mlflow_uri, is_staging_dir

    if is_mlflow_uri(str(model)):
        return None
    model = Path(model).resolve()
    # a merge into an output_dir URI keeps its model and merge.lock in its local staging folder: naming that folder its
    # output_dir sent the reader looking for a merge into a local folder no config names
    of = f"a merge into an output_dir URI (its local staging folder {model.parent})" if is_staging_dir(model.parent) else f"output_dir {model.parent}"
    guards = {  # folder name -> (its job's lock beside it, what the folder is, the kind of job that replaces it)
        "merged": (LOCK_NAME, f"the merged model of {of}", "merge"),
        "model": (FAST_LOCK, f"the few-step model of the few-step folder {model.parent}", "few-step job"),
    }
    return guards.get(model.name)


def check_not_being_replaced(model: Path, flag: str = "--model") -> None:
    """For a job that reads a model folder another job may be replacing (jobs/fast.py, jobs/evaluate.py,
    jobs/export.py, Serve's model backend, an incremental merge's base_merged): raise OutputDirBusyError naming the owner while a running job (or one
    on another host) holds the folder's lock. A merge's merged model (`<output_dir>/merged`): that output_dir's
    merge.lock, which a merge holds from before Ray starts, and its save replaces the folder (and an incremental
    merge into its own output_dir replaces its own previous model). A few-step model (`<few-step folder>/model`):
    that folder's fast.lock, which jobs/fast.py or a merge's few-step stage holds while its save replaces it. A
    job reading the folder then could read half of one model and half of the other. Refused rather than taken:
    the lock is exclusive, and holding it to read would refuse every other reader and need write access to the
    job's folder. A stale lock (its owner gone from this host), a merge.lock that an evaluation holds (it only
    reads the model, and keeps merges out while it does) and a folder of another name are no obstacle, and so is
    a location that is no local folder (a URI, `models:/`, `runs:/`: read as a downloaded copy)."""
    guard = _guard(model)
    if guard is None:
        return
    model = Path(model).resolve()
    name, what, replacer = guard
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


# A reader loading a model folder that a save is about to replace (`reading`), and the save waiting for it (`replacing`).
# The lock above is read at a job's start; a reader that began before a merge started loads on while that merge runs,
# and the save's two renames (merged_model.swap_in) in the middle of its load gave it half of each model, silently.
# Each side first writes its own marker beside the folder and then looks for the other's: whichever looks second sees
# the first, so either the save waits for the reader's load or the reader waits for the swap to be done.
READING = "reading"  # `.<folder>.reading-<pid>-<token>`: {"host", "pid", "started", "job"} of a reader while it loads
REPLACING = "replacing"  # `.<folder>.replacing`: the saver's record while it waits for readers and swaps
REPLACE_WAIT_S = 600.0  # how long a save waits for the loads under way (an SD model loads in well under a minute)
_POLL_S = 0.1
_SAY_EVERY_S = 10.0


class ModelReplacedError(OutputDirBusyError):
    """A save replaced the model folder while this process was loading it."""


def _marker(model: Path, kind: str) -> Path:
    return model.with_name(f".{model.name}.{kind}")


def _identity(model: Path) -> Optional[tuple[int, int]]:
    try:
        st = os.stat(model)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _live(owner: Optional[dict]) -> bool:
    """A marker's owner still at work: a running process on this host, or any on another (it cannot be checked)."""
    return bool(owner) and (owner.get("host") != socket.gethostname() or owner_alive(owner))


@contextmanager
def reading(model, job: str = "reader") -> Iterator[None]:
    """`with reading(folder):` load a model folder another job's save may replace (`_guard`: a merge's
    `<output_dir>/merged`, a few-step `<folder>/model`; any other folder or a URI: nothing to do). While the block
    runs a marker names this process beside the folder, and a save waits for it before it swaps (`replacing`); a
    save already swapping is waited for first (up to REPLACE_WAIT_S). Only for a load: a Serve replica serving its
    loaded model holds none. A folder replaced during the block anyway (a reader that could not write its marker,
    a rename by hand or by an older version) raises ModelReplacedError, from whatever the load raised."""
    if _guard(model) is None:
        yield
        return
    model = Path(model).resolve()
    me = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time(), "job": job}
    mine = _marker(model, f"{READING}-{os.getpid()}-{os.urandom(4).hex()}")
    deadline = time.time() + REPLACE_WAIT_S + 60  # the save's own wait, then its swap
    while True:
        try:
            made = _create(mine, me)
        except OSError:  # a folder this process cannot write: loaded unannounced (a swap meanwhile is still caught below)
            made = False
        saver = read_owner(_marker(model, REPLACING))
        if not _live(saver):  # none, a dead one's, or one still being written (its save then looks for `mine` after)
            break
        if made:  # (only what it made: on a read-only mount even unlink(missing_ok=True) raises EROFS)
            mine.unlink(missing_ok=True)  # out of its way: it swaps once the loads it waits for are done
        if time.time() > deadline:
            raise OutputDirBusyError(
                f"{model} is being replaced by a save ({describe(saver)}; marker {_marker(model, REPLACING)}), which has not "
                f"finished in {REPLACE_WAIT_S + 60:.0f} s. Run this again once it is done; if that job is no longer running, "
                f"delete {_marker(model, REPLACING)}."
            )
        time.sleep(_POLL_S)
    before = _identity(model)
    try:
        yield
    except Exception as error:
        if _identity(model) != before:  # a missing file half-way, or worse: say why
            raise ModelReplacedError(_replaced(model)) from error
        raise
    else:
        if _identity(model) != before:
            raise ModelReplacedError(_replaced(model))
    finally:
        if made:  # a folder it could not write (a read-only mount: EROFS even for a missing file) has none to remove
            mine.unlink(missing_ok=True)


def _replaced(model: Path) -> str:
    return (
        f"{model} was replaced (a new model saved in its place) while this job was loading it, so what it read may mix "
        "the two models; nothing was used. Run it again: it loads the new model."
    )


@contextmanager
def replacing(model, say=print) -> Iterator[None]:
    """`with replacing(folder):` swap a new model in place of `folder` (merged_model.staged). First waits, up to
    REPLACE_WAIT_S and saying whom it waits for, until no running process is loading it (`reading`); markers of
    processes gone from this host are removed. Raises OutputDirBusyError when the wait ends first: nothing is
    swapped, `folder` stays the previous model. The caller holds the folder's lock (one save at a time)."""
    model = Path(model).resolve()
    flag = _marker(model, REPLACING)
    flag.unlink(missing_ok=True)  # a killed save's
    _create(flag, {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time(), "job": "save"})
    try:
        started, said = time.time(), 0.0
        while True:
            readers = []
            for path in model.parent.glob(f"{glob.escape(_marker(model, READING).name)}-*"):
                owner = read_owner(path)
                if owner == {} and time.time() - _mtime(path) < 5:
                    owner = {"host": "?", "pid": "?", "job": "reader"}  # being written right now: a live one
                if _live(owner):
                    readers.append((path, owner))
                elif owner is not None:
                    path.unlink(missing_ok=True)  # its reader was killed mid-load
            if not readers:
                break
            waited = time.time() - started
            names = "; ".join(f"{holder_kind(o, 'reader')} ({describe(o)}; marker {p})" for p, o in readers)
            if waited > REPLACE_WAIT_S:
                raise OutputDirBusyError(
                    f"{model} was not replaced: still being loaded after {REPLACE_WAIT_S:.0f} s by {names}. Nothing is lost: "
                    f"{model} is the previous model, and the state the new one was made from is kept; run this job "
                    "again once that load is done (it resumes from that state). If that reader is no longer running, "
                    "delete its marker first."
                )
            if waited >= said:
                say(f"waiting for {names} to finish loading {model} before replacing it (up to {REPLACE_WAIT_S:.0f} s)")
                said = waited + _SAY_EVERY_S
            time.sleep(_POLL_S)
        yield
    finally:
        flag.unlink(missing_ok=True)


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0
