"""dmm-ray: distillation-based model merging of Stable Diffusion checkpoints on Ray."""

__version__ = "0.1.0"

_LAZY = {
    "StyleUNet": "dmm_ray.models.style_unet",
    "DMMPipeline": "dmm_ray.pipeline",
    "DMMXLPipeline": "dmm_ray.pipeline",
    "TeacherSpec": "dmm_ray.teachers",
    "load_teacher": "dmm_ray.teachers",
    "tiny_sd_components": "dmm_ray.tiny",
    "Region": "dmm_ray.regions",
    "sweep": "dmm_ray.regions",
    "bake": "dmm_ray.export",
    "DMMControlNetPipeline": "dmm_ray.plugins",
    "DMMXLControlNetPipeline": "dmm_ray.plugins",
    "DMMControlNetImg2ImgPipeline": "dmm_ray.plugins",
    "DMMControlNetInpaintPipeline": "dmm_ray.plugins",
    "DMMXLControlNetImg2ImgPipeline": "dmm_ray.plugins",
    "DMMXLControlNetInpaintPipeline": "dmm_ray.plugins",
    "DMMImg2ImgPipeline": "dmm_ray.plugins",
    "DMMInpaintPipeline": "dmm_ray.plugins",
    "DMMXLImg2ImgPipeline": "dmm_ray.plugins",
    "DMMXLInpaintPipeline": "dmm_ray.plugins",
}


from dmm_ray import _quiet  # noqa: E402
from dmm_ray._lazy import lazy_getattr  # noqa: E402

_quiet.install()  # drop library notices that say nothing to a merge (dmm_ray/_quiet.py)

__getattr__ = lazy_getattr(_LAZY, __name__)  # `import dmm_ray` must not import torch/diffusers; subpackages on first use


__all__ = list(_LAZY)
