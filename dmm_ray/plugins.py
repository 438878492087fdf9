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
class embedding). `with_controlnet(pipe, controlnet)` builds the right class from any pipeline, for its
task: an img2img or inpainting pipeline gives the ControlNet img2img / inpainting one (`DMM(XL)ControlNetImg2ImgPipeline`,
`DMM(XL)ControlNetInpaintPipeline`: `image=` the image to start from, `control_image=` the control).

Image-to-image and inpainting in a style: `DMMImg2ImgPipeline` / `DMMInpaintPipeline` (SD1.5) and
`DMMXLImg2ImgPipeline` / `DMMXLInpaintPipeline` (SDXL) run diffusers' own loops with the style rows,
over the merged model's modules (`from_pipe`: shared, not copied):

    img2img = DMMImg2ImgPipeline.from_pipe(pipe)
    img2img("a cat", image=photo, strength=0.6, style="anime")
    DMMInpaintPipeline.from_pipe(pipe)("a cat", image=photo, mask_image=mask, style_weights={"anime": 0.5, "ink": 0.5})
"""

from __future__ import annotations

import torch
from diffusers import (
    StableDiffusionControlNetImg2ImgPipeline,
    StableDiffusionControlNetInpaintPipeline,
    StableDiffusionControlNetPipeline,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLControlNetImg2ImgPipeline,
    StableDiffusionXLControlNetInpaintPipeline,
    StableDiffusionXLControlNetPipeline,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLInpaintPipeline,
    StableDiffusionXLPipeline,
)

from dmm_ray.models.style_unet import StyleUNet, inner_unet
from dmm_ray.pipeline import _StyleCallMixin, _styled_call

__all__ = [
    "DMMControlNetPipeline",
    "DMMXLControlNetPipeline",
    "DMMControlNetImg2ImgPipeline",
    "DMMControlNetInpaintPipeline",
    "DMMXLControlNetImg2ImgPipeline",
    "DMMXLControlNetInpaintPipeline",
    "DMMImg2ImgPipeline",
    "DMMInpaintPipeline",
    "DMMXLImg2ImgPipeline",
    "DMMXLInpaintPipeline",
    "with_controlnet",
]


class DMMControlNetPipeline(_StyleCallMixin, StableDiffusionControlNetPipeline):
    """StableDiffusionControlNetPipeline over a merged model: `pipe(prompt, image=control, style="noir")`."""

    __call__ = _styled_call(StableDiffusionControlNetPipeline.__call__)


class DMMXLControlNetPipeline(_StyleCallMixin, StableDiffusionXLControlNetPipeline):
    """StableDiffusionXLControlNetPipeline over a merged SDXL model (style= / style_weights=)."""

    __call__ = _styled_call(StableDiffusionXLControlNetPipeline.__call__)


class DMMControlNetImg2ImgPipeline(_StyleCallMixin, StableDiffusionControlNetImg2ImgPipeline):
    """StableDiffusionControlNetImg2ImgPipeline over a merged model: `pipe(prompt, image=init, control_image=control, style="noir")`."""

    __call__ = _styled_call(StableDiffusionControlNetImg2ImgPipeline.__call__, regional=False)


class DMMControlNetInpaintPipeline(_StyleCallMixin, StableDiffusionControlNetInpaintPipeline):
    """StableDiffusionControlNetInpaintPipeline over a merged model (`image=`, `mask_image=`, `control_image=`, style=)."""

    __call__ = _styled_call(StableDiffusionControlNetInpaintPipeline.__call__, regional=False)


class DMMXLControlNetImg2ImgPipeline(_StyleCallMixin, StableDiffusionXLControlNetImg2ImgPipeline):
    """StableDiffusionXLControlNetImg2ImgPipeline over a merged SDXL model (style= / style_weights=)."""

    __call__ = _styled_call(StableDiffusionXLControlNetImg2ImgPipeline.__call__, regional=False)


class DMMXLControlNetInpaintPipeline(_StyleCallMixin, StableDiffusionXLControlNetInpaintPipeline):
    """StableDiffusionXLControlNetInpaintPipeline over a merged SDXL model (style= / style_weights=)."""

    __call__ = _styled_call(StableDiffusionXLControlNetInpaintPipeline.__call__, regional=False)


class DMMImg2ImgPipeline(_StyleCallMixin, StableDiffusionImg2ImgPipeline):
    """StableDiffusionImg2ImgPipeline over a merged model: `pipe(prompt, image=init, strength=0.6, style="noir")`."""

    __call__ = _styled_call(StableDiffusionImg2ImgPipeline.__call__, regional=False)


class DMMInpaintPipeline(_StyleCallMixin, StableDiffusionInpaintPipeline):
    """StableDiffusionInpaintPipeline over a merged model (its own 4-channel UNet: the masked area is
    re-drawn in the style, the rest kept): `pipe(prompt, image=init, mask_image=mask, style="noir")`."""

    __call__ = _styled_call(StableDiffusionInpaintPipeline.__call__, regional=False)


class DMMXLImg2ImgPipeline(_StyleCallMixin, StableDiffusionXLImg2ImgPipeline):
    """StableDiffusionXLImg2ImgPipeline over a merged SDXL model (style= / style_weights=)."""

    __call__ = _styled_call(StableDiffusionXLImg2ImgPipeline.__call__, regional=False)


class DMMXLInpaintPipeline(_StyleCallMixin, StableDiffusionXLInpaintPipeline):
    """StableDiffusionXLInpaintPipeline over a merged SDXL model (style= / style_weights=)."""

    __call__ = _styled_call(StableDiffusionXLInpaintPipeline.__call__, regional=False)


# (SDXL, styled) -> the ControlNet pipeline of each task
CONTROLNET_PIPELINES = {
    (False, True): {"text": DMMControlNetPipeline, "img2img": DMMControlNetImg2ImgPipeline, "inpaint": DMMControlNetInpaintPipeline},
    (True, True): {"text": DMMXLControlNetPipeline, "img2img": DMMXLControlNetImg2ImgPipeline, "inpaint": DMMXLControlNetInpaintPipeline},
    (False, False): {
        "text": StableDiffusionControlNetPipeline,
        "img2img": StableDiffusionControlNetImg2ImgPipeline,
        "inpaint": StableDiffusionControlNetInpaintPipeline,
    },
    (True, False): {
        "text": StableDiffusionXLControlNetPipeline,
        "img2img": StableDiffusionXLControlNetImg2ImgPipeline,
        "inpaint": StableDiffusionXLControlNetInpaintPipeline,
    },
}
# SDXL -> diffusers' own pipeline of each task, for a plain or baked model (`dmm_ray.export.bake` keeps a pipeline's task)
PLAIN_PIPELINES = {
    False: {"text": StableDiffusionPipeline, "img2img": StableDiffusionImg2ImgPipeline, "inpaint": StableDiffusionInpaintPipeline},
    True: {"text": StableDiffusionXLPipeline, "img2img": StableDiffusionXLImg2ImgPipeline, "inpaint": StableDiffusionXLInpaintPipeline},
}
# the pipelines whose task is img2img / inpainting (diffusers' ControlNet ones do not subclass the plain ones)
IMAGE_TASKS = {
    "img2img": (
        StableDiffusionImg2ImgPipeline,
        StableDiffusionXLImg2ImgPipeline,
        StableDiffusionControlNetImg2ImgPipeline,
        StableDiffusionXLControlNetImg2ImgPipeline,
    ),
    "inpaint": (
        StableDiffusionInpaintPipeline,
        StableDiffusionXLInpaintPipeline,
        StableDiffusionControlNetInpaintPipeline,
        StableDiffusionXLControlNetInpaintPipeline,
    ),
}


# the ControlNet config entries that must equal the UNet's: its residuals are added to the UNet's own down and mid
# block outputs (channels and count per block), and it reads the same text (and SDXL's pooled text + size) conditioning
CONTROLNET_MATCHES_UNET = (
    "block_out_channels",
    "layers_per_block",
    "cross_attention_dim",
    "addition_embed_type",
    "projection_class_embeddings_input_dim",
)


def check_controlnet(pipe, controlnet) -> None:
    """Raise a ValueError naming what does not fit when a ControlNet (or each of a list / MultiControlNetModel)
    was not made for `pipe`'s UNet and VAE. Unchecked, an SDXL ControlNet on an SD1.5 model failed in its forward with
    "argument of type 'NoneType' is not iterable", an SD1.5 one on SDXL with "mat1 and mat2 shapes cannot be
    multiplied", and one whose conditioning embedding downsamples the control image by another factor than the VAE
    (diffusers' default (16, 32, 96, 256): 8x, on a toy VAE that downsamples 4x) with a tensor size mismatch."""
    nets = getattr(controlnet, "nets", controlnet)  # MultiControlNetModel keeps its ControlNets in .nets
    nets = list(nets) if isinstance(nets, (list, tuple, torch.nn.ModuleList)) else [nets]
    unet = inner_unet(pipe.unet).config
    vae_factor = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    for i, net in enumerate(nets):
        name = "the ControlNet" if len(nets) == 1 else f"ControlNet {i}"
        config = net.config
        wrong = [
            f"{key} {config[key]!r} (the UNet's: {unet.get(key)!r})"
            for key in CONTROLNET_MATCHES_UNET
            if key in config and _config_value(config[key]) != _config_value(unet.get(key))
        ]
        if wrong:
            arch = "SDXL" if unet.get("addition_embed_type") == "text_time" else "SD1.5"
            raise ValueError(
                f"{name} was not made for this {arch} model's UNet: {', '.join(wrong)}; use a ControlNet trained on the "
                "merged model's base, or start one from it with ControlNetModel.from_unet(pipe.unet)"
            )
        channels = config.get("conditioning_embedding_out_channels")
        if channels is not None and 2 ** (len(channels) - 1) != vae_factor:
            raise ValueError(
                f"{name} downsamples the control image {2 ** (len(channels) - 1)}x (conditioning_embedding_out_channels "
                f"{tuple(channels)}), the VAE {vae_factor}x: the control would not match the latents; make it with "
                f"{vae_factor.bit_length()} conditioning_embedding_out_channels "
                "(ControlNetModel.from_unet(pipe.unet, conditioning_embedding_out_channels=...))"
            )


def is_xl(pipe) -> bool:
    """Whether `pipe` is an SDXL pipeline (it has a second text encoder slot)."""
    return getattr(pipe, "text_encoder_2", None) is not None or "text_encoder_2" in getattr(pipe, "components", {})


def pipeline_task(pipe) -> str:
    """`pipe`'s task: "img2img", "inpaint" or "text" (text-to-image), ControlNet or not."""
    return next((task for task, classes in IMAGE_TASKS.items() if isinstance(pipe, classes)), "text")


def plain_pipeline_class(pipe):
    """diffusers' own pipeline of `pipe`'s architecture and task, its ControlNet form when `pipe` has a ControlNet:
    StableDiffusion(XL)(ControlNet)(Img2Img|Inpaint)Pipeline, what a style baked from `pipe` runs in (`bake`)."""
    xl, task = is_xl(pipe), pipeline_task(pipe)
    if getattr(pipe, "controlnet", None) is not None:
        return CONTROLNET_PIPELINES[xl, False][task]
    return PLAIN_PIPELINES[xl][task]


def _config_value(value):
    """Config values compare as tuples: a list from a JSON config equals the tuple a model was built with."""
    return tuple(value) if isinstance(value, (list, tuple)) else value


def with_controlnet(pipe, controlnet):
    """The ControlNet pipeline over `pipe`'s own modules (shared, not copied, its safety checker
    included), for `pipe`'s task: DMM(XL)ControlNet(Img2Img|Inpaint)Pipeline for a merged model, diffusers'
    StableDiffusion(XL)ControlNet(Img2Img|Inpaint)Pipeline for a plain or baked one. An img2img or inpainting
    pipeline used to give the text-to-image one, which takes no `strength=` and reads `image=` as the control.
    A ControlNet made for another UNet or VAE is refused here, naming what differs (`check_controlnet`)."""
    check_controlnet(pipe, controlnet)
    xl = is_xl(pipe)
    styled = isinstance(inner_unet(pipe.unet), StyleUNet)  # also a compiled one (`torch.compile(pipe.unet)`)
    cls = CONTROLNET_PIPELINES[xl, styled][pipeline_task(pipe)]
    # a pipeline without a safety checker (a merged model, a baked export) gives one without, and no warning
    # about it; one that has a checker (a stock SD1.5 pipeline) keeps it, as diffusers' from_pipe does
    kwargs = {} if xl or getattr(pipe, "safety_checker", None) is not None else {"safety_checker": None, "requires_safety_checker": False}
    # unet passed explicitly: from_pipe only carries over modules of the exact annotated type
    return cls.from_pipe(pipe, controlnet=controlnet, unet=pipe.unet, **kwargs)
