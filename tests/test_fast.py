"""The few-step model (issue 19): LCM distillation of a merged model that keeps the style codebook."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import DDPMScheduler, UNet2DConditionModel
from merge_fixtures import save_another_model

from dmm_ray.fast.config import FastConfig
from dmm_ray.fast.lcm import ConsistencyObjective, Draw, LCMSettings, add_lcm_lora
from dmm_ray.models.style_unet import StyleUNet
from dmm_ray.tiny import tiny_unet_config

REPO = Path(__file__).resolve().parents[1]


def _scheduler():
    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)


def _unet(seed: int) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    return UNet2DConditionModel(**tiny_unet_config()).eval()


class PerStyleTeacher(torch.nn.Module):
    """Two styles whose teachers differ: example b is denoised by teachers[style_ids[b]]; every call's
    style ids are recorded."""

    def __init__(self, teachers):
        super().__init__()
        self.teachers = torch.nn.ModuleList(teachers)
        self.calls = []

    def forward(self, sample, timestep, encoder_hidden_states, style_ids=None, added_cond_kwargs=None):
        self.calls.append(style_ids.clone())
        out = torch.stack(
            [
                self.teachers[int(s)](sample[b : b + 1], timestep[b : b + 1], encoder_hidden_states[b : b + 1]).sample[0]
                for b, s in enumerate(style_ids)
            ]
        )
        return type("Out", (), {"sample": out})()


class Spy(torch.nn.Module):
    def __init__(self, unet):
        super().__init__()
        self.unet, self.calls = unet, []

    def forward(self, *args, style_ids=None, **kwargs):
        self.calls.append(style_ids.clone())
        return self.unet(*args, style_ids=style_ids, **kwargs)


def _student(names=("noir", "neon")) -> StyleUNet:
    torch.manual_seed(0)
    return StyleUNet.from_unet(_unet(0), list(names))


def _batch(b=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(b, 4, 8, 8, generator=g)
    cond = (torch.randn(b, 77, 32, generator=g), None)
    uncond = (torch.zeros(b, 77, 32), None)
    return latents, cond, uncond


def test_consistency_target_uses_the_teacher_of_the_examples_own_style():
    teachers = [_unet(1), _unet(2)]
    with torch.no_grad():  # make the two teachers clearly different
        for p in teachers[1].parameters():
            p.add_(0.05 * torch.randn_like(p))
    student = Spy(_student())
    settings = LCMSettings(num_ddim_timesteps=50, guidance_min=5.0, guidance_max=5.0)
    objective = ConsistencyObjective(student, PerStyleTeacher(teachers), _scheduler(), settings)
    latents, cond, uncond = _batch()
    draw = Draw(index=torch.tensor([30, 30]), noise=torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1)), w=torch.tensor([4.0, 4.0]))
    styles = torch.tensor([0, 1])
    _, target = objective.pair(latents, cond, uncond, styles, draw)
    # teacher, student and target all saw the example's own style
    assert all(torch.equal(c, styles) for c in objective.teacher.calls) and all(torch.equal(c, styles) for c in student.calls)
    # example b's target is what teacher b alone gives (a single-teacher objective, no style routing)
    for b in range(2):
        # teacher b alone (whatever style it is asked for); the student keeps example b's style
        alone = _FixedStyle(PerStyleTeacher([teachers[b]]), 0)
        one = Draw(draw.index[b : b + 1], draw.noise[b : b + 1], draw.w[b : b + 1])
        _, expected = ConsistencyObjective(student, alone, _scheduler(), settings).pair(
            latents[b : b + 1], (cond[0][b : b + 1], None), (uncond[0][b : b + 1], None), styles[b : b + 1], one
        )
        torch.testing.assert_close(target[b : b + 1], expected, rtol=1e-4, atol=1e-5)
    # and mixing the styles up changes the target: the test above would catch a swap
    _, swapped = ConsistencyObjective(student, _Swapped(PerStyleTeacher(teachers)), _scheduler(), settings).pair(latents, cond, uncond, styles, draw)
    assert (swapped - target).abs().max() > 1e-3


@pytest.mark.parametrize("substeps", [1, 2, 4])
def test_teacher_solver_substeps_are_ddim_steps_of_the_cfg_teacher(substeps):
    """fast.solver_substeps n: the teacher crosses the skip start -> start - k in n DDIM steps of its
    CFG prediction, each what diffusers' DDIMScheduler (eta 0) takes at n times the grid's steps."""
    from diffusers import DDIMScheduler

    teacher = PerStyleTeacher([_unet(1)])
    settings = LCMSettings(num_ddim_timesteps=50, solver_substeps=substeps)
    objective = ConsistencyObjective(_student(), teacher, _scheduler(), settings)
    latents, cond, uncond = _batch()
    index, w = torch.tensor([30, 30]), torch.tensor([4.0, 4.0])
    start = objective.solver.ddim_timesteps[index]
    z = objective.scheduler.add_noise(latents, torch.randn(latents.shape, generator=torch.Generator().manual_seed(3)), start)
    styles = torch.tensor([0, 0])
    with torch.no_grad():
        got = objective.teacher_step(z, start, index, cond, uncond, styles, w)
        ddim = DDIMScheduler.from_config(_scheduler().config, clip_sample=False)
        ddim.set_timesteps(50 * substeps)  # its step is k / n timesteps
        x, t = z, int(start[0])
        for _ in range(substeps):
            tt = torch.full((2,), t)
            c, u = teacher(x, tt, cond[0], style_ids=styles).sample, teacher(x, tt, uncond[0], style_ids=styles).sample
            x = ddim.step(c + 4.0 * (c - u), t, x).prev_sample
            t -= 20 // substeps
    assert t == int(start[0]) - 20
    torch.testing.assert_close(got, x, rtol=1e-4, atol=1e-5)
    assert len(teacher.calls) == 2 * substeps * 2  # cond + uncond per sub-step, in both runs
    if substeps > 1:  # and the sub-steps follow the ODE, not one straight DDIM line
        one = ConsistencyObjective(_student(), teacher, _scheduler(), LCMSettings(num_ddim_timesteps=50))
        with torch.no_grad():
            assert (one.teacher_step(z, start, index, cond, uncond, styles, w) - got).abs().max() > 1e-4


def test_solver_substeps_cannot_exceed_the_skip():
    with pytest.raises(ValueError, match="solver_substeps 21 must be 1-20"):
        ConsistencyObjective(_student(), _unet(1), _scheduler(), LCMSettings(num_ddim_timesteps=50, solver_substeps=21))


class _FixedStyle(torch.nn.Module):
    """A teacher that always uses style `s` of the wrapped one, whatever it is called with."""

    def __init__(self, teacher, s):
        super().__init__()
        self.teacher, self.s = teacher, s

    def forward(self, *args, style_ids=None, **kwargs):
        return self.teacher(*args, style_ids=torch.full_like(style_ids, self.s), **kwargs)


class _Swapped(torch.nn.Module):
    def __init__(self, teacher):
        super().__init__()
        self.teacher = teacher

    def forward(self, *args, style_ids=None, **kwargs):
        return self.teacher(*args, style_ids=1 - style_ids, **kwargs)


def test_lora_trains_only_the_lora_and_full_mode_keeps_the_codebook():
    merged = _student()
    reference = {k: v.clone() for k, v in merged.state_dict().items()}
    student = _student()
    params = add_lcm_lora(student, FastConfig(lora_rank=4))
    assert params and all("lora_" in n for n, p in student.named_parameters() if p.requires_grad)
    objective = ConsistencyObjective(student, merged.requires_grad_(False), _scheduler(), LCMSettings())
    opt = torch.optim.AdamW(params, lr=1e-2)
    latents, cond, uncond = _batch(4)
    for _ in range(2):
        pred, target = objective.pair(latents, cond, uncond, torch.tensor([0, 1, 0, 1]), objective.draw(latents, torch.Generator().manual_seed(0)))
        loss = objective.loss(pred, target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    state = student.state_dict()
    for key, value in reference.items():  # every merged weight (the base layers under the LoRA) is untouched
        peft_key = key if key in state else key.replace(".weight", ".base_layer.weight").replace(".bias", ".base_layer.bias")
        assert torch.equal(state[peft_key], value), key
    assert any(p.abs().sum() > 0 for n, p in student.named_parameters() if "lora_B" in n)  # the LoRA moved
    assert all(torch.equal(merged.state_dict()[k], v) for k, v in reference.items())  # the teacher too

    from dmm_ray.fast.lcm import full_trainable

    full = _student()
    trainable = full_trainable(full)
    assert not full.class_embedding.codebook.weight.requires_grad and len(trainable) == sum(1 for p in full.parameters()) - 1


def test_fast_config_checks_and_bad_model_folder(tmp_path):
    from pydantic import ValidationError

    from dmm_ray.fast.job import FastError, check_model_folder

    with pytest.raises(ValidationError, match="mode"):
        FastConfig(mode="turbo")
    with pytest.raises(ValidationError, match="guidance_min"):
        FastConfig(guidance_min=8, guidance_max=5)
    with pytest.raises(ValidationError, match="synthetic_source=merged takes no rows at fast.synthetic_fraction 0"):
        FastConfig(synthetic_source="merged")
    with pytest.raises(ValidationError, match="synthetic_source"):
        FastConfig(synthetic_source="web", synthetic_fraction=0.5)
    assert FastConfig(synthetic_source="merged", synthetic_fraction=0.5).synthetic_images is None  # synthesis.images_per_teacher
    with pytest.raises(FastError, match="no such folder"):
        check_model_folder(tmp_path / "nope")
    (tmp_path / "half").mkdir()
    with pytest.raises(FastError, match="missing model_index.json"):
        check_model_folder(tmp_path / "half")


def test_fast_settings_that_do_not_fit_the_model_or_batch_are_refused_before_ray(merged_world, tmp_path):
    """What the workers would only find after Ray starts and the models load (each retried
    scaling.max_failures times) is refused first, naming the fast.* key and what would fit: the config
    for the batch split, the model folder's check (its schedule, its UNet's layers) for the rest."""
    from merge_fixtures import tiny_merge_config
    from pydantic import ValidationError

    from dmm_ray.config import MergeConfig
    from dmm_ray.fast.job import FastError, check_model_folder, run_fast

    world, merged = merged_world
    with pytest.raises(
        ValidationError, match=r"fast\.synthetic_fraction=0\.5 of a batch of 1 leaves 0 synthetic rows; use a larger fast\.batch_size"
    ):
        MergeConfig.model_validate(tiny_merge_config(world, tmp_path / "run", fast={"synthetic_fraction": 0.5, "batch_size": 1}))
    bad = {
        "fast.solver_substeps 500 must be 1-20": {"solver_substeps": 500},
        "fast.num_ddim_timesteps 2000 is above the model's 1000 training timesteps": {"num_ddim_timesteps": 2000},
        r"fast.lora_targets \['nomatch'\] matched no layer of the UNet: .*'to_q'": {"lora_targets": ["nomatch"]},
    }
    for message, fast in bad.items():
        with pytest.raises(FastError, match=message):
            check_model_folder(merged, FastConfig(**fast))
    check_model_folder(merged, FastConfig(mode="full", lora_targets=["nomatch"]))  # no LoRA in full mode
    cfg = MergeConfig.model_validate(tiny_merge_config(world, tmp_path / "run", fast={"solver_substeps": 500})).with_absolute_paths()
    with pytest.raises(FastError, match="solver_substeps 500"):
        run_fast(cfg, merged)  # the stage itself, before its lock, Ray or data
    with pytest.raises(ValueError, match="matched no layer"):  # the workers' own check, the same one
        add_lcm_lora(_student(), FastConfig(lora_targets=["nomatch"]))


def test_a_few_step_folder_that_would_write_into_or_replace_the_merged_model_is_refused(merged_world, tmp_path):
    """Findings: --output-dir the parent of a merged model folder named `model` trained, then saved the
    few-step model in its place (the merged model gone); --output-dir inside the merged model (its unet/)
    wrote the run there, changing the unet checksum, so the same command was then refused as "another
    model". Both, and a <folder>/model that is not a few-step model, are refused before anything runs."""
    import shutil

    from merge_fixtures import tiny_merge_config

    from dmm_ray.config import MergeConfig
    from dmm_ray.fast.job import FAST_RECORD, FastError, check_before_ray, run_fast

    world, merged = merged_world
    named_model = tmp_path / "downloads" / "model"
    shutil.copytree(merged, named_model)

    def cfg(output_dir):
        return MergeConfig.model_validate(tiny_merge_config(world, tmp_path / "run", fast={"output_dir": str(output_dir)})).with_absolute_paths()

    for model, output_dir, message in [
        (named_model, named_model.parent, r"saves the few-step model to .*/downloads/model, in place of the merged model"),
        (merged, merged, r"is inside the merged model .*merged \(--model\)"),
        (merged, merged / "unet", r"few-step folder .*merged/unet \(--output-dir, fast.output_dir\) is inside the merged model"),
    ]:
        with pytest.raises(FastError, match=message):
            check_before_ray(cfg(output_dir), model)  # what run_fast and jobs/fast.py --dry-run check first
    (tmp_path / "elsewhere" / "model").mkdir(parents=True)
    with pytest.raises(FastError, match=r"elsewhere/model, which holds something else \(not a few-step model: no fast.json\)"):
        check_before_ray(cfg(tmp_path / "elsewhere"), merged)
    (tmp_path / "elsewhere" / "model" / FAST_RECORD).write_text("{}")  # an earlier few-step model: replaced by design
    check_before_ray(cfg(tmp_path / "elsewhere"), merged)
    before = _digest(named_model)
    with pytest.raises(FastError, match="in place of the merged model"):
        run_fast(cfg(named_model.parent), named_model)  # the stage itself, before its lock, Ray or data
    assert _digest(named_model) == before and sorted(p.name for p in named_model.parent.iterdir()) == ["model"]


def test_the_trained_line_of_a_finished_stage_run_again_says_nothing_was_trained():
    from dmm_ray.fast.job import trained_line

    assert trained_line({"step": 10, "resumed_from": 10}, "loss_rollout", 54) == "resumed at its last step (10): nothing left to train"
    assert trained_line({"step": 10, "resumed_from": 6, "loss_rollout": 0.5}, "loss_rollout", 9) == (
        "trained 10 steps (resumed from step 6) in 9 s (loss_rollout 0.5000)"
    )
    assert trained_line({"step": 4, "resumed_from": 0, "loss_lcm": 0.25}, "loss_lcm", 3) == "trained 4 steps in 3 s (loss_lcm 0.2500)"


def test_the_few_step_runs_fidt_is_its_own_steps_beside_the_merges(tmp_path):
    """FIDt, FIDt_ratio and fid_diag/<style> were logged once per eval step count at step = the count:
    MLflow shows a metric's value at its highest step, so the runs table and charts put the few-step
    model's 8-step FIDt beside the merges', not that of the 4 steps it samples at (its version's tag)."""
    import mlflow
    import numpy as np

    from dmm_ray.evaluation.matrix import EvalResult
    from dmm_ray.fast.job import log_fast_evaluations
    from dmm_ray.tracking import MergeTracker, TrackingConfig

    def evaluation(diagonal):
        return EvalResult(
            style_names=["ink", "neon"],
            matrix=np.array([[diagonal, 9.0], [9.0, diagonal]]),
            ref_matrix=np.full((2, 2), 2.0),
            prompts=["a red circle"],
            images_per_set=2,
            extractor="seeded-cnn:0:16",
        )

    evaluations = {2: evaluation(30.0), 4: evaluation(10.0), 8: evaluation(20.0)}
    tracker = MergeTracker(TrackingConfig(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db", project="p", registered_model_name=None))
    with tracker.project(), tracker.stage("fast") as run:
        log_fast_evaluations(tracker, evaluations, default_steps=4)
    metrics = mlflow.get_run(run.info.run_id).data.metrics
    assert (metrics["FIDt"], metrics["FIDt_ratio"], metrics["fid_diag/ink"]) == (evaluations[4].fidt, evaluations[4].ratio, 10.0)
    assert [m.step for m in mlflow.MlflowClient().get_metric_history(run.info.run_id, "FIDt")] == [0]  # as a merge's run
    assert {metrics[f"FIDt_{n}steps"] for n in (2, 4, 8)} == {e.fidt for e in evaluations.values()}


def test_fast_job_help_and_missing_model():
    out = subprocess.run([sys.executable, str(REPO / "jobs" / "fast.py"), "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "--model" in out.stdout and "LCM" in out.stdout and "--restart" in out.stdout
    out = subprocess.run(
        [sys.executable, str(REPO / "jobs" / "fast.py"), "--model", "/nonexistent/merged"], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 2 and "no such folder" in out.stderr


def test_a_merged_model_given_as_a_uri_is_refused_naming_the_local_copy(tmp_path, monkeypatch, capsys):
    """Finding: jobs/fast.py --model s3://bucket/merges/toy/merged (where jobs/merge.py uploads a merge into an
    output_dir URI; file:// too) said "--model s3:/bucket/merges/toy/merged: no such folder", a mangled path, for a
    model that is there. A URI is refused naming --model, and the merge's local copy (its staging folder) where
    this machine has it."""
    from dmm_ray.paths import staging_dir
    from jobs import fast as job

    monkeypatch.setenv("DMM_HOME", str(tmp_path / "home"))
    model = tmp_path / "bucket" / "merged"
    model.mkdir(parents=True)
    (model / "model_index.json").write_text("{}")
    staged = staging_dir("s3://bucket/merges/toy") / "merged"
    staged.mkdir(parents=True)
    (staged / "model_index.json").write_text("{}")
    for uri, hint in (
        (model.as_uri(), "download it first"),
        ("s3://bucket/merges/toy/merged/", f"keeps its local copy in {staged}: give that folder"),
    ):
        with pytest.raises(SystemExit) as exited:
            job.main(["--model", uri, "--dry-run"])
        err = capsys.readouterr().err
        assert exited.value.code == 2 and f"--model {uri!r} is a URI, but --model must be a local folder" in err and hint in err, err
    # the Python API (run_fast, check_model_folder) too: it said "--model s3:/bucket/...: no such folder", then
    # "download the merged model first" also where the merge's local copy is here (jobs/fast.py named it)
    from dmm_ray.config import MergeConfig
    from dmm_ray.fast.job import FastError, check_model_folder, run_fast

    for uri, hint in (
        ("s3://bucket/merges/toy/merged", f"keeps its local copy in {staged}"),
        ("s3://bucket/merges/other/merged", "download it first"),
    ):
        for call in (lambda: check_model_folder(uri), lambda: run_fast(MergeConfig.model_construct(), uri)):
            with pytest.raises(FastError, match="is a URI, but --model must be a local folder") as refused:
                call()
            assert hint in str(refused.value), refused.value


def test_the_few_step_folder_of_a_uri_output_dir_is_its_staging_folders(tmp_path, monkeypatch):
    """Finding: jobs/fast.py --config <a merge config whose output_dir is a URI> (the docs' "the config the model was
    merged with works"), without --output-dir, took Path(output_dir) / "fast" for its folder: `s3:/bucket/toy/fast`, a
    local folder named `s3:` in the current directory, created and written by the run. It is the merge's own few-step
    folder there (merge.fast_folder): the output_dir URI's local staging folder's fast/."""
    from merge_fixtures import build_world, tiny_merge_config

    from dmm_ray import merge, paths
    from dmm_ray.config import MergeConfig
    from dmm_ray.fast.job import fast_dir

    monkeypatch.setenv("DMM_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    world = build_world(tmp_path / "world", rows=8)
    for output_dir, expected in (
        ("s3://bucket/toy", paths.staging_dir("s3://bucket/toy") / "fast"),
        (str(tmp_path / "out"), tmp_path / "out" / "fast"),
    ):
        cfg = MergeConfig.model_validate(tiny_merge_config(world, Path("x"), output_dir=output_dir)).with_absolute_paths()
        assert fast_dir(cfg) == expected == merge.fast_folder(cfg, merge.output_location(cfg)[0]), output_dir


def test_speed_benchmark_times_both_samplers_of_one_random_model(capsys):
    """benchmarks/fast_speed.py --arch: one randomly initialised model sampled at the merged model's
    default (no sampler.json: the paper's 25 steps, CFG 7), the naive 4 steps with CFG, and 4 TCD
    steps without; both pipelines share their modules, so each UNet pass must be timed once (the
    per-part times then fit inside the call: "rest" is not negative)."""
    import re

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import fast_speed

    assert fast_speed.main(["--arch", "tiny", "--batch", "2", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if "images/s" in line]
    assert [r.split("  ")[1].strip() for r in rows] == [
        "merged, 25 DPM-Solver++ steps, CFG 7",
        "merged, 4 DPM-Solver++ steps, CFG 7",
        "few-step, 4 TCD steps, CFG off",
    ]
    assert all(int(re.search(r"rest (-?\d+)", r).group(1)) >= 0 for r in rows), out
    assert "tiny architecture, random weights" in out and "float32 on cpu" in out
    assert fast_speed.main(["--arch", "tiny", "--batch", "1", "--repeats", "1", "--dtype", "bfloat16", "--per-sample"]) == 0
    out = capsys.readouterr().out
    assert "bfloat16 on cpu" in out
    rows = [line.split("  ")[1].strip() for line in out.splitlines() if "images/s" in line]
    assert rows[3:] == ["merged, 25 steps, CFG 7, per-sample adapters", "few-step, 4 steps, per-sample adapters"], out
    assert "one style folded into the layers vs per-sample adapters: merged x" in out
    for bad in (["--arch", "tiny", "--merged", "m"], ["--merged", "m"]):
        with pytest.raises(SystemExit):
            fast_speed.main(bad)


def test_few_step_student_samples_with_its_own_steps_and_guidance():
    from dmm_ray.evaluation.matrix import StudentSource
    from dmm_ray.fast.job import FewStepStudent

    source = FewStepStudent.wrap(StudentSource(pipeline_factory=lambda: None, style_names=["a", "b"]), 4, 1.0)
    assert source.call_kwargs("b") == {"style": "b", "num_inference_steps": 4, "guidance_scale": 1.0}


# ---- the saved few-step model ---------------------------------------------------------------------


def _digest(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def merged_world(tmp_path_factory):
    """The tiny merge world plus a 'merged' model made directly (StyleUNet on the base, two styles)."""
    from merge_fixtures import build_world

    from dmm_ray.pipeline import DMMPipeline

    root = tmp_path_factory.mktemp("fast_world")
    world = build_world(root)
    torch.manual_seed(0)
    base_unet = UNet2DConditionModel.from_pretrained(Path(world["base"]) / "unet")
    student = StyleUNet.from_unet(base_unet, ["style0", "style1"])
    merged = root / "merged"
    DMMPipeline.from_base(world["base"], student).save_pretrained(merged)
    (merged / "dmm_merge.json").write_text(json.dumps({"name": "test-merge", "styles": ["style0", "style1"], "teachers": world["teachers"]}))
    return world, merged


def test_the_few_step_workers_load_the_merged_model_under_a_reader_marker(merged_world, tmp_path, monkeypatch):
    """The stage's Ray workers read the merged UNet (two or three times), its text encoder and scheduler with no
    reader marker (output_lock.reading), so a merge saving into that output_dir could swap the folder between two of
    those reads: a worker then trained on one model's UNet with another's text encoder. load_models holds one
    marker while it loads (a save waits for it) and none after."""
    from merge_fixtures import tiny_merge_config

    from dmm_ray.config import MergeConfig
    from dmm_ray.distill import conditioning
    from dmm_ray.fast.loop import load_models

    world, merged = merged_world
    cfg = MergeConfig.model_validate(tiny_merge_config(world, tmp_path / "run", fast={"mode": "full"}))
    markers = lambda: sorted(p.name for p in merged.parent.glob(".merged.reading-*"))  # noqa: E731
    seen, real = [], conditioning.load_base_conditioner
    monkeypatch.setattr(conditioning, "load_base_conditioner", lambda *a, **k: seen.append(markers()) or real(*a, **k))
    teacher, student, params, target, conditioner, scheduler = load_models(merged, cfg.fast, torch.device("cpu"))
    assert len(seen) == 1 and len(seen[0]) == 1, seen  # this process's marker while the text encoder loads
    assert markers() == []  # none once loaded
    assert teacher.num_styles == 2 and target is not None and params and scheduler is not None


@pytest.fixture(scope="module")
def fast_model(merged_world, tmp_path_factory):
    """A few-step model saved by `save_fast_model` from a LoRA checkpoint with non-zero weights (no Ray),
    at lora_alpha != lora_rank (the LoRA's scale is not 1)."""
    from merge_fixtures import tiny_merge_config

    from dmm_ray.config import MergeConfig
    from dmm_ray.fast.job import save_fast_model
    from dmm_ray.fast.loop import TRAINABLE, build_student, trainable_state

    world, merged = merged_world
    out = tmp_path_factory.mktemp("fast_model")
    cfg = MergeConfig.model_validate(tiny_merge_config(world, out / "run", fast={"lora_rank": 4, "lora_alpha": 8.0}))  # scale 2
    torch.manual_seed(0)
    student, params = build_student(merged, cfg.fast)
    with torch.no_grad():
        for p in params:
            p.add_(0.05 * torch.randn_like(p))
    (out / "ckpt").mkdir()
    torch.save({"student": trainable_state(student, cfg.fast), "step": 2}, out / "ckpt" / TRAINABLE)
    before = _digest(merged)
    path = save_fast_model(cfg, merged, out / "ckpt", out / "model")
    assert _digest(merged) == before  # saving never writes the merged model
    return path, merged


def _load(path):
    from dmm_ray.pipeline import DMMPipeline

    pipe = DMMPipeline.from_pretrained(path, local_files_only=True, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_fast_model_loads_with_its_sampler_and_keeps_style_and_mixture_apis(fast_model):
    from diffusers import TCDScheduler

    path, merged = fast_model
    pipe = _load(path)
    assert isinstance(pipe.scheduler, TCDScheduler) and pipe.styles == ["style0", "style1"]  # fast.sampler's default
    assert pipe.scheduler.config.original_inference_steps == 50  # the sampler's timesteps lie on the solver grid
    assert {k: pipe.sampler_defaults[k] for k in ("scheduler", "num_inference_steps", "guidance_scale")} == {
        "scheduler": "TCDScheduler",
        "num_inference_steps": 4,
        "guidance_scale": 1.0,
    }
    assert _load(merged).sampler_defaults["num_inference_steps"] == 25  # a merged model keeps the paper's sampler
    kw = dict(height=32, width=32, output_type="pt")
    a = pipe("a red circle", style="style0", generator=torch.Generator().manual_seed(0), **kw).images
    b = pipe("a red circle", style="style1", generator=torch.Generator().manual_seed(0), **kw).images
    mix = pipe("a red circle", style_weights={"style0": 0.5, "style1": 0.5}, generator=torch.Generator().manual_seed(0), **kw).images
    assert a.shape == mix.shape == (1, 3, 32, 32) and not torch.allclose(a, b) and not torch.allclose(a, mix)
    record = json.loads((path / "fast.json").read_text())
    assert record["fast"]["mode"] == "lora" and json.loads((path / "dmm_merge.json").read_text())["name"] == "test-merge"


def test_more_steps_than_the_few_step_models_grid_is_an_error_that_names_the_grid(fast_model):
    """The saved TCD scheduler samples at most its training grid's steps (original_inference_steps, 50 here):
    more was diffusers' error telling a text-to-image call to "increase `strength`", which it does not take."""
    pipe = _load(fast_model[0])
    kw = dict(style="style0", height=32, width=32, output_type="latent")
    with pytest.raises(
        ValueError,
        match=r"^num_inference_steps=51: this few-step model's TCDScheduler samples at most 50 steps .*give 1 to 50 \(or none: the model's own, 4\)",
    ):
        pipe("a red circle", num_inference_steps=51, **kw)
    assert pipe("a red circle", timesteps=[999, 499], **kw).images.shape[0] == 1  # explicit timesteps: diffusers ignores the count


def test_fast_sampler_choice_saves_its_scheduler_and_tcd_is_deterministic(fast_model, merged_world, tmp_path):
    """fast.sampler=lcm saves LCMScheduler (fresh noise each step: the draw changes the image); the
    default TCD at gamma 0 re-noises with the student's own noise estimate, so only the starting
    latents decide the image."""
    from diffusers import LCMScheduler
    from merge_fixtures import tiny_merge_config

    from dmm_ray.config import MergeConfig
    from dmm_ray.fast.job import save_fast_model

    path, merged = fast_model
    world, _ = merged_world
    cfg = MergeConfig.model_validate(tiny_merge_config(world, tmp_path / "run", fast={"lora_rank": 4, "sampler": "lcm"}))
    lcm = _load(save_fast_model(cfg, merged, path.parent / "ckpt", tmp_path / "lcm_model"))
    assert isinstance(lcm.scheduler, LCMScheduler) and lcm.sampler_defaults["scheduler"] == "LCMScheduler"
    tcd = _load(path)
    side = 32 // tcd.vae_scale_factor
    latents = torch.randn(1, tcd.unet.config.in_channels, side, side, generator=torch.Generator().manual_seed(1))

    def run(pipe, seed):
        g = torch.Generator().manual_seed(seed)
        return pipe("a red circle", style="style0", height=32, width=32, latents=latents.clone(), generator=g, output_type="latent").images

    torch.testing.assert_close(run(tcd, 0), run(tcd, 1))
    assert not torch.allclose(run(lcm, 0), run(lcm, 1))


def test_a_few_step_evaluation_names_its_model_and_teachers_like_a_merges(fast_model, merged_world, tmp_path, monkeypatch):
    """The few-step stage's fid_matrix.json (evaluate_fast) had the sampler, seeds and teachers'
    checksums but not the model's path, unet checksum and scheduler or the teachers' files, which only
    evaluate_merge added: two few-step evaluations could not be told apart. Sampling is faked here."""
    import numpy as np
    from merge_fixtures import tiny_merge_config

    from dmm_ray.config import MergeConfig
    from dmm_ray.evaluation import matrix
    from dmm_ray.fast.job import evaluate_fast, teachers_of
    from dmm_ray.teachers import files_checksum

    def sampled(student, teachers, config, extractor):
        n = len(student.style_names)
        return matrix.EvalResult(
            style_names=student.style_names, matrix=np.eye(n), ref_matrix=np.eye(n), prompts=["p"], images_per_set=1, extractor="fake",
            provenance={"student_call": {k: v for k, v in student.call_kwargs("style0").items() if k != "style"}},
        )  # fmt: skip

    monkeypatch.setattr(matrix, "evaluate_sources", sampled)
    path, merged = fast_model
    world, _ = merged_world
    cfg = MergeConfig.model_validate(tiny_merge_config(world, tmp_path / "run"))
    teachers = teachers_of(cfg, merged)
    expected_teachers = {t.name: {"source": str(t.source), "base": str(t.base) if t.base else None} for t in teachers}
    for scheduler, saved in [(None, "TCDScheduler"), ("LCMScheduler", "LCMScheduler")]:  # the saved one, or the one swapped in
        results = evaluate_fast(cfg, path, teachers, [2, 4], tmp_path / str(scheduler), scheduler=scheduler)
        for steps, result in results.items():
            made = json.loads(result.files["json"].read_text())["provenance"]
            assert made["model"] == {"path": str(path.resolve()), "unet_checksum": files_checksum([path / "unet"]), "scheduler": saved}
            assert made["teachers"] == expected_teachers and made["student_call"]["num_inference_steps"] == steps


def test_an_export_of_the_few_step_model_is_logged_to_its_own_run_not_the_merges(fast_model, tmp_path):
    """The few-step model's dmm_merge.json names the few-step stage run that registered it, so
    jobs/export.py (dmm_ray.export_tracking.resolve_model) logs its exports there; untracked, it names
    none. It was the merge's record copied as it was: exports of the few-step model went to the merge's run."""
    import shutil

    from merge_fixtures import tiny_merge_config

    from dmm_ray.config import MergeConfig
    from dmm_ray.export_tracking import resolve_model
    from dmm_ray.fast.job import save_fast_model

    path, merged = fast_model
    tracked_merge = tmp_path / "merged"
    shutil.copytree(merged, tracked_merge)
    record = json.loads((merged / "dmm_merge.json").read_text())
    merge_run = {"tracking_uri": "sqlite:///merge.db", "run_id": "merge-run"}
    (tracked_merge / "dmm_merge.json").write_text(json.dumps({**record, "mlflow": merge_run}))
    world = {"base": "base", "teachers": record["teachers"], "shards": "shards"}
    cfg = MergeConfig.model_validate(tiny_merge_config(world, tmp_path / "run", fast={"lora_rank": 4, "lora_alpha": 8.0}))
    fast_run = {"uri": "sqlite:///fast.db", "run_id": "fast-run", "parent_run_id": "project-run"}
    saved = save_fast_model(cfg, tracked_merge, path.parent / "ckpt", tmp_path / "tracked", tracking=fast_run)
    with resolve_model(str(saved)) as (_, run_id, uri):
        assert (run_id, uri) == ("fast-run", "sqlite:///fast.db")
    saved = save_fast_model(cfg, tracked_merge, path.parent / "ckpt", tmp_path / "untracked")
    with resolve_model(str(saved)) as (_, run_id, uri):
        assert (run_id, uri) == (None, None)
    assert json.loads((saved / "dmm_merge.json").read_text())["styles"] == record["styles"]  # the rest of the merge's record stays


def test_an_export_of_the_few_step_model_says_how_it_samples(fast_model, tmp_path, capsys):
    """A baked export keeps the few-step model's TCD scheduler, but a stock pipeline samples with its own defaults
    (50 steps at guidance 7.5: on the toy preset's 10-step grid, diffusers' ValueError), and the export named the
    model's 4 steps and CFG off nowhere: not in its metadata, not in what jobs/export.py printed. Both now say them."""
    from diffusers import StableDiffusionPipeline, TCDScheduler

    from dmm_ray.defaults import PAPER_NEGATIVE_PROMPT
    from dmm_ray.export import read_metadata
    from jobs import export as job

    path, _ = fast_model
    out = tmp_path / "style1.safetensors"
    assert job.main(["--model", str(path), "--style", "style1", "--out", str(out), "--no-track"]) == 0
    sampler = {"scheduler": "TCDScheduler", "num_inference_steps": 4, "guidance_scale": 1.0, "negative_prompt": PAPER_NEGATIVE_PROMPT}
    assert json.loads(read_metadata(out)["dmm.sampler"]) == sampler
    assert f"sample it as the model does: num_inference_steps=4, guidance_scale=1.0, negative_prompt={PAPER_NEGATIVE_PROMPT!r} (TCDScheduler;" in (
        capsys.readouterr().out
    )
    plain = StableDiffusionPipeline.from_single_file(str(out), config=str(tmp_path / "style1.config"), local_files_only=True)
    assert isinstance(plain.scheduler, TCDScheduler)


def test_lcm_lora_alone_on_the_merged_model_equals_the_fused_model(fast_model):
    from dmm_ray.fast.job import LORA_DIR

    path, merged = fast_model
    fused, base = _load(path), _load(merged)
    base.load_lora_weights(path / LORA_DIR)  # "the LoRA applied on the merged model", at its alpha / rank (fast_model: 2)
    x, t, e, ids = torch.randn(2, 4, 8, 8), torch.tensor([500, 20]), torch.randn(2, 77, 32), torch.tensor([0, 1])
    with torch.no_grad():
        merged_out = _load(merged).unet(x, t, e, style_ids=ids).sample
        fused_out = fused.unet(x, t, e, style_ids=ids).sample
        torch.testing.assert_close(base.unet(x, t, e, style_ids=ids).sample, fused_out, rtol=1e-4, atol=1e-5)
    assert (merged_out - fused_out).abs().max() > 1e-4  # the LoRA does change the model


def test_the_lcm_lora_fused_into_the_merged_model_saves_only_once_unloaded(fast_model, tmp_path):
    """save_pretrained after fuse_lora (PEFT's layers still loaded) wrote `to_q.base_layer.weight` and
    `to_q.lora_A.default_0.weight`: the folder loaded back with those layers' weights missing (a meta-tensor
    error at the first call). It is refused, naming unload_lora_weights, and writes nothing; once unloaded,
    the saved folder is the few-step model."""
    from dmm_ray.fast.job import LORA_DIR

    path, merged = fast_model
    pipe = _load(merged)
    pipe.load_lora_weights(path / LORA_DIR)
    pipe.fuse_lora()
    with pytest.raises(ValueError, match=r"LoRA layers loaded \(unet\).*fuse_lora\(\) then pipe.unload_lora_weights\(\)"):
        pipe.save_pretrained(tmp_path / "fused")
    assert not (tmp_path / "fused").exists()
    pipe.unload_lora_weights()  # the fused weights stay
    pipe.save_pretrained(tmp_path / "fused")
    x, t, e, ids = torch.randn(2, 4, 8, 8), torch.tensor([500, 20]), torch.randn(2, 77, 32), torch.tensor([0, 1])
    with torch.no_grad():
        saved_out = _load(tmp_path / "fused").unet(x, t, e, style_ids=ids).sample
        torch.testing.assert_close(saved_out, _load(path).unet(x, t, e, style_ids=ids).sample, rtol=1e-4, atol=1e-5)


def test_serve_follows_the_few_step_model(fast_model):
    from fastapi.testclient import TestClient

    from serve.config import ServeConfig
    from serve.model import StyleModelBackend
    from serve.router import LocalService, create_api

    path, merged = fast_model
    for folder, sampler, steps, guidance in ((path, "TCDScheduler", 4, 1.0), (merged, "DPMSolverMultistepScheduler", 25, 7.0)):
        backend = StyleModelBackend(str(folder), device="cpu")
        with TestClient(create_api(LocalService(backend), ServeConfig(model=str(folder)))) as client:
            info = client.get("/styles").json()
            assert (info["sampler"], info["default_steps"], info["default_guidance"]) == (sampler, steps, guidance)
            if folder == path:
                r = client.post("/generate", json={"prompt": "a red circle", "style": "style1", "seed": 0, "width": 32, "height": 32})
                assert r.status_code == 200, r.text
                assert backend.forward_groups[-1][0][:2] == (4, 1.0)  # the request ran 4 steps without CFG
    with TestClient(create_api(LocalService(StyleModelBackend(str(path), device="cpu")), ServeConfig(model=str(path), default_steps=8))) as client:
        assert client.get("/styles").json()["default_steps"] == 8  # a config value still wins


# ---- end to end on Ray ---------------------------------------------------------------------------


@pytest.mark.ray
def test_fast_end_to_end_on_ray(ray_cluster, merged_world, tmp_path):
    from merge_fixtures import tiny_merge_config

    from dmm_ray.config import MergeConfig
    from dmm_ray.fast.job import run_fast
    from dmm_ray.tracking import make_tracker

    world, merged = merged_world
    before = _digest(merged)
    synthesized = _synthesized_sets(tmp_path / "synthesized", styles=2, rows=4)
    cfg = MergeConfig.model_validate(
        tiny_merge_config(
            world,
            tmp_path / "out",
            fast={
                "steps": 2,
                "lora_rank": 4,
                "checkpoint_every": 1,
                "log_every": 1,
                "batch_size": 4,
                "lr": 1e-2,
                "synthetic_fraction": 0.5,
                "synthesized": str(synthesized),
                "saved_ema_decay": 0.99,
            },
            tracking={"uri": f"sqlite:///{tmp_path / 'mlflow.db'}"},
        )
    )
    result = run_fast(cfg, merged, tracker=make_tracker(cfg), evaluate=False)
    assert result.train_metrics["step"] == 2 and "loss_lcm" in result.train_metrics
    assert result.train_metrics["synthetic_share"] == 0.5  # half of every batch came from the teachers' own samples
    assert _digest(merged) == before  # the LoRA variant never writes the merged model
    assert result.model_uri == "models:/test-merge/1"  # its own version of the merge's registered model
    pipe = _load(result.model_path)
    assert pipe.sampler_defaults["num_inference_steps"] == 4
    assert pipe("a red circle", style="style1", height=32, width=32).images[0].size == (32, 32)
    # stopped after its registration (the completion record never written): a re-run keeps the saved model and its
    # version (it trained nothing, saved again and registered a second version)
    (tmp_path / "out" / "fast" / "fast_complete.json").unlink()
    kept = run_fast(cfg, merged, tracker=make_tracker(cfg), evaluate=False)
    assert kept.train_metrics == {} and kept.model_uri == "models:/test-merge/1" and not kept.already_complete
    # stopped after training, before its save: a re-run trains nothing and saves
    (tmp_path / "out" / "fast" / "fast_complete.json").unlink()
    shutil.rmtree(result.model_path)
    resumed = run_fast(cfg, merged, tracker=make_tracker(cfg), evaluate=False)
    assert (resumed.train_metrics["step"], resumed.train_metrics["resumed_from"]) == (2, 2) and resumed.model_uri == "models:/test-merge/2"
    # the same job again: nothing runs, no third model version
    again = run_fast(cfg, merged, tracker=make_tracker(cfg), evaluate=False)
    assert again.already_complete and again.model_uri == "models:/test-merge/2" and again.train_metrics == {}
    # ... also when it finished before an input was recorded (an older dmm-ray's record lacks the key)
    record = json.loads((tmp_path / "out" / "fast" / "fast_complete.json").read_text())
    del record["asked"]["inputs"]["data.tokenizer.checksum"]
    (tmp_path / "out" / "fast" / "fast_complete.json").write_text(json.dumps(record))
    assert run_fast(cfg, merged, tracker=make_tracker(cfg), evaluate=False).already_complete
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert sorted(v.version for v in client.search_model_versions("name='test-merge'")) == [1, 2]
    # its versions are tagged with their stage like the merged model's, so the Models page tells them apart
    version = client.get_model_version("test-merge", "2")
    assert version.tags["dmm.stage"] == "fast" and version.tags["dmm.styles"] == "style0,style1"
    assert version.tags["dmm.merged_path"] == str(result.model_path)
    # an export of the model (jobs/export.py) is logged to the few-step run that registered it
    recorded = json.loads((result.model_path / "dmm_merge.json").read_text())["mlflow"]
    assert recorded == {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "run_id": client.get_model_version("test-merge", "2").run_id}


@pytest.mark.ray
@pytest.mark.slow  # a merge then the fast stage: over 60 s on 2 cores (make test-slow)
def test_a_merge_with_fast_enabled_ends_with_the_few_step_model(ray_cluster, merged_world, tmp_path, monkeypatch):
    """A merge with fast.enabled ends with the few-step model, also when that stage failed once: the same
    command runs only that stage again, the merged model stays the first MLflow version and the few-step
    model, whose dmm_merge.json names its own run, is the second."""
    from merge_fixtures import tiny_merge_config

    from dmm_ray.config import MergeConfig
    from dmm_ray.fast import job as fast_job
    from dmm_ray.merge import run_merge
    from dmm_ray.tracking import make_tracker

    world, _ = merged_world
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = MergeConfig.model_validate(
        tiny_merge_config(
            world,
            tmp_path / "out",
            synthesis={"enabled": False, "finetune_steps": 0},
            fast={"enabled": True, "steps": 1, "lora_rank": 2, "batch_size": 4},
            tracking={"uri": store},
        )
    )

    def failed(*args, **kwargs):
        raise RuntimeError("the few-step stage failed")

    with monkeypatch.context() as patch:  # the merged model is saved and registered, then its few-step stage fails
        patch.setattr(fast_job, "run_fast", failed)
        with pytest.raises(RuntimeError, match="few-step stage failed"):
            run_merge(cfg, tracker=make_tracker(cfg))
    merged_record = json.loads((tmp_path / "out" / "merged" / "dmm_merge.json").read_text())
    result = run_merge(cfg, tracker=make_tracker(cfg))  # the same command again: only the few-step stage runs
    assert result.stage_metrics == {} and json.loads((tmp_path / "out" / "merged" / "dmm_merge.json").read_text()) == merged_record
    assert result.fast is not None and result.fast.train_metrics["step"] == 1
    assert result.fast.model_path == tmp_path / "out" / "fast" / "model" and (result.fast.model_path / "sampler.json").is_file()
    from mlflow.tracking import MlflowClient

    client = MlflowClient(store)
    versions = {int(v.version): v.run_id for v in client.search_model_versions("name='test-merge'")}
    assert result.fast.model_uri == "models:/test-merge/2" and versions[1] == merged_record["mlflow"]["run_id"] and len(versions) == 2
    assert json.loads((result.fast.model_path / "dmm_merge.json").read_text())["mlflow"]["run_id"] == versions[2]
    assert run_merge(cfg, tracker=make_tracker(cfg)).already_complete


def test_own_sampler_overrides_steps_and_guidance_and_pickles():
    import pickle

    from dmm_ray.fast.job import OwnSampler

    factory = pickle.loads(pickle.dumps(OwnSampler.factory(_RecordingPipe, 4, 1.0)))
    pipe = factory().to("cpu")
    pipe(prompt=["x"], num_inference_steps=10, guidance_scale=5.0, style_weights={"a": 1})
    assert pipe.calls == [{"prompt": ["x"], "num_inference_steps": 4, "guidance_scale": 1.0, "style_weights": {"a": 1}}]


class _RecordingPipe:
    def __init__(self):
        self.calls = []

    def to(self, device):
        return self

    def __call__(self, **kwargs):
        self.calls.append(kwargs)


def test_full_mode_saves_the_distilled_unet_with_the_merged_codebook(merged_world, tmp_path):
    from merge_fixtures import tiny_merge_config

    from dmm_ray.config import MergeConfig
    from dmm_ray.fast.job import LORA_DIR, save_fast_model
    from dmm_ray.fast.lcm import update_ema
    from dmm_ray.fast.loop import TRAINABLE, build_student, trainable_state

    world, merged = merged_world
    cfg = MergeConfig.model_validate(tiny_merge_config(world, tmp_path / "run", fast={"mode": "full"}))
    student, params = build_student(merged, cfg.fast)
    target, _ = build_student(merged, cfg.fast)
    with torch.no_grad():
        for p in params:
            p.add_(0.01)
    update_ema(target.parameters(), student.parameters(), 0.5)  # the EMA target moves halfway
    name = "conv_in.weight"
    torch.testing.assert_close(dict(target.named_parameters())[name], dict(student.named_parameters())[name] - 0.005)
    (tmp_path / "ckpt").mkdir()
    torch.save({"student": trainable_state(student, cfg.fast), "step": 1}, tmp_path / "ckpt" / TRAINABLE)
    path = save_fast_model(cfg, merged, tmp_path / "ckpt", tmp_path / "model")
    pipe = _load(path)
    assert not (path / LORA_DIR).exists() and pipe.sampler_defaults["num_inference_steps"] == 4
    torch.testing.assert_close(pipe.unet.conv_in.weight, _load(merged).unet.conv_in.weight + 0.01)
    assert torch.equal(pipe.unet.class_embedding.codebook.weight, _load(merged).unet.class_embedding.codebook.weight)


def test_a_resumed_saved_ema_lives_on_its_parameters_device():
    """fast.saved_ema_decay's EMA is resumed from a checkpoint read to the CPU; diffusers' EMAModel kept
    the shadow weights there, so a GPU worker's first ema.step after the resume mixed devices and failed.
    Here the parameters' device is 'meta'."""
    from diffusers.training_utils import EMAModel

    from dmm_ray.fast.loop import load_saved_ema

    state = {"saved_ema": EMAModel(list(torch.nn.Linear(3, 3).parameters()), decay=0.9).state_dict()}
    params = list(torch.nn.Linear(3, 3).to("meta").parameters())
    ema = EMAModel(params, decay=0.9)
    load_saved_ema(ema, state, "checkpoint")
    assert {p.device.type for p in ema.shadow_params} == {"meta"}
    ema.step(params)  # mixed devices: RuntimeError


def test_saved_ema_is_what_the_save_keeps(merged_world, tmp_path):
    """fast.saved_ema_decay: the saved UNet holds the EMA's shadow weights, not the last step's;
    a checkpoint trained without the EMA is refused, not silently saved raw."""
    from merge_fixtures import tiny_merge_config

    from dmm_ray.config import MergeConfig
    from dmm_ray.fast.job import save_fast_model
    from dmm_ray.fast.loop import TRAINABLE, build_student, saved_ema_of, trainable_state

    world, merged = merged_world
    cfg = MergeConfig.model_validate(tiny_merge_config(world, tmp_path / "run", fast={"mode": "full", "saved_ema_decay": 0.9}))
    student, params = build_student(merged, cfg.fast)
    ema = saved_ema_of(params, cfg.fast)
    for _ in range(2):
        with torch.no_grad():
            for p in params:
                p.add_(0.01)
        ema.step(params)  # diffusers: the first step copies; the second keeps decay 1 - 2^-3/4 of the shadow
    moved = 0.01 + 0.01 * (1 - min(0.9, 1 - 2**-0.75))  # the shadow: 0.01 + part of the second 0.01
    (tmp_path / "ckpt").mkdir()
    state = {"student": trainable_state(student, cfg.fast), "step": 1, "saved_ema": ema.state_dict()}
    torch.save(state, tmp_path / "ckpt" / TRAINABLE)
    pipe = _load(save_fast_model(cfg, merged, tmp_path / "ckpt", tmp_path / "model"))
    base = _load(merged).unet
    torch.testing.assert_close(pipe.unet.conv_in.weight, base.conv_in.weight + moved)
    raw = cfg.model_copy(update={"fast": cfg.fast.model_copy(update={"saved_ema_decay": None})})
    torch.testing.assert_close(
        _load(save_fast_model(raw, merged, tmp_path / "ckpt", tmp_path / "raw")).unet.conv_in.weight, base.conv_in.weight + 0.02
    )
    torch.save({**state, "saved_ema": None}, tmp_path / "ckpt" / TRAINABLE)
    with pytest.raises(RuntimeError, match="holds no EMA"):
        save_fast_model(cfg, merged, tmp_path / "ckpt", tmp_path / "model2")


@pytest.mark.parametrize("error", [OSError(28, "No space left on device"), KeyboardInterrupt()], ids=["error", "ctrl-c"])
def test_a_save_that_fails_part_way_keeps_the_few_step_model_and_leaves_nothing_half_written(fast_model, merged_world, tmp_path, monkeypatch, error):
    """A few-step save into a folder holding an earlier few-step model, failing (or interrupted) after its
    first weights file (lcm_lora/): the earlier model stayed, but so did the half-written model.tmp beside
    it, which no later step removed until the next save."""
    import shutil

    from merge_fixtures import fail_weight_writes_after, tiny_merge_config

    from dmm_ray.config import MergeConfig
    from dmm_ray.fast.job import save_fast_model

    path, merged = fast_model
    world, _ = merged_world
    dest = shutil.copytree(path, tmp_path / "fast" / "model")
    cfg = MergeConfig.model_validate(tiny_merge_config(world, tmp_path / "run", fast={"lora_rank": 4, "lora_alpha": 8.0}))
    before = _digest(dest)
    tried = fail_weight_writes_after(monkeypatch, 1, error)
    with pytest.raises(type(error)):
        save_fast_model(cfg, merged, path.parent / "ckpt", dest)
    monkeypatch.undo()
    assert len(tried) == 2 and sorted(p.name for p in dest.parent.iterdir()) == ["model"]
    assert _digest(dest) == before and _load(dest).styles == ["style0", "style1"]


def _synthesized_sets(folder: Path, styles: int, rows: int) -> Path:
    """What a merge's synthesis writes: style_<i>/ shards whose rows carry style i."""
    import numpy as np
    from pyarrow import fs as pafs

    from dmm_ray.data.shards import latent_table, write_shard

    rng = np.random.default_rng(1)
    for i in range(styles):
        table = latent_table(
            rng.standard_normal((rows, 4, 8, 8)).astype(np.float32), ["a red circle"] * rows, [f"s{i}-{j}" for j in range(rows)], styles=[i] * rows
        )
        write_shard(pafs.LocalFileSystem(), str((folder / f"style_{i}").resolve()), 0, table)
    return folder


@pytest.mark.ray
def test_synthesized_rows_are_pooled_shuffled_and_keep_their_teachers_style(ray_cluster, tmp_path, merged_world):

    from merge_fixtures import tiny_merge_config

    from dmm_ray.config import MergeConfig
    from dmm_ray.data.stream import build_latent_dataset
    from dmm_ray.fast.job import synthesized_shards
    from dmm_ray.fast.loop import synthesized_rows

    world, merged = merged_world
    cfg = MergeConfig.model_validate(tiny_merge_config(world, tmp_path / "out", fast={"synthetic_fraction": 0.25}))
    with pytest.raises(FileNotFoundError, match="synthesized sets.*fast.synthesized"):
        synthesized_shards(cfg, merged)  # no <model>/../synthesized in this world
    folder = _synthesized_sets(tmp_path / "synth", styles=3, rows=8)
    cfg = cfg.model_copy(update={"fast": cfg.fast.model_copy(update={"synthesized": str(folder)})})
    shards = synthesized_shards(cfg, merged)
    assert [Path(s).name for s in shards] == ["style_0", "style_1", "style_2"]
    ds = build_latent_dataset(cfg.data, shards=shards)
    rows = synthesized_rows(ds, num_styles=3, seed=0)
    ids = [str(s) for s in rows["source_id"]]
    assert sorted(ids) == sorted(f"s{i}-{j}" for i in range(3) for j in range(8)) and ids != sorted(ids)  # all rows, shuffled
    assert all(int(s) == int(i.split("-")[0][1:]) for s, i in zip(rows["style"], ids))  # each row keeps its teacher's style
    from dmm_ray.distill.health import TrainingInputError, stops_without_retry

    with pytest.raises(TrainingInputError, match="outside the merged model's 2 styles") as info:  # a RuntimeError, retried
        synthesized_rows(build_latent_dataset(cfg.data, shards=shards), num_styles=2, seed=0)
    assert stops_without_retry(info.value)


@pytest.mark.ray
def test_merged_source_samples_each_style_of_the_merged_model_and_resamples_when_stale(ray_cluster, merged_world, tmp_path):
    """fast.synthetic_source: merged: style_<i>/ holds the merged model's own samples of style i (the
    synthesis sampler, prompts and seeds); other settings discard the old sets, the same ones keep them."""
    import numpy as np
    from merge_fixtures import tiny_merge_config

    from dmm_ray.config import MergeConfig
    from dmm_ray.data.stream import build_latent_dataset
    from dmm_ray.defaults import PAPER_NEGATIVE_PROMPT
    from dmm_ray.distill.synthesis import synthesis_prompts
    from dmm_ray.fast.job import merged_synthesized_sets
    from dmm_ray.fast.loop import synthesized_rows
    from dmm_ray.pipeline import DMMPipeline, load_dmm_pipeline

    world, merged = merged_world
    fast = {"synthetic_fraction": 0.5, "synthetic_source": "merged", "synthetic_images": 2}
    cfg = MergeConfig.model_validate(tiny_merge_config(world, tmp_path / "out", fast=fast, synthesis={"actors": 1, "cpus_per_actor": 0.5}))
    shards = merged_synthesized_sets(cfg, merged, ["style0", "style1"], tmp_path / "fast")
    assert [Path(s).name for s in shards] == ["style_0", "style_1"]
    rows = synthesized_rows(build_latent_dataset(cfg.data, shards=shards), num_styles=2, seed=0)
    by_id = {str(i): (int(s), lat) for i, s, lat in zip(rows["source_id"], rows["style"], rows["latents"])}
    assert sorted(by_id) == [f"synth-style{i}-{j}" for i in range(2) for j in range(2)]
    assert all(style == int(i.split("-")[1][-1]) for i, (style, _) in by_id.items())  # each row carries the style it was drawn with

    pipe = load_dmm_pipeline(merged)
    pipe.scheduler = DMMPipeline.paper_scheduler(pipe.scheduler)
    s = cfg.synthesis
    own = {
        name: pipe(
            [synthesis_prompts(cfg)[1]],
            style=name,
            negative_prompt=[PAPER_NEGATIVE_PROMPT],
            num_inference_steps=s.num_inference_steps,
            guidance_scale=s.guidance_scale,
            height=32,
            width=32,
            generator=[torch.Generator().manual_seed(cfg.seed * 100003 + 1)],
            output_type="latent",
        ).images[0]
        for name in ("style0", "style1")
    }
    got = {name: torch.from_numpy(np.asarray(by_id[f"synth-{name}-1"][1])).reshape(own[name].shape) for name in own}
    for name in own:
        torch.testing.assert_close(got[name], own[name], rtol=1e-4, atol=1e-4)  # the merged model's own sample of that style
    assert not torch.allclose(got["style0"], got["style1"], atol=1e-3)  # the styles differ: the style reached the sampler

    shard = next((tmp_path / "fast" / "synthesized" / "style_0").glob("*.parquet"))
    stamp = shard.stat().st_mtime_ns
    merged_synthesized_sets(cfg, merged, ["style0", "style1"], tmp_path / "fast")
    assert shard.stat().st_mtime_ns == stamp  # same model and settings: kept
    more = cfg.model_copy(update={"fast": cfg.fast.model_copy(update={"synthetic_images": 3})})
    rows = synthesized_rows(
        build_latent_dataset(cfg.data, shards=merged_synthesized_sets(more, merged, ["style0", "style1"], tmp_path / "fast")), 2, 0
    )
    assert len(rows["latents"]) == 6  # other settings: sampled again


def test_fast_state_resumes_only_from_the_same_model_and_settings(merged_world, tmp_path):
    """Training state in the fast output folder is resumed only when it was made from the same merged
    model with the same training settings; anything else is refused before Ray starts, and
    `jobs/fast.py --restart` discards it (keeping the saved few-step model)."""
    import shutil

    import yaml
    from merge_fixtures import tiny_merge_config

    from dmm_ray import fingerprint
    from dmm_ray.config import MergeConfig
    from dmm_ray.fast.job import run_fast
    from dmm_ray.fingerprint import StaleStateError

    world, merged = merged_world
    out = tmp_path / "fast"

    def tree(**fast):
        return tiny_merge_config(world, tmp_path / "run", fast={"output_dir": str(out), **fast})

    def cfg(**fast):
        return MergeConfig.model_validate(tree(**fast)).with_absolute_paths()

    fingerprint.check_fast_resume(cfg(), merged, out)  # no state yet
    fingerprint.record_fast(cfg(), merged, out)
    ckpt = fingerprint.fast_state_path(cfg(), out) / "checkpoint_000001"
    ckpt.mkdir(parents=True)
    (ckpt / "trainable.pt").write_bytes(b"x")
    (out / "model").mkdir()
    (out / "model" / "fast.json").write_text("{}")  # the saved few-step model (a folder without it there is refused)
    fingerprint.check_fast_resume(cfg(), merged, out)  # the same: resume
    # how, and what the save / evaluation do with the weights: never block a resume
    fingerprint.check_fast_resume(cfg(checkpoint_every=7, log_every=3, eval_steps=[4], sampler="lcm", num_inference_steps=2), merged, out)
    with pytest.raises(StaleStateError, match=r"fast\.lr: 0\.0001 -> 0\.001"):
        fingerprint.check_fast_resume(cfg(lr=1e-3), merged, out)
    with pytest.raises(StaleStateError, match=r"(?s)fast\.solver_substeps: 1 -> 2.*--restart"):
        fingerprint.check_fast_resume(cfg(solver_substeps=2), merged, out)
    other = tmp_path / "other"  # another merged model: same files but one, at another path
    shutil.copytree(merged, other)
    (other / "unet" / "notes.txt").write_text("retrained")
    with pytest.raises(StaleStateError, match=r"model\.unet\.checksum") as error:
        fingerprint.check_fast_resume(cfg(), other, out)
    assert "model: " in str(error.value)
    # the stage itself refuses before anything slow (no Ray, no data)
    with pytest.raises(StaleStateError, match="fast.lr"):
        run_fast(cfg(lr=1e-3), merged)
    # and the job says so, exit 2, until --restart discards the state (not the saved model)
    config = tmp_path / "stale.yaml"
    config.write_text(yaml.safe_dump(tree(lr=1e-3)))
    job = [sys.executable, str(REPO / "jobs" / "fast.py"), "--model", str(merged), "--config", str(config), "--no-track", "--no-eval"]
    proc = subprocess.run(job, capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 2 and "fast.lr: 0.0001 -> 0.001" in proc.stderr and "--restart" in proc.stderr, proc.stderr[-2000:]
    removed = fingerprint.discard_fast_state(cfg(), out)
    assert not fingerprint.fast_state_path(cfg(), out).exists() and not (out / fingerprint.RECORD).exists() and len(removed) == 2
    assert (out / "model").is_dir()
    fingerprint.check_fast_resume(cfg(lr=1e-3), merged, out)  # nothing left to resume


def test_the_resume_check_knows_the_rollout_step_counts_and_the_merged_samples_per_style(merged_world, tmp_path):
    """With fast.rollout_steps, fast.num_inference_steps is the step count the rollout trains (unless
    fast.rollout_sampler_steps says), and synthesis.images_per_teacher the merged model's samples per
    style (unless fast.synthetic_images says): a resume with another value is refused. A record written
    before they were recorded still resumes."""
    from merge_fixtures import tiny_merge_config

    from dmm_ray import fingerprint
    from dmm_ray.config import MergeConfig
    from dmm_ray.fingerprint import StaleStateError

    world, merged = merged_world
    out = tmp_path / "fast"

    def cfg(images=4, **fast):
        tree = tiny_merge_config(world, tmp_path / "run", fast={"output_dir": str(out), "rollout_steps": 2, **fast})
        tree["synthesis"]["images_per_teacher"] = images
        return MergeConfig.model_validate(tree).with_absolute_paths()

    fingerprint.record_fast(cfg(), merged, out)
    (fingerprint.fast_state_path(cfg(), out) / "checkpoint_000001").mkdir(parents=True)
    fingerprint.check_fast_resume(cfg(), merged, out)
    with pytest.raises(StaleStateError, match=r"fast\.rollout_step_counts: \[4\] -> \[2\]"):
        fingerprint.check_fast_resume(cfg(num_inference_steps=2), merged, out)
    with pytest.raises(StaleStateError, match="merged_images_per_style: 4 -> 8"):
        fingerprint.check_fast_resume(cfg(images=8), merged, out)
    pinned = {"rollout_sampler_steps": [2], "synthetic_images": 4}  # set, they decide: the others change nothing
    fingerprint.record_fast(cfg(**pinned), merged, out)
    fingerprint.check_fast_resume(cfg(images=8, num_inference_steps=2, **pinned), merged, out)
    fingerprint.record_fast(cfg(), merged, out)
    record = json.loads((out / fingerprint.RECORD).read_text())  # as the code before these keys wrote it
    for key in ("fast.rollout_step_counts", "merged_images_per_style"):
        del record["fast"][key]
    (out / fingerprint.RECORD).write_text(json.dumps(record))
    fingerprint.check_fast_resume(cfg(), merged, out)


def test_a_second_few_step_job_on_the_same_folder_refuses(merged_world, tmp_path):
    """Two few-step jobs in one folder would train into the same state and save over each other: the
    second refuses before anything (no Ray, no data), naming the first; a job that ends, even refused
    for another reason, leaves no lock behind."""
    from merge_fixtures import tiny_merge_config

    from dmm_ray import output_lock
    from dmm_ray.config import MergeConfig
    from dmm_ray.fast.job import FAST_LOCK, run_fast
    from dmm_ray.fingerprint import StaleStateError, fast_state_path, record_fast

    world, merged = merged_world
    out = tmp_path / "fast"
    cfg = MergeConfig.model_validate(tiny_merge_config(world, tmp_path / "run", fast={"output_dir": str(out)})).with_absolute_paths()
    owner = output_lock.acquire(out, name=FAST_LOCK, job="few-step job")  # a few-step job in progress (this live process)
    with pytest.raises(output_lock.OutputDirBusyError, match=rf"the few-step folder {out} is in use by another few-step job .*--output-dir NEW_DIR"):
        run_fast(cfg, merged)
    output_lock.release(out, owner, name=FAST_LOCK)
    record_fast(cfg, merged, out)  # state made with other settings: refused after the lock is taken ...
    (fast_state_path(cfg, out) / "checkpoint_000001").mkdir(parents=True)
    (fast_state_path(cfg, out) / "checkpoint_000001" / "trainable.pt").write_bytes(b"x")
    stale = MergeConfig.model_validate(tiny_merge_config(world, tmp_path / "run", fast={"output_dir": str(out), "lr": 1e-3})).with_absolute_paths()
    with pytest.raises(StaleStateError, match="fast.lr"):
        run_fast(stale, merged)
    assert not (out / FAST_LOCK).exists()  # ... and the lock went with it


def test_a_few_step_model_parked_by_a_save_killed_between_its_renames_is_put_back_by_the_next_job(fast_model, merged_world, tmp_path):
    """Finding: a few-step save killed between its two renames left the last good model only as fast/model.old
    (and its half of the new one as model.tmp); the next jobs/fast.py on the folder never put it back, as the
    merge does for merged/ (recover_merged): fast/model stayed missing, also when that job was refused or failed."""
    import shutil

    from merge_fixtures import tiny_merge_config

    from dmm_ray.config import MergeConfig
    from dmm_ray.fast.job import run_fast
    from dmm_ray.fingerprint import StaleStateError, fast_state_path, record_fast

    path, merged = fast_model
    world, _ = merged_world
    out = tmp_path / "fast"
    cfg = MergeConfig.model_validate(tiny_merge_config(world, tmp_path / "run", fast={"output_dir": str(out)})).with_absolute_paths()
    shutil.copytree(path, out / "model.old")  # what the kill left: the previous model parked, the new one staged
    shutil.copytree(path, out / "model.tmp")
    before = _digest(out / "model.old")
    record_fast(cfg, merged, out)  # state made with other settings: this job is refused after it takes the folder
    (fast_state_path(cfg, out) / "checkpoint_000001").mkdir(parents=True)
    (fast_state_path(cfg, out) / "checkpoint_000001" / "trainable.pt").write_bytes(b"x")
    stale = MergeConfig.model_validate(tiny_merge_config(world, tmp_path / "run", fast={"output_dir": str(out), "lr": 1e-3})).with_absolute_paths()
    with pytest.raises(StaleStateError, match="fast.lr"):
        run_fast(stale, merged)
    assert not (out / "model.old").exists() and not (out / "model.tmp").exists()
    assert _digest(out / "model") == before and _load(out / "model").styles == ["style0", "style1"]


def test_a_few_step_job_whose_store_fails_after_the_save_keeps_its_model_and_says_so(merged_world, tmp_path, monkeypatch):
    """MLflow is an observer: a store that starts failing while the few-step model trains (its sqlite file
    broken here; a server gone down) failed the job when it logged and registered the saved model. Now the
    model stays, one warning names it, the store and what to do, result.tracking_failed says so (the job
    exits 3), and no completion record is written: the same command logs it once the store answers."""
    import contextlib
    from types import SimpleNamespace

    from merge_fixtures import tiny_merge_config

    import dmm_ray.data.stream
    import dmm_ray.distill.trainer
    from dmm_ray.config import MergeConfig
    from dmm_ray.fast import job as fast_job
    from dmm_ray.tracking import make_tracker

    world, merged = merged_world
    db = tmp_path / "mlflow.db"
    out = tmp_path / "fast"
    monkeypatch.setattr(fast_job, "init_for_training", lambda address: False)  # no Ray, no data, no training: the job around them
    monkeypatch.setattr(fast_job, "ensure_latents", lambda cfg, job, plan=None: None)
    monkeypatch.setattr(dmm_ray.data.stream, "build_latent_dataset", lambda *a, **k: None)
    monkeypatch.setattr(fast_job, "build_fast_trainer", lambda *a, **k: None)

    def fit_stage(trainer):
        db.write_bytes(b"not an sqlite database" * 1000)  # the store fails from here on
        return SimpleNamespace(
            metrics={"step": 2, "loss_lcm": 0.5}, checkpoint=SimpleNamespace(as_directory=lambda: contextlib.nullcontext(str(tmp_path)))
        )

    def save(cfg, model_dir, checkpoint_dir, dest, tracking=None, **run_record):
        shutil.copytree(model_dir, dest)
        return dest

    monkeypatch.setattr(dmm_ray.distill.trainer, "fit_stage", fit_stage)
    monkeypatch.setattr(fast_job, "save_fast_model", save)
    said: list[str] = []
    monkeypatch.setattr(fast_job, "say", lambda who, msg: said.append(msg))
    tree = tiny_merge_config(world, tmp_path / "run", fast={"output_dir": str(out)}, tracking={"tracking_uri": f"sqlite:///{db}"})
    cfg = MergeConfig.model_validate(tree).with_absolute_paths()
    result = fast_job.run_fast(cfg, merged, tracker=make_tracker(cfg), evaluate=False)
    assert (out / "model" / "model_index.json").exists() and result.model_uri is None
    warning = [line for line in said if line.startswith("warning:")]
    assert len(warning) == 1 and result.tracking_failed in warning[0]
    assert str(out / "model") in warning[0] and f"sqlite:///{db}" in warning[0] and "file is not a database" in warning[0]
    assert "re-run the same command" in warning[0]
    assert not (out / fast_job.COMPLETE_RECORD).exists()  # not complete: the same command logs it
    import mlflow

    assert mlflow.active_run() is None  # its runs are off MLflow's stack: nothing tries the failed store again at exit
    # a merge's few-step stage after the MERGE's store failed runs with no tracker (untracked: why): it is not recorded
    # complete either, so the re-run that logs the merged model logs this one (recorded, it was never registered)
    other = tmp_path / "fast_untracked"
    cfg = MergeConfig.model_validate({**tree, "fast": {**tree.get("fast", {}), "output_dir": str(other)}}).with_absolute_paths()
    result = fast_job.run_fast(cfg, merged, tracker=None, evaluate=False, untracked="the merge's store failed")
    assert (other / "model" / "model_index.json").exists() and result.tracking_failed == "the merge's store failed"
    assert not (other / fast_job.COMPLETE_RECORD).exists()


def test_a_few_step_job_closes_only_the_dead_runs_of_its_own_folder(merged_world, tmp_path, monkeypatch):
    """Two few-step jobs from one config into two folders (README: --output-dir /tmp/fast and
    /tmp/lcm_only) each hold their own folder's fast.lock only: the second job's start leaves the
    first, live job's MLflow run RUNNING; a run of its own folder left RUNNING (a job that died) it
    marks KILLED."""
    from merge_fixtures import tiny_merge_config
    from mlflow import MlflowClient

    import dmm_ray.data.stream
    from dmm_ray.config import MergeConfig
    from dmm_ray.fast import job as fast_job
    from dmm_ray.tracking import OUTPUT_TAG, make_tracker

    class Training(Exception):
        pass

    def training(*args, **kwargs):
        raise Training

    world, merged = merged_world
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    monkeypatch.setattr(fast_job, "init_for_training", lambda address: False)  # no Ray, no data: the job up to its training
    monkeypatch.setattr(fast_job, "ensure_latents", lambda cfg, job, plan=None: None)
    monkeypatch.setattr(dmm_ray.data.stream, "build_latent_dataset", training)

    def job(folder: str) -> str:
        """A few-step job into `folder` until its training starts; its run then RUNNING, as a live job's is."""
        tree = tiny_merge_config(world, tmp_path / "run", fast={"output_dir": str(tmp_path / folder)}, tracking={"tracking_uri": uri})
        tracker = make_tracker(MergeConfig.model_validate(tree).with_absolute_paths())
        with pytest.raises(Training):
            fast_job.run_fast(MergeConfig.model_validate(tree).with_absolute_paths(), merged, tracker=tracker, evaluate=False)
        client.update_run(tracker.stage_run_id, status="RUNNING")
        return tracker.stage_run_id

    live, dead = job("fast_a"), job("fast_b")
    assert client.get_run(live).info.status == "RUNNING"  # job B's start left job A's run alone
    assert client.get_run(live).data.tags[OUTPUT_TAG] == str(tmp_path / "fast_a")
    job("fast_b")
    assert client.get_run(dead).info.status == "KILLED" and client.get_run(live).info.status == "RUNNING"


def test_fast_job_checks_its_evaluation_before_training(merged_world, tmp_path, capsys, monkeypatch):
    """jobs/fast.py evaluates at fast.eval_steps after training: missing prompts are refused first
    (exit 2, naming the key), and --no-eval skips the check. The refusal offers --no-eval, not
    evaluation.enabled: false, which this job does not read (finding: following that advice gave the
    same refusal)."""
    import yaml
    from merge_fixtures import tiny_merge_config

    from dmm_ray.fast import job as fast_job
    from jobs import fast as job

    world, merged = merged_world
    config = tmp_path / "fast.yaml"
    config.write_text(yaml.safe_dump({**tiny_merge_config(world, tmp_path / "run"), "evaluation": {"enabled": True}}))
    args = ["--model", str(merged), "--config", str(config), "--no-track", "--output-dir", str(tmp_path / "fast")]
    assert job.main(args) == 2
    err = capsys.readouterr().err
    assert "evaluation: no evaluation prompts" in err and "or pass --no-eval (or set fast.eval_steps: [])" in err, err
    assert "evaluation.enabled" not in err
    assert job.main(args + ["--set", "evaluation.enabled=false"]) == 2  # not this job's switch
    assert "or pass --no-eval" in capsys.readouterr().err
    extractor = ["--set", "evaluation.prompts=[a cat]", "--set", "evaluation.extractor={kind: import, path: 'no_such_pkg.feats:make'}"]
    assert job.main(args + extractor) == 2  # the feature extractor's refusal offers the same way out
    err = capsys.readouterr().err
    assert "no module 'no_such_pkg.feats' on this Python's path; install it, or pass --no-eval (or set fast.eval_steps: [])" in err, err
    assert not (tmp_path / "fast").exists()

    class Reached(Exception):
        pass

    def training(*a, **k):
        raise Reached(k)

    monkeypatch.setattr(fast_job, "run_fast", training)
    with pytest.raises(Reached, match="'evaluate': False"):
        job.main(args + ["--no-eval"])


def test_fast_job_dry_run_prints_the_memory_plan_and_a_worker_that_does_not_fit_is_refused_before_ray(merged_world, tmp_path, capsys, monkeypatch):
    """jobs/fast.py --dry-run checks what the job checks before Ray and prints the few-step worker's memory
    plan, counted from the model folder (its StyleUNet's parameters; the LCM-LoRA's as PEFT makes it); a
    worker that does not fit scaling.gpu_memory_gb is refused by --dry-run and by the job, before Ray starts,
    naming the numbers."""
    import yaml
    from merge_fixtures import tiny_merge_config

    from dmm_ray.config import MergeConfig
    from dmm_ray.fast.loop import build_student
    from dmm_ray.memory_plan import fast_worker
    from jobs import fast as job

    world, merged = merged_world
    config = tmp_path / "fast.yaml"
    config.write_text(yaml.safe_dump(tiny_merge_config(world, tmp_path / "run", fast={"lora_rank": 4})))
    args = ["--model", str(merged), "--config", str(config), "--no-track", "--no-eval", "--output-dir", str(tmp_path / "fast")]
    assert job.main(args + ["--dry-run"]) == 0
    out = capsys.readouterr().out
    params = sum(p.numel() for p in StyleUNet.from_pretrained(merged / "unet").parameters())
    assert "memory plan of the few-step stage (per worker; fast.num_workers = 1" in out and "OK: 2 styles, 1 worker(s)" in out
    assert f"the merged model: {params / 1e6:.1f}M parameters" in out and "teacher: the merged model (fp32, frozen)" in out
    assert not (tmp_path / "fast").exists()  # nothing started, nothing written
    cfg = MergeConfig.model_validate(tiny_merge_config(world, tmp_path / "run", fast={"lora_rank": 4}))
    layout = fast_worker(cfg, merged).layout
    _, lora = build_student(merged, cfg.fast)
    assert layout.model_params == params and layout.lora_params == sum(p.numel() for p in lora)

    small = ["--set", "scaling.gpu_memory_gb=0.5", "--set", "scaling.use_gpu=true"]
    for err in _refused_by_dry_run_and_before_ray(monkeypatch, capsys, args + small):
        assert "the fast stage does not fit: each of its fast.num_workers = 1 worker(s) needs" in err, err
        assert "but scaling.gpu_memory_gb is 0.5 GiB" in err and "CUDA context" in err


def test_fast_job_blames_a_bad_set_not_its_output_dir_flag(merged_world, tmp_path, capsys, monkeypatch):
    """Finding: --output-dir was applied as the last --set, so `--set fast=lora --output-dir X` (meant:
    fast.mode=lora) was refused as `--set fast.output_dir: fast is not a section`, naming a key the user
    never gave. The user's own override is named; --output-dir still wins over --set fast.output_dir."""
    import yaml
    from merge_fixtures import tiny_merge_config

    from dmm_ray.fast import job as fast_job
    from jobs import fast as job

    world, merged = merged_world
    config = tmp_path / "fast.yaml"
    config.write_text(yaml.safe_dump(tiny_merge_config(world, tmp_path / "run")))
    args = ["--model", str(merged), "--config", str(config), "--no-track", "--no-eval", "--output-dir", str(tmp_path / "fast"), "--dry-run"]
    assert job.main(args + ["--set", "fast=lora"]) == 2
    err = capsys.readouterr().err
    assert "fast: Input should be a valid dictionary or instance of FastConfig (got 'lora')" in err, err
    assert "fast.output_dir" not in err, err
    seen, real = [], fast_job.check_before_ray
    monkeypatch.setattr(fast_job, "check_before_ray", lambda cfg, model: seen.append(cfg.fast.output_dir) or real(cfg, model))
    assert job.main(args + ["--set", f"fast.output_dir={tmp_path / 'other'}"]) == 0
    assert seen == [str(tmp_path / "fast")]


def test_fast_job_output_dir_expands_home_as_every_path(merged_world, tmp_path, monkeypatch):
    """Finding: --output-dir was made absolute with Path.resolve(), so `--output-dir=~/fast` (no shell
    expansion after '=') wrote to a folder named `~` in the current directory, and `$DMM_HOME/../x`
    lost its first part; --set fast.output_dir and config files expand both (dmm_ray.paths.resolve).
    A relative --output-dir is still taken against the current directory."""
    import yaml
    from merge_fixtures import tiny_merge_config

    from dmm_ray.fast import job as fast_job
    from jobs import fast as job

    world, merged = merged_world
    config = tmp_path / "fast.yaml"
    config.write_text(yaml.safe_dump(tiny_merge_config(world, tmp_path / "run")))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("DMM_HOME", str(tmp_path / "dmm" / "home"))
    monkeypatch.chdir(tmp_path)
    seen, real = [], fast_job.check_before_ray
    monkeypatch.setattr(fast_job, "check_before_ray", lambda cfg, model: seen.append(cfg.fast.output_dir) or real(cfg, model))
    for given in ("~/fast", "$DMM_HOME/../fast2", "rel/fast"):
        assert job.main(["--model", str(merged), "--config", str(config), "--no-track", "--no-eval", f"--output-dir={given}", "--dry-run"]) == 0
    assert seen == [str(tmp_path / "home" / "fast"), str(tmp_path / "dmm" / "fast2"), str(tmp_path / "rel" / "fast")]


def test_fast_job_warns_when_its_model_would_land_in_rays_temporary_copy(merged_world, tmp_path, monkeypatch, capsys):
    """Finding: under `ray job submit --working-dir`, a relative --output-dir lies in Ray's temporary copy
    of the working dir, deleted with the job's session (the few-step model with it), and jobs/fast.py said
    nothing, where jobs/merge.py's printed locations warn about such an output_dir."""
    import yaml
    from merge_fixtures import tiny_merge_config

    from jobs import fast as job

    world, merged = merged_world
    config = tmp_path / "fast.yaml"
    config.write_text(yaml.safe_dump(tiny_merge_config(world, tmp_path / "run")))
    pkg = tmp_path / "session_1" / "runtime_resources" / "working_dir_files" / "_ray_pkg_abc"
    pkg.mkdir(parents=True)
    monkeypatch.chdir(pkg)
    args = ["--model", str(merged), "--config", str(config), "--no-track", "--no-eval", "--dry-run"]
    assert job.main(args + ["--output-dir", str(tmp_path / "fast")]) == 0
    assert "WARNING" not in capsys.readouterr().out
    assert job.main(args + ["--output-dir", "fastout"]) == 0
    assert f"WARNING: fast model lie(s) in Ray's temporary working dir {pkg}" in capsys.readouterr().out


def test_fast_job_model_and_config_expand_dmm_home_and_home(merged_world, tmp_path, monkeypatch):
    """Finding: --model and --config took a quoted `$DMM_HOME` or `~` literally ("no such folder"), though
    paths expand them everywhere else and --model's own error suggests `$DMM_HOME/outputs/dmm-toy/merged`."""
    import yaml
    from merge_fixtures import tiny_merge_config

    from jobs import fast as job

    world, merged = merged_world
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "fast.yaml").write_text(yaml.safe_dump(tiny_merge_config(world, tmp_path / "run")))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("DMM_HOME", str(merged.parent))
    args = ["--model", "$DMM_HOME/merged", "--config", "~/fast.yaml", "--no-track", "--no-eval", "--output-dir", str(tmp_path / "fast"), "--dry-run"]
    assert job.main(args) == 0


def test_a_few_step_folder_given_as_a_uri_is_refused(merged_world, tmp_path, monkeypatch, capsys):
    """Finding: fast.output_dir (or --output-dir) s3://bucket/fast passed --dry-run, and the run made a
    local folder named `s3:` in the current directory (the few-step stage, a merge's too, writes local
    folders only). It is refused as the other local-only settings are, naming the flag or the key."""
    import yaml
    from merge_fixtures import tiny_merge_config

    from dmm_ray.config import MergeConfig
    from jobs import fast as job

    world, merged = merged_world
    config = tmp_path / "fast.yaml"
    config.write_text(yaml.safe_dump(tiny_merge_config(world, tmp_path / "run")))
    monkeypatch.chdir(tmp_path)
    args = ["--model", str(merged), "--config", str(config), "--no-track", "--no-eval", "--dry-run"]
    with pytest.raises(SystemExit) as exit:
        job.main(args + ["--output-dir", "s3://bucket/fast"])
    assert exit.value.code == 2
    assert "--output-dir 's3://bucket/fast' is a URI, but --output-dir must be a local folder" in capsys.readouterr().err
    assert job.main(args + ["--set", "fast.output_dir=s3://bucket/fast"]) == 2
    assert "fast.output_dir 's3://bucket/fast' is a URI, but fast.output_dir must be a local folder" in capsys.readouterr().err
    with pytest.raises(ValueError, match="fast.output_dir .gs://bucket/fast. is a URI"):  # a merge's few-step stage (load_config: a ConfigError)
        MergeConfig.model_validate(tiny_merge_config(world, tmp_path / "run", fast={"enabled": True, "output_dir": "gs://bucket/fast"}))
    assert not (tmp_path / "s3:").exists()


def test_missing_synthesized_sets_are_refused_before_ray_and_by_the_dry_run(merged_world, tmp_path, capsys, monkeypatch):
    """Finding: fast.synthetic_fraction > 0 (from the teachers' sets) on a model with no merge's synthesized
    sets beside it passed --dry-run, and the run said so only after Ray had started and the latents were
    checked (or encoded). check_before_ray, which both call, refuses it first."""
    import yaml
    from merge_fixtures import tiny_merge_config

    from jobs import fast as job

    world, merged = merged_world
    config = tmp_path / "fast.yaml"
    config.write_text(yaml.safe_dump(tiny_merge_config(world, tmp_path / "run", fast={"synthetic_fraction": 0.5})))

    args = ["--model", str(merged), "--config", str(config), "--no-track", "--no-eval", "--output-dir", str(tmp_path / "fast")]
    for err in _refused_by_dry_run_and_before_ray(monkeypatch, capsys, args):
        assert f"fast.synthetic_fraction=0.5 needs the merge's synthesized sets, but {merged.parent / 'synthesized'} has no style_<i>/" in err, err
    synthesized = _synthesized_sets(tmp_path / "synthesized", styles=2, rows=4)
    assert job.main(args + ["--dry-run", "--set", f"fast.synthesized={synthesized}"]) == 0
    assert job.main(args + ["--dry-run", "--set", "fast.synthetic_source=merged"]) == 0  # sampled by the stage itself


def test_a_few_step_job_on_a_merge_into_a_uri_reads_the_synthesized_sets_where_the_merges_stage_does(merged_world, tmp_path, capsys, monkeypatch):
    """Finding: jobs/fast.py --config <a merge config whose output_dir is a URI> with fast.synthetic_fraction > 0 looked
    for the merge's synthesized sets beside the merged model it distills, the staging folder's merged/, found none and
    was refused (set fast.synthesized), while the merge's own few-step stage reads them at <output_dir URI>/synthesized,
    where the merge writes them. Both read them there now (dmm_ray.output_folders.fast_synthesized)."""
    import shutil

    import yaml
    from merge_fixtures import tiny_merge_config

    from dmm_ray import merge
    from dmm_ray.config import MergeConfig
    from dmm_ray.data import fs as fsu
    from dmm_ray.fast import job as fast_job
    from dmm_ray.paths import staging_dir
    from jobs import fast as job

    monkeypatch.setenv("DMM_HOME", str(tmp_path / "home"))
    world, merged = merged_world
    uri = f"file://{tmp_path}/remote_out"
    staged = staging_dir(uri) / "merged"  # where the merge into the URI keeps its merged model (--model takes no URI)
    shutil.copytree(merged, staged)
    _synthesized_sets(tmp_path / "remote_out" / "synthesized", styles=2, rows=4)  # what its synthesis wrote at the URI
    config = tmp_path / "fast.yaml"
    config.write_text(yaml.safe_dump(tiny_merge_config(world, uri, fast={"synthetic_fraction": 0.5})))
    args = ["--model", str(staged), "--config", str(config), "--no-track", "--no-eval"]
    assert job.main(args + ["--dry-run"]) == 0, capsys.readouterr().err  # was: refused, no style_<i>/ in the staging folder
    ran = []
    monkeypatch.setattr(fast_job, "run_fast", lambda cfg, model, **kw: ran.append(cfg) or fast_job.FastResult(model_path=tmp_path / "fast"))
    assert job.main(args) == 0  # the run's config, as it reaches run_fast
    cfg = MergeConfig.model_validate(tiny_merge_config(world, uri, fast={"synthetic_fraction": 0.5})).with_absolute_paths()
    stage = merge.fast_stage_config(cfg, merge.output_location(cfg)[0])  # the merge's own few-step stage's
    assert ran[0].fast.synthesized == stage.fast.synthesized == fsu.location_join(uri, "synthesized")
    assert fast_job.synthesized_shards(ran[0], staged) == [f"{uri}/synthesized/style_0", f"{uri}/synthesized/style_1"]


def test_missing_synthesized_sets_of_the_configs_own_merge_are_not_told_to_be_set_to_themselves(merged_world, tmp_path):
    """Finding: where the few-step stage looked in the config's own <output_dir>/synthesized (an output_dir URI's, its
    default; a local merge's model beside them) and found no sets, the refusal advised 'set fast.synthesized to the
    merge's <output_dir>/synthesized': the folder it had just looked in. It says that merge wrote none now; another
    folder is refused with that advice as before."""
    from merge_fixtures import tiny_merge_config

    from dmm_ray.config import MergeConfig
    from dmm_ray.fast.job import synthesized_shards

    world, merged = merged_world
    uri = f"file://{tmp_path}/remote_out"
    for output_dir, synthesized, model in (
        (uri, f"{uri}/synthesized", merged),
        (str(tmp_path / "out"), None, tmp_path / "out" / "merged"),
    ):
        fast = {"synthetic_fraction": 0.5, "synthesized": synthesized}
        cfg = MergeConfig.model_validate(tiny_merge_config(world, output_dir, fast=fast)).with_absolute_paths()
        with pytest.raises(FileNotFoundError) as refused:
            synthesized_shards(cfg, model)
        assert f"no style_<i>/ folders: the merge into output_dir {output_dir} wrote none (a merge with" in str(refused.value), refused.value
        assert "set fast.synthesized to the sets of the merge that made the model, or fast.synthetic_fraction=0" in str(refused.value)
    cfg = MergeConfig.model_validate(tiny_merge_config(world, uri, fast={"synthetic_fraction": 0.5, "synthesized": str(tmp_path / "x")}))
    with pytest.raises(FileNotFoundError, match="no style_<i>/ folders: set fast.synthesized to the merge's <output_dir>/synthesized"):
        synthesized_shards(cfg.with_absolute_paths(), merged)


def test_a_few_step_job_refused_by_a_running_merge_into_a_uri_names_its_staging_folder_not_an_output_dir(merged_world, tmp_path, capsys, monkeypatch):
    """Finding: jobs/fast.py --model <the staging folder's merged/> of a merge into an output_dir URI, while that merge
    ran (its merge.lock in the staging folder), was refused as 'the merged model of output_dir <staging folder>': an
    output_dir no config names (the merge's is the URI). It names the merge into an output_dir URI and its staging
    folder now; a local output_dir is named as before."""
    import shutil

    from merge_fixtures import hold_in_another_process

    from dmm_ray import output_lock
    from dmm_ray.paths import staging_dir
    from jobs import fast as job

    world, merged = merged_world
    monkeypatch.setenv("DMM_HOME", str(tmp_path / "home"))
    staging = staging_dir(f"file://{tmp_path}/remote_out")
    local = tmp_path / "out"
    for folder in (staging, local):
        shutil.copytree(merged, folder / "merged")
    proc = hold_in_another_process(staging)  # the merge, in its staging folder
    try:
        assert job.main(["--model", str(staging / "merged"), "--dry-run"]) == 2
        err = capsys.readouterr().err
        assert (
            f"is the merged model of a merge into an output_dir URI (its local staging folder {staging}), whose merge.lock a running merge"
        ) in err, err
    finally:
        proc.kill()
        proc.wait()
    proc = hold_in_another_process(local)
    try:
        with pytest.raises(output_lock.OutputDirBusyError, match=f"is the merged model of output_dir {local}, whose merge.lock"):
            output_lock.check_not_being_replaced(local / "merged")
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.parametrize("content", [None, "\n  \n"], ids=["missing", "empty"])
@pytest.mark.parametrize(
    "samples", [["fast.synthetic_fraction=0.5", "fast.synthetic_source=merged"], ["fast.rollout_steps=2"]], ids=["merged", "rollout"]
)
def test_a_synthesis_prompt_file_that_gives_no_prompts_is_refused_before_the_merged_model_is_sampled(
    merged_world, tmp_path, capsys, monkeypatch, content, samples
):
    """fast.synthetic_source merged and the rollout pairs sample the merged model with synthesis.prompts: a
    file that is not there (or holds no prompt) passed --dry-run, and the run said so only after Ray had
    started, the latents were checked and the stage's MLflow run had begun. check_before_ray refuses it first."""
    import yaml
    from merge_fixtures import tiny_merge_config

    from jobs import fast as job

    world, merged = merged_world
    prompts = tmp_path / "synthesis_prompts.txt"
    if content is not None:
        prompts.write_text(content)
    config = tmp_path / "fast.yaml"
    config.write_text(yaml.safe_dump(tiny_merge_config(world, tmp_path / "run", synthesis={"prompts": str(prompts)})))
    args = ["--model", str(merged), "--config", str(config), "--no-track", "--no-eval", "--output-dir", str(tmp_path / "fast")]
    args += [a for s in samples for a in ("--set", s)]
    says = f"synthesis.prompts: prompt file '{prompts}' " + ("does not exist" if content is None else "holds no prompts")
    for err in _refused_by_dry_run_and_before_ray(monkeypatch, capsys, args):
        assert says in err, err
    assert not (tmp_path / "fast" / "synthesized").exists()
    prompts.write_text("a red circle\n")
    assert job.main(args + ["--dry-run"]) == 0


def test_too_few_merged_model_samples_for_one_batch_are_refused_before_ray(merged_world, tmp_path, capsys, monkeypatch):
    """fast.synthetic_source merged with fewer merged-model samples (fast.synthetic_images x styles) than the
    synthesized rows of one batch passed --dry-run: the stage sampled the merged model, then every worker
    stopped in cached_stream ('synthesized samples has 2 rows, fewer than a batch of 4'). Refused before Ray."""
    import yaml
    from merge_fixtures import tiny_merge_config

    from jobs import fast as job

    world, merged = merged_world
    config = tmp_path / "fast.yaml"
    fast = {"synthetic_fraction": 0.5, "synthetic_source": "merged", "synthetic_images": 1, "batch_size": 8}
    config.write_text(yaml.safe_dump(tiny_merge_config(world, tmp_path / "run", fast=fast)))
    args = ["--model", str(merged), "--config", str(config), "--no-track", "--no-eval", "--output-dir", str(tmp_path / "fast")]
    for err in _refused_by_dry_run_and_before_ray(monkeypatch, capsys, args):
        assert "samples 1 images x 2 styles = 2 rows (fast.synthetic_images), fewer than the 4 synthesized rows one batch takes" in err, err
        assert "sample at least 2 per style" in err
    assert job.main(args + ["--dry-run", "--set", "fast.synthetic_images=2"]) == 0


def test_merge_synthesized_sets_too_small_for_one_batch_are_refused_before_ray(merged_world, tmp_path, capsys, monkeypatch):
    """fast.synthetic_source teachers with a merge's synthesized sets holding fewer rows than the synthesized rows
    of one batch passed --dry-run; every worker then stopped in cached_stream after Ray had started."""
    import yaml
    from merge_fixtures import tiny_merge_config

    from jobs import fast as job

    world, merged = merged_world
    synthesized = _synthesized_sets(tmp_path / "synthesized", styles=2, rows=4)
    config = tmp_path / "fast.yaml"
    fast = {"synthetic_fraction": 0.5, "synthesized": str(synthesized), "batch_size": 32}
    config.write_text(yaml.safe_dump(tiny_merge_config(world, tmp_path / "run", fast=fast)))
    args = ["--model", str(merged), "--config", str(config), "--no-track", "--no-eval", "--output-dir", str(tmp_path / "fast")]
    for err in _refused_by_dry_run_and_before_ray(monkeypatch, capsys, args):
        assert f"the merge's synthesized sets ({synthesized}) hold 8 rows in 2 styles, fewer than the 16 synthesized rows one batch takes" in err, err
    assert job.main(args + ["--dry-run", "--set", "fast.batch_size=16"]) == 0


def test_synthesized_sets_of_more_styles_than_the_model_are_refused_before_ray(merged_world, tmp_path, capsys, monkeypatch):
    """fast.synthesized of another merge, with more styles than the merged model, passed --dry-run; every worker
    then stopped in synthesized_rows with a RuntimeError that Ray Train retried. Refused before Ray."""
    import yaml
    from merge_fixtures import tiny_merge_config

    from jobs import fast as job

    world, merged = merged_world
    synthesized = _synthesized_sets(tmp_path / "synthesized", styles=3, rows=4)
    config = tmp_path / "fast.yaml"
    config.write_text(yaml.safe_dump(tiny_merge_config(world, tmp_path / "run", fast={"synthetic_fraction": 0.5, "synthesized": str(synthesized)})))
    args = ["--model", str(merged), "--config", str(config), "--no-track", "--no-eval", "--output-dir", str(tmp_path / "fast")]
    for err in _refused_by_dry_run_and_before_ray(monkeypatch, capsys, args):
        assert f"the synthesized sets {synthesized} hold style_2, outside the merged model's 2 styles" in err, err
    shutil.rmtree(synthesized / "style_2")
    assert job.main(args + ["--dry-run"]) == 0


def test_a_few_step_folder_holding_a_merges_synthesized_sets_is_refused_when_the_stage_samples_the_merged_model(
    merged_world, tmp_path, capsys, monkeypatch
):
    """Finding: --output-dir the merge's output_dir (a folder README lets the two share) with fast.rollout_steps (the toy
    preset) or fast.synthetic_source merged: the stage samples the merged model into <folder>/synthesized, found the
    merge's teachers' sets there without its synthesized.json, said 'sampled from another model: sampling again' and
    deleted them; with synthetic_source teachers (whose default folder is that one) it then read the merged model's
    samples as the teachers'. Refused before Ray (and by --dry-run); its own earlier samples there are still reused."""
    import yaml
    from merge_fixtures import tiny_merge_config

    from dmm_ray.fast.job import MERGED_SYNTH_RECORD
    from jobs import fast as job

    world, merged = merged_world
    out = tmp_path / "merge_out"
    sets = _synthesized_sets(out / "synthesized", styles=2, rows=4)  # the merge's teachers' sets
    config = tmp_path / "fast.yaml"
    config.write_text(yaml.safe_dump(tiny_merge_config(world, tmp_path / "run", fast={"rollout_steps": 1, "num_ddim_timesteps": 8})))
    args = ["--model", str(merged), "--config", str(config), "--no-track", "--no-eval", "--output-dir", str(out)]
    for err in _refused_by_dry_run_and_before_ray(monkeypatch, capsys, args):
        assert f"samples the merged model into {sets} (fast.synthetic_source merged, fast.rollout_steps), which holds sets it did not sample" in err
    assert (sets / "style_0").is_dir() and (sets / "style_1").is_dir()  # nothing deleted
    assert job.main(args + ["--dry-run", "--set", "fast.rollout_steps=0"]) == 0  # the stage samples nothing
    (sets / MERGED_SYNTH_RECORD).write_text("{}")  # its own samples (of another model: sampled again, in its own folder)
    assert job.main(args + ["--dry-run"]) == 0


def test_fast_job_dry_run_checks_the_ray_address(merged_world, tmp_path, capsys, monkeypatch):
    """Finding: jobs/fast.py --dry-run said OK on a scaling.ray_address where no Ray answers, which the run
    refuses (ensure_ray's check_address) and jobs/merge.py --dry-run refuses too. Both say it now."""
    import yaml
    from merge_fixtures import tiny_merge_config

    from jobs import fast as job

    world, merged = merged_world
    config = tmp_path / "fast.yaml"
    config.write_text(yaml.safe_dump(tiny_merge_config(world, tmp_path / "run")))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    args = ["--model", str(merged), "--config", str(config), "--no-track", "--no-eval", "--output-dir", str(tmp_path / "fast"), "--dry-run"]
    assert job.main(args) == 0
    capsys.readouterr()
    assert job.main(args + ["--set", "scaling.ray_address=127.0.0.1:1"]) == 2
    assert "address '127.0.0.1:1' (--address, scaling.ray_address or $RAY_ADDRESS): no Ray cluster answers there" in capsys.readouterr().err


def test_latents_that_are_neither_there_nor_encodable_are_refused_before_ray(merged_world, tmp_path, capsys, monkeypatch):
    """Finding: data.shards with no latents and no data.source to encode them passed jobs/fast.py --dry-run,
    and the run said so only after Ray had started (ensure_latents). check_before_ray, which both call,
    checks them first, as the merge's validate_before_ray does (check_latents)."""
    import yaml
    from merge_fixtures import tiny_merge_config

    world, merged = merged_world
    tree = tiny_merge_config(world, tmp_path / "run")
    config = tmp_path / "fast.yaml"
    config.write_text(yaml.safe_dump({**tree, "data": {**tree["data"], "shards": str(tmp_path / "no_shards")}}))

    args = ["--model", str(merged), "--config", str(config), "--no-track", "--no-eval", "--output-dir", str(tmp_path / "fast")]
    for err in _refused_by_dry_run_and_before_ray(monkeypatch, capsys, args):
        assert f"data.shards {tmp_path / 'no_shards'} has no latents and data.source is not set to encode them" in err, err


def test_fast_job_dry_run_refuses_training_state_from_other_settings(merged_world, tmp_path, capsys):
    """Finding: --dry-run said OK on an output folder holding training state made with other settings,
    which the run itself refuses before Ray (fingerprint.check_fast_resume). The dry run refuses it the
    same way; with --restart (which discards that state) it passes, and removes nothing."""
    import yaml
    from merge_fixtures import tiny_merge_config

    from dmm_ray.config import MergeConfig
    from dmm_ray.fingerprint import fast_state_path, record_fast
    from jobs import fast as job

    world, merged = merged_world
    out = tmp_path / "fast"
    tree = tiny_merge_config(world, tmp_path / "run")
    config = tmp_path / "fast.yaml"
    config.write_text(yaml.safe_dump(tree))
    old = MergeConfig.model_validate({**tree, "fast": {"lr": 1e-3, "output_dir": str(out)}}).with_absolute_paths()
    record_fast(old, merged.resolve(), out)  # a run with fast.lr 0.001 left its checkpoints
    state = fast_state_path(old, out) / "checkpoint_000001"
    state.mkdir(parents=True)
    args = ["--model", str(merged), "--config", str(config), "--no-track", "--no-eval", "--output-dir", str(out), "--dry-run"]
    assert job.main(args) == 2
    err = capsys.readouterr().err
    assert f"{out} holds the training state of a few-step run from another model or with other settings" in err, err
    assert "fast.lr: 0.001 -> 0.0001" in err and "--restart" in err
    assert job.main(args + ["--restart"]) == 0
    assert job.main(args + ["--set", "fast.lr=0.001"]) == 0  # the same settings resume it
    assert state.is_dir()  # a dry run discards nothing


def test_rollout_is_the_pipelines_own_few_step_loop_and_noise(fast_model):
    """`rollout` (the rollout phase's differentiable chain) gives the latents the saved few-step pipeline
    returns from the same noise, style and caption; `initial_noise` is the noise the pipeline draws
    from one seeded generator per row (what synthesis uses)."""
    import copy

    from dmm_ray.fast.rollout import initial_noise, rollout

    path, _ = fast_model
    pipe = _load(path)
    side = 32 // pipe.vae_scale_factor
    prompts, styles = ["a red circle", "a blue star"], ["style0", "style1"]
    noise = initial_noise([5, 6], (pipe.unet.config.in_channels, side, side))  # (2, C, h, w)
    kw = dict(height=32, width=32, output_type="latent")
    own = pipe(prompts, style=styles, latents=noise.clone(), **kw).images
    drawn = pipe(prompts, style=styles, generator=[torch.Generator().manual_seed(s) for s in (5, 6)], **kw).images
    torch.testing.assert_close(drawn, own)
    with torch.no_grad():
        embeds = pipe.encode_prompt(prompts, "cpu", 1, False)[0]
        ours = rollout(pipe.unet, copy.deepcopy(pipe.scheduler), noise, embeds, torch.tensor([0, 1]), steps=4)
    torch.testing.assert_close(ours, own, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        swapped = rollout(pipe.unet, copy.deepcopy(pipe.scheduler), noise, embeds, torch.tensor([1, 0]), steps=4)
    assert not torch.allclose(swapped, own, atol=1e-4)  # the style ids reach every step


def test_rollout_backpropagates_through_every_sampler_step():
    """The endpoint loss reaches the UNet output of every step, not only the last (a detached chain
    would leave the earlier steps without gradient)."""
    from diffusers import TCDScheduler

    from dmm_ray.fast.rollout import rollout

    student = _student()
    outputs = []

    def keep(module, args, out):
        out.sample.retain_grad()
        outputs.append(out.sample)

    student.register_forward_hook(keep)
    scheduler = TCDScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, original_inference_steps=10)
    latents, cond, _ = _batch(2)
    x = rollout(student, scheduler, torch.randn_like(latents), cond[0], torch.tensor([0, 1]), steps=4)
    ((x - latents) ** 2).mean().backward()
    assert len(outputs) == 4
    assert all(o.grad is not None and o.grad.abs().sum() > 0 for o in outputs)
    assert all(p.grad is not None for p in student.parameters() if p.requires_grad and p is not student.class_embedding.codebook.weight)


def test_rollout_needs_the_deterministic_sampler_and_takes_its_step_counts_in_turn():
    from dmm_ray.fast.rollout import sampler_steps_at

    with pytest.raises(ValueError, match="fast.rollout_steps needs a deterministic sampler"):
        FastConfig(rollout_steps=10, sampler="lcm")
    for bad in ([], [0, 4]):
        with pytest.raises(ValueError, match="fast.rollout_sampler_steps"):
            FastConfig(rollout_sampler_steps=bad)
    assert [sampler_steps_at(FastConfig(rollout_sampler_steps=[2, 4]), s) for s in range(1200, 1204)] == [2, 4, 2, 4]
    assert {sampler_steps_at(FastConfig(num_inference_steps=3), s) for s in range(4)} == {3}  # default: the saved model's steps


@pytest.mark.ray
def test_rollout_phase_end_to_end_on_ray(ray_cluster, merged_world, tmp_path):
    """LCM steps, then rollout steps on the merged model's own samples (sampled by the stage first), on
    two DDP workers, checkpointed and saved; the pairs' noise, run through the merged model's sampler,
    gives back each pair's target (the seed of every row is recovered)."""
    import numpy as np
    from merge_fixtures import tiny_merge_config

    from dmm_ray.config import MergeConfig
    from dmm_ray.data.stream import build_latent_dataset
    from dmm_ray.defaults import PAPER_NEGATIVE_PROMPT
    from dmm_ray.distill.synthesis import synthesis_prompts
    from dmm_ray.fast.job import run_fast
    from dmm_ray.fast.loop import synthesized_rows
    from dmm_ray.fast.rollout import pair_rows
    from dmm_ray.pipeline import DMMPipeline, load_dmm_pipeline

    world, merged = merged_world
    fast = {"steps": 1, "rollout_steps": 2, "rollout_batch_size": 2, "synthetic_images": 2, "lora_rank": 4, "checkpoint_every": 1, "log_every": 1}
    fast["num_workers"] = 2  # DDP: the chain calls the wrapped student once per sampler step before one backward
    cfg = MergeConfig.model_validate(tiny_merge_config(world, tmp_path / "out", fast=fast, synthesis={"actors": 1, "cpus_per_actor": 0.5}, seed=3))
    result = run_fast(cfg, merged, evaluate=False)
    assert result.train_metrics["step"] == 3 and np.isfinite(result.train_metrics["loss_rollout"])
    assert "2 rollout steps" in json.loads((result.model_path / "fast.json").read_text())["method"]

    shards = sorted(str(p) for p in (tmp_path / "out" / "fast" / "synthesized").glob("style_*"))
    pairs = pair_rows(synthesized_rows(build_latent_dataset(cfg.data, shards=shards), num_styles=2, seed=0), cfg.seed)
    assert len(pairs["captions"]) == 4 and sorted(pairs["style"].tolist()) == [0, 0, 1, 1]
    pipe = load_dmm_pipeline(merged)
    pipe.scheduler = DMMPipeline.paper_scheduler(pipe.scheduler)
    s = cfg.synthesis
    for i in range(4):
        assert pairs["captions"][i] in synthesis_prompts(cfg)
        again = pipe(
            [pairs["captions"][i]],
            style=int(pairs["style"][i]),
            negative_prompt=[PAPER_NEGATIVE_PROMPT if s.negative_prompt is None else s.negative_prompt],
            num_inference_steps=s.num_inference_steps,
            guidance_scale=s.guidance_scale,
            height=32,
            width=32,
            latents=pairs["noise"][i : i + 1].clone(),
            output_type="latent",
        ).images
        torch.testing.assert_close(again[0], pairs["target"][i], rtol=1e-4, atol=1e-4)


@pytest.mark.ray
def test_a_run_stopped_inside_the_rollout_steps_resumes_to_the_weights_of_one_that_never_stopped(ray_cluster, merged_world, tmp_path):
    """1 LCM step + 3 rollout steps, checkpointed every step. A run stopped at step 3, two rollout steps in
    (run with rollout_steps 2: up to there it is the 4-step run, checkpoints included; the merge's resume
    test stops the same way), then run on its folder with rollout_steps 3 (Ray Train, not run_fast, whose
    fingerprint would refuse the other length) resumes from that checkpoint and ends with exactly the
    weights of an uninterrupted run, rollout AdamW state included: a fresh rollout optimizer would take
    another step (its moments and step count restart). One worker, so every run reads the same rows in
    the same order; the rollout pairs are stand-in sets (only their seeds matter here)."""
    from merge_fixtures import tiny_merge_config

    from dmm_ray.config import MergeConfig
    from dmm_ray.data.stream import build_latent_dataset
    from dmm_ray.distill.trainer import fit_stage
    from dmm_ray.fast.job import build_fast_trainer
    from dmm_ray.fast.loop import TRAINABLE

    world, merged = merged_world
    pairs = [str(p) for p in sorted(_synthesized_sets(tmp_path / "pairs", styles=2, rows=2).glob("style_*"))]

    def train(rollout_steps: int, folder: str):
        fast = {"steps": 1, "rollout_steps": rollout_steps, "rollout_sampler_steps": [2], "rollout_batch_size": 2, "batch_size": 2}
        fast.update(lora_rank=4, lr=1e-2, rollout_lr=1e-2, checkpoint_every=1, log_every=1, output_dir=str(tmp_path / folder))
        cfg = MergeConfig.model_validate(tiny_merge_config(world, tmp_path / "run", fast=fast))
        datasets = {"train": build_latent_dataset(cfg.data), "rollout": build_latent_dataset(cfg.data, shards=pairs)}
        result = fit_stage(build_fast_trainer(cfg, merged, datasets))
        with result.checkpoint.as_directory() as checkpoint:  # the run's last
            return result.metrics, torch.load(Path(checkpoint) / TRAINABLE, map_location="cpu", weights_only=False)

    whole_metrics, whole = train(3, "whole")
    stopped_metrics, stopped = train(2, "resumed")  # stopped after its second rollout step's checkpoint
    resumed_metrics, resumed = train(3, "resumed")  # the same folder, the full length: Ray Train restores step 3
    assert (whole_metrics["step"], whole_metrics["resumed_from"]) == (4, 0)
    assert (stopped_metrics["step"], stopped["step"]) == (3, 3) and stopped["rollout_opt"]["state"][0]["step"].item() == 2
    assert (resumed_metrics["step"], resumed_metrics["resumed_from"], resumed["step"]) == (4, 3, 4)
    assert resumed["student"].keys() == whole["student"].keys()
    assert any(not torch.equal(resumed["student"][k], stopped["student"][k]) for k in stopped["student"])  # the resumed step trained
    for key, value in whole["student"].items():
        assert torch.equal(resumed["student"][key], value), key
    # the rollout AdamW went on from its checkpointed moments (a fresh one would count 1 step, not 3)
    assert resumed["rollout_opt"]["state"][0]["step"].item() == whole["rollout_opt"]["state"][0]["step"].item() == 3
    for i, state in whole["rollout_opt"]["state"].items():
        for name, value in state.items():
            assert torch.equal(resumed["rollout_opt"]["state"][i][name], value), (i, name)
    assert torch.equal(resumed["opt"]["state"][0]["exp_avg"], stopped["opt"]["state"][0]["exp_avg"])  # the LCM optimizer rests


def test_merged_source_samples_again_when_the_prompt_file_is_edited(merged_world, tmp_path, monkeypatch):
    """<fast>/synthesized was kept while its record matched, and the record named the prompt file by path
    only: after an edit of that file the samples of the old prompts were trained on again."""
    from merge_fixtures import tiny_merge_config

    import dmm_ray.distill.synthesis as synthesis
    from dmm_ray.config import MergeConfig
    from dmm_ray.fast.job import merged_synthesized_sets

    world, merged = merged_world
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\na dog\n")
    fast = {"synthetic_fraction": 0.5, "synthetic_source": "merged", "synthetic_images": 2}
    cfg = MergeConfig.model_validate(tiny_merge_config(world, tmp_path / "out", fast=fast, synthesis={"prompts": str(prompts)}))

    def sample(cfg, specs, offset, folder, n):  # as synthesize: a style whose set is there is not sampled again
        for i in range(len(specs)):
            made = Path(folder) / f"style_{i}" / "prompts.txt"
            if not made.exists():
                made.parent.mkdir(parents=True)
                made.write_text(prompts.read_text())
        return {i: str(Path(folder) / f"style_{i}") for i in range(len(specs))}

    monkeypatch.setattr(synthesis, "synthesize_for", sample)
    made = tmp_path / "fast" / "synthesized" / "style_0" / "prompts.txt"
    merged_synthesized_sets(cfg, merged, ["style0", "style1"], tmp_path / "fast")
    merged_synthesized_sets(cfg, merged, ["style0", "style1"], tmp_path / "fast")
    assert made.read_text() == "a cat\na dog\n"  # the same prompts: kept
    prompts.write_text("a red car\na blue boat\n")
    merged_synthesized_sets(cfg, merged, ["style0", "style1"], tmp_path / "fast")
    assert made.read_text() == "a red car\na blue boat\n"


def test_a_torn_record_of_the_merged_model_samples_means_sampling_again_not_a_crash(merged_world, tmp_path, monkeypatch):
    """Finding: <fast>/synthesized/synthesized.json was written in place; one a write cut short (a full disk) left
    empty or torn stopped every later run with a bare JSONDecodeError. It is written whole (moved into place), and
    one that does not read is another model's samples: sampled again."""
    from merge_fixtures import tiny_merge_config

    import dmm_ray.distill.synthesis as synthesis
    from dmm_ray.config import MergeConfig
    from dmm_ray.fast.job import MERGED_SYNTH_RECORD, merged_synthesized_sets

    world, merged = merged_world
    fast = {"synthetic_fraction": 0.5, "synthetic_source": "merged", "synthetic_images": 2}
    cfg = MergeConfig.model_validate(tiny_merge_config(world, tmp_path / "out", fast=fast))
    folder = tmp_path / "fast" / "synthesized"
    (folder / "style_0").mkdir(parents=True)
    (folder / "style_0" / "rows").write_text("torn")  # samples of unknown origin beside the torn record
    (folder / MERGED_SYNTH_RECORD).write_text('{"model": ')
    sampled = []
    monkeypatch.setattr(
        synthesis, "synthesize_for", lambda cfg, specs, offset, out, n: sampled.append(sorted(p.name for p in Path(out).iterdir())) or {}
    )
    merged_synthesized_sets(cfg, merged, ["style0", "style1"], tmp_path / "fast")
    assert sampled == [[MERGED_SYNTH_RECORD]]  # the unknown samples went; the record is whole
    assert json.loads((folder / MERGED_SYNTH_RECORD).read_text())["styles"] == ["style0", "style1"]


def test_synthesized_shards_takes_only_the_style_folders_synthesis_names(merged_world, tmp_path):
    """A copy such as style_0.bak beside the sets failed int('0.bak') and stopped the few-step stage."""
    from merge_fixtures import tiny_merge_config

    from dmm_ray.config import MergeConfig
    from dmm_ray.fast.job import synthesized_shards

    world, merged = merged_world
    folder = _synthesized_sets(tmp_path / "synth", styles=2, rows=2)
    (folder / "style_0.bak").mkdir()
    cfg = MergeConfig.model_validate(tiny_merge_config(world, tmp_path / "out", fast={"synthetic_fraction": 0.25, "synthesized": str(folder)}))
    assert [Path(s).name for s in synthesized_shards(cfg, merged)] == ["style_0", "style_1"]


def _refused_by_dry_run_and_before_ray(monkeypatch, capsys, args):
    """jobs/fast.py with `args`, as a dry run and as a run whose Ray start fails the test: both must refuse
    (exit 2) before Ray, with the same checks. Yields each refusal's stderr for the caller's asserts."""
    from dmm_ray.fast import job as fast_job
    from jobs import fast as job

    def ray(*a, **k):
        raise AssertionError("Ray started: the check must refuse before it")

    monkeypatch.setattr(fast_job, "init_for_training", ray)
    for flags in (["--dry-run"], []):
        assert job.main(args + flags) == 2, flags
        yield capsys.readouterr().err


def test_fast_job_dry_run_says_what_the_run_would_find_in_its_folder(merged_world, tmp_path, capsys, monkeypatch):
    """Finding: `jobs/fast.py --dry-run` said OK on a folder whose few-step run had finished (the run: 'already
    complete ...; nothing to do') and on one whose fast.lock a running few-step job held (the run: refused,
    exit 2). The dry run now prints the run's own 'already complete' line, and refuses a held lock with the run's
    message, naming its owner and --output-dir."""
    import os

    import yaml
    from merge_fixtures import tiny_merge_config

    from dmm_ray import fingerprint, output_lock
    from dmm_ray.completion import record_finished
    from dmm_ray.fast import job as fast_job
    from jobs import fast as job

    world, merged = merged_world
    out = tmp_path / "fast"
    config = tmp_path / "fast.yaml"
    config.write_text(yaml.safe_dump(tiny_merge_config(world, tmp_path / "run")))
    args = ["--model", str(merged), "--config", str(config), "--no-track", "--no-eval", "--output-dir", str(out)]

    def finished_run(cfg, model_dir, tracker=None, evaluate=True, restart=False):  # what a finished run_fast leaves
        model_dir, folder = Path(model_dir).resolve(), fast_job.fast_dir(cfg).resolve()
        (folder / "model").mkdir(parents=True)
        (folder / "model" / "model_index.json").write_text("{}")
        (folder / "model" / "fast.json").write_text("{}")
        asked = {
            "config": cfg.model_dump(mode="json"),
            "model": str(model_dir),
            "inputs": fingerprint.fast_inputs(cfg, model_dir),
            "evaluate": evaluate,
        }
        record_finished(folder, fast_job.COMPLETE_RECORD, asked)
        return fast_job.FastResult(model_path=folder / "model")

    with monkeypatch.context() as patch:
        patch.setattr(fast_job, "run_fast", finished_run)
        assert job.main(args) == 0
    assert job.main(args) == 0 and "already complete" in "".join(capsys.readouterr())  # the run does nothing
    assert job.main(args + ["--dry-run"]) == 0
    assert f"already complete: this few-step stage, with this model and config, finished in {out.resolve()}" in capsys.readouterr().out
    assert job.main(args + ["--dry-run", "--restart"]) == 0  # the run would train again
    assert "already complete" not in capsys.readouterr().out
    owner = output_lock.acquire(out, name=fast_job.FAST_LOCK, job="few-step job")  # a few-step job in progress (this live process)
    try:
        assert job.main(args + ["--dry-run"]) == 2
        err = capsys.readouterr().err
        assert f"the few-step folder {out.resolve()} is in use by another few-step job" in err and f"pid {os.getpid()}" in err, err
        assert "--output-dir NEW_DIR" in err
    finally:
        output_lock.release(out, owner, name=fast_job.FAST_LOCK)


def test_fast_job_dry_run_says_it_would_put_back_the_model_a_killed_save_left(merged_world, tmp_path, capsys):
    """Finding: a save killed between its two renames leaves the last few-step model only as model.old (and may
    leave model.tmp); the run puts it back first, but `jobs/fast.py --dry-run` said nothing about it. The dry run
    now says what the run would restore and remove, and changes nothing."""
    import yaml
    from merge_fixtures import tiny_merge_config

    from jobs import fast as job

    world, merged = merged_world
    out = tmp_path / "fast"
    (out / "model.old").mkdir(parents=True)
    (out / "model.old" / "fast.json").write_text("{}")  # a few-step model, as the save parked it
    (out / "model.tmp").mkdir()
    config = tmp_path / "fast.yaml"
    config.write_text(yaml.safe_dump(tiny_merge_config(world, tmp_path / "run")))
    args = ["--model", str(merged), "--config", str(config), "--no-track", "--no-eval", "--output-dir", str(out), "--dry-run"]
    for restart in ([], ["--restart"]):  # the run puts it back either way
        assert job.main(args + restart) == 0
        printed = capsys.readouterr().out
        assert f"a run would first restore {out.resolve() / 'model'} from model.old" in printed, printed
        assert f"a run would first remove {out.resolve() / 'model.tmp'} left behind by an interrupted save" in printed
    assert sorted(p.name for p in out.iterdir()) == ["model.old", "model.tmp"]  # said, not done


def _stub_fast_training(monkeypatch, merged: Path, ran: list[str], kill_in: set[str]) -> None:
    """run_fast without Ray or data: its training a stand-in that leaves a checkpoint (the trained weights of the
    merged model's LoRA, step 2) in the stage's Ray Train folder, as fit_stage would; the real save, completion
    record and MLflow registration. `ran` gets "train" and "save" as they run; a name in `kill_in` dies there
    (SystemExit): "train" once its state is there, "save" once the new model is swapped in."""
    from contextlib import contextmanager
    from types import SimpleNamespace

    from dmm_ray import fingerprint
    from dmm_ray.data import stream
    from dmm_ray.distill import trainer
    from dmm_ray.fast import job as fast_job
    from dmm_ray.fast.loop import TRAINABLE, build_student, trainable_state

    def fit(cfg):
        ran.append("train")
        ckpt = fingerprint.fast_state_path(cfg, fast_job.fast_dir(cfg).resolve()) / "checkpoint_000002"
        ckpt.mkdir(parents=True, exist_ok=True)
        student, _ = build_student(merged, cfg.fast)
        torch.save({"student": trainable_state(student, cfg.fast), "step": 2}, ckpt / TRAINABLE)
        if "train" in kill_in:
            raise SystemExit("killed mid-training")

        @contextmanager
        def as_directory():
            yield str(ckpt)

        return SimpleNamespace(metrics={"step": 2, "loss_lcm": 0.5}, checkpoint=SimpleNamespace(as_directory=as_directory))

    save = fast_job.save_fast_model

    def saved(*args, **kwargs):
        ran.append("save")
        path = save(*args, **kwargs)
        if "save" in kill_in:
            raise SystemExit("killed between the save's swap and its record")
        return path

    monkeypatch.setattr(fast_job, "init_for_training", lambda address: False)
    monkeypatch.setattr(fast_job, "ensure_latents", lambda cfg, job, plan=None: None)
    monkeypatch.setattr(stream, "build_latent_dataset", lambda data, shards=None: None)
    monkeypatch.setattr(fast_job, "build_fast_trainer", lambda cfg, model_dir, datasets, tracking=None: cfg)
    monkeypatch.setattr(trainer, "fit_stage", fit)
    monkeypatch.setattr(fast_job, "save_fast_model", saved)


def test_a_few_step_run_killed_between_its_save_and_its_record_does_not_train_or_save_again_unless_a_restart_trained_since(
    merged_world, tmp_path, monkeypatch
):
    """A few-step run killed after its save swapped the new model in but before it recorded that it finished
    (fast_complete.json) trained again on the next run (resumed at its last step) and saved the same model again.
    The saved model's dmm_merge.json names the run that saved it and the training state it came from (the
    folder's fingerprints.json's fast_training_run): the same command now evaluates and registers that model.
    A --restart killed mid-training left the model of the training before it, of the same config: not taken for
    the result, the re-run trains (another fast_training_run) and saves its own."""
    from merge_fixtures import tiny_merge_config

    from dmm_ray import fingerprint, merge
    from dmm_ray.config import MergeConfig
    from dmm_ray.fast import job as fast_job
    from dmm_ray.merged_model import read_record

    world, merged = merged_world
    out = tmp_path / "fast"
    cfg = MergeConfig.model_validate(tiny_merge_config(world, tmp_path / "run", fast={"output_dir": str(out)})).with_absolute_paths()
    ran: list[str] = []
    kill_in = {"save"}
    _stub_fast_training(monkeypatch, merged, ran, kill_in)
    with pytest.raises(SystemExit, match="between the save's swap and its record"):
        fast_job.run_fast(cfg, merged, evaluate=False)
    assert ran == ["train", "save"] and not (out / fast_job.COMPLETE_RECORD).exists()
    saved = _digest(out / "model")
    ran.clear()
    kill_in.clear()
    assert any("already saved its few-step model" in line for line in fast_job.check_before_run(cfg, merged, evaluate=False))  # --dry-run
    result = fast_job.run_fast(cfg, merged, evaluate=False)  # was: trained again (resumed at its last step) and saved again
    assert ran == [] and not result.already_complete and _digest(out / "model") == saved
    assert fast_job.run_fast(cfg, merged, evaluate=False).already_complete and ran == []
    first = read_record(out / "model")[merge.TRAINED_BY]
    assert first == fingerprint.training_run(out, fingerprint.FAST_TRAINING_RUN)

    # --restart, killed mid-training: the model in model/ is the one before the restart
    kill_in.add("train")
    with pytest.raises(SystemExit, match="killed mid-training"):
        fast_job.run_fast(cfg, merged, evaluate=False, restart=True)
    assert ran == ["train"] and read_record(out / "model")[merge.TRAINED_BY] == first != fingerprint.training_run(out, fingerprint.FAST_TRAINING_RUN)
    assert not any("already saved" in line for line in fast_job.check_before_run(cfg, merged, evaluate=False))
    ran.clear()
    kill_in.clear()
    fast_job.run_fast(cfg, merged, evaluate=False)  # not the pre-restart model taken: this training resumed, and its model saved
    assert ran == ["train", "save"]
    assert read_record(out / "model")[merge.TRAINED_BY] == fingerprint.training_run(out, fingerprint.FAST_TRAINING_RUN) != first


def test_a_finished_few_step_run_evaluated_again_takes_its_saved_model_without_training_or_saving(merged_world, tmp_path, monkeypatch):
    """`jobs/fast.py --no-eval`, then the same command without --no-eval (or with other fast.eval_steps, evaluation:
    settings): the finished run's record was not this request's, and its saved model was looked for only where there was
    no record, so the run trained again (resumed at its last step), saved the same model again and registered it again.
    A finished run whose request differs only in what the saved model does not depend on is found by the model's
    record (SAVED_BY, TRAINED_BY): only the evaluation (and registration) run. A training setting still trains."""
    from merge_fixtures import tiny_merge_config

    from dmm_ray import fingerprint
    from dmm_ray.config import MergeConfig
    from dmm_ray.fast import job as fast_job
    from dmm_ray.merged_model import SAVED_BY, read_record

    world, merged = merged_world
    out = tmp_path / "fast"
    cfg = MergeConfig.model_validate(tiny_merge_config(world, tmp_path / "run", fast={"output_dir": str(out)})).with_absolute_paths()
    evaluated: list[tuple] = []
    monkeypatch.setattr(fast_job, "evaluate_fast", lambda c, path, teachers, steps, *a, **k: evaluated.append(tuple(steps)) or {})
    ran: list[str] = []
    _stub_fast_training(monkeypatch, merged, ran, set())
    fast_job.run_fast(cfg, merged, evaluate=False)  # --no-eval
    assert ran == ["train", "save"] and evaluated == [] and (out / fast_job.COMPLETE_RECORD).is_file()
    # the model as this dmm-ray saved it: found by its own SAVED_BY, also by a request with the other tracking
    untracked = cfg.model_copy(update={"tracking": cfg.tracking.model_copy(update={"enabled": not cfg.tracking.enabled})})
    for asked in (cfg, untracked):
        assert any("a finished run of this training saved it" in line for line in fast_job.check_before_run(asked, merged))  # --dry-run
    # as a dmm-ray recorded it that hashed fast.output_dir and fast.enabled into SAVED_BY: still this request's model
    model = merged.resolve()
    record = read_record(out / "model")
    before = fast_job._saved_as_before(fast_job._fast_request(cfg, model, fingerprint.fast_inputs(cfg, model), False))
    assert record[SAVED_BY] != before
    (out / "model" / "dmm_merge.json").write_text(json.dumps({**record, SAVED_BY: before}))
    saved, ran[:] = _digest(out / "model"), []
    assert any("a finished run of this training saved it" in line for line in fast_job.check_before_run(cfg, merged))  # --dry-run
    result = fast_job.run_fast(cfg, merged)  # was: trained (resumed at its last step) and saved again
    assert ran == [] and evaluated == [tuple(cfg.fast.eval_steps)] and not result.already_complete and _digest(out / "model") == saved
    assert fast_job.run_fast(cfg, merged).already_complete and ran == []
    other_eval = cfg.model_copy(update={"fast": cfg.fast.model_copy(update={"eval_steps": [1]})})
    fast_job.run_fast(other_eval, merged)
    assert ran == [] and evaluated[-1] == (1,) and _digest(out / "model") == saved
    other = "lcm" if cfg.fast.sampler == "tcd" else "tcd"
    lcm = cfg.model_copy(update={"fast": cfg.fast.model_copy(update={"sampler": other})})  # a setting the saved model depends on
    assert not any("already saved" in line for line in fast_job.check_before_run(lcm, merged))
    fast_job.run_fast(lcm, merged)
    assert ran == ["train", "save"]


def test_the_few_step_job_takes_the_model_its_merges_few_step_stage_saved(merged_world, tmp_path, monkeypatch, capsys):
    """`jobs/fast.py --model OUT/merged --config C` after the merge with config C ran its few-step stage (fast.enabled)
    unevaluated (evaluation.enabled false), to evaluate it: not complete (the job evaluates), and its saved model's
    SAVED_BY hashed the stage's fast.output_dir and fast.enabled, which the job leaves unset, so the job trained
    (resumed at its last step) and saved the same model again. SAVED_BY is hashed without them, as the completion
    record is compared: the job evaluates the stage's model, nothing trained or saved."""
    from types import SimpleNamespace

    import yaml
    from merge_fixtures import tiny_merge_config

    from dmm_ray import merge
    from dmm_ray.config import MergeConfig
    from dmm_ray.evaluation.config import EvalConfig
    from dmm_ray.fast import job as fast_job
    from jobs import fast as job

    world, merged = merged_world
    run_dir = tmp_path / "run"
    shutil.copytree(merged, run_dir / "merged")  # the merged model this merge saved
    tree = tiny_merge_config(world, run_dir, fast={"enabled": True}, tracking={"enabled": False})
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(tree))
    cfg = MergeConfig.model_validate(tree).with_absolute_paths()
    monkeypatch.setattr(EvalConfig, "check_ready", lambda self, *a, **k: None)  # (the tiny world has no evaluation inputs)
    evaluated: list[Path] = []
    monkeypatch.setattr(fast_job, "evaluate_fast", lambda c, path, *a, **k: evaluated.append(path) or {})
    ran: list[str] = []
    _stub_fast_training(monkeypatch, merged, ran, set())
    merge.fast_stage(
        SimpleNamespace(cfg=cfg, asked=cfg, out=run_dir, remote=None, tracker=None, result=merge.MergeResult(merged_path=run_dir / "merged"))
    )
    assert ran == ["train", "save"] and evaluated == []
    saved, ran[:] = _digest(run_dir / "fast" / "model"), []
    args = ["--model", str(run_dir / "merged"), "--config", str(tmp_path / "c.yaml")]
    assert job.main(args + ["--dry-run"]) == 0 and "already saved its few-step model" in capsys.readouterr().out
    assert job.main(args) == 0
    assert ran == [] and evaluated == [run_dir / "fast" / "model"] and _digest(run_dir / "fast" / "model") == saved  # was: train, save


def test_a_few_step_run_whose_merged_model_a_merge_replaced_while_it_trained_saves_nothing(merged_world, tmp_path, monkeypatch):
    """A merge started after jobs/fast.py began (it checks merge.lock only at its start) saved another merged model in
    place of the one the few-step job trains from: its save then fused the LoRA trained on the old UNet into the new
    one's UNet, with the new model's VAE, text encoder and records, and replaced the earlier few-step model with that.
    The save now finds the merged model is not the one the training read (its UNet checksum, fast_inputs'), saves
    nothing (the earlier few-step model stays) and says to re-run with --restart, which distills the new model."""
    from merge_fixtures import tiny_merge_config

    from dmm_ray.config import MergeConfig
    from dmm_ray.fast import job as fast_job
    from dmm_ray.output_lock import ModelReplacedError

    merged = tmp_path / "run" / "merged"
    shutil.copytree(merged_world[1], merged)
    out = tmp_path / "fast"
    cfg = MergeConfig.model_validate(tiny_merge_config(merged_world[0], tmp_path / "run", fast={"output_dir": str(out)})).with_absolute_paths()
    ran: list[str] = []
    _stub_fast_training(monkeypatch, merged, ran, set())
    fast_job.run_fast(cfg, merged, evaluate=False)
    earlier = _digest(out / "model")
    from dmm_ray.distill import trainer

    fit = trainer.fit_stage

    def fit_then_a_merge_saves(trainer_cfg):
        trained = fit(trainer_cfg)
        save_another_model(merged)
        return trained

    monkeypatch.setattr(trainer, "fit_stage", fit_then_a_merge_saves)
    ran.clear()
    with pytest.raises(ModelReplacedError, match=r"is not the one this few-step job trained on .*a merge replaced it.*--restart") as raised:
        fast_job.run_fast(cfg, merged, evaluate=False, restart=True)
    assert "nothing was saved" in str(raised.value) and str(out / "model") in str(raised.value)
    assert ran == ["train", "save"] and _digest(out / "model") == earlier  # was: the mixed model swapped in
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("model")) == ["model"]  # no model.tmp left

    monkeypatch.setattr(trainer, "fit_stage", fit)
    fast_job.run_fast(cfg, merged, evaluate=False, restart=True)  # as the error says: the new merged model distilled
    assert _digest(out / "model") != earlier
    assert _digest(out / "model")["unet/diffusion_pytorch_model.safetensors"] != earlier["unet/diffusion_pytorch_model.safetensors"]


def test_a_few_step_run_evaluates_its_model_against_the_teachers_it_was_distilled_from(merged_world, tmp_path, monkeypatch):
    """The few-step job evaluated its saved model against the teachers the merged model's dmm_merge.json named when the
    evaluation began: a merge that saved another model there after the few-step save (other teachers for its styles, or
    more styles) had it measured against that model's teachers. It now reads them from the few-step model, which keeps
    the record of the merged model it was saved from."""
    from merge_fixtures import tiny_merge_config

    from dmm_ray.config import MergeConfig
    from dmm_ray.fast import job as fast_job
    from dmm_ray.merged_model import read_record, staged

    merged = tmp_path / "run" / "merged"
    shutil.copytree(merged_world[1], merged)
    out = tmp_path / "fast"
    cfg = MergeConfig.model_validate(
        tiny_merge_config(merged_world[0], tmp_path / "run", fast={"output_dir": str(out), "eval_steps": [4]})
    ).with_absolute_paths()
    _stub_fast_training(monkeypatch, merged, [], set())
    teachers = read_record(merged)["teachers"]
    save = fast_job.save_fast_model

    def save_then_a_merge_saves(*args, **kwargs):
        path = save(*args, **kwargs)
        with staged(merged) as tmp:  # the same styles, each from the other's teacher
            shutil.copytree(merged, tmp, dirs_exist_ok=True)
            swapped = [{**t, "source": other["source"]} for t, other in zip(teachers, reversed(teachers))]
            (tmp / "dmm_merge.json").write_text(json.dumps({**read_record(merged), "teachers": swapped}))
        return path

    evaluated = []
    monkeypatch.setattr(fast_job, "save_fast_model", save_then_a_merge_saves)
    monkeypatch.setattr(fast_job, "evaluate_fast", lambda cfg, path, teachers, steps, out: evaluated.extend(teachers) or {})
    fast_job.run_fast(cfg, merged, evaluate=True)
    assert [t.source for t in evaluated] == [t["source"] for t in teachers]  # was: the other model's
    assert evaluated[0].source != read_record(merged)["teachers"][0]["source"]


def test_a_few_step_run_hashes_its_saved_model_request_once(tmp_path, monkeypatch):
    """_run_fast compared the folder's saved model with saved_model_request (in saved_by_this_training) and then
    computed it again for the save to record: now once, passed to both."""
    from dmm_ray import completion, fingerprint
    from dmm_ray.config import MergeConfig
    from dmm_ray.fast import job as fast_job

    cfg = MergeConfig.model_validate(
        {
            "student": {"base": "/nonexistent/b"},
            "data": {"base": "/nonexistent/b", "shards": str(tmp_path / "shards")},
            "teachers": [{"name": "a", "source": "/nonexistent/a"}],
            "output_dir": str(tmp_path / "out"),
        }
    )
    hashed = []
    request = fast_job.saved_model_request
    monkeypatch.setattr(fast_job, "saved_model_request", lambda asked: hashed.append(request(asked)) or hashed[-1])
    monkeypatch.setattr(fingerprint, "fast_inputs", lambda *a: {})
    monkeypatch.setattr(fingerprint, "check_fast_resume", lambda *a: None)
    monkeypatch.setattr(completion, "finished", lambda *a, **k: None)
    monkeypatch.setattr(fast_job, "init_for_training", lambda address=None: False)
    monkeypatch.setattr(fast_job, "ensure_latents", lambda *a, **k: None)
    monkeypatch.setattr(fast_job, "read_record", lambda model_dir: {})

    class Trained(Exception):  # the training itself is not this test's: stop where it would start
        pass

    def train(cfg, model_dir, styles, out, inputs, result, tracking, saved_by, merge_saved_model=False):
        raise Trained(saved_by)

    monkeypatch.setattr(fast_job, "_train_and_save", train)
    with pytest.raises(Trained) as stop:
        fast_job._run_fast(cfg, tmp_path / "model", ["a"], tmp_path / "fast", None, False, False, 0.0)
    assert len(hashed) == 1 and stop.value.args == (hashed[0],)  # was 2: saved_by_this_training hashed it too


def test_the_merge_dry_run_says_that_its_few_step_stage_finds_its_model_saved_or_finished(merged_world, tmp_path, monkeypatch):
    """Finding: a merge whose few-step stage saved its model but was stopped before it recorded that (the merge's
    own record still fast_pending) re-runs only that stage, which skips the training and the save; one stopped after
    the stage recorded that it finished runs a stage that does nothing. jobs/merge.py --dry-run said only that the
    stage runs. It could not tell: the stage's records took the config with the cluster plan's resources
    (scaling.cpus_per_worker `auto` resolved), which a dry run does not plan. They take the config as given now, as
    the merge's own, and the dry run says what the stage will do: the lines the stage then logs."""
    from types import SimpleNamespace

    from merge_fixtures import tiny_merge_config

    from dmm_ray import merge
    from dmm_ray.config import MergeConfig
    from dmm_ray.resources import plan_resources

    world, merged = merged_world
    run_dir = tmp_path / "run"
    shutil.copytree(merged, run_dir / "merged")  # the merged model this merge saved
    tree = tiny_merge_config(world, run_dir, fast={"enabled": True}, scaling={"cpus_per_worker": "auto"})
    cfg = MergeConfig.model_validate(tree).with_absolute_paths()
    planned = merge.with_plan(cfg, plan_resources(cfg, {"CPU": 4}))  # what _merge's stages run with
    assert planned.scaling.cpus_per_worker != cfg.scaling.cpus_per_worker

    def saved_and_registered():  # the merge's record once every stage before fast finished
        merge.record_complete(cfg, run_dir, merge.MergeResult(merged_path=run_dir / "merged", location=str(run_dir / "merged")), fast_pending=True)

    def fast_stage():  # _merge's few-step stage
        result = merge.MergeResult(merged_path=run_dir / "merged")
        merge.fast_stage(SimpleNamespace(cfg=planned, asked=cfg, out=run_dir, remote=None, tracker=None, result=result))
        return result.fast

    def said(line: str) -> bool:
        return any(line in found for found in merge.check_before_run(cfg))  # --dry-run

    ran: list[str] = []
    kill_in = {"save"}
    _stub_fast_training(monkeypatch, merged, ran, kill_in)
    saved_and_registered()
    assert said("only that stage runs") and not said("already saved its few-step model")
    with pytest.raises(SystemExit, match="between the save's swap and its record"):
        fast_stage()
    ran.clear()
    kill_in.clear()
    assert said("only that stage runs") and said("already saved its few-step model")  # was: only that the stage runs
    assert not fast_stage().already_complete and ran == []  # no training, no save
    saved_and_registered()  # stopped after its stage finished, before the merge's last record
    assert said("already complete: this few-step stage")  # was: only that the stage runs
    assert fast_stage().already_complete and ran == []


def test_a_few_step_model_saved_before_its_records_took_the_config_as_given_is_not_trained_again(merged_world, tmp_path, monkeypatch):
    """A merge's few-step stage stopped between its save's swap and its completion record by a dmm-ray whose records
    took the cluster plan's config (scaling.cpus_per_worker `auto` resolved to a number): its model records the hash
    of that request (SAVED_BY). Re-run since the records take the config as given, the stage compared the hash of the
    `auto` request alone, did not find its model saved, and trained, saved and registered it again (once), where the
    run before the change skipped the training and the save. The planned request's hash is found too now."""
    from types import SimpleNamespace

    from merge_fixtures import tiny_merge_config

    from dmm_ray import merge
    from dmm_ray.config import MergeConfig
    from dmm_ray.resources import plan_resources

    world, merged = merged_world
    run_dir = tmp_path / "run"
    shutil.copytree(merged, run_dir / "merged")
    tree = tiny_merge_config(world, run_dir, fast={"enabled": True}, scaling={"cpus_per_worker": "auto"})
    cfg = MergeConfig.model_validate(tree).with_absolute_paths()
    planned = merge.with_plan(cfg, plan_resources(cfg, {"CPU": 4}))
    assert planned.scaling.cpus_per_worker != cfg.scaling.cpus_per_worker

    def fast_stage(asked):  # _merge's few-step stage; `asked` None: the records take the planned config (before)
        result = merge.MergeResult(merged_path=run_dir / "merged")
        merge.fast_stage(SimpleNamespace(cfg=planned, asked=asked, out=run_dir, remote=None, tracker=None, result=result))
        return result.fast

    ran: list[str] = []
    kill_in = {"save"}
    _stub_fast_training(monkeypatch, merged, ran, kill_in)
    merge.record_complete(cfg, run_dir, merge.MergeResult(merged_path=run_dir / "merged", location=str(run_dir / "merged")), fast_pending=True)
    with pytest.raises(SystemExit, match="between the save's swap and its record"):
        fast_stage(None)  # saved by the earlier version, killed before its record
    ran.clear()
    kill_in.clear()
    assert not fast_stage(cfg).already_complete and ran == []  # was ["train", "save"]
    assert fast_stage(cfg).already_complete and ran == []  # its record takes the config as given


def test_a_few_step_run_killed_after_registering_its_model_does_not_register_it_again(merged_world, tmp_path, monkeypatch):
    """A few-step run killed after it registered its model but before it recorded that it finished trained
    (resumed at its last step), saved and registered the same model again: a second MLflow version (the merge's
    check for its own registration could not see the first: the new save's dmm_merge.json named the new run).
    Now the re-run keeps the saved model, and the version its dmm_merge.json's run registered gets the re-run's
    description and tags."""
    import mlflow
    from merge_fixtures import tiny_merge_config

    from dmm_ray import completion
    from dmm_ray.config import MergeConfig
    from dmm_ray.fast import job as fast_job
    from dmm_ray.tracking import make_tracker

    world, merged = merged_world
    out = tmp_path / "fast"
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = MergeConfig.model_validate(
        tiny_merge_config(world, tmp_path / "run", fast={"output_dir": str(out)}, tracking={"uri": store})
    ).with_absolute_paths()
    ran: list[str] = []
    _stub_fast_training(monkeypatch, merged, ran, set())
    record_finished = completion.record_finished

    def killed(*args, **kwargs):  # the process dies after the registration
        raise SystemExit("killed after the registration, before the completion record")

    monkeypatch.setattr(completion, "record_finished", killed)
    with pytest.raises(SystemExit, match="killed after the registration"):
        fast_job.run_fast(cfg, merged, tracker=make_tracker(cfg), evaluate=False)
    monkeypatch.setattr(completion, "record_finished", record_finished)
    assert ran == ["train", "save"]
    ran.clear()
    result = fast_job.run_fast(cfg, merged, tracker=make_tracker(cfg), evaluate=False)
    assert ran == [] and result.model_uri == "models:/test-merge/1"
    assert fast_job.run_fast(cfg, merged, tracker=make_tracker(cfg), evaluate=False).model_uri == "models:/test-merge/1"
    client = mlflow.MlflowClient(store)
    versions = client.search_model_versions("name = 'test-merge'")
    assert [int(v.version) for v in versions] == [1]  # was 1 and 2, of one model
    assert versions[0].tags["dmm.stage"] == "fast" and versions[0].description.startswith("few-step (LCM lora) model of test-merge")

    # evaluated now (FIDt on the version), then --no-eval again: that version keeps its FIDt (the --no-eval re-run,
    # which measured nothing, wrote a description without it over the evaluated one)
    import numpy as np

    from dmm_ray.evaluation.matrix import EvalResult

    scored = EvalResult(["style0", "style1"], np.array([[2.0, 9.0], [9.0, 3.0]]), np.array([[1.0, 9.0], [9.0, 1.0]]), ["p"], 2, "x")
    monkeypatch.setattr(fast_job, "evaluate_fast", lambda *a, **k: {cfg.fast.num_inference_steps: scored})
    monkeypatch.setattr(fast_job, "log_fast_evaluations", lambda *a: None)
    for evaluate in (True, False):
        assert fast_job.run_fast(cfg, merged, tracker=make_tracker(cfg), evaluate=evaluate).model_uri == "models:/test-merge/1" and ran == []
        assert ", FIDt 5.00" in client.get_model_version("test-merge", "1").description, evaluate
