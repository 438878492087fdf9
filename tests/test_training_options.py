"""Fidelity options of the merge loop (issue: close the fidelity gap): each test checks the mechanics
that would break if the option did nothing or did the wrong thing."""

import math
from pathlib import Path

import pytest
import torch
from merge_fixtures import build_world, noised_batch, tiny_merge_config

from dmm_ray.config import DistillConfig, MergeConfig
from dmm_ray.distill.layout import worker_layout
from dmm_ray.distill.loop import _optimizer
from dmm_ray.distill.step import DistillStep, LossSettings, concat_batches
from dmm_ray.distill.streams import split_batch
from dmm_ray.models.style_unet import StyleUNet
from dmm_ray.tiny import tiny_sd_components, training_noise_scheduler


def _batch(b=4, seed=0):
    return noised_batch(b, seed)


def test_zero_style_init_starts_exactly_at_the_base():
    c = tiny_sd_components(seed=0)
    base = c["unet"].eval()
    b = _batch()
    text = c["text_encoder"](b["input_ids"])[0]
    with torch.no_grad():
        want = base(b["noisy_latents"], b["timesteps"], text).sample
        zero = StyleUNet.from_unet(base, ["a", "b", "c"], style_init="zero").eval()
        rand = StyleUNet.from_unet(base, ["a", "b", "c"], style_init="random").eval()
        for style in range(3):
            ids = torch.full((4,), style)
            assert torch.equal(zero(b["noisy_latents"], b["timesteps"], text, style_ids=ids).sample, want)
        assert not torch.allclose(rand(b["noisy_latents"], b["timesteps"], text, style_ids=ids).sample, want, atol=1e-4)
    # ... and it can still learn: the zeroed layer gets a gradient at once
    out = zero.train()(b["noisy_latents"], b["timesteps"], text, style_ids=ids).sample
    out.square().mean().backward()
    assert zero.class_embedding.mlp.linear_2.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("kind", ["cosine", "linear", "constant"])
def test_lr_schedule_follows_its_formula(kind):
    student = StyleUNet.from_unet(tiny_sd_components(seed=0)["unet"], ["a", "b"])
    d = DistillConfig(lr=1e-3, lr_schedule=kind, warmup_steps=10, style_lr_mult=5.0)
    steps = 100
    opt, sched = _optimizer(student, d, d.lr, steps, d.warmup_steps)
    seen = []
    for _ in range(steps):
        seen.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    for step, (unet_lr, style_lr) in enumerate(seen):
        if step < 10:
            factor = step / 10
        else:
            progress = (step - 10) / (steps - 10)
            factor = {"cosine": 0.5 * (1 + math.cos(math.pi * progress)), "linear": 1 - progress, "constant": 1.0}[kind]
        assert unet_lr == pytest.approx(1e-3 * factor, abs=1e-12)
        assert style_lr == pytest.approx(5e-3 * factor, abs=1e-12)  # the style parameters learn style_lr_mult x faster
    names = {id(p): n for n, p in student.named_parameters()}
    assert all(names[id(p)].startswith("class_embedding.") for p in opt.param_groups[1]["params"])
    assert not any(names[id(p)].startswith("class_embedding.") for p in opt.param_groups[0]["params"])


def test_split_batch_keeps_the_configured_fraction():
    assert split_batch(32, 0.0) == (32, 0)
    assert split_batch(32, 0.25) == (24, 8)
    assert split_batch(20, 0.5) == (10, 10)
    with pytest.raises(ValueError, match="synthetic_fraction"):
        split_batch(2, 0.1)


def test_teacher_packing_layout():
    roles = worker_layout(8, 1, teachers_per_worker=8)
    assert len(roles) == 1 and roles[0].teacher_indices == tuple(range(8))
    roles = worker_layout(5, 2, teachers_per_worker=2)  # G = 3 groups, each on 2 workers
    assert [r.teacher_indices for r in roles] == [(0, 1), (2, 3), (4,), (0, 1), (2, 3), (4,)]
    roles = worker_layout(4, 1, num_old_styles=3, regularization=True, teachers_per_worker=2)
    assert [r.style_indices for r in roles] == [(3, 4), (5, 6), ()] and roles[-1].kind == "regularizer"


def test_packed_step_equals_one_teacher_per_batch():
    """Two teachers on one worker, one student pass over both sub-batches == the per-teacher losses."""
    c = tiny_sd_components(seed=0)
    text = c["text_encoder"].requires_grad_(False)
    teachers = []
    for seed in (1, 2):
        t = tiny_sd_components(seed=0)["unet"]
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in t.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=g))
        teachers.append(t.requires_grad_(False).eval())
    student = StyleUNet.from_unet(c["unet"], ["a", "b"]).eval()
    settings = LossSettings(lambda_adv=0)
    sched = training_noise_scheduler()
    b0, b1 = _batch(seed=10), _batch(seed=11)
    packed = DistillStep(student, text, teachers, [text, text], sched, settings, num_styles=2)
    ids = torch.tensor([0] * 4 + [1] * 4)
    total, terms, *_ = packed.generator_losses(concat_batches([b0, b1]), ids)
    singles = [
        DistillStep(student, text, t, text, sched, settings, num_styles=2).generator_losses(b, torch.full((4,), i))[1]
        for i, (t, b) in enumerate(zip(teachers, (b0, b1)))
    ]
    for name in ("score", "feat"):
        assert terms[name].item() == pytest.approx((singles[0][name].item() + singles[1][name].item()) / 2, rel=1e-5)


def test_v_score_weighting_weighs_each_sample_by_its_timestep():
    """score_weighting=v: the score term is the per-sample eps MSE times min(1/alpha_bar_t, clip), normalised
    to mean 1 over t; eps keeps the paper's plain MSE."""
    from dmm_ray.distill.losses import timestep_weights

    sched = training_noise_scheduler()
    a = sched.alphas_cumprod
    w = timestep_weights(a, "v", clip=20.0)
    assert w.mean().item() == pytest.approx(1.0, rel=1e-5)
    assert w[999] / w[0] == pytest.approx(20.0 / (1 / a[0].item()), rel=1e-4)  # clipped at T, ~1 at t = 0
    assert torch.all(w[1:] >= w[:-1])  # more weight the noisier the input
    with pytest.raises(ValueError, match="'eps' or 'v'"):
        timestep_weights(a, "x0")

    c = tiny_sd_components(seed=0)
    text = c["text_encoder"].requires_grad_(False)
    teacher = tiny_sd_components(seed=3)["unet"].requires_grad_(False).eval()
    student = StyleUNet.from_unet(c["unet"], ["a"]).eval()
    b = _batch(seed=5)
    b["timesteps"] = torch.tensor([0, 300, 800, 999])
    ids = torch.zeros(4, dtype=torch.long)
    plain = DistillStep(student, text, teacher, text, sched, LossSettings(lambda_adv=0, lambda_feat=0), num_styles=1)
    weighted = DistillStep(student, text, teacher, text, sched, LossSettings(lambda_adv=0, lambda_feat=0, score_weighting="v"), num_styles=1)
    with torch.no_grad():
        per_sample = torch.stack(
            [
                plain.generator_losses({k: (v[i : i + 1] if torch.is_tensor(v) else v[i : i + 1]) for k, v in b.items()}, ids[:1])[1]["score"]
                for i in range(4)
            ]
        )
        assert plain.generator_losses(b, ids)[1]["score"].item() == pytest.approx(per_sample.mean().item(), rel=1e-5)
        got = weighted.generator_losses(b, ids)[1]["score"].item()
    assert got == pytest.approx((w[b["timesteps"]] * per_sample).mean().item(), rel=1e-5)
    assert got != pytest.approx(per_sample.mean().item(), rel=1e-2)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return build_world(tmp_path_factory.mktemp("options_world"), num_teachers=2, rows=64)


@pytest.mark.ray
def test_packed_merge_with_synthetic_mixing_and_finetune_continue(ray_cluster, world, tmp_path):
    """One worker hosts both teachers; one synthesis actor serves both teachers in turn; the distill
    stream mixes in each teacher's samples; the fine-tune
    restores the distill stage's discriminator head and optimizer state; the EMA is what is saved.
    The output_dir is a file:// URI (object storage's code path): synthesized shards, stage states,
    checkpoints, fingerprints and the model land there; the driver's staging folder keeps none of it."""
    import json

    from dmm_ray import paths
    from dmm_ray.distill.checkpointing import load_training_state
    from dmm_ray.merge import run_merge
    from dmm_ray.pipeline import load_dmm_pipeline

    uri = (tmp_path / "out").as_uri()
    cfg = MergeConfig.model_validate(
        tiny_merge_config(
            world,
            uri,
            scaling={"teachers_per_worker": 2, "cpus_per_worker": 1},
            data={**tiny_merge_config(world, tmp_path)["data"], "synthetic_fraction": 0.5, "encode": {"resolution": 16}},  # the shards' size
            distill={"steps": 3, "checkpoint_every": 3, "ema_decay": 0.9, "lr_schedule": "cosine", "warmup_steps": 1},
            synthesis={
                "images_per_teacher": 8,
                "num_inference_steps": 2,
                "batch_size": 4,
                "finetune_steps": 2,
                "finetune_batch_size": 2,
                "resolution": 16,
                "finetune_continue": True,
                "actors": 1,
            },
        )
    )
    assert cfg.num_workers == 1
    result = run_merge(cfg)
    assert result.stage_metrics["distill"]["step"] == 3 and result.stage_metrics["finetune"]["step"] == 2
    assert result.stage_metrics["synthesize"]["seconds"] > 0  # synthesis ran before distillation
    assert result.stage_metrics["distill"]["synthetic_share"] == 0.5  # half of every style's rows: its teacher's samples
    assert result.stage_metrics["finetune"]["synthetic_share"] == 1.0
    state_dir = tmp_path / "out" / "stages" / "distill_state"
    distill_state = load_training_state(state_dir)
    # the saved distill student is the EMA of the raw weights, not the raw weights
    saved = StyleUNet.from_pretrained(state_dir / "student")
    ema = distill_state["ema"]["shadow_params"]
    for p, shadow in zip(saved.parameters(), ema):
        assert torch.equal(p.detach(), shadow)
    # the fine-tune started from the distill discriminator head: its Adam step count continued (3 + 2)
    ft_states = sorted((tmp_path / "out" / "ray_results").glob("*finetune*/checkpoint_*/train_state.pt"))
    ft = torch.load(ft_states[-1], weights_only=True)
    assert ft["opt_disc"]["state"][0]["step"].item() == 5
    assert ft["opt_student"]["state"][0]["step"].item() == 5
    # everything at the URI, nothing left in the driver's staging folder but the local model copy
    remote, staging = tmp_path / "out", paths.staging_dir(uri)
    assert result.location == uri + "/merged" and result.merged_path == staging / "merged"
    assert (remote / "merged" / "model_index.json").is_file() and (remote / "merged" / "dmm_merge.json").is_file()
    assert sorted(p.name for p in (remote / "synthesized").iterdir()) == ["style_0", "style_1"]
    assert (remote / "stages" / "distill_student" / "config.json").is_file()
    assert set(json.loads((remote / "fingerprints.json").read_text())) == {"synthesize", "distill", "finetune", "training_run"}
    assert not (staging / "synthesized").exists() and not (staging / "ray_results").exists() and not (staging / "merge.lock").exists()
    assert load_dmm_pipeline(uri + "/merged").styles == ["style0", "style1"]


def test_style_film_starts_as_identity_and_round_trips(tmp_path):
    """The FiLM extension is the identity at init (a plain StyleUNet's output), learns per style, and
    its config and weights survive save/load."""
    c = tiny_sd_components(seed=0)
    b = _batch()
    text = c["text_encoder"](b["input_ids"])[0].detach()
    torch.manual_seed(0)
    plain = StyleUNet.from_unet(c["unet"], ["a", "b"]).eval()
    torch.manual_seed(0)
    film = StyleUNet.from_unet(c["unet"], ["a", "b"], style_film=True).eval()
    ids = torch.tensor([0, 1, 0, 1])
    with torch.no_grad():
        assert torch.equal(
            film(b["noisy_latents"], b["timesteps"], text, style_ids=ids).sample,
            plain(b["noisy_latents"], b["timesteps"], text, style_ids=ids).sample,
        )
    assert len(film.class_embedding.film) == sum(1 for m in film.modules() if type(m).__name__ == "ResnetBlock2D")
    film.train()(b["noisy_latents"], b["timesteps"], text, style_ids=ids).sample.square().mean().backward()
    assert all(layer.weight.grad.abs().sum() > 0 for layer in film.class_embedding.film)
    with torch.no_grad():
        for layer in film.class_embedding.film:
            layer.weight.normal_(0, 0.1)
        film.save_pretrained(tmp_path / "unet")
        loaded = StyleUNet.from_pretrained(tmp_path / "unet").eval()
        assert loaded.config.style_film
        assert torch.equal(
            loaded(b["noisy_latents"], b["timesteps"], text, style_ids=ids).sample,
            film.eval()(b["noisy_latents"], b["timesteps"], text, style_ids=ids).sample,
        )


def test_style_adapters_start_at_each_teachers_low_rank_delta(world, tmp_path, capsys):
    """student.style_adapters (extension): the distill student's adapters for style i hold the best
    rank-r approximation of teacher i's weight change, and they train at the UNet's lr, not the style lr.
    One rank reports the starts (every rank computes the same ones)."""
    from diffusers import UNet2DConditionModel

    from dmm_ray.distill.loop import _load_student, _optimizer
    from dmm_ray.models.style_adapters import adapter_key

    cfg = MergeConfig.model_validate(
        tiny_merge_config(
            world,
            tmp_path / "out",
            student={"base": world["base"], "style_adapters": {"rank": 2, "targets": ["to_q", "conv1"]}},
            distill={"steps": 2, "style_lr_mult": 10},
        )
    )
    names = [t.name for t in cfg.teachers]
    silent = _load_student(cfg, "distill", None, names, report=False)  # any rank but 0
    assert "style adapters" not in capsys.readouterr().out
    student = _load_student(cfg, "distill", None, names)
    assert [line.split()[2] for line in capsys.readouterr().out.splitlines() if line.startswith("style adapters:")] == names
    assert all(torch.equal(a, b) for a, b in zip(silent.state_dict().values(), student.state_dict().values()))
    modules = student.config.style_adapter_modules
    assert modules and all(m.endswith(("to_q", "conv1")) for m in modules)
    base = UNet2DConditionModel.from_pretrained(Path(world["base"]) / "unet").state_dict()
    for i, teacher in enumerate(world["teachers"]):
        tuned = UNet2DConditionModel.from_pretrained(Path(teacher["source"]) / "unet").state_dict()
        for name in modules:
            adapter = student.class_embedding.adapters[adapter_key(name)]
            rows = slice(2 * i, 2 * i + 2)
            got = adapter.up[:, rows] @ adapter.down[rows].flatten(1)
            u, s, vh = torch.linalg.svd((tuned[name + ".weight"] - base[name + ".weight"]).flatten(1), full_matrices=False)
            assert torch.allclose(got, (u[:, :2] * s[:2]) @ vh[:2], atol=1e-5), name
            if adapter.bias is not None:
                assert torch.allclose(adapter.bias[i], tuned[name + ".bias"] - base[name + ".bias"], atol=1e-6)
    opt, _ = _optimizer(student, cfg.distill, 1e-3, 2, 0)
    fast = {id(p) for p in opt.param_groups[1]["params"]}
    assert all(id(p) not in fast for p in student.class_embedding.adapters.parameters())
    assert id(student.class_embedding.codebook.weight) in fast


def test_a_stage_gets_one_typed_config_with_its_own_steps_lr_and_batch():
    """The fine-tune's steps, lr and batch reach the workers inside the one MergeConfig they read
    (made on the driver with model_copy), not as loose keys beside it."""
    from dmm_ray.config import MergeConfig
    from dmm_ray.distill.trainer import stage_config

    cfg = MergeConfig.model_validate({"data": {"base": "b", "shards": "s"}, "student": {"base": "b"}, "teachers": [{"name": "a", "source": "x"}]})
    same = stage_config(cfg)
    assert same is cfg
    ft = stage_config(cfg, steps=7, batch_size=3, lr=2e-5)
    assert (ft.distill.steps, ft.distill.lr, ft.data.stream.batch_size) == (7, 2e-5, 3)
    assert (cfg.distill.steps, cfg.distill.lr, cfg.data.stream.batch_size) != (7, 2e-5, 3)  # the merge's own config is untouched
    assert MergeConfig.model_validate(ft.model_dump(mode="json")).distill.steps == 7  # what a worker rebuilds


def test_table1_rows_add_one_term_each_even_when_the_preset_drops_one(world, tmp_path):
    """benchmarks/table1.py on a preset like toy.yaml (the adversarial term off): row 3 must set the
    paper's weight itself (else it repeats row 2), and the preset becomes a fifth row."""
    import sys

    from dmm_ray.overrides import apply_overrides

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import table1

    tree = tiny_merge_config(world, tmp_path, distill={"lambda_feat": 0.002, "lambda_adv": 0})
    tree["data"]["synthetic_fraction"] = 0.5

    def weights(sets):
        cfg = MergeConfig.model_validate(apply_overrides(tree, sets))
        return cfg.distill.lambda_feat, cfg.distill.lambda_adv, cfg.data.synthetic_fraction, cfg.synthesis.enabled

    rows = table1.table_rows(MergeConfig.model_validate(tree))
    paper_adv = DistillConfig.model_fields["lambda_adv"].default
    assert [weights(sets) for _, sets in rows] == [
        (0.0, 0.0, 0.0, False),
        (0.002, 0.0, 0.0, False),
        (0.002, paper_adv, 0.0, False),
        (0.002, paper_adv, 0.5, True),
        (0.002, 0.0, 0.5, True),  # the preset itself
    ]
    # a preset that is the full recipe is its own row 4: no fifth row
    tree["distill"]["lambda_adv"] = paper_adv
    assert len(table1.table_rows(MergeConfig.model_validate(tree))) == 4
    # mixture rows (an extension) stay out of the paper's four rows, which still validate; the preset is row 5
    tree["distill"]["mixture_fraction"] = 0.25
    tree.setdefault("scaling", {})["teachers_per_worker"] = 2
    rows = table1.table_rows(MergeConfig.model_validate(tree))
    mixtures = [MergeConfig.model_validate(apply_overrides(tree, sets)).distill.mixture_fraction for _, sets in rows]
    assert mixtures == [0, 0, 0, 0, 0.25] and "mixture rows 0.25" in rows[-1][0]


def test_synthesis_actors_are_killed_when_a_teacher_fails(tmp_path, monkeypatch):
    """A teacher that fails to load (ray.get raises in the driver) left the whole actor pool alive in the
    driver's Ray, each actor holding its CPUs (a GPU with use_gpu): every actor is killed on the way out."""
    import types

    from dmm_ray.distill import synthesis
    from dmm_ray.teachers import TeacherSpec

    killed, actors = [], []

    class FakeActor:
        def __init__(self):
            self.load_and_generate = types.SimpleNamespace(remote=lambda spec, *args: spec["name"])
            actors.append(self)

    fake_class = types.SimpleNamespace(options=lambda **kw: types.SimpleNamespace(remote=lambda *a: FakeActor()))

    def get(ref):
        raise RuntimeError(f"teacher {ref!r} could not be loaded")

    monkeypatch.setattr(synthesis, "TeacherSynthesizer", fake_class)
    monkeypatch.setattr(synthesis, "ray", types.SimpleNamespace(get=get, kill=killed.append))
    teachers = [TeacherSpec(name=n, source=str(tmp_path / n)) for n in ("a", "b")]
    with pytest.raises(RuntimeError, match="teacher 'a' could not be loaded"):
        synthesis.synthesize(teachers, 0, ["p"], tmp_path / "out", 2, 2, 5.0, 32, 2, actors=2)
    assert len(actors) == 2 and killed == actors
