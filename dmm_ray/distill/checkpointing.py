"""Training-state checkpoints (student, discriminator head, both optimizers, EMA, step, data position,
every rank's random generator).

Written by rank 0 into a fresh temporary folder and handed to `ray.train.report`, which moves it to
storage: a failed save never replaces the last good checkpoint.

Every checkpoint folder is sealed (`seal`): a manifest of its step and every file's size, so a
folder in storage can be told complete from a copy cut off. A resume (`resume_checkpoint`) takes
Ray Train's checkpoint, or a newer sealed one in the run's storage folder: Ray Train's record of its
checkpoints (the controller's snapshot) is written after the worker's upload, so a Ctrl-C or a
killed driver between the two left the newest checkpoints on disk but unrecorded, and a re-run
resumed steps earlier (or from step 0 when nothing was recorded yet). `prune_unrecorded` removes
such folders once a stage has finished.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import torch

STATE = "train_state.pt"
STUDENT_DIR = "student"
MANIFEST = "dmm_checkpoint.json"  # {"step": int, "files": {relative path: bytes}}, written last
CHECKPOINT_PREFIX = "checkpoint_"  # Ray Train's checkpoint folder names in a run's storage folder


def save_training_state(
    folder: Path, *, student, discriminator, opt_student, opt_disc, ema, step: int, epoch: int, batches_in_epoch: int, extra: dict | None = None
) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    student.save_pretrained(folder / STUDENT_DIR)  # safetensors + config (style names)
    state = {
        "step": step,
        "epoch": epoch,
        "batches_in_epoch": batches_in_epoch,
        "opt_student": opt_student.state_dict(),
        "disc_head": discriminator.head.state_dict() if discriminator is not None else None,
        "opt_disc": opt_disc.state_dict() if opt_disc is not None else None,
        "ema": ema.state_dict() if ema is not None else None,
        **(extra or {}),
    }
    torch.save(state, folder / STATE)
    seal(folder, step)
    return folder


def generator_states(rng: torch.Generator, device) -> list[torch.Tensor]:
    """Every rank's `rng` state, in rank order (a collective: every rank calls it; one all-gather of a
    few KB on `device` with several workers). Read, not drawn from: the generators go on unchanged."""
    import torch.distributed as dist

    state = rng.get_state()
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return [state]
    gathered = [torch.empty_like(state, device=device) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, state.to(device))
    return [s.cpu() for s in gathered]


def load_training_state(folder: Path) -> dict:
    # weights_only: our own file, but never unpickle arbitrary objects
    return torch.load(Path(folder) / STATE, map_location="cpu", weights_only=True)


def report(metrics: dict, folder: Path | None) -> None:
    """`ray.train.report` of a step's metrics and, from rank 0, its sealed checkpoint folder (a temp
    folder, removed once Ray Train has persisted it; storage keeps num_to_keep). Every rank calls it."""
    import ray.train

    ray.train.report(
        metrics,
        checkpoint=ray.train.Checkpoint.from_directory(str(folder)) if folder else None,
        delete_local_checkpoint_after_upload=True if folder else None,
    )


@contextlib.contextmanager
def temp_checkpoint_dir() -> Iterator[Path]:
    """A fresh temporary folder for rank 0 to write a checkpoint into and hand to `report` (Ray Train
    removes it once persisted). A write that fails or is interrupted removes it: before, the partial
    student and optimizer state stayed in the temp dir, one more per failed save (and Ray Train retry)."""
    folder = Path(tempfile.mkdtemp(prefix="dmm-ckpt-"))
    try:
        yield folder
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise


def seal(folder: Path, step: int) -> None:
    """Write the manifest of a finished checkpoint folder: its step and every file's size."""
    folder = Path(folder)
    files = {p.relative_to(folder).as_posix(): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file() and p.name != MANIFEST}
    (folder / MANIFEST).write_text(json.dumps({"step": step, "files": files}))


def sealed_step(fs, path: str) -> int | None:
    """The step of a complete checkpoint folder at `path` on pyarrow filesystem `fs`: its manifest
    reads and every file it lists is there at its size; None otherwise (a copy cut off, or unsealed)."""
    import pyarrow.fs as pafs

    from dmm_ray.data import fs as fsu

    try:
        manifest = json.loads(fsu.read_bytes(fs, fsu.join(path, MANIFEST)))
        files, step = manifest["files"], int(manifest["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    infos = fs.get_file_info([fsu.join(path, name) for name in files])
    if any(i.type != pafs.FileType.File or i.size != size for i, size in zip(infos, files.values())):
        return None
    return step


def checkpoint_folders(fs, run_path: str) -> list[str]:
    """Ray Train's checkpoint folders in a run's storage folder (sorted: oldest first)."""
    import pyarrow.fs as pafs

    infos = fs.get_file_info(pafs.FileSelector(run_path, recursive=False, allow_not_found=True))
    return sorted(i.path for i in infos if i.type == pafs.FileType.Directory and i.base_name.startswith(CHECKPOINT_PREFIX))


def newest_sealed(fs, run_path: str) -> tuple[int, str] | None:
    """(step, path) of the complete checkpoint with the highest step in a run's storage folder."""
    found = [(step, path) for path in checkpoint_folders(fs, run_path) if (step := sealed_step(fs, path)) is not None]
    return max(found) if found else None


def resume_checkpoint():
    """In a Ray Train worker: the checkpoint to resume from. Ray Train's own (`get_checkpoint`), unless
    the run's storage folder holds a complete checkpoint of a later step that Ray Train never
    recorded (see the module docstring); None for a fresh start."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    try:
        storage = ray.train.get_context().get_storage()  # DeveloperAPI: the run's filesystem and folder
        # Ray Train v2 keeps checkpoints in the run's folder; v1 one level down, in the trial's
        fs, run_path = storage.storage_filesystem, getattr(storage, "trial_fs_path", None) or storage.experiment_fs_path
    except (AttributeError, RuntimeError):
        return checkpoint
    newest = newest_sealed(fs, run_path)
    recorded = sealed_step(checkpoint.filesystem, checkpoint.path) if checkpoint is not None else None
    if newest is None or (checkpoint is not None and (recorded is None or recorded >= newest[0])):
        return checkpoint  # an unsealed recorded checkpoint (made before manifests existed) is kept as it is
    return ray.train.Checkpoint(path=newest[1], filesystem=fs)


def prune_unrecorded(result) -> list[str]:
    """After a finished stage: remove the checkpoint folders of its run that Ray Train does not keep
    (left by an interrupted run whose controller never recorded them). Returns what was removed."""
    from dmm_ray.data import fs as fsu

    if getattr(result, "checkpoint", None) is None:
        return []
    fs = result.checkpoint.filesystem
    kept = {result.checkpoint.path} | {c.path for c, _ in (result.best_checkpoints or []) if c is not None}
    run_path = result.checkpoint.path.rsplit("/", 1)[0]
    removed = [path for path in checkpoint_folders(fs, run_path) if path not in kept]
    for path in removed:
        fsu.delete(fs, path)
    return removed
