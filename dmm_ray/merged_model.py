"""A merged model's folder on disk: the records written beside the diffusers pipeline, and the
two-rename save that never replaces the last good model with a broken one.

    merged/               DMMPipeline (save_pretrained)
      dmm_merge.json      MERGE_RECORD: name, styles, teachers (codebook order), MLflow run
      styles.json         STYLES_RECORD: [{name, description}] for Serve's /styles
    merged.tmp/           a save in progress (removed when the save fails; a killed one's by the next merge)
    merged.old/           the previous model, parked between the two renames of `swap_in`
    .merged.reading-*     a process loading `merged` (output_lock.reading), which `staged` waits for before it swaps
    .merged.replacing     `staged` waiting for those loads and swapping (output_lock.replacing)

Used by the merge (dmm_ray/merge.py) and the few-step stage (dmm_ray/fast/job.py).
"""

from __future__ import annotations

import contextlib
import glob
import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Iterator, Sequence

MERGE_RECORD = "dmm_merge.json"  # teachers per style (for incremental evaluation), written beside the pipeline
STYLES_RECORD = "styles.json"  # [{name, description}] for Serve's /styles


def read_record(model_dir: str | Path) -> dict:
    """The folder's dmm_merge.json ({} when it has none)."""
    path = Path(model_dir) / MERGE_RECORD
    return json.loads(path.read_text()) if path.is_file() else {}


def recorded_teachers(merged_dir: str | Path) -> list | None:
    """The teacher specs a merged model's record lists, in codebook order; None without a record, or
    when the record does not name one teacher per style of the model (an incremental merge from a
    previous model without a record knows only its new styles' teachers)."""
    from dmm_ray.teachers import TeacherSpec

    if not (Path(merged_dir) / MERGE_RECORD).is_file():
        return None
    teachers = [TeacherSpec.from_record(t) for t in read_record(merged_dir).get("teachers") or []]
    return teachers if [t.name for t in teachers] == model_styles(merged_dir) else None


def all_teachers(cfg, missing_ok: bool = False) -> list:
    """`cfg`: a MergeConfig. Teacher specs of every style of its merged model, in codebook order (old styles
    first); the evaluation of a merge config (evaluation.sources.merged_teachers) reads them here too. A merge
    reads them once, before any stage (MergeRun.teachers): an incremental merge's previous model may be
    the very folder its save replaces (base_merged = <output_dir>/merged). `missing_ok`: a previous
    model without a record (made elsewhere) gives the new teachers alone; else FileNotFoundError."""
    if not cfg.incremental.base_merged:
        return list(cfg.teachers)
    old = recorded_teachers(cfg.incremental.base_merged)
    if old is None and missing_ok:
        return list(cfg.teachers)
    if old is None:
        record = Path(cfg.incremental.base_merged) / MERGE_RECORD
        raise FileNotFoundError(
            (f"{record} is missing" if not record.is_file() else f"{record} does not name a teacher for each of the model's styles")
            + ": the previous merged model does not list its teachers, so old styles cannot be evaluated"
        )
    return old + list(cfg.teachers)


def model_styles(merged_dir: str | Path) -> list[str] | None:
    """The style names in the model's unet/config.json (None without one)."""
    config = Path(merged_dir) / "unet" / "config.json"
    return list(json.loads(config.read_text()).get("style_names") or []) if config.is_file() else None


def style_descriptions(model_dir: str | Path) -> dict[str, str]:
    """{name: description} of a model folder's styles.json ([{name, description}] or {name: description};
    {} without a readable one)."""
    try:
        data = json.loads((Path(model_dir) / STYLES_RECORD).read_text())
    except (OSError, ValueError):
        return {}
    if isinstance(data, list):
        data = {d.get("name"): d.get("description") for d in data if isinstance(d, dict)}
    return {str(k): str(v) for k, v in data.items() if v} if isinstance(data, dict) else {}


def save_siblings(dest: Path, tag: str | None = None) -> tuple[Path, Path]:
    """(`merged.tmp`, `merged.old`): where a save writes the new model and parks the previous one.
    `tag`: hidden names only that kind of save uses (`.wm.weighted-merge.tmp`), for a folder the user
    names, beside which a `wm.tmp` of theirs may exist."""
    if tag:
        return dest.with_name(f".{dest.name}.{tag}.tmp"), dest.with_name(f".{dest.name}.{tag}.old")
    return dest.with_name(dest.name + ".tmp"), dest.with_name(dest.name + ".old")


def remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def swap_in(tmp: Path, dest: Path, tag: str | None = None) -> None:
    """dest -> dest.old, tmp -> dest, drop dest.old. A crash between the two renames leaves no `dest`
    but a complete `dest.old`, which `recover` (at the start of every merge) renames back."""
    _, old = save_siblings(dest, tag)
    if dest.exists():
        if old.exists():
            remove(old)
        os.replace(dest, old)
    try:
        os.replace(tmp, dest)
    except BaseException:  # the second rename failed (or a Ctrl-C between them): the earlier one back now
        if old.exists() and not dest.exists():
            os.replace(old, dest)
        raise
    if old.exists():
        remove(old)


@contextlib.contextmanager
def staged(dest: Path, tag: str | None = None) -> Iterator[Path]:
    """An empty `merged.tmp` (`save_siblings`) for the block to write the new model into, swapped in
    (`swap_in`) when the block ends without error, once no process is loading `dest` (`output_lock.replacing`:
    a reader that started before this job half-way through its load would read half of each model). An error or
    Ctrl-C in the block, or in the swap (or that wait running out), removes it: `dest` stays the last good model and
    nothing half-written is left beside it (before, a save that failed part-way left its `merged.tmp` until the
    next merge's `recover`)."""
    from dmm_ray.output_lock import replacing

    tmp, _ = save_siblings(dest, tag)
    remove(tmp)  # one a killed save left behind
    tmp.mkdir(parents=True)
    try:
        yield tmp
        with replacing(dest):
            swap_in(tmp, dest, tag)
    except BaseException:
        remove(tmp)
        raise


def recover(dest: Path, tag: str | None = None, marker: str | None = None, dry_run: bool = False) -> list[str]:
    """Undo a save that was interrupted (see `swap_in`): `merged` missing but `merged.old` there (with
    `marker`, a file a complete model holds) -> rename it back; then remove leftover `merged.tmp` /
    `merged.old`. Returns what it did. Call only while no save of `dest` can be under way (the merge:
    holding output_dir's lock). `dry_run` (a job's --dry-run): change nothing, return what a run would do."""
    tmp, old = save_siblings(dest, tag)
    done = []
    restore = not dest.exists() and old.is_dir() and (marker is None or (old / marker).is_file())
    if restore:
        if not dry_run:
            os.replace(old, dest)
        done.append(
            f"{'a run would first restore' if dry_run else 'restored'} {dest} from {old.name} (a save was interrupted between its two renames)"
        )
    for stale in (tmp,) if restore else (tmp, old):  # (restored: `old` is `dest` now)
        if stale.exists() or stale.is_symlink():
            if not dry_run:
                remove(stale)
            done.append(f"{'a run would first remove' if dry_run else 'removed'} {stale} left behind by an interrupted save")
    return done


def recover_killed(dest: Path, prefix: str, marker: str | None = None) -> list[str]:
    """`recover` for the saves of `dest` tagged `<prefix>-<pid>` (`.<dest>.<prefix>-<pid>.tmp` / `.old`)
    that a killed process left (`output_lock.left_by_killed`: its pid no longer runs here, written before
    this process started): a save killed between its two renames left the previous `dest` only as its
    `.old`, under a pid no later save uses, so `recover` with the later save's own tag never finds it.
    A running save's siblings are left alone."""
    from dmm_ray.output_lock import left_by_killed

    pattern = rf"\.{re.escape(dest.name)}\.{re.escape(prefix)}-(\d+)\.(?:tmp|old)"
    left = left_by_killed(dest.parent, f".{glob.escape(dest.name)}.{prefix}-*", pattern)
    done = []
    for pid in sorted({int(re.fullmatch(pattern, sibling.name)[1]) for sibling in left}):
        done += recover(dest, f"{prefix}-{pid}", marker)
    return done


ENTRIES_PREFIX = ".dmm-save-"  # `move_in`'s hidden folders inside the saved folder: .dmm-save-<pid>.tmp / .old


def entries_staging(dest: Path) -> Path:
    """Where a save into the folder `dest` stages its files before `move_in`: `.dmm-save-<pid>.tmp` inside it
    (not made yet; a leftover of this pid's removed), after putting back what a killed save left
    (`recover_killed_entries`)."""
    recover_killed_entries(dest)
    staging = dest / f"{ENTRIES_PREFIX}{os.getpid()}.tmp"
    remove(staging)
    return staging


def move_in(staging: Path, dest: Path, drop: Sequence[str] = ()) -> None:
    """Each entry of `staging` (a complete save) in place of `dest`'s entry of that name, and `drop` (the earlier
    save's records this one has none of) out: the earlier entries are parked in `.dmm-save-<pid>.old` first and
    removed once all are in; an error or Ctrl-C part-way puts every one back. A kill part-way leaves them
    parked: the next save into `dest` puts them back (`recover_killed_entries`)."""
    parked = staging.with_suffix(".old")
    remove(parked)
    parked.mkdir()
    moved = []  # (name, whether `dest` had an entry of that name), noted before the renames
    try:
        # model_index.json last: a reader that finds the new one finds the new components beside it
        for name in [*sorted((p.name for p in staging.iterdir()), key=lambda n: (n == "model_index.json", n)), *drop]:
            target = dest / name
            moved.append((name, _present(target)))
            if moved[-1][1]:
                os.replace(target, parked / name)
            if _present(staging / name):
                os.replace(staging / name, target)
    except BaseException:
        for name, had in reversed(moved):
            if had and not _present(parked / name):
                continue  # interrupted before it was parked: still in place
            if _present(dest / name):
                remove(dest / name)  # the new entry
            if had:
                os.replace(parked / name, dest / name)
        remove(parked)
        raise
    remove(parked)


def _present(path: Path) -> bool:
    return path.exists() or path.is_symlink()


def recover_killed_entries(dest: Path) -> None:
    """What a save into `dest` killed part-way left (`output_lock.left_by_killed`: its pid no longer runs here,
    written before this process started): its staging folder goes, and the earlier entries it had parked go back
    in place of the new ones it had moved in (`move_in`), so the folder is the earlier save again before this one."""
    from dmm_ray.output_lock import left_by_killed

    for left in left_by_killed(dest, f"{ENTRIES_PREFIX}*", rf"{re.escape(ENTRIES_PREFIX)}(\d+)\.(?:tmp|old)"):
        if left.suffix == ".old" and left.is_dir():
            for entry in left.iterdir():
                if _present(dest / entry.name):
                    remove(dest / entry.name)
                os.replace(entry, dest / entry.name)
            logging.getLogger(__name__).warning("%s: put back the earlier save's %s, parked by a save that was killed part-way", dest, left.name)
        remove(left)


# What a saved model's record (MERGE_RECORD) says of the run that saved it: a re-run killed after the save finds its
# model by them (dmm_ray.merge.saved_by_this_training, dmm_ray.fast.job.saved_by_this_training)
SAVED_BY = "merge_request_sha256"  # `saved_model_request` of the job that saved it (the merge's, the few-step stage's)
TRAINED_BY = "training_run"  # fingerprint.TRAINING_RUN (FAST_TRAINING_RUN) of the training state it was saved from


def saved_from(model: Path, saved_by: str, trained_by: str | None, any_training: bool = False) -> bool:
    """The model folder `model` (a merged model; a few-step one too) is there and its record (MERGE_RECORD) names
    `saved_by` as `SAVED_BY` and `trained_by` as `TRAINED_BY`. A `trained_by` of None (no training state there: none
    has drawn its id) is no saved model's. `any_training`: `SAVED_BY` alone (an incremental merge into its own
    output_dir, whose save replaced what it trained from)."""
    if not (model / "model_index.json").is_file():
        return False
    record = read_record(model)
    if record.get(SAVED_BY) != saved_by:
        return False
    return any_training or (trained_by is not None and record.get(TRAINED_BY) == trained_by)


def request_sha256(request: dict) -> str:
    """sha256 of a job's request as a saved model records it (`SAVED_BY`): the merge's, the few-step stage's."""
    import hashlib

    return hashlib.sha256(json.dumps(request, sort_keys=True).encode()).hexdigest()


def request_without(request: dict, sections: tuple[str, ...]) -> dict:
    """A job's request (completion records' {"config": ...}) without the config's `sections`."""
    config = request.get("config")
    return {**request, "config": {k: v for k, v in config.items() if k not in sections} if isinstance(config, dict) else config}
