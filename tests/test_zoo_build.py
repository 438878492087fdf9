"""The zoo builder: config validation, a micro build that loads through the teacher loader, caching, atomicity."""

import json
import os
import time
from pathlib import Path

import pytest
import torch
import yaml
from pydantic import ValidationError

from dmm_ray.zoo import build as B
from dmm_ray.zoo.config import ZooConfig, preset


@pytest.fixture(scope="module", autouse=True)
def zoo_threads():
    """The builder's thread choice (1 thread on a busy machine is several times faster for tiny models)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(B.default_threads())
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def micro_zoo(tmp_path_factory, zoo_threads):
    """One micro build shared by the tests below (3 teachers, one per format)."""
    out = tmp_path_factory.mktemp("zoo") / "micro"
    t0 = time.perf_counter()
    B.build_zoo(out, preset("micro"), progress=False)
    return out, time.perf_counter() - t0


def test_config_rejects_unknown_keys_and_styles():
    with pytest.raises(ValidationError, match="vae_stepz"):
        preset("micro", vae_stepz=3)
    with pytest.raises(ValidationError, match="unknown style 'anime'.*noir"):
        preset("micro", teachers=[{"style": "anime"}])
    with pytest.raises(ValidationError, match="listed more than once"):
        preset("micro", teachers=[{"style": "noir"}, {"style": "noir", "format": "lora"}])
    with pytest.raises(ValidationError, match="train_text_encoder=false"):
        preset("micro", teachers=[{"style": "noir", "format": "lora", "train_text_encoder": True}])
    with pytest.raises(ValueError, match="unknown zoo size 'huge'"):
        preset("huge")


def test_full_preset_meets_the_zoo_spec():
    config = preset("full")
    formats = [t.format for t in config.teachers]
    assert len(config.teachers) >= 8
    assert formats.count("single_file") >= 2 and formats.count("lora") >= 2 and formats.count("diffusers") > len(formats) / 3
    from dmm_ray.zoo.styles import STYLES

    groups = [STYLES[t.style].group for t in config.teachers]
    assert groups.count("grade") >= 3 and groups.count("distinct") >= 3


def test_micro_build_manifest_and_formats(micro_zoo):
    out, took = micro_zoo
    print(f"micro build: {took:.1f} s")
    manifest = yaml.safe_load((out / "zoo.yaml").read_text())
    assert {"base", "dataset", "eval_prompts", "feature_net", "teachers"} <= manifest.keys()
    assert {t["format"] for t in manifest["teachers"]} == {"diffusers", "single_file", "lora"}
    for t in manifest["teachers"]:
        assert (out / t["source"]).exists() and t["description"]
        if t["format"] != "diffusers":
            assert t["base"] == manifest["base"]
    rows = [json.loads(line) for line in (out / manifest["dataset"] / "manifest.jsonl").read_text().splitlines()]
    assert len(rows) == preset("micro").disk_images and all((out / "images" / r["file"]).is_file() for r in rows)
    assert len((out / manifest["eval_prompts"]).read_text().splitlines()) == 96
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["vae_psnr_db"]) == {"clean", "warm", "noir", "sketch"}
    assert not list(out.parent.glob("micro.partial-*"))


def test_the_zoo_base_loads_from_the_folder_or_its_zoo_yaml(tiny_base_dir, tmp_path):
    """teacher_specs / load_manifest take a zoo folder or its zoo.yaml; load_base_pipeline looked for the
    base under zoo.yaml/base, and failed with "'PosixPath' object has no attribute 'count'"."""
    from dmm_ray.zoo.report import load_base_pipeline

    (tmp_path / "base").symlink_to(tiny_base_dir)
    (tmp_path / "zoo.yaml").write_text("base: base\nteachers: [{name: warm, source: teachers/warm}]\n")
    for given in (tmp_path, tmp_path / "zoo.yaml", str(tmp_path / "zoo.yaml")):
        assert load_base_pipeline(given).unet.config.in_channels == 4


def test_the_zoo_report_expands_dmm_home_and_home_in_zoo_yaml_paths(tiny_base_dir, tmp_path, monkeypatch):
    """Finding: zoo.yaml's base / eval_prompts / feature_net expand `$DMM_HOME` and `~` (README; the merge config
    and load_zoo_manifest do), but the zoo report joined them to the zoo folder as written: load_base_pipeline
    and run_report looked for <zoo>/$DMM_HOME/base ("neither a valid local path nor a valid repo id")."""
    import dmm_ray.zoo.report as report

    home = tmp_path / "home"
    home.mkdir()
    (home / "base").symlink_to(tiny_base_dir)
    (home / "eval_prompts.txt").write_text("a small red circle on the left with a black background\n")
    (tmp_path / "zoo").mkdir()
    (tmp_path / "zoo" / "zoo.yaml").write_text(
        "base: $DMM_HOME/base\neval_prompts: $DMM_HOME/eval_prompts.txt\nfeature_net: ~/feature_net\n"
        "teachers: [{name: warm, source: $DMM_HOME/teachers/warm}]\n"
    )
    monkeypatch.setenv("DMM_HOME", str(home))
    monkeypatch.setenv("HOME", str(home))
    assert report.load_base_pipeline(tmp_path / "zoo").unet.config.in_channels == 4

    class FeatureNetRead(Exception):
        pass

    def from_pretrained(path):
        raise FeatureNetRead(str(path))

    monkeypatch.setattr(report.ZooFeatureNet, "from_pretrained", from_pretrained)
    with pytest.raises(FeatureNetRead) as read:
        report.run_report(tmp_path / "zoo" / "zoo.yaml", n_per_set=2, steps=1, progress=False)
    assert str(read.value) == str(home / "feature_net")
    (tmp_path / "zoo" / "zoo.yaml").write_text("teachers: [{name: warm, source: teachers/warm}]\n")
    with pytest.raises(ValueError, match="zoo.yaml' names no base"):
        report.load_base_pipeline(tmp_path / "zoo")


def test_micro_zoo_loads_through_the_teacher_loader(micro_zoo):
    from diffusers import StableDiffusionPipeline

    from dmm_ray.teachers import load_teacher, validate_teachers
    from dmm_ray.zoo.report import teacher_specs

    out, _ = micro_zoo
    specs = teacher_specs(out)
    validate_teachers(specs, str(out / "base"))
    base = StableDiffusionPipeline.from_pretrained(out / "base", local_files_only=True)
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    ids = base.tokenizer(["a red circle"] * 2, padding="max_length", max_length=base.tokenizer.model_max_length, return_tensors="pt").input_ids
    with torch.no_grad():
        ref = base.unet(latents, torch.tensor([500, 500]), base.text_encoder(ids)[0]).sample
        for spec in specs:
            teacher = load_teacher(spec)
            assert teacher.unet.config.sample_size == 8 and teacher.vae.config.latent_channels == 4
            assert teacher.vae.config.scaling_factor == base.vae.config.scaling_factor  # one shared latent space
            eps = teacher.unet(latents, torch.tensor([500, 500]), teacher.text_encoder(ids)[0]).sample
            assert eps.shape == ref.shape and not torch.allclose(eps, ref)  # fine-tuned away from the base


def test_second_build_is_cached(micro_zoo):
    out, _ = micro_zoo
    t0 = time.perf_counter()
    assert B.build_zoo(out, preset("micro"), progress=False) == out.resolve()
    assert time.perf_counter() - t0 < 1.0
    with pytest.raises(B.ZooBuildError, match="different config"):
        B.build_zoo(out, preset("micro", seed=1), progress=False)
    with pytest.raises(
        B.ZooBuildError, match=r"older version of the 'micro' preset \(seed 0\)\. Use another --out or --force .*--size micro --force"
    ):
        B.build_zoo(out, preset("micro", lora_rank=3), progress=False)  # the same size and seed, other settings


def test_a_preset_zoo_from_an_older_preset_is_refused_with_the_rebuild_command(micro_zoo, tmp_path):
    out, _ = micro_zoo
    old = tmp_path / "zoo" / "micro"
    old.mkdir(parents=True)
    (old / B.MANIFEST).write_text((out / B.MANIFEST).read_text())
    marker = json.loads((out / B.MARKER).read_text())
    assert marker["fingerprint"] == preset("micro").fingerprint() and marker["threads"] == B.default_threads()
    assert B.ensure_zoo_preset("micro", out, progress=False) == out.resolve()  # the current preset: reused
    (old / B.MARKER).write_text(json.dumps(marker | {"fingerprint": preset("micro", lora_rank=8).fingerprint()}))
    with pytest.raises(
        B.ZooBuildError, match=r"older version of the 'micro' preset; rebuild it with `python jobs/build_zoo.py --out .*micro --size micro --force`"
    ):
        B.ensure_zoo_preset("micro", old, progress=False)
    assert (old / B.MANIFEST).is_file()  # nothing removed


def test_a_zoo_of_another_seed_or_size_in_the_preset_folder_is_named_as_such(tmp_path):
    """`build_zoo.py --seed 1` (or `--size micro --out $DMM_HOME/zoo/full`) writes to the folder `zoo: <preset>`
    reads; it was refused as "an older version of the preset" with a --force rebuild that would delete it."""
    folder = tmp_path / "zoo" / "micro"
    folder.mkdir(parents=True)
    (folder / B.MANIFEST).write_text("teachers: [{name: warm, source: teachers/warm}]\n")
    for other, named in [(preset("micro", seed=1), "size 'micro' with seed 1"), (preset("full"), "size 'full' with seed 0")]:
        (folder / B.MARKER).write_text(json.dumps({"fingerprint": other.fingerprint(), "size": other.size, "seed": other.seed}))
        with pytest.raises(B.ZooBuildError) as error:
            B.ensure_zoo_preset("micro", folder, progress=False)
        assert f"holds a toy zoo of {named}, not the 'micro' preset (seed 0)" in str(error.value)
        assert "older version" not in str(error.value) and "--force" not in str(error.value)
    assert (folder / B.MANIFEST).is_file()  # nothing removed


def test_failed_build_leaves_nothing_that_looks_complete(tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("simulated crash in the middle of the build")

    monkeypatch.setattr(B, "train_denoiser", boom)  # crash after the image set and the VAE are written
    cfg = preset("micro", vae_steps=1)
    with pytest.raises(RuntimeError, match="simulated crash"):
        B.build_zoo(tmp_path / "z", cfg, progress=False)
    assert not (tmp_path / "z").exists() and not list(tmp_path.glob("z.partial-*"))
    assert B.is_complete(tmp_path / "z") is None


def _fake_zoo(root, config, progress=False, weights="old"):
    """A finished zoo's shape (marker last), without the minute of building."""
    (root / "base").mkdir(parents=True, exist_ok=True)
    (root / "base" / "weights").write_text(weights)
    (root / B.MANIFEST).write_text("teachers: [{name: warm, source: teachers/warm}]\n")
    (root / "metrics.json").write_text(json.dumps({"vae_psnr_db": {"clean": 20.0}}))
    (root / B.MARKER).write_text(json.dumps({"fingerprint": config.fingerprint(), "size": config.size, "seed": config.seed}))


def test_a_zoo_built_with_other_threads_is_not_reused_as_this_one(tmp_path):
    """Finding: the thread count changes every weight of a zoo, but the completion marker did not record
    it: `build_zoo.py` (2 threads) reported a zoo built with `--threads 1` as cached, and `zoo: micro`
    merged its teachers, silently other weights than the preset's (other FIDs than the README's)."""
    cfg, out = preset("micro"), tmp_path / "zoo" / "micro"
    _fake_zoo(out, cfg)
    marker = json.loads((out / B.MARKER).read_text())
    (out / B.MARKER).write_text(json.dumps(marker | {"threads": 1}))
    assert torch.get_num_threads() == B.default_threads() == 2  # the module's fixture
    refused = r"built with 1 torch thread\(s\), but this build runs 2, which gives other weights .* build with --threads 1"
    with pytest.raises(B.ZooBuildError, match=refused):
        B.build_zoo(out, cfg, progress=False)
    with pytest.raises(B.ZooBuildError, match=r"holds the 'micro' toy zoo built with 1 torch thread\(s\) .*not the 2 the preset is built with"):
        B.ensure_zoo_preset("micro", out, progress=False)
    torch.set_num_threads(1)
    try:
        assert B.build_zoo(out, cfg, progress=False) == out.resolve()  # as many threads: reused
    finally:
        torch.set_num_threads(B.default_threads())
    # a zoo finished before the marker recorded its threads: its metrics.json's torch_threads
    (out / B.MARKER).write_text(json.dumps(marker))
    (out / "metrics.json").write_text(json.dumps({"torch_threads": 1}))
    with pytest.raises(B.ZooBuildError, match=refused):
        B.build_zoo(out, cfg, progress=False)
    (out / "metrics.json").write_text(json.dumps({"torch_threads": 2}))
    assert B.ensure_zoo_preset("micro", out, progress=False) == out.resolve()


def test_the_packages_example_reuses_the_jobs_zoo_on_any_thread_count(tmp_path):
    """Finding: dmm_ray.zoo's docstring showed `build_zoo(".zoo", preset("full"))` as the cached twin of
    `jobs/build_zoo.py --out .zoo`, but build_zoo runs torch's current threads (a Python session: the
    machine's cores) and refuses a zoo built with 2: the example failed on any machine without 2 cores.
    It now shows ensure_zoo_preset (exported by dmm_ray.zoo), which builds and reuses on the preset's 2."""
    import dmm_ray.zoo

    cfg, out = preset("micro"), tmp_path / "zoo"
    _fake_zoo(out, cfg)
    (out / B.MARKER).write_text(json.dumps(json.loads((out / B.MARKER).read_text()) | {"threads": 2}))  # as jobs/build_zoo.py leaves it
    torch.set_num_threads(1)  # a session on another core count
    try:
        with pytest.raises(B.ZooBuildError, match="built with 2 torch thread"):
            dmm_ray.zoo.build_zoo(out, cfg, progress=False)
        assert dmm_ray.zoo.ensure_zoo_preset("micro", out, progress=False) == out.resolve()
        assert torch.get_num_threads() == 1  # the session's own count, put back
    finally:
        torch.set_num_threads(B.default_threads())


def test_a_forced_rebuild_stopped_while_it_swaps_the_zoo_never_leaves_half_a_zoo(tmp_path, monkeypatch):
    """--force used to delete the old zoo in place (shutil.rmtree): a Ctrl-C during that delete left a
    folder with its completion marker but without its base, which the next run reused as finished."""
    cfg, out = preset("micro"), tmp_path / "z"
    _fake_zoo(out, cfg)
    monkeypatch.setattr(B, "_build", lambda root, config, progress: _fake_zoo(root, config, weights="new"))
    real_rmtree = B.shutil.rmtree

    def stopped_rmtree(path, *args, **kwargs):
        if Path(path) == out:  # stopped half-way through deleting the old zoo: base/ gone, the marker not yet
            real_rmtree(out / "base")
            raise KeyboardInterrupt
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(B.shutil, "rmtree", stopped_rmtree)
    try:
        B.build_zoo(out, cfg, progress=False, force=True)
    except KeyboardInterrupt:
        pass
    assert B.is_complete(out) is None or (out / "base" / "weights").is_file()  # never a "finished" zoo without its base
    assert (out / "base" / "weights").read_text() == "new"

    real_replace = B.os.replace

    def stopped_second_rename(src, dst):
        if Path(src).name.startswith("z.partial-") and "old" not in Path(src).name and Path(dst) == out:
            raise KeyboardInterrupt  # after the old zoo was moved aside, before the new one is in place
        return real_replace(src, dst)

    monkeypatch.setattr(B.os, "replace", stopped_second_rename)
    with pytest.raises(KeyboardInterrupt):
        B.build_zoo(out, cfg, progress=False, force=True)
    assert (out / "base" / "weights").read_text() == "new" and B.is_complete(out) is not None  # the previous zoo is back
    assert sorted(p.name for p in tmp_path.iterdir()) == ["z"]


def test_a_killed_builds_partial_folder_is_removed_by_the_next_call_cached_too_whatever_the_name(tmp_path):
    """Findings: a `--force` rebuild killed hard (SIGKILL: the OOM killer) left `DIR.partial-<pid>`, and the next
    plain call found the finished zoo and returned it as cached, leaving the partial build there for good (the
    interrupt note says "the unfinished build is removed by the next one"); and for a `zoo[v2]` the stale-partial
    glob read the brackets as a character class: it never matched the zoo's own partials but another zoo's
    (`zoo2.partial-<pid>`)."""
    cfg, dead = preset("micro"), "999999999"  # above any pid_max: no such process
    assert not Path(f"/proc/{dead}").exists()
    for name in ("z", "zoo[v2]"):
        _fake_zoo(tmp_path / name, cfg)
        (tmp_path / f"{name}.partial-{dead}" / "images").mkdir(parents=True)  # what kill -9 during --force leaves
        (tmp_path / f"{name}.partial-{os.getpid()}").mkdir()  # a build still running (this process): kept
    (tmp_path / f"zoo2.partial-{dead}").mkdir()  # another zoo's: for its own next call
    for name in ("z", "zoo[v2]"):
        assert B.build_zoo(tmp_path / name, cfg, progress=False) == (tmp_path / name).resolve()  # cached
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["z", f"z.partial-{os.getpid()}", "zoo[v2]", f"zoo[v2].partial-{os.getpid()}", f"zoo2.partial-{dead}"]
    )


def test_a_cached_report_names_the_grid_where_the_zoo_is_now(tmp_path):
    """The report caches in the zoo folder, which may move (zoo.yaml's paths are relative); the cached
    report named the grid PNG by the absolute path it had when the report ran."""
    from dmm_ray.zoo.report import SEED_SET_A, SEED_SET_B, run_report

    (tmp_path / "a" / "report").mkdir(parents=True)
    settings = {"n_per_set": 2, "steps": 2, "guidance": 5.0, "seed_sets": [SEED_SET_A, SEED_SET_B]}
    report = {"settings": settings, "grid_png": str(tmp_path / "a" / "report" / "grid.png")}
    (tmp_path / "a" / "report" / "report.json").write_text(json.dumps(report))
    (tmp_path / "a" / "report" / "grid.png").write_bytes(b"png")
    (tmp_path / "a").rename(tmp_path / "b")
    for given in (tmp_path / "b", tmp_path / "b" / "zoo.yaml"):  # the zoo folder or its zoo.yaml, as the other readers
        cached = run_report(given, n_per_set=2, steps=2, progress=False)
        assert cached["settings"] == settings and cached["grid_png"] == str(tmp_path / "b" / "report" / "grid.png")


def test_the_zoo_report_reads_zoo_yaml_once(tmp_path, monkeypatch):
    """Review mend: run_report read zoo.yaml for its raw manifest, for each of its paths (feature_net, eval_prompts,
    base) and for its teachers: five times. Once now. The feature net, the base and the sampling are stand-ins;
    the report stops at the first teacher, after every read of the manifest."""
    import torch

    import dmm_ray.teachers
    import dmm_ray.zoo.manifest as manifest
    import dmm_ray.zoo.report as report

    (tmp_path / "zoo").mkdir()
    (tmp_path / "zoo" / "prompts.txt").write_text("a small red circle on the left with a black background\n")
    (tmp_path / "zoo" / "zoo.yaml").write_text(
        "base: base\neval_prompts: prompts.txt\nfeature_net: feature_net\nteachers: [{name: warm, source: teachers/warm}]\n"
    )
    reads, real = [], manifest.read_manifest
    count = lambda path: reads.append(path) or real(path)  # noqa: E731
    monkeypatch.setattr(manifest, "read_manifest", count)
    monkeypatch.setattr(report, "read_manifest", count)

    class Net:
        name = "stand-in"

        def eval(self):
            return self

    class FirstTeacher(Exception):
        pass

    def first_teacher(spec):
        raise FirstTeacher(spec.name)

    monkeypatch.setattr(report.ZooFeatureNet, "from_pretrained", lambda path: Net())
    monkeypatch.setattr(report, "load_base_pipeline", lambda root, zoo=None: None)
    monkeypatch.setattr(report, "sample_images", lambda pipe, prompts, *a, **k: torch.zeros(len(prompts), 3, 8, 8))
    monkeypatch.setattr(report, "prompt_following", lambda *a, **k: {})
    monkeypatch.setattr(dmm_ray.teachers, "load_teacher_pipeline", first_teacher)
    with pytest.raises(FirstTeacher, match="warm"):
        report.run_report(tmp_path / "zoo", n_per_set=2, steps=1, progress=False)
    assert len(reads) == 1


def test_a_torn_cached_report_is_made_again_not_a_crash(tmp_path, monkeypatch):
    """Finding: report/report.json was written in place; one a write cut short (a full disk) left torn stopped
    every later report with a bare JSONDecodeError until --force. It is written whole, and one that does not
    read is no cached report: the report is made again (here it gets as far as reading the zoo's manifest)."""
    import dmm_ray.zoo.report as report

    (tmp_path / "z" / "report").mkdir(parents=True)
    (tmp_path / "z" / "report" / "report.json").write_text('{"settings": {"n_per_')

    class MadeAgain(Exception):
        pass

    def manifest(root):
        raise MadeAgain(str(root))

    monkeypatch.setattr(report, "load_zoo_manifest", manifest)
    with pytest.raises(MadeAgain):
        report.run_report(tmp_path / "z", n_per_set=2, steps=2, progress=False)


def test_a_zoo_folder_not_built_yet_is_named_with_the_command_that_builds_it(tmp_path):
    """`teacher_specs(DIR)` / `run_report(DIR)` on a folder that does not exist named its parent as the
    folder that is not a zoo, and told the user to build the zoo into the parent."""
    from dmm_ray.zoo.manifest import read_manifest

    for given, folder in [(tmp_path / "zoo", tmp_path / "zoo"), (tmp_path / "zoo" / "zoo.yaml", tmp_path / "zoo")]:
        with pytest.raises(FileNotFoundError) as error:
            read_manifest(given)
        assert f"{folder} is not a zoo (no zoo.yaml); build one with `python jobs/build_zoo.py --out {folder}`" in str(error.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty is not a zoo .*--out .*empty`"):
        read_manifest(tmp_path / "empty")


def test_refuses_to_overwrite_a_foreign_folder(tmp_path):
    (tmp_path / "z").mkdir()
    (tmp_path / "z" / "notes.txt").write_text("mine")
    with pytest.raises(B.ZooBuildError, match="not a finished zoo"):
        B.build_zoo(tmp_path / "z", preset("micro"), progress=False)
    assert (tmp_path / "z" / "notes.txt").read_text() == "mine"


def test_half_written_zoo_is_not_complete(tmp_path):
    (tmp_path / "zoo.yaml").write_text("teachers: []\n")
    assert B.is_complete(tmp_path) is None  # no completion marker


def test_config_fingerprint_changes_with_any_field():
    a = preset("micro")
    assert a.fingerprint() == preset("micro").fingerprint()
    assert a.fingerprint() != preset("micro", teacher_steps=3).fingerprint()
    assert isinstance(ZooConfig.model_validate(a.model_dump()), ZooConfig)


def test_zoo_threads_do_not_follow_the_machine(monkeypatch):
    """The zoo's weights are bit-identical only for one thread count, so the default must not depend
    on the load or the cores: `make demo` after a busy `make test` once built another zoo."""
    monkeypatch.setattr(B.os, "getloadavg", lambda: (9.0, 9.0, 9.0))
    monkeypatch.setattr(B.os, "cpu_count", lambda: 16)
    assert B.default_threads() == B.ZOO_THREADS == 2


def test_build_zoo_job_refuses_bad_threads_and_out_before_building(tmp_path, capsys):
    from jobs import build_zoo as job

    for threads in ("0", "-1"):
        with pytest.raises(SystemExit) as e:
            job.main(["--size", "micro", "--out", str(tmp_path / "z"), "--threads", threads])
        assert e.value.code == 2 and f"--threads must be at least 1 (leave it out for the default, 2), got {threads}" in capsys.readouterr().err
    (tmp_path / "f").write_text("x")
    assert job.main(["--size", "micro", "--out", str(tmp_path / "f")]) == 2
    assert "--out" in capsys.readouterr().err and not (tmp_path / "z").exists()


def test_build_zoo_job_expands_dmm_home_and_home_in_out_also_quoted(tmp_path, monkeypatch, capsys):
    """Finding: `jobs/build_zoo.py --out '$DMM_HOME/zoo/micro'` (quoted, or `--out=~/zoo`: left alone by the
    shell) built a second zoo in a literal `./$DMM_HOME/zoo/micro` under the current folder, where every other
    job's path option expands both (README: "with `$DMM_HOME` and `~` expanded, quoted too")."""
    from jobs import build_zoo as job

    cfg = preset("micro")
    home, user_home, cwd = tmp_path / "home", tmp_path / "user", tmp_path / "cwd"
    for root in (home / "zoo" / "micro", user_home / "zoo"):
        _fake_zoo(root, cfg)
        (root / B.MARKER).write_text(json.dumps(json.loads((root / B.MARKER).read_text()) | {"threads": 2}))
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.setenv("DMM_HOME", str(home))
    monkeypatch.setenv("HOME", str(user_home))
    built = []
    monkeypatch.setattr(B, "_build", lambda root, config, progress: built.append(root) or _fake_zoo(root, config))
    for given, folder in [("$DMM_HOME/zoo/micro", home / "zoo" / "micro"), ("~/zoo", user_home / "zoo")]:
        assert job.main(["--size", "micro", "--out", given, "--quiet"]) == 0
        assert f"zoo: {folder} (cached;" in capsys.readouterr().out
    assert built == [] and list(cwd.iterdir()) == []  # nothing built, nothing under the current folder


def test_build_zoo_job_stopped_in_its_report_says_the_zoo_is_kept(tmp_path, monkeypatch, capsys):
    """Finding: a Ctrl-C / SIGTERM while `--report` sampled printed the job's note, "nothing was written under
    --out ...; the same command builds the zoo again", though the zoo was finished and kept."""
    import dmm_ray.zoo.report as report
    from jobs import build_zoo as job

    out = tmp_path / "z"
    monkeypatch.setattr(B, "_build", lambda root, config, progress: _fake_zoo(root, config))

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(report, "run_report", stopped)
    assert job.main(["--size", "micro", "--out", str(out), "--quiet", "--report"]) == 130
    err = capsys.readouterr().err
    assert f"interrupted: the zoo at {out} is finished and kept; its report was stopped" in err and "nothing was written" not in err
    assert B.is_complete(out) is not None


def test_build_zoo_job_waits_for_a_build_of_the_same_folder_instead_of_building_it_again(tmp_path, monkeypatch, capsys):
    """jobs/build_zoo.py did not take the lock a merge's first-use build (ensure_zoo_preset) holds: a merge
    started while `python jobs/build_zoo.py` built the preset built it a second time (twice the CPU), and
    the later of the two swapped the folder under the users of the first."""
    import fcntl
    import threading

    from jobs import build_zoo as job

    out, cfg = tmp_path / "zoo" / "micro", preset("micro")
    built = []
    monkeypatch.setattr(B, "_build", lambda root, config, progress: built.append(root) or _fake_zoo(root, config))
    out.parent.mkdir(parents=True)
    lock = open(out.parent / f".{out.name}.lock", "w")  # the other build (a merge's first use) holds the lock
    fcntl.flock(lock, fcntl.LOCK_EX)

    def other_build_finishes():
        time.sleep(1.0)
        _fake_zoo(out, cfg)
        lock.close()  # releases the lock

    other = threading.Thread(target=other_build_finishes)
    other.start()
    try:
        assert job.main(["--size", "micro", "--out", str(out), "--quiet"]) == 0
    finally:
        other.join()
    assert built == []  # it waited and found the finished zoo
    captured = capsys.readouterr().out
    assert "waiting for it" in captured and "(cached;" in captured


def test_demo_stops_at_a_failed_step_with_its_exit_code(monkeypatch, capsys):
    """`make demo` with a step that fails (here the merge, answering 2 as for a bad teacher file): the
    step's own exit code and one line, no CalledProcessError traceback of the driver on top of the
    step's error. (A misspelt --set key no longer gets that far: demo checks it before the zoo build.)"""
    import subprocess

    from jobs import demo

    calls = []

    def fake_run(cmd, **kwargs):
        calls.append((cmd[1], kwargs.get("cwd")))
        return subprocess.CompletedProcess(cmd, 2 if cmd[1].endswith("jobs/merge.py") else 0)

    monkeypatch.setattr(demo.subprocess, "run", fake_run)
    assert demo.main(["--set", "distill.steps=1"]) == 2
    assert calls == [(str(demo.REPO / "jobs/build_zoo.py"), None), (str(demo.REPO / "jobs/merge.py"), None)]
    assert capsys.readouterr().err.strip() == "demo: jobs/merge.py stopped with exit code 2 (its error is above)"


def test_a_ctrl_c_during_a_demo_step_is_the_steps_to_answer(monkeypatch, capsys):
    """Ctrl-C in `make demo` reaches the running step too (one process group): the merge stops Ray Train, says
    what it kept and exits 130. The demo's own KeyboardInterrupt made subprocess.run kill the step 0.25 s later,
    mid clean-up, and ended in a traceback (exit by SIGINT). The demo waits for the step and stops with its code."""
    import os
    import signal
    import subprocess

    from jobs import demo

    def interrupted_step(cmd, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)  # the Ctrl-C, delivered to the demo while the step runs
        return subprocess.CompletedProcess(cmd, 130)  # the step answered it

    monkeypatch.setattr(demo.subprocess, "run", interrupted_step)
    before = signal.getsignal(signal.SIGINT)
    try:
        code = demo.main(["--set", "zoo=micro"])
    except KeyboardInterrupt:
        pytest.fail("the demo died of the Ctrl-C its step answered")
    assert code == 130 and signal.getsignal(signal.SIGINT) is before
    assert capsys.readouterr().err.strip() == "demo: jobs/build_zoo.py stopped with exit code 130 (what it kept is above)"


def test_demo_builds_the_zoo_its_merge_reads(monkeypatch, tmp_path):
    """`jobs/demo.py --set zoo=micro` (or a zoo folder): the build step built the full zoo whatever --set
    zoo= said (~11 minutes on 2 cores for nothing), and the merge then built or read another one. It
    builds the preset the merge reads now (toy.yaml's `zoo: full` without a --set zoo=), and leaves a
    zoo folder of the user's as it is."""
    import subprocess

    from jobs import demo

    monkeypatch.setenv("DMM_HOME", str(tmp_path / "home"))
    calls = []

    def fake_run(cmd, **kwargs):
        calls.append(cmd[1:])
        return subprocess.CompletedProcess(cmd, 2 if cmd[1].endswith("jobs/merge.py") else 0)  # stop before the summary

    monkeypatch.setattr(demo.subprocess, "run", fake_run)
    for sets, build in (
        (["zoo=micro"], ["--size", "micro"]),
        ([], ["--size", "full"]),
        ([f"zoo={tmp_path / 'z' / 'zoo.yaml'}"], None),  # a zoo of the user's: read as it is, not built over
    ):
        calls.clear()
        assert demo.main([a for s in sets for a in ("--set", s)]) == 2
        if build is not None:
            assert calls.pop(0) == [str(demo.REPO / "jobs/build_zoo.py"), *build], sets
        assert [c[0] for c in calls] == [str(demo.REPO / "jobs/merge.py")], sets


def test_demo_reads_relative_paths_in_the_callers_folder(monkeypatch, tmp_path):
    """`jobs/demo.py --zoo myzoo --set output_dir=myout` from some folder: the zoo is built where the merge
    reads it, and the merge writes where the summary says, all in the caller's folder (the steps ran in
    the repository, so build_zoo wrote REPO/myzoo while the merge read ./myzoo)."""
    import subprocess

    from jobs import demo

    calls = []
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(demo.subprocess, "run", lambda cmd, **kw: calls.append((cmd, kw.get("cwd"))) or subprocess.CompletedProcess(cmd, 0))
    monkeypatch.setattr("dmm_ray.config.load_config", lambda path, overrides: None)  # the zoo is not really built here
    monkeypatch.setattr("dmm_ray.merge.locations", lambda cfg: {"merged model": "m", "output_dir": "o", "MLflow store": "s"})
    assert demo.main(["--zoo", "myzoo", "--set", "output_dir=myout"]) == 0
    (build, build_cwd), (merge, merge_cwd) = calls
    assert build_cwd is None and merge_cwd is None  # both steps run in the caller's folder, as the summary reads
    assert build[-2:] == ["--out", "myzoo"] and f'zoo="{tmp_path / "myzoo"}"' in merge


def test_demo_names_the_evaluation_at_an_output_dir_uri(monkeypatch, capsys):
    """`jobs/demo.py --set output_dir=s3://bucket/toy` ended with `evaluation: s3:/bucket/toy/evaluation` (Path() of
    the URI, a local path): it names the URI the merge uploads the evaluation to."""
    import subprocess

    from jobs import demo

    monkeypatch.setattr(demo.subprocess, "run", lambda cmd, **kw: subprocess.CompletedProcess(cmd, 0))
    monkeypatch.setattr("dmm_ray.config.load_config", lambda path, overrides: None)  # the zoo is not really built here
    where = {"merged model": "s3://bucket/toy/merged", "output_dir": "s3://bucket/toy", "MLflow store": "s"}
    monkeypatch.setattr("dmm_ray.merge.locations", lambda cfg: where)
    assert demo.main(["--set", "output_dir=s3://bucket/toy"]) == 0
    assert "  evaluation:     s3://bucket/toy/evaluation   (" in capsys.readouterr().out


def test_a_demo_step_killed_by_a_signal_is_said_as_a_shell_says_it():
    """A step killed by signal N (Ctrl-C before its own handler ran: -2; the OOM killer: -9) made the demo say
    "exit code -2 (its error is above)" and exit 254: now 128 + N, and a Ctrl-C reads as an interruption."""
    from jobs.demo import StepFailed

    interrupted, killed = StepFailed("jobs/merge.py", -2), StepFailed("jobs/merge.py", -9)
    assert interrupted.code == 130 and "exit code 130 (what it kept is above)" in str(interrupted)
    assert killed.code == 137 and "exit code 137 (its error is above)" in str(killed)
