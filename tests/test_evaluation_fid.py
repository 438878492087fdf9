"""Fréchet distance, feature statistics, extractor errors and EvalConfig validation (no models)."""

import numpy as np
import pytest
import scipy.linalg
import torch
from eval_helpers import SeededConvExtractor

from dmm_ray.evaluation.config import EvalConfig
from dmm_ray.evaluation.extractors import ExtractorFactory, InceptionFeatureExtractor, ZooFeatureExtractor, build_extractor
from dmm_ray.evaluation.fid import FeatureStats, fid_from_features, fid_from_stats, frechet_distance


def scipy_reference_fid(mu1, s1, mu2, s2):
    """pytorch-fid's formula: |mu1-mu2|^2 + tr(s1) + tr(s2) - 2 tr(sqrtm(s1 s2))."""
    covmean = scipy.linalg.sqrtm(s1.dot(s2))
    covmean = covmean.real
    diff = mu1 - mu2
    return float(diff.dot(diff) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def _features(seed, n=400, d=12, shift=0.0, scale=1.0):
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(d, d)) / np.sqrt(d)
    return rng.normal(size=(n, d)) @ mix * scale + shift


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_frechet_matches_scipy_sqrtm_reference(seed):
    a, b = _features(seed), _features(seed + 10, shift=0.3, scale=1.5)
    sa, sb = FeatureStats.from_features(a), FeatureStats.from_features(b)
    ours = frechet_distance(sa.mu, sa.sigma, sb.mu, sb.sigma)
    ref = scipy_reference_fid(sa.mu, sa.sigma, sb.mu, sb.sigma)
    assert ref > 0.1
    assert abs(ours - ref) / ref < 1e-6
    assert abs(fid_from_stats(sa, sb) - ref) / ref < 1e-6  # the cached-sqrt path used by the matrix


def test_fid_of_a_set_with_itself_is_zero_and_grows_with_mean_shift():
    x = _features(3)
    assert fid_from_features(x, x) == pytest.approx(0.0, abs=1e-9)
    shifts = [0.1, 0.5, 1.0, 2.0]
    fids = [fid_from_features(x, x + s) for s in shifts]
    assert all(a < b for a, b in zip(fids, fids[1:]))
    # Same covariance, shifted mean: FID is exactly |shift * 1|^2 = d * s^2.
    for s, f in zip(shifts, fids):
        assert f == pytest.approx(x.shape[1] * s**2, rel=1e-6)


def test_statistics_are_float64_and_unbiased():
    x = torch.randn(64, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float32)
    st = FeatureStats.from_features(x)
    assert st.mu.dtype == np.float64 and st.sigma.dtype == np.float64 and st.n == 64
    np.testing.assert_allclose(st.sigma, np.cov(x.double().numpy(), rowvar=False), rtol=1e-12)


def test_union_statistics_equal_pooled_sample():
    a, b = _features(4, n=50), _features(5, n=70, shift=1.0)
    u = FeatureStats.union([FeatureStats.from_features(a), FeatureStats.from_features(b)])
    ref = FeatureStats.from_features(np.concatenate([a, b]))
    np.testing.assert_allclose(u.mu, ref.mu, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(u.sigma, ref.sigma, rtol=1e-10, atol=1e-12)
    assert fid_from_stats(u, ref) == pytest.approx(0.0, abs=1e-8)


def test_bad_feature_input_is_rejected():
    with pytest.raises(ValueError, match="at least 2"):
        FeatureStats.from_features(np.zeros((1, 4)))
    with pytest.raises(ValueError, match="NaN"):
        FeatureStats.from_features(np.full((3, 4), np.nan))
    with pytest.raises(ValueError, match="feature dimensions differ"):
        fid_from_features(_features(0, d=4), _features(0, d=5))


def test_missing_inception_weights_error_names_the_file(tmp_path):
    missing = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
    with pytest.raises(FileNotFoundError, match="pt_inception-2015-12-05") as e:
        InceptionFeatureExtractor(missing)
    assert str(missing) in str(e.value)
    with pytest.raises(FileNotFoundError, match="zoo feature net"):
        ZooFeatureExtractor(tmp_path / "nope")
    with pytest.raises(ValueError, match="unknown extractor.kind"):
        build_extractor("clip", tmp_path)
    with pytest.raises(FileNotFoundError):
        _ = ExtractorFactory("inception", missing).name


def test_seeded_extractor_protocol():
    ext = SeededConvExtractor(seed=0, dim=16)
    images = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    f = ext(images)
    assert f.shape == (3, 16) and isinstance(ext.name, str)
    torch.testing.assert_close(f, SeededConvExtractor(seed=0, dim=16)(images))


def test_eval_config_validation():
    with pytest.raises(ValueError, match="promts"):
        EvalConfig(promts=["x"])
    cfg = EvalConfig(prompts=["a", "b"], images_per_prompt=3, seed_a=0, seed_b=4)
    with pytest.raises(ValueError, match="seed sets overlap"):
        cfg.check_seed_sets(2)
    cfg = EvalConfig(prompts=["a", "b"], images_per_prompt=3, seed_a=0, seed_b=6)
    cfg.check_seed_sets(2)
    assert cfg.seeds("a", 2) == [[0, 1, 2], [3, 4, 5]] and cfg.seeds("b", 2) == [[6, 7, 8], [9, 10, 11]]
    with pytest.raises(ValueError, match="no evaluation prompts"):
        EvalConfig().load_prompts()
    with pytest.raises(ValueError, match="1 prompt\\(s\\) x images_per_prompt=1 is 1 image per set; FID needs at least 2"):
        EvalConfig(prompts=["a"], images_per_prompt=1).check_ready()  # (it failed after every set was sampled)


def test_a_prompt_file_with_a_bom_and_a_torn_cache_file(tmp_path):
    """A BOM (Windows editors) was kept in the first prompt (three more tokens) and broke a JSON file;
    an empty or cut-short statistics file raised instead of being regenerated."""
    import numpy as np

    from dmm_ray.evaluation.cache import StatsCache

    (tmp_path / "p.txt").write_bytes("a red cat\r\na blue dog\n".encode("utf-8-sig"))
    (tmp_path / "p.json").write_bytes('["a red cat", "a blue dog"]'.encode("utf-8-sig"))
    for name in ("p.txt", "p.json"):
        assert EvalConfig(prompts_file=str(tmp_path / name)).load_prompts() == ["a red cat", "a blue dog"]
    cache = StatsCache(tmp_path / "cache")
    (tmp_path / "cache").mkdir()
    np.savez(tmp_path / "cache" / "whole.npz", mu=np.zeros(3))
    good = (tmp_path / "cache" / "whole.npz").read_bytes()
    for key, data in (("empty", b""), ("cut", good[: len(good) // 2])):
        (tmp_path / "cache" / f"{key}.npz").write_bytes(data)
        assert cache.load(key) is None


@pytest.mark.parametrize("error", [OSError("No space left on device"), KeyboardInterrupt()], ids=["error", "ctrl-c"])
def test_a_failed_cache_write_leaves_no_temp_file(tmp_path, monkeypatch, error):
    """A failure or Ctrl-C inside np.savez left its uniquely named `*.npz.tmp` (full size: sigma is D x D
    float64) in the cache folder, one more per interrupted evaluation; the entry already there is kept."""
    from dmm_ray.evaluation.cache import StatsCache

    cache = StatsCache(tmp_path)
    stats = FeatureStats.from_features(_features(0, n=20, d=4))
    cache.save("key", {"m": 1}, stats, np.zeros((1, 2, 2, 3), np.uint8))
    before = sorted(p.name for p in tmp_path.iterdir())

    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(np, "savez", fail)
    with pytest.raises(type(error)):
        cache.save("key", {"m": 1}, FeatureStats.from_features(_features(1, n=20, d=4)), np.zeros((1, 2, 2, 3), np.uint8))
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    np.testing.assert_array_equal(cache.load("key").stats.mu, stats.mu)


def test_what_a_killed_evaluation_or_download_left_is_removed_by_the_next(tmp_path):
    """Finding: a SIGKILL (OOM) left the stats cache's uniquely named `*.npz.tmp` (full size), the
    evaluation's staged `.<stem>.<pid>.tmp.<ext>` files and a download's `<name>.part-*` folder forever:
    no later run removes another run's names. The next save / evaluation / download now removes those of
    processes that no longer run here, written before it started; a running process's, and a fresh one
    (another host's, in a folder the nodes share), are kept."""
    import os
    import subprocess
    import sys
    import time

    import pyarrow.fs as pafs

    from dmm_ray.data.fs import download_dir
    from dmm_ray.evaluation.cache import StatsCache
    from dmm_ray.evaluation.outputs import staged_files

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True).stdout.strip()
    live = os.getppid()
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.txt").write_text("a")
    cache, out, down = tmp_path / "cache", tmp_path / "out", tmp_path / "down"
    for folder in (cache, out, down):
        folder.mkdir()
    left = {  # name -> removed?
        cache / f"tmp-{dead}-x1.npz.tmp": True,
        cache / f"tmp-{live}-x2.npz.tmp": False,
        out / f".fid_matrix.{dead}.tmp.json": True,
        out / f".fid_matrix.{live}.tmp.json": False,
        down / f"m.part-{dead}-0123abcd": True,
        down / f"m.part-{live}-0123abcd": False,
    }
    for path in left:
        path.mkdir() if ".part-" in path.name else path.write_text("x")
        os.utime(path, (time.time() - 3600,) * 2)  # before this process started
    fresh = out / f".fid_matrix.{dead}.tmp.csv"  # a dead pid here, but written just now: another host's
    fresh.write_text("x")
    os.utime(fresh, (time.time() + 60,) * 2)

    StatsCache(cache).save("key", {"m": 1}, FeatureStats.from_features(_features(0, n=20, d=4)), np.zeros((1, 2, 2, 3), np.uint8))
    with staged_files({"json": out / "fid_matrix.json", "csv": out / "fid_matrix.csv"}) as staged:
        for path in staged.values():
            path.write_text("new")
    download_dir(pafs.LocalFileSystem(), str(tmp_path / "src"), down / "m")
    assert {path: not path.exists() for path in left} == left and fresh.exists()
    assert (down / "m" / "a.txt").read_text() == "a" and (out / "fid_matrix.json").read_text() == "new"


def test_merge_config_evaluation_shorthands(tmp_path):
    """The merge section's shorthands are EvalConfig's own (a before-validator)."""
    import json

    coco = tmp_path / "captions_val2014.json"
    coco.write_text(json.dumps({"annotations": [{"caption": "A cat  on a mat. "}, {"caption": "A cat on a mat."}, {"caption": "Two dogs"}]}))
    cfg = EvalConfig.model_validate(
        {"prompts": str(coco), "num_prompts": 5000, "inception_weights": "/m/pt_inception.pth", "num_inference_steps": 10, "resolution": 512}
    )
    assert cfg.prompts_file == str(coco) and cfg.max_prompts == 5000
    assert cfg.extractor.kind == "inception" and cfg.extractor.path == "/m/pt_inception.pth"
    assert cfg.sampler.num_inference_steps == 10 and cfg.sampler.height == cfg.sampler.width == 512
    assert cfg.load_prompts() == ["A cat on a mat.", "Two dogs"]
    zoo = EvalConfig.model_validate({"feature_net": "/zoo/fnet", "images_per_prompt": 4})
    assert zoo.extractor.kind == "zoo" and zoo.extractor.path == "/zoo/fnet"
    with pytest.raises(ValueError, match="num_prompt"):
        EvalConfig.model_validate({"num_prompt": 3})
