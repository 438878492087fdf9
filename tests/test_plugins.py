"""Plugins on the merged model, as a matrix (issue 16, section 2).

For every plugin (LoRA, ControlNet, IP-Adapter, LCM-LoRA) x architecture (SD1.5, SDXL) x way of
choosing the style (one style, a mixture, a baked single-file export loaded with diffusers' own
`from_single_file`): it runs, the plugin changes the image, and the style still changes the image.
Every component and plugin is tiny, seeded and built in code.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from export_helpers import MIXTURE, NEGATIVE, OTHER_MIXTURE, PROMPT, SIZE, STYLES, gen, tiny_merged

ARCHS = ["sd15", "sdxl"]
MODES = ["style", "mixture", "baked"]
PLUGINS = ["lora", "controlnet", "ip_adapter", "lcm_lora"]
SELECTIONS = {
    "style": ({"style": "ink"}, {"style": "neon"}),
    "mixture": ({"style_weights": MIXTURE}, {"style_weights": OTHER_MIXTURE}),
    "baked": ({"style": "ink"}, {"style": "neon"}),
}
MIN_CHANGE = 1e-3  # mean |difference| of two images in [0, 1] that must differ (observed >= 4e-3)


def differ(a, b) -> float:
    return float(np.abs(a - b).mean())


@pytest.fixture(scope="module")
def plugin_files(tmp_path_factory):
    """Per architecture: a subject LoRA, an LCM-LoRA, an IP-Adapter folder, a ControlNet made with
    `ControlNetModel.from_unet(merged.unet)`, and the baked single-file exports of two styles."""
    from dmm_ray.export import bake, export_pipeline, write_config_folder
    from dmm_ray.tiny_plugins import make_controlnet, make_ip_adapter, make_lora

    root = tmp_path_factory.mktemp("plugins")
    files = {}
    for arch in ARCHS:
        merged = tiny_merged(arch)
        baked = {}
        for selection in SELECTIONS["baked"]:
            plain = bake(merged, **selection)
            name = selection["style"]
            baked[name] = (export_pipeline(plain, root / arch / f"{name}.safetensors"), write_config_folder(plain, root / arch / f"{name}.config"))
        files[arch] = {
            "lora": make_lora(merged.unet, root / arch / "lora", seed=1),
            "lcm_lora": make_lora(merged.unet, root / arch / "lcm", seed=2),
            "ip_adapter": make_ip_adapter(merged.unet, root / arch / "ip", seed=3),
            "controlnet": make_controlnet(merged.unet, seed=4, scale=0.1),
            "baked": baked,
        }
    return files


def load_pipe(arch: str, mode: str, selection: dict, files):
    """(pipeline, call kwargs): the merged model with style=/style_weights=, or a baked export from disk."""
    if mode != "baked":
        return tiny_merged(arch), dict(selection)
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    path, config = files[arch]["baked"][selection["style"]]
    cls = StableDiffusionXLPipeline if arch == "sdxl" else StableDiffusionPipeline
    extra = {} if arch == "sdxl" else {"safety_checker": None, "requires_safety_checker": False}
    pipe = cls.from_single_file(str(path), config=str(config), local_files_only=True, **extra)
    pipe.scheduler = tiny_merged(arch).scheduler  # the merged model's DPM-Solver++ (a config folder carries it too)
    pipe.set_progress_bar_config(disable=True)
    return pipe, {}


def attach(plugin: str, pipe, files, arch: str):
    """The plugin attached with diffusers' own API; returns (pipeline, extra call kwargs)."""

    from dmm_ray.plugins import with_controlnet
    from dmm_ray.tiny_plugins import control_image, reference_image

    f = files[arch]
    if plugin == "lora":
        pipe.load_lora_weights(str(f["lora"]), adapter_name="subject")
        return pipe, {}
    if plugin == "lcm_lora":
        pipe.load_lora_weights(str(f["lcm_lora"]), adapter_name="lcm")
        return pipe, {"guidance": 1.0}
    if plugin == "ip_adapter":
        pipe.load_ip_adapter(str(f["ip_adapter"]), subfolder="", weight_name="ip_adapter.safetensors")
        return pipe, {"ip_adapter_image": reference_image()}
    if plugin == "controlnet":
        out = with_controlnet(pipe, f["controlnet"])
        out.set_progress_bar_config(disable=True)
        return out, {"image": control_image(SIZE)}
    raise ValueError(plugin)


def prepare(plugin: str, pipe):
    """What the plugin needs before the baseline image: LCM-LoRA runs with the LCM scheduler."""
    from diffusers import LCMScheduler

    if plugin == "lcm_lora":
        pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
        return {"guidance": 1.0}
    return {}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("plugin", PLUGINS)
def test_plugin_matrix(plugin, arch, mode, plugin_files):
    first, second = SELECTIONS[mode]
    pipe, style_kwargs = load_pipe(arch, mode, first, plugin_files)
    base_kwargs = prepare(plugin, pipe)
    without = gen(pipe, styled=mode != "baked", **style_kwargs, **base_kwargs)

    pipe, extra = attach(plugin, pipe, plugin_files, arch)
    with_plugin = gen(pipe, styled=mode != "baked", **style_kwargs, **{**base_kwargs, **extra})
    assert with_plugin.shape == (SIZE, SIZE, 3) and np.isfinite(with_plugin).all()
    assert differ(with_plugin, without) > MIN_CHANGE, "the plugin does not change the image"

    if mode == "baked":  # the other style is another export, with the same plugin
        other, other_kwargs = load_pipe(arch, mode, second, plugin_files)
        prepare(plugin, other)
        other, _ = attach(plugin, other, plugin_files, arch)
    else:
        other, other_kwargs = pipe, dict(second)
    other_style = gen(other, styled=mode != "baked", **other_kwargs, **{**base_kwargs, **extra})
    assert differ(with_plugin, other_style) > MIN_CHANGE, "the style no longer changes the image under the plugin"
    if mode != "baked":  # and the style module is untouched by the plugin
        assert pipe.unet.class_embedding.codebook.weight.shape[0] == len(STYLES)


def test_lora_set_adapters_weights_are_honoured(plugin_files, tmp_path):
    from dmm_ray.tiny_plugins import make_lora

    pipe = tiny_merged("sd15")
    plain = gen(pipe, style="ink")
    pipe.load_lora_weights(str(plugin_files["sd15"]["lora"]), adapter_name="subject")
    pipe.load_lora_weights(str(make_lora(pipe.unet, tmp_path / "b", seed=9)), adapter_name="detail")
    pipe.set_adapters(["subject"], adapter_weights=[0.0])
    assert differ(gen(pipe, style="ink"), plain) < 1e-6  # weight 0 is no LoRA
    pipe.set_adapters(["subject"], adapter_weights=[1.0])
    full = gen(pipe, style="ink")
    pipe.set_adapters(["subject"], adapter_weights=[0.5])
    half = gen(pipe, style="ink")
    assert differ(full, plain) > MIN_CHANGE and differ(half, full) > MIN_CHANGE / 2 and differ(half, plain) > MIN_CHANGE / 2
    pipe.set_adapters(["subject", "detail"], adapter_weights=[1.0, 1.0])
    both = gen(pipe, style="ink")
    assert differ(both, full) > MIN_CHANGE
    assert differ(both, gen(pipe, style_weights=MIXTURE)) > MIN_CHANGE  # styles still switch with two adapters on
    pipe.disable_lora()
    assert differ(gen(pipe, style="ink"), plain) < 1e-6


def test_lora_fuse_unfuse_keeps_the_style_module_intact(plugin_files):
    pipe = tiny_merged("sd15")
    style_state = {k: v.clone() for k, v in pipe.unet.class_embedding.state_dict().items()}
    plain = gen(pipe, style="neon")
    pipe.load_lora_weights(str(plugin_files["sd15"]["lora"]), adapter_name="subject")
    active = gen(pipe, style="neon")
    pipe.fuse_lora(lora_scale=1.0)
    fused_state = pipe.unet.class_embedding.state_dict()
    assert all(torch.equal(v, fused_state[k]) for k, v in style_state.items())  # codebook, MLP, FiLM untouched
    assert differ(gen(pipe, style="neon"), active) < 1e-5
    pipe.unfuse_lora()
    pipe.unload_lora_weights()
    assert all(torch.equal(v, pipe.unet.class_embedding.state_dict()[k]) for k, v in style_state.items())
    assert differ(gen(pipe, style="neon"), plain) < 1e-5
    assert differ(gen(pipe, style="neon"), gen(pipe, style="ink")) > MIN_CHANGE


@pytest.mark.parametrize("arch", ARCHS)
def test_controlnet_from_merged_unet_starts_as_identity(arch):
    """`ControlNetModel.from_unet(merged.unet)` works; untrained (zero convs), it leaves the styled image as it is."""
    import diffusers
    from diffusers import ControlNetModel

    from dmm_ray.export import bake
    from dmm_ray.plugins import DMMControlNetPipeline, DMMXLControlNetPipeline, with_controlnet
    from dmm_ray.tiny_plugins import control_image

    pipe = tiny_merged(arch)
    net = ControlNetModel.from_unet(pipe.unet, conditioning_embedding_out_channels=(16, 32))
    cpipe = with_controlnet(pipe, net)
    cpipe.set_progress_bar_config(disable=True)
    assert type(cpipe) is (DMMXLControlNetPipeline if arch == "sdxl" else DMMControlNetPipeline)
    assert cpipe.unet is pipe.unet and cpipe.vae is pipe.vae  # shared, not copied
    for selection in ({"style": "pixel"}, {"style_weights": MIXTURE}):
        assert differ(gen(cpipe, image=control_image(SIZE), **selection), gen(pipe, **selection)) < 1e-6
    baked = bake(cpipe, style="pixel")  # keeps the ControlNet (was the text-to-image pipeline without it)
    assert type(baked) is getattr(diffusers, f"StableDiffusion{'XL' if arch == 'sdxl' else ''}ControlNetPipeline") and baked.controlnet is net


@pytest.mark.parametrize("arch", ARCHS)
def test_save_pretrained_refuses_an_ip_adapter_and_saves_once_it_is_unloaded(arch, tmp_path):
    """save_pretrained with an IP-Adapter loaded wrote a folder whose UNet config had no image projection
    (diffusers sets encoder_hid_dim_type as an attribute only): it loaded back without the IP-Adapter, beside
    the image encoder it wrote, and a call with ip_adapter_image failed with an AttributeError on None. It is
    refused before anything is written, as a LoRA is; unloaded, the model saves and loads back as it was."""
    from dmm_ray.pipeline import load_dmm_pipeline
    from dmm_ray.tiny_plugins import make_ip_adapter

    pipe = tiny_merged(arch)
    pipe.load_ip_adapter(str(make_ip_adapter(pipe.unet, tmp_path / "ip", seed=3)), subfolder="", weight_name="ip_adapter.safetensors")
    with pytest.raises(ValueError, match=r"cannot save to .*IP-Adapter loaded: pipe.unload_ip_adapter\(\) first"):
        pipe.save_pretrained(tmp_path / "saved")
    assert not (tmp_path / "saved").exists()
    pipe.unload_ip_adapter()
    pipe.save_pretrained(tmp_path / "saved")
    back = load_dmm_pipeline(tmp_path / "saved")
    back.set_progress_bar_config(disable=True)
    assert back.unet.encoder_hid_proj is None and differ(gen(back, style="ink"), gen(pipe, style="ink")) < 1e-6


def test_bake_refuses_a_model_with_plugins_loaded(plugin_files):
    from dmm_ray.export import ExportError, bake

    pipe = tiny_merged("sd15")
    pipe.load_lora_weights(str(plugin_files["sd15"]["lora"]), adapter_name="subject")
    with pytest.raises(ExportError, match="LoRA"):
        bake(pipe, style="ink")
    pipe.unload_lora_weights()
    bake(pipe, style="ink")
    # diffusers sets config.encoder_hid_dim_type as an attribute only: config.get() did not see the IP-Adapter
    pipe.load_ip_adapter(str(plugin_files["sd15"]["ip_adapter"]), subfolder="", weight_name="ip_adapter.safetensors")
    with pytest.raises(ExportError, match="IP-Adapter loaded; bake first"):
        bake(pipe, style="ink")


def test_bake_refuses_the_lora_layers_delete_adapters_leaves(tmp_path):
    """bake read only `unet.peft_config`, which delete_adapters empties while PEFT's layers stay on the UNet
    (`to_q.base_layer`): it failed with "does not map onto a plain UNet: missing [...], unexpected [...base_layer...]"
    instead of naming the LoRA and what to do; unload_lora_weights() removes the layers and the bake goes on."""
    from dmm_ray.export import ExportError, bake
    from dmm_ray.tiny_plugins import make_lora

    pipe = tiny_merged("sd15")
    pipe.load_lora_weights(str(make_lora(pipe.unet, tmp_path / "lora", seed=1)), adapter_name="subject")
    pipe.delete_adapters("subject")
    assert not getattr(pipe.unet, "peft_config", None)  # what bake read: no adapter left, layers still there
    with pytest.raises(ExportError, match=r"LoRA adapters loaded; bake the merged model alone \(pipe.unload_lora_weights\(\)\)"):
        bake(pipe, style="ink")
    pipe.unload_lora_weights()
    bake(pipe, style="ink")


@pytest.mark.parametrize("arch", ARCHS)
def test_an_export_with_a_lora_or_ip_adapter_loaded_is_refused_and_a_fused_lora_is_written(plugin_files, arch, tmp_path):
    """A baked pipeline takes a LoRA (README); exporting it then wrote PEFT's layer names
    (`to_q.base_layer.weight`, `to_q.lora_A.subject.weight`) into the checkpoint: from_single_file failed
    on meta tensors, and a diffusers export loaded its attention layers at random weights. The export is
    refused, saying how to fold the LoRA in; after fuse_lora + unload_lora_weights the file carries it."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    from dmm_ray.export import ExportError, bake, export_pipeline, write_config_folder
    from dmm_ray.formats.single_file import export_single_file

    plain = bake(tiny_merged(arch), style="ink")
    plain.set_progress_bar_config(disable=True)
    plain.load_lora_weights(str(plugin_files[arch]["lora"]), adapter_name="subject")
    with_lora = gen(plain, styled=False)
    for fmt, out in (("single_file", tmp_path / "x.safetensors"), ("diffusers", tmp_path / "x")):
        with pytest.raises(ExportError, match=r"LoRA layers loaded \(unet\).*fuse_lora\(\) then pipe.unload_lora_weights\(\)"):
            export_pipeline(plain, out, fmt=fmt)
        assert not out.exists()
    with pytest.raises(ValueError, match="LoRA layers loaded"):
        export_single_file(plain, tmp_path / "x.safetensors")
    plain.fuse_lora()  # folded into PEFT's layers, which stay: still refused
    with pytest.raises(ExportError, match="LoRA layers loaded"):
        export_pipeline(plain, tmp_path / "x.safetensors")
    plain.unload_lora_weights()
    path = export_pipeline(plain, tmp_path / "x.safetensors")
    cls = StableDiffusionXLPipeline if arch == "sdxl" else StableDiffusionPipeline
    loaded = cls.from_single_file(str(path), config=str(write_config_folder(plain, tmp_path / "x.config")), local_files_only=True)
    loaded.set_progress_bar_config(disable=True)
    assert np.abs(gen(loaded, styled=False) - with_lora).max() < 1e-4  # the LoRA is in the file
    plain.load_ip_adapter(str(plugin_files[arch]["ip_adapter"]), subfolder="", weight_name="ip_adapter.safetensors")
    with pytest.raises(ExportError, match=r"IP-Adapter loaded: pipe.unload_ip_adapter\(\) first"):
        export_pipeline(plain, tmp_path / "y.safetensors")
    plain.unload_ip_adapter()
    assert export_pipeline(plain, tmp_path / "y.safetensors").is_file()


# ---- plugins with regional styles, and diffusers' from_pipe (QA, session 28) ---------------------
TWO_SAME = ((0, 0, 0.5, 1), (0.5, 0, 1, 1))


def _regions(style="ink"):
    from dmm_ray.regions import Region

    return [Region(box=box, style=style) for box in TWO_SAME]


def _run(pipe, **kw):
    return pipe(
        ["a red circle", "a blue square"],
        num_inference_steps=2,
        guidance_scale=5.0,
        height=SIZE,
        width=SIZE,
        output_type="pt",
        generator=[torch.Generator().manual_seed(i) for i in range(2)],
        **kw,
    ).images


def test_ip_adapter_with_regions_gives_each_view_its_own_image_embeds(plugin_files):
    """IP-Adapter's image embeddings are per pipeline sample ([uncond; cond] under CFG): the region
    views must get the rows of their sample. Two regions of one style then equal plain generation
    (they used to mix the unconditional and conditional image tokens: 0.68 apart on the demo model),
    with chunks too (max_batch); a panorama runs (it failed inside diffusers' attention)."""
    from dmm_ray.tiny_plugins import reference_image

    pipe = tiny_merged("sd15")
    pipe.load_ip_adapter(str(plugin_files["sd15"]["ip_adapter"]), subfolder="", weight_name="ip_adapter.safetensors")
    ref = reference_image()
    plain = _run(pipe, style="ink", ip_adapter_image=ref)
    torch.testing.assert_close(_run(pipe, regions=_regions(), ip_adapter_image=ref), plain, atol=1e-4, rtol=0)
    torch.testing.assert_close(_run(pipe, regions=_regions(), max_batch=3, ip_adapter_image=ref), plain, atol=1e-4, rtol=0)
    wide = pipe("a red circle", style_map=[(0, 1, "ink")], width=2 * SIZE, height=SIZE, num_inference_steps=2, output_type="pt", ip_adapter_image=ref)
    assert wide.images.shape[-1] == 2 * SIZE


def test_controlnet_with_regions_on_the_whole_canvas_and_a_clear_error_for_windows(plugin_files):
    """ControlNet residuals are per sample and cover the whole canvas: whole-canvas region views take
    their sample's rows (two regions of one style equal plain generation); cropped windows cannot use
    them and say so (it failed inside diffusers with a shape mismatch)."""
    from dmm_ray.plugins import with_controlnet
    from dmm_ray.regions import RegionError
    from dmm_ray.tiny_plugins import control_image

    pipe = with_controlnet(tiny_merged("sd15"), plugin_files["sd15"]["controlnet"])
    pipe.set_progress_bar_config(disable=True)
    image = control_image(SIZE)
    torch.testing.assert_close(_run(pipe, regions=_regions(), image=image), _run(pipe, style="ink", image=image), atol=1e-4, rtol=0)
    wide = image.resize((2 * SIZE, SIZE))  # native windows on a canvas twice the model's size: crops
    with pytest.raises(RegionError, match="whole-canvas region views only"):
        pipe("a red circle", regions=_regions(), region_window="native", image=wide, width=2 * SIZE, height=SIZE, num_inference_steps=2)


def test_controlnet_regions_without_a_size_draw_at_the_control_images_size():
    """Finding: a ControlNet pipeline draws at its control image's size when the call gives no height or
    width; with regions the canvas was the model's native size instead (a 32x16 control image squeezed to
    16x16, and a 16x16 image where the plain call made a 32x16 one). Regions now draw the plain call's canvas:
    two regions of one style equal it, with the size given on one side or on neither."""
    from dmm_ray.plugins import with_controlnet
    from dmm_ray.tiny_plugins import control_image, make_controlnet

    merged = tiny_merged("sd15")
    pipe = with_controlnet(merged, make_controlnet(merged.unet, seed=4, scale=0.1))
    pipe.set_progress_bar_config(disable=True)
    wide = control_image(SIZE).resize((2 * SIZE, SIZE))

    def run(**kw):
        gens = [torch.Generator().manual_seed(0)]
        return pipe("a red circle", image=wide, num_inference_steps=2, output_type="pt", generator=gens, **kw).images

    for size in ({}, {"height": SIZE}, {"width": 2 * SIZE}):
        plain = run(style="ink", **size)
        assert plain.shape[-2:] == (SIZE, 2 * SIZE)
        torch.testing.assert_close(run(regions=_regions(), **size), plain, atol=1e-4, rtol=0)


def test_with_controlnet_keeps_a_stock_pipelines_safety_checker():
    """with_controlnet forced safety_checker=None: on a stock SD1.5 pipeline with a safety checker the
    ControlNet pipeline it gave had none, where diffusers' from_pipe keeps it. A merged model (no checker)
    still gives a ControlNet pipeline without one."""
    from diffusers import StableDiffusionControlNetPipeline, StableDiffusionPipeline
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor

    from dmm_ray.plugins import DMMControlNetPipeline, with_controlnet
    from dmm_ray.tiny import tiny_sd_components
    from dmm_ray.tiny_plugins import make_controlnet

    tower = {"hidden_size": 32, "intermediate_size": 37, "num_attention_heads": 4, "num_hidden_layers": 2, "projection_dim": 32}
    checker = StableDiffusionSafetyChecker(
        CLIPConfig(text_config=tower, vision_config={**tower, "image_size": 32, "patch_size": 8}, projection_dim=32)
    ).eval()
    components = {**tiny_sd_components(seed=0), "safety_checker": checker, "feature_extractor": CLIPImageProcessor(crop_size=32, size=32)}
    stock = StableDiffusionPipeline(**{**components, "requires_safety_checker": True})
    controlnet = make_controlnet(stock.unet, seed=4)
    out = with_controlnet(stock, controlnet)
    assert type(out) is StableDiffusionControlNetPipeline and out.safety_checker is checker and out.config.requires_safety_checker
    merged = with_controlnet(tiny_merged("sd15"), controlnet)
    assert type(merged) is DMMControlNetPipeline and merged.safety_checker is None and not merged.config.requires_safety_checker


def test_from_pipe_carries_the_merged_unet_over():
    """diffusers' `from_pipe` keeps a component only when its type is the annotated one; a merged
    model's unet is a StyleUNet, so `DMMPipeline.from_pipe(pipe)` used to raise."""
    from dmm_ray.pipeline import DMMPipeline

    pipe = tiny_merged("sd15")
    again = DMMPipeline.from_pipe(pipe)
    assert again.unet is pipe.unet and again.styles == pipe.styles
    torch.testing.assert_close(_run(again, style="neon"), _run(pipe, style="neon"))


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("task", ["img2img", "inpaint"])
def test_with_controlnet_keeps_an_img2img_or_inpainting_pipelines_task(arch, task):
    """with_controlnet on an img2img / inpainting pipeline gave the text-to-image ControlNet pipeline, which
    takes no strength= and reads image= as the control: the task changed silently. It gives the ControlNet
    pipeline of the same task, over the same modules: an untrained ControlNet (`from_unet`, zero convs) leaves
    the image the task's own pipeline draws, and the style still changes it. A stock pipeline keeps its task too."""
    import diffusers
    from diffusers import ControlNetModel
    from PIL import Image

    from dmm_ray import plugins
    from dmm_ray.export import bake
    from dmm_ray.tiny_plugins import control_image, make_controlnet

    xl, kind = ("XL" if arch == "sdxl" else ""), ("Img2Img" if task == "img2img" else "Inpaint")
    merged = tiny_merged(arch)
    source = getattr(plugins, f"DMM{xl}{kind}Pipeline").from_pipe(merged)
    net = ControlNetModel.from_unet(merged.unet, conditioning_embedding_out_channels=(16, 32))
    cpipe = plugins.with_controlnet(source, net)
    assert type(cpipe) is getattr(plugins, f"DMM{xl}ControlNet{kind}Pipeline") and cpipe.unet is merged.unet
    stock = getattr(diffusers, f"StableDiffusion{xl}{kind}Pipeline").from_pipe(bake(merged, style="ink"))
    assert type(plugins.with_controlnet(stock, net)) is getattr(diffusers, f"StableDiffusion{xl}ControlNet{kind}Pipeline")
    rng = np.random.default_rng(0)
    init = Image.fromarray(rng.integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8))
    mask = Image.fromarray(np.pad(np.full((SIZE, SIZE // 2), 255, np.uint8), ((0, 0), (0, SIZE // 2))))
    task_kw = {"image": init, "strength": 0.75, **({"mask_image": mask} if task == "inpaint" else {})}
    ink = gen(cpipe, style="ink", control_image=control_image(SIZE), **task_kw)
    np.testing.assert_allclose(ink, gen(source, style="ink", **task_kw), atol=1e-5)
    assert differ(ink, gen(cpipe, style="neon", control_image=control_image(SIZE), **task_kw)) > MIN_CHANGE
    # baked, it keeps its task and its ControlNet (bake gave the text-to-image pipeline, which ignored image= and the
    # control without a word): the same image as the merged model's, the ControlNet a trained one
    trained = make_controlnet(merged.unet, seed=4, scale=0.1)
    cpipe = plugins.with_controlnet(source, trained)
    baked = bake(cpipe, style="ink")
    assert type(baked) is getattr(diffusers, f"StableDiffusion{xl}ControlNet{kind}Pipeline") and baked.controlnet is trained
    np.testing.assert_allclose(
        gen(baked, styled=False, control_image=control_image(SIZE), **task_kw),
        gen(cpipe, style="ink", control_image=control_image(SIZE), **task_kw),
        atol=1e-5,
    )


def test_from_pipe_keeps_fuse_styles_off():
    """`fuse_styles = False` (the per-sample path instead of the fold) is an attribute, which diffusers'
    from_pipe dropped: the img2img, inpainting and ControlNet pipelines made from such a pipe folded again."""
    from dmm_ray.pipeline import DMMPipeline
    from dmm_ray.plugins import DMMImg2ImgPipeline, DMMInpaintPipeline, with_controlnet
    from dmm_ray.tiny_plugins import make_controlnet

    pipe = tiny_merged("sd15")
    assert DMMImg2ImgPipeline.from_pipe(pipe).fuse_styles is True  # the default, kept
    pipe.fuse_styles = False
    made = [DMMPipeline.from_pipe(pipe), DMMImg2ImgPipeline.from_pipe(pipe), DMMInpaintPipeline.from_pipe(pipe)]
    made.append(with_controlnet(pipe, make_controlnet(pipe.unet, seed=4)))
    assert [p.fuse_styles for p in made] == [False] * 4


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("task", ["img2img", "inpaint"])
def test_img2img_and_inpainting_in_a_style_equal_diffusers_on_the_baked_style(arch, task):
    """DMM(XL)Img2ImgPipeline / DMM(XL)InpaintPipeline, made with from_pipe over the merged model's
    modules, give what diffusers' own pipeline gives on the same style baked into a stock UNet (the
    bake is exact); another style gives another image; regions are refused with a clear error."""
    import diffusers
    from PIL import Image

    from dmm_ray import plugins
    from dmm_ray.export import bake

    merged = tiny_merged(arch)
    xl = "XL" if arch == "sdxl" else ""
    styled_cls = getattr(plugins, f"DMM{xl}{'Img2Img' if task == 'img2img' else 'Inpaint'}Pipeline")
    stock_cls = getattr(diffusers, f"StableDiffusion{xl}{'Img2Img' if task == 'img2img' else 'Inpaint'}Pipeline")
    rng = np.random.default_rng(0)
    init = Image.fromarray(rng.integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8))
    mask = Image.fromarray(np.pad(np.full((SIZE, SIZE // 2), 255, np.uint8), ((0, 0), (0, SIZE // 2))))
    task_kw = {"image": init, "strength": 0.75, **({"mask_image": mask, "height": SIZE, "width": SIZE} if task == "inpaint" else {})}

    def run(pipe, **kw):
        pipe.set_progress_bar_config(disable=True)
        gen = torch.Generator().manual_seed(0)
        return pipe(
            PROMPT, negative_prompt=NEGATIVE, num_inference_steps=3, guidance_scale=5.0, output_type="np", generator=gen, **task_kw, **kw
        ).images

    styled = styled_cls.from_pipe(merged)
    assert styled.unet is merged.unet
    stock = stock_cls.from_pipe(bake(merged, style="ink"))  # the baked style's stock pipeline
    ink = run(styled, style="ink")
    np.testing.assert_allclose(ink, run(stock), atol=1e-4)
    baked = bake(styled, style="ink")  # baked from the img2img / inpainting pipeline itself: that task's stock pipeline
    assert type(baked) is stock_cls and baked.vae is merged.vae  # was the text-to-image one, drawing from noise
    np.testing.assert_allclose(run(baked), ink, atol=1e-4)
    assert differ(ink, run(styled, style="neon")) > MIN_CHANGE
    with pytest.raises(ValueError, match="starts from an image: regions= and panoramas"):
        run(styled, regions=_regions())


def test_with_controlnet_refuses_a_controlnet_made_for_another_unet_or_vae():
    """An SDXL ControlNet on an SD1.5 model failed in its forward with "argument of type 'NoneType' is not
    iterable", an SD1.5 one on SDXL with "mat1 and mat2 shapes cannot be multiplied", and one whose conditioning
    embedding downsamples the control image 8x (diffusers' default) over a VAE that downsamples 2x with a tensor
    size mismatch. with_controlnet refuses them, naming what differs; a matching one (also in a list) is taken."""
    from diffusers import ControlNetModel

    from dmm_ray.plugins import with_controlnet
    from dmm_ray.tiny_plugins import control_image, make_controlnet

    sd15, sdxl = tiny_merged("sd15"), tiny_merged("sdxl")
    fits15, fitsxl = make_controlnet(sd15.unet, seed=4), make_controlnet(sdxl.unet, seed=4)
    with pytest.raises(ValueError, match=r"not made for this SD1.5 model's UNet: cross_attention_dim 80 \(the UNet's: 32\)"):
        with_controlnet(sd15, fitsxl)
    with pytest.raises(ValueError, match=r"not made for this SDXL model's UNet: .*addition_embed_type None \(the UNet's: 'text_time'\)"):
        with_controlnet(sdxl, fits15)
    with pytest.raises(ValueError, match=r"ControlNet 1 was not made for this SD1.5"):
        with_controlnet(sd15, [fits15, fitsxl])
    with pytest.raises(ValueError, match=r"downsamples the control image 8x .*\(16, 32, 96, 256\)\), the VAE 2x.*make it with 2 conditioning"):
        with_controlnet(sd15, ControlNetModel.from_unet(sd15.unet))
    both = with_controlnet(sd15, [fits15, fits15])
    both.set_progress_bar_config(disable=True)
    assert np.isfinite(gen(both, style="ink", image=[control_image(SIZE)] * 2, controlnet_conditioning_scale=[1.0, 0.5])).all()


def test_the_default_strength_is_read_once_per_class_not_on_each_call(monkeypatch):
    """Review mend: check_denoising_steps read the loop's signature (inspect.signature, for its default strength)
    on every img2img / inpainting call; _styled_call reads it once, when it wraps the loop."""
    import inspect

    from diffusers import StableDiffusionImg2ImgPipeline
    from PIL import Image

    from dmm_ray import plugins

    pipe = plugins.DMMImg2ImgPipeline.from_pipe(tiny_merged("sd15"))
    pipe.set_progress_bar_config(disable=True)
    init = Image.fromarray(np.zeros((SIZE, SIZE, 3), np.uint8))
    read, signature = [], inspect.signature
    monkeypatch.setattr(inspect, "signature", lambda f, *a, **k: read.append(f) or signature(f, *a, **k))
    for _ in range(2):
        with pytest.raises(ValueError, match="denoises no step"):  # the check runs, before any UNet step
            gen(pipe, style="ink", steps=2, strength=0.3, image=init)
    assert StableDiffusionImg2ImgPipeline.__call__ not in read  # was read on each call


@pytest.mark.parametrize("arch", ARCHS)
def test_img2img_and_inpainting_with_no_denoising_step_name_steps_and_strength(arch):
    """These loops denoise the last int(num_inference_steps * strength) steps. Where that is 0 (2 steps at strength
    0.3; the few-step model's 4 steps at 0.2), img2img and the ControlNet img2img / inpainting pipelines failed inside
    the UNet with "cannot reshape tensor of 0 elements". A ValueError names the two numbers and what would do, also for
    a strength left at the pipeline's default (SDXL img2img: 0.3); one step is enough to run."""
    from PIL import Image

    from dmm_ray import plugins
    from dmm_ray.tiny_plugins import control_image, make_controlnet

    xl = "XL" if arch == "sdxl" else ""
    merged = tiny_merged(arch)
    net = make_controlnet(merged.unet, seed=4)
    init = Image.fromarray(np.random.default_rng(0).integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8))
    mask = Image.fromarray(np.pad(np.full((SIZE, SIZE // 2), 255, np.uint8), ((0, 0), (0, SIZE // 2))))
    for kind in ("Img2Img", "Inpaint"):
        source = getattr(plugins, f"DMM{xl}{kind}Pipeline").from_pipe(merged)
        task_kw = {"image": init, **({"mask_image": mask} if kind == "Inpaint" else {})}
        for pipe, extra in ((source, {}), (plugins.with_controlnet(source, net), {"control_image": control_image(SIZE)})):
            pipe.set_progress_bar_config(disable=True)
            with pytest.raises(
                ValueError,
                match=r"num_inference_steps=2 at strength=0.3 denoises no step .*raise strength to at least 0.5 or num_inference_steps to at least 4",
            ):
                gen(pipe, style="ink", steps=2, strength=0.3, **task_kw, **extra)
            assert np.isfinite(gen(pipe, style="ink", steps=4, strength=0.3, **task_kw, **extra)).all()  # int(1.2): one step
    if arch == "sdxl":  # the default strength, 0.3
        with pytest.raises(ValueError, match=r"num_inference_steps=3 at strength=0.3 denoises no step"):
            gen(plugins.DMMXLImg2ImgPipeline.from_pipe(merged), style="ink", steps=3, image=init)
