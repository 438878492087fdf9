"""The zoo feature net (FID extractor + prompt-following checker) and the Fréchet distance."""

import numpy as np
import pytest
import torch

from dmm_ray.zoo import scenes as S
from dmm_ray.zoo.feature_net import FeatureExtractor, ZooFeatureNet, scene_labels, train_feature_net
from dmm_ray.zoo.report import diagonal_checks, prompt_following
from dmm_ray.zoo.styles import apply_style


@pytest.fixture(autouse=True)
def zoo_threads():
    from dmm_ray.zoo.build import default_threads

    threads = torch.get_num_threads()
    torch.set_num_threads(default_threads())
    yield
    torch.set_num_threads(threads)


def test_save_load_round_trip_and_extractor_protocol(tmp_path):
    torch.manual_seed(0)
    net = ZooFeatureNet(style_names=["noir", "neon"], width=16, feature_dim=24)
    x = S.render(S.sample_scenes(6, seed=0))
    net.save_pretrained(tmp_path / "fn")
    again = ZooFeatureNet.from_pretrained(tmp_path / "fn")
    assert torch.equal(net.features(x), again.features(x)) and net.features(x).shape == (6, 24)
    assert again.name == net.name and again.name.startswith("zoo-feature-net-")
    assert again.label_names["style"] == ["none", "noir", "neon"]
    extractor = FeatureExtractor(again)
    assert extractor.name == net.name and extractor(x).shape == (6, 24)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        net.features(x[:, :1])


def test_short_training_learns_ground_truth_heads():
    torch.manual_seed(0)
    scenes = S.sample_scenes(384, seed=4)
    clean = S.render(scenes)
    style_idx = torch.arange(384) % 2  # none / noir
    images = torch.where((style_idx == 1).view(-1, 1, 1, 1), apply_style("noir", clean), clean)
    labels = scene_labels(scenes, style_idx)
    net = ZooFeatureNet(style_names=["noir"], width=16)
    acc = train_feature_net(net, images, labels, style_idx == 0, steps=50, batch_size=64, lr=3e-3, seed=0, progress=False)
    pred = net.predict(images)
    style_acc = np.mean([p == ("noir" if s else "none") for p, s in zip(pred["style"], style_idx.tolist())])
    colour_acc = np.mean([p == sc.colour for p, sc, s in zip(pred["colour"], scenes, style_idx.tolist()) if s == 0])
    assert style_acc > 0.95 and colour_acc > 0.5, (acc, style_acc, colour_acc)  # chance: 0.5 and 0.125


def test_prompt_following_scores_against_the_caption():
    class Oracle(ZooFeatureNet):
        """Predicts the held-out captions' own attributes, except the first image's colour."""

        def predict(self, images):
            gts = [S.parse_caption(p) for p in PROMPTS]
            out = {k: [g[k] for g in gts] for k in ("colour", "shape", "background", "count")}
            out["colour"][0] = "not-a-colour"
            return out

    PROMPTS = S.eval_captions()[:4]
    pf = prompt_following(Oracle(style_names=[]), torch.zeros(4, 3, 32, 32), PROMPTS)
    assert pf == {"colour": 0.75, "shape": 1.0, "background": 1.0, "count": 1.0}


def test_diagonal_checks():
    m = np.array([[1.0, 3.0, 9.0], [2.5, 2.0, 9.0], [9.0, 9.0, 1.0]])
    d = diagonal_checks(["a", "b", "c"], m, {"a": "grade", "b": "grade", "c": "distinct"})
    assert d["a"]["diag_is_row_min"] and d["b"]["diag_is_row_min"] and d["c"]["diag_over_min_offdiag"] == pytest.approx(1 / 9, abs=1e-3)
    assert not diagonal_checks(["a", "b"], np.array([[2.0, 1.0], [1.0, 2.0]]), {})["a"]["diag_is_row_min"]


def test_the_report_text_of_teachers_without_a_group():
    """Finding: a zoo.yaml teacher's `group` is optional (a hand-written zoo.yaml), but format_report formatted
    the group with `:<9`, and run_report's text on such a zoo was a TypeError (NoneType.__format__)."""
    from dmm_ray.zoo.report import format_report

    m = np.array([[1.0, 3.0], [2.5, 2.0]])
    report = {
        "teachers": ["a", "b"],
        "m_ref": m.tolist(),
        "feature_net": "net",
        "frechet": "fid",
        "settings": {},
        "diagonal": diagonal_checks(["a", "b"], m, {"a": "grade"}),  # b: no group
        "base_prompt_following": {"colour": 0.5},
        "teacher_checks": {"a": {"shape": 1.0}, "b": {"shape": 0.5}},
        "grid_png": "grid.png",
    }
    text = format_report(report)
    assert "a        group=grade" in text and "b        group=-  " in text


def test_grid_prompts_cover_distinct_colours():
    from dmm_ray.zoo.report import pick_grid_prompts

    picked = pick_grid_prompts(S.eval_captions())
    parsed = [S.parse_caption(p) for p in picked]
    assert len(picked) == 8 and len({p["colour"] for p in parsed}) == 8 and len({p["shape"] for p in parsed}) == 6


def test_fit_style_classifier_learns_new_renders_and_leaves_the_extractor_alone():
    """A head trained on ground-truth noir misses a different 'noir' rendering; the fitted classifier
    (fit on one seed set of those renders) finds it on another; the FID extractor is untouched."""
    from dmm_ray.zoo.feature_net import fit_style_classifier

    torch.manual_seed(0)
    scenes = S.sample_scenes(256, seed=4)
    clean = S.render(scenes)
    style_idx = torch.arange(256) % 2  # none / noir
    truth = torch.where((style_idx == 1).view(-1, 1, 1, 1), apply_style("noir", clean), clean)
    net = ZooFeatureNet(style_names=["noir"], width=16)
    train_feature_net(net, truth, scene_labels(scenes, style_idx), style_idx == 0, steps=40, batch_size=64, lr=3e-3, seed=0, progress=False)
    state = {k: v.clone() for k, v in net.state_dict().items()}

    def renders(seed, n=128):  # a "teacher" whose noir is an inverted, blue-tinted grade: not the ground truth
        sc = S.sample_scenes(n, seed=seed)
        img = S.render(sc)
        idx = torch.arange(n) % 2
        styled = (1 - img) * torch.tensor([0.3, 0.4, 1.0]).view(1, 3, 1, 1)
        return torch.where((idx == 1).view(-1, 1, 1, 1), styled, img), idx

    fit_x, fit_y = renders(10)
    test_x, test_y = renders(11)
    before = (net(test_x)["style"].argmax(1) == test_y).float().mean()
    clf = fit_style_classifier(net, fit_x, fit_y, steps=60, batch_size=64)
    after = (clf(test_x)["style"].argmax(1) == test_y).float().mean()
    assert after > 0.9 and after > before + 0.3, (before, after)
    assert all(torch.equal(v, state[k]) for k, v in net.state_dict().items())  # the extractor is untouched
    again = fit_style_classifier(net, fit_x, fit_y, steps=60, batch_size=64)
    assert torch.equal(again.heads["style"].weight, clf.heads["style"].weight)  # seeded: reproducible
    with pytest.raises(ValueError, match="0..1"):
        fit_style_classifier(net, fit_x, fit_y + 1)
