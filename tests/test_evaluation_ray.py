"""FID generation fanned out over Ray actors (one per teacher + a student actor)."""

from functools import partial

import numpy as np
import pytest
from eval_helpers import SeededConvExtractor, routing_student, tiny_teacher_pipeline

from dmm_ray.evaluation.config import EvalConfig, SamplerConfig
from dmm_ray.evaluation.matrix import StudentSource, evaluate_sources
from dmm_ray.evaluation.stats import ModelSource


def _config(tmp_path, **kw):
    return EvalConfig(
        prompts=["a red circle", "a blue square"],
        images_per_prompt=1,
        sampler=SamplerConfig(num_inference_steps=2),
        use_ray=True,
        worker_num_cpus=1,
        cache_dir=str(tmp_path / "cache"),
        grid_prompts=1,
        **kw,
    )


@pytest.mark.ray
def test_ray_teacher_actor_fills_cache(ray_cluster, tmp_path):
    teacher = ModelSource("ink", partial(tiny_teacher_pipeline, 0), checksum="tiny-0")
    r = evaluate_sources(None, [teacher], _config(tmp_path), SeededConvExtractor(seed=0))
    assert r.ref_matrix.shape == (1, 1) and r.ref_matrix[0, 0] > 0
    assert sorted(r.generated) == ["teacher/ink/A", "teacher/ink/B"]
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 2
    assert r.teacher_previews["ink"].shape[0] == 1


@pytest.mark.ray
@pytest.mark.slow  # three actors each import torch + diffusers: ~30-60 s on 2 shared cores
def test_ray_fan_out_matches_teacher_reference(ray_cluster, tmp_path):
    names, seeds = ["ink", "neon"], [0, 7]
    teachers = [ModelSource(n, partial(tiny_teacher_pipeline, s), checksum=f"tiny-{s}") for n, s in zip(names, seeds)]
    student = StudentSource(partial(routing_student, names, seeds), names)
    r = evaluate_sources(student, teachers, _config(tmp_path), SeededConvExtractor(seed=0))
    assert r.style_names == names and r.matrix.shape == (2, 2)
    # Student actor and teacher actors are different processes: identical seeds must still give
    # identical images (per-image CPU generators), so the perfect student's M equals M_ref.
    np.testing.assert_allclose(r.matrix, r.ref_matrix, rtol=0, atol=1e-9)
    assert len(r.generated) == 6
    assert r.teacher_previews["ink"].shape[0] == 1
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 4  # teacher x {A, B}
