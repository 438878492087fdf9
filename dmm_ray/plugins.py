"""Plugins on a merged model: ControlNet pipelines with `style=` / `style_weights=`.

LoRA, IP-Adapter and LCM-LoRA need nothing new: a `DMMPipeline` is a `StableDiffusionPipeline`
and its StyleUNet a `UNet2DConditionModel`, so diffusers' own loaders work on it as they are:

    pipe.load_lora_weights("character_lora.safetensors", adapter_name="character")
    pipe.set_adapters(["character"], adapter_weights=[0.8]);  pipe(prompt, style="noir")
    pipe.load_ip_adapter("ip_adapter_folder", subfolder="", weight_name="ip_adapter.safetensors")
    pipe(prompt, style="noir", ip_adapter_image=reference)
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config); pipe.load_lora_weights(lcm_lora)
    pipe(prompt, style="noir", num_inference_steps=4, guidance_scale=1.0)

ControlNet needs a pipeline class that runs diffusers' ControlNet loop with the style rows in the
StyleUNet's style context: `DMMControlNetPipeline` (SD1.5) and `DMMXLControlNetPipeline` (SDXL).
The ControlNet itself is stock: one trained on the base applies as it is (its residuals are added
to the merged UNet's, which carries the style), and `ControlNetModel.from_unet(merged.unet)`
initialises a new one from the merged trunk (the style module is not copied: a ControlNet has no
class embedding). `with_controlnet(pipe, controlnet)` builds the right class from any pipeline.
"""

from __future__ import annotations

from diffusers import StableDiffusionControlNetPipeline, StableDiffusionXLControlNetPipeline

from dmm_ray.models.style_unet import StyleUNet
from dmm_ray.pipeline import _StyleCallMixin, _styled_call

__all__ = ["DMMControlNetPipeline", "DMMXLControlNetPipeline", "with_controlnet"]


class DMMControlNetPipeline(_StyleCallMixin, StableDiffusionControlNetPipeline):
    """StableDiffusionControlNetPipeline over a merged model: `pipe(prompt, image=control, style="noir")`."""

    __call__ = _styled_call(StableDiffusionControlNetPipeline.__call__)


class DMMXLControlNetPipeline(_StyleCallMixin, StableDiffusionXLControlNetPipeline):
    """StableDiffusionXLControlNetPipeline over a merged SDXL model (style= / style_weights=)."""

    __call__ = _styled_call(StableDiffusionXLControlNetPipeline.__call__)


def with_controlnet(pipe, controlnet):
    """The ControlNet pipeline over `pipe`'s own modules (shared, not copied): DMM(XL)ControlNetPipeline
    for a merged model, diffusers' StableDiffusion(XL)ControlNetPipeline for a plain or baked one."""
    xl = getattr(pipe, "text_encoder_2", None) is not None or "text_encoder_2" in pipe.components
    styled = isinstance(pipe.unet, StyleUNet)
    if xl:
        cls = DMMXLControlNetPipeline if styled else StableDiffusionXLControlNetPipeline
    else:
        cls = DMMControlNetPipeline if styled else StableDiffusionControlNetPipeline
    kwargs = {} if xl else {"safety_checker": None, "requires_safety_checker": False}
    # unet passed explicitly: from_pipe only carries over modules of the exact annotated type
    return cls.from_pipe(pipe, controlnet=controlnet, unet=pipe.unet, **kwargs)
