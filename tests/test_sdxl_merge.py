"""SDXL in the merge loop: two text encoders, pooled text embedding and size ids reach the student,
the teacher and the discriminator backbone; a 2-step SDXL merge runs end to end on Ray."""

import copy

import pytest
import torch
from merge_fixtures import build_world, tiny_merge_config

from dmm_ray.distill.conditioning import SDXLConditioner, conditioner_for
from dmm_ray.distill.step import DistillStep, LossSettings
from dmm_ray.models.discriminator import MultiClassDiscriminator
from dmm_ray.models.style_unet import StyleUNet
from dmm_ray.tiny import tiny_sdxl_components, training_noise_scheduler

CAPTIONS = ["a red circle", "a blue square", "", "two yellow stars"]


class _Parts:  # what conditioner_for reads from a pipeline or a loaded Teacher
    def __init__(self, c):
        self.__dict__.update(c)


@pytest.fixture
def sdxl_setup():
    c = tiny_sdxl_components(seed=0)
    torch.manual_seed(0)
    teacher = copy.deepcopy(c["unet"]).requires_grad_(False)
    teacher_parts = _Parts({**c, "text_encoder_2": copy.deepcopy(c["text_encoder_2"])})
    with torch.no_grad():
        for p in list(teacher.parameters()) + list(teacher_parts.text_encoder_2.parameters()):
            p.add_(0.05 * torch.randn_like(p))
    sched = training_noise_scheduler()
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, 4, 8, 8, generator=g)  # (B, 4, h, w)
    eps, t = torch.randn(x0.shape, generator=g), torch.randint(0, 1000, (4,), generator=g)
    batch = dict(noisy_latents=sched.add_noise(x0, eps, t), timesteps=t, captions=CAPTIONS)
    return dict(
        student=StyleUNet.from_unet(c["unet"], ["a", "b"]),
        teacher=teacher,
        disc=MultiClassDiscriminator(c["unet"], 2),
        student_cond=conditioner_for(_Parts(c), 2),
        teacher_cond=conditioner_for(teacher_parts, 2),
        sched=sched,
        batch=batch,
    )


def test_sdxl_conditioning_matches_the_diffusers_pipeline(sdxl_setup):
    from diffusers import StableDiffusionXLPipeline

    cond = sdxl_setup["student_cond"]
    assert isinstance(cond, SDXLConditioner)
    embeds, added = cond(sdxl_setup["batch"])
    assert embeds.shape == (4, 77, 64)  # both encoders' penultimate states, 32 + 32 wide
    assert added["text_embeds"].shape == (4, 32) and added["time_ids"].shape == (4, 6)
    assert added["time_ids"][0].tolist() == [16, 16, 0, 0, 16, 16]  # 8x8 latents x VAE factor 2 = 16 px
    # the same numbers diffusers' own SDXL pipeline feeds its UNet
    c = tiny_sdxl_components(seed=0)
    ref, _, pooled, _ = StableDiffusionXLPipeline(**c).encode_prompt(CAPTIONS, device="cpu", do_classifier_free_guidance=False)
    torch.testing.assert_close(embeds, ref)
    torch.testing.assert_close(added["text_embeds"], pooled)


def test_sdxl_step_trains_student_and_discriminator_head_only(sdxl_setup):
    s = sdxl_setup
    step = DistillStep(s["student"], s["student_cond"], s["teacher"], s["teacher_cond"], s["sched"], LossSettings(), 2, s["disc"])
    _, terms, x0_s, x0_t, cond = step.generator_losses(s["batch"], torch.tensor([1, 1, 1, 1]))
    assert set(terms) == {"score", "feat", "adv"} and all(torch.isfinite(v) for v in terms.values())
    sum(terms.values()).backward()
    assert s["student"].class_embedding.codebook.weight.grad.abs().sum() > 0
    assert s["student"].add_embedding.linear_1.weight.grad.abs().sum() > 0  # SDXL's text_time path is used
    assert all(p.grad is None for p in s["teacher"].parameters())
    s["student"].zero_grad()
    step.discriminator_loss(x0_s, x0_t, torch.tensor([1, 1, 1, 1]), cond).backward()
    assert sum(p.grad.abs().sum() for p in s["disc"].head.parameters()) > 0
    assert all(p.grad is None for p in s["disc"].backbone.parameters())
    assert all(p.grad is None for p in s["student"].parameters())


def test_sdxl_teacher_uses_its_own_second_text_encoder(sdxl_setup):
    s = sdxl_setup
    student_text, student_added = s["student_cond"](s["batch"])
    teacher_text, teacher_added = s["teacher_cond"](s["batch"])
    assert not torch.allclose(student_text, teacher_text)
    assert not torch.allclose(student_added["text_embeds"], teacher_added["text_embeds"])


@pytest.fixture(scope="module")
def sdxl_world(tmp_path_factory):
    """Tiny SDXL base; teacher style0 a diffusers folder, teacher style1 a LoRA on the base."""
    from diffusers import StableDiffusionXLPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    world = build_world(tmp_path_factory.mktemp("sdxl_world"), num_teachers=1, sdxl=True)
    lora_dir = tmp_path_factory.mktemp("sdxl_lora")
    unet = tiny_sdxl_components(seed=0)["unet"]
    torch.manual_seed(7)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_lora_weights="gaussian"))
    with torch.no_grad():  # peft starts B at zero (an identity adapter); give the teacher a real style
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    StableDiffusionXLPipeline.save_lora_weights(lora_dir, unet_lora_layers=get_peft_model_state_dict(unet), safe_serialization=True)
    world["teachers"].append(
        {"name": "style1", "source": str(lora_dir / "pytorch_lora_weights.safetensors"), "base": world["base"], "format": "lora"}
    )
    return world


@pytest.mark.ray
# the default run distils only; synthesis and the fine-tune on SDXL teachers add minutes: make test-slow
@pytest.mark.slow  # about 50 s on 2 cores; the SDXL step, conditioning and teacher encoders are tested above without Ray
@pytest.mark.parametrize("synthesis", [False, True], ids=["distill", "synthesis"])
def test_sdxl_merge_end_to_end(ray_cluster, sdxl_world, tmp_path, synthesis):
    from dmm_ray.config import MergeConfig
    from dmm_ray.evaluation.sources import student_source
    from dmm_ray.merge import run_merge
    from dmm_ray.pipeline import DMMXLPipeline, load_dmm_pipeline

    cfg = MergeConfig.model_validate(tiny_merge_config(sdxl_world, tmp_path / "out", synthesis={"enabled": synthesis}))
    result = run_merge(cfg)
    assert ("finetune" in result.stage_metrics) == synthesis
    for stage in ("distill", "finetune") if synthesis else ("distill",):
        assert result.stage_metrics[stage]["step"] == 2
        assert all(k in result.stage_metrics[stage] for k in ("loss_score", "loss_feat", "loss_adv", "loss_disc"))
    pipe = load_dmm_pipeline(result.merged_path)
    assert isinstance(pipe, DMMXLPipeline) and pipe.styles == ["style0", "style1"]
    assert pipe.text_encoder_2 is not None
    # the LoRA teacher the worker hosted really is the base with the adapter fused in (not the base)
    from diffusers import UNet2DConditionModel

    from dmm_ray.teachers import TeacherSpec, load_teacher

    lora_unet = load_teacher(TeacherSpec.model_validate(sdxl_world["teachers"][1])).unet.state_dict()
    base_unet = UNet2DConditionModel.from_pretrained(f"{sdxl_world['base']}/unet").state_dict()
    assert any(not torch.equal(lora_unet[k], base_unet[k]) for k in base_unet)
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a red circle", style="style1", num_inference_steps=2, height=32, width=32).images[0]
    assert image.size == (32, 32)
    # evaluation loads the merged SDXL model through the same path
    assert isinstance(student_source(result.merged_path).pipeline_factory(), DMMXLPipeline)
