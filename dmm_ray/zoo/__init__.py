"""The toy style zoo: a complete miniature of the real merging problem, built offline in minutes.

    from dmm_ray.zoo import build_zoo, ensure_zoo_preset, preset, teacher_specs
    root = ensure_zoo_preset("full", ".zoo")         # cached; as `python jobs/build_zoo.py --out .zoo` (2 torch threads)
    specs = teacher_specs(root)                      # -> list[dmm_ray.teachers.TeacherSpec]
    build_zoo("/tmp/z", preset("micro", seed=1))     # any config, on torch's current threads (reused only on as many)

Modules: scenes (procedural captioned scenes), styles (teacher style transforms), dataset
(on-disk image set), components (sizes), train (training loops), feature_net (FID extractor and
prompt-following checker), formats (teacher formats), build (the builder), report (M_ref, grid).
"""

from dmm_ray._lazy import lazy_getattr

_EXPORTS = {
    "build_zoo": "build",
    "ensure_zoo_preset": "build",
    "is_complete": "build",
    "ZooBuildError": "build",
    "ZooConfig": "config",
    "preset": "config",
    "STYLES": "styles",
    "apply_style": "styles",
    "ZooFeatureNet": "feature_net",
    "FeatureExtractor": "feature_net",
    "load_manifest": "report",
    "teacher_specs": "report",
    "run_report": "report",
}
__all__ = list(_EXPORTS)

# Lazy: importing dmm_ray.zoo.feature_net (the FID extractor) must not pull in peft/the builder.
__getattr__ = lazy_getattr({name: f"{__name__}.{module}" for name, module in _EXPORTS.items()})
