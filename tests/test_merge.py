"""End-to-end merge on the shared local Ray cluster with tiny models (2 steps per stage)."""

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from merge_fixtures import build_world, tiny_merge_config

from dmm_ray.config import ConfigError, MergeConfig, load_config
from dmm_ray.defaults import PAPER_NEGATIVE_PROMPT

pytestmark = pytest.mark.ray
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def world(tmp_path_factory):
    return build_world(tmp_path_factory.mktemp("merge_world"))


def _registered_checkpoints(run_dir: Path) -> list[str]:
    """The checkpoints Ray Train has registered for the run in `run_dir` (its checkpoint manager's
    snapshot, what a re-run restores from); a checkpoint folder on disk is not registered until the
    controller has processed the report, which can be after the next step's folder is written."""
    try:
        snapshot = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):  # not written yet, or caught mid-write
        return []
    return [r["checkpoint_dir_name"] for r in snapshot.get("checkpoint_results", [])]


def _train_state(result_checkpoint_dir):
    from dmm_ray.distill.checkpointing import load_training_state

    return load_training_state(Path(result_checkpoint_dir))


@pytest.mark.slow  # over 60 s on 2 cores: make test-slow
def test_checkpoint_temp_folders_are_removed_once_reported(ray_cluster, world, tmp_path):
    """20 steps with a checkpoint every step: no dmm-ckpt-* temp folder stays behind, and storage keeps
    only CheckpointConfig.num_to_keep checkpoints."""
    import tempfile

    from dmm_ray.data.stream import build_latent_dataset
    from dmm_ray.distill.trainer import build_trainer

    before = set(Path(tempfile.gettempdir()).glob("dmm-ckpt-*"))
    cfg = MergeConfig.model_validate(tiny_merge_config(world, tmp_path / "out", distill={"steps": 20, "checkpoint_every": 1, "lambda_adv": 0}))
    result = build_trainer(cfg, "distill", {"train": build_latent_dataset(cfg.data)}).fit()
    assert result.metrics["step"] == 20
    assert set(Path(tempfile.gettempdir()).glob("dmm-ckpt-*")) - before == set()
    kept = list((tmp_path / "out" / "ray_results" / f"{cfg.name}-distill").glob("checkpoint_*"))
    # CheckpointConfig(num_to_keep=2): Ray Train drops the oldest once a newer one is registered, so
    # at most num_to_keep + 1 of the 20 reported checkpoints are on disk at any time
    assert 1 <= len(kept) <= 3, kept


@pytest.mark.slow  # 100 s on 2 cores, and timing-sensitive beside other load; test_ray_job_submit_merge_end_to_end_then_resume covers the restore
def test_killed_worker_is_survived_from_last_checkpoint(ray_cluster, world, tmp_path):
    from dmm_ray.data.stream import build_latent_dataset
    from dmm_ray.distill.trainer import build_trainer

    cfg = MergeConfig.model_validate(
        tiny_merge_config(world, tmp_path / "out", distill={"steps": 3, "checkpoint_every": 1, "fail_at_step": 2}, scaling={"max_failures": 1})
    )
    result = build_trainer(cfg, "distill", {"train": build_latent_dataset(cfg.data)}).fit()
    assert (tmp_path / "out" / ".failed_once_distill").read_text() == "2"  # the worker really died at step 2
    # Restarted from a checkpoint, not from scratch: at most `checkpoint_every` (=1) step is redone
    # (the step-2 report may still be in flight when the controller sees the dead worker).
    assert result.metrics["step"] == 3 and 1 <= result.metrics["resumed_from"] <= 2


@pytest.mark.slow  # two merges through jobs/merge.py: minutes on 2 cores
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_driver_killed_mid_distill_resumes_from_its_last_checkpoint_on_rerun(ray_cluster, world, tmp_path, sig):
    """SIGKILL the jobs/merge.py driver once distill has checkpointed, run the same command again: it takes
    over the dead driver's lock, resumes from a checkpoint (not step 0) and leaves only `merged` behind.
    SIGTERM (`ray job stop`, a scheduler's preemption): the driver stops as for a Ctrl-C, with its line
    and exit 143 (not Ray's C++ stack dump and 1 or 134), releasing the lock; the re-run resumes."""
    out = tmp_path / "out"
    config = tiny_merge_config(
        world,
        out,
        synthesis={"enabled": False},
        distill={"steps": 10, "checkpoint_every": 1, "lambda_adv": 0},
        tracking={"enabled": False},
        evaluation={"enabled": False},
    )
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(config))
    command = [sys.executable, str(REPO / "jobs" / "merge.py"), "--config", str(path)]  # RAY_ADDRESS: joins the test cluster
    checkpoints = out / "ray_results" / "test-merge-distill"
    with open(tmp_path / "first.log", "w") as log:
        first = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.time() + 500
        while not _registered_checkpoints(checkpoints) and first.poll() is None and time.time() < deadline:
            time.sleep(0.2)  # one registered with Ray Train (in its snapshot): a re-run resumes from it; one on disk is not enough
        if first.poll() is None:
            first.send_signal(sig)
        first.wait(120)
    log = (tmp_path / "first.log").read_text()
    if sig == signal.SIGKILL:
        assert first.returncode == -signal.SIGKILL, log[-3000:]
        assert (out / "merge.lock").exists() and not (out / "merged").exists()
    else:
        assert first.returncode == 143, log[-3000:]
        assert "terminated (SIGTERM): the last good merged model and the checkpoints stay" in log
        assert "SIGTERM received" not in log and "Traceback" not in log, log[-3000:]
        assert not (out / "merge.lock").exists() and not (out / "merged").exists()

    second = subprocess.run(command, capture_output=True, text=True, timeout=900)
    text = second.stdout + second.stderr
    assert second.returncode == 0, text[-4000:]
    assert ("taking over the stale lock" in text) == (sig == signal.SIGKILL)
    resumed = [int(n) for n in re.findall(r"resumed from step (\d+)", text)]
    assert resumed and min(resumed) >= 1, text[-4000:]
    # no merged.tmp/.old, no lock; the record of a finished merge (a third run would do nothing)
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("merge")) == ["merge_complete.json", "merged"]
    assert (out / "merged" / "unet" / "config.json").exists()


def test_workers_not_multiple_of_teachers_rejected_before_ray(world, tmp_path):
    config = tiny_merge_config(world, tmp_path / "out", scaling={"num_workers": 3})
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(ConfigError, match="num_workers=3 is not a multiple of the 2 teachers"):
        load_config(path)
    proc = subprocess.run([sys.executable, str(REPO / "jobs" / "merge.py"), "--config", str(path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "not a multiple of the 2 teachers" in proc.stderr
    assert "Started a local Ray" not in proc.stdout + proc.stderr


def test_ray_job_submit_merge_end_to_end_then_resume(ray_cluster, tmp_path):
    """The main entry point, `ray job submit --working-dir . -- python jobs/merge.py`, against the running
    cluster, on an uneven packing: 3 teachers at 2 per worker (groups of 2 and 1), 6 steps crossing epochs.
    Ray Data's streaming split starts the next epoch on all workers together, so the worker hosting one
    teacher must read as many common batches per step as the one hosting two; otherwise the faster reader
    waits at the split for the slower one, which waits for it in DDP's all-reduce, and the merge hangs at
    the first epoch's end (the subprocess timeout turns a hang into a failure). Then the merged model
    loads and samples, and one more Train run on the same folder resumes from the job's last checkpoint.
    (One merge for all of it: every Train run costs ~40 s of start-up on 2 cores. Synthesis and the
    fine-tune: test_training_options.py; the evaluation stage: test_incremental.py.)"""
    from diffusers import UNet2DConditionModel

    from dmm_ray import DMMPipeline
    from dmm_ray.data.stream import build_latent_dataset
    from dmm_ray.distill.trainer import build_trainer
    from dmm_ray.models.style_unet import StyleUNet

    world = build_world(tmp_path / "world", num_teachers=3, rows=32)
    config = tiny_merge_config(
        world,
        tmp_path / "out",
        scaling={"teachers_per_worker": 2, "cpus_per_worker": 0.5},
        synthesis={"enabled": False},
        distill={"steps": 6, "checkpoint_every": 6, "log_every": 1, "lambda_adv": 0},  # 16 rows per worker, 8 per step: 3 epochs
        tracking={"uri": f"sqlite:///{tmp_path}/mlflow.db"},
        evaluation={"enabled": False},
    )
    cfg = MergeConfig.model_validate(config)
    assert cfg.num_workers == 2
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(config))
    dashboard = ray_cluster.dashboard_url
    command = [
        str(Path(sys.executable).parent / "ray"),
        "job",
        "submit",
        "--address",
        f"http://{dashboard}",
        "--working-dir",
        str(REPO),
        "--",
        sys.executable,
        "jobs/merge.py",
        "--config",
        str(path),
    ]
    for _ in range(30):  # the head's job agent registers a little after the head is up
        proc = subprocess.run(command, capture_output=True, text=True, timeout=600)
        if "No available agent" not in proc.stderr:
            break
        time.sleep(5)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (tmp_path / "out" / "merged" / "unet" / "config.json").exists()
    assert "merged model:" in proc.stdout
    # rank 0 logged per-step losses into the nested stage run of the MLflow store the config names
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    stage = [r for r in runs if r.data.tags.get("mlflow.parentRunId")]
    history = client.get_metric_history(stage[0].info.run_id, "distill/loss_score") if stage else []
    assert sorted({m.step for m in history}) == [1, 2, 3, 4, 5, 6]  # every step; the stage summary at the last, no stray step 0
    assert client.get_metric_history(stage[0].info.run_id, "distill/loss_feat")
    assert max(m.value for m in client.get_metric_history(stage[0].info.run_id, "distill/epoch")) >= 2  # crossed epochs in lock step
    # the merged folder names its stage run, so jobs/export.py logs exports to it
    record = json.loads((tmp_path / "out" / "merged" / "dmm_merge.json").read_text())
    assert record["mlflow"]["run_id"] == stage[0].info.run_id

    pipe = DMMPipeline.from_pretrained(tmp_path / "out" / "merged", local_files_only=True)
    assert pipe.styles == ["style0", "style1", "style2"]
    # the merged model carries the sampler its teachers were sampled with (synthesis: 2 steps, default CFG 7)
    assert pipe.sampler_defaults == {
        "scheduler": "DPMSolverMultistepScheduler",
        "num_inference_steps": 2,
        "guidance_scale": 7.0,
        "negative_prompt": PAPER_NEGATIVE_PROMPT,
    }
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a red circle", style="style1", num_inference_steps=2, height=32, width=32).images[0]
    assert image.size == (32, 32)
    # the codebook moved away from its initialisation (the student really trained)
    torch.manual_seed(cfg.student.codebook_seed)
    init = StyleUNet.from_unet(UNet2DConditionModel.from_pretrained(Path(world["base"]) / "unet"), pipe.styles)
    assert not torch.equal(init.class_embedding.codebook.weight, pipe.unet.class_embedding.codebook.weight)

    # Resume, on the job's own folder: the same run name and storage make Ray Train restore the distill
    # stage's latest checkpoint (step 6), and the loop continues from it, data position included.
    checkpoints = sorted(p for p in (tmp_path / "out" / "ray_results" / "test-merge-distill").glob("checkpoint_*") if p.is_dir())
    state_6 = _train_state(checkpoints[-1])  # named by time: the last is the newest
    assert state_6["step"] == 6
    cfg7 = cfg.model_copy(update={"distill": cfg.distill.model_copy(update={"steps": 7})})
    second = build_trainer(cfg7, "distill", {"train": build_latent_dataset(cfg7.data)}).fit()
    assert second.metrics["resumed_from"] == 6 and second.metrics["step"] == 7
    with second.checkpoint.as_directory() as d:
        state_7 = _train_state(d)
    assert state_7["step"] == 7 and (state_7["epoch"], state_7["batches_in_epoch"]) > (state_6["epoch"], state_6["batches_in_epoch"])
    assert state_7["opt_student"]["state"][0]["step"].item() == 7  # optimizer state carried over, not restarted
