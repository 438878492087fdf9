"""Weighted-merge baseline: identity on identical models, linearity, weight validation."""

import pytest
import torch
from diffusers import StableDiffusionPipeline

from dmm_ray.baselines.weighted_merge import (
    MergeWeightsError,
    validate_weights,
    weighted_merge_modules,
    weighted_merge_pipelines,
)
from dmm_ray.tiny import tiny_sd_components


def _unet(seed):
    return tiny_sd_components(seed=seed)["unet"]


def test_merge_of_identical_models_is_identity():
    unet = _unet(0)
    merged = weighted_merge_modules([unet, _unet(0), _unet(0)], [0.2, 0.3, 0.5], ["a", "b", "c"])
    assert merged is not unet
    for (k, v), (k2, v2) in zip(unet.state_dict().items(), merged.state_dict().items()):
        assert k == k2
        torch.testing.assert_close(v2, v, rtol=1e-6, atol=1e-7)


def test_merge_is_the_weighted_sum():
    a, b = _unet(0), _unet(1)
    merged = weighted_merge_modules([a, b], [0.25, 0.75], ["a", "b"])
    sa, sb, sm = a.state_dict(), b.state_dict(), merged.state_dict()
    for k in sm:
        torch.testing.assert_close(sm[k], 0.25 * sa[k] + 0.75 * sb[k], rtol=1e-5, atol=1e-6)
    first = weighted_merge_modules([a, b], [1.0, 0.0], ["a", "b"]).state_dict()
    for k in first:
        torch.testing.assert_close(first[k], sa[k], rtol=0, atol=0)


def test_weight_validation_errors_name_the_problem():
    names = ["ink", "neon"]
    assert validate_weights(None, names) == [0.5, 0.5]
    with pytest.raises(MergeWeightsError, match="sum to 1"):
        validate_weights([0.5, 0.6], names)
    with pytest.raises(MergeWeightsError, match="'neon': -0.5"):
        validate_weights([1.5, -0.5], names)
    with pytest.raises(MergeWeightsError, match="got 3 weights for 2 models"):
        validate_weights([0.2, 0.3, 0.5], names)
    with pytest.raises(MergeWeightsError, match="finite"):
        validate_weights([float("nan"), 1.0], names)


def test_different_architectures_are_rejected():
    small = _unet(0)
    big = tiny_sd_components(seed=0, block_out_channels=(32, 32))["unet"]
    with pytest.raises(ValueError, match="'big' has different parameters from 'small'"):
        weighted_merge_modules([small, big], None, ["small", "big"])
    wide = tiny_sd_components(seed=0, cross_attention_dim=64)["unet"]
    with pytest.raises(ValueError, match="has shape .* in 'wide'"):
        weighted_merge_modules([small, wide], None, ["small", "wide"])


def test_merged_pipeline_saves_as_diffusers_folder(tmp_path):
    pipes = [StableDiffusionPipeline(**tiny_sd_components(seed=s)) for s in (0, 1)]
    merged = weighted_merge_pipelines(pipes, [0.5, 0.5], ["a", "b"])
    merged.save_pretrained(tmp_path / "wm")
    loaded = StableDiffusionPipeline.from_pretrained(tmp_path / "wm")
    k = "conv_in.weight"
    expected = 0.5 * pipes[0].unet.state_dict()[k] + 0.5 * pipes[1].unet.state_dict()[k]
    torch.testing.assert_close(loaded.unet.state_dict()[k], expected, rtol=1e-5, atol=1e-6)
    te_key = [k for k in merged.text_encoder.state_dict() if k.endswith("final_layer_norm.weight")][0]
    te_expected = 0.5 * pipes[0].text_encoder.state_dict()[te_key] + 0.5 * pipes[1].text_encoder.state_dict()[te_key]
    torch.testing.assert_close(loaded.text_encoder.state_dict()[te_key], te_expected)


def test_weighted_merge_job_never_writes_over_another_model(tmp_path, capsys):
    """--out may be new, empty or an earlier weighted merge; a merged model's folder (or any other
    non-empty folder) is refused before a teacher is loaded, and left as it was."""
    from jobs import weighted_merge as job

    other = tmp_path / "merged"
    (other / "unet").mkdir(parents=True)
    (other / "unet" / "config.json").write_text("{}")
    assert job.main(["--teachers", str(tmp_path / "zoo.yaml"), "--out", str(other)]) == 2
    assert "is not an earlier weighted merge (no weighted_merge.json)" in capsys.readouterr().err
    assert sorted(p.name for p in other.rglob("*")) == ["config.json", "unet"]
    (tmp_path / "f").write_text("x")
    assert job.main(["--teachers", str(tmp_path / "zoo.yaml"), "--out", str(tmp_path / "f")]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    from dmm_ray.baselines.weighted_merge import RECORD, check_output

    (tmp_path / "earlier").mkdir()
    (tmp_path / "earlier" / RECORD).write_text("{}")
    check_output(tmp_path / "earlier")  # an earlier weighted merge is replaced; so is an empty or new folder
    check_output(tmp_path / "new")
