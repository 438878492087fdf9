"""Reliability of the merge job and of serving: a NaN loss stops a merge with a clear message and
writes nothing; an MLflow outage never stops training; --dry-run catches broken teacher files
(--deep: NaN/Inf tensors); Serve deletes the temporary download of a `models:/` model."""

from __future__ import annotations

import logging
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from merge_fixtures import build_world, tiny_merge_config


def _save_teacher(path: Path, nan: bool = False, seed: int = 100) -> Path:
    """A tiny diffusers-folder teacher like merge_fixtures builds; `nan`: NaN in its UNet's output conv."""
    from diffusers import StableDiffusionPipeline

    from dmm_ray.tiny import tiny_sd_components

    c = tiny_sd_components(seed=0)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in c["unet"].parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
        if nan:
            c["unet"].conv_out.bias[0] = float("nan")
    StableDiffusionPipeline(**c).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return build_world(tmp_path_factory.mktemp("reliability_world"))


# ---- 1. a non-finite loss stops the merge ----------------------------------------------------


def test_nonfinite_terms_and_message():
    from dmm_ray.distill.health import NonFiniteLossError, describe_nonfinite, nonfinite_terms, raise_if_nonfinite

    assert nonfinite_terms({"loss_score": 0.5, "loss_total": 0.5, "grad_norm": 1.0}) == {}
    bad = nonfinite_terms({"loss_score": float("nan"), "loss_feat": 0.1, "loss_total": float("nan"), "grad_norm": float("nan")})
    assert set(bad) == {"loss_score", "loss_total"}  # the loss terms, not the gradient they poisoned
    assert nonfinite_terms({"loss_score": 0.1, "grad_norm": float("inf")}) == {"grad_norm": float("inf")}
    message = describe_nonfinite(bad, stage="distill", step=3, steps=10, rank=1, hosts="style 'ink', teacher /t/ink")
    with pytest.raises(NonFiniteLossError, match=r"distill step 3 of 10 on rank 1 \(style 'ink', teacher /t/ink\): loss_score = nan") as info:
        raise_if_nonfinite([message])
    assert "--dry-run --deep" in str(info.value)
    raise_if_nonfinite([])  # nothing non-finite: no error


def test_nonfinite_and_input_errors_are_stopped_on_the_controller_not_retried():
    """Raised in the controller callback, Ray Train makes it a ControllerError, which it never retries;
    the driver gets the worker's own error back out of either wrapper. An input error a worker finds
    (a synthesized set smaller than its batch) is as deterministic as a NaN: stopped the same way."""
    from ray.train import ControllerError, WorkerGroupError

    from dmm_ray.distill.health import (
        NonFiniteLossError,
        StopWithoutRetry,
        TrainingInputError,
        controller_callbacks,
        stops_without_retry,
        unwrap_training_error,
    )
    from dmm_ray.styles import StyleError

    assert controller_callbacks()
    callback = StopWithoutRetry()
    callback.after_exception(None, {0: RuntimeError("a crash a restart can get past")})  # other errors: Ray retries them
    callback.after_exception(None, {0: ValueError("a library's ValueError: may be a bug, Ray retries it")})
    with pytest.raises(NonFiniteLossError, match="loss_score"):
        callback.after_exception(None, {0: RuntimeError("collateral"), 1: NonFiniteLossError("non-finite loss ... loss_score = nan")})
    short = TrainingInputError("style 8's synthesized samples has 8 rows, fewer than a batch of 16")
    with pytest.raises(TrainingInputError, match="fewer than a batch"):
        callback.after_exception(None, {0: RuntimeError("collateral"), 1: short})
    with pytest.raises(NonFiniteLossError):  # a NaN is the cause when both are there
        callback.after_exception(None, {0: short, 1: NonFiniteLossError("non-finite loss")})
    assert stops_without_retry(StyleError("unknown style")) and not stops_without_retry(ValueError("x"))
    error = NonFiniteLossError("non-finite loss in distill step 1")
    assert unwrap_training_error(ControllerError(error)) is error
    assert unwrap_training_error(WorkerGroupError("w", {1: error})) is error
    assert unwrap_training_error(WorkerGroupError("w", {0: short, 1: error})) is error
    assert unwrap_training_error(WorkerGroupError("w", {1: short})) is short
    assert unwrap_training_error(ControllerError(short)) is short
    assert unwrap_training_error(WorkerGroupError("w", {1: RuntimeError("x")})) is None


def test_a_stream_smaller_than_its_batch_is_an_input_error():
    from dmm_ray.distill.health import TrainingInputError, stops_without_retry
    from dmm_ray.distill.streams import cached_stream

    rows = {"latents": np.zeros((3, 4, 8, 8), np.float32)}
    with pytest.raises(TrainingInputError, match="has 3 rows, fewer than a batch of 4") as info:
        cached_stream(rows, 4, None, None, None, "cpu", "style 0's synthesized samples")
    assert stops_without_retry(info.value)


def test_synthesized_latents_of_another_size_than_the_shards_are_an_input_error():
    """A batch joins common-stream rows and synthesized ones; latents of two sizes (shards encoded at
    another side than their data.encode.resolution says, so the config check passed) raised a plain
    ValueError, which Ray Train retried scaling.max_failures times, re-reading the synthesized sets."""
    import torch

    from dmm_ray.distill.health import TrainingInputError, stops_without_retry
    from dmm_ray.distill.streams import join_batches

    common, synthesized = {"latents": torch.zeros(2, 4, 8, 8)}, {"latents": torch.zeros(2, 4, 16, 16)}
    with pytest.raises(TrainingInputError, match=r"synthesized latents \(4, 16, 16\) and latent shards \(4, 8, 8\) differ") as info:
        join_batches([common, synthesized])
    assert stops_without_retry(info.value)


def test_ctrl_c_after_training_stops_the_merge_again(monkeypatch, capsys, tmp_path):
    """Ray Train's fit() leaves its own SIGINT handler installed (abort the run; exit 0 on the third
    Ctrl-C), which swallowed a Ctrl-C during save / evaluate / register: fit_stage puts the previous
    handler back, and the merge job answers an interrupt with one line and exit code 130."""
    import signal

    from dmm_ray.distill.trainer import fit_stage

    class Trainer:  # what TorchTrainer.fit does to the process's signal handlers
        def fit(self):
            signal.signal(signal.SIGINT, lambda *_: None)
            return "result"

    before = signal.getsignal(signal.SIGINT)
    assert fit_stage(Trainer()) == "result"
    assert signal.getsignal(signal.SIGINT) is before

    class Aborted:  # Ctrl-C during training: Ray Train's handler aborts the run, then sys.exit(0) inside fit()
        def fit(self):
            signal.signal(signal.SIGINT, lambda *_: None)
            sys.exit(0)

    with pytest.raises(KeyboardInterrupt):  # not SystemExit(0): the job exited 1 with only Ray's lines
        fit_stage(Aborted())
    assert signal.getsignal(signal.SIGINT) is before

    import dmm_ray.merge
    from jobs import merge as job

    def interrupted(*_, **__):
        raise KeyboardInterrupt

    monkeypatch.setattr(dmm_ray.merge, "run_merge", interrupted)
    monkeypatch.setattr("dmm_ray.tracking.make_tracker", lambda cfg: None)
    (tmp_path / "c.yaml").write_text(
        "teachers: [{name: a, source: /x/a}, {name: b, source: /x/b}]\nstudent: {base: /x/base}\n"
        f"data: {{base: /x/base, shards: /x/shards}}\noutput_dir: {tmp_path / 'out'}\n"
        f"tracking: {{tracking_uri: 'sqlite:///{tmp_path / 'ml.db'}'}}\n"
    )
    assert job.main(["--config", str(tmp_path / "c.yaml")]) == 130
    assert "interrupted: the last good merged model and the checkpoints stay in output_dir" in capsys.readouterr().err


@pytest.mark.ray
@pytest.mark.slow  # about 45 s on 2 cores; the detection, the message and the stop without retry are tested above without a merge
def test_merge_with_nan_teacher_fails_with_message_and_writes_no_model(ray_cluster, world, tmp_path):
    from dmm_ray.config import MergeConfig
    from dmm_ray.distill.health import NonFiniteLossError
    from dmm_ray.merge import run_merge

    broken = _save_teacher(tmp_path / "teachers" / "broken", nan=True)
    teachers = [world["teachers"][0], {"name": "broken", "source": str(broken)}]
    out = tmp_path / "out"
    cfg = MergeConfig.model_validate(
        tiny_merge_config({**world, "teachers": teachers}, out, distill={"steps": 3, "checkpoint_every": 1}, synthesis={"finetune_steps": 0})
    )
    with pytest.raises(NonFiniteLossError) as info:
        run_merge(cfg)
    message = str(info.value)
    assert message.startswith("non-finite loss in distill step 1 of 3 on rank 1")  # the worker's own words, no Ray wrapper
    assert "style0" not in message  # only the cause: the other worker's NaN gradient is its consequence
    assert "loss_score = nan" in message and "style 'broken'" in message and str(broken) in message
    assert not (out / "merged").exists() and not (out / "merged.tmp").exists()
    assert not list((out / "ray_results").rglob("checkpoint_*"))  # no NaN checkpoint either


@pytest.mark.ray
@pytest.mark.slow  # about 40 s on 2 cores; the callback and the unwrap are tested above without a merge
def test_an_input_error_inside_a_worker_ends_the_merge_with_its_own_message(ray_cluster, world, tmp_path, monkeypatch, capsys):
    """With the driver's check switched off, a synthesized set smaller than its batch is found by the
    workers: the job prints their one line and exits 2 (no Ray traceback, no retries), and no model."""
    import dmm_ray.merge
    from jobs import merge as job

    monkeypatch.setattr(dmm_ray.merge, "check_synthesized_rows", lambda cfg: None)  # the driver only: workers are other processes
    out = tmp_path / "out"
    config = tiny_merge_config(world, out, synthesis={"finetune_steps": 0, "images_per_teacher": 1}, distill={"steps": 2})
    config["data"]["synthetic_fraction"] = 0.5  # 2 synthesized rows of each style per batch of 4, from a set of 1
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    assert job.main(["--config", str(tmp_path / "c.yaml")]) == 2
    err = capsys.readouterr().err
    assert "error: style 0's synthesized samples has 1 rows, fewer than a batch of 2" in err, err[-2000:]
    assert "Traceback" not in err and "TrainingFailedError" not in err
    assert not (out / "merged").exists()


# ---- 2. an MLflow outage never stops training -------------------------------------------------


class _FlakyClient:
    """Stands in for mlflow's MlflowClient: raises on the first `failures` log_batch calls."""

    failures = 0
    calls = 0
    logged: list = []

    def __init__(self, uri):
        self.uri = uri

    def log_batch(self, run_id, metrics=()):
        type(self).calls += 1
        if type(self).calls <= type(self).failures:
            raise ConnectionError("mlflow server unreachable (fake)")
        type(self).logged.extend(metrics)


def _fake_mlflow(monkeypatch, failures: int):
    import mlflow.tracking

    client = type("Client", (_FlakyClient,), {"failures": failures, "calls": 0, "logged": []})
    monkeypatch.setattr(mlflow.tracking, "MlflowClient", client)
    return client


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and r.name == "dmm_ray.tracking"]


def test_mlflow_outage_buffers_metrics_and_writes_them_when_it_returns(monkeypatch, caplog):
    from dmm_ray.tracking import worker_metric_logger

    client = _fake_mlflow(monkeypatch, failures=3)
    log = worker_metric_logger({"uri": "http://127.0.0.1:1", "run_id": "r1", "prefix": "distill/", "retry_s": 0}, rank=0)
    with caplog.at_level(logging.INFO, logger="dmm_ray.tracking"):
        for step in range(1, 6):
            log({"loss_score": 0.1 * step, "lr": 1e-4}, step)  # steps 1-3 fail, step 4 writes 1-4, step 5 writes 5
        log.close()
    assert [(m.key, m.step) for m in client.logged if m.key == "distill/loss_score"] == [("distill/loss_score", s) for s in range(1, 6)]
    assert client.logged[0].value == pytest.approx(0.1)
    assert len(_warnings(caplog)) == 1 and "training goes on" in _warnings(caplog)[0]
    assert log.dropped == 0 and not log.buffer


def test_mlflow_always_down_warns_once_and_never_raises(monkeypatch, caplog):
    from dmm_ray.tracking import worker_metric_logger

    client = _fake_mlflow(monkeypatch, failures=10**9)
    log = worker_metric_logger({"uri": "sqlite:///locked.db", "run_id": "r1", "retry_s": 0}, rank=0)
    log.max_buffered = 5  # bounded: the oldest steps go
    with caplog.at_level(logging.WARNING, logger="dmm_ray.tracking"):
        for step in range(1, 21):
            log({"loss_score": 1.0}, step)  # the training loop's call: never raises
        log.close()
    assert client.calls >= 20 and client.logged == []
    assert len(_warnings(caplog)) == 1, _warnings(caplog)
    assert log.dropped == 20 and not log.buffer


def test_mlflow_logger_backs_off_while_down():
    """While the store is down it is not asked again every step (a down HTTP server costs a timeout)."""
    from dmm_ray.tracking import BufferedMetricLogger

    now = [0.0]
    calls = []

    def write(entries):
        calls.append(len(entries))
        if now[0] < 100:
            raise OSError("database is locked")

    log = BufferedMetricLogger(write, retry_s=30, clock=lambda: now[0])
    for step in range(1, 11):
        now[0] = step
        log({"loss": 1.0}, step)
    assert calls == [1]  # one try, then waits 30 s
    now[0] = 120
    log({"loss": 1.0}, 11)
    assert calls == [1, 11] and not log.buffer  # back: the 10 buffered steps and this one in one batch
    assert BufferedMetricLogger(None)({"loss": 1.0}, 1) is None  # not rank 0 / tracking off: a no-op


# ---- 3. --dry-run catches broken teacher files -----------------------------------------------


@pytest.fixture
def dry_run(world, tmp_path, capsys):
    """Copy of the world's teachers under tmp_path; run(teachers, *flags) -> (exit code, stderr)."""

    from jobs import merge as merge_job

    def run(teachers, *flags):
        config = tmp_path / "merge.yaml"
        config.write_text(yaml.safe_dump(tiny_merge_config({**world, "teachers": teachers}, tmp_path / "out")))
        code = merge_job.main(["--config", str(config), "--dry-run", *flags])
        return code, capsys.readouterr().err

    return run


@pytest.mark.parametrize(
    "evaluation, message",
    [
        ({"enabled": True}, "evaluation: no evaluation prompts"),  # the SD presets had no evaluation section
        ({"enabled": True, "prompts": ["a cat"], "feature_net": "/nonexistent/fnet"}, "evaluation.extractor.path /nonexistent/fnet: not found"),
        ({"enabled": True, "prompts_file": "/nonexistent/prompts.txt"}, "prompts_file '/nonexistent/prompts.txt' does not exist"),
        (
            {"enabled": True, "prompts": ["a cat"], "extractor": {"kind": "import", "path": "no_such_pkg.feats:make"}},
            "evaluation.extractor.path no_such_pkg.feats:make: no module 'no_such_pkg.feats'",
        ),
        ({"enabled": True, "prompts": ["a cat"], "extractor": {"kind": "import", "path": "eval_helpers"}}, "must look like 'package.module:factory'"),
    ],
)
def test_dry_run_checks_what_the_evaluation_after_training_needs(world, tmp_path, capsys, evaluation, message):
    """Missing evaluation prompts or a missing feature extractor used to fail only after the training
    and the save (and the model went unregistered): validate refuses them first, naming the key."""
    from jobs import merge as merge_job

    config = tmp_path / "merge.yaml"
    config.write_text(yaml.safe_dump({**tiny_merge_config(world, tmp_path / "out"), "evaluation": evaluation}))
    assert merge_job.main(["--config", str(config), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert message in err and "evaluation.enabled: false" in err, err
    assert not (tmp_path / "out").exists()


def _copy_teacher(world, tmp_path, name="style1") -> Path:
    src = next(t["source"] for t in world["teachers"] if t["name"] == name)
    dst = tmp_path / "copies" / name
    shutil.copytree(src, dst)
    return dst


def test_dry_run_passes_intact_teachers(dry_run, world):
    code, err = dry_run(world["teachers"], "--deep")
    assert code == 0, err


def test_dry_run_catches_truncated_unet_safetensors(dry_run, world, tmp_path):
    teacher = _copy_teacher(world, tmp_path)
    weights = teacher / "unet" / "diffusion_pytorch_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])  # an interrupted download
    code, err = dry_run([world["teachers"][0], {"name": "style1", "source": str(teacher)}])
    assert code == 2
    assert "teacher 'style1'" in err and str(weights) in err and "truncated" in err


def test_dry_run_catches_pickled_ckpt_without_allow_pickle(dry_run, world, tmp_path):
    ckpt = tmp_path / "old.ckpt"
    torch.save({"state_dict": {"model.diffusion_model.out.2.bias": torch.zeros(4)}}, ckpt)
    code, err = dry_run([world["teachers"][0], {"name": "legacy", "source": str(ckpt), "base": world["base"]}])
    assert code == 2
    assert "teacher 'legacy'" in err and "old.ckpt" in err and "allow_pickle: true" in err


def test_dry_run_catches_missing_files(dry_run, world, tmp_path):
    teacher = _copy_teacher(world, tmp_path)
    (teacher / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    code, err = dry_run([world["teachers"][0], {"name": "style1", "source": str(teacher)}])
    assert code == 2 and "teacher 'style1'" in err and str(teacher / "unet") in err and "no weights file" in err

    shutil.rmtree(teacher / "vae")
    (teacher / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"")  # and an empty one
    code, err = dry_run([world["teachers"][0], {"name": "style1", "source": str(teacher)}])
    assert code == 2 and "teacher 'style1'" in err and "truncated or not a safetensors file" in err

    code, err = dry_run([world["teachers"][0], {"name": "gone", "source": str(tmp_path / "nowhere")}])
    assert code == 2 and "teacher 'gone'" in err and "does not exist" in err


def test_dry_run_prints_the_memory_plan_even_when_teacher_files_are_missing(world, tmp_path, capsys):
    """Planning a layout needs no weights: the plan first, then the error naming the missing teacher."""
    from jobs import merge as merge_job

    teachers = [world["teachers"][0], {"name": "gone", "source": str(tmp_path / "nowhere")}]
    config = tmp_path / "merge.yaml"
    config.write_text(yaml.safe_dump(tiny_merge_config({**world, "teachers": teachers}, tmp_path / "out")))
    code = merge_job.main(["--config", str(config), "--dry-run"])
    out, err = capsys.readouterr()
    assert code == 2 and "teacher 'gone'" in err and "does not exist" in err
    assert "memory plan (per worker" in out and "full teacher UNets" in out and "total" in out
    assert "OK:" not in out


def test_settings_that_would_fail_after_training_are_refused_before_anything_is_written(world, tmp_path, capsys):
    """A tracking store MLflow cannot open, an unwritable evaluation cache, shards that are neither
    there nor encodable: refused by --dry-run and by the merge itself, before Ray starts or the
    output folder exists."""
    from jobs import merge as merge_job

    config = tmp_path / "merge.yaml"
    config.write_text(yaml.safe_dump(tiny_merge_config(world, tmp_path / "out")))
    (tmp_path / "plainfile").write_text("")
    cases = [
        ("tracking.tracking_uri=mlruns", "/mlruns' is a file store"),  # (made absolute: Ray workers log from their own folder)
        (f"evaluation.cache_dir={tmp_path / 'plainfile'}", "evaluation.cache_dir"),  # the evaluation stage is off in the tiny config ...
        (f"data.shards={tmp_path / 'nothing'}", "has no latents and data.source is not set"),
    ]
    for override, says in cases:
        evaluation = ["evaluation.enabled=true", "evaluation.prompts=[a red circle]", "evaluation.extractor.kind=import"]
        evaluation += ["evaluation.extractor.path=eval_helpers:SeededConvExtractor"]  # ... so switch it on, with what it needs
        extra = [a for s in evaluation for a in ("--set", s)] if "evaluation" in override else []
        for flags in (["--dry-run"], []):
            code = merge_job.main(["--config", str(config), "--set", override, *extra, *flags])
            err = capsys.readouterr().err
            assert code == 2 and says in err, (override, flags, err)
            assert not (tmp_path / "out").exists()  # nothing written, no lock taken


@pytest.mark.parametrize(
    "overrides, says",
    [
        (
            ["synthesis.images_per_teacher=3", "data.synthetic_fraction=0.5", "data.stream.batch_size=8"],
            "synthesis.images_per_teacher=3 is fewer than the 4 synthesized rows of each style that one batch takes "
            "(data.synthetic_fraction=0.5 of data.stream.batch_size=8)",
        ),
        (["synthesis.images_per_teacher=1"], "fewer than the 2 synthesized rows of each style that one batch takes (synthesis.finetune_batch_size)"),
        (  # the style's replicas share its set out: 3 rows each
            ["synthesis.images_per_teacher=6", "data.synthetic_fraction=0.5", "data.stream.batch_size=8", "scaling.workers_per_teacher=2"],
            "that one batch takes (data.synthetic_fraction=0.5 of data.stream.batch_size=8) for each of its 2 workers "
            "(scaling.workers_per_teacher); synthesize at least 8",
        ),
        (  # the mixture rows are a stream of their own, of each style's set: 8 rows, of 4 synthesized
            ["data.synthetic_fraction=0.25", "data.stream.batch_size=8", "scaling.teachers_per_worker=2", "distill.mixture_fraction=1.0"],
            "synthesis.images_per_teacher=4 is fewer than the 8 synthesized rows of each style that one batch takes "
            "(distill.mixture_fraction=1.0 of data.stream.batch_size=8)",
        ),
    ],
)
def test_too_few_synthesized_images_for_one_batch_are_refused_before_anything_is_written(world, tmp_path, capsys, overrides, says):
    """A style's synthesized set smaller than the rows one batch takes of it used to stop the merge only
    after the synthesis, inside Ray Train ('style 8's synthesized samples has 8 rows, fewer than a batch of 16';
    for the mixture rows: 'style 0's mixture samples has 4 rows, fewer than a batch of 8')."""
    from jobs import merge as merge_job

    config = tmp_path / "merge.yaml"
    config.write_text(yaml.safe_dump(tiny_merge_config(world, tmp_path / "out")))
    sets = [a for s in overrides for a in ("--set", s)]
    for flags in (["--dry-run"], []):
        code = merge_job.main(["--config", str(config), *sets, *flags])
        err = capsys.readouterr().err
        assert code == 2 and says in err, (flags, err)
        assert not (tmp_path / "out").exists()
    assert merge_job.main(["--config", str(config), "--dry-run"]) == 0  # the fixture's 4 images fill its batches


@pytest.mark.parametrize(
    "content, says",
    [(None, "synthesis.prompts: prompt file '{path}' does not exist"), ("\n  \n", "synthesis.prompts: prompt file '{path}' holds no prompts")],
    ids=["missing", "empty"],
)
def test_a_synthesis_prompt_file_that_gives_no_prompts_is_refused_before_anything_is_written(world, tmp_path, capsys, content, says):
    """The fixture fine-tunes, so synthesis runs after distill: a synthesis.prompts file that is not there
    (or holds no prompt) passed --dry-run and stopped the merge in the synthesis stage, after the training."""
    from jobs import merge as merge_job

    prompts = tmp_path / "synthesis_prompts.txt"
    if content is not None:
        prompts.write_text(content)
    config = tmp_path / "merge.yaml"
    config.write_text(yaml.safe_dump(tiny_merge_config(world, tmp_path / "out", synthesis={"prompts": str(prompts)})))
    for flags in (["--dry-run"], []):
        code = merge_job.main(["--config", str(config), *flags])
        err = capsys.readouterr().err
        assert code == 2 and says.format(path=prompts) in err, (flags, err)
        assert not (tmp_path / "out").exists()
    prompts.write_text("a red circle\n")
    assert merge_job.main(["--config", str(config), "--dry-run"]) == 0


def test_a_synthesis_prompt_file_the_few_step_stage_samples_with_is_refused_before_the_merge(world, tmp_path, capsys):
    """A merge with fast.enabled whose few-step stage samples the merged model (fast.synthetic_source merged)
    reads synthesis.prompts after the whole merge: with no merge stage synthesizing (no fine-tune,
    data.synthetic_fraction 0) a missing file passed --dry-run, and the merge trained, saved and evaluated
    before the few-step stage stopped on it."""
    from jobs import merge as merge_job

    prompts = tmp_path / "synthesis_prompts.txt"
    fast = {"enabled": True, "synthetic_fraction": 0.5, "synthetic_source": "merged"}
    config = tmp_path / "merge.yaml"
    tree = tiny_merge_config(world, tmp_path / "out", synthesis={"prompts": str(prompts), "finetune_steps": 0}, fast=fast)
    config.write_text(yaml.safe_dump(tree))
    for flags in (["--dry-run"], []):
        code = merge_job.main(["--config", str(config), *flags])
        err = capsys.readouterr().err
        assert code == 2 and f"synthesis.prompts: prompt file '{prompts}' does not exist" in err, (flags, err)
        assert not (tmp_path / "out").exists()
    prompts.write_text("a red circle\n")
    assert merge_job.main(["--config", str(config), "--dry-run"]) == 0


@pytest.mark.parametrize(
    "source, refusal",
    [
        # merged-model samples: synthesis.images_per_teacher per style
        ("merged", ["samples 4 images x 2 styles = 8 rows (synthesis.images_per_teacher: fast.synthetic_images is unset), fewer than the 16"]),
        # the teachers' synthesized sets (it fine-tunes: 4 images x 2 teachers)
        (
            "teachers",
            [
                "the merge synthesizes 4 images x 2 teachers = 8 rows (synthesis.images_per_teacher), fewer than the 16",
                "synthesize at least 8 per teacher",
            ],
        ),
    ],
)
def test_too_few_samples_for_the_few_step_stage_are_refused_before_the_merge(world, tmp_path, capsys, source, refusal):
    """A merge with fast.enabled whose samples for the few-step stage (fast.synthetic_source merged: the merged
    model's; teachers: the merge's synthesized sets) do not fill the synthesized rows of one few-step batch passed
    --dry-run: the merge trained, saved and evaluated, and then the few-step workers stopped."""
    from jobs import merge as merge_job

    fast = {"enabled": True, "synthetic_fraction": 0.5, "synthetic_source": source, "batch_size": 16}
    config = tmp_path / "merge.yaml"
    tree = tiny_merge_config(world, tmp_path / "out", fast=fast)  # 8 rows; a batch takes 8
    config.write_text(yaml.safe_dump(tree))
    assert merge_job.main(["--config", str(config), "--dry-run"]) == 0
    config.write_text(yaml.safe_dump({**tree, "fast": {**fast, "batch_size": 32}}))  # takes 16
    for flags in (["--dry-run"], []):
        code = merge_job.main(["--config", str(config), *flags])
        err = capsys.readouterr().err
        assert code == 2 and all(part in err for part in refusal), (flags, err)
        assert not (tmp_path / "out").exists()


def test_dry_run_deep_finds_nan_tensor(dry_run, world, tmp_path):
    broken = _save_teacher(tmp_path / "broken", nan=True)
    teachers = [world["teachers"][0], {"name": "broken", "source": str(broken)}]
    code, err = dry_run(teachers)  # the cheap scan reads headers only: a NaN value passes it
    assert code == 0, err
    code, err = dry_run(teachers, "--deep")
    assert code == 2
    assert "teacher 'broken'" in err and "unet/diffusion_pytorch_model.safetensors" in err
    assert "'conv_out.bias' has 1 NaN/Inf value(s)" in err


def test_file_check_takes_every_teacher_format(world, tmp_path):
    """No false alarm on single files, LoRAs (+ their base) and allowed .ckpt; a truncated single file is caught."""
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from dmm_ray.formats.single_file import export_single_file
    from dmm_ray.teachers import TeacherError, TeacherSpec, check_teacher_files

    pipe = StableDiffusionPipeline.from_pretrained(world["base"])
    export_single_file(pipe, tmp_path / "single.safetensors")
    torch.save(pipe.unet.state_dict(), tmp_path / "unet.ckpt")
    pipe.unet.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_v"]))
    StableDiffusionPipeline.save_lora_weights(tmp_path / "lora", unet_lora_layers=get_peft_model_state_dict(pipe.unet), safe_serialization=True)
    lora = next((tmp_path / "lora").glob("*.safetensors"))
    specs = [
        TeacherSpec(name="single", source=str(tmp_path / "single.safetensors"), base=world["base"]),
        TeacherSpec(name="lora", source=str(lora), base=world["base"]),
        TeacherSpec(name="ckpt", source=str(tmp_path / "unet.ckpt"), base=world["base"], allow_pickle=True),
    ]
    check_teacher_files(specs, deep=True)
    data = (tmp_path / "single.safetensors").read_bytes()
    (tmp_path / "single.safetensors").write_bytes(data[:-100])
    with pytest.raises(TeacherError, match=r"teacher 'single': .*single.safetensors is truncated"):
        check_teacher_files(specs[:1])


def test_deep_without_dry_run_is_refused(dry_run):
    from jobs import merge as merge_job

    with pytest.raises(SystemExit):
        merge_job.main(["--deep"])


# ---- 4. Serve deletes the temporary download of a models:/ model -----------------------------


@pytest.fixture
def logged_model_uri(tmp_path, monkeypatch):
    """The tiny merged model logged as a run artifact of a fresh SQLite store: `runs:/<id>/merged_model`."""
    import mlflow
    from serve_helpers import tiny_model_dir

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    experiment = mlflow.create_experiment("serve-cleanup", artifact_location=(tmp_path / "artifacts").as_uri())
    with mlflow.start_run(experiment_id=experiment) as run:
        mlflow.log_artifacts(str(tiny_model_dir()), "merged_model")
    return f"runs:/{run.info.run_id}/merged_model"


def _recording_tempdirs(monkeypatch) -> list:
    """The TemporaryDirectory objects serve.model makes, in order."""
    import serve.model as model

    made = []
    real = model.tempfile.TemporaryDirectory

    def recording(*args, **kwargs):
        made.append(real(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(model.tempfile, "TemporaryDirectory", recording)
    return made


def test_serve_backend_deletes_its_download_once_loaded(logged_model_uri, monkeypatch):
    """The download goes as soon as the model is in memory: a replica killed later (SIGTERM on
    `serve run`, SIGKILL) cannot leave a copy of the weights in /tmp."""
    from serve.model import StyleModelBackend

    made = _recording_tempdirs(monkeypatch)
    backend = StyleModelBackend(logged_model_uri, device="cpu")
    download = Path(made[0].name)
    assert download in backend.path.parents and download.name.startswith("dmm-serve-model-")  # it was really downloaded there
    assert not download.exists() and backend.download_dir is None
    from serve.schemas import Sample

    size = backend.native_size[0]
    weights = (1.0,) + (0.0,) * (len(backend.style_names) - 1)
    image = backend.generate([Sample("a cat", None, weights, 2, 5.0, size, size, 0)])
    assert image[0].shape == (size, size, 3)  # and the model still works from memory
    backend.close()  # idempotent


def test_serve_replica_keeps_no_download(logged_model_uri, monkeypatch):
    """A replica, once started, holds no download: nothing is left for a shutdown (redeploy, a
    replaced model, scale-down, a killed `serve run`) to delete."""
    from serve.deployments import StyleModel

    made = _recording_tempdirs(monkeypatch)
    replica = StyleModel.func_or_class(logged_model_uri, device="cpu")
    assert made and not Path(made[0].name).exists() and replica.backend.style_names


def test_serve_failed_load_leaves_no_download(logged_model_uri, monkeypatch):
    import serve.model as model

    made = _recording_tempdirs(monkeypatch)
    import dmm_ray.pipeline as dmm_pipeline

    monkeypatch.setattr(dmm_pipeline, "load_dmm_pipeline", lambda *a, **k: (_ for _ in ()).throw(OSError("corrupt")))
    with pytest.raises(model.ModelLoadError, match="could not load a DMMPipeline"):
        model.StyleModelBackend(logged_model_uri, device="cpu")
    assert made and not Path(made[0].name).exists()
