"""The three losses and the two updates, outside Ray (the Ray loop calls exactly this code)."""

import copy

import pytest
import torch

from dmm_ray.distill.losses import feature_loss, predict_x0
from dmm_ray.distill.step import DistillStep, LossSettings
from dmm_ray.models.discriminator import MultiClassDiscriminator
from dmm_ray.models.style_unet import StyleUNet
from dmm_ray.tiny import training_noise_scheduler


@pytest.fixture
def setup(tiny_components):
    c = tiny_components
    torch.manual_seed(0)
    teacher = copy.deepcopy(c["unet"])
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(0.05 * torch.randn_like(p))
    teacher.requires_grad_(False)
    student = StyleUNet.from_unet(c["unet"], ["a", "b"])
    disc = MultiClassDiscriminator(c["unet"], 2)
    text = c["text_encoder"].requires_grad_(False)
    sched = training_noise_scheduler()
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, 4, 8, 8, generator=g)
    eps = torch.randn(x0.shape, generator=g)
    t = torch.randint(0, 1000, (4,), generator=g)
    ids = torch.tensor(c["tokenizer"](["a red circle"] * 4, padding="max_length", max_length=77).input_ids)
    batch = dict(noisy_latents=sched.add_noise(x0, eps, t), timesteps=t, input_ids=ids)
    return dict(student=student, teacher=teacher, disc=disc, text=text, sched=sched, batch=batch)


def _grad_sum(params):
    return sum(p.grad.abs().sum().item() for p in params if p.grad is not None)


def test_predict_x0_inverts_add_noise():
    sched = training_noise_scheduler()
    x0, eps, t = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8), torch.tensor([0, 500, 999])
    torch.testing.assert_close(predict_x0(sched.add_noise(x0, eps, t), eps, t, sched.alphas_cumprod, clamp=None), x0, rtol=1e-3, atol=1e-3)


def test_feature_loss_zero_for_equal_maps():
    maps = [torch.randn(2, 8, 4, 4), torch.randn(2, 16, 2, 2)]
    assert feature_loss(maps, [m.clone() for m in maps]).item() == 0.0
    assert feature_loss(maps, [m + 1 for m in maps]).item() == pytest.approx(1.0)


@pytest.mark.parametrize("term", ["score", "feat", "adv"])
def test_each_loss_term_reaches_the_student_only(setup, term):
    s = setup
    step = DistillStep(s["student"], s["text"], s["teacher"], s["text"], s["sched"], LossSettings(), 2, s["disc"])
    _, terms, *_ = step.generator_losses(s["batch"], torch.tensor([1, 1, 1, 1]))
    assert set(terms) == {"score", "feat", "adv"}
    terms[term].backward()
    assert _grad_sum(s["student"].parameters()) > 0
    codebook_grad = s["student"].class_embedding.codebook.weight.grad
    assert codebook_grad[1].abs().sum() > 0 and codebook_grad[0].abs().sum() == 0  # only style 1's row
    assert _grad_sum(s["disc"].parameters()) == 0  # the generator term does not train D
    assert all(p.grad is None for p in s["teacher"].parameters())


def test_switching_losses_off(setup):
    s = setup
    step = DistillStep(s["student"], s["text"], s["teacher"], s["text"], s["sched"], LossSettings(lambda_feat=0, lambda_adv=0), 2, s["disc"])
    _, terms, *_ = step.generator_losses(s["batch"], torch.tensor([0, 0, 0, 0]))
    assert set(terms) == {"score"} and step.discriminator is None
    with pytest.raises(ValueError, match="all losses are switched off"):
        DistillStep(s["student"], s["text"], s["teacher"], s["text"], s["sched"], LossSettings(score=False, lambda_feat=0, lambda_adv=0), 2)


def test_discriminator_step_touches_only_the_discriminator_head(setup):
    s = setup
    step = DistillStep(s["student"], s["text"], s["teacher"], s["text"], s["sched"], LossSettings(), 2, s["disc"])
    _, _, x0_s, x0_t, text = step.generator_losses(s["batch"], torch.tensor([1, 1, 1, 1]))
    s["student"].zero_grad()
    step.discriminator_loss(x0_s, x0_t, torch.tensor([1, 1, 1, 1]), text).backward()
    assert _grad_sum(s["student"].parameters()) == 0
    assert _grad_sum(s["disc"].head.parameters()) > 0
    assert all(p.grad is None for p in s["disc"].backbone.parameters())
    assert all(p.grad is None for p in s["teacher"].parameters())


def test_run_updates_student_and_discriminator_not_teacher(setup):
    s = setup
    student, disc, teacher = s["student"], s["disc"], s["teacher"]
    before = {k: v.clone() for k, v in student.state_dict().items()}
    head_before = {k: v.clone() for k, v in disc.head.state_dict().items()}
    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    backbone_before = {k: v.clone() for k, v in disc.backbone.state_dict().items()}
    step = DistillStep(student, s["text"], teacher, s["text"], s["sched"], LossSettings(), 2, disc)
    opt_s = torch.optim.AdamW(student.parameters(), lr=1e-3)
    opt_d = torch.optim.AdamW(disc.head.parameters(), lr=1e-3)
    logs = step.run([s["batch"], s["batch"]], [torch.tensor([0] * 4), torch.tensor([1] * 4)], opt_s, opt_d)
    assert {"loss_score", "loss_feat", "loss_adv", "loss_disc", "loss_total", "grad_norm"} <= logs.keys()
    assert any(not torch.equal(before[k], v) for k, v in student.state_dict().items())
    assert any(not torch.equal(head_before[k], v) for k, v in disc.head.state_dict().items())
    assert all(torch.equal(teacher_before[k], v) for k, v in teacher.state_dict().items())
    assert all(torch.equal(backbone_before[k], v) for k, v in disc.backbone.state_dict().items())


def test_loss_settings_come_from_the_distill_config():
    """One home for the loss defaults: LossSettings() equals LossSettings.from_config(DistillConfig())
    and follows every loss field a config sets."""
    from dmm_ray.config import DistillConfig

    assert LossSettings() == LossSettings.from_config(DistillConfig())
    d = DistillConfig(
        score=False, score_weighting="v", score_weight_clip=5.0, lambda_feat=0.5, lambda_adv=0.0, grad_clip=2.0, renoise_max_timestep=300
    )
    s = LossSettings.from_config(d)
    assert (s.score, s.score_weighting, s.score_weight_clip, s.lambda_feat, s.lambda_adv, s.grad_clip, s.renoise_max_timestep) == (
        False,
        "v",
        5.0,
        0.5,
        0.0,
        2.0,
        300,
    )
