"""Regional styles and panoramas (dmm_ray/regions.py) on tiny seeded models.

The tiny SD components have a 2x VAE and an 8x8-latent UNet: native images are 16 px; 32 px
images have 16x16 latents. The codebook is spread (x20) so styles visibly differ untrained.
"""

from contextlib import nullcontext

import numpy as np
import pytest
import torch

from dmm_ray import DMMPipeline, StyleUNet
from dmm_ray.models.style_unet import StyleError
from dmm_ray.regions import Region, RegionError, build_panorama_views, build_region_views, feathered, sweep, window_starts

STYLES = ["noir", "neon", "pastel"]
STEPS = 3


@pytest.fixture(scope="module")
def pipe():
    from dmm_ray.tiny import tiny_sd_components

    c = tiny_sd_components(seed=0)
    torch.manual_seed(0)
    student = StyleUNet.from_unet(c["unet"], STYLES)
    with torch.no_grad():
        student.class_embedding.codebook.weight.mul_(20)
    pipe = DMMPipeline.from_components(student, c["vae"], c["text_encoder"], c["tokenizer"], c["scheduler"])
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _gen(pipe, prompts=("a red circle",), size=(32, 32), **kw):
    prompts = list(prompts)
    generators = [torch.Generator().manual_seed(7 + i) for i in range(len(prompts))]
    return pipe(prompts, num_inference_steps=STEPS, height=size[0], width=size[1], output_type="pt", generator=generators, **kw).images


@pytest.fixture
def unet_calls(pipe):
    """Counter hook on the UNet's first conv: one entry (the batch size) per real network pass."""
    calls = []
    handle = pipe.unet.conv_in.register_forward_hook(lambda _m, inputs, _o: calls.append(inputs[0].shape[0]))
    yield calls
    handle.remove()


LEFT, RIGHT, ALL = (0, 0, 0.5, 1), (0.5, 0, 1, 1), (0, 0, 1, 1)


# ---- equivalence with plain generation ------------------------------------------------------
def test_one_region_covering_everything_equals_plain_bit_for_bit(pipe):
    prompts = ["a red circle", "a blue square"]
    plain = _gen(pipe, prompts, style="neon")
    regional = _gen(pipe, prompts, regions=[Region(box=ALL, style="neon")])
    assert torch.equal(regional, plain)
    mask = _gen(pipe, prompts, regions=[Region(mask=torch.ones(32, 32), style_weights={"neon": 1})])
    assert torch.equal(mask, plain)


def test_images_per_prompt_and_region_prompt_batch_equal_plain(pipe):
    gens = lambda: [torch.Generator().manual_seed(k) for k in range(4)]  # noqa: E731
    kw = dict(num_inference_steps=2, height=32, width=32, output_type="pt", num_images_per_prompt=2)
    plain = pipe(["a red circle", "a blue square"], style="noir", generator=gens(), **kw).images
    regional = pipe(["a red circle", "a blue square"], regions=[Region(box=ALL, style="noir")], generator=gens(), **kw).images
    assert torch.equal(regional, plain)


def test_two_regions_with_the_same_style_equal_plain(pipe):
    plain = _gen(pipe, style="pastel")
    two = _gen(pipe, regions=[Region(box=LEFT, style="pastel"), Region(box=RIGHT, style="pastel")], feather=6)
    torch.testing.assert_close(two, plain, rtol=0, atol=1e-5)
    overlapping = _gen(pipe, regions=[Region(box=(0, 0, 0.7, 1), style=2), Region(box=(0.3, 0, 1, 1), style="pastel")])
    torch.testing.assert_close(overlapping, plain, rtol=0, atol=1e-5)


def test_region_prompt_equal_to_the_call_prompt_changes_nothing_and_another_prompt_does(pipe):
    plain = _gen(pipe, style="noir")
    same = _gen(pipe, regions=[Region(box=ALL, style="noir", prompt="a red circle")])
    torch.testing.assert_close(same, plain, rtol=0, atol=1e-5)
    other = _gen(pipe, regions=[Region(box=LEFT, style="noir"), Region(box=RIGHT, style="noir", prompt="a blue square")])
    assert (other - plain).abs().max() > 1e-3


def test_region_prompts_are_encoded_as_the_call_encodes_its_own(pipe, monkeypatch):
    """clip_skip and the LoRA scale (cross_attention_kwargs["scale"]) reach the regions' prompts too: a
    region prompt equal to the call's prompt changes nothing with clip_skip either."""
    te = pipe.text_encoder
    if not hasattr(te, "text_model"):  # transformers 5's CLIPTextModel; diffusers' clip_skip reads .text_model
        monkeypatch.setitem(te.__dict__, "text_model", te)  # not a submodule: te would hold itself
    plain = _gen(pipe, style="noir", clip_skip=1)
    assert (plain - _gen(pipe, style="noir")).abs().max() > 1e-3  # clip_skip changes the image
    same = _gen(pipe, regions=[Region(box=ALL, style="noir", prompt="a red circle")], clip_skip=1)
    torch.testing.assert_close(same, plain, rtol=0, atol=1e-5)
    seen = []
    encode = pipe.encode_prompt
    monkeypatch.setattr(pipe, "encode_prompt", lambda *a, **k: seen.append((k.get("lora_scale"), k.get("clip_skip"))) or encode(*a, **k))
    _gen(pipe, regions=[Region(box=ALL, style="noir", prompt="a blue star")], clip_skip=1, cross_attention_kwargs={"scale": 0.5})
    assert seen == [(0.5, 1), (0.5, 1)]  # the call's prompt, then the regions'


def test_region_prompts_with_longer_prompt_embeds_are_a_region_error(pipe):
    """Long-prompt tools (compel) give prompt_embeds of 154 tokens; a region prompt encodes to 77, and one
    UNet batch cannot hold both: a RegionError saying so, not a torch.stack error."""
    embeds, _ = pipe.encode_prompt("a red circle", "cpu", 1, False)  # (1, 77, d)
    long = torch.cat([embeds, embeds], dim=1)  # (1, 154, d)
    kw = dict(num_inference_steps=2, height=32, width=32, output_type="pt", prompt_embeds=long, negative_prompt_embeds=torch.zeros_like(long))
    assert pipe(regions=[Region(box=ALL, style="noir")], **kw).images.shape == (1, 3, 32, 32)  # no region prompt: fine
    with pytest.raises(RegionError, match="regions' prompts encode to 77 tokens but prompt_embeds has 154"):
        pipe(regions=[Region(box=LEFT, style="noir"), Region(box=RIGHT, style="neon", prompt="a blue star")], **kw)
    assert "forward" not in pipe.unet.__dict__


def test_two_styles_left_looks_like_a_right_like_b(pipe):
    a, b = _gen(pipe, style="noir"), _gen(pipe, style="neon")
    mixed = _gen(pipe, regions=[Region(box=LEFT, style="noir"), Region(box=RIGHT, style="neon")], feather=0)
    left, right = (slice(None), slice(None), slice(None), slice(0, 12)), (slice(None), slice(None), slice(None), slice(20, 32))
    assert (mixed[left] - a[left]).abs().mean() < (mixed[left] - b[left]).abs().mean()
    assert (mixed[right] - b[right]).abs().mean() < (mixed[right] - a[right]).abs().mean()


# ---- one UNet call per step -----------------------------------------------------------------
def test_one_batched_unet_call_per_step_for_k_regions(pipe, unet_calls):
    regions = [Region(box=(i / 4, 0, (i + 1) / 4, 1), style=STYLES[i % 3]) for i in range(4)]
    _gen(pipe, ["a red circle", "a blue square"], regions=regions)
    assert len(unet_calls) == STEPS  # one pass per denoising step
    assert unet_calls == [2 * 2 * 4] * STEPS  # CFG halves x 2 prompts x 4 regions, all in that one pass
    unet_calls.clear()
    _gen(pipe, regions=regions, guidance_scale=1.0)  # no CFG: one half
    assert unet_calls == [4] * STEPS
    assert "forward" not in pipe.unet.__dict__  # the regional forward is removed after the call


def test_regional_forward_is_restored_after_an_error(pipe):
    with pytest.raises(ValueError):
        _gen(pipe, regions=[Region(box=ALL, style="noir")], negative_prompt=["x", "y", "z"])  # diffusers rejects the batch
    assert "forward" not in pipe.unet.__dict__
    assert _gen(pipe, style="noir").shape == (1, 3, 32, 32)


# ---- region windows (region_window="native") --------------------------------------------------
def test_region_windows_hold_all_of_each_views_weight_in_one_size():
    from dmm_ray.regions import build_region_views, region_windows

    bands = [Region(box=(i / 4, 0, (i + 1) / 4, 1), style=STYLES[i % 3]) for i in range(4)]
    full, _ = build_region_views(bands, STYLES, (16, 128), 2, feather=2)  # latent 8 x 64, sigma 1 latent px
    windowed = region_windows(full, (8, 8))
    sizes = {(v.y1 - v.y0, v.x1 - v.x0) for v in windowed}
    assert sizes == {(8, 22)}  # a 16-cell band + 3 sigma of feather each side; one size for one batched call
    total = torch.zeros(8, 64)
    for f, w in zip(full, windowed):
        assert 0 <= w.x0 and w.x1 <= 64 and w.weight.shape == (8, 22)
        torch.testing.assert_close(w.weight.sum(), f.weight.sum())  # none of the view's weight is cut off
        total[w.window] += w.weight
    torch.testing.assert_close(total, torch.ones(8, 64))  # still a partition of unity
    wide = region_windows(full, (8, 40))  # a larger minimum wins
    assert {(v.x1 - v.x0) for v in wide} == {40} and wide[0].x0 == 0 and wide[-1].x1 == 64
    same = region_windows(full, (8, 64))  # the canvas: unchanged
    assert all((v.x0, v.x1) == (0, 64) for v in same)


def test_region_windows_one_call_per_step_over_the_windows(pipe, unet_calls):
    shapes = []
    handle = pipe.unet.conv_in.register_forward_hook(lambda _m, inputs, _o: shapes.append(tuple(inputs[0].shape)))
    bands = [Region(box=(i / 4, 0, (i + 1) / 4, 1), style=STYLES[i % 3]) for i in range(4)]
    try:
        image = _gen(pipe, size=(16, 128), regions=bands, feather=2, region_window="native")
    finally:
        handle.remove()
    assert image.shape == (1, 3, 16, 128)
    assert shapes == [(2 * 4, 4, 8, 22)] * STEPS  # ONE pass per step: CFG x 4 windows of 22 of the 64 latent columns


def test_region_window_in_pixels_takes_numpy_integers(pipe):
    """Finding: region_window=np.int64(16) was refused ("must be ... a positive multiple of 2 pixels, got
    np.int64(16)") where max_batch= and window_stride= take numpy integers; 16 px is the tiny model's native size."""
    regions = [Region(box=LEFT, style="noir"), Region(box=RIGHT, style="neon")]
    native = _gen(pipe, size=(16, 64), regions=regions, region_window="native")
    for window in (16, np.int64(16), np.int32(16)):
        assert torch.equal(_gen(pipe, size=(16, 64), regions=regions, region_window=window), native)


def test_a_whole_float_canvas_size_is_taken_as_the_plain_call_takes_it(pipe):
    """Finding: height=32.0 (which the plain call takes) failed with regions and panoramas in a bare TypeError
    ("slice indices must be integers"): the views' latent windows were sliced by a float. It is the int size."""
    kw = dict(num_inference_steps=2, output_type="pt")
    regions = [Region(box=LEFT, style="noir"), Region(box=RIGHT, style="neon")]
    for call in (dict(regions=regions), dict(style_map=sweep("noir", "neon"))):
        gens = lambda: [torch.Generator().manual_seed(0)]  # noqa: E731
        whole = pipe("a red circle", height=16, width=32, generator=gens(), **call, **kw).images
        torch.testing.assert_close(pipe("a red circle", height=16.0, width=32.0, generator=gens(), **call, **kw).images, whole, rtol=0, atol=0)
    with pytest.raises(RegionError, match=r"height and width must be multiples of 8, got 16.5x32"):
        pipe("a red circle", height=16.5, width=32, regions=regions, **kw)


def test_region_windows_one_full_region_is_plain_and_views_do_not_see_far_regions(pipe):
    plain = _gen(pipe, size=(16, 128), style="neon")
    one = _gen(pipe, size=(16, 128), regions=[Region(box=ALL, style="neon")], region_window="native")
    assert torch.equal(one, plain)  # its window is the whole canvas

    def bands(last):
        return [Region(box=(i / 4, 0, (i + 1) / 4, 1), style=s) for i, s in enumerate(["noir", "neon", "pastel", last])]

    def latents(**kw):  # the latents, not the images: the VAE decoder's mid-block attention is global
        generator = [torch.Generator().manual_seed(7)]
        return pipe("a red circle", num_inference_steps=STEPS, height=16, width=128, output_type="latent", generator=generator, **kw).images

    left = (slice(None), slice(None), slice(None), slice(0, 4))  # latent columns 0-3: band 0 of 64
    windowed = [latents(regions=bands(s), feather=2, region_window="native") for s in ("noir", "neon")]
    canvas = [latents(regions=bands(s), feather=2) for s in ("noir", "neon")]
    # Whole-canvas views: band 0's view sees the last band's content, so its style reaches the left edge.
    assert (canvas[0][left] - canvas[1][left]).abs().max() > 1e-4
    # Windows: in 3 steps the last band's influence moves one window per step (band 3 -> 2 -> 1) and never
    # reaches band 0's first columns.
    assert torch.equal(windowed[0][left], windowed[1][left])
    assert (windowed[0] - windowed[1]).abs().max() > 1e-3  # the last band itself did change


def test_region_decode_decodes_each_region_window_alone_with_its_own_statistics(pipe):
    from dmm_ray.regions import DECODE_MARGIN, build_region_views, decoding_region, region_windows

    bands = [Region(box=(i / 4, 0, (i + 1) / 4, 1), style=s) for i, s in enumerate(["noir", "neon", "pastel", "noir"])]
    kw = dict(size=(16, 128), regions=bands, feather=2, region_window="native")
    joint = _gen(pipe, **kw)
    decoded = _gen(pipe, **kw, region_decode=True)
    assert "decode" not in pipe.vae.__dict__  # the regional decode is removed after the call
    # and so are the region norms and attention masks
    assert not any("forward" in m.__dict__ for m in pipe.vae.decoder.modules())
    generator = [torch.Generator().manual_seed(7)]
    latents = pipe(
        ["a red circle"],
        num_inference_steps=STEPS,
        height=16,
        width=128,
        output_type="latent",
        generator=generator,
        **{k: v for k, v in kw.items() if k != "size"},
    ).images
    full, _ = build_region_views(bands, STYLES, (16, 128), 2, feather=2)
    # the widest weight (a middle band: 16 columns + 3 each side) plus the margin each side
    width = 16 + 2 * 3 + 2 * DECODE_MARGIN
    first = region_windows(full, (8, width))[0]  # band 0's window: latent columns 0..width
    assert (first.x0, first.x1) == (0, width)
    window = latents[..., first.x0 : first.x1] / pipe.vae.config.scaling_factor

    def decode(as_region: bool):
        with torch.no_grad(), decoding_region(pipe.vae.decoder, first.weight) if as_region else nullcontext():
            return (pipe.vae.decode(window, return_dict=False)[0] / 2 + 0.5).clamp(0, 1)

    alone, alone_plain_norms = decode(True), decode(False)
    core = (slice(None), slice(None), slice(None), slice(0, 20))  # image columns 0-19: only band 0's weight
    torch.testing.assert_close(decoded[core], alone[core], rtol=0, atol=1e-5)  # band 0's window, decoded as band 0
    assert (alone_plain_norms[core] - alone[core]).abs().max() > 1e-3  # the margin's content would shift the statistics
    assert (joint[core] - alone[core]).abs().max() > 1e-3  # one decode of the whole canvas mixes the bands
    assert torch.isfinite(decoded).all() and decoded.shape == joint.shape


def test_region_norm_takes_its_statistics_from_the_region_alone():
    from dmm_ray.regions import RegionNorm

    torch.manual_seed(0)
    norm = torch.nn.GroupNorm(4, 16, eps=1e-6)
    torch.nn.init.normal_(norm.weight), torch.nn.init.normal_(norm.bias)
    x = torch.randn(2, 16, 8, 12) * 3 + 1  # (B, C, h, w): a map at 2x the (4, 6) latent window
    with torch.no_grad():
        # a weight of ones is the plain GroupNorm, on maps and on the mid-block attention's (B, C, N) tokens
        torch.testing.assert_close(RegionNorm(norm, torch.ones(4, 6))(x), norm(x), rtol=0, atol=1e-5)
        torch.testing.assert_close(RegionNorm(norm, torch.ones(4, 6))(x.flatten(2)), norm(x.flatten(2)), rtol=0, atol=1e-5)
        left = torch.zeros(4, 6)
        left[:, :2] = 1  # the region: the first 2 latent columns = the first 4 of the map
        y = RegionNorm(norm, left)(x)
        torch.testing.assert_close(y[..., :4], norm(x[..., :4]), rtol=0, atol=1e-5)  # as if the region were alone
        louder = x.clone()
        louder[..., 4:] = louder[..., 4:] * 10 - 5  # the rest of the window changes: the region's output does not
        torch.testing.assert_close(RegionNorm(norm, left)(louder)[..., :4], y[..., :4], rtol=0, atol=0)
        assert (norm(louder)[..., :4] - norm(x)[..., :4]).abs().max() > 0.1  # a plain GroupNorm's would


def test_decoding_region_attends_to_the_region_alone(pipe):
    """The VAE mid-block's attention, under decoding_region with a 0/1 weight: the region's tokens come
    out as the block applied to the region alone, whatever the rest of the window holds."""
    from dmm_ray.regions import decoding_region

    block = pipe.vae.decoder.mid_block.attentions[0]
    torch.manual_seed(1)
    C = block.group_norm.num_channels
    x = torch.randn(1, C, 4, 6)  # (B, C, h, w) at the latent size: the mid-block's resolution
    left = torch.zeros(4, 6)
    left[:, :3] = 1
    with torch.no_grad():
        alone = block(x[..., :3].contiguous())
        with decoding_region(pipe.vae.decoder, left):
            y = block(x)
            louder = x.clone()
            louder[..., 3:] = louder[..., 3:] * 10 - 5
            y_louder = block(louder)
        plain = block(x)
    assert "forward" not in block.__dict__  # restored after the context
    torch.testing.assert_close(y[..., :3], alone, rtol=0, atol=1e-5)
    torch.testing.assert_close(y_louder[..., :3], y[..., :3], rtol=0, atol=1e-5)
    assert (plain[..., :3] - alone).abs().max() > 1e-3  # the plain block reads the other columns' keys


def test_region_decode_under_vae_tiling_decodes_each_window_whole(pipe):
    """`vae.enable_tiling()` (tiles of 16 latent cells here, 64 on SD1.5) would cut a decode window (native
    size + the margin: 12 x 20 cells) into tiles that its region's weight does not map onto."""
    two = dict(size=(16, 64), regions=[Region(box=LEFT, style="noir"), Region(box=RIGHT, style="neon")], region_decode=True)
    untiled = _gen(pipe, **two)
    vae, tile = pipe.vae, pipe.vae.tile_latent_min_size
    vae.enable_tiling()
    try:
        vae.tile_latent_min_size = 8  # below the windows' width
        assert torch.equal(_gen(pipe, **two), untiled)
        assert vae.use_tiling
    finally:
        vae.disable_tiling()
        vae.tile_latent_min_size = tile


def test_region_decode_with_a_single_window_is_the_plain_decode(pipe):
    plain = _gen(pipe, size=(16, 128), style="neon")
    assert torch.equal(_gen(pipe, size=(16, 128), regions=[Region(box=ALL, style="neon")], region_decode=True), plain)
    two = [Region(box=LEFT, style="noir"), Region(box=RIGHT, style="neon")]
    native = dict(size=(16, 16), regions=two)  # at the native size every window is the canvas
    assert torch.equal(_gen(pipe, **native, region_decode=True), _gen(pipe, **native))


# ---- panoramas ------------------------------------------------------------------------------
def test_panorama_at_native_size_equals_plain(pipe):
    plain = _gen(pipe, size=(16, 16), style="neon")
    pano = _gen(pipe, size=(16, 16), style_map=[(0, 1, "neon")])
    assert torch.equal(pano, plain)


def test_panorama_style_fills_what_the_style_map_leaves(pipe):
    """style= is the panorama's default: it takes the columns no style_map range covers (that used to
    be an error), so a half map plus style= equals the full map with style= as its other half; numpy
    integers work for max_batch."""
    half = _gen(pipe, size=(16, 64), style_map=[(0, 0.5, "noir")], style="neon", window_stride=8)
    full = _gen(pipe, size=(16, 64), style_map=[(0, 0.5, "noir"), (0.5, 1, "neon")], window_stride=8, max_batch=np.int64(4))
    torch.testing.assert_close(half, full, rtol=0, atol=1e-5)


def test_panorama_windows_style_map_and_max_batch_chunks(pipe, unet_calls):
    # 16 x 64 px: latent 8 x 32, native windows of 8 with stride 4 -> 7 windows
    image = _gen(pipe, size=(16, 64), style_map=[(0, 0.5, "noir"), (0.5, 1, "neon")], window_stride=8, max_batch=4)
    assert image.shape == (1, 3, 16, 64)
    rows = 2 * 7  # CFG x windows
    assert unet_calls == [4, 4, 4, 2] * STEPS and sum(unet_calls) == rows * STEPS
    unet_calls.clear()
    one_call = _gen(pipe, size=(16, 64), style_map=[(0, 0.5, "noir"), (0.5, 1, "neon")], window_stride=8)
    assert unet_calls == [rows] * STEPS
    torch.testing.assert_close(one_call, image, rtol=0, atol=1e-5)  # chunking changes nothing


def test_panorama_sweep_gives_each_window_its_mixture():
    views = build_panorama_views(STYLES, (16, 64), 2, window=16, stride=8, style_map=sweep("noir", "neon"))
    centres = [(v.x0 + v.x1) / 2 / 32 for v in views]
    for v, x in zip(views, centres):
        torch.testing.assert_close(v.style_row, torch.tensor([1 - x, x, 0.0]))
    total = torch.zeros(8, 32)
    for v in views:
        total[v.y0 : v.y1, v.x0 : v.x1] += v.weight
    torch.testing.assert_close(total, torch.ones(8, 32))  # normalised blend weights


def test_panorama_of_one_cell_windows_steps_one_cell():
    """A model whose native window is one latent cell (a UNet config with sample_size 1) stepped its windows
    by half a window, 0 cells: range() raised "arg 3 must not be zero" instead of the panorama being drawn."""
    views = build_panorama_views(STYLES, (8, 16), 2, window=2, style_map=[(0, 0.5, "noir"), (0.5, 1, "neon")])
    assert [(v.y0, v.x0) for v in views] == [(y, x) for y in range(4) for x in range(8)]  # every cell its own window
    assert [STYLES[int(v.style_row.argmax())] for v in views[:8]] == ["noir"] * 4 + ["neon"] * 4


def test_style_map_entry_hidden_by_an_earlier_overlapping_one_is_refused():
    """Finding: a window takes the first entry holding its centre, so [(0, 1, "noir"), (0.5, 1, "neon")]
    rendered an all-noir panorama: neon was dropped silently, as an entry holding no centre used to be.
    Overlaps that leave each style some window, or repeat the style they cover, still render."""
    styles = lambda style_map: [STYLES[int(v.style_row.argmax())] for v in build_panorama_views(STYLES, (16, 64), 2, 16, 8, style_map)]  # noqa: E731
    for style_map, words in (
        (
            [(0, 1, "noir"), (0.5, 1, "neon")],
            r"style_map entry 1 \(0.5..1\) overlaps entry 0 \(0..1\), which come\(s\) first at every window centre it holds \(x = 0.500, 0.625, 0.750, 0.875 of",
        ),
        (
            [(0, 0.5, "noir"), (0, 1, "pastel"), (0.3, 0.6, "neon")],
            r"style_map entry 2 \(0.3..0.6\) overlaps entry 0 \(0..0.5\), entry 1 \(0..1\), .* \(x = 0.375, 0.500 of",
        ),
    ):
        with pytest.raises(RegionError, match=words + r" the width\): a window takes the first range .*entry \d's style would not appear"):
            styles(style_map)
    assert styles([(0, 0.6, "noir"), (0.4, 1, "neon")]) == ["noir"] * 4 + ["neon"] * 3  # a partial overlap: both appear
    assert styles([(0, 1, "noir"), (0.5, 1, "noir")]) == ["noir"] * 7  # covered by its own style: nothing is lost


def test_window_starts_cover_the_canvas_flush_with_the_end():
    assert window_starts(32, 8, 4) == list(range(0, 25, 4))
    assert window_starts(30, 8, 8) == [0, 8, 16, 22]
    assert window_starts(8, 8, 4) == [0]


# ---- feathering -----------------------------------------------------------------------------
def test_gaussian_feathering():
    mask = torch.zeros(16, 16)
    mask[:, :8] = 1
    assert torch.equal(feathered(mask, 0), mask)
    soft = feathered(mask, 1.5)
    torch.testing.assert_close(soft[:, 0], torch.ones(16))  # the canvas edge stays solid
    row = soft[5]
    assert all(row[i] >= row[i + 1] for i in range(15)) and 0.3 < row[7] < 1 and 0 < row[8] < 0.7
    torch.testing.assert_close(feathered(torch.ones(8, 8), 2.0), torch.ones(8, 8))
    torch.testing.assert_close(soft + feathered(1 - mask, 1.5), torch.ones(16, 16))  # complementary masks sum to 1
    for tiny in (1e-170, 5e-324):  # sigma**2 underflows to 0: the kernel was 0/0 = NaN (a black image)
        assert torch.equal(feathered(mask, tiny), mask)


def test_feathering_and_masks_follow_the_masks_device(monkeypatch):
    """Finding: the feather kernel was built on the CPU whatever the mask's device (conv2d with a CUDA
    mask: 'Input type (torch.cuda.FloatTensor) and weight type (torch.FloatTensor) should be the
    same'), and a mask on the GPU met the CPU box masks in one torch.stack. The kernel now follows
    the mask (checked device-agnostically on 'meta'); a given mask joins the plan on the CPU, where
    box masks are built, and each view's weight moves to the latents' device where it is used."""
    import torch.nn.functional as F

    conv2d, devices = F.conv2d, []

    def spy(x, weight, *args, **kwargs):
        devices.append((x.device, weight.device))
        return conv2d(x, weight, *args, **kwargs)

    monkeypatch.setattr(F, "conv2d", spy)
    assert feathered(torch.ones(8, 8, device="meta"), 1.0).device.type == "meta"
    assert devices and all(x == weight for x, weight in devices)
    monkeypatch.undo()
    mask = torch.zeros(64, 64, dtype=torch.float64)  # a float64 mask: the plan is float32 all the same
    mask[:, :32] = 1
    regions = [Region(mask=mask, style=0), Region(box=(0.5, 0, 1, 1), style=1)]
    reference, _ = build_region_views(regions, ["a", "b"], (64, 64), 8)
    assert {(v.weight.dtype, v.weight.device.type) for v in reference} == {(torch.float32, "cpu")}
    if torch.cuda.is_available():
        regions[0] = Region(mask=mask.cuda(), style=0)
        views, _ = build_region_views(regions, ["a", "b"], (64, 64), 8)
        for v, ref in zip(views, reference):
            assert torch.equal(v.weight, ref.weight)


def test_a_list_as_a_regions_style_says_where_a_mixture_goes():
    """Finding: Region(style=["noir", "neon"]) was read as mixture weights: "style weights must have one
    entry per style (3 styles), got 2 entries", and style=[2, 0, 1] the weights 2:0:1, silently.
    A region's style= (and background=) is one style; the message points a mixture at style_weights=."""
    names, size = ["noir", "neon", "pixel"], (64, 64)
    for style in (["noir", "neon"], [0, 2], [2, 0, 1], ("noir",), torch.tensor([0, 2])):
        with pytest.raises(
            StyleError,
            match=r"region 0: style= is one style \(a name or an index\), got the list .*style_weights=\{'\w+': 0.5, '\w+': 0.5\}",
        ):
            build_region_views([Region(box=ALL, style=style)], names, size, 8)
    with pytest.raises(
        StyleError,
        match=r"background= is one style \(a name or an index\) or one weight per style, got the list \['noir', 'neon'\]; .*give background=\{'noir': 0.5, 'neon': 0.5\}",
    ):
        build_region_views([Region(box=LEFT, style="noir")], names, size, 8, background=["noir", "neon"])
    # the forms that stay: a name, an index, a dict; a list of weights in style_weights= and as background= (Serve's regions send it)
    mixture = {"noir": 0.5, "neon": 0.5}
    for region in (Region(box=ALL, style="neon"), Region(box=ALL, style=1), Region(box=ALL, style=mixture), Region(box=ALL, style_weights=[1, 1, 0])):
        build_region_views([region], names, size, 8)
    build_region_views([Region(box=LEFT, style="noir")], names, size, 8, background=[0, 1, 1])
    # a style_map entry's style: a list of names failed as weights ("one entry per style, got 2 entries"); N weights stay
    with pytest.raises(
        StyleError,
        match=r"style_map entry 1: its style is one style \(a name or an index\) or one weight per style, got the list \['noir', 'neon'\]; "
        r".*give \(0.5, 1, \{'noir': 0.5, 'neon': 0.5\}\)",
    ):
        build_panorama_views(names, (16, 64), 2, 16, None, [(0, 0.5, "pixel"), (0.5, 1, ["noir", "neon"])])
    views = build_panorama_views(names, (16, 64), 2, 16, None, [(0, 0.5, "pixel"), (0.5, 1, [1, 1, 0])])
    torch.testing.assert_close(views[-1].style_row, torch.tensor([0.5, 0.5, 0.0]))


def test_feather_width_changes_the_seam(pipe):
    regions = [Region(box=LEFT, style="noir"), Region(box=RIGHT, style="neon")]
    hard, soft = _gen(pipe, regions=regions, feather=0), _gen(pipe, regions=regions, feather=8)
    assert (hard - soft).abs().max() > 1e-3


def test_mask_at_image_size_latent_size_or_pil_equal_the_box(pipe):
    from PIL import Image

    box = _gen(pipe, regions=[Region(box=LEFT, style="noir"), Region(box=RIGHT, style="neon")])
    image_mask = torch.zeros(32, 32)
    image_mask[:, :16] = 1
    latent_mask = torch.zeros(16, 16)
    latent_mask[:, :8] = 1
    pil = Image.fromarray((image_mask.numpy() * 255).astype(np.uint8))
    for left in (image_mask, latent_mask, pil):
        out = _gen(pipe, regions=[Region(mask=left, style="noir"), Region(box=RIGHT, style="neon")])
        torch.testing.assert_close(out, box, rtol=0, atol=1e-6)


def test_float_pil_mask_is_read_as_its_weights():
    """A mode "F" PIL image holds float weights in [0, 1]: read as they are, like a float tensor (its
    convert("L") truncated 0.5 to 0 and 1.0 to 1: "covers nothing", or a 0/1 uint8 refusal)."""
    from PIL import Image

    from dmm_ray.regions import region_mask

    soft = torch.zeros(32, 32)
    soft[:, :16] = 1
    soft[:, 16:24] = 0.5
    pil = Image.fromarray(soft.numpy(), mode="F")
    for mask in (soft, pil):
        got = region_mask(Region(mask=mask, style="noir"), (32, 32), (16, 16), "region 0")
        torch.testing.assert_close(got, region_mask(Region(mask=soft, style="noir"), (32, 32), (16, 16), "region 0"), rtol=0, atol=0)
    half = Image.fromarray(np.full((32, 32), 0.5, np.float32), mode="F")
    assert float(region_mask(Region(mask=half, style="noir"), (32, 32), (16, 16), "region 0").min()) == 0.5


def test_16_bit_pil_mask_is_read_as_0_to_65535():
    """A 16-bit PIL image (mode I;16, as a 16-bit PNG opens) is read on its own scale: convert("L")
    clipped every value above 255 to 1 (a 1.5% weight became a full one); a 32-bit integer image
    beyond 255 has no known scale and is refused instead of clipped."""
    from PIL import Image

    from dmm_ray.regions import region_mask

    soft = np.zeros((32, 32), np.uint16)
    soft[:, :16] = 65535
    soft[:, 16:24] = 1000
    got = region_mask(Region(mask=Image.fromarray(soft), style="noir"), (32, 32), (16, 16), "region 0")
    want = region_mask(Region(mask=torch.from_numpy(soft.astype(np.float32) / 65535), style="noir"), (32, 32), (16, 16), "region 0")
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    with pytest.raises(RegionError, match=r"region 0: a 32-bit integer PIL image .*values above 255"):
        region_mask(Region(mask=Image.fromarray(soft.astype(np.int32), mode="I"), style="noir"), (32, 32), (16, 16), "region 0")
    eight_bit = Image.fromarray((soft // 257).astype(np.int32), mode="I")  # mode I within 0..255: read as 0..255, as before
    assert float(region_mask(Region(mask=eight_bit, style="noir"), (32, 32), (16, 16), "region 0").max()) == 1.0


def test_uint16_mask_arrays_are_read_as_the_16_bit_image_is():
    """A uint16 array (a tensor, or what a 16-bit PNG reads into with numpy / imageio) was read as its raw
    values and refused above 1, while the same values as a 16-bit PIL image were read on 0..65535. Both
    are read on 0..65535 now, and a 0/1 one (which would weigh 1/65535) is refused for both, as for uint8."""
    from PIL import Image

    from dmm_ray.regions import region_mask

    soft = np.zeros((32, 32), np.uint16)
    soft[:, :16] = 65535
    soft[:, 16:24] = 1000
    want = region_mask(Region(mask=Image.fromarray(soft), style="noir"), (32, 32), (16, 16), "region 0")
    for mask in (soft, torch.from_numpy(soft)):
        torch.testing.assert_close(region_mask(Region(mask=mask, style="noir"), (32, 32), (16, 16), "region 0"), want, rtol=0, atol=0)
    for mask in ((soft > 0).astype(np.uint16), Image.fromarray((soft > 0).astype(np.uint16))):
        with pytest.raises(RegionError, match=r"region 0: a uint16 mask is read as 0..65535 but this one's maximum is 1; pass mask \* 65535"):
            region_mask(Region(mask=mask, style="noir"), (32, 32), (16, 16), "region 0")


def test_background_fills_what_the_regions_leave(pipe):
    plain = _gen(pipe, style="pastel")
    out = _gen(pipe, regions=[Region(box=(0.25, 0.25, 0.75, 0.75), style="pastel")], background="pastel")
    torch.testing.assert_close(out, plain, rtol=0, atol=1e-5)
    # style= acts as the background when background= is absent
    out2 = _gen(pipe, regions=[Region(box=(0.25, 0.25, 0.75, 0.75), style="noir")], style="pastel")
    out3 = _gen(pipe, regions=[Region(box=(0.25, 0.25, 0.75, 0.75), style="noir")], background="pastel")
    assert torch.equal(out2, out3)


# ---- validation -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (
            dict(regions=[Region(box=ALL, style="noir"), Region(mask=torch.ones(10, 10), style="neon")]),
            RegionError,
            r"region 1: mask is 10x10 .* image is 32x32",
        ),
        (dict(regions=[Region(mask=torch.zeros(32, 32), style="noir"), Region(box=ALL, style="neon")]), RegionError, r"region 0: .*covers nothing"),
        (
            dict(regions=[Region(box=LEFT, style="noir"), Region(box=RIGHT, style="anime", name="sky")]),
            StyleError,
            r"region 1 \(sky\): unknown style 'anime'; known styles: 0:noir",
        ),
        (dict(regions=[Region(box=LEFT, style_weights={"noir": 0, "neon": 0})]), StyleError, r"region 0: .*all zero"),
        (dict(regions=[Region(box=LEFT, style="noir")]), RegionError, r"leave 50% of the canvas uncovered.*background="),
        # a pinhole read "0% of the canvas uncovered"
        (
            dict(regions=[Region(mask=1 - torch.nn.functional.pad(torch.ones(2, 2), (12, 18, 10, 20)), style="noir")]),
            RegionError,
            r"leave 0.39% of the canvas uncovered \(1 latent cell\(s\), the first at x=12, y=10 px\)",
        ),
        # a region covering 1 of 256 latent cells read "100% of the canvas uncovered", as if it covered nothing
        (
            dict(regions=[Region(mask=torch.nn.functional.pad(torch.ones(2, 2), (12, 18, 10, 20)), style="noir")]),
            RegionError,
            r"leave 99.6% of the canvas uncovered \(255 latent cell\(s\)",
        ),
        (dict(regions=[Region(box=(0.5, 0, 0.2, 1), style="noir")]), RegionError, r"region 0: box .*0 <= x0 < x1 <= 1"),
        (dict(regions=[Region(box=(0, 0, 2, 1), style="noir")]), RegionError, r"region 0: box .*fractions"),
        (dict(regions=[Region(box=ALL, mask=torch.ones(32, 32), style="noir")]), RegionError, r"region 0: .*exactly one of box"),
        (dict(regions=[Region(box=ALL)]), StyleError, r"region 0: give exactly one of style"),
        (dict(regions=[Region(mask=torch.full((32, 32), 2.0), style="noir")]), RegionError, r"region 0: mask values"),
        (dict(regions=[]), RegionError, r"non-empty list"),
        (dict(regions=[Region(box=LEFT, style="noir")], background="sepia"), StyleError, r"background: unknown style"),
        (dict(regions=[Region(box=ALL, style="noir")], style_map=[(0, 1, "noir")]), RegionError, r"not both"),
        (dict(style_map=[(0, 0.5, "noir")], window_stride=8), RegionError, r"window .*no range covering"),
        (dict(style_map=[(0, 1, "sepia")]), StyleError, r"style_map entry 0: unknown style 'sepia'"),
        # an entry no window's centre falls in was dropped silently (a tall canvas: every centre at x = 0.5)
        (
            dict(style_map=[(0, 0.5, "noir"), (0.5, 1, "neon")], width=16, height=64),
            RegionError,
            r"style_map entry 0 \(0..0.5\) holds no window's centre .*0.500",
        ),
        (dict(style_map=[(0, 0.05, "noir"), (0.05, 1, "neon")]), RegionError, r"style_map entry 0 \(0..0.05\) holds no window's centre"),
        # every entry is checked, not only the ones a window's centre reaches first
        (dict(style_map=[(0, 1, "noir"), (0.5, 1, "bogus")]), StyleError, r"style_map entry 1: unknown style 'bogus'"),
        (dict(style_map=[(0, 1, "noir"), (0.8, 0.2, "neon")]), RegionError, r"style_map entry 1 .*need 0 <= x0 < x1 <= 1"),
        (dict(style_map=[(0, 1, "noir"), "junk"]), RegionError, r"style_map entries must be \(x0, x1, style\) .*got 'junk'"),
        (dict(regions=[Region(box=ALL, style="noir")], region_window=5), RegionError, r"region_window must be .*multiple of 2"),
        (dict(regions=[Region(box=ALL, style="noir")], region_window="tiles"), RegionError, r'region_window must be None .*"native"'),
        (dict(style_map=[(0, 1, "noir")], region_window="native"), RegionError, r"region_window= and region_decode= go with regions="),
        (dict(style_map=[(0, 1, "noir")], region_decode=True), RegionError, r"region_decode= go with regions="),
        (
            dict(style_map=[(0, 1, "noir")], window_stride=8.0),
            RegionError,
            r"window_stride must be a positive multiple of 2 pixels \(an int\), got 8.0",
        ),
        (dict(style_map=[(0, 1, "noir")], feather=2), RegionError, r"feather= goes with regions="),
        (dict(style_map="noir"), RegionError, r"style_map must be a list of \(x0, x1, style\) ranges .*got 'noir'"),
        (dict(style_map={"noir": (0, 1)}), RegionError, r"style_map must be a list"),
        (dict(regions=[Region(box=ALL, style="noir")], style=["neon"]), StyleError, r"ONE style for every prompt"),
        (dict(window_stride=8, style_weights=[{"noir": 1}]), StyleError, r"ONE style for every prompt"),
        (
            dict(regions=[Region(mask=np.pad(np.ones((32, 16), np.uint8), ((0, 0), (0, 16))), style="noir")], background="neon"),
            RegionError,
            r"region 0: a uint8 mask is read as 0..255 but this one's maximum is 1",  # 0/1 in uint8: it would weigh 1/255
        ),
        (dict(regions=[Region(box=ALL, style="noir")], feather="4"), RegionError, r"feather must be a finite sigma >= 0 .*got '4'"),
        (dict(regions=[Region(box=ALL, style="noir")], max_batch=True), RegionError, r"max_batch must be a positive integer, got True"),
        (
            dict(regions=[{"box": ALL, "stlye": "noir"}]),
            RegionError,
            r"region 0: unknown field\(s\) \['stlye'\]; a region's fields are box, mask, style",
        ),
        # a Region's own feather is checked as the call's: "3" and True were converted, "abc" and [1] a bare ValueError / TypeError
        (dict(regions=[Region(box=ALL, style="noir", feather="3")]), RegionError, r"region 0: feather must be a finite sigma >= 0 .*got '3'"),
        (dict(regions=[Region(box=ALL, style="noir", feather=True)]), RegionError, r"region 0: feather must be .*got True"),
        (dict(regions=[Region(box=ALL, style="noir", feather="abc")]), RegionError, r"region 0: feather must be .*got 'abc'"),
        (dict(regions=[Region(box=ALL, style="noir", feather=[1])]), RegionError, r"region 0: feather must be .*got \[1\]"),
        (dict(regions=[Region(box=ALL, style="noir", feather=float("nan"))]), RegionError, r"region 0: feather must be .*got nan"),
        (dict(regions=[Region(box=ALL, style="noir")], height=36), RegionError, r"height and width must be multiples of 8, got 36x32"),
        # latents= wider than the canvas: the views covered the canvas's part of them and the rest was never denoised
        (
            dict(regions=[Region(box=LEFT, style="noir"), Region(box=RIGHT, style="neon")], latents=torch.zeros(1, 4, 16, 32)),
            RegionError,
            r"latents= are 16x32 latent cells \(a 32x64 image\) but the canvas is 32x32 .*pass height=32, width=64",
        ),
        (dict(style_map=sweep("noir", "neon"), latents=torch.zeros(1, 4, 8, 64)), RegionError, r"latents= are 8x64 .*canvas is 16x64"),
        # the region path never read window_stride: it did nothing, silently
        (dict(regions=[Region(box=ALL, style="noir")], window_stride=8), RegionError, r"window_stride= goes with a panorama .*region_window="),
    ],
)
def test_validation_errors_name_the_region(pipe, kwargs, error, match):
    kwargs = dict(kwargs)  # the parameters are shared between runs
    panorama = "style_map" in kwargs and "regions" not in kwargs
    size = (kwargs.pop("height", 16), kwargs.pop("width", 64)) if panorama else (kwargs.pop("height", 32), 32)
    with pytest.raises(error, match=match):
        _gen(pipe, size=size, **kwargs)
    assert "forward" not in pipe.unet.__dict__


def test_panorama_stride_longer_than_the_window_is_refused(pipe):
    """Windows that do not touch would leave canvas columns that no view covers: never denoised."""
    f = pipe.vae_scale_factor
    native = pipe.unet.config.sample_size * f
    with pytest.raises(RegionError, match=rf"window_stride {native + f} px is larger than the window \({native} px\)"):
        _gen(pipe, size=(native, 4 * native), style="noir", window_stride=native + f)
    views = build_panorama_views(STYLES, (native, 4 * native), f, native, native, default_style=torch.tensor([1.0, 0, 0]))
    cover = torch.zeros(native // f, 4 * native // f)
    for v in views:
        cover[v.y0 : v.y1, v.x0 : v.x1] += v.weight
    torch.testing.assert_close(cover, torch.ones_like(cover))  # stride == window: windows abut, every cell once


def test_plain_only_options_are_rejected(pipe):
    with pytest.raises(ValueError, match="max_batch"):
        _gen(pipe, style="noir", max_batch=2)
    # it said feather= applies "to regions= or a panorama", where a panorama refuses it too (a ValueError, not the RegionError documented)
    with pytest.raises(RegionError, match=r"feather= goes with regions= .*a plain call or a panorama takes none"):
        _gen(pipe, style="noir", feather=2)


# ---- SDXL -----------------------------------------------------------------------------------
def test_sdxl_regions_and_panorama(tmp_path):
    from dmm_ray.pipeline import DMMXLPipeline
    from dmm_ray.tiny import tiny_sdxl_components

    c = tiny_sdxl_components(seed=0)
    student = StyleUNet.from_unet(c["unet"], STYLES)
    with torch.no_grad():
        student.class_embedding.codebook.weight.mul_(20)
    xl = DMMXLPipeline(**{**c, "unet": student})
    xl.scheduler = DMMXLPipeline.paper_scheduler(xl.scheduler)
    xl.set_progress_bar_config(disable=True)
    plain = _gen(xl, ["a red circle", "a blue square"], style="neon")
    one = _gen(xl, ["a red circle", "a blue square"], regions=[Region(box=ALL, style="neon")])
    assert torch.equal(one, plain)
    two = _gen(xl, ["a red circle", "a blue square"], regions=[Region(box=LEFT, style="neon"), Region(box=RIGHT, style="neon")])
    torch.testing.assert_close(two, plain, rtol=0, atol=1e-5)
    same_prompt = _gen(xl, ["a red circle"], regions=[Region(box=ALL, style="neon", prompt="a red circle")])
    torch.testing.assert_close(same_prompt, plain[:1], rtol=0, atol=1e-5)  # pooled + sequence embeds of the region prompt
    mixed = _gen(xl, ["a red circle"], regions=[Region(box=LEFT, style="noir"), Region(box=RIGHT, style="neon", prompt="a blue star")])
    assert (mixed - plain[:1]).abs().max() > 1e-3
    pano = _gen(xl, ["a red circle"], size=(16, 48), style_map=sweep("noir", "neon"))
    assert pano.shape == (1, 3, 16, 48) and torch.isfinite(pano).all()
    wide = dict(size=(16, 64), regions=[Region(box=LEFT, style="noir"), Region(box=RIGHT, style="neon")], region_window="native")
    decoded = _gen(xl, ["a red circle"], **wide, region_decode=True)  # the SDXL VAE's decoder, each half as its region
    assert decoded.shape == (1, 3, 16, 64) and torch.isfinite(decoded).all()
    assert (decoded - _gen(xl, ["a red circle"], **wide)).abs().max() > 1e-3


def test_sdxl_windows_scale_the_calls_size_conditioning():
    """A window's SDXL size ids are the call's scaled to the window: the defaults become the tile's size
    as before, and the call's own original_size= is kept (it was replaced by the tile's size: a
    native-size panorama with original_size= was not the plain image)."""
    from dmm_ray.pipeline import DMMXLPipeline
    from dmm_ray.tiny import tiny_sdxl_components

    c = tiny_sdxl_components(seed=0)
    student = StyleUNet.from_unet(c["unet"], STYLES)
    xl = DMMXLPipeline(**{**c, "unet": student})
    xl.set_progress_bar_config(disable=True)
    sizes = dict(original_size=(64, 64))
    plain = _gen(xl, ["a red circle"], size=(16, 16), style="neon", **sizes)
    pano = _gen(xl, ["a red circle"], size=(16, 16), style_map=[(0, 1, "neon")], **sizes)
    assert torch.equal(pano, plain)
    seen = []
    handle = student.add_time_proj.register_forward_hook(lambda _m, inputs, _o: seen.append(inputs[0].reshape(-1, 6)))
    try:
        _gen(xl, ["a red circle"], size=(16, 48), style_map=[(0, 1, "neon")])  # windows of 16 px: the tile's own size
        _gen(xl, ["a red circle"], size=(16, 48), style_map=[(0, 1, "neon")], **sizes)  # the call's sizes x 16/48 across
    finally:
        handle.remove()
    steps = len(seen) // 2
    assert all(torch.equal(ids, torch.tensor([16.0, 16, 0, 0, 16, 16]).expand_as(ids)) for ids in seen[:steps])
    rows = seen[steps]  # [uncond; cond] x windows: one canvas high, a third of it wide
    assert len(rows) > 2 and all(torch.allclose(r, torch.tensor([64.0, 64 / 3, 0, 0, 16, 16])) for r in rows)


def test_benchmark_seam_ratio():
    """benchmarks/regions.py's seam number: ~1 for a smooth image, large for a pasted hard edge."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "regions.py"
    spec = importlib.util.spec_from_file_location("regions_benchmark", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    ramp = torch.linspace(0, 1, 64).expand(1, 3, 32, 64)
    assert abs(bench.seam_ratio(ramp, 32)[0] - 1) < 1e-4
    paste = torch.cat([torch.full((1, 3, 32, 32), 0.2), torch.full((1, 3, 32, 32), 0.8)], dim=-1) + 0.01 * torch.rand(1, 3, 32, 64)
    assert bench.seam_ratio(paste, 32)[0] > 20
    with pytest.raises(SystemExit):  # nothing left to run: refused before any model loads
        bench.main(["--model", "nowhere", "--cost-only", "--skip-cost"])


def test_benchmark_cost_runs_at_the_feather_it_is_given(pipe, monkeypatch):
    """Finding: `benchmarks/regions.py --feather 0` recorded feather_px 0, but its cost cells (the regions and
    the teacher route's blend) ran at the default 4 px, whose wider windows cost more. `cost(feather=)` now
    reaches both."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "regions.py"
    spec = importlib.util.spec_from_file_location("regions_benchmark", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    feathers, blends = [], []
    monkeypatch.setattr(bench, "_generate", lambda _pipe, _p, _s, **kw: feathers.append(kw["feather"]) if "regions" in kw else None)
    monkeypatch.setattr(bench, "TeacherRegions", lambda *_a: lambda _p, _s, weights: blends.append(weights))
    # every style's teacher is the tiny pipe; neither it nor the model runs here
    monkeypatch.setattr("dmm_ray.zoo.report.teacher_specs", lambda _zoo: [type("Spec", (), {"name": s})() for s in STYLES])
    monkeypatch.setattr("dmm_ray.teachers.load_teacher_pipeline", lambda _spec: pipe)
    bench.cost(pipe, Path("zoo"), ["a red circle"], STYLES[:2], reps=1, batches=(1,), modes=("windows",), feather=0)
    assert feathers and set(feathers) == {0}  # every regions cell, warm-up and timed
    assert blends and all(set(w.unique().tolist()) <= {0.0, 1.0} for weights in blends for w in weights)  # hard edges
