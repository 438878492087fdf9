"""Checkpoint formats: the original LDM single-file layout (export), official DMM UNet interop."""

from dmm_ray._lazy import lazy_getattr

__getattr__ = lazy_getattr({}, __name__)  # `dmm_ray.formats.single_file` without importing it first
