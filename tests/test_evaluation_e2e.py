"""End to end on disk: a saved DMMPipeline student, TeacherSpec teachers from a zoo.yaml,
jobs/evaluate.py, and the Table-3 / Fig.-10 mixing studies (in-process, tiny, 2 steps)."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from diffusers import StableDiffusionPipeline
from eval_helpers import SeededConvExtractor, fast_eval_config
from merge_fixtures import save_another_model

from dmm_ray import DMMPipeline, StyleUNet
from dmm_ray.evaluation.api import evaluate_merge
from dmm_ray.evaluation.mixing import interpolation_sweep, mixing_comparison
from dmm_ray.evaluation.sources import load_zoo_manifest, pipeline_folder_source, student_source, teacher_sources
from dmm_ray.tiny import tiny_sd_components

STYLES = ["ink", "neon"]
EXTRACTOR = "eval_helpers:SeededConvExtractor"


def _fast_eval(world, steps: bool = True) -> list[str]:
    """jobs/evaluate.py --set options: 2 steps (unless `steps` is False), 1 image per prompt, the seeded extractor, a shared cache."""
    sets = [
        *(["sampler.num_inference_steps=2"] if steps else []),
        "images_per_prompt=1",
        f"cache_dir={world / 'cache'}",
        "extractor.kind=import",
        f"extractor.path={EXTRACTOR}",
    ]
    return [arg for s in sets for arg in ("--set", s)]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    for name, seed in zip(STYLES, (0, 3)):
        StableDiffusionPipeline(**tiny_sd_components(seed=seed)).save_pretrained(root / "teachers" / name)
    (root / "prompts.txt").write_text("a red circle\na blue square\n")
    (root / "zoo.yaml").write_text(
        yaml.safe_dump(
            {
                "base": "teachers/ink",
                "eval_prompts": "prompts.txt",
                "teachers": [{"name": n, "format": "diffusers", "source": f"teachers/{n}", "description": "toy"} for n in STYLES],
            }
        )
    )
    c = tiny_sd_components(seed=0)
    torch.manual_seed(0)
    student = StyleUNet.from_unet(c["unet"], STYLES)
    with torch.no_grad():  # spread the codebook so styles differ on an untrained student
        student.class_embedding.codebook.weight.mul_(20)
    DMMPipeline.from_components(student, c["vae"], c["text_encoder"], c["tokenizer"], c["scheduler"]).save_pretrained(root / "student")
    return root


def _cfg(world, **kw):
    return fast_eval_config(world, **kw)


def test_zoo_manifest_resolves_paths(world):
    m = load_zoo_manifest(world / "zoo.yaml")
    assert [t.name for t in m.teachers] == STYLES
    assert Path(m.teachers[0].source) == world / "teachers" / "ink"
    assert m.eval_prompts == world / "prompts.txt" and m.feature_net is None
    with pytest.raises(FileNotFoundError, match="zoo.yaml"):
        load_zoo_manifest(world / "nope" / "zoo.yaml")


def test_evaluate_merge_with_dmm_student_and_teacher_specs(world, capsys):
    specs = load_zoo_manifest(world / "zoo.yaml").teachers
    r = evaluate_merge(world / "student", specs, _cfg(world))
    assert r.style_names == STYLES and r.matrix.shape == (2, 2) and np.isfinite(r.matrix).all()
    assert r.fidt > 0 and r.fidt_ref > 0
    assert {"json", "csv", "ref_csv", "heatmaps", "grid"} <= set(r.files)
    assert "FIDt" in capsys.readouterr().out
    # Second evaluation (e.g. after an incremental merge): only the student is sampled.
    r2 = evaluate_merge(world / "student", specs, _cfg(world), print_table=False)
    assert sorted(r2.generated) == ["student/ink", "student/neon"]
    np.testing.assert_allclose(r2.matrix, r.matrix, atol=1e-9)


def test_evaluate_job_cli(world, capsys):
    from jobs import evaluate as job

    rc = job.main(
        [
            "--model",
            str(world / "student"),
            "--teachers",
            str(world / "zoo.yaml"),
            "--no-ray",
            "--out",
            str(world / "job_out"),
        ]
        + _fast_eval(world)
    )
    out = capsys.readouterr().out
    assert rc == 0 and "FIDt" in out and "ratio" in out
    data = json.loads((world / "job_out" / "fid_matrix.json").read_text())
    assert data["styles"] == STYLES
    # Finding: fid_matrix.json did not say which model, teachers, sampler and seeds made it
    from dmm_ray.teachers import files_checksum

    made = data["provenance"]
    assert made["model"] == {
        "path": str(world / "student"),
        "unet_checksum": files_checksum([world / "student" / "unet"]),
        "scheduler": "DPMSolverMultistepScheduler",
    }
    assert made["sampler"]["num_inference_steps"] == 2 and (made["seed_a"], made["seed_b"], made["images_per_prompt"]) == (0, 1_000_000, 1)
    assert made["teachers"] == {n: {"source": str(world / "teachers" / n), "base": None} for n in STYLES} and set(made["teacher_checksums"]) == set(
        STYLES
    )

    # Reference only (teachers all cached by now), logged to MLflow as an 'evaluation' stage.
    db = world / "mlflow.db"
    rc = job.main(
        [
            "--reference-only",
            "--teachers",
            str(world / "zoo.yaml"),
            "--no-ray",
            "--track",
            "--tracking-uri",
            f"sqlite:///{db}",
            "--project",
            "cli-eval",
        ]
        + _fast_eval(world)
    )
    assert rc == 0 and "FIDt_ref" in capsys.readouterr().out
    import mlflow

    runs = mlflow.MlflowClient(f"sqlite:///{db}").search_runs([mlflow.get_experiment_by_name("dmm-ray").experiment_id])
    stage = next(r for r in runs if r.info.run_name == "evaluation")
    assert stage.data.metrics["FIDt_ref"] == pytest.approx(data["FIDt_ref"])


def test_evaluate_job_samples_a_few_step_model_with_its_own_steps_and_guidance(world, tmp_path, capsys):
    """Finding: `jobs/evaluate.py --model <few-step model>` sampled it at the evaluation's sampler (a
    merge config's 10 steps at CFG 5), not its sampler.json's 4 steps with CFG off: a meaningless FIDt.
    It follows the model now (the teachers keep the evaluation's sampler), unless --set names a setting."""
    import shutil

    from diffusers import TCDScheduler

    from jobs import evaluate as job

    model = tmp_path / "fast"
    shutil.copytree(world / "student", model)
    TCDScheduler.from_pretrained(model / "scheduler").save_pretrained(model / "scheduler")
    (model / "sampler.json").write_text(
        json.dumps({"scheduler": "TCDScheduler", "num_inference_steps": 2, "guidance_scale": 1.0, "negative_prompt": ""})
    )
    config = tmp_path / "eval.yaml"  # the teachers' sampler, as a merge config's evaluation: section gives it
    config.write_text(yaml.safe_dump({"sampler": {"num_inference_steps": 3, "guidance_scale": 5.0}}))
    sets = _fast_eval(world, steps=False)  # the teachers' steps from the config

    def run(*extra):
        argv = ["--model", str(model), "--teachers", str(world / "zoo.yaml"), "--config", str(config), "--no-ray", "--out", str(tmp_path / "out")]
        assert job.main(argv + sets + list(extra)) == 0
        made = json.loads((tmp_path / "out" / "fid_matrix.json").read_text())["provenance"]
        return made["sampler"]["num_inference_steps"], made["student_call"], capsys.readouterr().out

    teacher_steps, student, out = run()
    assert teacher_steps == 3 and student == {"num_inference_steps": 2, "guidance_scale": 1.0}
    assert "is a few-step model (TCDScheduler): sampled at 2 steps (its sampler.json), guidance 1.0 (its sampler.json)" in out
    teacher_steps, student, out = run("--set", "sampler.num_inference_steps=1")
    assert teacher_steps == 1 and student == {"num_inference_steps": 1, "guidance_scale": 1.0} and "1 steps (--set)" in out


def test_evaluate_job_refuses_an_out_uri_before_it_samples(world, tmp_path, monkeypatch, capsys):
    """Finding: jobs/evaluate.py --out s3://bucket/eval (or file://..., or output_dir: in --config) passed every
    check before sampling (check_writable_folder leaves URIs to their store) and was refused by write_outputs
    ('must be a local folder') only once every image was sampled (the toy zoo's had sampled for 14 minutes here). It is
    refused when the arguments are read (exit 2), naming --out, before any image is sampled."""
    import dmm_ray.evaluation.api
    from jobs import evaluate as job

    def sampled(*args, **kwargs):
        raise AssertionError("sampled before --out was checked")

    monkeypatch.setattr(dmm_ray.evaluation.api, "evaluate_merge", sampled)
    for out in ((tmp_path / "remote" / "eval").as_uri(), "s3://bucket/eval"):
        argv = ["--model", str(world / "student"), "--teachers", str(world / "zoo.yaml"), "--no-ray", "--out", out]
        with pytest.raises(SystemExit) as exited:
            job.main(argv + _fast_eval(world))
        assert exited.value.code == 2 and f"--out {out!r} is a URI, but --out must be a local folder" in capsys.readouterr().err
    # before the teachers are read: it said "teachers file ... not found" (exit 1), then the --out URI on the next try
    with pytest.raises(SystemExit) as exited:
        job.main(["--model", str(world / "student"), "--teachers", str(tmp_path / "missing.yaml"), "--out", "s3://bucket/eval"])
    assert exited.value.code == 2 and "--out 's3://bucket/eval' is a URI" in capsys.readouterr().err
    config = tmp_path / "eval.yaml"  # a --config's output_dir URI: refused naming output_dir
    config.write_text("output_dir: s3://bucket/eval\n")
    with pytest.raises(SystemExit) as exited:
        job.main(["--model", str(world / "student"), "--teachers", str(world / "zoo.yaml"), "--config", str(config), "--no-ray", *_fast_eval(world)])
    assert exited.value.code == 2 and "output_dir 's3://bucket/eval' is a URI, but output_dir must be a local folder" in capsys.readouterr().err
    assert not (tmp_path / "remote").exists()


def test_evaluate_job_reads_a_logged_model_from_its_tracking_uri(world, tmp_path, monkeypatch, capsys):
    """--model runs:/... is read from --tracking-uri's store (not the default one), and the download
    is removed when the job ends."""
    from mlflow import MlflowClient

    from dmm_ray import tracking
    from jobs import evaluate as job

    store = f"sqlite:///{tmp_path}/logged.db"
    client = MlflowClient(store)
    run = client.create_run(client.create_experiment("logged", artifact_location=(tmp_path / "artifacts").as_uri()))
    client.log_artifacts(run.info.run_id, str(world / "student"), "merged_model")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/other.db")  # a store without it
    downloads = []
    real = tracking.resolve_model_uri
    monkeypatch.setattr(tracking, "resolve_model_uri", lambda *a, **kw: downloads.append(real(*a, **kw)) or downloads[-1])
    args = ["--model", f"runs:/{run.info.run_id}/merged_model", "--tracking-uri", store, "--teachers", str(world / "zoo.yaml")]
    rc = job.main(args + ["--no-ray", "--out", str(tmp_path / "out")] + _fast_eval(world))
    assert rc == 0 and "FIDt" in capsys.readouterr().out
    assert len(downloads) == 1 and downloads[0].name == "merged_model" and not downloads[0].exists()


def _free_port() -> int:
    """A local port where nothing listens."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_evaluate_job_refuses_an_unusable_cache_or_store_before_sampling(world, tmp_path, monkeypatch, capsys):
    import dmm_ray.evaluation.api
    from jobs import evaluate as job

    monkeypatch.setattr(dmm_ray.evaluation.api, "evaluate_merge", lambda *a, **kw: pytest.fail("nothing may be sampled"))
    (tmp_path / "plainfile").write_text("")
    args = ["--model", str(world / "student"), "--teachers", str(world / "zoo.yaml"), "--no-ray", "--out", str(tmp_path / "out")]
    assert job.main(args + ["--set", f"cache_dir={tmp_path / 'plainfile'}"]) == 2
    assert "cache_dir" in capsys.readouterr().err
    assert job.main(args + ["--track", "--tracking-uri", str(tmp_path / "mlruns")]) == 2
    assert "is a file store" in capsys.readouterr().err
    # a tracking server that never answers: the tracker was opened after the evaluation, which it then failed
    assert job.main(args + ["--track", "--tracking-uri", f"http://127.0.0.1:{_free_port()}"]) == 2
    assert "cannot be used" in capsys.readouterr().err
    # a --project TrackingConfig refuses was pydantic's multi-line dump naming the field `project`: one line naming --project
    store = ["--track", "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db"]
    for project, message in (
        ("a\\", "error: --project: 'a\\\\' ends with \\"),
        ('bob\'s "x"', "error: --project: 'bob\\'s \"x\"' holds both ' and \""),
    ):
        assert job.main(args + store + ["--project", project]) == 2
        err = capsys.readouterr().err
        assert err.startswith(message) and err.count("\n") == 1, err
    with pytest.raises(SystemExit) as exit_info:  # --project names where --track logs: alone it would be ignored
        job.main(args + ["--project", "dmm-toy"])
    assert exit_info.value.code == 2 and "--project only applies with --track" in capsys.readouterr().err


def test_evaluate_job_whose_store_fails_after_the_evaluation_says_so_and_exits_3(world, tmp_path, monkeypatch, capsys):
    """--track with a store that starts failing while the evaluation runs (its sqlite file broken here; a
    server gone down): logging it at the end was MLflow's traceback and exit 1, after the work was done.
    MLflow is an observer: one warning naming the store and how to log it later, and exit 3 (written,
    not logged, as jobs/export.py)."""
    from types import SimpleNamespace

    import dmm_ray.evaluation.api
    from jobs import evaluate as job

    db = tmp_path / "mlflow.db"

    def evaluate(*args, **kwargs):
        assert db.exists()  # the tracker opened the store before the evaluation (its first request)
        db.write_bytes(b"not an sqlite database" * 1000)  # the store fails from here on
        return SimpleNamespace(style_names=list(STYLES), ref_matrix=[[0.0, 1.0], [1.0, 0.0]], fidt_ref=1.0)

    monkeypatch.setattr(dmm_ray.evaluation.api, "evaluate_merge", evaluate)
    args = ["--reference-only", "--teachers", str(world / "zoo.yaml"), "--no-ray", "--track", "--tracking-uri", f"sqlite:///{db}"]
    assert job.main(args + _fast_eval(world)) == 3
    captured = capsys.readouterr()
    assert "FIDt_ref = 1.0000" in captured.out
    warning = captured.err.strip().splitlines()
    assert len(warning) == 1 and warning[0].startswith("warning: M_ref is computed and cached but not logged to MLflow at sqlite:///")
    assert "file is not a database" in warning[0] and "the same command logs it" in warning[0]


def test_evaluate_job_rejects_unknown_config_key(world, capsys):
    """A bad --set key is an error line naming the key (and the nearest known one), exit code 2, no traceback."""
    from jobs import evaluate as job

    args = ["--model", str(world / "student"), "--teachers", str(world / "zoo.yaml"), "--set"]
    assert job.main(args + ["bogus_key=1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: invalid evaluation config") and "bogus_key: Extra inputs are not permitted (got 1); the top level has: " in err
    assert job.main(args + ["images_per_promt=3"]) == 2
    assert "images_per_promt: Extra inputs are not permitted (got 3); did you mean images_per_prompt?" in capsys.readouterr().err


def test_mixing_comparison_and_sweep(world, tmp_path):
    from dmm_ray.baselines.weighted_merge import weighted_merge_teachers

    specs = load_zoo_manifest(world / "zoo.yaml").teachers
    wm = weighted_merge_teachers(specs, [0.5, 0.5], tmp_path / "wm")
    assert json.loads((wm / "weighted_merge.json").read_text())["weights"] == [0.5, 0.5]
    cfg = _cfg(world)
    student = student_source(world / "student")
    teachers = teacher_sources(specs)
    ext = SeededConvExtractor()
    res = mixing_comparison(student, teachers, STYLES, pipeline_folder_source("weighted merge", wm), cfg, ext)
    assert res.rows == ["DMM mix", "weighted merge", "teachers (ref)"] and res.columns == STYLES + ["union"]
    assert res.table.shape == (3, 3) and (res.table >= 0).all()
    paths = res.write(tmp_path / "mix")
    assert paths["png"].read_bytes()[:4] == b"\x89PNG" and "weighted merge" in paths["csv"].read_text()

    sweep = interpolation_sweep(student, teachers[0], teachers[1], cfg, ext, weights=[0.0, 0.5, 1.0])
    assert sweep.weights == [0.0, 0.5, 1.0] and len(sweep.fid_a) == len(sweep.fid_b) == 3
    assert all(np.isfinite(sweep.fid_a + sweep.fid_b))
    assert sweep.write(tmp_path / "sweep")["png"].is_file()
    with pytest.raises(ValueError, match="\\[0, 1\\]"):
        interpolation_sweep(student, teachers[0], teachers[1], cfg, ext, weights=[1.5])


def test_a_teacher_named_student_is_sampled_with_its_own_pipeline(tmp_path, monkeypatch):
    """QA: requests were grouped onto workers by name only, so a teacher named "student" shared the
    model's worker (the mixing study's "DMM mix" group): its jobs ran on the first one's pipeline,
    and Table 3's DMM row held the teacher's images."""
    from dmm_ray.evaluation import stats
    from dmm_ray.evaluation.generation import JobOutput
    from dmm_ray.evaluation.stats import ModelSource, StatsRequest, collect_stats

    ran = {}

    def fake_run_plans(plans, *a, **k):
        out = {}
        for plan in plans:
            for job in plan.jobs:
                ran[job.key] = plan.pipeline_factory()
                out[job.key] = JobOutput(job.key, np.random.default_rng(0).normal(size=(4, 3)), np.zeros((0, 1, 1, 3), np.uint8), 4)
        return out

    monkeypatch.setattr(stats, "run_plans", fake_run_plans)
    (tmp_path / "prompts.txt").write_text("a\nb\n")
    teacher = ModelSource("student", lambda: "the teacher's pipeline")
    model = ModelSource("student", lambda: "the model's pipeline")
    reqs = [StatsRequest("teacher/student/B", teacher, "b"), StatsRequest("dmm_mix", model, "a", call_kwargs={"style_weights": {"student": 1.0}})]
    collect_stats(reqs, fast_eval_config(tmp_path), SeededConvExtractor(), ["a", "b"])
    assert ran == {"teacher/student/B": "the teacher's pipeline", "dmm_mix": "the model's pipeline"}


def test_sweep_weights_keep_their_own_sets_and_csv_labels(tmp_path, monkeypatch):
    """QA: the sweep keyed its sets by the weight at 4 decimals (0.12341 and 0.12344 shared one set)
    and its csv wrote every weight at 2 (0.115 and 0.125 were both "0.12")."""
    from dmm_ray.evaluation import mixing
    from dmm_ray.evaluation.cache import CachedStats
    from dmm_ray.evaluation.fid import FeatureStats
    from dmm_ray.evaluation.matrix import StudentSource
    from dmm_ray.evaluation.stats import ModelSource, StatsRun

    keys = []

    def fake_collect(reqs, *a, **k):
        keys.extend(r.key for r in reqs)
        rng = np.random.default_rng(0)
        return StatsRun({r.key: CachedStats(FeatureStats.from_features(rng.normal(size=(8, 3))), np.zeros((0, 1, 1, 3), np.uint8)) for r in reqs}, [])

    monkeypatch.setattr(mixing, "collect_stats", fake_collect)
    (tmp_path / "prompts.txt").write_text("a\nb\n")
    student = StudentSource(lambda: None, ["a", "b"])
    weights = [0.0, 0.12341, 0.12344, 1.0]
    sweep = interpolation_sweep(student, ModelSource("a", None), ModelSource("b", None), fast_eval_config(tmp_path), SeededConvExtractor(), weights)
    mix_keys = [k for k in keys if k.startswith("mix/")]
    assert len(set(mix_keys)) == 4 and len(set(sweep.fid_a)) == 4  # four sets, four FIDs
    sweep.weights = [0.0, 0.115, 0.125, 1.0]
    rows = sweep.write(tmp_path / "out")["csv"].read_text().splitlines()
    assert [r.split(",")[0] for r in rows] == ["weight_b", "0.00", "0.115", "0.125", "1.00"]


def test_eval_setup_defaults_from_zoo_and_user_precedence(world):
    from dmm_ray.evaluation.config import load_eval_config
    from dmm_ray.evaluation.sources import load_eval_setup

    setup = load_eval_setup(world / "zoo.yaml")
    assert [t.name for t in setup.teachers] == STYLES
    assert load_eval_config(defaults=setup.defaults).prompts_file == str(world / "prompts.txt")
    # Explicit prompts replace the zoo's prompt file instead of clashing with it.
    cfg = load_eval_config(overrides=["prompts=[a red circle]"], defaults=setup.defaults)
    assert cfg.prompts == ["a red circle"] and cfg.prompts_file is None
    # A zoo feature-net default does not leak into another extractor kind.
    setup.defaults["extractor"] = {"path": "/zoo/feature_net"}
    cfg = load_eval_config(overrides=["extractor.kind=inception"], defaults=setup.defaults)
    assert cfg.extractor.kind == "inception" and cfg.extractor.path is None
    assert load_eval_config(defaults=setup.defaults).extractor.path == "/zoo/feature_net"


def test_an_extractor_shorthand_in_set_wins_over_the_zoos_feature_net(world, tmp_path):
    """Finding: `--set inception_weights=W` beside a zoo.yaml (or merge config) as --teachers gave the
    Inception extractor no weights file (the zoo's feature_net default kept extractor.path, then was
    dropped as a default of another kind), and `--set feature_net=DIR` silently kept the zoo's net: the
    shorthands were expanded after the defaults went under them. The user's settings win now."""
    from dmm_ray.evaluation.config import load_eval_config
    from dmm_ray.evaluation.sources import load_eval_setup

    setup = load_eval_setup(world / "zoo.yaml")
    setup.defaults["extractor"] = {"path": "/zoo/feature_net"}
    weights = tmp_path / "pt_inception.pth"
    cfg = load_eval_config(overrides=[f"inception_weights={weights}"], defaults=setup.defaults)
    assert (cfg.extractor.kind, cfg.extractor.path) == ("inception", str(weights))
    cfg = load_eval_config(overrides=[f"feature_net={tmp_path / 'net'}"], defaults=setup.defaults)
    assert (cfg.extractor.kind, cfg.extractor.path) == ("zoo", str(tmp_path / "net"))
    cfg = load_eval_config(overrides=["resolution=64"], defaults={**setup.defaults, "sampler": {"height": 32, "width": 32}})  # a merge config's
    assert (cfg.sampler.height, cfg.sampler.width) == (64, 64)
    section = tmp_path / "eval.yaml"  # in a config file too
    section.write_text(yaml.safe_dump({"inception_weights": str(weights), "num_inference_steps": 3}))
    cfg = load_eval_config(section, ["guidance_scale=2"], defaults=setup.defaults)
    assert (cfg.extractor.kind, cfg.extractor.path, cfg.sampler.num_inference_steps, cfg.sampler.guidance_scale) == ("inception", str(weights), 3, 2)


def test_eval_setup_from_a_merge_config(world, tmp_path):
    from dmm_ray.evaluation.config import load_eval_config
    from dmm_ray.evaluation.sources import load_eval_setup

    cfg_path = tmp_path / "merge.yaml"
    cfg_path.write_text(
        yaml.safe_dump(
            {
                "name": "toy-eval",
                "output_dir": str(tmp_path / "merge_out"),
                "teachers": [{"name": n, "source": str(world / "teachers" / n)} for n in STYLES],
                "student": {"base": str(world / "teachers" / "ink")},
                "data": {"base": str(world / "teachers" / "ink"), "shards": str(tmp_path / "shards")},
                "evaluation": {"prompts": str(world / "prompts.txt"), "num_prompts": 1, "num_inference_steps": 3},
            }
        )
    )
    setup = load_eval_setup(cfg_path)
    assert [t.name for t in setup.teachers] == STYLES
    cfg = load_eval_config(overrides=["images_per_prompt=2"], defaults=setup.defaults)
    assert cfg.prompts_file == str(world / "prompts.txt") and cfg.max_prompts == 1 and cfg.images_per_prompt == 2
    assert cfg.sampler.num_inference_steps == 3 and cfg.output_dir == str(tmp_path / "merge_out" / "evaluation")
    assert cfg.load_prompts() == ["a red circle"]


def test_eval_setup_from_an_incremental_merge_config_has_every_style_of_its_model(world, tmp_path):
    """Finding: a merge config as --teachers gave its `teachers` alone; an incremental merge's model holds
    the previous model's styles too, so jobs/evaluate.py scored the new styles only (a FIDt over part of
    them, silently) where the merge scores all. Now the previous model's recorded teachers, then the new."""
    import json

    from dmm_ray.evaluation.sources import load_eval_setup

    def model(folder, styles):  # what recorded_teachers reads: the styles and a record naming their teachers
        (folder / "unet").mkdir(parents=True)
        (folder / "unet" / "config.json").write_text(json.dumps({"style_names": styles}))
        teachers = [{"name": n, "source": str(world / "teachers" / n)} for n in styles]
        (folder / "dmm_merge.json").write_text(json.dumps({"styles": styles, "teachers": teachers}))

    def config(base_merged):
        path = tmp_path / "incremental.yaml"
        path.write_text(
            yaml.safe_dump(
                {
                    "name": "toy-inc",
                    "output_dir": str(tmp_path / "inc_out"),
                    "teachers": [{"name": "neon", "source": str(world / "teachers" / "neon")}],
                    "incremental": {"base_merged": str(base_merged)},
                    "student": {"base": str(world / "teachers" / "ink")},
                    "data": {"base": str(world / "teachers" / "ink"), "shards": str(tmp_path / "shards")},
                }
            )
        )
        return path

    model(tmp_path / "first", ["ink"])
    assert [t.name for t in load_eval_setup(config(tmp_path / "first")).teachers] == ["ink", "neon"]
    model(tmp_path / "merged", ["ink", "neon"])  # base_merged the merge has since replaced (its own output): neon listed once
    assert [t.name for t in load_eval_setup(config(tmp_path / "merged")).teachers] == ["ink", "neon"]


def test_an_evaluation_whose_model_a_merge_replaced_while_it_sampled_writes_nothing(world, tmp_path, monkeypatch):
    """jobs/evaluate.py --out elsewhere reads merge.lock only at its start: a merge started after it saved another model
    in place of the one it sampled (each Ray actor loads the folder when it starts), and its FID matrix, made of samples
    of the old model (or of both), was written under the new model's UNet checksum. evaluate_merge now compares the
    checksum from before its sampling with the folder's after it, and writes nothing when they differ."""
    import dmm_ray.evaluation.api as api
    from dmm_ray.output_lock import ModelReplacedError

    merged = tmp_path / "run" / "merged"
    shutil.copytree(world / "student", merged)
    specs = load_zoo_manifest(world / "zoo.yaml").teachers
    sample = api.evaluate_sources

    def sampled_then_a_merge_saves(*args, **kwargs):
        result = sample(*args, **kwargs)
        save_another_model(merged)
        return result

    monkeypatch.setattr(api, "evaluate_sources", sampled_then_a_merge_saves)
    with pytest.raises(ModelReplacedError, match=r"was replaced while this evaluation sampled it .*nothing was written"):
        evaluate_merge(merged, specs, _cfg(world), output_dir=tmp_path / "eval", print_table=False)
    assert not (tmp_path / "eval").exists()  # was: fid_matrix.json naming the new model's checksum
    monkeypatch.setattr(api, "evaluate_sources", sample)
    assert evaluate_merge(merged, specs, _cfg(world), output_dir=tmp_path / "eval", print_table=False).files  # run again


def test_a_style_mixing_study_whose_model_a_merge_replaced_while_it_sampled_writes_nothing(world, tmp_path, monkeypatch, capsys):
    """jobs/style_mixing.py reads merge.lock only at its start: a merge started after it saved another model in place of
    the one it sampled, and the study's table, of samples of the old model (or of both), was written for --model. It
    now compares the UNet checksum from before its sampling with the folder's before it writes (check_still_sampled)."""
    import dmm_ray.evaluation.mixing as mixing
    from jobs.style_mixing import main

    merged = tmp_path / "run" / "merged"
    shutil.copytree(world / "student", merged)
    sweep = mixing.interpolation_sweep

    def swept_then_a_merge_saves(*args, **kwargs):
        result = sweep(*args, **kwargs)
        save_another_model(merged)
        return result

    monkeypatch.setattr(mixing, "interpolation_sweep", swept_then_a_merge_saves)
    args = ["--model", str(merged), "--teachers", str(world / "zoo.yaml"), "--sweep", ",".join(STYLES), "--no-ray", "--out", str(tmp_path / "mix")]
    assert main(args + _fast_eval(world)) == 2
    assert "was replaced while this evaluation sampled it" in capsys.readouterr().err
    assert not list((tmp_path / "mix").glob("*"))  # was: the sweep written for --model
