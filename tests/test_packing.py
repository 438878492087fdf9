"""Packing several teachers on one worker (issue 18): LoRA teachers as named adapters on one shared
base, offloaded full teachers, teacher dtype, gradient checkpointing, optimizers, the memory planner."""

from collections import Counter
from dataclasses import replace

import pytest
import torch
from diffusers import StableDiffusionPipeline
from merge_fixtures import noised_batch

from dmm_ray import TeacherSpec, load_teacher
from dmm_ray.distill.conditioning import conditioner_for
from dmm_ray.distill.layout import worker_layout
from dmm_ray.distill.step import DistillStep, LossSettings, concat_batches
from dmm_ray.distill.teacher_bank import load_teacher_bank
from dmm_ray.models.style_unet import StyleUNet
from dmm_ray.tiny import tiny_sd_components, training_noise_scheduler
from dmm_ray.zoo.formats import LORA_TARGETS


def _cond(parts):
    return conditioner_for(parts, 4)


@pytest.fixture(scope="module")
def packed_world(tiny_base_dir, tmp_path_factory):
    """3 LoRAs of the tiny base (attention, ResNet convs, in/out convs: what the zoo's LoRAs adapt) and 2 full teachers."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    root = tmp_path_factory.mktemp("packed")
    loras = []
    for i in range(3):
        pipe = StableDiffusionPipeline.from_pretrained(tiny_base_dir)
        torch.manual_seed(10 + i)
        pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=LORA_TARGETS, init_lora_weights="gaussian"))
        with torch.no_grad():
            for name, p in pipe.unet.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.05)
        StableDiffusionPipeline.save_lora_weights(root / f"lora{i}", unet_lora_layers=get_peft_model_state_dict(pipe.unet), safe_serialization=True)
        loras.append(
            TeacherSpec(
                name=f"lora{i}",
                source=str(root / f"lora{i}" / "pytorch_lora_weights.safetensors"),
                base=str(tiny_base_dir),
                lora_scale=0.7 if i == 1 else 1.0,
            )
        )
    fulls = []
    for i in range(2):
        c = tiny_sd_components(seed=0)
        g = torch.Generator().manual_seed(200 + i)
        with torch.no_grad():
            for p in c["unet"].parameters():
                p.add_(0.02 * torch.randn(p.shape, generator=g))
        StableDiffusionPipeline(**c).save_pretrained(root / f"full{i}")
        fulls.append(TeacherSpec(name=f"full{i}", source=str(root / f"full{i}")))
    return {"loras": loras, "fulls": fulls}


def _batch(b=3, seed=0):
    return noised_batch(b, seed)


def _teacher_eps(step, batches):
    batch = concat_batches(batches)
    ids = torch.cat([torch.full((b["noisy_latents"].shape[0],), j) for j, b in enumerate(batches)])
    eps, feats = step._teacher_outputs(batch, ids, use_feat=True)
    return eps, feats


def _step(teachers, conds=None):
    c = tiny_sd_components(seed=0)
    student = StyleUNet.from_unet(c["unet"], [f"s{i}" for i in range(5)])
    return DistillStep(
        student, c["text_encoder"].requires_grad_(False), teachers, conds, training_noise_scheduler(), LossSettings(lambda_adv=0), num_styles=5
    )


def test_every_style_gets_the_same_samples_per_step_for_every_k():
    for n in (3, 5, 8):
        for k in range(1, n + 1):
            for m in (1, 2):
                rows = Counter()
                for role in worker_layout(n, m, teachers_per_worker=k):
                    for style in role.style_indices:
                        rows[style] += 4  # each hosted teacher gets its own batch of 4
                assert set(rows) == set(range(n)) and len(set(rows.values())) == 1, (n, k, m, rows)


def test_lora_adapters_switched_per_sub_batch_equal_the_fused_teachers(packed_world):
    specs = packed_world["loras"]
    bank = load_teacher_bank(specs, "cpu", _cond)
    assert bank.describe() == "3 adapter (1 shared LoRA base)"
    assert len({id(bank.activate(j)) for j in range(3)}) == 1  # one UNet for all three
    fused = [load_teacher(s) for s in specs]
    batches = [_batch(seed=j) for j in range(3)]
    got, got_feats = _teacher_eps(_step(bank), batches)
    want, want_feats = _teacher_eps(_step([t.unet for t in fused], [t.text_encoder for t in fused]), batches)
    torch.testing.assert_close(got, want, rtol=0, atol=2e-5)
    for a, b in zip(got_feats, want_feats):
        torch.testing.assert_close(a, b, rtol=0, atol=2e-5)
    # switching order does not matter (a switch really replaces the active adapter)
    for j in (2, 0, 1, 0):
        x = batches[j]
        unet = bank.activate(j)
        text = bank.conditioner(j)(x)[0]
        with torch.no_grad():
            out = unet(x["noisy_latents"], x["timesteps"], text).sample
            ref = fused[j].unet(x["noisy_latents"], x["timesteps"], fused[j].text_encoder(x["input_ids"])[0]).sample
        torch.testing.assert_close(out, ref, rtol=0, atol=2e-5)
    # the adapters really differ (an equality that held for a no-op adapter would prove nothing)
    assert (want[:3] - want[3:6]).abs().max() > 1e-3


def test_shared_lora_base_holds_one_unet_not_k(packed_world):
    def unique_bytes(modules):
        seen, total = set(), 0
        for m in modules:
            for t in list(m.parameters()) + list(m.buffers()):
                if t.data_ptr() not in seen:
                    seen.add(t.data_ptr())
                    total += t.numel() * t.element_size()
        return total

    bank = load_teacher_bank(packed_world["loras"], "cpu", _cond)
    fused = load_teacher_bank(packed_world["loras"], "cpu", _cond, share_lora_base=False)
    assert fused.describe() == "3 resident"
    shared = unique_bytes([bank.activate(0)])
    copies = unique_bytes([fused.activate(j) for j in range(3)])
    assert shared / copies < 0.5  # 1 base + 3 rank-4 adapters vs 3 UNets (tiny UNet: adapters are relatively big)


def test_offloaded_teachers_give_the_resident_outputs(packed_world):
    specs = packed_world["fulls"] + packed_world["loras"][:2]
    resident = load_teacher_bank(specs, "cpu", _cond)
    offloaded = load_teacher_bank(specs, "cpu", _cond, offload=True)
    assert offloaded.describe() == "2 adapter, 2 offloaded (1 shared LoRA base)"
    batches = [_batch(seed=5 + j) for j in range(4)]
    want, _ = _teacher_eps(_step(resident), batches)
    got, _ = _teacher_eps(_step(offloaded), batches)
    assert torch.equal(got, want)
    pool = offloaded.pool
    assert len(pool.slots) == 2 and pool.copies == 2  # teacher 0 loaded, teacher 1 prefetched into the other slot
    got2, _ = _teacher_eps(_step(offloaded), list(reversed(batches[:2])) + batches[2:])
    want2, _ = _teacher_eps(_step(resident), list(reversed(batches[:2])) + batches[2:])
    assert torch.equal(got2, want2)


def test_teacher_dtype_bf16_runs_in_bf16_and_returns_fp32(packed_world):
    specs = packed_world["fulls"][:1] + packed_world["loras"][:1]
    fp32 = load_teacher_bank(specs, "cpu", _cond)
    bf16 = load_teacher_bank(specs, "cpu", _cond, dtype=torch.bfloat16)
    assert next(bf16.activate(0).parameters()).dtype == torch.bfloat16
    batches = [_batch(seed=1), _batch(seed=2)]
    want, _ = _teacher_eps(_step(fp32), batches)
    got, feats = _teacher_eps(_step(bf16), batches)
    assert got.dtype == torch.float32 and all(f.dtype == torch.float32 for f in feats)
    assert (got - want).abs().max() < 0.05 * want.abs().max()


def test_gradient_checkpointing_gives_the_same_gradients():
    c = tiny_sd_components(seed=0)
    teacher = tiny_sd_components(seed=1)["unet"].requires_grad_(False).eval()
    text = c["text_encoder"].requires_grad_(False)
    grads = []
    for checkpointing in (False, True):
        student = StyleUNet.from_unet(tiny_sd_components(seed=0)["unet"], ["a"]).train()
        if checkpointing:
            student.enable_gradient_checkpointing()
            assert student.is_gradient_checkpointing
        step = DistillStep(student, text, teacher, text, training_noise_scheduler(), LossSettings(lambda_adv=0), num_styles=1)
        total, *_ = step.generator_losses(_batch(b=2), torch.zeros(2, dtype=torch.long))
        total.backward()
        grads.append(torch.cat([p.grad.flatten() for p in student.parameters() if p.grad is not None]))
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-7)


def test_optimizer_choices():
    from dmm_ray.distill.loop import make_adamw

    ps = [torch.nn.Parameter(torch.ones(3)) for _ in range(2)]
    results = []
    for kind in ("adamw", "adamw_fused"):
        p = torch.nn.Parameter(torch.ones(5))
        opt = make_adamw([p], 0.1, 0.01, kind)
        assert opt.defaults.get("fused") is (True if kind == "adamw_fused" else None)
        p.grad = torch.arange(5.0)
        opt.step()
        results.append(p.detach().clone())
    torch.testing.assert_close(results[0], results[1])
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:  # the config refuses it on the driver; a worker without it stops the run, not retried
        from dmm_ray.distill.health import TrainingInputError

        with pytest.raises(TrainingInputError, match="adamw8bit needs bitsandbytes"):
            make_adamw(ps, 0.1, 0.01, "adamw8bit")


def test_adamw8bit_without_bitsandbytes_is_planned_and_refused_before_ray(tmp_path, monkeypatch):
    """Without bitsandbytes here, an adamw8bit config still loads and gets its memory plan (--dry-run,
    dmm_ray.memory_plan: the plan needs no bitsandbytes, as it needs no weights); a run is refused before
    Ray starts. Was refused at config load, so an SDXL layout that fits 80 GB only with 8-bit AdamW could
    not be planned on a machine without it."""
    import importlib.util

    from merge_fixtures import tiny_merge_config

    from dmm_ray.config import MergeConfig
    from dmm_ray.memory_plan import describe_config
    from dmm_ray.merge import validate_before_ray

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    world = {"base": str(tmp_path), "teachers": [{"name": "a", "source": str(tmp_path)}], "shards": str(tmp_path / "s")}
    cfg = MergeConfig.model_validate(tiny_merge_config(world, tmp_path / "out", distill={"optimizer": "adamw8bit"}))
    assert "student optimizer (adamw8bit)" in describe_config(cfg)
    with pytest.raises(ValueError, match="adamw8bit needs bitsandbytes, which is not installed here"):
        validate_before_ray(cfg)


def test_sdxl_preset_plans_to_fit_an_80gb_gpu():
    """jobs/configs/sdxl_4styles.yaml: README's SDXL recipe (bf16 teachers, checkpointing, 8-bit AdamW), planned
    within its gpu_memory_gb of 80 without bitsandbytes or the checkpoints here. Was 172 GiB per worker
    (batch 10, fp32 teachers, no checkpointing)."""
    from pathlib import Path

    from dmm_ray.config import load_config
    from dmm_ray.memory_plan import check_fits

    preset = Path(__file__).resolve().parents[1] / "jobs" / "configs" / "sdxl_4styles.yaml"
    cfg = load_config(str(preset), [], build_zoo=False)
    assert cfg.scaling.gpu_memory_gb == 80
    plan = check_fits(cfg)  # MemoryPlanError when a stage's worker does not fit
    assert plan.fits and plan.total < 80 * 2**30


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--config", "missing.yaml"], "error: config file missing.yaml does not exist"),
        (["--config", "{preset}", "--set", "distill.stepz=3"], "did you mean distill.steps?"),
        (["--config", "{preset}", "--set", "distill.steps=[1"], "the value is not valid YAML"),
        (["--table", "--batch", "0"], "argument --batch: expected a positive integer"),
        (["--table", "--lora-rank", "-4"], "argument --lora-rank: expected a positive integer"),
        (["--table", "--config", "{preset}"], "--config and --set do not apply to it"),
        (["--config", "{preset}", "--batch", "8"], "--batch sizes --table's cases"),
        (["--config", ""], "--config is empty"),
    ],
)
def test_memory_plan_command_line_refuses_bad_input_with_one_line(argv, message, capsys):
    """`python -m dmm_ray.memory_plan`: a missing config, a --set typo or bad YAML was a traceback (exit 1);
    `--table --batch 0` printed a table of "does not fit" and exit 0, `--lora-rank -4` never finished, and
    --config/--set beside --table, or --batch beside --config, were ignored. Each is one line and exit 2 now."""
    from pathlib import Path

    from dmm_ray.memory_plan import main

    preset = str(Path(__file__).resolve().parents[1] / "jobs" / "configs" / "sd15_8styles_1gpu.yaml")
    try:
        code = main([a.format(preset=preset) for a in argv])
    except SystemExit as stop:
        code = stop.code
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err, err


def test_planner_refuses_a_layout_that_does_not_fit_naming_the_number(tmp_path):
    from merge_fixtures import build_world, tiny_merge_config

    from dmm_ray.config import MergeConfig
    from dmm_ray.memory_plan import GiB, Layout, MemoryPlanError, check_fits, plan_layout, suggestions

    world = build_world(tmp_path / "w", num_teachers=4)
    raw = tiny_merge_config(world, tmp_path / "out", scaling={"teachers_per_worker": 4, "use_gpu": True, "gpu_memory_gb": 1})
    cfg = MergeConfig.model_validate(raw)
    with pytest.raises(MemoryPlanError) as error:
        check_fits(cfg)
    message = str(error.value)
    assert "needs" in message and "but scaling.gpu_memory_gb is 1 GiB" in message and "total" in message
    assert check_fits(
        MergeConfig.model_validate(tiny_merge_config(world, tmp_path / "out", scaling={"teachers_per_worker": 4, "gpu_memory_gb": 8}))
    ).fits
    # SD1.5, 8 fp32 teachers on one 24 GB GPU at 8 rows per style: refused; the suggestions really fit
    lay = Layout(arch="sd15", teachers_on_worker=8, batch_per_style=8)
    plan = plan_layout(lay, 24)
    assert not plan.fits and plan.total > 24 * GiB
    assert suggestions(lay, 24, num_teachers=8)[0].startswith("distill.gradient_checkpointing: true + distill.teacher_dtype: bfloat16")
    lay = Layout(arch="sd15", teachers_on_worker=8, batch_per_style=4)
    assert not plan_layout(lay, 48).fits
    tips = suggestions(lay, 48, num_teachers=8)
    assert any(t.startswith("scaling.teachers_per_worker:") for t in tips)
    k = int(next(t for t in tips if t.startswith("scaling.teachers_per_worker:")).split()[1])
    assert plan_layout(Layout(arch="sd15", teachers_on_worker=k, batch_per_style=4), 48).fits
    assert not plan_layout(Layout(arch="sd15", teachers_on_worker=k + 1, batch_per_style=4), 48).fits
    for k in (1, 4, 8):  # more teachers per worker never needs less memory
        assert plan_layout(Layout(arch="sd15", teachers_on_worker=k)).total < plan_layout(Layout(arch="sd15", teachers_on_worker=k + 1)).total


def _planned(tmp_path, teachers=None, **sections):
    """An SD1.5-named config of files that are not here (the planner needs none), k = 2 on an 80 GB GPU."""
    from dmm_ray.config import MergeConfig

    raw = {
        "student": {"base": "/nonexistent/sd15"},
        "data": {"base": "/nonexistent/sd15", "shards": str(tmp_path / "shards"), "stream": {"batch_size": 4}},
        "teachers": teachers or [{"name": f"f{i}", "source": f"/nonexistent/f{i}.safetensors", "format": "single_file"} for i in range(2)],
        "scaling": {"teachers_per_worker": 2, "use_gpu": True, "gpu_memory_gb": 80},
        "distill": {"teacher_dtype": "bfloat16", "gradient_checkpointing": True},
        "synthesis": {"finetune_steps": 0},
    }
    for key, value in sections.items():
        raw[key] = {**raw.get(key, {}), **value}
    return MergeConfig.model_validate(raw)


def test_planner_plans_every_teacher_group_not_only_the_first(tmp_path):
    """2 LoRAs of one base and 2 full teachers at k = 2: the worker of the full teachers needs more,
    whichever order the config lists them in; check_fits refuses both orders alike."""
    from dmm_ray.memory_plan import GiB, MemoryPlanError, check_fits, plan_config

    lora = [{"name": f"l{i}", "source": f"/nonexistent/l{i}_lora.safetensors", "format": "lora", "base": "/nonexistent/sd15"} for i in range(2)]
    full = [{"name": f"f{i}", "source": f"/nonexistent/f{i}.safetensors", "format": "single_file"} for i in range(2)]
    plans = [plan_config(_planned(tmp_path, order)) for order in (lora + full, full + lora)]
    assert plans[0][0].total == plans[1][0].total
    for plan, lay in plans:
        assert lay.lora_teachers == 0 and plan.worker.teachers == ("f0", "f1")
    between = (plans[0][0].total - 0.5 * GiB) / GiB  # above the LoRA worker's plan, below the full teachers' one
    for order in (lora + full, full + lora):
        with pytest.raises(
            MemoryPlanError,
            match=r"(?s)the distill stage does not fit: one worker needs.*the largest: the distill stage's worker hosting 2 teachers \(f0, f1\)",
        ):
            check_fits(_planned(tmp_path, order, scaling={"gpu_memory_gb": between}))


def test_planner_plans_the_finetune_stage_at_its_own_batch_and_each_stage_at_its_resolution(tmp_path):
    """distill trains on the latent shards (data.encode.resolution, data.stream.batch_size rows per
    style); the fine-tune, when it runs, on the synthesized samples (synthesis.resolution,
    synthesis.finetune_batch_size rows per style). The larger of the two is planned and checked."""
    from dmm_ray.memory_plan import MemoryPlanError, check_fits, plan_config

    encode = {"encode": {"resolution": 512}}
    plan, lay = plan_config(_planned(tmp_path, data=encode, synthesis={"resolution": 256}))  # no fine-tune: 256 px is not trained on here
    assert lay.resolution == 512 and plan.worker.stage == "distill"
    plan, lay = plan_config(_planned(tmp_path, data=encode, synthesis={"resolution": 256, "finetune_steps": 10, "finetune_batch_size": 6}))
    assert (lay.resolution, lay.batch_per_style, plan.worker.stage) == (512, 4, "distill")  # 6 rows at 256 px: less than 4 at 512
    finetune = _planned(tmp_path, data=encode, synthesis={"finetune_steps": 10, "finetune_batch_size": 10})
    plan, lay = plan_config(finetune)
    assert (lay.resolution, lay.batch_per_style, lay.mixture_rows, plan.worker.stage) == (512, 10, 0, "finetune")
    assert plan.total > plan_config(_planned(tmp_path, data=encode))[0].total
    with pytest.raises(MemoryPlanError, match=r"(?s)the finetune stage does not fit: .* 2 x 10 rows") as error:
        check_fits(_planned(tmp_path, data=encode, synthesis={"finetune_steps": 10, "finetune_batch_size": 10}, scaling={"gpu_memory_gb": 30}))
    assert "synthesis.finetune_batch_size:" in str(error.value) and "data.stream.batch_size:" not in str(error.value)


def test_planner_counts_an_incremental_merges_old_styles(tmp_path):
    """An incremental merge's student and discriminator head hold the previous model's styles and the
    new teachers' (loop.identify): 8 old + 2 new = 10 styles, each with its own adapters."""
    import json

    from dmm_ray.memory_plan import plan_config

    prev = tmp_path / "previous_merged"
    (prev / "unet").mkdir(parents=True)
    (prev / "unet" / "config.json").write_text(json.dumps({"style_names": [f"old{i}" for i in range(8)]}))
    adapters = {"student": {"base": "/nonexistent/sd15", "style_adapters": {"rank": 8}}}
    fresh, _ = plan_config(_planned(tmp_path, **adapters))
    plan, lay = plan_config(_planned(tmp_path, incremental={"base_merged": str(prev)}, **adapters))
    assert lay.num_styles == 10 and plan.total > fresh.total


def _previous_model(tmp_path, styles: int = 8):
    """An SD1.5-size previous merged model's unet/config.json: the planner reads the config, no weights."""
    import json

    from dmm_ray.memory_plan import SD15_UNET

    prev = tmp_path / "previous_merged"
    (prev / "unet").mkdir(parents=True, exist_ok=True)
    (prev / "unet" / "config.json").write_text(json.dumps({**SD15_UNET, "style_names": [f"old{i}" for i in range(styles)]}))
    return prev


def test_planner_plans_the_incremental_merges_regularisation_worker(tmp_path):
    """The regularisation worker (paper 3.5) holds the student and discriminator and, in place of
    teachers, the frozen previous merged StyleUNet in fp32 whatever distill.teacher_dtype (parameters
    counted from its config). With one bf16 teacher per worker it needs more than a teacher worker:
    planned, printed, and refused by check_fits naming it."""
    from dmm_ray.memory_plan import GiB, MemoryPlanError, _meta_style_unet, _params, all_plans, check_fits, describe_config, largest_plans

    inc = {"base_merged": str(_previous_model(tmp_path))}
    k1 = {"teachers_per_worker": 1}
    teacher, reg = largest_plans(_planned(tmp_path, incremental=inc, scaling=k1))
    assert (teacher.worker.kind, reg.worker.kind, reg.worker.stage) == ("teacher", "regularizer", "distill")
    lines = {n: b for n, b, _ in reg.lines}
    assert lines["previous merged model (fp32, frozen; the student's text encoder)"] == 4 * _params(_meta_style_unet(tmp_path / "previous_merged"))
    assert not any("teacher UNets" in n or "teacher text encoder" in n or "LoRA" in n for n in lines)
    assert "previous model's forward, the batch of 4 (no grad)" in lines and reg.total > teacher.total
    assert [p.worker.kind for p in largest_plans(_planned(tmp_path, incremental={**inc, "regularization": False}, scaling=k1))] == ["teacher"]
    between = (teacher.total + reg.total) / 2 / GiB
    with pytest.raises(
        MemoryPlanError,
        match=r"(?s)the distill stage does not fit: the regularisation worker needs [\d.]+ GiB but scaling.gpu_memory_gb is .*previous merged model",
    ):
        check_fits(_planned(tmp_path, incremental=inc, scaling={**k1, "gpu_memory_gb": between}))
    assert "memory plan of the incremental merge's regularisation worker" in describe_config(_planned(tmp_path, incremental=inc))
    # its batch: the common rows of each of a teacher worker's k reads, + their synthesized share from the
    # previous model's samples (incremental.old_style_samples); the fine-tune: one read of its batch
    data = {"synthetic_fraction": 0.5}
    reg = largest_plans(_planned(tmp_path, incremental=inc, data=data))[1]
    assert (reg.worker.layout.teachers_on_worker, reg.worker.layout.batch_per_style) == (2, 4)
    reg = largest_plans(_planned(tmp_path, incremental={**inc, "old_style_samples": False}, data=data))[1]
    assert (reg.worker.layout.teachers_on_worker, reg.worker.layout.batch_per_style) == (2, 2)
    finetune = {"finetune_steps": 10, "finetune_batch_size": 12}
    ft = next(
        p
        for p in all_plans(_planned(tmp_path, incremental=inc, synthesis=finetune))
        if p.worker.kind == "regularizer" and p.worker.stage == "finetune"
    )
    assert (ft.worker.layout.teachers_on_worker, ft.worker.layout.batch_per_style) == (1, 12)


def test_planner_plans_the_few_step_worker(tmp_path):
    """fast.enabled: the few-step stage's worker is planned and checked with the merge, from the real
    parameter counts: the merged model (teacher), the student (LoRA: its own copy + the LoRA; full: a
    copy and an EMA target network), gradients and AdamW of what trains (+ the rollout steps' own AdamW),
    the saved EMA; a rollout chain keeps every sampler step's activations."""
    from dmm_ray.fast.config import LCM_LORA_TARGETS
    from dmm_ray.memory_plan import (
        GiB,
        MemoryPlanError,
        all_plans,
        check_fits,
        describe_config,
        fast_worker,
        lora_params,
        plan_worker,
        student_params,
    )

    fast = {"enabled": True, "batch_size": 4, "num_ddim_timesteps": 50}
    lora = plan_worker(fast_worker(_planned(tmp_path, fast=fast)), None)
    p, t = student_params("sd15", 2), lora_params("sd15", 64, tuple(LCM_LORA_TARGETS))
    lines = {n: b for n, b, _ in lora.lines}
    assert lines["teacher: the merged model (fp32, frozen)"] == 4 * p
    assert lines["student: a copy of the merged model (fp32, frozen) + the LCM-LoRA"] == 4 * (p + t)
    assert lines["AdamW state of the LCM steps (fp32)"] == 8 * t and "target network: an EMA copy (fp32)" not in lines
    full_fast = {**fast, "mode": "full", "saved_ema_decay": 0.99}
    full = {n: b for n, b, _ in plan_worker(fast_worker(_planned(tmp_path, fast=full_fast)), None).lines}
    trainable = p - 2 * 1280  # every weight but the codebook (2 styles x the time embedding's 1280)
    assert (
        full["target network: an EMA copy (fp32)"] == 4 * p and full[f"student gradients (fp32, {trainable / 1e6:.1f}M trainable)"] == 4 * trainable
    )
    assert full["saved EMA of the trainable weights (fp32)"] == 4 * trainable

    def activations(**change) -> int:
        plan = plan_worker(fast_worker(_planned(tmp_path, fast={**fast, **change})), None)
        return next(b for n, b, _ in plan.lines if n.startswith("student activations"))

    two, eight = activations(rollout_steps=10, rollout_sampler_steps=[2]), activations(rollout_steps=10, rollout_sampler_steps=[2, 8])
    assert eight == 4 * two and two == 2 * activations()  # 4 rows x 2 steps against one LCM step's 4 rows
    rollout = _planned(tmp_path, fast={**full_fast, "rollout_steps": 10, "rollout_sampler_steps": [8]})
    plans = all_plans(rollout)
    merge = max(p.total for p in plans if p.worker.kind != "fast")
    few_step = next(p for p in plans if p.worker.kind == "fast")
    assert "AdamW state of the rollout steps (fp32)" in {n for n, _, _ in few_step.lines} and few_step.total > merge
    assert "memory plan of the few-step stage (per worker; fast.num_workers = 1" in describe_config(rollout)
    with pytest.raises(
        MemoryPlanError, match=r"(?s)the fast stage does not fit: each of its fast.num_workers = 1 worker\(s\) needs.*fast\."
    ) as error:
        check_fits(
            _planned(
                tmp_path,
                fast={**full_fast, "rollout_steps": 10, "rollout_sampler_steps": [8]},
                scaling={"gpu_memory_gb": (merge + few_step.total) / 2 / GiB},
            )
        )
    assert "fast.mode: lora" in str(error.value) or "fast.rollout_batch_size:" in str(error.value)


def test_planner_counts_shared_lora_base_once():
    from dmm_ray.memory_plan import Layout, lora_params, plan_layout, unet_params

    assert 800e6 < unet_params("sd15") < 900e6  # SD1.5 UNet: 859.5M
    adapter = 4 * lora_params("sd15", 64)
    fused = plan_layout(Layout(arch="sd15", teachers_on_worker=4, teacher_dtype="bfloat16"))
    shared = plan_layout(Layout(arch="sd15", teachers_on_worker=4, lora_teachers=4, lora_adapter_bytes=(adapter,) * 4, teacher_dtype="bfloat16"))
    teacher_bytes = lambda p: sum(b for n, b, _ in p.lines if ("teacher" in n or "LoRA" in n) and "forward" not in n)  # noqa: E731
    assert teacher_bytes(shared) < 0.4 * teacher_bytes(fused)


def test_planner_counts_each_shared_lora_base(tmp_path):
    """The teacher bank loads each base that two or more of a worker's LoRAs share once, and fuses a lone
    LoRA of its base into a full teacher. 2 + 2 LoRAs of two bases were planned on one base (a note
    called it an underestimate): one SD1.5 UNet and text encoder (1.8 GiB in bf16) short."""
    from dmm_ray.memory_plan import plan_config, text_encoder_params, unet_params

    def lora(i, base):
        return {"name": f"l{i}", "source": f"/nonexistent/l{i}_lora.safetensors", "format": "lora", "base": f"/nonexistent/{base}"}

    def teacher_bytes(teachers):
        plan, lay = plan_config(_planned(tmp_path, teachers, scaling={"teachers_per_worker": 4}))
        assert not any("base" in note for note in plan.notes), plan.notes
        return sum(b for n, b, _ in plan.lines if ("teacher" in n or "LoRA" in n) and "forward" not in n), lay

    one, _ = teacher_bytes([lora(i, "sd15") for i in range(4)])
    two, lay = teacher_bytes([lora(i, "sd15" if i < 2 else "sd15_other") for i in range(4)])
    assert lay.lora_bases == 2 and two - one == 2 * (unet_params("sd15") + text_encoder_params("sd15"))
    lone, lay = teacher_bytes([lora(0, "sd15"), lora(1, "sd15"), lora(2, "a"), lora(3, "b")])  # two shared, two fused
    assert lay.lora_bases == 1 and lay.lora_teachers == 2 and lone > two


def _saved_bytes(model, batch: int, latent: int, **style) -> int:
    """Bytes a real CPU forward of `model` keeps for backward, summed as the planner sums them (parameters
    and attention probabilities left out, views of one tensor once)."""
    params = {id(p) for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t):
        base = t._base if t._base is not None else t
        if id(t) in params or id(base) in params or (t.dim() >= 3 and t.shape[-2] > latent and t.shape[-1] in (t.shape[-2], 77)):
            return t
        saved[id(base)] = base.numel() * base.element_size()
        return t

    x = torch.randn(batch, 4, latent, latent)
    text = torch.randn(batch, 77, model.config.cross_attention_dim)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x, torch.randint(0, 1000, (batch,)), text, **style).sample
    del out
    return sum(saved.values())


def test_planner_measures_the_students_style_modules(tiny_base_dir):
    """The student's activations are those of the StyleUNet as configured (FiLM on every ResNet block,
    per-style adapters), measured on the meta device, in the layout its batch has: a teacher worker's k
    one-style runs (the adapters' grouped path) or rows of mixed styles (the regulariser's and the
    few-step worker's random style per row: the dense N-style path). The plain UNet's forward (what was
    measured) left out a fifth of what the tiny student keeps (the toy zoo's: 40 %)."""
    from diffusers import UNet2DConditionModel

    from dmm_ray.defaults import SD_ADAPTER_TARGETS
    from dmm_ray.memory_plan import Layout, StyleModules, activation_bytes_per_row, arch_from_folder, plan_layout, register_arch

    key = register_arch("tiny-style-act", arch_from_folder(tiny_base_dir))
    base = UNet2DConditionModel.from_pretrained(tiny_base_dir / "unet")
    student = StyleUNet.from_unet(base, [f"s{i}" for i in range(4)], style_film=True, adapter_rank=4, adapter_targets=SD_ADAPTER_TARGETS)
    style = StyleModules(4, True, 4, tuple(SD_ADAPTER_TARGETS))
    latent, batch = 8, 16
    runs = _saved_bytes(student, batch, latent, style_ids=torch.arange(batch) // 4)  # 4 styles x 4 rows: a worker with k = 4
    mixed = _saved_bytes(student, batch, latent, style_ids=torch.arange(batch) % 4)  # a different style every row
    planned_runs = activation_bytes_per_row(key, latent, "float32", False, "unet", style, 4) * batch
    planned_mixed = activation_bytes_per_row(key, latent, "float32", False, "unet", style, 0) * batch
    plain = activation_bytes_per_row(key, latent, "float32", False) * batch
    assert abs(planned_runs - runs) < 0.1 * runs and abs(planned_mixed - mixed) < 0.1 * mixed, (planned_runs, runs, planned_mixed, mixed)
    assert plain < 0.9 * min(runs, mixed), (plain, runs, mixed)  # 17-21 % of what the tiny student keeps
    # the merge's plan: a teacher worker's rows by style, its layout's style_film and adapters
    lay = Layout(arch=key, teachers_on_worker=4, batch_per_style=4, resolution=latent * 2, num_styles=4, gpu=False, lambda_adv=0)
    acts = lambda plan: next(b for n, b, _ in plan.lines if n.startswith("student activations"))  # noqa: E731
    assert acts(plan_layout(replace(lay, style_film=True, adapter_rank=4, adapter_targets=tuple(SD_ADAPTER_TARGETS)))) == planned_runs
    assert acts(plan_layout(lay)) < planned_runs


def _live_peak_bytes(model, batch: int, latent: int, **style) -> int:
    """The most bytes a real CPU no-grad forward of `model` holds in tensors at once: every tensor an
    operation allocates (not a view's or an in-place result's) from its allocation until it is freed."""
    import weakref

    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    class Live(TorchDispatchMode):
        live = peak = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for i, t in enumerate(tree_flatten(out)[0]):
                if isinstance(t, torch.Tensor) and (i >= len(func._schema.returns) or func._schema.returns[i].alias_info is None):
                    self.live += t.untyped_storage().nbytes()
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(t, self.free, t.untyped_storage().nbytes())
            return out

        def free(self, n):
            self.live -= n

    x = torch.randn(batch, 4, latent, latent)
    text = torch.randn(batch, 77, model.config.cross_attention_dim)
    live = Live()
    with torch.no_grad(), live:
        out = model(x, torch.randint(0, 1000, (batch,)), text, **style).sample
    del out
    return live.peak


def test_planner_measures_the_no_grad_forwards_peak(tiny_base_dir):
    """A teacher's (or the previous model's, or the few-step teacher's) no-grad forward keeps nothing for
    backward, but the skip connections and a block's input, working tensors and output are alive together.
    The plan measures that peak on the meta device, attention as a fused kernel; a flat 10 % of the
    student's saved activations (the estimate before) was under half of what the tiny UNet's forward holds
    (the toy's: 30.7 MiB planned, 66 held at 16 rows of 32x32 latents)."""
    from diffusers import UNet2DConditionModel

    from dmm_ray.defaults import SD_ADAPTER_TARGETS
    from dmm_ray.memory_plan import Layout, StyleModules, arch_from_folder, plan_layout, register_arch

    key = register_arch("tiny-no-grad", arch_from_folder(tiny_base_dir))
    teacher = UNet2DConditionModel.from_pretrained(tiny_base_dir / "unet").eval()
    latent, batch = 16, 8
    lay = Layout(
        arch=key, teachers_on_worker=2, batch_per_style=batch, resolution=latent * 2, num_styles=2, gpu=False, lambda_adv=0, teacher_dtype="float32"
    )
    planned = next(b for n, b, _ in plan_layout(lay).lines if n.startswith("teacher forward"))
    real = _live_peak_bytes(teacher, batch, latent)
    assert real <= planned < 1.1 * real, (planned, real)
    # a StyleUNet (the previous merged model, the few-step teacher): a random style per row, the adapters' dense path
    from dmm_ray.memory_plan import no_grad_bytes_per_row

    student = StyleUNet.from_unet(teacher, [f"s{i}" for i in range(4)], style_film=True, adapter_rank=4, adapter_targets=SD_ADAPTER_TARGETS).eval()
    planned = no_grad_bytes_per_row(key, latent, "float32", StyleModules(4, True, 4, tuple(SD_ADAPTER_TARGETS))) * batch
    real = _live_peak_bytes(student, batch, latent, style_ids=torch.arange(batch) % 4)
    assert real <= planned < 1.1 * real, (planned, real)


def test_planner_lays_out_the_style_rows_from_its_own_side(tiny_base_dir):
    """The meta-device forward has no style weights to read: the planner sets its rows' layout on the
    module it measures (a teacher worker's k one-style runs, or mixed styles) and puts the module's own
    methods back; the StyleUNet itself has no planner branch or attribute."""
    from diffusers import UNet2DConditionModel

    from dmm_ray.defaults import SD_ADAPTER_TARGETS
    from dmm_ray.memory_plan import StyleModules, _meta_student, _meta_style_layout, arch_from_folder, register_arch

    key = register_arch("tiny-style-layout", arch_from_folder(tiny_base_dir))
    style = _meta_student(key, StyleModules(4, True, 4, tuple(SD_ADAPTER_TARGETS))).class_embedding
    with _meta_style_layout(style, 2):
        out = style(torch.zeros(8, style.codebook.embedding_dim, device="meta"))
        assert out.is_meta and style.adapter_weights(16).shape == (16, 4)
        assert style.adapter_runs(16) == [(0, 0, 8), (1, 8, 16)]
    with _meta_style_layout(style, 0):
        assert style.adapter_runs(16) is None  # mixed styles: the dense path
    assert "forward" not in vars(style) and "adapter_runs" not in vars(style)
    real = StyleUNet.from_unet(UNet2DConditionModel.from_pretrained(tiny_base_dir / "unet"), ["a", "b"], adapter_rank=2)
    assert not hasattr(real.class_embedding, "meta_runs")


def test_planner_measures_the_few_step_students_lcm_lora(tiny_base_dir):
    """fast.mode lora: the student's forward runs through frozen merged weights and the LCM-LoRA's own
    layers, and the plan measures that model: a frozen layer keeps less for backward, each LoRA layer
    keeps its rank-r product. Measured with every weight trainable (as before), the plan was the same
    at every rank: 23 % under what a rank-32 LoRA student of the tiny UNet keeps (the toy merged model's
    at rank 64: 8 %, rank 128: 32 %)."""
    from types import SimpleNamespace

    from diffusers import UNet2DConditionModel

    from dmm_ray.fast.config import LCM_LORA_TARGETS
    from dmm_ray.fast.lcm import add_lcm_lora
    from dmm_ray.memory_plan import FastLayout, StyleModules, arch_from_folder, plan_fast, register_arch

    arch = arch_from_folder(tiny_base_dir)
    key = register_arch("tiny-lcm-lora", arch)
    latent, batch = 8, 8
    lay = FastLayout(
        arch=key, model_params=0, lora_params=0, full_trainable_params=0, batch_size=batch, resolution=latent * arch.vae_factor, gpu=False
    )
    lay = replace(lay, style=StyleModules(4), lora_targets=tuple(LCM_LORA_TARGETS))
    acts = lambda layout: next(b for n, b, _ in plan_fast(layout).lines if n.startswith("student activations"))  # noqa: E731
    for rank in (2, 32):
        student = StyleUNet.from_unet(UNet2DConditionModel.from_pretrained(tiny_base_dir / "unet"), [f"s{i}" for i in range(4)])
        add_lcm_lora(student, SimpleNamespace(lora_rank=rank, lora_alpha=None, lora_targets=LCM_LORA_TARGETS))
        measured = _saved_bytes(student, batch, latent, style_ids=torch.arange(batch) % 4)
        planned = acts(replace(lay, mode="lora", lora_rank=rank))
        assert abs(planned - measured) < 0.05 * measured, (rank, planned, measured)
    full = acts(replace(lay, mode="full", lora_rank=32))  # full mode: every weight trains, no LoRA
    assert full < 0.8 * acts(replace(lay, mode="lora", lora_rank=32))


def test_planner_keeps_the_lcm_steps_activations_on_a_cpu_worker_whose_rollout_step_is_larger(tiny_base_dir):
    """The rollout steps follow the LCM steps. On a CPU worker glibc's heap keeps what the LCM steps'
    activations freed and the rollout chain grows it: the toy's few-step worker (lora mode, 8 / 32 / 64
    LCM rows) peaked 53 / 97 / 156 MiB of RSS over its plan (without the fixed runtime line), a gap that
    grew with the rows; with the LCM steps' activations counted too, 37 / 31 / 18. A GPU plan, or a
    worker whose LCM step is the larger (the rollout chain then fits in what it freed), is unchanged."""
    from dmm_ray.memory_plan import FastLayout, StyleModules, arch_from_folder, plan_fast, register_arch

    arch = arch_from_folder(tiny_base_dir)
    key = register_arch("tiny-cpu-heap", arch)
    px = 8 * arch.vae_factor
    lay = FastLayout(
        arch=key,
        model_params=0,
        lora_params=0,
        full_trainable_params=0,
        mode="full",
        batch_size=8,
        resolution=px,
        rollout_batch_size=4,
        rollout_sampler_steps=4,
        rollout_resolution=px,
        gpu=False,
        style=StyleModules(4),
    )
    lines = lambda layout: {n: b for n, b, _ in plan_fast(layout).lines}  # noqa: E731
    lcm = next(b for n, b in lines(replace(lay, rollout_batch_size=0)).items() if n.startswith("student activations"))
    assert lines(lay)["an LCM step, 8 rows: its activations, kept by the CPU heap"] == lcm
    assert not any("CPU heap" in n for n in lines(replace(lay, gpu=True)))
    assert not any("CPU heap" in n for n in lines(replace(lay, rollout_sampler_steps=1)))  # 4 rollout rows x 1 step < 8 LCM rows


def test_planner_counts_offloaded_teachers_in_the_memory_they_use():
    """On a GPU an offloaded worker holds 2 device slots of its k teacher UNets (the rest is host RAM);
    on a CPU worker the slots and the host copies are the same memory, so all k + 2 count."""
    from dmm_ray.memory_plan import Layout, plan_layout, unet_params

    def unets(**kw):
        plan = plan_layout(Layout(arch="sd15", teachers_on_worker=8, teacher_dtype="bfloat16", **kw))
        return sum(b for n, b, _ in plan.lines if "full teacher UNets" in n) / (2 * unet_params("sd15"))

    assert unets() == 8 and unets(offload=True) == 2
    assert unets(gpu=False) == 8 and unets(gpu=False, offload=True) == 10


def test_peak_rss_is_this_process_own_and_resets():
    """The benchmarks' CPU peak memory (dmm_ray.process_memory.peak_rss_bytes): a 256 MB tensor raises it
    by about that much after a reset, and a reset after freeing it starts again from the current RSS."""
    from dmm_ray.process_memory import peak_rss_bytes, reset_peak_rss

    if not reset_peak_rss():
        pytest.skip("no /proc/self/clear_refs here")
    start = peak_rss_bytes()
    x = torch.ones(64 * 2**20)  # 256 MB, every page written
    high = peak_rss_bytes()
    assert high - start > 200 * 2**20
    del x
    reset_peak_rss()
    assert peak_rss_bytes() < high - 200 * 2**20


def test_lora_memory_benchmark_counts_the_shared_base_once(packed_world, tiny_base_dir):
    """benchmarks/packing_equivalence.py --lora-memory (and its --lora-arch sd15 run, which measures
    the planner's SD1.5 prediction): as adapters the teachers' tensors are ONE base UNet and text
    encoder plus the LoRAs, fused they are one whole copy per teacher."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import packing_equivalence

    specs = [s.model_dump() for s in packed_world["loras"][:2]]
    base = StableDiffusionPipeline.from_pretrained(tiny_base_dir)
    copy_bytes = sum(t.untyped_storage().nbytes() for m in (base.unet, base.text_encoder) for t in [*m.parameters(), *m.buffers()])
    shared = packing_equivalence.lora_memory_one(True, specs)
    fused = packing_equivalence.lora_memory_one(False, specs)
    assert (shared["describe"], fused["describe"]) == ("2 adapter (1 shared LoRA base)", "2 resident")
    assert fused["tensor_bytes"] == 2 * copy_bytes
    assert copy_bytes < shared["tensor_bytes"] < 1.5 * copy_bytes  # the base once, and two small adapters


def test_gpu_benchmark_runs_tiny_on_cpu(tmp_path):
    import json
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import gpu_distill

    out = tmp_path / "r.json"
    assert (
        gpu_distill.main(
            ["--tiny", "--ks", "1,2", "--lora-ks", "2", "--offload-ks", "2", "--lora-rank", "4", "--steps", "1", "--warmup", "0", "--json", str(out)]
        )
        == 0
    )
    results = json.loads(out.read_text())["results"]
    assert [(r["k"], r["teachers"]) for r in results] == [(1, "full"), (2, "full"), (2, "lora"), (2, "offload")]
    assert all(r["samples_per_s"] > 0 and r["peak_gib"] > 0 for r in results)
    assert "| k teachers |" in gpu_distill.table(results)


def test_dry_run_layout_says_who_hosts_what(tmp_path):
    from merge_fixtures import tiny_merge_config

    from dmm_ray.config import MergeConfig
    from dmm_ray.merge import describe_layout

    teachers = [{"name": f"t{i}", "source": str(tmp_path / f"t{i}.safetensors"), "base": str(tmp_path), "format": "lora"} for i in range(5)]
    world = {"base": str(tmp_path), "teachers": teachers, "shards": str(tmp_path / "s")}
    cfg = MergeConfig.model_validate(tiny_merge_config(world, tmp_path / "out", scaling={"teachers_per_worker": 2, "workers_per_teacher": 2}))
    text = describe_layout(cfg)
    assert "W = 6 worker(s) = 3 teacher group(s) (ceil(5 teachers / 2 per worker)) x 2 worker(s) each" in text
    assert "worker(s) [0, 3]: t0, t1; 2 LoRA(s) as adapters on one shared base" in text and "worker(s) [2, 5]: t4\n" not in text


def test_dry_run_layout_reads_a_teachers_format_from_its_file(tmp_path):
    """Without `format:` (it is optional) two LoRA files were described as full teachers offloaded to CPU RAM."""
    import torch
    from merge_fixtures import tiny_merge_config
    from safetensors.torch import save_file

    from dmm_ray.config import MergeConfig
    from dmm_ray.merge import describe_layout

    for n in ("a", "b"):
        save_file({"unet.down.lora_A.weight": torch.zeros(1)}, str(tmp_path / f"{n}.safetensors"))
    teachers = [{"name": n, "source": str(tmp_path / f"{n}.safetensors"), "base": str(tmp_path)} for n in ("a", "b")]
    world = {"base": str(tmp_path), "teachers": teachers, "shards": str(tmp_path / "s")}
    scaling = {"teachers_per_worker": 2, "teacher_offload": True}
    text = describe_layout(MergeConfig.model_validate(tiny_merge_config(world, tmp_path / "out", scaling=scaling)))
    assert "worker(s) [0]: a, b; 2 LoRA(s) as adapters on one shared base" in text and "offloaded" not in text


def test_dry_run_layout_groups_loras_by_their_base(tmp_path):
    """LoRAs share a base on a worker only with other LoRAs of that base (distill.teacher_bank); a lone LoRA
    of its base is fused, a full teacher (offloaded with scaling.teacher_offload). The layout said two
    LoRAs of two bases were adapters on one shared base (the bank fuses and offloads both), and 2 + 2 on
    two bases, one shared base."""
    from merge_fixtures import tiny_merge_config

    from dmm_ray.config import MergeConfig
    from dmm_ray.merge import describe_layout

    def layout(bases):
        teachers = [
            {"name": f"t{i}", "source": str(tmp_path / f"t{i}.safetensors"), "base": str(tmp_path / b), "format": "lora"} for i, b in enumerate(bases)
        ]
        world = {"base": str(tmp_path), "teachers": teachers, "shards": str(tmp_path / "s")}
        scaling = {"teachers_per_worker": len(bases), "teacher_offload": True}
        return describe_layout(MergeConfig.model_validate(tiny_merge_config(world, tmp_path / "out", scaling=scaling))).splitlines()[1]

    assert layout("ab") == "  worker(s) [0]: t0, t1; full teachers offloaded to CPU RAM"
    assert layout("aabb") == "  worker(s) [0]: t0, t1, t2, t3; 4 LoRA(s) as adapters on 2 shared bases"
    assert layout("aab") == "  worker(s) [0]: t0, t1, t2; 2 LoRA(s) as adapters on one shared base; full teachers offloaded to CPU RAM"


@pytest.mark.ray
@pytest.mark.slow
def test_packed_merge_with_shared_lora_base_offload_and_bf16_teachers(ray_cluster, packed_world, tiny_base_dir, tmp_path):
    """One Ray Train worker hosts 2 LoRA teachers (adapters on one base) and 2 offloaded full teachers in
    bf16, with gradient checkpointing and fused AdamW: a 2-step merge runs and saves every style."""
    from merge_fixtures import build_world, tiny_merge_config

    from dmm_ray.config import MergeConfig
    from dmm_ray.merge import run_merge

    world = build_world(tmp_path / "w", num_teachers=1)
    teachers = [s.model_dump(exclude_none=True) for s in packed_world["loras"][:2] + packed_world["fulls"]]
    world = {**world, "base": str(tiny_base_dir), "teachers": teachers}
    cfg = MergeConfig.model_validate(
        tiny_merge_config(
            world,
            tmp_path / "out",
            scaling={"teachers_per_worker": 4, "cpus_per_worker": 1, "teacher_offload": True},
            distill={"steps": 2, "teacher_dtype": "bfloat16", "gradient_checkpointing": True, "optimizer": "adamw_fused"},
            synthesis={"enabled": False},
            evaluation={"enabled": False},
        )
    )
    assert cfg.num_workers == 1
    result = run_merge(cfg)
    assert result.stage_metrics["distill"]["step"] == 2
    assert result.stage_metrics["distill"]["peak_rss_mb"] > 0
    assert StyleUNet.from_pretrained(result.merged_path / "unet").style_names == [t["name"] for t in teachers]


def test_plan_prints_a_fractional_capacity_as_given():
    """A capacity under or between whole GiB is printed as set (scaling.gpu_memory_gb: 0.5 printed "of 0 GiB")."""
    from dmm_ray.memory_plan import GiB, Plan

    last = lambda capacity: Plan(lines=[("x", GiB // 4, "counted")], capacity=int(capacity * GiB)).format().splitlines()[-1]  # noqa: E731
    assert last(0.5).endswith("of 0.5 GiB: fits") and last(0.2).endswith("of 0.2 GiB: DOES NOT FIT") and last(80).endswith("of 80 GiB: fits")


def test_planner_counts_the_students_film_and_adapter_parameters(tiny_base_dir):
    """The student's weights, gradients, optimizer state and EMA are those of the StyleUNet as configured:
    student.style_film's Linear(d, 2C) per ResNet block (left out: 7 % of the toy student, 53M parameters
    of an SD1.5 one) and the adapters with their per-style biases."""
    from diffusers import UNet2DConditionModel

    from dmm_ray.defaults import SD_ADAPTER_TARGETS
    from dmm_ray.memory_plan import Layout, arch_from_folder, plan_layout, register_arch

    key = register_arch("tiny-style-params", arch_from_folder(tiny_base_dir))
    base = UNet2DConditionModel.from_pretrained(tiny_base_dir / "unet")
    lay = Layout(arch=key, teachers_on_worker=1, resolution=16, num_styles=4, gpu=False, lambda_adv=0)
    for film, rank in ((False, 0), (True, 0), (True, 4), (False, 4)):
        student = StyleUNet.from_unet(base, [f"s{i}" for i in range(4)], style_film=film, adapter_rank=rank, adapter_targets=SD_ADAPTER_TARGETS)
        real = sum(p.numel() for p in student.parameters())
        plan = plan_layout(replace(lay, style_film=film, adapter_rank=rank, adapter_targets=tuple(SD_ADAPTER_TARGETS)))
        assert dict((n, b) for n, b, _ in plan.lines)["student weights (fp32)"] == 4 * real, (film, rank)
