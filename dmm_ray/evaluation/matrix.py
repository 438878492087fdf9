"""The FID matrix of paper section 4.1 (eq. 14-15).

M(i, j)     = FID(student with style i on seed set A, teacher j on seed set B)
M_ref(i, j) = FID(teacher i on seed set A,            teacher j on seed set B)
FIDt = tr(M), FIDt_ref = tr(M_ref).

Both matrices compare a seed-set-A sample with the same seed-set-B teacher sample, so a student
that reproduced every teacher exactly would give M == M_ref (ratio 1.0) — FIDt_ref is the
"teacher reference" upper bound of paper Table 1.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from dmm_ray.evaluation.config import EvalConfig
from dmm_ray.evaluation.extractors import extractor_name
from dmm_ray.evaluation.fid import fid_from_stats
from dmm_ray.evaluation.stats import ModelSource, StatsRequest, collect_stats


@dataclass
class StudentSource:
    """The merged student: a pipeline factory and its style names (row labels)."""

    pipeline_factory: Callable[[], Any]
    style_names: list[str]
    name: str = "student"

    def call_kwargs(self, style: str) -> dict:
        return {"style": style}


@dataclass
class FewStepStudent(StudentSource):
    """A student sampled with its own step count and guidance (the teachers keep the eval sampler): a few-step
    model in the few-step stage's evaluation and in jobs/evaluate.py."""

    steps: int = 4
    guidance: float = 1.0

    @classmethod
    def wrap(cls, source: StudentSource, steps: int, guidance: float) -> "FewStepStudent":
        return cls(pipeline_factory=source.pipeline_factory, style_names=source.style_names, name=f"student{steps}", steps=steps, guidance=guidance)

    def call_kwargs(self, style: str) -> dict:
        return {"style": style, "num_inference_steps": self.steps, "guidance_scale": self.guidance}


@dataclass
class EvalResult:
    style_names: list[str]  # row i = student style i = teacher i; column j = teacher j
    matrix: np.ndarray  # (N, N) M
    ref_matrix: np.ndarray  # (N, N) M_ref
    prompts: list[str]
    images_per_set: int
    extractor: str
    student_previews: dict[str, np.ndarray] = field(default_factory=dict)  # style -> (P, H, W, 3) uint8
    teacher_previews: dict[str, np.ndarray] = field(default_factory=dict)
    generated: list[str] = field(default_factory=list)  # job keys that generated images this run
    files: dict = field(default_factory=dict)  # output name -> path, filled by write_outputs callers
    # what produced the numbers (sampler, seeds, teachers' checksums; evaluate_merge and evaluate_fast add the model and
    # the teachers' files): a fid_matrix.json read later, beside others, must say which merge it scored
    provenance: dict = field(default_factory=dict)

    @property
    def fidt(self) -> float:
        return float(np.trace(self.matrix))

    @property
    def fidt_ref(self) -> float:
        return float(np.trace(self.ref_matrix))

    @property
    def ratio(self) -> float:
        return self.fidt / self.fidt_ref if self.fidt_ref > 0 else float("inf")

    def diagonal(self) -> dict[str, float]:
        return {s: float(self.matrix[i, i]) for i, s in enumerate(self.style_names)}

    def ref_diagonal(self) -> dict[str, float]:
        return {s: float(self.ref_matrix[i, i]) for i, s in enumerate(self.style_names)}

    def to_dict(self) -> dict:
        return {
            "styles": self.style_names,
            "M": self.matrix.tolist(),
            "M_ref": self.ref_matrix.tolist(),
            "FIDt": self.fidt,
            "FIDt_ref": self.fidt_ref,
            "ratio": self.ratio,
            "diagonal": self.diagonal(),
            "ref_diagonal": self.ref_diagonal(),
            "prompts": self.prompts,
            "images_per_set": self.images_per_set,
            "extractor": self.extractor,
            "rows": "student style i (M) / teacher i, seed set A (M_ref)",
            "columns": "teacher j, seed set B",
            "provenance": self.provenance,
        }


def teacher_requests(teachers: Sequence[ModelSource], num_previews: int) -> list[StatsRequest]:
    reqs = []
    for t in teachers:
        reqs.append(StatsRequest(key=f"teacher/{t.name}/A", source=t, seed_set="a", num_previews=num_previews))
        reqs.append(StatsRequest(key=f"teacher/{t.name}/B", source=t, seed_set="b"))
    return reqs


def evaluate_sources(
    student: StudentSource | None,
    teachers: Sequence[ModelSource],
    config: EvalConfig,
    extractor,
    prompts: Sequence[str] | None = None,
) -> EvalResult:
    """M and M_ref for a student (None: only M_ref, M filled with NaN) against `teachers`.

    `extractor`: a FeatureExtractor instance or a zero-argument factory returning one.
    """
    prompts = list(prompts) if prompts is not None else config.load_prompts()
    config.check_seed_sets(len(prompts))
    names = [t.name for t in teachers]
    if len(set(names)) != len(names):
        raise ValueError(f"teacher names must be unique, got {names}")
    if student is not None:
        missing = [n for n in names if n not in student.style_names]
        if missing:
            raise ValueError(f"student has no style named {missing}; its styles are {student.style_names} (style names must match teacher names)")
    n_prev = min(config.grid_prompts, len(prompts))
    requests = teacher_requests(teachers, n_prev)
    if student is not None:
        groups = config.num_student_workers
        for i, name in enumerate(names):
            requests.append(
                StatsRequest(
                    key=f"student/{name}",
                    source=ModelSource(student.name, student.pipeline_factory, checksum=None),
                    seed_set="a",
                    call_kwargs=student.call_kwargs(name),
                    num_previews=n_prev,
                    worker_group=f"{student.name}/{i % groups}",
                )
            )
    run = collect_stats(requests, config, extractor, prompts)
    s = run.stats
    n = len(names)
    matrix = np.full((n, n), np.nan)
    ref = np.zeros((n, n))
    for i, a in enumerate(names):
        for j, b in enumerate(names):
            ref[i, j] = fid_from_stats(s[f"teacher/{a}/A"].stats, s[f"teacher/{b}/B"].stats)
            if student is not None:
                matrix[i, j] = fid_from_stats(s[f"student/{a}"].stats, s[f"teacher/{b}/B"].stats)
    return EvalResult(
        style_names=names,
        matrix=matrix,
        ref_matrix=ref,
        prompts=prompts,
        images_per_set=len(prompts) * config.images_per_prompt,
        extractor=extractor_name(extractor),
        student_previews={a: s[f"student/{a}"].previews for a in names} if student is not None else {},
        teacher_previews={a: s[f"teacher/{a}/A"].previews for a in names},
        generated=run.generated,
        provenance={
            "sampler": config.sampler.model_dump(mode="json"),
            # what the student's pipeline call changes of it (a few-step student: its steps and guidance)
            "student_call": {k: v for k, v in student.call_kwargs(names[0]).items() if k != "style"} if student is not None else None,
            "seed_a": config.seed_a,
            "seed_b": config.seed_b,
            "images_per_prompt": config.images_per_prompt,
            "dtype": config.dtype,
            "teacher_checksums": {t.name: t.checksum for t in teachers},  # (their statistics' cache keys: files + sampler)
        },
    )
