"""One-call entry points used by jobs/merge.py and jobs/evaluate.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from dmm_ray.evaluation.config import EvalConfig
from dmm_ray.evaluation.extractors import ExtractorFactory
from dmm_ray.evaluation.matrix import EvalResult, evaluate_sources
from dmm_ray.evaluation.outputs import format_table, write_outputs
from dmm_ray.evaluation.sources import student_source, teacher_sources


def default_extractor(config: EvalConfig) -> ExtractorFactory:
    return ExtractorFactory(config.extractor.kind, config.extractor.path, config.extractor.device)


def evaluate_merge(
    student_path: str | Path | None,
    teacher_specs: Sequence[Any],
    eval_config: EvalConfig,
    extractor=None,
    output_dir: str | Path | None = None,
    print_table: bool = True,
) -> EvalResult:
    """FID matrix M and M_ref of a merged model folder against its teachers (TeacherSpecs).

    Teacher statistics come from the cache when present. Writes the JSON/CSV/PNG outputs to
    `output_dir` (default `eval_config.output_dir`) and records their paths in `result.files`.
    `student_path=None` evaluates only the teacher reference M_ref.
    """
    dtype = eval_config.dtype
    student = student_source(student_path, dtype) if student_path is not None else None
    teachers = teacher_sources(teacher_specs, dtype)
    result = evaluate_sources(student, teachers, eval_config, extractor or default_extractor(eval_config))
    if student is not None:
        result.files = write_outputs(result, output_dir or eval_config.output_dir)
        if print_table:
            print(format_table(result))
    return result
