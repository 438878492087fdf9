"""Training-state checkpoints (student, discriminator head, both optimizers, EMA, step, data position).

Written by rank 0 into a fresh temporary folder and handed to `ray.train.report`, which moves it to
storage: a failed save never replaces the last good checkpoint.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

STATE = "train_state.pt"
STUDENT_DIR = "student"


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
    return folder


def load_training_state(folder: Path) -> dict:
    # weights_only: our own file, but never unpickle arbitrary objects
    return torch.load(Path(folder) / STATE, map_location="cpu", weights_only=True)


def temp_checkpoint_dir() -> Path:
    return Path(tempfile.mkdtemp(prefix="dmm-ckpt-"))
