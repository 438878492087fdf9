"""Evaluation: FID matrix M / M_ref, FIDt (paper 4.1), plots, style-mixing comparisons.

Import the pieces from their modules (kept lazy so `import dmm_ray.evaluation` stays light):
`dmm_ray.evaluation.api.evaluate_merge`, `...matrix.evaluate_sources`, `...fid.frechet_distance`,
`...mixing.mixing_comparison` / `interpolation_sweep`, `...config.EvalConfig`.
"""

_LAZY = {
    "EvalConfig": "dmm_ray.evaluation.config",
    "evaluate_merge": "dmm_ray.evaluation.api",
    "evaluate_sources": "dmm_ray.evaluation.matrix",
    "EvalResult": "dmm_ray.evaluation.matrix",
    "StudentSource": "dmm_ray.evaluation.matrix",
    "ModelSource": "dmm_ray.evaluation.stats",
    "frechet_distance": "dmm_ray.evaluation.fid",
    "FeatureStats": "dmm_ray.evaluation.fid",
    "write_outputs": "dmm_ray.evaluation.outputs",
    "format_table": "dmm_ray.evaluation.outputs",
    "mixing_comparison": "dmm_ray.evaluation.mixing",
    "interpolation_sweep": "dmm_ray.evaluation.mixing",
}


from dmm_ray._lazy import lazy_getattr  # noqa: E402

__getattr__ = lazy_getattr(_LAZY)


__all__ = list(_LAZY)
