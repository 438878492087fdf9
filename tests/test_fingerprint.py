"""A re-run never resumes state made with other settings (dmm_ray/fingerprint.py)."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from merge_fixtures import build_world, tiny_merge_config

from dmm_ray import fingerprint
from dmm_ray.config import MergeConfig
from dmm_ray.fingerprint import StaleStateError

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return build_world(tmp_path_factory.mktemp("fingerprint_world"))


def _cfg(world, out, **sections):
    return MergeConfig.model_validate(tiny_merge_config(world, out, **sections)).with_absolute_paths()


def _fake_state(cfg, out: Path, stage: str) -> None:
    folder = fingerprint.state_paths(cfg, out, stage)[0] / "checkpoint_000001"
    folder.mkdir(parents=True)
    (folder / "state.pt").write_bytes(b"x")


def test_same_settings_resume_changed_settings_refuse(world, tmp_path):
    out = tmp_path / "out"
    cfg = _cfg(world, out)
    for stage in ("synthesize", "distill", "finetune"):
        fingerprint.record(cfg, out, stage)
        _fake_state(cfg, out, stage)
    fingerprint.check_resume(cfg, out, ["synthesize", "distill", "finetune"])  # unchanged: resume
    # how, not what: checkpoint cadence and CPUs never block a resume
    fingerprint.check_resume(_cfg(world, out, distill={"checkpoint_every": 7}, scaling={"cpus_per_worker": 1.0}), out, ["distill"])

    with pytest.raises(StaleStateError) as error:
        fingerprint.check_resume(_cfg(world, out, distill={"lr": 1e-3}), out, ["synthesize", "distill", "finetune"])
    message = str(error.value)
    assert "distill.lr: 0.0001 -> 0.001" in message and "--restart" in message and "output_dir" in message
    assert "synthesize (" not in message  # synthesis does not depend on the lr

    with pytest.raises(StaleStateError, match="distill.steps: 2 -> 5"):
        fingerprint.check_resume(_cfg(world, out, distill={"steps": 5}), out, ["distill"])
    swapped = tiny_merge_config(world, out)
    swapped["teachers"] = swapped["teachers"][::-1]
    with pytest.raises(StaleStateError, match=r"teachers \(order\): \['style0', 'style1'\] -> \['style1', 'style0'\]"):
        fingerprint.check_resume(MergeConfig.model_validate(swapped).with_absolute_paths(), out, ["synthesize"])
    with pytest.raises(StaleStateError, match="synthesis.guidance_scale"):
        fingerprint.check_resume(_cfg(world, out, synthesis={"guidance_scale": 3.0}), out, ["synthesize"])


def test_teachers_per_worker_values_of_one_worker_layout_resume(world, tmp_path):
    """scaling.teachers_per_worker was compared as given: of the world's 2 teachers, 2 and 4 both put them on
    one worker (the same layout, the same training), yet a re-run with the other value was refused as
    stale state. It is compared as the teachers a worker hosts at most, min(k, N), in records made before
    too; a value that changes the layout (1: a worker per teacher) is still refused."""
    out = tmp_path / "out"
    cfg = _cfg(world, out, scaling={"teachers_per_worker": 2})
    for stage in ("distill", "finetune"):
        fingerprint.record(cfg, out, stage)
        _fake_state(cfg, out, stage)
    fingerprint.check_resume(_cfg(world, out, scaling={"teachers_per_worker": 4}), out, ["distill", "finetune"])
    with pytest.raises(StaleStateError, match="scaling.teachers_per_worker: 2 -> 1"):
        fingerprint.check_resume(_cfg(world, out, scaling={"teachers_per_worker": 1, "workers_per_teacher": 1}), out, ["distill"])


def test_a_prompt_file_edited_in_place_refuses_its_synthesized_set(world, tmp_path):
    """synthesis.prompts is fingerprinted by the prompts it holds, not its path only: edited in place, a
    re-run resumed the set sampled from the old prompts (and distilled / fine-tuned on it)."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue square\n")
    out = tmp_path / "out"
    cfg = _cfg(world, out, synthesis={"prompts": str(prompts)})
    for stage in ("synthesize", "finetune"):
        fingerprint.record(cfg, out, stage)
        _fake_state(cfg, out, stage)
    prompts.write_text("a red circle\n\n a blue square \n")  # blank lines and spaces are not prompts
    fingerprint.check_resume(cfg, out, ["synthesize", "finetune"])
    prompts.write_text("a green triangle\na blue square\n")
    with pytest.raises(StaleStateError, match=r"(?s)synthesize \(.*synthesis.prompts.checksum.*finetune \(.*synthesized.synthesis.prompts.checksum"):
        fingerprint.check_resume(cfg, out, ["synthesize", "finetune"])


def test_changed_teacher_weights_refuse(world, tmp_path):
    import shutil

    teachers = tmp_path / "teachers"
    shutil.copytree(Path(world["teachers"][0]["source"]), teachers / "t0")
    local = {**world, "teachers": [{"name": "style0", "source": str(teachers / "t0")}, world["teachers"][1]]}
    out = tmp_path / "out"
    cfg = _cfg(local, out)
    fingerprint.record(cfg, out, "distill")
    _fake_state(cfg, out, "distill")
    _flip_last_byte(teachers / "t0" / "unet")
    with pytest.raises(StaleStateError, match="teacher 'style0': checksum changed"):
        fingerprint.check_resume(cfg, out, ["distill"])


def _checksum_as_recorded_before(roots, salt: str, tail_over: int, chunk: int = 1 << 24) -> str:
    """teachers.files_checksum as an earlier dmm-ray recorded it: hidden files below a folder hashed, and a
    file's last chunk only once it was over `tail_over` bytes long (2 chunks before 1c17d28, then 1)."""
    import hashlib
    import os

    digest = hashlib.sha256(salt.encode())
    for root in map(Path, roots):
        for file in sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]:
            size = file.stat().st_size
            digest.update(f"{file.relative_to(root) if root.is_dir() else file.name}|{size}".encode())
            with open(file, "rb") as handle:
                digest.update(handle.read(chunk))
                if size > tail_over:
                    handle.seek(max(chunk, size - chunk), os.SEEK_SET)
                    digest.update(handle.read(chunk))
    return digest.hexdigest()[:16]


@pytest.mark.parametrize("tail_over", [2 << 24, 1 << 24], ids=["before-1c17d28", "before-hidden-files-left-out"])
def test_state_recorded_by_an_earlier_checksum_rule_still_resumes(world, tmp_path, tail_over):
    """files_checksum changed twice: a file between one and two chunks long (16-32 MiB: an SD LoRA of rank
    16-32) is hashed by its tail too, and hidden files below a folder (the .cache/huggingface/ of `hf download
    --local-dir`) are left out. State recorded before held its teachers' checksums by the earlier rule, so the
    same, unchanged teachers were "checksum changed", the re-run refused until --restart. A recorded checksum
    that the teacher's files give now by an earlier rule resumes; a teacher changed since is still refused."""
    import json
    import shutil

    lora = tmp_path / "lora_r32.safetensors"
    lora.write_bytes(bytes(range(256)) * (20 << 12))  # 20 MiB: a rank-32 LoRA's size (only the bytes matter here)
    folder = shutil.copytree(world["teachers"][0]["source"], tmp_path / "t0")
    (folder / ".cache" / "huggingface" / "download").mkdir(parents=True)
    (folder / ".cache" / "huggingface" / "download" / "model_index.json.metadata").write_text("0123abcd\netag\n1765000000.1\n")
    local = {
        **world,
        "teachers": [{"name": "style0", "source": str(folder)}, {"name": "lora32", "source": str(lora), "format": "lora", "base": world["base"]}],
    }
    out = tmp_path / "out"
    cfg = _cfg(local, out)
    fingerprint.record(cfg, out, "distill")
    _fake_state(cfg, out, "distill")
    recorded = json.loads((out / fingerprint.RECORD).read_text())
    for t, spec in zip(recorded["distill"]["teachers"], cfg.teachers):
        old = _checksum_as_recorded_before(
            [spec.source] + ([spec.base] if spec.base else []), f"{spec.name}|{spec.resolved_format()}|{spec.lora_scale}", tail_over
        )
        assert old != t["checksum"] or (spec.name == "lora32" and tail_over == 1 << 24)  # a 20 MiB file: the tail rule alone
        t["checksum"] = old
    (out / fingerprint.RECORD).write_text(json.dumps(recorded))
    fingerprint.check_resume(cfg, out, ["distill"])  # the same teachers: resume

    _flip_last_byte(folder / "unet")
    with pytest.raises(StaleStateError, match="teacher 'style0': checksum changed") as error:
        fingerprint.check_resume(cfg, out, ["distill"])
    assert "lora32" not in str(error.value)
    data = bytearray(lora.read_bytes())
    data[0] ^= 0xFF  # in its first chunk, which every rule hashes
    lora.write_bytes(bytes(data))
    with pytest.raises(StaleStateError, match="teacher 'lora32': checksum changed"):
        fingerprint.check_resume(cfg, out, ["distill"])


def test_other_checksums_recorded_by_an_earlier_rule_still_resume(world, tmp_path):
    """The earlier files_checksum rules were accepted for the teachers alone: every other checksum of a record (the
    student base's UNet, an incremental merge's previous model, the few-step stage's merged model; a merged model's
    dmm_merge.json: its student base's parts) was compared by the current rule, so one with a 16-32 MiB file (a small
    UNet or VAE), recorded before 1c17d28, was "changed" and its run refused, the same files as before. They are
    compared as a teacher's now (fingerprint.recorded_by_an_earlier_rule); files changed since are still refused."""
    import json
    import shutil

    from dmm_ray.completion import finished, record_finished
    from dmm_ray.merge import check_student_base
    from dmm_ray.teachers import TeacherError, files_checksum

    base = shutil.copytree(world["base"], tmp_path / "base")
    for part in ("unet", "vae"):  # 20 MiB: the first rule hashed its first 16 MiB only
        (base / part / "extra.safetensors").write_bytes(bytes(range(256)) * (20 << 12))
    merged = shutil.copytree(base, tmp_path / "merged")  # the previous merged model (only its files matter here)
    out = tmp_path / "out"
    cfg = _cfg({**world, "base": str(base)}, out, incremental={"base_merged": str(merged), "regularization": False}, fast={"output_dir": str(out)})
    first = lambda *folders: files_checksum(folders, rule="first-chunk")  # noqa: E731  (as a dmm-ray before 1c17d28 recorded them)
    fingerprint.record(cfg, out, "distill")
    _fake_state(cfg, out, "distill")
    fingerprint.record_fast(cfg, merged, out)
    (fingerprint.fast_state_path(cfg, out) / "checkpoint_000001").mkdir(parents=True)
    recorded = json.loads((out / fingerprint.RECORD).read_text())
    recorded["distill"].update({"student.base.checksum": first(base / "unet"), fingerprint.PREVIOUS_MODEL_CHECKSUM: first(merged / "unet")})
    recorded["fast"]["model.unet.checksum"] = first(merged / "unet")
    assert recorded["fast"]["model.unet.checksum"] != fingerprint.fast_inputs(cfg, merged)["model.unet.checksum"]
    (out / fingerprint.RECORD).write_text(json.dumps(recorded))
    done = out / "model" / "model_index.json"
    done.parent.mkdir(parents=True)
    done.write_text("{}")
    asked = {"config": cfg.model_dump(mode="json"), "model": str(merged), "inputs": fingerprint.fast_inputs(cfg, merged), "evaluate": False}
    record_finished(out, "fast_complete.json", {**asked, "inputs": recorded["fast"]})
    parts = [base / n for n in ("text_encoder", "tokenizer", "vae", "scheduler")]
    (merged / "dmm_merge.json").write_text(json.dumps({"student_base": {"path": str(base), "checksum": first(*parts)}}))

    fingerprint.check_resume(cfg, out, ["distill"])  # the same files: resume (were refused)
    fingerprint.check_fast_resume(cfg, merged, out)
    assert finished(out, "fast_complete.json", asked, [done], same=lambda r, a: fingerprint.same_request(r, a, cfg)) is not None
    check_student_base(cfg, merged)

    for folder in (base / "unet", base / "vae", merged / "unet"):
        data = bytearray((folder / "extra.safetensors").read_bytes())
        data[0] ^= 0xFF  # in the first chunk, which every rule hashes
        (folder / "extra.safetensors").write_bytes(bytes(data))
    with pytest.raises(StaleStateError, match=r"incremental\.base_merged\.checksum: .*student\.base\.checksum: "):
        fingerprint.check_resume(cfg, out, ["distill"])
    with pytest.raises(StaleStateError, match=r"model\.unet\.checksum: "):
        fingerprint.check_fast_resume(cfg, merged, out)
    asked["inputs"] = fingerprint.fast_inputs(cfg, merged)
    assert finished(out, "fast_complete.json", asked, [done], same=lambda r, a: fingerprint.same_request(r, a, cfg)) is None
    with pytest.raises(TeacherError, match="was merged on the student base"):
        check_student_base(cfg, merged)


def _flip_last_byte(folder: Path) -> None:
    weights = next(folder.glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # one byte of the weights
    weights.write_bytes(bytes(data))


def _recorded_incremental_run(world, tmp_path):
    """An incremental merge's output folder with every stage recorded and its state faked; the previous
    merged model is a copy of the base (only its files matter here)."""
    import shutil

    merged = shutil.copytree(world["base"], tmp_path / "merged")
    out = tmp_path / "out"
    cfg = _cfg(world, out, data={"synthetic_fraction": 0.5}, incremental={"base_merged": str(merged), "regularization": False})
    stages = ["synthesize", "distill", "finetune"]
    for stage in stages:
        fingerprint.record(cfg, out, stage)
        _fake_state(cfg, out, stage)
    return merged, out, cfg, stages


def test_a_previous_merged_model_remade_in_place_refuses(world, tmp_path):
    """incremental.base_merged was fingerprinted by its path only: the previous merged model re-made in
    the same folder with other weights let a re-run resume what the old one made (synthesize, distill)."""

    merged, out, cfg, stages = _recorded_incremental_run(world, tmp_path)
    fingerprint.check_resume(cfg, out, stages)  # unchanged: resume
    _flip_last_byte(merged / "unet")
    with pytest.raises(StaleStateError, match="incremental.base_merged.checksum") as error:
        fingerprint.check_resume(cfg, out, stages)
    assert all(f"{stage} (" in str(error.value) for stage in stages)


@pytest.mark.parametrize(
    "section, part, key",
    [
        ("data", "scheduler", "data.scheduler.checksum"),  # the workers' noise schedule
        ("data", "tokenizer", "data.tokenizer.checksum"),  # the stream's token ids
        ("student", "text_encoder", "student.base.conditioning.checksum"),  # the student's text conditioning
    ],
)
def test_a_base_whose_schedule_tokenizer_or_text_encoder_changed_refuses(world, tmp_path, section, part, key):
    """What the distill workers read from data.base and student.base beside the student's UNet: these
    folders changed, a re-run used to resume the checkpoint made with the old ones."""
    import shutil

    base = shutil.copytree(world["base"], tmp_path / "base")
    out = tmp_path / "out"
    cfg = _cfg(world, out, **{section: {"base": str(base)}})
    fingerprint.record(cfg, out, "distill")
    _fake_state(cfg, out, "distill")
    fingerprint.check_resume(cfg, out, ["distill"])  # unchanged: resume
    changed = sorted(p for p in (base / part).iterdir() if p.is_file())[0]
    changed.write_bytes(changed.read_bytes() + b"\n")
    with pytest.raises(StaleStateError, match=rf"{key}: "):
        fingerprint.check_resume(cfg, out, ["distill"])


def test_the_few_step_stage_refuses_another_tokenizer(world, tmp_path):
    """Finding: the few-step stage's record left out data.tokenizer, which tokenizes its stream's
    captions (the merge's stages record it): a resume with another tokenizer went on with the old
    token ids. A record made before it was recorded still resumes (_ADDED_LATER)."""
    import json
    import shutil

    tokenizer = shutil.copytree(Path(world["base"]) / "tokenizer", tmp_path / "tokenizer")
    out, model = tmp_path / "fast", world["base"]  # any folder with a unet/ stands for the merged model
    cfg = _cfg(world, tmp_path / "run", data={"tokenizer": str(tokenizer)}, fast={"output_dir": str(out)})
    fingerprint.record_fast(cfg, model, out)
    (fingerprint.fast_state_path(cfg, out) / "checkpoint_000001").mkdir(parents=True)
    fingerprint.check_fast_resume(cfg, model, out)  # unchanged: resume
    vocabulary = tokenizer / "tokenizer.json"
    vocabulary.write_bytes(vocabulary.read_bytes() + b"\n")
    with pytest.raises(StaleStateError, match=r"fast \(.*\): data\.tokenizer\.checksum: "):
        fingerprint.check_fast_resume(cfg, model, out)
    record = json.loads((out / fingerprint.RECORD).read_text())  # as the code before this key wrote it
    del record["fast"]["data.tokenizer.checksum"]
    (out / fingerprint.RECORD).write_text(json.dumps(record))
    fingerprint.check_fast_resume(cfg, model, out)


def test_a_few_step_stage_finished_before_an_input_was_recorded_is_still_complete(world, tmp_path):
    """Finding: the few-step job's completion record holds its fast_inputs and was compared exactly, so
    each input added to them later (the tokenizer's checksum, the rollout step counts) made a few-step
    model finished before it train, save, evaluate and register again when the same job came back.
    Compared as a resume compares them now: an input the record lacks (_ADDED_LATER) does not count."""
    from dmm_ray.completion import finished, record_finished

    out, model = tmp_path / "fast", world["base"]  # any folder with a unet/ stands for the merged model
    cfg = _cfg(world, tmp_path / "run", fast={"output_dir": str(out)})
    inputs = fingerprint.fast_inputs(cfg, model)
    done = out / "model" / "model_index.json"
    done.parent.mkdir(parents=True)
    done.write_text("{}")

    def asked(inputs, **config):
        return {"config": {**cfg.model_dump(mode="json"), **config}, "model": str(model), "inputs": inputs, "evaluate": False}

    record_finished(out, "fast_complete.json", asked({k: v for k, v in inputs.items() if k != "data.tokenizer.checksum"}))
    assert finished(out, "fast_complete.json", asked(inputs), [done], same=fingerprint.same_request) is not None
    assert finished(out, "fast_complete.json", asked(inputs, seed=7), [done], same=fingerprint.same_request) is None
    assert finished(out, "fast_complete.json", asked({**inputs, "seed": 7}), [done], same=fingerprint.same_request) is None
    record_finished(out, "fast_complete.json", asked({**inputs, "data.tokenizer.checksum": "another"}))  # recorded: it counts
    assert finished(out, "fast_complete.json", asked(inputs), [done], same=fingerprint.same_request) is None


def test_the_few_step_dry_run_reads_the_merged_unet_once(world, tmp_path, monkeypatch):
    """Review mend: check_before_run (jobs/fast.py --dry-run) computed fast_inputs, which reads the merged UNet
    for its checksum, twice on a folder holding both training state and a completion record: in
    check_fast_resume, then for the record. Once now, for both."""
    from dmm_ray.completion import record_finished
    from dmm_ray.fast import job as fast_job

    out, model = tmp_path / "fast", Path(world["base"]).resolve()  # any folder with a unet/ stands for the merged model
    cfg = _cfg(world, tmp_path / "run", fast={"output_dir": str(out)})
    inputs = fingerprint.fast_inputs(cfg, model)
    fingerprint.record_fast(cfg, model, out, inputs)  # the training state, and what it was made with
    (fingerprint.fast_state_path(cfg, out) / "checkpoint_000001").mkdir(parents=True)
    done = out / "model" / "model_index.json"
    done.parent.mkdir(parents=True)
    done.write_text("{}")
    record_finished(out, fast_job.COMPLETE_RECORD, {"config": cfg.model_dump(mode="json"), "model": str(model), "inputs": inputs, "evaluate": True})
    calls, real = [], fingerprint.fast_inputs
    monkeypatch.setattr(fingerprint, "fast_inputs", lambda *a, **k: calls.append(a) or real(*a, **k))
    assert "already complete" in fast_job.check_before_run(cfg, model)[-1]
    assert len(calls) == 1  # was 2


def test_the_few_step_job_finds_the_merges_own_few_step_stage_finished(world, tmp_path):
    """`jobs/fast.py --model OUT/merged --config C` after the merge with config C ran its own few-step stage
    (`fast.enabled`): the stage recorded fast.output_dir filled in (<output_dir>/fast) and fast.enabled, the job asks
    them unset (the same folder; the job runs whatever fast.enabled says), so the job trained, saved and registered
    the same few-step model again. Now finished; another setting still is not."""
    from dmm_ray.completion import record_finished
    from dmm_ray.fast import job as fast_job
    from dmm_ray.merge import fast_stage_config

    model = Path(world["base"]).resolve()  # any folder with a unet/ stands for the merged model
    asked = _cfg(world, tmp_path / "run")  # jobs/fast.py: fast.output_dir and fast.enabled unset
    stage = fast_stage_config(_cfg(world, tmp_path / "run", fast={"enabled": True}), tmp_path / "run")  # the merge's stage
    out = fast_job.fast_dir(asked)
    assert fast_job.fast_dir(stage) == out and (stage.fast.output_dir, stage.fast.enabled) != (asked.fast.output_dir, asked.fast.enabled)
    inputs = fingerprint.fast_inputs(stage, model)
    (out / "model").mkdir(parents=True)
    (out / "model" / "model_index.json").write_text("{}")
    record_finished(out, fast_job.COMPLETE_RECORD, fast_job._fast_request(stage, model, inputs, True))
    assert "already complete" in fast_job.check_before_run(asked, model)[-1]  # the run's own check (_finished_here)
    other = asked.model_copy(update={"fast": asked.fast.model_copy(update={"steps": asked.fast.steps + 1})})
    assert not any("already complete" in line for line in fast_job.check_before_run(other, model))


def test_a_record_made_before_an_input_was_recorded_still_resumes(world, tmp_path):
    """Inputs fingerprinted since a later version (_ADDED_LATER): a record without them (an output_dir of an
    older dmm-ray) resumes as before; once recorded, they are compared."""
    import json

    merged, out, cfg, stages = _recorded_incremental_run(world, tmp_path)
    recorded = json.loads((out / fingerprint.RECORD).read_text())
    for stage in stages:
        added = [k for k in recorded[stage] if k.removeprefix("synthesized.") in fingerprint._ADDED_LATER]
        assert added
        for key in added:
            del recorded[stage][key]
    (out / fingerprint.RECORD).write_text(json.dumps(recorded))
    fingerprint.check_resume(cfg, out, stages)
    for stage in stages:  # the resumed stage records them when it starts: from then on they count
        fingerprint.record(cfg, out, stage)
    _flip_last_byte(merged / "unet")
    with pytest.raises(StaleStateError, match="incremental.base_merged.checksum"):
        fingerprint.check_resume(cfg, out, stages)


def test_unrecorded_state_refuses_and_restart_discards_it(world, tmp_path):
    out = tmp_path / "out"
    cfg = _cfg(world, out)
    _fake_state(cfg, out, "distill")  # e.g. left by an older dmm-ray
    (out / "merged").mkdir()
    with pytest.raises(StaleStateError, match="records no settings"):
        fingerprint.check_resume(cfg, out, ["distill"])
    removed = fingerprint.discard_state(cfg, out)
    assert fingerprint.state_paths(cfg, out, "distill")[0] in removed
    fingerprint.check_resume(cfg, out, ["distill"])
    assert (out / "merged").is_dir()  # the last good model stays


@pytest.mark.ray
@pytest.mark.slow  # over 60 s on 2 cores: make test-slow
def test_rerun_with_changed_settings_stops_before_ray_and_restart_runs(ray_cluster, world, tmp_path):
    from dmm_ray.merge import run_merge

    out = tmp_path / "out"
    base = tiny_merge_config(world, out, synthesis={"enabled": False}, distill={"steps": 2, "lambda_adv": 0})
    run_merge(MergeConfig.model_validate(base))
    first = (out / "merged" / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()

    changed = tmp_path / "changed.yaml"
    changed.write_text(yaml.safe_dump({**base, "distill": {**base["distill"], "lr": 1e-3}}))
    proc = subprocess.run([sys.executable, str(REPO / "jobs" / "merge.py"), "--config", str(changed)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "distill.lr: 0.0001 -> 0.001" in proc.stderr and "--restart" in proc.stderr
    assert "Started a local Ray" not in proc.stdout + proc.stderr  # refused before Ray starts

    cfg = MergeConfig.model_validate(yaml.safe_load(changed.read_text()))
    result = run_merge(cfg, restart=True)  # the old state is discarded, the new settings really train
    assert result.stage_metrics["distill"]["resumed_from"] == 0 and result.stage_metrics["distill"]["step"] == 2
    assert (out / "merged" / "unet" / "diffusion_pytorch_model.safetensors").read_bytes() != first
    assert fingerprint._read(out)["distill"]["distill.lr"] == 1e-3


def test_a_merge_and_its_few_step_stage_in_one_folder_each_restart_only_their_own_state(world, tmp_path):
    """fast.output_dir may be the merge's output_dir: both then record in its fingerprints.json. Each
    --restart discards its own state and record only, so the other's state still resumes; the last
    record to go takes the file with it."""
    out, model = tmp_path / "out", world["base"]  # any folder with a unet/ stands for the merged model
    cfg = _cfg(world, out, fast={"output_dir": str(out)})

    def fast_state():
        fingerprint.record_fast(cfg, model, out)
        folder = fingerprint.fast_state_path(cfg, out) / "checkpoint_000001"
        folder.mkdir(parents=True)
        (folder / "trainable.pt").write_bytes(b"x")

    fingerprint.record(cfg, out, "distill")
    _fake_state(cfg, out, "distill")
    fast_state()
    assert fingerprint.discard_fast_state(cfg, out) == [fingerprint.fast_state_path(cfg, out)]  # jobs/fast.py --restart
    assert set(fingerprint._read(out)) == {"distill", fingerprint.TRAINING_RUN}
    fingerprint.check_resume(cfg, out, ["distill"])  # the merge's state still resumes
    fast_state()
    fast_run = fingerprint.training_run(out, fingerprint.FAST_TRAINING_RUN)
    fingerprint.discard_state(cfg, out)  # jobs/merge.py --restart (without fast.enabled)
    assert set(fingerprint._read(out)) == {"fast", fingerprint.FAST_TRAINING_RUN}  # its training's id too (its saved model names it)
    assert fingerprint.training_run(out, fingerprint.FAST_TRAINING_RUN) == fast_run
    fingerprint.check_fast_resume(cfg, model, out)  # the few-step job's state still resumes
    assert fingerprint.discard_fast_state(cfg, out)[-1] == out / fingerprint.RECORD and not (out / fingerprint.RECORD).exists()


def test_a_few_step_record_holding_the_planned_cpus_per_worker_still_matches_an_auto_request():
    """A merge's few-step stage recorded its config with the cluster plan's cpus_per_worker (`auto` resolved to a
    number) until its records took the config as given: such a finished stage is still finished for a request that
    asks `auto`, not trained, saved and registered again once; a number asked is compared as it is."""
    asked = {"config": {"name": "x", "scaling": {"num_workers": 2, "cpus_per_worker": "auto"}}, "model": "m", "inputs": {}, "evaluate": True}
    planned = {**asked, "config": {"name": "x", "scaling": {"num_workers": 2, "cpus_per_worker": 1.5}}}
    assert fingerprint.same_request(planned, asked)
    assert not fingerprint.same_request({**planned, "model": "other"}, asked)
    numbered = {**asked, "config": {"name": "x", "scaling": {"num_workers": 2, "cpus_per_worker": 2}}}
    assert not fingerprint.same_request(planned, numbered)
    assert fingerprint.same_request(numbered, numbered)
