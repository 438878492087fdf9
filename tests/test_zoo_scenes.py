"""The zoo's procedural image set: determinism, caption <-> image consistency, held-out prompts, disk format."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage

from dmm_ray.zoo import scenes as S
from dmm_ray.zoo.components import TOKENIZER_MAX_LENGTH, zoo_tokenizer
from dmm_ray.zoo.dataset import read_manifest, scene_from_record, write_image_set


def test_scenes_are_deterministic_and_chunking_invariant():
    a = S.sample_scenes(40, seed=3)
    assert a == S.sample_scenes(40, seed=3)
    assert S.sample_scenes(10, seed=3, start=30) == a[30:]
    assert a != S.sample_scenes(40, seed=4)
    assert torch.equal(S.render(a), S.render(S.sample_scenes(40, seed=3)))
    assert torch.equal(S.render(a, chunk=7), S.render(a))


def test_render_range_and_shape():
    x = S.render(S.sample_scenes(16, seed=0))
    assert x.shape == (16, 3, 32, 32) and x.dtype == torch.float32
    assert 0 <= float(x.min()) and float(x.max()) <= 1


def _coverage(image: torch.Tensor, colour: str, background: str) -> np.ndarray:
    """Per-pixel fraction of the object colour mixed into the background colour: (H, W) in [0, 1]."""
    fg = torch.tensor(S.COLOURS[colour]).view(3, 1, 1)
    bg = torch.tensor(S.BACKGROUNDS[background]).view(3, 1, 1)
    alpha = ((image - bg) * (fg - bg)).sum(0) / ((fg - bg) ** 2).sum()
    residual = (image - (bg + alpha * (fg - bg))).abs().max()
    assert residual < 0.02, "a pixel is not a mix of the named object and background colours"
    return alpha.clamp(0, 1).numpy()


def test_captions_match_the_rendered_ground_truth():
    """Every caption attribute is checked against the pixels, not against the generator's fields."""
    scenes = S.sample_scenes(120, seed=1)
    images = S.render(scenes)
    template_area = S.shape_templates().mean((1, 2, 3))  # (shapes,) fraction of the template box covered
    for sc, img in zip(scenes, images):
        gt = S.parse_caption(sc.caption)
        assert gt["colour"] == sc.colour and gt["shape"] == sc.shape and gt["background"] == sc.background
        bg = torch.tensor(S.BACKGROUNDS[gt["background"]])
        assert torch.allclose(img[:, 0, 0], bg, atol=0.02), sc.caption  # corners are background
        alpha = _coverage(img, gt["colour"], gt["background"])
        _, n_parts = ndimage.label(alpha > 0.15, structure=np.ones((3, 3)))  # 8-connected, so thin star tips stay attached
        assert n_parts == (2 if gt["count"] == "two" else 1), sc.caption
        if gt["count"] == "one":
            ys, xs = np.indices(alpha.shape)
            cx, cy = S.POSITIONS[gt["position"]]
            mx, my = (alpha * xs).sum() / alpha.sum() + 0.5, (alpha * ys).sum() / alpha.sum() + 0.5
            assert abs(mx - cx * 32) < 3.5 and abs(my - cy * 32) < 3.5, sc.caption
        # area of the object colour ~ the named shape's area at the named size (+-10% radius jitter)
        expected = float(template_area[S.SHAPES.index(gt["shape"])] * (2 * 1.1 * S.SIZES[gt["size"]] * 32) ** 2)
        expected *= 2 if gt["count"] == "two" else 1
        assert 0.75 * expected < alpha.sum() < 1.3 * expected, (sc.caption, alpha.sum(), expected)


def test_shapes_are_distinguishable_by_area():
    areas = S.shape_templates().mean((1, 2, 3))
    assert len(set(np.round(areas.numpy(), 2))) == len(S.SHAPES)


def test_eval_prompts_are_held_out_and_cover_every_colour_and_shape():
    prompts = S.eval_captions()
    assert len(prompts) == 2 * len(S.COLOURS) * len(S.SHAPES) == len(set(prompts))
    train = {s.caption for s in S.sample_scenes(6000, seed=0)}
    assert not train & set(prompts)
    parsed = [S.parse_caption(p) for p in prompts]
    assert {p["colour"] for p in parsed} == set(S.COLOURS) and {p["shape"] for p in parsed} == set(S.SHAPES)
    # the held-out captions' attributes are all seen in training, in other combinations
    assert {S.parse_caption(c)["background"] for c in train} == set(S.BACKGROUNDS)


def test_at_least_20k_distinct_image_caption_pairs():
    scenes = S.sample_scenes(20000, seed=0)
    assert len({(s.caption, s.cx, s.cy, s.radius, s.angle) for s in scenes}) == 20000
    assert len({s.caption for s in scenes}) > 1500


def test_every_caption_word_is_one_token_and_fits():
    tok = zoo_tokenizer()
    for word in S.CAPTION_WORDS:
        assert len(tok.tokenize(word)) == 1, word
    longest = max((*S.eval_captions(), *(s.caption for s in S.sample_scenes(500, seed=0))), key=len)
    assert len(tok(longest).input_ids) <= TOKENIZER_MAX_LENGTH


def test_parse_caption_rejects_foreign_text():
    with pytest.raises(ValueError, match="not a zoo caption"):
        S.parse_caption("an astronaut riding a horse")


def test_image_set_on_disk_matches_renders(tmp_path):
    manifest = write_image_set(tmp_path / "a", 24, seed=5, progress=False)
    rows = read_manifest(manifest)
    assert [r["id"] for r in rows] == [f"{i:06d}" for i in range(24)]
    scenes = [scene_from_record(r) for r in rows]
    assert scenes == S.sample_scenes(24, seed=5)
    pixels = S.to_uint8(S.render(scenes))
    for row, px in zip(rows, pixels):
        assert row["caption"] == scene_from_record(row).caption
        assert np.array_equal(np.asarray(Image.open(manifest.parent / row["file"]).convert("RGB")), px)
    # deterministic bytes
    manifest_b = write_image_set(tmp_path / "b", 24, seed=5, progress=False)
    assert manifest.read_bytes() == manifest_b.read_bytes()
    assert (manifest.parent / rows[3]["file"]).read_bytes() == (manifest_b.parent / rows[3]["file"]).read_bytes()
    assert json.loads(manifest.read_text().splitlines()[0])["file"].endswith(".png")


def test_read_manifest_names_missing_keys(tmp_path):
    bad = tmp_path / "manifest.jsonl"
    bad.write_text(json.dumps({"id": "0", "file": "x.png"}) + "\n")
    with pytest.raises(ValueError, match="caption"):
        read_manifest(bad)
