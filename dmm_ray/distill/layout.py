"""Which worker hosts which teacher(s) (Algorithm 1, line 2: teacher index = rank mod N).

One teacher per worker is the design (and the paper's layout): worker r hosts teacher r mod N.
With `teachers_per_worker = k` the N teachers form G = ceil(N/k) groups of consecutive teachers,
and worker r hosts group r mod G; each step every hosted teacher gets its own batch of its
style, so every style still gets the same number of samples per step.

Incremental merge (paper 3.5): the teacher workers plus ONE regularisation worker that hosts
the frozen previous merged model and supervises a random old style each step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class WorkerRole:
    rank: int
    kind: str  # "teacher" | "regularizer"
    teacher_indices: tuple[int, ...] = ()  # indices into the config's (new) teachers
    style_indices: tuple[int, ...] = ()  # the codebook rows those teachers train (same order)

    @property
    def teacher_index(self) -> int | None:
        """The first hosted teacher (the only one with one teacher per worker); None: regulariser."""
        return self.teacher_indices[0] if self.teacher_indices else None

    @property
    def style_index(self) -> int | None:
        """The first hosted style; None: the regulariser (a random old style per sample)."""
        return self.style_indices[0] if self.style_indices else None


def worker_layout(
    num_teachers: int, workers_per_teacher: int, num_old_styles: int = 0, regularization: bool = False, teachers_per_worker: int = 1
) -> list[WorkerRole]:
    if num_teachers < 1 or workers_per_teacher < 1 or teachers_per_worker < 1:
        raise ValueError("need at least one teacher, one worker per teacher and one teacher per worker")
    if regularization and num_old_styles < 1:
        raise ValueError("regularisation needs a previous merged model with at least one style")
    k = teachers_per_worker
    groups = [tuple(range(g, min(g + k, num_teachers))) for g in range(0, num_teachers, k)]
    roles = [
        WorkerRole(
            rank=r, kind="teacher", teacher_indices=groups[r % len(groups)], style_indices=tuple(num_old_styles + i for i in groups[r % len(groups)])
        )
        for r in range(len(groups) * workers_per_teacher)
    ]
    if regularization:
        roles.append(WorkerRole(rank=len(roles), kind="regularizer"))
    return roles


def regularizer_style_ids(batch_size: int, num_old_styles: int, generator: torch.Generator) -> torch.Tensor:
    """The regularisation worker's style per sample: uniform over the OLD styles only (B,)."""
    return torch.randint(0, num_old_styles, (batch_size,), generator=generator)
