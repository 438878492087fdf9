"""One-call entry points used by jobs/merge.py and jobs/evaluate.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from dmm_ray.evaluation.config import EvalConfig
from dmm_ray.evaluation.extractors import ExtractorFactory
from dmm_ray.evaluation.matrix import EvalResult, FewStepStudent, evaluate_sources
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
    model_name: str | None = None,
    student_sampler: tuple[int, float] | None = None,
    check_replaced: bool = True,
) -> EvalResult:
    """FID matrix M and M_ref of a merged model folder against its teachers (TeacherSpecs).

    Teacher statistics come from the cache when present. Writes the JSON/CSV/PNG outputs to
    `output_dir` (default `eval_config.output_dir`) and records their paths in `result.files`.
    `student_path=None` evaluates only the teacher reference M_ref. `model_name`: the model as the
    provenance names it, where `student_path` is a temporary copy (a models:/ URI's download).
    `student_sampler`: (steps, guidance) the student samples with instead of `eval_config.sampler`'s
    (a few-step model's own: jobs/evaluate.py); the teachers keep `eval_config.sampler`. `check_replaced`: compare the
    model's UNet after the sampling with the one before it (check_still_sampled); off where the caller holds the
    model's merge.lock (the merge's own evaluate stage, jobs/evaluate.py into a merge's folder): none can replace it.
    """
    dtype = eval_config.dtype
    student = student_source(student_path, dtype) if student_path is not None else None
    if student is not None and student_sampler is not None:
        student = FewStepStudent.wrap(student, *student_sampler)  # as the few-step stage's own evaluation does
    teachers = teacher_sources(teacher_specs, dtype)
    # the model as its sampling starts: each Ray actor loads the folder when it starts, and a merge started after this
    # job (jobs/evaluate.py checks merge.lock only at its start) may save another model there between two of them
    made_by = sources_provenance(student_path, model_name, teacher_specs) if student is not None else None
    result = evaluate_sources(student, teachers, eval_config, extractor or default_extractor(eval_config))
    if student is not None:
        if check_replaced:
            check_still_sampled(student_path, made_by)
        result.provenance.update(made_by)
        result.files = write_outputs(result, output_dir or eval_config.output_dir)
        if print_table:
            print(format_table(result))
    return result


def check_still_sampled(student_path, made_by: dict) -> None:
    """Refuse (output_lock.ModelReplacedError) an evaluation whose model folder holds another UNet than when its sampling
    began (`made_by`: sources_provenance then): a merge saved another model there meanwhile, so some styles' samples may
    be of one model and the rest of the other. Its numbers were written under the new model's checksum."""
    from dmm_ray.output_lock import ModelReplacedError
    from dmm_ray.teachers import files_checksum

    unet = Path(student_path).resolve() / "unet"
    before, now = made_by["model"]["unet_checksum"], files_checksum([unet]) if unet.is_dir() else None
    if now != before:
        raise ModelReplacedError(
            f"{made_by['model']['path']} was replaced while this evaluation sampled it (its UNet checksum was {before}, now "
            f"{now or 'no UNet there'}: a merge saved another model in its place), so its samples may come from both models; "
            "nothing was written. Run it again: it evaluates the model now there (the teachers' statistics are cached)."
        )


def sources_provenance(student_path, model_name: str | None, teacher_specs: Sequence[Any], scheduler: str | None = None) -> dict:
    """The evaluated model and the teachers' files, for fid_matrix.json (a merged or a few-step model's:
    evaluate_merge and dmm_ray.fast.job.evaluate_fast). The model's fingerprint is `files_checksum` of
    its unet/ (names, sizes and the first and last 16 MiB of each file: cheap on large weights, and it
    changes when a merge rewrites them); its scheduler is the one it samples with: the folder's own, or
    `scheduler` where the evaluation swapped it (benchmarks/fast_fidt.py --scheduler)."""
    import json

    from dmm_ray.teachers import files_checksum

    folder = Path(student_path).resolve()
    try:
        scheduler = scheduler or json.loads((folder / "scheduler" / "scheduler_config.json").read_text()).get("_class_name")
    except (OSError, ValueError):
        scheduler = None
    return {
        "model": {"path": model_name or str(folder), "unet_checksum": files_checksum([folder / "unet"]), "scheduler": scheduler},
        "teachers": {s.name: {"source": str(s.source), "base": str(s.base) if s.base else None} for s in teacher_specs},
    }
