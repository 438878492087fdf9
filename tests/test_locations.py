"""Default locations ($DMM_HOME), the relative-path rule, and the resource check (no Ray needed)."""

import json
import os

import pytest
import yaml

from dmm_ray import paths
from dmm_ray.config import ConfigError, MergeConfig, load_config
from dmm_ray.resources import ResourceError, plan_resources

TEACHERS = [{"name": n, "source": f"/x/{n}"} for n in "abcdefgh"]


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("DMM_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def test_resolve_rule(tmp_path, home, monkeypatch):
    assert paths.dmm_home() == home
    assert paths.resolve("a/b", tmp_path) == str(tmp_path / "a" / "b")
    assert paths.resolve("$DMM_HOME/outputs/x", tmp_path) == str(home / "outputs" / "x")
    assert paths.resolve("${DMM_HOME}", tmp_path) == str(home)
    assert paths.resolve("s3://bucket/x", tmp_path) == "s3://bucket/x" and paths.resolve(None, tmp_path) is None
    assert paths.resolve("/abs/../y", tmp_path) == "/y"
    assert paths.resolve_tracking_uri("sqlite:///m.db", tmp_path) == f"sqlite:///{tmp_path}/m.db"
    assert paths.resolve_tracking_uri("sqlite:///$DMM_HOME/m.db", tmp_path) == f"sqlite:///{home}/m.db"
    assert paths.resolve_tracking_uri("http://mlflow:5000", tmp_path) == "http://mlflow:5000"
    monkeypatch.delenv("DMM_HOME")
    assert paths.dmm_home() == (paths.Path.home() / ".dmm-ray").resolve()
    assert paths.default_tracking_uri() == f"sqlite:///{paths.Path.home().resolve()}/.dmm-ray/mlflow.db"


def test_a_relative_file_store_is_made_absolute_as_a_relative_sqlite_one(tmp_path, monkeypatch):
    """Ray Train workers log their per-step metrics from their own working directory: a relative
    file store (`mlruns`, with MLFLOW_ALLOW_FILE_STORE=true) was another, empty store there, and every
    training metric was dropped ("Run ... not found"). MLflow's named stores and URIs stay as given."""
    from dmm_ray.config import TrackingConfig

    assert paths.resolve_tracking_uri("mlruns", tmp_path) == str(tmp_path / "mlruns")
    monkeypatch.chdir(tmp_path)
    assert TrackingConfig(tracking_uri="runs/mlflow").tracking_uri == str(tmp_path / "runs" / "mlflow")
    for uri in ("databricks", "databricks-uc", "file:///abs/mlruns", "/abs/mlruns", "http://h:5000", "databricks://profile"):
        assert paths.resolve_tracking_uri(uri, tmp_path) == uri


def test_config_paths_resolve_against_the_config_file_and_default_to_dmm_home(tmp_path, home, monkeypatch):
    folder = tmp_path / "configs" / "sub"
    folder.mkdir(parents=True)
    (folder / "c.yaml").write_text(
        yaml.safe_dump(
            {
                "name": "proj",
                "teachers": [{"name": "a", "source": "../models/a"}, {"name": "b", "source": "/x/b", "base": "base"}],
                "student": {"base": "../models/base"},
                "data": {"base": "../models/base", "source": {"kind": "journeydb", "root": "imgs", "annotations": ["ann.jsonl"]}},
                "incremental": {"base_merged": "$DMM_HOME/outputs/first/merged"},
                "evaluation": {"prompts": "p.txt", "extractor": {"kind": "import", "path": "pkg.mod:factory"}},
                "tracking": {"uri": "sqlite:///db/mlflow.db"},
            }
        )
    )
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # the process cwd must not matter for paths written in the file
    cfg = load_config(folder / "c.yaml", ["synthesis.prompts=prompts.txt"])
    models = tmp_path / "configs" / "models"
    assert cfg.teachers[0].source == str(models / "a") and cfg.teachers[1].base == str(folder / "base")
    assert cfg.student.base == cfg.data.base == str(models / "base")
    assert cfg.data.source.root == str(folder / "imgs") and cfg.data.source.annotations == [str(folder / "ann.jsonl")]
    folder_source = ["data.source.kind=folder", "data.source.annotations=[]", "data.source.manifest=m.jsonl"]  # (a folder source's key)
    assert load_config(folder / "c.yaml", folder_source).data.source.manifest == "m.jsonl"  # relative to source.root by design
    assert cfg.incremental.base_merged == str(home / "outputs" / "first" / "merged")
    assert cfg.evaluation.prompts_file == str(folder / "p.txt") and cfg.evaluation.extractor.path == "pkg.mod:factory"
    assert cfg.tracking.tracking_uri == f"sqlite:///{folder}/db/mlflow.db"
    assert cfg.synthesis.prompts == str(elsewhere / "prompts.txt")  # --set: the current directory
    # nothing given: output_dir, shards and the MLflow store default to $DMM_HOME
    assert cfg.output_dir == str(home / "outputs" / "proj") and cfg.data.shards == str(home / "outputs" / "proj" / "latents")
    from dmm_ray.tracking import TrackingConfig

    bare = load_config(folder / "c.yaml", ["tracking={}"])
    assert bare.tracking.tracking_uri == f"sqlite:///{home}/mlflow.db"
    assert TrackingConfig().artifact_location == (home / "mlartifacts").as_uri()
    assert cfg.evaluation.cache_dir == str(home / "cache" / "fid")
    assert cfg.evaluation.output_dir == str(home / "outputs" / "proj" / "evaluation")


def test_zoo_preset_lives_in_dmm_home(tmp_path, home):
    config = tmp_path / "c.yaml"
    config.write_text("zoo: micro\n")
    with pytest.raises(ConfigError, match=r"not built yet.*python jobs/build_zoo.py --size micro"):
        load_config(config)
    zoo = home / "zoo" / "micro"
    zoo.mkdir(parents=True)
    (zoo / "zoo.yaml").write_text(
        yaml.safe_dump(
            {
                "base": "base",
                "dataset": "images",
                "eval_prompts": "eval_prompts.txt",
                "feature_net": "feature_net",
                "teachers": [
                    {"name": "warm", "source": "teachers/warm", "format": "diffusers"},
                    {"name": "noir", "source": "teachers/noir.safetensors", "format": "single_file", "base": "base"},
                ],
            }
        )
    )
    cfg = load_config(config, ["scaling.cpus_per_worker=auto"])
    assert cfg.zoo == str(zoo / "zoo.yaml")
    assert [t.source for t in cfg.teachers] == [str(zoo / "teachers/warm"), str(zoo / "teachers/noir.safetensors")]
    assert cfg.student.base == str(zoo / "base") and cfg.data.source.root == str(zoo / "images")
    assert cfg.scaling.cpus_per_worker == "auto"
    # a finished zoo of an older version of the preset: refused without building (--dry-run), as the run's build step refuses it
    from dmm_ray.zoo.config import MARKER, preset

    (zoo / MARKER).write_text(json.dumps({"fingerprint": preset("micro").fingerprint(), "size": "micro", "seed": 0}))
    assert load_config(config).zoo == str(zoo / "zoo.yaml")
    (zoo / MARKER).write_text(json.dumps({"fingerprint": preset("micro", lora_rank=8).fingerprint(), "size": "micro", "seed": 0}))
    with pytest.raises(
        ConfigError,
        match=r"zoo: 'micro': .* holds a toy zoo built from an older version of the 'micro' preset; rebuild it with `python jobs/build_zoo.py --out .* --size micro --force`",
    ):
        load_config(config)
    (zoo / MARKER).unlink()
    # a folder (or its zoo.yaml) named by a relative path in a file: relative to that file
    (tmp_path / "c2.yaml").write_text("zoo: home/zoo/micro\n")
    assert load_config(tmp_path / "c2.yaml").zoo == str(zoo / "zoo.yaml")


def test_embedded_default_config_has_no_relative_paths():
    """jobs/configs/toy.yaml runs from Ray's temporary working dir too: only $DMM_HOME defaults."""
    toy = yaml.safe_load((paths.Path(__file__).resolve().parents[1] / "jobs" / "configs" / "toy.yaml").read_text())
    assert toy["zoo"] == "full" and "output_dir" not in toy and "shards" not in toy["data"] and "tracking" not in toy
    assert toy["scaling"]["cpus_per_worker"] == "auto"


def test_ray_job_working_dir_detection():
    tmp = "/tmp/ray/session_1/runtime_resources/working_dir_files/_ray_pkg_abc"
    assert str(paths.ray_job_working_dir(tmp + "/jobs")) == tmp
    assert paths.in_temporary_dir(tmp + "/outputs/x", cwd=tmp) and not paths.in_temporary_dir("/home/u/.dmm-ray", cwd=tmp)
    assert paths.ray_job_working_dir("/home/u/repo") is None


def _cfg(**scaling):
    return MergeConfig.model_validate(
        {
            "teachers": TEACHERS,
            "student": {"base": "/x/base"},
            "output_dir": "/x/out",
            "data": {"base": "/x/base", "shards": "/x/s"},
            "scaling": scaling,
        }
    )


def test_resource_check_refuses_what_the_cluster_cannot_hold_naming_the_numbers():
    # the hang: 8 workers x 0.25 CPU take both CPUs of `ray start --head --num-cpus 2`
    with pytest.raises(ResourceError) as error:
        plan_resources(_cfg(cpus_per_worker=0.25), {"CPU": 2.0})
    message = str(error.value)
    assert "needed 3 = 8 workers x scaling.cpus_per_worker=0.25" in message and "available 2" in message and "scaling.data_cpus=1" in message
    for knob in ("scaling.workers_per_teacher", "scaling.cpus_per_worker", "scaling.teachers_per_worker", "--set scaling.num_workers"):
        assert knob in message
    # GPUs: 8 workers x 1 GPU on a 4-GPU cluster
    with pytest.raises(ResourceError, match=r"GPUs: needed 8 = 8 workers x scaling.gpus_per_worker=1, available 4"):
        plan_resources(_cfg(use_gpu=True, cpus_per_worker=1), {"CPU": 64.0, "GPU": 4.0})
    # auto: nothing left to share once Ray Data's CPU is kept free
    with pytest.raises(ResourceError, match=r"needed more than 1 .* available 1"):
        plan_resources(_cfg(cpus_per_worker="auto"), {"CPU": 1.0})
    # an evaluation actor larger than the cluster
    cfg = _cfg(cpus_per_worker="auto")
    cfg = cfg.model_copy(update={"evaluation": cfg.evaluation.model_copy(update={"worker_num_cpus": 4})})
    with pytest.raises(ResourceError, match=r"an evaluation actor needs 4 CPUs, the cluster has 2 CPUs"):
        plan_resources(cfg, {"CPU": 2.0})
    # a synthesis actor asks Ray for synthesis.cpus_per_actor CPUs (dmm_ray.distill.synthesis), not 1
    cfg = _cfg(cpus_per_worker="auto")
    cfg = cfg.model_copy(update={"synthesis": cfg.synthesis.model_copy(update={"cpus_per_actor": 8})})
    with pytest.raises(ResourceError, match=r"a synthesis actor needs 8 CPUs, the cluster has 2 CPUs \(change synthesis.cpus_per_actor"):
        plan_resources(cfg, {"CPU": 2.0})


def test_resource_plan_auto_and_fixed_layouts_leave_ray_data_room():
    plan = plan_resources(_cfg(cpus_per_worker="auto"), {"CPU": 2.0})
    assert plan.cpus_per_worker == 0.125 and plan.train_cpus + plan.data_cpus <= 2.0 and plan.data_limit_cpus == 1.0
    plan = plan_resources(_cfg(cpus_per_worker="auto", teachers_per_worker=2), {"CPU": 4.0})
    assert plan.workers == 4 and plan.cpus_per_worker == 0.75
    plan = plan_resources(_cfg(cpus_per_worker=1), {"CPU": 12.0})
    assert plan.train_cpus == 8 and plan.data_limit_cpus == 4
    assert "8 Train workers x 1 CPU = 8 CPUs" in plan.summary() and "4 CPUs left for Ray Data" in plan.summary()
    plan = plan_resources(_cfg(cpus_per_worker=8, use_gpu=True, workers_per_teacher=2), {"CPU": 160.0, "GPU": 16.0})
    assert (plan.workers, plan.train_gpus) == (16, 16)
    with pytest.raises(ValueError, match="must be > 0 or .auto."):
        _cfg(cpus_per_worker=0)
    assert os.environ["DMM_HOME"]  # conftest keeps tests out of ~/.dmm-ray


def test_locations_warn_when_outputs_would_land_in_rays_temporary_copy(tmp_path, home, monkeypatch):
    """A relative --set path inside `ray job submit`'s unpacked working dir is deleted with the job: say so."""
    from dmm_ray.merge import format_locations

    pkg = tmp_path / "session_1" / "runtime_resources" / "working_dir_files" / "_ray_pkg_abc"
    pkg.mkdir(parents=True)
    (pkg / "c.yaml").write_text(yaml.safe_dump({"teachers": TEACHERS[:2], "student": {"base": "/x/base"}, "data": {"base": "/x/base"}}))
    monkeypatch.chdir(pkg)
    text = format_locations(load_config(pkg / "c.yaml"), "locations")
    assert f"output_dir:    {home / 'outputs' / 'dmm-merge'}" in text and "WARNING" not in text
    assert f"mlflow ui --backend-store-uri sqlite:///{home}/mlflow.db" in text
    text = format_locations(load_config(pkg / "c.yaml", ["output_dir=outputs/x", "tracking.uri=sqlite:///m.db"]), "locations")
    assert f"WARNING: output_dir, latent shards, MLflow store lie(s) in Ray's temporary working dir {pkg}" in text
    # a merge's few-step model (fast.enabled): listed, and a relative fast.output_dir flagged (finding: it was not)
    text = format_locations(load_config(pkg / "c.yaml", ["fast.enabled=true"]), "locations")
    assert f"fast model:    {home / 'outputs' / 'dmm-merge' / 'fast' / 'model'}" in text and "WARNING" not in text
    text = format_locations(load_config(pkg / "c.yaml", ["fast.enabled=true", "fast.output_dir=fastout"]), "locations")
    assert f"WARNING: fast model lie(s) in Ray's temporary working dir {pkg}" in text


def test_zoo_preset_is_built_on_first_use_and_then_reused(tmp_path, home, capsys):
    """`zoo: micro` with build_zoo=True (what jobs/merge.py passes): built once into $DMM_HOME/zoo/micro."""
    config = tmp_path / "c.yaml"
    config.write_text("zoo: micro\n")
    cfg = load_config(config, build_zoo=True)
    assert "building the toy zoo preset 'micro'" in capsys.readouterr().out
    assert cfg.zoo == str(home / "zoo" / "micro" / "zoo.yaml") and [t.name for t in cfg.teachers] == ["warm", "noir", "sketch"]
    stamp = (home / "zoo" / "micro" / "zoo.yaml").stat().st_mtime_ns
    assert load_config(config, build_zoo=True).teachers == cfg.teachers
    assert "building" not in capsys.readouterr().out and (home / "zoo" / "micro" / "zoo.yaml").stat().st_mtime_ns == stamp
    with pytest.raises(
        ConfigError,
        match=r"zoo: 'mirco' is not a preset \(presets: full, micro, built under \$DMM_HOME/zoo\); for a zoo folder give its path, e.g. zoo: ./mirco",
    ):
        load_config(config, ["zoo=mirco"], build_zoo=True)


def test_an_output_folder_that_cannot_be_written_is_refused_before_any_work(tmp_path):
    """A file where the folder goes, a file among its parents, a parent nothing can be created in
    (/proc, even for root): OutputPathError naming the setting; a good path is left as it was."""
    (tmp_path / "f").write_text("x")
    with pytest.raises(paths.OutputPathError, match=r"^output_dir .*/f is a file, not a folder"):
        paths.check_writable_folder(tmp_path / "f", "output_dir")
    with pytest.raises(paths.OutputPathError, match=r"^--out .*/f/sub: .*/f is a file, so no folder can be created"):
        paths.check_writable_folder(tmp_path / "f" / "sub", "--out")
    with pytest.raises(paths.OutputPathError, match=r"^--out /proc/dmm-x: cannot write in /proc"):
        paths.check_writable_folder("/proc/dmm-x", "--out")
    before = sorted(os.listdir(tmp_path))
    paths.check_writable_folder(tmp_path / "new" / "deeper", "output_dir")
    paths.check_writable_folder("s3://bucket/x", "output_dir")  # URIs: their filesystem decides later
    assert sorted(os.listdir(tmp_path)) == before  # the probe leaves nothing behind


def test_jobs_answer_user_errors_with_one_line_and_exit_code_2(monkeypatch, capsys):
    """dmm_ray.console.cli_main: a ValueError / OSError becomes `error: ...` and 2; DMM_VERBOSE=1 keeps
    the traceback; anything else (a bug) still raises."""
    from dmm_ray.console import cli_main
    from dmm_ray.styles import StyleError

    def job(error):
        @cli_main
        def main(argv=None):
            raise error

        return main

    monkeypatch.delenv("DMM_VERBOSE", raising=False)
    assert job(StyleError("unknown style 'x'"))([]) == 2
    assert capsys.readouterr().err == "error: unknown style 'x'\n"
    assert job(FileNotFoundError("no such file: a.yaml"))([]) == 2
    assert job(ValueError("from a library"))([]) == 2
    assert "DMM_VERBOSE=1" in capsys.readouterr().err.splitlines()[-1]  # not ours: how to see the traceback
    with pytest.raises(KeyError):
        job(KeyError("bug"))([])
    from dmm_ray.output_lock import OutputDirBusyError

    assert job(OutputDirBusyError("output_dir /x is in use by pid 7"))([]) == 2
    assert capsys.readouterr().err == "error: output_dir /x is in use by pid 7\n"
    with pytest.raises(KeyboardInterrupt):  # a job that says nothing about an interrupt lets it through
        job(KeyboardInterrupt())([])

    @cli_main(interrupted="the checkpoints stay; re-run to resume")
    def resumable(argv=None):
        raise KeyboardInterrupt

    assert resumable([]) == 130 and capsys.readouterr().err == "\ninterrupted: the checkpoints stay; re-run to resume\n"
    monkeypatch.setenv("DMM_VERBOSE", "1")
    with pytest.raises(StyleError):
        job(StyleError("unknown style 'x'"))([])


def test_a_plain_diffusers_folder_as_the_model_is_the_projects_error_not_a_library_one(tmp_path, capsys, monkeypatch):
    """jobs/evaluate.py --model <a plain SD folder>: one line, without the "(the traceback: DMM_VERBOSE=1)"
    meant for another library's errors (merged_style_names raised a plain ValueError)."""
    from dmm_ray.console import cli_main
    from dmm_ray.models.style_unet import merged_style_names

    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text('{"_class_name": "UNet2DConditionModel"}')
    monkeypatch.delenv("DMM_VERBOSE", raising=False)
    assert cli_main(lambda argv: merged_style_names(tmp_path))([]) == 2
    config = tmp_path / "unet" / "config.json"
    assert capsys.readouterr().err == f"error: '{config}' has no style_names; is '{tmp_path}' a DMM merged model (StyleUNet)?\n"


def test_sigterm_once_ray_is_up_is_answered_as_a_ctrl_c_with_143(capsys):
    """`ray job stop` / kill: SIGTERM goes through the SIGINT handler of the moment (Ray Train's during
    fit(), which aborts the run) and the job prints its line and exits 143, not Ray's C++ stack dump and
    exit 1 or 134. A library user's process gets no handler; the job's is removed when it returns."""
    import os
    import signal
    import time

    from dmm_ray.console import cli_main, sigterm_as_interrupt

    before = signal.getsignal(signal.SIGTERM)
    sigterm_as_interrupt()  # outside a job: nothing installed
    assert signal.getsignal(signal.SIGTERM) is before
    seen = []

    def ray_train_like(signum, frame):  # what fit() installs for Ctrl-C: abort the run, then interrupt
        seen.append(signum)
        raise KeyboardInterrupt

    @cli_main(interrupted="the checkpoints stay; re-run to resume")
    def job(argv):
        sigterm_as_interrupt()  # what ensure_ray does right after ray.init
        if argv:
            signal.signal(signal.SIGINT, ray_train_like)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(10)  # the handler raises here
        return 0

    sigint = signal.getsignal(signal.SIGINT)
    try:
        assert job([]) == 143
        assert capsys.readouterr().err == "\nterminated (SIGTERM): the checkpoints stay; re-run to resume\n"
        assert signal.getsignal(signal.SIGTERM) is before
        assert job(["during fit"]) == 143 and seen == [signal.SIGINT]
    finally:
        signal.signal(signal.SIGINT, sigint)
    assert signal.getsignal(signal.SIGTERM) is before

    # a job's main called inside another's leaves the handler to the outer one
    @cli_main(interrupted="inner")
    def inner(argv):
        return 0

    @cli_main(interrupted="outer")
    def outer(argv):
        inner([])
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(3)  # the handler raises here (with the inner job's handler left behind: the previous one runs)
        return 0

    previous = signal.signal(signal.SIGTERM, lambda *_: seen.append("previous handler"))  # not the default: that would end pytest
    try:
        assert outer([]) == 143 and "terminated (SIGTERM): outer" in capsys.readouterr().err
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_every_long_job_answers_ctrl_c_with_its_line_and_130(monkeypatch, tmp_path, capsys, home):
    """build_zoo, encode_latents and evaluate run for minutes: a Ctrl-C prints what is kept and how
    to go on, and exits 130, not a traceback. A merge stopped while it builds its toy zoo says what
    the build keeps, not what a merge keeps."""

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    import dmm_ray.data.encode
    import dmm_ray.evaluation.api
    import dmm_ray.ray_session
    import dmm_ray.teachers
    import dmm_ray.zoo.build
    from jobs import build_zoo, encode_latents, evaluate

    monkeypatch.setattr(dmm_ray.zoo.build, "build_zoo", interrupt)
    assert build_zoo.main(["--size", "micro", "--out", str(tmp_path / "zoo"), "--quiet"]) == 130
    assert "interrupted: nothing was written under --out" in capsys.readouterr().err
    from jobs import merge

    (tmp_path / "c.yaml").write_text("zoo: micro\n")
    assert merge.main(["--config", str(tmp_path / "c.yaml")]) == 130
    err = capsys.readouterr().err
    assert f"interrupted: the toy zoo's build was stopped: nothing was written to {home / 'zoo' / 'micro'}" in err
    assert "merged model" not in err

    images = tmp_path / "images"
    images.mkdir()
    vae = tmp_path / "base" / "vae"
    vae.mkdir(parents=True)
    (vae / "config.json").write_text("{}")
    monkeypatch.setattr(dmm_ray.ray_session, "ensure_ray", lambda *a, **kw: False)
    monkeypatch.setattr(dmm_ray.data.encode, "plan_encode", lambda cfg: None)  # the empty image folder has no index to read
    monkeypatch.setattr(dmm_ray.data.encode, "run_encode", interrupt)
    args = ["--source", "folder", "--root", str(images), "--base", str(tmp_path / "base"), "--out", str(tmp_path / "shards")]
    assert encode_latents.main(args) == 130
    assert "interrupted: the shards committed so far stay in --out" in capsys.readouterr().err

    zoo = tmp_path / "zoo.yaml"
    zoo.write_text("base: base\nteachers: [{name: a, source: base}]\n")
    monkeypatch.setattr(dmm_ray.evaluation.api, "evaluate_merge", interrupt)
    monkeypatch.setattr(dmm_ray.teachers, "check_teacher_files", lambda *a, **kw: None)  # the fake teacher has no weights
    assert evaluate.main(["--reference-only", "--teachers", str(zoo), "--no-ray"]) == 130
    assert "interrupted: the statistics already computed stay in cache_dir" in capsys.readouterr().err


def test_build_zoo_refuses_a_seed_or_report_size_numpy_cannot_take_before_building(tmp_path, capsys):
    from jobs import build_zoo

    for flags, says in (
        (["--seed", "-1"], "--seed must be in [0, 2**32)"),
        (["--report", "--report-samples", "0"], "--report-samples must be at least 2"),
    ):
        with pytest.raises(SystemExit) as info:
            build_zoo.main(["--size", "micro", "--out", str(tmp_path / "zoo"), *flags])
        assert info.value.code == 2 and says in capsys.readouterr().err
    assert not (tmp_path / "zoo").exists()


def test_an_empty_option_is_refused_not_read_as_the_default(capsys, monkeypatch):
    """`--out "$UNSET"` would silently write to the default folder: every job refuses an empty value."""
    from jobs import build_zoo, demo, evaluate, export, fast, merge

    monkeypatch.setattr(demo.subprocess, "run", lambda *a, **k: pytest.fail(f"demo ran a step: {a}"))  # `--zoo ""`: not the default zoo's build

    for job, argv, flag in (
        (merge, ["--config", "", "--dry-run"], "--config"),
        (fast, ["--model", "", "--no-eval"], "--model"),
        (evaluate, ["--reference-only", "--teachers", "zoo.yaml", "--out", " "], "--out"),
        (build_zoo, ["--out", ""], "--out"),
        (demo, ["--zoo", ""], "--zoo"),
        (export, ["--model", "m", "--style", "noir", "--out", "x.safetensors", "--config-dir", ""], "--config-dir"),
    ):
        with pytest.raises(SystemExit) as info:
            job.main(argv)
        assert info.value.code == 2 and f"{flag} is empty" in capsys.readouterr().err, job
    with pytest.raises(SystemExit):
        evaluate.main(["--reference-only", "--teachers", "zoo.yaml", "--section", "evaluation"])
    assert "--section names a key of --config; give --config too" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # the model was sampled and scored, then its numbers dropped
        evaluate.main(["--reference-only", "--model", "m", "--teachers", "zoo.yaml"])
    assert "--reference-only computes M_ref from the teachers alone: leave --model out" in capsys.readouterr().err


def test_evaluate_reference_only_takes_no_output_folder(tmp_path, monkeypatch, capsys):
    """Finding: `evaluate.py --reference-only` writes no files (M_ref is cached and printed), yet --out
    was taken and ignored (the folder stayed empty, nothing said so), and the default output_dir was
    checked: from a folder it cannot write in (/proc), M_ref was refused. --out is a usage error with
    it now, and no output folder is checked; sampling starts (an interrupt stands for it here)."""
    import dmm_ray.evaluation.api
    import dmm_ray.teachers
    from jobs import evaluate

    with pytest.raises(SystemExit) as info:
        evaluate.main(["--reference-only", "--teachers", "zoo.yaml", "--out", str(tmp_path / "eval")])
    assert (
        info.value.code == 2
        and "--reference-only writes no files (M_ref is cached in cache_dir and printed): leave --out out" in capsys.readouterr().err
    )
    monkeypatch.setenv("DMM_HOME", str(tmp_path / "home"))
    zoo = tmp_path / "zoo.yaml"
    zoo.write_text("base: base\nteachers: [{name: a, source: base}]\n")
    monkeypatch.setattr(dmm_ray.teachers, "check_teacher_files", lambda *a, **kw: None)  # the fake teacher has no weights
    monkeypatch.setattr(dmm_ray.evaluation.api, "evaluate_merge", lambda *a, **kw: (_ for _ in ()).throw(KeyboardInterrupt))
    monkeypatch.chdir("/proc")  # the default output_dir: outputs/eval here, where nothing can be created
    assert evaluate.main(["--reference-only", "--teachers", str(zoo), "--no-ray"]) == 130, capsys.readouterr().err


def test_build_zoo_refuses_report_samples_without_report(capsys, tmp_path, monkeypatch):
    """--report-samples only sizes --report: alone it was ignored while the zoo was built (minutes)."""
    from dmm_ray.zoo import build
    from jobs import build_zoo

    monkeypatch.setattr(build, "build_zoo", lambda *a, **k: pytest.fail("built the zoo"))
    with pytest.raises(SystemExit) as info:
        build_zoo.main(["--out", str(tmp_path / "zoo"), "--size", "micro", "--report-samples", "5"])
    assert info.value.code == 2 and "--report-samples sizes the --report" in capsys.readouterr().err
    assert not (tmp_path / "zoo").exists()


def test_the_eval_jobs_take_the_shared_set_option():
    """jobs/evaluate.py and jobs/style_mixing.py: --set from dmm_ray.overrides.add_set_argument, as in
    the other jobs (same help: dotted key, an example, repeatable), not a copy of their own."""
    from jobs import evaluate, style_mixing

    for job in (evaluate, style_mixing):
        parser = job.build_parser()
        action = next(a for a in parser._actions if "--set" in a.option_strings)
        assert action.dest == "overrides" and action.help.endswith("(repeatable)") and "e.g. --set " in action.help, job
        args = parser.parse_args(["--model", "m", "--teachers", "t", "--set", "a=1", "--set", "b=2"])
        assert args.overrides == ["a=1", "b=2"], job


def test_demo_reports_a_config_typo_before_building_the_zoo(capsys, monkeypatch, tmp_path):
    """jobs/demo.py --set distill.stepz=3 with no zoo built: the typo is reported at once (exit 2, one
    error), not by jobs/merge.py after the zoo's build (minutes); no step runs, nothing is written."""
    from jobs import demo

    monkeypatch.setenv("DMM_HOME", str(tmp_path))
    monkeypatch.setattr(demo.subprocess, "run", lambda *a, **k: pytest.fail(f"demo ran a step: {a}"))
    assert demo.main(["--set", "distill.stepz=3"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: invalid config") and "distill.stepz" in err and "did you mean distill.steps?" in err, err
    assert list(tmp_path.iterdir()) == []


def test_an_override_with_an_empty_key_is_refused():
    from dmm_ray.overrides import ConfigError, parse_override

    for text in ("=5", "distill.=5", ".steps=5"):
        with pytest.raises(ConfigError, match="the key is empty or has an empty part"):
            parse_override(text)
    assert parse_override("distill.steps=5") == (["distill", "steps"], 5)


def test_one_device_rule_for_every_loader(monkeypatch):
    """ "auto" means the GPU when torch sees one, for the pyfunc, Serve, evaluation and the actors alike;
    a device the process cannot use is refused at load, naming it (Serve: what to change)."""
    import torch

    from dmm_ray.devices import resolve_device, usable_device
    from serve.model import ModelLoadError, pick_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device() == torch.device("cpu") and pick_device("auto") == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda") and resolve_device("cpu") == torch.device("cpu")
    monkeypatch.undo()
    with pytest.raises(ValueError, match="device nodevice: not usable here"):
        usable_device("nodevice", "device")
    if not torch.cuda.is_available():
        with pytest.raises(ModelLoadError, match="device cuda: not usable here.*num_gpus"):
            pick_device("cuda")


def test_the_eval_jobs_expand_dmm_home_and_home_in_their_paths(tmp_path, monkeypatch, capsys):
    """Finding: jobs/evaluate.py, style_mixing.py and weighted_merge.py took a quoted (or after '=')
    `$DMM_HOME` or `~` literally ("teachers file '$DMM_HOME/zoo.yaml' not found"), though it expands in
    every path; the error now names the expanded path (and a zoo.yaml that is there is read)."""
    from jobs import evaluate, style_mixing, weighted_merge

    monkeypatch.setenv("DMM_HOME", str(tmp_path / "dmm"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    for job, argv in (
        (evaluate, ["--teachers", "$DMM_HOME/zoo/zoo.yaml", "--model", "~/merged", "--out", str(tmp_path / "ev")]),
        (style_mixing, ["--teachers=$DMM_HOME/zoo/zoo.yaml", "--model", "~/merged", "--group", "a,b", "--out", str(tmp_path / "mix")]),
        (weighted_merge, ["--teachers", "$DMM_HOME/zoo/zoo.yaml", "--weights", "a=1", "--out", str(tmp_path / "wm")]),
    ):
        assert job.main(argv) == 2, job
        assert f"teachers file '{tmp_path / 'dmm' / 'zoo' / 'zoo.yaml'}' not found" in capsys.readouterr().err, job


def test_the_projects_own_plain_value_errors_carry_no_traceback_hint(capsys, monkeypatch):
    """Finding: a plain ValueError the project raises for the user (require_local's URI refusal, an
    evaluation's check_ready: "FID needs at least 2") printed "(the traceback: DMM_VERBOSE=1)", the hint
    meant for another library's errors. cli_main now tells them apart by where the error was raised."""
    from pathlib import Path

    from dmm_ray.console import cli_main
    from dmm_ray.data.fs import require_local
    from dmm_ray.evaluation.config import EvalConfig

    monkeypatch.delenv("DMM_VERBOSE", raising=False)
    assert cli_main(lambda argv: require_local("--output-dir", "s3://b/fast"))([]) == 2
    assert capsys.readouterr().err == (
        "error: --output-dir 's3://b/fast' is a URI, but --output-dir must be a local folder "
        "(URIs are supported for output_dir, data.shards and loading a merged model)\n"
    )
    assert cli_main(lambda argv: EvalConfig(prompts=["a"], images_per_prompt=1).check_ready())([]) == 2
    assert capsys.readouterr().err == "error: 1 prompt(s) x images_per_prompt=1 is 1 image per set; FID needs at least 2\n"
    assert cli_main(lambda argv: Path("rel").relative_to("/abs"))([]) == 2  # raised inside another library: the hint stays
    assert capsys.readouterr().err.splitlines()[-1] == "(the traceback: DMM_VERBOSE=1)"
