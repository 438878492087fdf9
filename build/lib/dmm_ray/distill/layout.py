"""Which worker hosts which teacher (Algorithm 1, line 2: teacher index = rank mod N).

Incremental merge (paper 3.5): N_new*k teacher workers plus ONE regularisation worker that hosts
the frozen previous merged model and supervises a random old style each step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class WorkerRole:
    rank: int
    kind: str  # "teacher" | "regularizer"
    teacher_index: int | None  # index into the config's (new) teachers
    style_index: int | None  # codebook row this worker trains; None = random old style per sample


def worker_layout(num_teachers: int, workers_per_teacher: int, num_old_styles: int = 0, regularization: bool = False) -> list[WorkerRole]:
    if num_teachers < 1 or workers_per_teacher < 1:
        raise ValueError("need at least one teacher and one worker per teacher")
    if regularization and num_old_styles < 1:
        raise ValueError("regularisation needs a previous merged model with at least one style")
    roles = [
        WorkerRole(rank=r, kind="teacher", teacher_index=r % num_teachers, style_index=num_old_styles + r % num_teachers)
        for r in range(num_teachers * workers_per_teacher)
    ]
    if regularization:
        roles.append(WorkerRole(rank=len(roles), kind="regularizer", teacher_index=None, style_index=None))
    return roles


def regularizer_style_ids(batch_size: int, num_old_styles: int, generator: torch.Generator) -> torch.Tensor:
    """The regularisation worker's style per sample: uniform over the OLD styles only (B,)."""
    return torch.randint(0, num_old_styles, (batch_size,), generator=generator)
