"""Mixture distillation (distill.mixture_fraction): rows with random style weights w over a packed
worker's styles are distilled towards sum_j w_j eps_j of its teachers (issue 12, the mixing target)."""

import pytest
import torch
import torch.nn.functional as F
from merge_fixtures import noised_batch

from dmm_ray.distill.step import MIXTURE, MIXTURE_STYLES, DistillStep, LossSettings, concat_batches
from dmm_ray.distill.streams import StageBatches, mixture_rows, mixture_weights
from dmm_ray.models.style_unet import StyleUNet
from dmm_ray.tiny import tiny_sd_components, training_noise_scheduler

N = 4  # student styles; the worker hosts styles 1 and 3 (teachers 0 and 1 of its bank)
HOSTED = [1, 3]


def _teachers():
    """Two full teachers whose outputs clearly differ (the base perturbed two ways)."""
    out = []
    for i in range(2):
        unet = tiny_sd_components(seed=0)["unet"]
        g = torch.Generator().manual_seed(300 + i)
        with torch.no_grad():
            for p in unet.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=g))
        out.append(unet.requires_grad_(False).eval())
    return out


@pytest.fixture(scope="module")
def world():
    c = tiny_sd_components(seed=0)
    text = c["text_encoder"].requires_grad_(False)
    student = StyleUNet.from_unet(c["unet"], [f"s{i}" for i in range(N)])
    teachers = _teachers()
    return student, text, teachers


def _step(world, **settings):
    student, text, teachers = world
    return DistillStep(student, text, teachers, [text, text], training_noise_scheduler(), LossSettings(**settings), num_styles=N)


def _mixed_batch(m=3):
    """Plain rows of teacher 0 (2) and teacher 1 (2), then an m-row mixture block."""
    plain = concat_batches([noised_batch(2, 0), noised_batch(2, 1)])
    block = noised_batch(m, 2)
    batch = concat_batches([plain, block], slices=False)
    batch["teacher_slices"] = plain["teacher_slices"]
    w = mixture_weights(m, 2, torch.Generator().manual_seed(0))  # (m, 2)
    batch[MIXTURE] = w
    batch[MIXTURE_STYLES] = torch.zeros(m, N).index_copy(1, torch.tensor(HOSTED), w)
    ids = torch.tensor([HOSTED[0]] * 2 + [HOSTED[1]] * 2 + [HOSTED[int(i)] for i in w.argmax(1)])
    return batch, ids, block, w


def _eps(unet, text_encoder, b):
    return unet(b["noisy_latents"], b["timesteps"], text_encoder(b["input_ids"])[0]).sample


def test_mixture_weights_are_random_subsets_on_the_simplex():
    w = mixture_weights(400, 4, torch.Generator().manual_seed(1))
    assert w.shape == (400, 4) and torch.allclose(w.sum(1), torch.ones(400))
    sizes = (w > 0).sum(1)
    assert sizes.min() == 2 and sizes.max() == 4 and set(sizes.tolist()) == {2, 3, 4}  # pairs (sweeps) to the full mix
    assert (w[:, 0] > 0).float().mean() > 0.6  # every style takes part about equally (expected 3/4)
    assert torch.equal(w, mixture_weights(400, 4, torch.Generator().manual_seed(1)))  # seeded
    assert mixture_rows(32, 0.25) == 8 and mixture_rows(3, 0.1) == 1


def test_mixture_rows_target_the_weighted_sum_of_the_teachers(world):
    _, text, teachers = world
    step = _step(world, lambda_adv=0)
    batch, ids, block, w = _mixed_batch()
    eps, feats = step._teacher_outputs(batch, ids, use_feat=True)
    assert eps.shape[0] == 7
    with torch.no_grad():
        own0 = _eps(teachers[0], text, noised_batch(2, 0))
        own1 = _eps(teachers[1], text, noised_batch(2, 1))
        mix0, mix1 = _eps(teachers[0], text, block), _eps(teachers[1], text, block)
    torch.testing.assert_close(eps[:2], own0, atol=1e-5, rtol=1e-5)  # plain rows: their own teacher only
    torch.testing.assert_close(eps[2:4], own1, atol=1e-5, rtol=1e-5)
    target = w[:, :1, None, None] * mix0 + w[:, 1:, None, None] * mix1
    torch.testing.assert_close(eps[4:], target, atol=1e-5, rtol=1e-5)
    assert (eps[4:] - mix0).abs().max() > 1e-3 and (eps[4:] - mix1).abs().max() > 1e-3  # neither teacher alone
    assert all(f.shape[0] == 7 for f in feats)


def test_student_runs_the_mixture_rows_at_their_weights(world):
    student, text, _ = world
    step = _step(world, lambda_adv=0, lambda_feat=0, score_weighting="eps")
    batch, ids, _, w = _mixed_batch()
    _, terms, x0_s, x0_t, cond = step.generator_losses(batch, ids)
    weights = torch.cat([F.one_hot(ids[:4], N).float(), batch[MIXTURE_STYLES]])
    with torch.no_grad():
        expected_student = student(batch["noisy_latents"], batch["timesteps"], text(batch["input_ids"])[0], style_weights=weights).sample
        target, _ = step._teacher_outputs(batch, ids, use_feat=False)
    torch.testing.assert_close(terms["score"], F.mse_loss(expected_student, target), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(terms["score_mixture"], F.mse_loss(expected_student[4:], target[4:]), atol=1e-6, rtol=1e-5)  # logged
    # the student as a one-style model (argmax ids) would give another loss: the weights really reach it
    with torch.no_grad():
        as_ids = student(batch["noisy_latents"], batch["timesteps"], text(batch["input_ids"])[0], style_ids=ids).sample
    assert abs(F.mse_loss(as_ids, target) - terms["score"]) > 1e-7
    assert x0_s.shape[0] == x0_t.shape[0] == cond[0].shape[0] == 4  # the discriminator sees the plain rows only


def test_discriminator_sees_only_plain_rows(world):
    from dmm_ray.models.discriminator import MultiClassDiscriminator

    student, text, teachers = world
    disc = MultiClassDiscriminator(tiny_sd_components(seed=0)["unet"], N)
    step = DistillStep(
        student, text, teachers, [text, text], training_noise_scheduler(), LossSettings(lambda_adv=0.1), num_styles=N, discriminator=disc
    )
    batch, ids, _, _ = _mixed_batch()
    opt_s = torch.optim.AdamW(student.parameters(), lr=0)
    opt_d = torch.optim.AdamW(disc.head.parameters(), lr=0)
    logs = step.run([batch], [ids], opt_s, opt_d, generator=torch.Generator().manual_seed(0))
    assert all(torch.isfinite(torch.tensor(v)) for v in logs.values()) and "loss_disc" in logs and "loss_adv" in logs


class _Stream:
    def __init__(self, seed):
        self.seed = seed

    def next(self):
        return noised_batch(2, self.seed)


def test_stage_batches_append_the_mixture_block():
    from types import SimpleNamespace

    sb = object.__new__(StageBatches)
    sb.mixture = [_Stream(5), _Stream(6)]
    sb.role = SimpleNamespace(style_indices=HOSTED)
    sb.worker = SimpleNamespace(style_names=[f"s{i}" for i in range(N)])
    sb.rng, sb.device = torch.Generator().manual_seed(0), torch.device("cpu")
    plain = concat_batches([noised_batch(3, 0), noised_batch(3, 1)])
    ids = torch.tensor([1, 1, 1, 3, 3, 3])
    batch, out_ids = sb._with_mixture(plain, ids)
    assert batch["noisy_latents"].shape[0] == 10 and len(batch["captions"]) == 10 and out_ids.shape == (10,)
    assert batch["teacher_slices"] == [(0, 0, 3), (1, 3, 6)]
    w, ws = batch[MIXTURE], batch[MIXTURE_STYLES]
    assert w.shape == (4, 2) and ws.shape == (4, N)
    torch.testing.assert_close(ws[:, HOSTED], w)
    assert ws[:, [0, 2]].abs().sum() == 0  # styles another worker hosts never enter its mixtures
    assert torch.equal(batch["noisy_latents"][6:8], noised_batch(2, 5)["noisy_latents"])  # block: style 1's rows, then style 3's


def test_mixture_needs_a_packed_worker_and_synthesized_samples(tmp_path):
    from merge_fixtures import build_world, tiny_merge_config

    from dmm_ray.config import MergeConfig

    world = build_world(tmp_path / "w")
    raw = tiny_merge_config(world, tmp_path / "out")
    raw.setdefault("distill", {})["mixture_fraction"] = 0.25
    with pytest.raises(ValueError, match="teachers_per_worker >= 2"):
        MergeConfig.model_validate(raw)


def test_planner_counts_the_mixture_rows():
    from dmm_ray.memory_plan import Layout, plan_layout

    def act(plan, what):
        return next(b for n, b, _ in plan.lines if n.startswith(what))

    plain = plan_layout(Layout(arch="sd15", teachers_on_worker=4, batch_per_style=4))
    mixed = plan_layout(Layout(arch="sd15", teachers_on_worker=4, batch_per_style=4, mixture_rows=1))
    # student: 4 x (4 + 1) rows instead of 4 x 4; each teacher: its 4 rows plus the 4-row block
    assert act(mixed, "student activations (20 rows") * 16 == act(plain, "student activations (16 rows") * 20
    assert abs(act(mixed, "teacher forward, one sub-batch of 8") - 2 * act(plain, "teacher forward, one sub-batch of 4")) <= 2


@pytest.mark.ray
def test_packed_merge_with_mixture_rows(ray_cluster, tmp_path):
    """End to end on Ray: one worker hosts both teachers and adds the mixture block every step
    (its rows are synthesized samples, so they show in synthetic_share; its loss is logged)."""
    from merge_fixtures import build_world, tiny_merge_config

    from dmm_ray.config import MergeConfig
    from dmm_ray.merge import run_merge
    from dmm_ray.pipeline import load_dmm_pipeline

    world = build_world(tmp_path / "world", num_teachers=2, rows=64)
    raw = tiny_merge_config(
        world, tmp_path / "out", scaling={"teachers_per_worker": 2, "cpus_per_worker": 1}, distill={"steps": 2, "checkpoint_every": 2}
    )
    raw["data"]["synthetic_fraction"] = 0.5
    raw["data"]["encode"] = {"resolution": 16}  # the tiny world's 8x8 latent shards: synthesized rows must match them
    raw["distill"]["mixture_fraction"] = 0.5
    raw["synthesis"].update({"images_per_teacher": 8, "num_inference_steps": 2, "batch_size": 4, "resolution": 16, "actors": 1, "finetune_steps": 0})
    cfg = MergeConfig.model_validate(raw)
    result = run_merge(cfg)
    metrics = result.stage_metrics["distill"]
    b, m = cfg.data.stream.batch_size, mixture_rows(cfg.data.stream.batch_size, 0.5)  # per style: b plain rows (half synthesized), m mixture rows
    assert metrics["synthetic_share"] == pytest.approx((2 * b / 2 + 2 * m) / (2 * b + 2 * m))
    assert metrics["loss_score_mixture"] > 0
    assert load_dmm_pipeline(result.merged_path).styles == ["style0", "style1"]


def test_the_layout_changes_suggested_with_mixture_rows_keep_two_teachers_per_worker(tmp_path):
    """distill.mixture_fraction > 0 needs scaling.teachers_per_worker >= 2, yet both the num_workers message
    (3 teachers, 2 per worker, 3 workers: 'keep 3 with scaling.teachers_per_worker: 1') and the memory plan's
    changes that fit ('scaling.teachers_per_worker: 1 (W = 4 workers)') suggested 1, which the config then
    refused. Both suggest 2 or more now, and the suggested config is valid."""
    import re

    from merge_fixtures import build_world, tiny_merge_config

    from dmm_ray.config import MergeConfig
    from dmm_ray.memory_plan import Layout, suggestions

    world = build_world(tmp_path / "w", num_teachers=3)

    def config(**scaling):
        return tiny_merge_config(world, tmp_path / "out", scaling=scaling, distill={"mixture_fraction": 0.25}, data={"synthetic_fraction": 0.5})

    with pytest.raises(ValueError, match=r"keep 3 with scaling.teachers_per_worker: (\d+)") as error:
        MergeConfig.model_validate(config(teachers_per_worker=2, num_workers=3))
    k = int(re.search(r"keep 3 with scaling.teachers_per_worker: (\d+)", str(error.value))[1])
    assert k >= 2 and MergeConfig.model_validate(config(teachers_per_worker=k, num_workers=3)).num_workers == 3
    for capacity in (20, 24, 32, 40):  # (1 teacher per worker was the change suggested at each)
        lay = Layout(arch="sd15", teachers_on_worker=4, batch_per_style=4, mixture_rows=1)
        tips = suggestions(lay, capacity, num_teachers=4)
        hosted = [int(m[1]) for t in tips for m in re.finditer(r"scaling.teachers_per_worker: (\d+)", t)]
        assert tips and all(k >= 2 for k in hosted), tips
        assert not any("one teacher per worker" in t for t in tips)
