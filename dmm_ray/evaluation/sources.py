"""Build evaluation sources from what users have on disk: a merged model folder, TeacherSpecs,
or a toy-zoo `zoo.yaml` manifest."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Sequence

from dmm_ray.evaluation.matrix import StudentSource
from dmm_ray.evaluation.stats import ModelSource


def _torch_dtype(dtype: str):
    import torch

    return None if dtype == "float32" else getattr(torch, dtype)


def _cache_suffix(dtype: str) -> str:
    # The end of a cacheable source's key: the sampler (`_paper_sampler`: statistics cached before it, of
    # a teacher's own PNDM or Euler, are not reused) and the dtype (half-precision images differ slightly).
    return ":dpmsolver++" + ("" if dtype == "float32" else f":{dtype}")


def _load_student_pipeline(path: str, dtype: str = "float32"):
    from dmm_ray.pipeline import load_dmm_pipeline

    kwargs = {"torch_dtype": _torch_dtype(dtype)} if dtype != "float32" else {}
    return load_dmm_pipeline(path, **kwargs)  # DMMPipeline or DMMXLPipeline


def _paper_sampler(pipe):
    """`pipe` sampling with the paper's DPM-Solver++ (on its own noise schedule), as the merged model
    does: a stock SD1.5 folder ships PNDM and SDXL Euler, so the student and its teachers (and the
    baselines) would otherwise be compared through different samplers (`SamplerConfig`: shared)."""
    from dmm_ray.pipeline import DMMPipeline

    pipe.scheduler = DMMPipeline.paper_scheduler(pipe.scheduler)
    return pipe


def _load_teacher_pipeline(spec, dtype: str = "float32"):
    from dmm_ray.teachers import load_teacher_pipeline

    return _paper_sampler(load_teacher_pipeline(spec, torch_dtype=_torch_dtype(dtype)))


def _load_plain_pipeline(path: str, dtype: str = "float32"):
    from dmm_ray.architectures import load_plain_pipeline

    kwargs = {"torch_dtype": _torch_dtype(dtype)} if dtype != "float32" else {}
    return _paper_sampler(load_plain_pipeline(path, **kwargs))


def student_source(path: str | Path, dtype: str = "float32") -> StudentSource:
    path = str(Path(path).resolve())
    from dmm_ray.models.style_unet import merged_style_names

    return StudentSource(pipeline_factory=partial(_load_student_pipeline, path, dtype), style_names=merged_style_names(path))


def teacher_sources(specs: Sequence[Any], dtype: str = "float32") -> list[ModelSource]:
    """TeacherSpecs -> cacheable ModelSources keyed by `teacher_checksum(spec)` (+ dtype)."""
    from dmm_ray.teachers import teacher_checksum

    return [
        ModelSource(name=s.name, pipeline_factory=partial(_load_teacher_pipeline, s, dtype), checksum=teacher_checksum(s) + _cache_suffix(dtype))
        for s in specs
    ]


def _load_score_ensemble(specs, dtype: str = "float32"):
    from dmm_ray.baselines.score_ensemble import score_ensemble_pipeline

    return _paper_sampler(score_ensemble_pipeline(specs, torch_dtype=_torch_dtype(dtype)))


def score_ensemble_source(specs: Sequence[Any], dtype: str = "float32") -> ModelSource:
    """The teachers' equal-weight score ensemble (`dmm_ray.baselines.score_ensemble`), cacheable on their checksums."""
    from dmm_ray.teachers import teacher_checksum

    checksum = "score-ensemble:" + "+".join(teacher_checksum(s) for s in specs) + _cache_suffix(dtype)
    return ModelSource(name="score ensemble", pipeline_factory=partial(_load_score_ensemble, list(specs), dtype), checksum=checksum)


def pipeline_folder_source(name: str, path: str | Path, cacheable: bool = False, dtype: str = "float32") -> ModelSource:
    """A plain diffusers folder (e.g. the weighted-merge baseline); cacheable keys on its file digest."""
    from dmm_ray.evaluation.extractors import dir_digest

    path = str(Path(path).resolve())
    checksum = dir_digest(Path(path)) + _cache_suffix(dtype) if cacheable else None
    return ModelSource(name=name, pipeline_factory=partial(_load_plain_pipeline, path, dtype), checksum=checksum)


from dmm_ray.zoo.manifest import ZooManifest, load_zoo_manifest  # noqa: E402,F401  (the one zoo.yaml reader; re-exported)

MERGE_CONFIG_KEYS = {"zoo", "data", "distill", "student", "evaluation", "synthesis", "incremental"}


@dataclass
class EvalSetup:
    """Teachers plus the EvalConfig defaults implied by a zoo.yaml or a merge config."""

    teachers: list[Any]
    defaults: dict  # EvalConfig fields (prompts_file, extractor.path, ...) to apply under user settings
    merge: Any = None  # the merge config, when the file is one: its evaluation folder holds that merge's own results


def merged_teachers(merge_cfg) -> list:
    """The teachers of every style a merge config's model holds, as the merge's own evaluation scores them
    (`dmm_ray.merged_model.all_teachers`): an incremental merge's model holds its previous model's styles too,
    whose teachers that model's record names (in codebook order), then the config's new ones. Given `teachers` alone, jobs/evaluate.py scored the new styles only (a FIDt over half
    of them) and jobs/style_mixing.py knew no old style. A previous model without a record gives the new
    teachers alone, as in the merge; one that the merge has since replaced (base_merged = its own output's
    merged/) records the new teachers too, listed once."""
    from dmm_ray.merged_model import all_teachers

    teachers, new = all_teachers(merge_cfg, missing_ok=True), list(merge_cfg.teachers)
    old, names = teachers[: len(teachers) - len(new)], {t.name for t in new}  # all_teachers: the recorded ones, then new
    return [t for t in old if t.name not in names] + new


def load_eval_setup(path: str | Path) -> EvalSetup:
    """`--teachers` file: a zoo.yaml manifest, or a merge config (its teachers, or its zoo's, and its
    `evaluation:` section)."""
    path = Path(path)
    if path.is_dir() and (path / "zoo.yaml").is_file():  # a zoo's folder: its manifest
        path = path / "zoo.yaml"
    if not path.is_file():
        what = "is a folder without a zoo.yaml" if path.is_dir() else "not found"
        raise FileNotFoundError(f"teachers file '{path}' {what} (expected a zoo.yaml, its folder, or a merge config)")
    from dmm_ray.overrides import read_yaml_file

    data = read_yaml_file(path, "teachers file") or {}
    if isinstance(data, dict) and MERGE_CONFIG_KEYS & set(data):
        try:
            from dmm_ray.config import load_config
        except ImportError as e:
            raise ImportError(f"'{path}' looks like a merge config but dmm_ray.config is unavailable: {e}") from e
        merge_cfg = load_config(path)
        ev = merge_cfg.evaluation  # what the user set, plus the merge's output and cache folders
        return EvalSetup(
            teachers=merged_teachers(merge_cfg),
            defaults={**ev.model_dump(exclude_unset=True), "output_dir": ev.output_dir, "cache_dir": ev.cache_dir},
            merge=merge_cfg,
        )
    m = load_zoo_manifest(path)
    defaults: dict = {}
    if m.eval_prompts is not None:
        defaults["prompts_file"] = str(m.eval_prompts)
    if m.feature_net is not None:
        defaults["extractor"] = {"path": str(m.feature_net)}
    return EvalSetup(teachers=m.teachers, defaults=defaults)
