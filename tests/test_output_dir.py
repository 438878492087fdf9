"""One merge per output_dir (dmm_ray/output_lock.py) and a merged model that survives a crash mid-save
(dmm_ray/merge.py: _swap_in / recover_merged). No Ray: the lock is taken before Ray starts, and the
crash states are made on disk."""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from merge_fixtures import build_world, hold_in_another_process, kill_between_save_and_record, tiny_merge_config

from dmm_ray import merge, merged_model, output_lock
from dmm_ray.config import MergeConfig
from dmm_ray.output_lock import OutputDirBusyError

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return build_world(tmp_path_factory.mktemp("output_dir_world"))


def _write_lock(out: Path, pid: int, host: str | None = None, started: float | None = None) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = output_lock.lock_path(out)
    path.write_text(json.dumps({"host": host or socket.gethostname(), "pid": pid, "started": time.time() - 5 if started is None else started}))
    return path


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


# ---- 1. the lock ---------------------------------------------------------------------------------


def test_live_lock_refuses_before_ray_and_names_the_owner(world, tmp_path, monkeypatch):
    out = tmp_path / "out"
    lock = _write_lock(out, os.getpid())  # another "owner" that is alive: this very process
    monkeypatch.setattr(merge, "_merge", lambda *a: pytest.fail("the merge body ran although output_dir is locked"))
    with pytest.raises(OutputDirBusyError) as error:
        merge.run_merge(MergeConfig.model_validate(tiny_merge_config(world, out)))
    text = str(error.value)
    assert text.startswith(f"output_dir {out} is in use by another merge (")  # names the folder, as README's example
    assert f"pid {os.getpid()}" in text and f"host {socket.gethostname()}" in text and "output_dir=NEW_DIR" in text
    assert json.loads(lock.read_text())["pid"] == os.getpid()  # the owner's lock is untouched


def test_lock_of_another_host_refuses_and_says_how_to_remove_it(tmp_path):
    lock = _write_lock(tmp_path, 1, host="some-other-node")
    with pytest.raises(OutputDirBusyError, match="host some-other-node, pid 1") as error:
        output_lock.acquire(tmp_path)
    assert f"delete {lock}" in str(error.value) and str(error.value).startswith(f"output_dir {tmp_path} is in use")


def test_stale_lock_of_a_dead_process_is_taken_over_with_a_warning(tmp_path):
    _write_lock(tmp_path, _dead_pid())
    warnings = []
    owner = output_lock.acquire(tmp_path, warn=warnings.append)
    assert owner["pid"] == os.getpid() and json.loads(output_lock.lock_path(tmp_path).read_text()) == owner
    assert len(warnings) == 1 and "stale lock" in warnings[0] and "no longer running" in warnings[0]
    output_lock.release(tmp_path, owner)
    assert not output_lock.lock_path(tmp_path).exists()


def test_lock_whose_pid_was_reused_after_it_was_written_is_stale(tmp_path):
    # this process is alive but started long after the lock (as after a reboot that reused the pid)
    _write_lock(tmp_path, os.getpid(), started=1_000_000.0)
    owner = output_lock.acquire(tmp_path, warn=lambda _: None)
    assert owner["started"] > 1_000_000.0


def test_lock_is_held_during_the_merge_and_gone_after_it_returns_or_raises(world, tmp_path, monkeypatch):
    out = tmp_path / "out"
    cfg = MergeConfig.model_validate(tiny_merge_config(world, out))
    seen = []

    def body(cfg, out, tracker, restart, started, encode_plan=None):
        seen.append(json.loads(output_lock.lock_path(out).read_text()))
        return "result"

    monkeypatch.setattr(merge, "_merge", body)
    assert merge.run_merge(cfg) == "result"
    assert seen[0]["pid"] == os.getpid() and seen[0]["host"] == socket.gethostname()
    assert not output_lock.lock_path(out).exists()

    def crash(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(merge, "_merge", crash)
    with pytest.raises(RuntimeError, match="boom"):
        merge.run_merge(cfg)
    assert not output_lock.lock_path(out).exists()
    # after a crash that skipped the cleanup (SIGKILL), the next run takes the dead owner's lock over
    _write_lock(out, _dead_pid())
    monkeypatch.setattr(merge, "_merge", body)
    assert merge.run_merge(cfg) == "result" and not output_lock.lock_path(out).exists()


def test_release_never_removes_another_owners_lock(tmp_path):
    owner = output_lock.acquire(tmp_path)
    _write_lock(tmp_path, 1, host="some-other-node")  # e.g. someone deleted ours and another merge took it
    output_lock.release(tmp_path, owner)
    assert output_lock.read_owner(output_lock.lock_path(tmp_path))["host"] == "some-other-node"


def test_merge_job_refuses_a_locked_output_dir_with_exit_2(world, tmp_path):
    out = tmp_path / "out"
    _write_lock(out, os.getpid())
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(tiny_merge_config(world, out)))
    proc = subprocess.run([sys.executable, str(REPO / "jobs" / "merge.py"), "--config", str(path)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert f"pid {os.getpid()}" in proc.stderr and "in use by another merge" in proc.stderr
    assert "Started a local Ray" not in proc.stdout + proc.stderr


# ---- 2. the merged model survives a crash mid-save -----------------------------------------------


def _model(path: Path, tag: str) -> Path:
    (path / "unet").mkdir(parents=True)
    (path / "unet" / "config.json").write_text(json.dumps({"tag": tag}))
    return path


def _tag(path: Path) -> str:
    return json.loads((path / "unet" / "config.json").read_text())["tag"]


def test_crash_between_the_two_renames_is_recovered(tmp_path, monkeypatch):
    dest = _model(tmp_path / "merged", "good")
    _model(tmp_path / "merged.tmp", "new")
    real_replace, calls = os.replace, []

    def crash_on_second(src, dst):  # killed (SIGKILL) between the renames: nothing after runs, no restore either
        calls.append((src, dst))
        if len(calls) >= 2:
            raise KeyboardInterrupt("killed between the renames")
        real_replace(src, dst)

    monkeypatch.setattr(merged_model.os, "replace", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        merged_model.swap_in(tmp_path / "merged.tmp", dest)
    monkeypatch.setattr(merged_model.os, "replace", real_replace)
    assert not dest.exists() and (tmp_path / "merged.old").is_dir()  # the state a crash leaves

    from dmm_ray.architectures import merged_folder

    assert merged_folder(dest) == tmp_path / "merged.old"  # a loader still finds the last good model
    done = merge.recover_merged(dest)
    assert _tag(dest) == "good" and len(done) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]
    assert merged_folder(dest) == dest

    # a second rename that fails once (a Ctrl-C, a full disk): swap_in puts the earlier model back at once
    _model(tmp_path / "merged.tmp", "new")
    calls.clear()

    def fail_second_once(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:
            raise OSError("no space left on device")
        real_replace(src, dst)

    monkeypatch.setattr(merged_model.os, "replace", fail_second_once)
    with pytest.raises(OSError, match="no space"):
        merged_model.swap_in(tmp_path / "merged.tmp", dest)
    assert _tag(dest) == "good" and not (tmp_path / "merged.old").exists()


@pytest.mark.parametrize("leftover", ["merged.old", "merged.tmp"])
def test_leftovers_beside_a_good_model_are_removed(tmp_path, leftover):
    dest = _model(tmp_path / "merged", "good")
    _model(tmp_path / leftover, "stale")
    assert merge.recover_merged(dest) == [f"removed {tmp_path / leftover} left behind by an interrupted save"]
    assert _tag(dest) == "good" and sorted(p.name for p in tmp_path.iterdir()) == ["merged"]
    assert merge.recover_merged(dest) == []  # nothing to do on a clean folder


def test_a_half_written_first_save_is_removed(tmp_path):
    (tmp_path / "merged.tmp").mkdir()  # killed inside save_pretrained before any model existed
    merge.recover_merged(tmp_path / "merged")
    assert list(tmp_path.iterdir()) == []


def test_merge_recovers_before_anything_else(world, tmp_path, monkeypatch):
    out = tmp_path / "out"
    _model(out / "merged.old", "good")
    _model(out / "merged.tmp", "new")

    def stop(cfg, restart=False):
        raise RuntimeError("stop after recovery")

    monkeypatch.setattr(merge, "check_output_dir", stop)  # the first step after recovery (validation reads only)
    with pytest.raises(RuntimeError, match="stop after recovery"):
        merge.run_merge(MergeConfig.model_validate(tiny_merge_config(world, out)))
    assert _tag(out / "merged") == "good" and not (out / "merged.old").exists() and not (out / "merged.tmp").exists()


def test_save_merged_leaves_only_the_new_model(world, tmp_path):
    import diffusers

    from dmm_ray.models.style_unet import StyleUNet
    from dmm_ray.pipeline import load_dmm_pipeline

    cfg = MergeConfig.model_validate(tiny_merge_config(world, tmp_path / "out")).with_absolute_paths()
    student = tmp_path / "student"
    StyleUNet.from_unet(diffusers.UNet2DConditionModel.from_pretrained(Path(world["base"]) / "unet"), ["style0", "style1"]).save_pretrained(student)
    dest = tmp_path / "out" / "merged"
    merge.save_merged(cfg, student, dest)
    _model(tmp_path / "out" / "merged.old", "stale")  # a leftover from an older crash is no obstacle
    merge.save_merged(cfg, student, dest)
    assert sorted(p.name for p in dest.parent.iterdir()) == ["merged"]
    assert load_dmm_pipeline(dest).styles == ["style0", "style1"]


@pytest.mark.parametrize("error", [OSError(28, "No space left on device"), KeyboardInterrupt()], ids=["error", "ctrl-c"])
def test_a_save_that_fails_part_way_keeps_the_last_good_model_and_leaves_nothing_half_written(world, tmp_path, monkeypatch, error):
    """A save that failed (or was interrupted) after its first weights file kept the last good model,
    but left the half-written merged.tmp beside it until the next merge (the weighted merge's and the
    export's saves remove theirs at once)."""
    import diffusers
    from merge_fixtures import fail_weight_writes_after

    from dmm_ray.models.style_unet import StyleUNet
    from dmm_ray.pipeline import load_dmm_pipeline

    cfg = MergeConfig.model_validate(tiny_merge_config(world, tmp_path / "out")).with_absolute_paths()
    student = tmp_path / "student"
    StyleUNet.from_unet(diffusers.UNet2DConditionModel.from_pretrained(Path(world["base"]) / "unet"), ["style0", "style1"]).save_pretrained(student)
    dest = merge.save_merged(cfg, student, tmp_path / "out" / "merged")
    before = {p: p.read_bytes() for p in dest.rglob("*") if p.is_file()}
    tried = fail_weight_writes_after(monkeypatch, 1, error)
    with pytest.raises(type(error)):
        merge.save_merged(cfg, student, dest)
    monkeypatch.undo()
    assert len(tried) == 2 and sorted(p.name for p in dest.parent.iterdir()) == ["merged"]
    assert {p: p.read_bytes() for p in dest.rglob("*") if p.is_file()} == before
    assert load_dmm_pipeline(dest).styles == ["style0", "style1"]


def _stand_in_stages(monkeypatch, out: Path, ran: list[str], failing: str, error: str) -> list[bool]:
    """Puts stand-ins (no Ray) in place of the merge's stages and its cluster set-up. Each stage appends
    its name to `ran`; distill records its metrics, save writes a merged model, track is the real
    track_stage, fast writes a few-step model; the stage `failing` raises RuntimeError(error) while the
    returned flag's [0] is True (a test clears it to let the stage pass)."""
    fail = [True]

    def stage(name):
        def run(merge_run):
            ran.append(name)
            if name == failing and fail[0]:
                raise RuntimeError(error)
            if name == "distill":
                merge_run.timed("distill", 0.0, {"step": 2})
            if name == "save":
                (out / "merged").mkdir(parents=True, exist_ok=True)
                (out / "merged" / "model_index.json").write_text("{}")
            if name == "track":
                merge.track_stage(merge_run)
            if name == "fast":
                (out / "fast" / "model").mkdir(parents=True, exist_ok=True)
                (out / "fast" / "model" / "model_index.json").write_text("{}")
                (out / "fast" / "model" / "fast.json").write_text("{}")  # a few-step model, as the stage saves it

        return run

    monkeypatch.setattr(merge, "STAGES", tuple(merge.Stage(s.name, stage(s.name), s.when) for s in merge.STAGES))
    monkeypatch.setattr(merge, "init_for_training", lambda address: False)
    monkeypatch.setattr(merge, "plan_cluster", lambda cfg: None)
    monkeypatch.setattr(merge, "with_plan", lambda cfg, plan: cfg)
    return fail


def test_a_merge_whose_fast_stage_failed_runs_only_that_stage_again(world, tmp_path, monkeypatch):
    """A merge with fast.enabled whose few-step stage failed after the merged model was saved and
    registered: the same command again (or with other fast: settings) runs only the few-step stage, so
    the merged model is not saved or registered a second time; then the merge is complete. Another
    value outside fast: merges again. The stages are stand-ins (no Ray) that count their runs."""
    out = tmp_path / "out"
    cfg = MergeConfig.model_validate(tiny_merge_config(world, out, fast={"enabled": True})).with_absolute_paths()
    ran: list[str] = []

    class Tracker:  # the merge's tracker: each finish_stage registers the merged model as a new version
        enabled = False

        def start_stage(self, name, cfg, run_name=None):
            return {"run_id": f"run{ran.count('register') + 1}"}  # the merge run that registers the next version

        def finish_stage(self, cfg, result):
            ran.append("register")

        def abort(self, error):
            pass

    fail_fast = _stand_in_stages(monkeypatch, out, ran, failing="fast", error="the few-step stage failed")
    monkeypatch.setattr(merge, "ensure_latents", lambda cfg, plan=None: None)
    with pytest.raises(RuntimeError, match="few-step stage failed"):
        merge.run_merge(cfg, tracker=Tracker())
    assert ran == ["distill", "synthesize", "finetune", "save", "evaluate", "track", "register", "fast"]
    ran.clear()
    with pytest.raises(RuntimeError, match="few-step stage failed"):  # the same command: only the failed stage
        merge.run_merge(cfg, tracker=Tracker())
    assert ran == ["fast"]
    ran.clear()
    fail_fast[0] = False
    other_fast = cfg.model_copy(update={"fast": cfg.fast.model_copy(update={"steps": cfg.fast.steps + 1})})
    result = merge.run_merge(other_fast, tracker=Tracker())  # fast: settings fixed: still only that stage
    assert ran == ["fast"] and result.run_id == "run1" and result.location == str(out / "merged")
    ran.clear()
    assert merge.run_merge(other_fast, tracker=Tracker()).already_complete and ran == []
    without_fast = other_fast.model_copy(update={"fast": other_fast.fast.model_copy(update={"enabled": False})})
    assert merge.run_merge(without_fast, tracker=Tracker()).already_complete and ran == []  # its merged model is there
    changed = other_fast.model_copy(update={"distill": other_fast.distill.model_copy(update={"steps": 3})})
    merge.run_merge(changed, tracker=Tracker())
    assert ran == ["distill", "synthesize", "finetune", "save", "evaluate", "track", "register", "fast"]


def test_a_merge_whose_evaluation_failed_after_the_save_runs_only_the_stages_after_it(world, tmp_path, monkeypatch):
    """A merge that saved its model and then failed in evaluate (or track): the same command again, or
    one with other evaluation: settings, skips the training and the save (it used to run every stage
    again, to save the same model) and runs evaluate, track and fast on the saved model, in a new stage
    run that logs what the first run's training measured. Another value outside evaluation: and fast:
    merges again. The stages are stand-ins (no Ray) that count their runs."""
    out = tmp_path / "out"
    cfg = MergeConfig.model_validate(tiny_merge_config(world, out, fast={"enabled": True})).with_absolute_paths()
    ran: list[str] = []

    class Tracker:  # each start_stage opens a new stage run
        enabled = False
        runs = 0

        def start_stage(self, name, cfg, run_name=None):
            ran.append("start")
            self.runs += 1
            return {"run_id": f"run{self.runs}"}

        def finish_stage(self, cfg, result):
            ran.append(f"register {sorted(result.stage_metrics)}")

        def abort(self, error):
            pass

    fail_evaluate = _stand_in_stages(monkeypatch, out, ran, failing="evaluate", error="the evaluation failed")
    monkeypatch.setattr(merge, "ensure_latents", lambda cfg, plan=None: ran.append("encode"))
    tracker = Tracker()
    with pytest.raises(RuntimeError, match="the evaluation failed"):
        merge.run_merge(cfg, tracker=tracker)
    assert ran == ["encode", "start", "distill", "synthesize", "finetune", "save", "evaluate"]
    ran.clear()
    with pytest.raises(RuntimeError, match="the evaluation failed"):  # the same command: from the evaluation on
        merge.run_merge(cfg, tracker=tracker)
    assert ran == ["start", "evaluate"]
    ran.clear()
    fail_evaluate[0] = False
    fixed = cfg.model_copy(update={"evaluation": cfg.evaluation.model_copy(update={"images_per_prompt": 2})})
    result = merge.run_merge(fixed, tracker=tracker)
    assert ran == ["start", "evaluate", "track", "register ['distill']", "fast"] and result.run_id == "run3"
    ran.clear()
    assert merge.run_merge(fixed, tracker=tracker).already_complete and ran == []
    merge.forget(out, merge.COMPLETE_RECORD)
    merge.record_complete(fixed, out, result, evaluate_pending=True)  # saved, then failed, once more
    changed = fixed.model_copy(update={"distill": fixed.distill.model_copy(update={"steps": 3})})
    merge.run_merge(changed, tracker=tracker)
    assert ran == ["encode", "start", "distill", "synthesize", "finetune", "save", "evaluate", "track", "register ['distill']", "fast"]


class _StandInTracker:
    """The merge's tracker without MLflow: its stage runs are numbered run1, run2, ...; finish_stage (the track
    stage's logging and registration) raises `error` while `store_down[0]`, else appends "register" to `ran`."""

    def __init__(self, ran: list, store_down: list, error: Exception | None = None, enabled: bool = True):
        self.ran, self.store_down, self.error, self.enabled, self.runs = ran, store_down, error, enabled, 0

    def start_stage(self, name, cfg, run_name=None):
        self.runs += 1
        return {"run_id": f"run{self.runs}"}

    def finish_stage(self, cfg, result):
        if self.store_down[0]:
            raise self.error
        self.ran.append("register")

    def abort(self, error):
        pass


def test_a_tracking_store_that_fails_at_track_stops_none_of_the_work(world, tmp_path, monkeypatch):
    """Tracking is an observer: an MLflow store that fails when the merge logs and registers its model
    (a server gone down, after MLflow's retries) failed the job after the save, and the few-step stage
    (fast.enabled) never ran. Now the warning names the store and how to log it later, the few-step
    stage runs (without MLflow: the store has just failed), the result says so (jobs/merge.py exits 3),
    and the merge stays recorded as saved: the same command, once the store answers, skips the training
    and the save and logs the model; then the merge is complete."""
    from mlflow.exceptions import MlflowException

    out = tmp_path / "out"
    cfg = MergeConfig.model_validate(tiny_merge_config(world, out, fast={"enabled": True})).with_absolute_paths()
    ran: list[str] = []
    store_down = [True]

    def Tracker():
        error = MlflowException("API request to http://mlflow:5000/api/2.0/mlflow/runs/log-batch failed: Max retries exceeded")
        return _StandInTracker(ran, store_down, error)

    _stand_in_stages(monkeypatch, out, ran, failing="none", error="")
    monkeypatch.setattr(merge, "ensure_latents", lambda cfg, plan=None: None)
    said: list[str] = []
    monkeypatch.setattr(merge, "say", lambda who, msg: said.append(msg))
    tracker = Tracker()
    result = merge.run_merge(cfg, tracker=tracker)
    assert ran == ["distill", "synthesize", "finetune", "save", "evaluate", "track", "fast"]
    assert result.run_id is None and (out / "fast" / "model" / "model_index.json").exists()
    warning = [line for line in said if line.startswith("warning:")]
    assert len(warning) == 1 and result.tracking_failed in warning[0]
    assert str(out / "merged") in warning[0] and cfg.tracking.tracking_uri in warning[0] and "Max retries exceeded" in warning[0]
    assert "re-run the same command" in warning[0]
    ran.clear()
    store_down[0] = False
    result = merge.run_merge(cfg, tracker=tracker)  # the store answers again: the same command logs the model
    assert ran == ["evaluate", "track", "register", "fast"] and result.run_id == "run2" and not result.tracking_failed
    ran.clear()
    assert merge.run_merge(cfg, tracker=tracker).already_complete and ran == []


def test_after_the_merges_store_failed_its_few_step_stage_is_not_recorded_complete(world, tmp_path, monkeypatch):
    """The merge's store failed in its track stage: its few-step stage runs without MLflow (run_fast's tracker None)
    and is told why (untracked), so it is not recorded complete; a completion record made the re-run that logs the
    merged model find the few-step stage complete, and its model was never registered."""
    from dmm_ray.fast import job as fast_job

    out = tmp_path / "out"
    cfg = MergeConfig.model_validate(tiny_merge_config(world, out, fast={"enabled": True})).with_absolute_paths()
    ran: list[str] = []
    store_down = [True]

    def Tracker():
        return _StandInTracker(ran, store_down, RuntimeError("the store went away"))

    _stand_in_stages(monkeypatch, out, ran, failing="none", error="")
    monkeypatch.setattr(merge, "STAGES", tuple(merge.Stage(s.name, merge.fast_stage, s.when) if s.name == "fast" else s for s in merge.STAGES))
    monkeypatch.setattr(merge, "ensure_latents", lambda cfg, plan=None: None)
    monkeypatch.setattr("dmm_ray.tracking.make_tracker", lambda cfg: "the few-step stage's tracker")
    calls = []

    def run_fast(cfg, model_dir, tracker=None, evaluate=True, merge_saved_model=False, untracked=None, requested=None):
        ran.append("fast")
        calls.append((tracker, untracked))
        return fast_job.FastResult(model_path=out / "fast" / "model", tracking_failed=untracked)

    monkeypatch.setattr(fast_job, "run_fast", run_fast)
    result = merge.run_merge(cfg, tracker=Tracker())
    assert calls == [(None, result.tracking_failed)] and "the store went away" in result.tracking_failed
    ran.clear()
    store_down[0] = False
    result = merge.run_merge(cfg, tracker=Tracker())  # the store answers: the merged model is logged, the few-step stage runs with MLflow
    assert ran == ["evaluate", "track", "register", "fast"] and calls[-1] == ("the few-step stage's tracker", None) and not result.tracking_failed


def test_a_merge_whose_few_step_model_could_not_be_logged_says_so_and_logs_it_on_the_same_command(world, tmp_path, monkeypatch):
    """The few-step stage's own store failure (its model saved, not logged: run_fast's tracking_failed) is the
    merge's too (jobs/merge.py exits 3), and the merge is not recorded complete: the same command runs only the
    few-step stage again (which logs it); then the merge is complete."""
    from dmm_ray.fast import job as fast_job

    out = tmp_path / "out"
    cfg = MergeConfig.model_validate(tiny_merge_config(world, out, fast={"enabled": True})).with_absolute_paths()
    ran: list[str] = []

    def Tracker():
        return _StandInTracker(ran, [False], enabled=False)

    _stand_in_stages(monkeypatch, out, ran, failing="none", error="")
    monkeypatch.setattr(merge, "STAGES", tuple(merge.Stage(s.name, merge.fast_stage, s.when) if s.name == "fast" else s for s in merge.STAGES))
    monkeypatch.setattr(merge, "ensure_latents", lambda cfg, plan=None: None)
    store_down = [True]

    def run_fast(cfg, model_dir, tracker=None, evaluate=True, merge_saved_model=False, untracked=None, requested=None):
        ran.append("fast")
        assert untracked is None  # its merge's store answered
        (out / "fast" / "model").mkdir(parents=True, exist_ok=True)  # a few-step model, as the stage saves it
        (out / "fast" / "model" / "model_index.json").write_text("{}")
        (out / "fast" / "model" / "fast.json").write_text("{}")
        failed = "the few-step model is saved (...) but MLflow could not log it" if store_down[0] else None
        return fast_job.FastResult(model_path=out / "fast" / "model", tracking_failed=failed)

    monkeypatch.setattr(fast_job, "run_fast", run_fast)
    result = merge.run_merge(cfg, tracker=Tracker())
    assert ran == ["distill", "synthesize", "finetune", "save", "evaluate", "track", "register", "fast"]
    assert result.tracking_failed == result.fast.tracking_failed and result.run_id == "run1"
    ran.clear()
    store_down[0] = False
    result = merge.run_merge(cfg, tracker=Tracker())  # the same command: only the few-step stage, which logs it now
    assert ran == ["fast"] and not result.tracking_failed
    ran.clear()
    assert merge.run_merge(cfg, tracker=Tracker()).already_complete and ran == []


def _stub_training(monkeypatch, world: dict, ran: list[str], kill_in: set[str]) -> None:
    """The merge's stages without Ray: distill records its inputs and leaves state in output_dir (as distill_stage),
    its student the base's UNet with the teachers' styles; then the real save, evaluate and track. A stage named in
    `kill_in` dies part-way (SystemExit): distill once its state is there, the others before they start."""
    import diffusers

    from dmm_ray import fingerprint
    from dmm_ray.models.style_unet import StyleUNet

    def distill(run):
        fingerprint.record(run.cfg, run.state, "distill")
        (run.out / "ray_results" / f"{run.cfg.name}-distill").mkdir(parents=True, exist_ok=True)
        (run.out / "ray_results" / f"{run.cfg.name}-distill" / "checkpoint").write_text("")
        if "distill" in kill_in:
            raise SystemExit("killed mid-distill")
        unet = diffusers.UNet2DConditionModel.from_pretrained(Path(world["base"]) / "unet")
        run.student_dir = run.out / "stages" / "distill_student"
        StyleUNet.from_unet(unet, [t.name for t in run.cfg.teachers]).save_pretrained(run.student_dir)
        run.timed("distill", time.time(), {"step": 2})

    def counted(stage):
        def run(merge_run):
            ran.append(stage.name)
            if stage.name in kill_in and stage.name != "distill":
                raise SystemExit(f"killed in {stage.name}")
            stage.run(merge_run)

        return merge.Stage(stage.name, run, stage.when)

    later = (s for s in merge.STAGES if s.name in ("save", "evaluate", "track"))
    monkeypatch.setattr(merge, "STAGES", tuple(counted(s) for s in (merge.Stage("distill", distill), *later)))
    monkeypatch.setattr(merge, "init_for_training", lambda address: False)
    monkeypatch.setattr(merge, "plan_cluster", lambda cfg: None)
    monkeypatch.setattr(merge, "with_plan", lambda cfg, plan: cfg)
    monkeypatch.setattr(merge, "ensure_latents", lambda cfg, plan=None: None)


def test_a_merge_killed_between_its_save_and_its_record_resumes_after_the_save_unless_a_restart_trained_since(world, tmp_path, monkeypatch):
    """A merge killed after its save swapped the new model in but before it recorded the save (merge_complete.json,
    evaluate_pending) trained again on the next run (resumed at its last step) and saved the same model again.
    The saved model's dmm_merge.json names the merge that saved it and the training state it came from
    (fingerprints.json's training_run): the same command now resumes after the save. A --restart that was killed
    mid-distill left the model of the training before it, of the same config: not taken for the result, the
    re-run trains (another training_run) and saves its own."""
    from dmm_ray import fingerprint
    from dmm_ray.merged_model import read_record

    out = tmp_path / "out"
    cfg = MergeConfig.model_validate(tiny_merge_config(world, out)).with_absolute_paths()
    ran: list[str] = []
    kill_in: set[str] = set()
    _stub_training(monkeypatch, world, ran, kill_in)
    record_complete = merge.record_complete
    kill_between_save_and_record(monkeypatch)
    with pytest.raises(SystemExit, match="between the save's swap and its record"):
        merge.run_merge(cfg)
    monkeypatch.setattr(merge, "record_complete", record_complete)
    assert ran == ["distill", "save"] and not (out / merge.COMPLETE_RECORD).exists()
    ran.clear()
    result = merge.run_merge(cfg)  # was: trained again (resumed at its last step) and saved the same model again
    assert ran == ["evaluate"] and not result.already_complete and result.location == str(out / "merged")
    assert merge.run_merge(cfg).already_complete and ran == ["evaluate"]
    first = read_record(out / "merged")[merge.TRAINED_BY]
    assert first == fingerprint.training_run(out)

    # --restart, killed mid-distill: the model in merged/ is the one before the restart
    ran.clear()
    kill_in.add("distill")
    with pytest.raises(SystemExit, match="killed mid-distill"):
        merge.run_merge(cfg, restart=True)
    assert ran == ["distill"] and read_record(out / "merged")[merge.TRAINED_BY] == first != fingerprint.training_run(out)
    assert merge.check_before_run(cfg) == []  # --dry-run: nothing said about a saved model
    ran.clear()
    kill_in.clear()
    merge.run_merge(cfg)  # not the pre-restart model evaluated: this training resumed, and its model saved
    assert ran == ["distill", "save", "evaluate"]
    assert read_record(out / "merged")[merge.TRAINED_BY] == fingerprint.training_run(out) != first


def test_a_merge_killed_after_registering_its_model_does_not_register_it_again(world, tmp_path, monkeypatch):
    """A merge killed after its track stage registered the merged model but before it recorded that (the
    completion record, or the store failing after the registration) re-runs evaluate and track on the saved
    model, and registered the same model again: a second MLflow version. The version the run that saved the
    model registered (its dmm_merge.json names that run) is kept, with the re-run's description and tags."""
    import mlflow

    from dmm_ray.tracking import make_tracker

    out = tmp_path / "out"
    cfg = MergeConfig.model_validate(tiny_merge_config(world, out, tracking={"uri": f"sqlite:///{tmp_path}/mlflow.db"})).with_absolute_paths()
    ran: list[str] = []
    _stub_training(monkeypatch, world, ran, set())
    record_complete = merge.record_complete

    def killed(cfg, out, result, fast_pending=False, evaluate_pending=False, request=None):  # the process dies after track
        if not evaluate_pending:
            raise SystemExit("killed after track, before the completion record")
        record_complete(cfg, out, result, fast_pending=fast_pending, evaluate_pending=evaluate_pending, request=request)

    monkeypatch.setattr(merge, "record_complete", killed)
    with pytest.raises(SystemExit, match="killed after track"):
        merge.run_merge(cfg, tracker=make_tracker(cfg))
    monkeypatch.setattr(merge, "record_complete", record_complete)
    assert ran == ["distill", "save", "evaluate", "track"]
    ran.clear()
    merge.run_merge(cfg, tracker=make_tracker(cfg))
    assert ran == ["evaluate", "track"] and merge.run_merge(cfg).already_complete
    client = mlflow.MlflowClient(cfg.tracking.tracking_uri)
    versions = client.search_model_versions(f"name = '{cfg.tracking.registered_model_name}'")
    assert [int(v.version) for v in versions] == [1]  # was 1 and 2, of one model
    assert versions[0].description == "merge: 2 style(s) (style0, style1)" and versions[0].tags["dmm.merged_path"] == str(out / "merged")


def test_merge_job_config_expands_home(world, tmp_path, monkeypatch):
    """Finding: jobs/merge.py --config '~/job.yaml' (quoted, or after '=') was "does not exist": `~` and
    `$DMM_HOME` expand in --config as in every path."""
    from jobs import merge as job

    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "job.yaml").write_text(yaml.safe_dump(tiny_merge_config(world, tmp_path / "out")))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert job.main(["--config=~/job.yaml", "--dry-run"]) == 0


def test_a_merge_refuses_a_few_step_folder_inside_its_merged_model_before_it_merges(world, tmp_path, monkeypatch, capsys):
    """Finding: a merge with fast.enabled and fast.output_dir inside (or equal to) <output_dir>/merged was
    refused only when its few-step stage started (run_fast: check_output_folder), after the whole merge,
    and `jobs/merge.py --dry-run` said OK. Both refuse it now, with run_fast's own message, before
    anything is written."""
    from dmm_ray.fast.job import FastError
    from jobs import merge as job

    out = tmp_path / "out"
    monkeypatch.setattr(merge, "_merge", lambda *a: pytest.fail("the merge ran with a few-step folder inside its merged model"))
    for folder in (out / "merged" / "fast", out / "merged"):
        cfg = MergeConfig.model_validate(tiny_merge_config(world, out, fast={"enabled": True, "output_dir": str(folder)}))
        with pytest.raises(FastError, match=rf"few-step folder {folder} .* is inside the merged model {out / 'merged'}"):
            merge.run_merge(cfg)
        assert not out.exists()
        path = tmp_path / "job.yaml"
        path.write_text(yaml.safe_dump(tiny_merge_config(world, out, fast={"enabled": True, "output_dir": str(folder)})))
        assert job.main(["--config", str(path), "--dry-run"]) == 2
        assert f"is inside the merged model {out / 'merged'}" in capsys.readouterr().err
    cfg = MergeConfig.model_validate(tiny_merge_config(world, out, fast={"enabled": True, "output_dir": str(tmp_path / "fast")}))
    merge.validate_before_ray(cfg)  # a folder beside it is fine


def test_a_merge_whose_few_step_stage_would_find_no_synthesized_sets_is_refused_before_it_merges(world, tmp_path, monkeypatch):
    """Finding: fast.enabled with fast.synthetic_fraction > 0 (the teachers' sets) in a merge that synthesizes
    nothing (data.synthetic_fraction 0, no fine-tune) passed --dry-run and merged, then its few-step stage
    found no synthesized sets. Refused before the merge now, with the stage's own message; a merge that
    writes the sets (its fine-tune here) passes."""
    out = tmp_path / "out"
    monkeypatch.setattr(merge, "_merge", lambda *a: pytest.fail("the merge ran although its few-step stage cannot"))
    fast = {"enabled": True, "synthetic_fraction": 0.5}
    cfg = MergeConfig.model_validate(tiny_merge_config(world, out, fast=fast, synthesis={"finetune_steps": 0}))
    with pytest.raises(FileNotFoundError, match=rf"fast.synthetic_fraction=0.5 needs the merge's synthesized sets, but {out / 'synthesized'} has"):
        merge.run_merge(cfg)
    assert not out.exists()
    merge.validate_before_ray(MergeConfig.model_validate(tiny_merge_config(world, out, fast=fast)))  # its fine-tune synthesizes them


def test_a_merge_that_synthesizes_counts_the_few_step_sets_of_another_folder_before_it_merges(world, tmp_path, monkeypatch):
    """Finding: a merge that synthesizes (its fine-tune) with fast.enabled, fast.synthetic_fraction > 0 and
    fast.synthesized another folder than its own <output_dir>/synthesized (which its synthesis does not write)
    was checked against synthesis.images_per_teacher x teachers, or not at all, and merged: its few-step stage
    then found that folder missing, too small for one batch or of other styles, after the whole merge. The
    folder is checked as the stage checks it, before the merge; the merge's own folder is still counted as
    what it synthesizes."""
    import numpy as np
    from pyarrow import fs as pafs

    from dmm_ray.data.shards import latent_table, write_shard
    from dmm_ray.fast.job import FastError

    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    monkeypatch.setattr(merge, "_merge", lambda *a: pytest.fail("the merge ran although its few-step stage cannot"))

    def config(**fast):
        fast = {"enabled": True, "synthetic_fraction": 0.5, "synthesized": str(elsewhere), **fast}
        return MergeConfig.model_validate(tiny_merge_config(world, out, fast=fast))

    def sets(styles: int, rows: int) -> None:  # what a merge's synthesis writes: style_<i>/ shards whose rows carry style i
        for i in range(styles):
            table = latent_table(
                np.zeros((rows, 4, 8, 8), np.float32), ["a red circle"] * rows, [f"s{i}-{j}" for j in range(rows)], styles=[i] * rows
            )
            write_shard(pafs.LocalFileSystem(), str(elsewhere / f"style_{i}"), 0, table)

    with pytest.raises(FileNotFoundError, match=rf"fast.synthetic_fraction=0.5 needs the merge's synthesized sets, but {elsewhere} has"):
        merge.run_merge(config())
    sets(styles=2, rows=1)
    with pytest.raises(FastError, match=rf"the merge's synthesized sets \({elsewhere}\) hold 2 rows in 2 styles, fewer than the 4 synthesized rows"):
        merge.run_merge(config(batch_size=8))
    sets(styles=3, rows=4)
    with pytest.raises(FastError, match=rf"the synthesized sets {elsewhere} hold style_2, outside the merged model's 2 styles"):
        merge.run_merge(config())
    assert not out.exists()
    shutil.rmtree(elsewhere / "style_2")
    merge.validate_before_ray(config())  # 8 rows of the merged model's 2 styles
    with pytest.raises(FastError, match=r"the merge synthesizes 4 images x 2 teachers = 8 rows"):  # its own folder, given
        merge.validate_before_ray(config(synthesized=str(out / "synthesized"), batch_size=32))


def test_a_merge_into_an_output_dir_uri_gives_its_few_step_stage_the_synthesized_sets_it_wrote_there(world, tmp_path, monkeypatch):
    """Finding: a merge into an output_dir URI with fast.enabled and fast.synthetic_fraction > 0 (the teachers'
    sets) synthesized at <URI>/synthesized, but its few-step stage looked for them beside the merged model, in
    the local staging folder, found none and stopped after the whole merge; fast.synthesized set to the URI (what
    that error advised) was read as a local folder named `file:`. The stage reads the URI's sets now, and a
    fast.synthesized URI of other sets is counted before the merge as a local folder is."""
    import numpy as np

    from dmm_ray.data import fs as fsu
    from dmm_ray.data.shards import latent_table, write_shard
    from dmm_ray.fast.job import FastError, synthesized_shards

    uri = f"file://{tmp_path}/remote_out"
    monkeypatch.setattr(merge, "_merge", lambda *a: pytest.fail("the merge ran although its few-step stage cannot"))

    def config(**fast):
        tree = tiny_merge_config(world, tmp_path, fast={"enabled": True, "synthetic_fraction": 0.5, **fast})
        return MergeConfig.model_validate({**tree, "output_dir": uri}).with_absolute_paths()

    def sets(where: str, styles: int, rows: int) -> None:  # what the merge's synthesis writes there
        for i in range(styles):
            table = latent_table(np.zeros((rows, 4, 8, 8), np.float32), ["a"] * rows, [f"s{i}-{j}" for j in range(rows)], styles=[i] * rows)
            write_shard(*fsu.resolve(fsu.location_join(where, f"style_{i}")), 0, table)

    cfg = config()
    merge.validate_before_ray(cfg)  # counted as what the merge synthesizes (4 images x 2 teachers)
    local = merge.output_location(cfg)[0]
    sets(f"{uri}/synthesized", styles=2, rows=4)  # where _synthesize writes: <the state location>/synthesized
    read = synthesized_shards(merge.fast_stage_config(cfg, local), local / "merged")  # the stage's own lookup
    assert read == [f"{uri}/synthesized/style_0", f"{uri}/synthesized/style_1"]  # was: none, in the staging folder
    merge.validate_before_ray(config(synthesized=f"{uri}/synthesized"))  # the merge's own sets, named
    sets(f"{uri}/other", styles=2, rows=1)
    with pytest.raises(FastError, match=rf"the merge's synthesized sets \({uri}/other\) hold 2 rows in 2 styles, fewer than the 4"):
        merge.run_merge(config(synthesized=f"{uri}/other", batch_size=8))


def test_a_merge_refuses_a_few_step_stage_that_would_sample_over_its_synthesized_sets(world, tmp_path, monkeypatch):
    """Finding: fast.output_dir = the merge's output_dir with fast.rollout_steps (or fast.synthetic_source merged) in
    a merge that synthesizes: its few-step stage sampled the merged model into <output_dir>/synthesized, deleting
    the teachers' sets the merge had just written there (its state). Refused before the merge now."""
    from dmm_ray.fast.job import FastError

    out = tmp_path / "out"
    monkeypatch.setattr(merge, "_merge", lambda *a: pytest.fail("the merge ran although its few-step stage would delete its sets"))
    fast = {"enabled": True, "rollout_steps": 1, "num_ddim_timesteps": 8, "output_dir": str(out)}
    with pytest.raises(FastError, match=rf"fast.output_dir {out} is the merge's output_dir: the few-step stage samples the merged model"):
        merge.run_merge(MergeConfig.model_validate(tiny_merge_config(world, out, fast=fast)))
    assert not out.exists()
    merge.validate_before_ray(MergeConfig.model_validate(tiny_merge_config(world, out, fast={**fast, "output_dir": str(tmp_path / "fast")})))
    merge.validate_before_ray(MergeConfig.model_validate(tiny_merge_config(world, out, fast={**fast, "rollout_steps": 0})))


def test_a_merge_refuses_leftover_few_step_state_of_other_settings_before_it_merges(world, tmp_path, monkeypatch, capsys):
    """Finding: a merge with fast.enabled whose few-step folder held the training state of an earlier few-step
    stage with other fast: settings merged (its whole training and save), and only then did its few-step stage
    refuse the state (dmm_ray.fingerprint.check_fast_resume needs the merged model's checksum). Every input but
    those the merge decides (that checksum, the shards' rows) is compared before the merge now: such state is
    refused before anything runs, and by --dry-run. State of the same settings passes (the stage compares the
    merged model when it starts), and --restart discards it."""
    from dmm_ray import fingerprint
    from jobs import merge as job

    out = tmp_path / "out"
    config = tiny_merge_config(world, out, fast={"enabled": True})
    cfg = MergeConfig.model_validate(config).with_absolute_paths()
    ran = []
    monkeypatch.setattr(merge, "STAGES", tuple(merge.Stage(s.name, lambda run, n=s.name: ran.append(n), s.when) for s in merge.STAGES))
    monkeypatch.setattr(merge, "init_for_training", lambda address: False)
    monkeypatch.setattr(merge, "plan_cluster", lambda cfg: None)
    monkeypatch.setattr(merge, "with_plan", lambda cfg, plan: cfg)
    monkeypatch.setattr(merge, "ensure_latents", lambda cfg, plan=None: None)

    def leave_state(fast):  # an earlier few-step stage's, on the merged model <out>/merged (of another checksum)
        state = fingerprint.fast_state_path(cfg, out / "fast") / "checkpoint_000000"
        state.mkdir(parents=True, exist_ok=True)
        earlier = cfg.model_copy(update={"fast": cfg.fast.model_copy(update=fast)})
        inputs = {**fingerprint.fast_inputs(earlier, world["base"]), "model": str((out / "merged").resolve())}
        fingerprint.record_fast(earlier, out / "merged", out / "fast", inputs)

    leave_state({"steps": cfg.fast.steps + 1})
    with pytest.raises(fingerprint.StaleStateError, match=rf"fast .*fast.steps: {cfg.fast.steps + 1} -> {cfg.fast.steps}"):
        merge.run_merge(cfg)
    assert ran == [] and not (out / "merged").exists()
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(config))
    assert job.main(["--config", str(path), "--dry-run"]) == 2
    assert "fast.steps" in capsys.readouterr().err
    merge.run_merge(cfg, restart=True)  # discards it
    assert ran[:2] == ["distill", "synthesize"] and "fast" in ran
    ran.clear()
    merge.forget(out, merge.COMPLETE_RECORD)
    leave_state({})  # the same settings: the stage itself compares the merged model it finds
    merge.run_merge(cfg)
    assert ran[:2] == ["distill", "synthesize"] and "fast" in ran


def test_a_merge_discards_few_step_state_of_the_merged_model_it_replaced(world, tmp_path, monkeypatch, capsys):
    """Finding: a merge with fast.enabled whose few-step folder held the state of the same fast: settings made
    from an earlier merged model at its <output_dir>/merged (a merge without the fine-tune after one with it:
    the same distill state, another model) passed the check before the merge (the model's checksum is the
    merge's to decide), trained and saved its model, and then its few-step stage refused the state as "from
    another model"; the same command ran into it again every time. The stage of the merge that saved the model
    discards such state, naming the earlier model, and trains from the start; state of other settings is still
    refused before the merge. Stand-in stages (no Ray) but the few-step stage's own, stopped where its Ray starts."""
    import torch
    from diffusers import UNet2DConditionModel

    from dmm_ray import fingerprint
    from dmm_ray.fast import job as fast_job
    from dmm_ray.models.style_unet import StyleUNet
    from dmm_ray.pipeline import DMMPipeline

    out = tmp_path / "out"
    cfg = MergeConfig.model_validate(tiny_merge_config(world, out, fast={"enabled": True})).with_absolute_paths()
    fast_cfg = merge.fast_stage_config(cfg, out)

    def save_model(scale: float) -> None:  # a merged model (StyleUNet on the base, the teachers' styles), weights x scale
        torch.manual_seed(0)
        student = StyleUNet.from_unet(UNet2DConditionModel.from_pretrained(Path(world["base"]) / "unet"), ["style0", "style1"])
        with torch.no_grad():
            student.conv_out.weight.mul_(scale)
        DMMPipeline.from_base(world["base"], student).save_pretrained(out / "merged")

    ran = []

    def stage(name):
        def run(merge_run):
            ran.append(name)
            if name == "save":
                save_model(2.0)  # this merge's model: another one than the earlier model there

        return run

    class TrainingStarts(Exception):
        pass

    def training_starts(address):
        raise TrainingStarts

    monkeypatch.setattr(merge, "STAGES", tuple(s if s.name == "fast" else merge.Stage(s.name, stage(s.name), s.when) for s in merge.STAGES))
    monkeypatch.setattr(merge, "init_for_training", lambda address: False)
    monkeypatch.setattr(merge, "plan_cluster", lambda cfg: None)
    monkeypatch.setattr(merge, "with_plan", lambda cfg, plan: cfg)
    monkeypatch.setattr(merge, "ensure_latents", lambda cfg, plan=None: None)
    monkeypatch.setattr(fast_job, "init_for_training", training_starts)

    save_model(1.0)  # the earlier merge's model, and the few-step state made from it with these settings
    earlier = fingerprint.fast_inputs(fast_cfg, (out / "merged").resolve())
    fingerprint.record_fast(fast_cfg, (out / "merged").resolve(), out / "fast", earlier)
    state = fingerprint.fast_state_path(cfg, out / "fast") / "checkpoint_000000"
    state.mkdir(parents=True)
    capsys.readouterr()
    with pytest.raises(TrainingStarts):  # it used to be StaleStateError ("from another model"), after the whole merge
        merge.run_merge(cfg)
    assert ran == ["distill", "synthesize", "finetune", "save", "evaluate"]
    err = "".join(capsys.readouterr())  # (the stage's log lines)
    now = fingerprint.fast_inputs(fast_cfg, (out / "merged").resolve())["model.unet.checksum"]
    assert f"held the training state of a few-step run from an earlier merged model at {(out / 'merged').resolve()}" in err, err
    assert f"(UNet checksum {earlier['model.unet.checksum']}, now {now}), which the merge replaced" in err, err
    assert not state.exists() and not (out / "fast" / fingerprint.RECORD).exists()  # (the folder's only record)

    # the same state from the jobs/fast.py of another model is still refused there (not a merge's own model)
    fingerprint.record_fast(fast_cfg, (out / "merged").resolve(), out / "fast", earlier)
    state.mkdir(parents=True)
    with pytest.raises(fingerprint.StaleStateError, match="model.unet.checksum"):
        fast_job.run_fast(fast_cfg, out / "merged")
    assert state.is_dir()


def test_a_finished_merge_submitted_again_runs_nothing_until_its_config_changes(world, tmp_path, monkeypatch):
    """A re-run of a merge that finished every stage, with the same config, returns at once: no Ray,
    no second save, evaluation or MLflow model version. Another config value, a missing model or
    --restart runs the merge again."""
    out = tmp_path / "out"
    cfg = MergeConfig.model_validate(tiny_merge_config(world, out)).with_absolute_paths()
    (out / "merged").mkdir(parents=True)
    (out / "merged" / "model_index.json").write_text("{}")
    merge.record_complete(cfg, out, merge.MergeResult(merged_path=out / "merged", location=str(out / "merged"), run_id="r1"))

    def ray_started(*args, **kwargs):
        raise RuntimeError("Ray started")

    monkeypatch.setattr(merge, "init_for_training", ray_started)
    again = merge.run_merge(cfg)
    assert again.already_complete and again.run_id == "r1" and again.location == str(out / "merged")
    changed = cfg.model_copy(update={"distill": cfg.distill.model_copy(update={"steps": 3})})
    with pytest.raises(RuntimeError, match="Ray started"):
        merge.run_merge(changed)
    assert not (out / merge.COMPLETE_RECORD).exists()  # a run that starts may change the model: the record goes
    merge.record_complete(cfg, out, again)
    with pytest.raises(RuntimeError, match="Ray started"):
        merge.run_merge(cfg, restart=True)
    with_fast = cfg.model_copy(update={"fast": cfg.fast.model_copy(update={"enabled": True})})
    merge.record_complete(with_fast, out, again)
    with pytest.raises(RuntimeError, match="Ray started"):  # fast.enabled: its few-step model is missing
        merge.run_merge(with_fast)
    (out / "fast" / "model").mkdir(parents=True)
    (out / "fast" / "model" / "model_index.json").write_text("{}")
    (out / "fast" / "model" / "fast.json").write_text("{}")  # a few-step model, as the stage saves it
    merge.record_complete(with_fast, out, again)
    assert merge.run_merge(with_fast).already_complete
    merge.record_complete(cfg, out, again)
    (out / "merged" / "model_index.json").unlink()
    with pytest.raises(RuntimeError, match="Ray started"):
        merge.run_merge(cfg)


def test_a_finished_merge_whose_teacher_was_re_made_in_place_is_not_complete(world, tmp_path, monkeypatch, capsys):
    """The completion record compared the config alone, which names each teacher by its path: a teacher re-made in
    place since (other weights at the same path), the stages' checkpoints deleted, left the re-run (and its dry run)
    "already complete" with the model of the old teacher. The record holds the teachers' checksums too: unchanged
    teachers are still complete, each hashed once per run however often the record is compared; a changed one is
    refused naming its checksum while the stages' state is there (check_resume), and merges again, saying which
    teacher changed, once it is gone. A record written before the checksums is compared by its config alone."""
    from collections import Counter

    from dmm_ray import fingerprint, teachers
    from jobs import merge as job

    specs = [dict(t) for t in world["teachers"]]
    specs[0]["source"] = str(shutil.copytree(specs[0]["source"], tmp_path / "teacher0"))  # (the world is shared)
    out = tmp_path / "out"
    config = tiny_merge_config(world, out, teachers=specs)
    cfg = MergeConfig.model_validate(config).with_absolute_paths()
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(config))
    ran: list[str] = []
    _stub_training(monkeypatch, world, ran, set())
    hashed: Counter = Counter()
    teacher_checksum = teachers.teacher_checksum

    def counted(spec, *args, **kwargs):
        hashed[spec.name] += 1
        return teacher_checksum(spec, *args, **kwargs)

    monkeypatch.setattr(teachers, "teacher_checksum", counted)
    once = {t["name"]: 1 for t in specs}
    merge.run_merge(cfg)
    assert ran == ["distill", "save", "evaluate"] and hashed == once
    ran.clear()
    hashed.clear()
    assert merge.run_merge(cfg).already_complete and ran == [] and hashed == once  # the record compared ~5 times
    hashed.clear()
    assert job.main(["--config", str(path), "--dry-run"]) == 0 and hashed == once
    assert f"already complete: this merge, with this config, finished in {out}" in capsys.readouterr().out

    weights = next((tmp_path / "teacher0" / "unet").glob("*.safetensors"))
    changed = bytearray(weights.read_bytes())
    changed[-1] ^= 0xFF  # the teacher re-made in place: other weights at the same path
    weights.write_bytes(bytes(changed))
    name = specs[0]["name"]
    with pytest.raises(fingerprint.StaleStateError, match=f"teacher '{name}': checksum changed"):  # its stages' state
        merge.run_merge(cfg)
    shutil.rmtree(out / "ray_results")  # the finished merge's checkpoints deleted: only its completion record is left
    record = (out / merge.COMPLETE_RECORD).read_text()
    said = f"teacher '{name}' ({tmp_path / 'teacher0'}) has changed since"
    assert job.main(["--config", str(path), "--dry-run"]) == 0  # was "already complete", as the run
    printed = capsys.readouterr().out
    assert said in printed and "already complete" not in printed and (out / merge.COMPLETE_RECORD).read_text() == record
    ran.clear()
    hashed.clear()
    result = merge.run_merge(cfg)  # was "already complete", the model of the old teacher kept
    assert not result.already_complete and ran == ["distill", "save", "evaluate"] and hashed == once
    assert said in capsys.readouterr().out
    ran.clear()
    assert merge.run_merge(cfg).already_complete and ran == []  # complete again, from the teacher there now

    recorded = json.loads((out / merge.COMPLETE_RECORD).read_text())
    del recorded["asked"][merge.TEACHERS]  # written before the record held the checksums: compared by the config
    (out / merge.COMPLETE_RECORD).write_text(json.dumps(recorded))
    weights.write_bytes(bytes(changed[:-1]) + b"\x00")
    shutil.rmtree(out / "ray_results")
    assert merge.run_merge(cfg).already_complete and ran == []


def test_merge_dry_run_says_what_the_run_would_find_in_output_dir(world, tmp_path, capsys):
    """Finding: `jobs/merge.py --dry-run` said OK on an output_dir whose merge had finished (the run: 'already
    complete ...; nothing to do') and on one whose merge.lock a running merge held (the run: refused, exit 2).
    The dry run now prints the run's own 'already complete' line, and refuses a held lock with the run's
    message, naming its owner; a stale lock is said to be taken over. Nothing is written."""
    from jobs import merge as job

    out = tmp_path / "out"
    cfg = MergeConfig.model_validate(tiny_merge_config(world, out)).with_absolute_paths()
    (out / "merged").mkdir(parents=True)
    (out / "merged" / "model_index.json").write_text("{}")
    merge.record_complete(cfg, out, merge.MergeResult(merged_path=out / "merged", location=str(out / "merged"), run_id="r1"))
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(tiny_merge_config(world, out)))
    assert job.main(["--config", str(path), "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert f"already complete: this merge, with this config, finished in {out}" in printed and "MLflow run r1" in printed
    assert job.main(["--config", str(path), "--dry-run", "--restart"]) == 0  # the run would merge again
    assert "already complete" not in capsys.readouterr().out and (out / merge.COMPLETE_RECORD).exists()
    lock = _write_lock(out, os.getpid())  # a running merge (this live process)
    for restart in ([], ["--restart"]):  # the run refuses it either way
        assert job.main(["--config", str(path), "--dry-run", *restart]) == 2
        err = capsys.readouterr().err
        assert f"output_dir {out} is in use by another merge (host {socket.gethostname()}, pid {os.getpid()}" in err, err
        assert f"kill {os.getpid()}" in err and "--set output_dir=NEW_DIR" in err
    _write_lock(out, _dead_pid())
    assert job.main(["--config", str(path), "--dry-run"]) == 0
    assert f"a run would take over the stale lock {lock}" in capsys.readouterr().out
    assert lock.exists()  # read, not taken over


def test_a_merge_with_fast_enabled_refuses_a_held_fast_lock_before_it_starts(world, tmp_path, monkeypatch, capsys):
    """Finding: a merge with fast.enabled whose few-step folder's fast.lock a running jobs/fast.py held started,
    merged for its whole run, and was refused only at its few-step stage (its dry run said OK). The pre-Ray checks
    now read that lock, as they read merge.lock: refused before the merge body, naming the owner and
    fast.output_dir; a stale one is said to be taken over; a merge that is complete already is not refused."""
    from dmm_ray.fast.job import FAST_LOCK
    from jobs import merge as job

    out = tmp_path / "out"
    raw = tiny_merge_config(world, out, fast={"enabled": True})
    cfg = MergeConfig.model_validate(raw).with_absolute_paths()
    (out / "fast").mkdir(parents=True)
    lock = output_lock.lock_path(out / "fast", FAST_LOCK)
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "started": time.time() - 5}))  # a running job
    monkeypatch.setattr(merge, "_merge", lambda *a: pytest.fail("the merge ran although its few-step folder is locked"))
    with pytest.raises(OutputDirBusyError) as error:
        merge.run_merge(cfg)
    text = str(error.value)
    assert text.startswith(f"the few-step folder {out / 'fast'} (this merge's fast stage) is in use by a few-step job (")
    assert f"kill {os.getpid()}" in text and "or write this merge's few-step stage elsewhere (--set fast.output_dir=NEW_DIR)" in text
    assert not output_lock.lock_path(out).exists()  # refused before it took merge.lock
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(raw))
    for restart in ([], ["--restart"]):
        assert job.main(["--config", str(path), "--dry-run", *restart]) == 2
        assert f"lock file {lock}" in capsys.readouterr().err
    off = MergeConfig.model_validate(tiny_merge_config(world, out)).with_absolute_paths()  # no few-step stage: nothing to refuse
    assert merge.check_fast_lock(off, out) == []
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": _dead_pid(), "started": time.time() - 5}))
    assert job.main(["--config", str(path), "--dry-run"]) == 0
    assert f"a run would take over the stale lock {lock}" in capsys.readouterr().out and lock.exists()
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "started": time.time() - 5}))
    for model in (out / "merged", out / "fast" / "model"):  # the merge finished: its re-run does nothing, the lock is no obstacle
        model.mkdir(parents=True, exist_ok=True)
        (model / "model_index.json").write_text("{}")
    merge.record_complete(cfg, out, merge.MergeResult(merged_path=out / "merged", location=str(out / "merged")))
    assert merge.check_fast_lock(cfg, out) == []
    with pytest.raises(OutputDirBusyError):  # --restart merges again, few-step stage included
        merge.check_fast_lock(cfg, out, restart=True)


def test_merge_dry_run_says_it_would_put_back_what_a_killed_save_left(world, tmp_path, capsys):
    """Finding: a save killed between its two renames leaves the last merged model only as merged.old (the
    few-step stage's as fast/model.old), maybe with a merged.tmp; the run puts them back first, but
    `jobs/merge.py --dry-run` said nothing about it. The dry run now says what the run would restore and
    remove (fast/model only when the few-step stage runs), and changes nothing."""
    from jobs import merge as job

    out = tmp_path / "out"
    _model(out / "merged.old", "previous")
    (out / "merged.tmp").mkdir()
    (out / "fast" / "model.old").mkdir(parents=True)
    (out / "fast" / "model.old" / "fast.json").write_text("{}")
    path = tmp_path / "job.yaml"
    for fast, restart in ((True, []), (True, ["--restart"]), (False, [])):
        path.write_text(yaml.safe_dump(tiny_merge_config(world, out, fast={"enabled": fast})))
        assert job.main(["--config", str(path), "--dry-run", *restart]) == 0
        printed = capsys.readouterr().out
        assert f"a run would first restore {out / 'merged'} from merged.old" in printed, printed
        assert f"a run would first remove {out / 'merged.tmp'} left behind by an interrupted save" in printed
        assert (f"a run would first restore {out / 'fast' / 'model'} from model.old" in printed) == fast
    assert sorted(p.name for p in out.iterdir()) == ["fast", "merged.old", "merged.tmp"]  # said, not done
    assert _tag(out / "merged.old") == "previous" and [p.name for p in (out / "fast").iterdir()] == ["model.old"]


def test_fast_and_evaluate_refuse_a_merged_model_whose_merge_is_running(world, tmp_path, monkeypatch, capsys):
    """Finding: jobs/fast.py (its --dry-run too) and jobs/evaluate.py read <output_dir>/merged while a merge held
    that output_dir's merge.lock, so the merge's save, which replaces the folder, could be read half-way. They
    now refuse while a running merge holds it, naming its owner and the lock; a stale lock, a lock-free folder
    and a folder not named `merged` are read as before."""
    import dmm_ray.evaluation.api as api
    from jobs import evaluate as evaluate_job
    from jobs import fast as fast_job

    out = tmp_path / "out"
    _model(out / "merged", "running")
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(tiny_merge_config(world, out)))
    lock = _write_lock(out, os.getpid())  # a running merge (this live process)
    monkeypatch.setattr(api, "evaluate_merge", lambda *a, **k: pytest.fail("the evaluation read the model of a running merge"))
    runs = (
        (fast_job, ["--model", str(out / "merged"), "--config", str(path), "--no-track", "--no-eval", "--output-dir", str(tmp_path / "fast")]),
        (evaluate_job, ["--model", str(out / "merged"), "--teachers", str(path), "--no-ray", "--out", str(tmp_path / "eval")]),
    )
    for job, args in runs:
        for dry_run in ([], ["--dry-run"]) if job is fast_job else ([],):
            assert job.main(args + dry_run) == 2
            err = capsys.readouterr().err
            assert f"--model {out / 'merged'} is the merged model of output_dir {out}, whose merge.lock a running job holds" in err, err
            assert f"pid {os.getpid()}" in err and f"lock file {lock}" in err and f"kill {os.getpid()}" in err
    assert json.loads(lock.read_text())["pid"] == os.getpid()  # read, not taken
    output_lock.check_not_being_replaced(out / "merged" / "unet")  # no merge's model folder: not refused
    _write_lock(out, 1, host="some-other-node")
    with pytest.raises(OutputDirBusyError, match=f"delete {lock}"):
        output_lock.check_not_being_replaced(out / "merged")
    _write_lock(out, _dead_pid())
    output_lock.check_not_being_replaced(out / "merged")  # its merge is gone: read as before
    assert lock.exists()
    lock.unlink()
    output_lock.check_not_being_replaced(out / "merged")


def test_export_serve_and_evaluate_of_a_few_step_model_refuse_a_folder_its_running_job_may_replace(world, tmp_path, monkeypatch, capsys):
    """Finding: jobs/export.py and Serve's model backend read a merge's <output_dir>/merged while that merge (another
    process) held merge.lock, and jobs/evaluate.py a few-step <folder>/model while jobs/fast.py held fast.lock: the
    export baked, the replica loaded and the evaluation sampled a folder the running job's save replaces. Now each
    is refused (exit 2; Serve: ModelLoadError) naming the job's kind, pid and lock file; freed, each reads it."""
    import dmm_ray.evaluation.api as api
    from dmm_ray.fast.job import FAST_LOCK
    from jobs import evaluate as evaluate_job
    from jobs import export as export_job
    from serve.model import ModelLoadError, StyleModelBackend

    out = tmp_path / "out"
    merged = _model(out / "merged", "running")
    (merged / "model_index.json").write_text("{}")
    few = _model(tmp_path / "fast" / "model", "few-step")
    monkeypatch.setattr(api, "evaluate_merge", lambda *a, **k: pytest.fail("the evaluation read a model its job is replacing"))
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(tiny_merge_config(world, out)))
    merge_proc = hold_in_another_process(out)
    fast_proc = hold_in_another_process(tmp_path / "fast", name=FAST_LOCK, job="few-step job")
    try:
        export = ["--model", str(merged), "--style", "0", "--out", str(tmp_path / "x.safetensors"), "--no-track"]
        assert export_job.main(export) == 2
        err = capsys.readouterr().err
        assert f"--model {merged} is the merged model of output_dir {out}, whose merge.lock a running merge holds" in err, err
        assert f"pid {merge_proc.pid}" in err and f"kill {merge_proc.pid}" in err and not (tmp_path / "x.safetensors").exists()
        with pytest.raises(ModelLoadError, match=f"model {merged} is the merged model of output_dir {out}, whose merge.lock a running merge holds"):
            StyleModelBackend(str(merged), device="cpu")
        evaluate = ["--model", str(few), "--teachers", str(path), "--no-ray", "--out", str(tmp_path / "eval")]
        assert evaluate_job.main(evaluate) == 2
        err = capsys.readouterr().err
        lock = output_lock.lock_path(tmp_path / "fast", FAST_LOCK)
        assert f"--model {few} is the few-step model of the few-step folder {few.parent}, whose fast.lock a running few-step job holds" in err, err
        assert f"pid {fast_proc.pid}" in err and f"lock file {lock}" in err
    finally:
        for proc in (merge_proc, fast_proc):
            proc.kill()
            proc.wait()
    output_lock.check_not_being_replaced(merged)  # their jobs are gone (stale locks): read as before
    output_lock.check_not_being_replaced(few)
    with pytest.raises(ModelLoadError, match="could not load a DMMPipeline"):  # past the check: loads (a stand-in folder)
        StyleModelBackend(str(merged), device="cpu")


def test_style_mixing_refuses_a_merged_model_whose_merge_is_running(world, tmp_path, monkeypatch, capsys):
    """Finding: jobs/style_mixing.py --model <output_dir>/merged sampled the model while a merge (another process)
    held merge.lock, so its save could be read half-way, as jobs/fast.py, evaluate.py and export.py refuse it."""
    from jobs import style_mixing as job

    out = tmp_path / "out"
    merged = _model(out / "merged", "running")
    raw = tiny_merge_config(world, out)
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(raw))
    monkeypatch.setattr(job, "_compare", lambda *a, **k: pytest.fail("style mixing read the model of a running merge"))
    sweep = ",".join(t["name"] for t in raw["teachers"][:2])
    proc = hold_in_another_process(out)
    try:
        args = [
            "--model",
            str(merged),
            "--teachers",
            str(path),
            "--sweep",
            sweep,
            "--no-ray",
            "--out",
            str(tmp_path / "mix"),
            "--set",
            "prompts=[a star, a ring]",
        ]
        assert job.main(args) == 2
        err = capsys.readouterr().err
        assert f"--model {merged} is the merged model of output_dir {out}, whose merge.lock a running merge holds" in err, err
        assert f"kill {proc.pid}" in err
    finally:
        proc.kill()
        proc.wait()


def test_a_lock_names_the_kind_of_job_holding_it(world, tmp_path, monkeypatch, capsys):
    """Finding: the lock record said nothing of the job holding it, so a refusal named the job refused, not the
    holder: a merge refused by jobs/evaluate.py writing into its evaluation folder said 'in use by another merge',
    a reader said 'a running job holds' it, and refused although an evaluation never replaces the merged model
    (and keeps merges out while it holds the lock). The record now says its kind ("job"); a reader is not refused
    by an evaluation's lock, and messages name the holder. A lock file without the kind reads as before."""
    from jobs import fast as fast_job

    out = tmp_path / "out"
    _model(out / "merged", "evaluated")
    proc = hold_in_another_process(out, job=output_lock.EVALUATION, fix="--out OUT", holder="merge")
    try:
        assert output_lock.read_owner(output_lock.lock_path(out))["job"] == "evaluation"
        with pytest.raises(OutputDirBusyError) as error:
            output_lock.acquire(out)
        assert str(error.value).startswith(f"output_dir {out} is in use by an evaluation ("), error.value
        assert "write this merge elsewhere (--set output_dir=NEW_DIR)" in str(error.value)
        output_lock.check_not_being_replaced(out / "merged")  # an evaluation reads the model: no obstacle to another reader
    finally:
        proc.kill()
        proc.wait()
    proc = hold_in_another_process(out)  # a merge
    try:
        with pytest.raises(OutputDirBusyError, match=f"output_dir {out} is in use by another merge \\(.*pid {proc.pid}"):
            output_lock.acquire(out)
        with pytest.raises(OutputDirBusyError, match="in use by a merge \\(.*or write this evaluation elsewhere \\(--out OUT\\)"):
            output_lock.acquire(out, job=output_lock.EVALUATION, fix="--out OUT", holder="merge")
        path = tmp_path / "job.yaml"
        path.write_text(yaml.safe_dump(tiny_merge_config(world, out)))
        args = ["--model", str(out / "merged"), "--config", str(path), "--no-track", "--no-eval", "--output-dir", str(tmp_path / "f"), "--dry-run"]
        assert fast_job.main(args) == 2
        assert "whose merge.lock a running merge holds" in capsys.readouterr().err
    finally:
        proc.kill()
        proc.wait()


def test_evaluate_with_a_merge_config_writes_into_the_merges_evaluation_folder_only_as_its_evaluation(world, tmp_path, monkeypatch, capsys):
    """Finding: `jobs/evaluate.py --teachers <merge config>` without --out wrote into that merge's own
    <output_dir>/evaluation whatever it scored (another --model, other --set settings), replacing the merge's
    results silently, and took no lock, so it did so while the merge ran. Now another model or other settings
    there is a usage error naming --out; the merge's own model at its evaluation's settings (how it runs aside:
    --no-ray) may go there, holding the merge's merge.lock: refused while a merge holds it."""
    import dmm_ray.evaluation.api as api
    import dmm_ray.models.style_unet as style_unet
    from jobs import evaluate as job

    out = tmp_path / "out"
    other = tmp_path / "other"
    for model in (out / "merged", other):
        model.mkdir(parents=True)
        (model / "model_index.json").write_text("{}")
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(tiny_merge_config(world, out)))
    held = []

    def evaluated(*args, **kwargs):  # the sampling: the lock is held while it runs
        held.append(output_lock.read_owner(output_lock.lock_path(out)))
        raise RuntimeError("evaluated")

    monkeypatch.setattr(api, "evaluate_merge", evaluated)
    monkeypatch.setattr(style_unet, "merged_style_names", lambda path: ["style0", "style1"])
    monkeypatch.setattr(job, "few_step_sampler", lambda *a: None)
    base = ["--teachers", str(path), "--no-ray"]
    for given, problem in (
        (["--model", str(other)], f"--model {other} is not its merged model {out / 'merged'}"),
        (["--model", str(out / "merged"), "--set", "images_per_prompt=2"], "images_per_prompt differ from its evaluation: section"),
    ):
        with pytest.raises(SystemExit) as exit_:
            job.main(base + given)
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and f"results go to that merge's own evaluation folder {out / 'evaluation'}" in err, err
        assert problem in err and "Give --out OUT" in err, err
    assert held == [] and not (out / "evaluation").exists()
    _write_lock(out, os.getpid())  # a running merge (this live process)
    assert job.main(base + ["--model", str(out / "merged")]) == 2
    err = capsys.readouterr().err
    assert f"output_dir {out} is in use by a merge (host {socket.gethostname()}, pid {os.getpid()}" in err and "--out OUT" in err, err
    assert held == []
    output_lock.lock_path(out).unlink()
    with pytest.raises(RuntimeError, match="evaluated"):
        job.main(base + ["--model", str(out / "merged")])
    assert held[0]["pid"] == os.getpid() and not output_lock.lock_path(out).exists()  # held while it sampled, then released
    with pytest.raises(RuntimeError, match="evaluated"):  # another folder: no lock, any model
        job.main(base + ["--model", str(other), "--out", str(tmp_path / "eval")])
    assert held[1] is None
