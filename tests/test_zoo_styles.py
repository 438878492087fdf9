"""Style transforms: deterministic, range-preserving, each doing what its description says."""

import pytest
import torch

from dmm_ray.zoo import scenes as S
from dmm_ray.zoo.styles import STYLES, apply_style, get_style, luma


@pytest.fixture(scope="module")
def images():
    return S.render(S.sample_scenes(32, seed=2))


@pytest.mark.parametrize("name", list(STYLES))
def test_style_is_deterministic_in_range_and_changes_the_image(images, name):
    out = apply_style(name, images)
    assert out.shape == images.shape
    assert 0 <= float(out.min()) and float(out.max()) <= 1
    assert torch.equal(out, apply_style(name, images.clone()))
    assert (out - images).abs().mean() > 0.03


def test_none_is_identity(images):
    assert apply_style(None, images) is images and apply_style("none", images) is images


def test_grades_are_colour_maps_and_distinct_styles_change_structure(images):
    """The 'grade' group plays the paper's similar 'realistic' models: pure per-pixel colour maps
    (they commute with shuffling pixels, so shapes and edges survive); 'distinct' styles do not."""
    grades = [n for n, s in STYLES.items() if s.group == "grade"]
    distinct = [n for n, s in STYLES.items() if s.group == "distinct"]
    assert len(grades) >= 3 and len(distinct) >= 3 and len(STYLES) >= 8
    perm = torch.randperm(32 * 32, generator=torch.Generator().manual_seed(0))

    def shuffle(x):
        return x.flatten(2)[:, :, perm].view_as(x)

    for name in STYLES:
        pointwise = torch.allclose(apply_style(name, shuffle(images)), shuffle(apply_style(name, images)), atol=1e-6)
        assert pointwise == (name in grades), name


def test_specific_style_properties(images):
    noir = apply_style("noir", images)
    assert torch.allclose(noir[:, 0], noir[:, 1]) and torch.allclose(noir[:, 1], noir[:, 2])  # grayscale
    pix = apply_style("pixel", images)
    blocks = pix.unfold(2, 4, 4).unfold(3, 4, 4)  # (B, 3, 8, 8, 4, 4)
    assert torch.equal(blocks.amax((-1, -2)), blocks.amin((-1, -2)))  # constant 4x4 blocks
    assert set(torch.unique(pix).tolist()) <= {0.0, 0.5, 1.0}
    warm, cool = apply_style("warm", images), apply_style("cool", images)
    assert (warm[:, 0] - warm[:, 2]).mean() > (images[:, 0] - images[:, 2]).mean() > (cool[:, 0] - cool[:, 2]).mean()
    assert luma(apply_style("bright", images)).mean() > luma(images).mean()
    faded = apply_style("faded", images)
    assert faded.min() >= 0.19 and faded.max() <= 0.83  # lifted blacks, lowered whites
    neon = apply_style("neon", images)
    assert (luma(neon) < 0.05).float().mean() > 0.5  # mostly black, lit only along edges
    sketch = apply_style("sketch", images)
    assert (sketch.mean(1) > 0.8).float().mean() > 0.3  # mostly paper


def test_unknown_style_names_the_known_ones():
    with pytest.raises(KeyError, match="known styles: .*noir"):
        get_style("anime")
