"""Resuming from the newest complete checkpoint, also one Ray Train never recorded.

Ray Train records a checkpoint (its controller's snapshot) after the worker has uploaded it; a
Ctrl-C or a killed driver in between leaves the newest checkpoint folders on disk but unrecorded.
dmm_ray.distill.checkpointing seals every folder (a manifest of its step and file sizes), resumes
from the newest sealed one and removes the unrecorded folders once the stage has finished."""

import shutil
from pathlib import Path

import pyarrow.fs as pafs
import pytest
import torch
from merge_fixtures import build_world, tiny_merge_config

from dmm_ray.config import MergeConfig
from dmm_ray.distill.checkpointing import MANIFEST, newest_sealed, prune_unrecorded, seal, sealed_step

LOCAL = pafs.LocalFileSystem()


def _checkpoint(folder: Path, step: int, payload: bytes = b"x" * 100) -> Path:
    (folder / "student").mkdir(parents=True)
    (folder / "student" / "weights.safetensors").write_bytes(payload)
    (folder / "train_state.pt").write_bytes(payload[:10])
    seal(folder, step)
    return folder


def test_a_sealed_checkpoint_reads_its_step_and_a_cut_off_copy_reads_none(tmp_path):
    done = _checkpoint(tmp_path / "checkpoint_a", 7)
    assert sealed_step(LOCAL, str(done)) == 7
    truncated = shutil.copytree(done, tmp_path / "checkpoint_b")
    (truncated / "student" / "weights.safetensors").write_bytes(b"x" * 50)  # a copy cut off mid-file
    assert sealed_step(LOCAL, str(truncated)) is None
    missing = shutil.copytree(done, tmp_path / "checkpoint_c")
    (missing / "train_state.pt").unlink()  # a file not copied yet
    assert sealed_step(LOCAL, str(missing)) is None
    unsealed = shutil.copytree(done, tmp_path / "checkpoint_d")
    (unsealed / MANIFEST).unlink()  # the manifest itself not copied yet (or a checkpoint made before manifests)
    assert sealed_step(LOCAL, str(unsealed)) is None
    (unsealed / MANIFEST).write_text('{"step": 9, "fil')  # the manifest cut off
    assert sealed_step(LOCAL, str(unsealed)) is None


def test_the_newest_sealed_checkpoint_is_the_highest_complete_step(tmp_path):
    _checkpoint(tmp_path / "checkpoint_2026-01-01_00-00-03", 30)
    _checkpoint(tmp_path / "checkpoint_2026-01-01_00-00-01", 40)  # names do not order steps: the manifest does
    partial = _checkpoint(tmp_path / "checkpoint_2026-01-01_00-00-05", 50)
    (partial / "train_state.pt").write_bytes(b"")
    _checkpoint(tmp_path / "not_a_checkpoint", 60)
    assert newest_sealed(LOCAL, str(tmp_path)) == (40, str(tmp_path / "checkpoint_2026-01-01_00-00-01"))
    assert newest_sealed(LOCAL, str(tmp_path / "absent")) is None


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return build_world(tmp_path_factory.mktemp("resume_world"))


def _student(result) -> dict:
    from safetensors.torch import load_file

    return load_file(next((Path(result.checkpoint.path) / "student").glob("*.safetensors")))


def _fit(world, out: Path, **distill):
    from dmm_ray.data.stream import build_latent_dataset
    from dmm_ray.distill.trainer import build_trainer, fit_stage

    cfg = MergeConfig.model_validate(tiny_merge_config(world, out, distill=distill, scaling={"max_failures": 1}))
    return fit_stage(build_trainer(cfg, "distill", {"train": build_latent_dataset(cfg.data)}))


@pytest.mark.ray
@pytest.mark.slow  # three 2-worker runs: ~80 s on 2 shared cores (make test-slow)
def test_a_run_resumed_after_a_crash_ends_where_the_uninterrupted_run_does(ray_cluster, world, tmp_path):
    """2 workers, 4 steps, a checkpoint every 2; worker 1 is killed once after the step-2 checkpoint
    (distill.fail_at_step) and Ray Train restarts the group from it. Each worker's generator (here the
    adversarial term's re-noising draws) is in the checkpoint: the resumed run used to re-seed it and
    replay step 0's draws, ending at other weights than the same run without the crash."""
    from dmm_ray.distill.checkpointing import load_training_state

    settings = {"steps": 4, "checkpoint_every": 2, "lambda_adv": 0.01}
    uninterrupted = _fit(world, tmp_path / "a", **settings)
    resumed = _fit(world, tmp_path / "b", **settings, fail_at_step=3)
    assert (tmp_path / "b" / ".failed_once_distill").read_text() == "3"  # the worker really died
    assert resumed.metrics["resumed_from"] == 2 and resumed.metrics["step"] == 4  # and the group resumed (from step 0 nothing would differ)
    a, b = _student(uninterrupted), _student(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    heads = [load_training_state(Path(r.checkpoint.path))["disc_head"] for r in (uninterrupted, resumed)]
    assert all(torch.equal(heads[0][k], heads[1][k]) for k in heads[0])
    generators = load_training_state(Path(resumed.checkpoint.path))["generators"]
    assert len(generators) == 2 and not torch.equal(generators[0], generators[1])  # each rank's own


@pytest.mark.ray
def test_a_rerun_resumes_from_checkpoints_ray_train_never_recorded_and_prunes_them(ray_cluster, world, tmp_path):
    """Distill 2 steps; forget Ray Train's record of them (what a Ctrl-C between the upload and the
    controller's record leaves) and add a cut-off copy. A re-run with 3 steps resumes from step 2,
    not 0, and removes both leftover folders; a re-run of the finished stage trains nothing and
    still reports its checkpoint, with resumed_from = 3."""
    from dmm_ray.distill.checkpointing import load_training_state

    def fit(steps: int):
        return _fit(world, tmp_path / "out", steps=steps, lambda_adv=0, ema_decay=0.9)

    run = tmp_path / "out" / "ray_results" / "test-merge-distill"
    first = fit(2)
    assert first.metrics["step"] == 2
    (run / "checkpoint_manager_snapshot.json").unlink()  # Ray Train recorded nothing
    leftover = {p.name for p in run.glob("checkpoint_*") if p.is_dir()}
    cut_off = shutil.copytree(Path(first.checkpoint.path), run / "checkpoint_9999-12-31_23-59-59.000000")
    (cut_off / "train_state.pt").write_bytes(b"")

    second = fit(3)
    assert second.metrics["resumed_from"] == 2 and second.metrics["step"] == 3  # without the scan: 0
    on_disk = {p.name for p in run.glob("checkpoint_*") if p.is_dir()}
    kept = {Path(c.path).name for c, _ in second.best_checkpoints}
    assert on_disk == kept and not on_disk & (leftover | {cut_off.name})
    assert load_training_state(Path(second.checkpoint.path))["step"] == 3

    before = _student(second)  # read now: the third run prunes this folder (its record is deleted next)
    (run / "checkpoint_manager_snapshot.json").unlink()
    third = fit(3)  # nothing left to train
    assert third.metrics["resumed_from"] == 3 and third.metrics["step"] == 3
    assert load_training_state(Path(third.checkpoint.path))["step"] == 3  # the stage's result, not "no checkpoint"
    after = _student(third)  # the same student as the step-3 checkpoint it resumed from (the EMA is not applied twice)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_prune_keeps_what_ray_train_keeps(tmp_path):
    class Checkpoint:
        def __init__(self, path):
            self.path, self.filesystem = str(path), LOCAL

    class Result:
        checkpoint = Checkpoint(_checkpoint(tmp_path / "checkpoint_3", 3))
        best_checkpoints = [(Checkpoint(_checkpoint(tmp_path / "checkpoint_2", 2)), {}), (checkpoint, {})]

    _checkpoint(tmp_path / "checkpoint_1", 1)
    (tmp_path / "other").mkdir()
    assert prune_unrecorded(Result()) == [str(tmp_path / "checkpoint_1")]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_2", "checkpoint_3", "other"]


@pytest.mark.parametrize("error", [OSError(28, "No space left on device"), KeyboardInterrupt()], ids=["error", "ctrl-c"])
def test_a_checkpoint_write_that_fails_leaves_no_temp_folder(tmp_path, monkeypatch, error):
    """Rank 0 writes each checkpoint into a fresh dmm-ckpt-* temp folder, which Ray Train removes once it
    has persisted it; a write that failed (a full /tmp) or was interrupted left the partial folder (the
    student, part of the optimizer state) in the temp dir, one more per failed save and Ray Train retry."""
    import tempfile
    from types import SimpleNamespace

    from dmm_ray.distill import checkpointing
    from dmm_ray.distill.loop import Reporter
    from dmm_ray.fast import loop as fast_loop

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))

    def partial_then_fail(folder, *args, **kwargs):
        (Path(folder) / "train_state.pt").write_bytes(b"half")
        raise error

    monkeypatch.setattr(checkpointing, "save_training_state", partial_then_fail)  # the distill loop's write
    nothing, stream = SimpleNamespace(state_dict=dict), SimpleNamespace(epoch=0, position=0)
    models = SimpleNamespace(student=None, discriminator=None, ema=None)
    reporter = SimpleNamespace(models=models, optim=SimpleNamespace(student=None, disc=None, lr_scheduler=nothing), batches=stream)
    with pytest.raises(type(error)):
        Reporter._save(reporter, step=1, final=False, generators=[])
    monkeypatch.setattr(fast_loop, "trainable_state", lambda student, f: {"w": torch.zeros(1)})
    monkeypatch.setattr(fast_loop.torch, "save", lambda obj, path: partial_then_fail(Path(path).parent))
    with pytest.raises(type(error)):  # the few-step loop's write
        fast_loop._report(0, 1, {}, None, SimpleNamespace(mode="lora"), nothing, nothing, stream, None, None, None)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("same_stage", [True, False], ids=["resume", "finetune-continue"])
def test_a_restored_ema_lives_on_the_students_device(same_stage):
    """A checkpoint is read to the CPU; diffusers' EMAModel.load_state_dict keeps the shadow weights
    there, so on a GPU worker the first ema.step after a resume (or the fine-tune continuing the
    distill stage's EMA) mixed devices and failed. Here the student's device is 'meta'."""
    from types import SimpleNamespace

    from diffusers.training_utils import EMAModel

    from dmm_ray.distill.loop import _load_state

    saved_from = torch.nn.Linear(3, 3)
    state = {
        "opt_student": torch.optim.AdamW(saved_from.parameters()).state_dict(),
        "disc_head": None,
        "opt_disc": None,
        "ema": EMAModel(saved_from.parameters(), decay=0.9).state_dict(),
    }
    student = torch.nn.Linear(3, 3).to("meta")
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-3)
    optim = SimpleNamespace(student=optimizer, disc=None, lr_scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0))
    models = SimpleNamespace(student=student, discriminator=None, ema=EMAModel(student.parameters(), decay=0.9))
    _load_state(models, optim, state, None, same_stage=same_stage)
    assert {p.device.type for p in models.ema.shadow_params} == {"meta"}
    models.ema.step(student.parameters())  # mixed devices: RuntimeError
