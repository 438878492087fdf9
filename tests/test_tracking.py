"""MLflow run tree on a temporary SQLite store: parent run, nested stages, metrics, artifacts,
the merged model registered and resolvable to a local diffusers folder."""

import json
import re

import numpy as np
import pytest

from dmm_ray.evaluation.config import EvalConfig
from dmm_ray.evaluation.matrix import EvalResult
from dmm_ray.evaluation.outputs import write_outputs
from dmm_ray.mlflow_model import decode_images
from dmm_ray.tracking import MergeTracker, TrackingConfig, flatten, metric_name, resolve_model_uri


@pytest.fixture
def tracker(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = TrackingConfig(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db", artifact_location=str(tmp_path / "artifacts"), project="zoo-merge")
    return MergeTracker(cfg)


def _result():
    return EvalResult(
        style_names=["ink", "neon glow"],
        matrix=np.array([[1.5, 4.0], [3.0, 2.5]]),
        ref_matrix=np.array([[1.0, 4.0], [3.0, 2.0]]),
        prompts=["a red circle"],
        images_per_set=2,
        extractor="seeded-cnn:0:16",
    )


def test_run_tree_metrics_artifacts_and_registered_model(tracker, tmp_path, tiny_components):
    import mlflow
    from diffusers import StableDiffusionPipeline

    model_dir = tmp_path / "merged"
    StableDiffusionPipeline(**tiny_components).save_pretrained(model_dir)
    with tracker.project(params={"teachers": ["ink", "neon glow"]}):
        with tracker.stage("initial-merge", config=EvalConfig(prompts=["a red circle"])):
            for step in range(3):
                tracker.log_metrics({"loss/total": 1.0 / (step + 1)}, step=step)
            result = _result()
            result.files = write_outputs(result, tmp_path / "evaluation")  # the evaluation stage writes; tracking logs
            tracker.log_evaluation(result)
            uri = tracker.log_merged_model(model_dir)
    # A later incremental merge resumes the same parent run.
    with tracker.project():
        with tracker.stage("incremental-1", params={"new_teachers": ["oil"]}):
            tracker.log_metrics({"FIDt": 5.0})

    client = mlflow.MlflowClient()
    runs = client.search_runs([tracker.experiment_id])
    by_name = {r.info.run_name: r for r in runs}
    assert set(by_name) == {"zoo-merge", "initial-merge", "incremental-1"}
    parent = by_name["zoo-merge"]
    for stage in ("initial-merge", "incremental-1"):
        assert by_name[stage].data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert parent.data.params["teachers"] == '["ink", "neon glow"]'

    # an experiment of model training: the MLflow UI opens on the runs table, not the GenAI traces view
    assert client.get_experiment(tracker.experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"
    stage = by_name["initial-merge"]
    m = stage.data.metrics
    assert m["FIDt"] == pytest.approx(4.0) and m["FIDt_ref"] == pytest.approx(3.0)
    assert m["FIDt_ratio"] == pytest.approx(4.0 / 3.0)
    assert m["fid_diag/ink"] == pytest.approx(1.5) and m["fid_diag/neon glow"] == pytest.approx(2.5)
    assert [x.value for x in client.get_metric_history(stage.info.run_id, "loss/total")] == pytest.approx([1.0, 0.5, 1 / 3])
    assert stage.data.params["sampler.num_inference_steps"] == "25"  # full config as params
    artifacts = {a.path for a in client.list_artifacts(stage.info.run_id)}
    assert "config.yaml" in artifacts and "evaluation" in artifacts
    eval_files = {a.path.split("/")[-1] for a in client.list_artifacts(stage.info.run_id, "evaluation")}
    assert {"fid_matrix.json", "M.csv", "M_ref.csv", "fid_heatmaps.png"} <= eval_files

    assert uri == "models:/dmm-merged/1"
    local = resolve_model_uri(uri, dst=tmp_path / "download", tracking_uri=tracker.config.tracking_uri)
    assert (local / "model_index.json").is_file() and (local / "unet" / "config.json").is_file()


def test_resolve_model_uri_local_and_errors(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "m" / "model_index.json").write_text("{}")
    assert resolve_model_uri(str(tmp_path / "m")) == tmp_path / "m"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_model_uri(str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="no diffusers pipeline folder"):
        resolve_model_uri(str(tmp_path / "empty"))

    for missing in ("models:/nope/1", "runs:/0123abcd/merged_model"):  # a store that does not exist: an error, not a new database
        with pytest.raises(FileNotFoundError, match=r"store sqlite:///.*absent\.db does not exist"):
            resolve_model_uri(missing, tracking_uri=f"sqlite:///{tmp_path / 'absent.db'}")
    assert not (tmp_path / "absent.db").exists()


def test_disabled_tracker_is_a_no_op(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    t = MergeTracker(TrackingConfig(enabled=False))
    with t.project(params={"a": 1}):
        with t.stage("s"):
            t.log_metrics({"x": 1.0})
            t.log_evaluation(_result())
    assert not (tmp_path / "mlflow.db").exists()


def test_stage_needs_project_and_config_rejects_unknown_keys(tracker):
    with pytest.raises(RuntimeError, match="open the project run first"):
        with tracker.stage("orphan"):
            pass
    with pytest.raises(ValueError, match="tracking_url"):
        TrackingConfig(tracking_url="sqlite:///x.db")


def test_helpers():
    assert flatten({"a": {"b": 1, "c": [1, 2]}, "d": "x"}) == {"a.b": 1, "a.c": "[1, 2]", "d": "x"}
    assert metric_name("fid_diag/ink (v2)*") == "fid_diag/ink _v2__"


def test_every_style_name_gives_a_metric_name_mlflow_takes(tracker):
    """fid_diag/<style> for a style whose name holds an empty, `.` or `..` path part: MLflow refuses
    a metric name that path normalisation would change, and the merge failed when its evaluation
    logged one. Each such part is written with _; other names are kept as they were."""
    styles = ["oil paint", "a/b", "a/", "x//y", ".", "..", "a/../b", "noir:v2"]
    names = [metric_name(f"fid_diag/{s}") for s in styles]
    assert names == [
        "fid_diag/oil paint",
        "fid_diag/a/b",
        "fid_diag/a/_",
        "fid_diag/x/_/y",
        "fid_diag/_",
        "fid_diag/__",
        "fid_diag/a/__/b",
        "fid_diag/noir_v2",
    ]
    with tracker.project(), tracker.stage("evaluation") as run:
        tracker.log_metrics({f"fid_diag/{s}": float(i) for i, s in enumerate(styles)})
    import mlflow

    assert mlflow.MlflowClient(tracker.config.tracking_uri).get_run(run.info.run_id).data.metrics == {n: float(i) for i, n in enumerate(names)}


def test_styles_whose_metric_names_clash_or_run_long_each_get_their_own_metric(tracker):
    """Styles `a:b` and `a_b` (or `水墨` and `油画`, both `fid_diag/__`) gave one metric name, and the last
    style's FID overwrote the others'; a style name that made `fid_diag/<style>` longer than MLflow's 250
    characters failed the stage's logging. The names a clash changed, and the long one, end with a digest
    of their own name; a name nothing changed stays as it is."""
    import mlflow

    styles = ["a:b", "a_b", "水墨", "油画", "x" * 300]
    with tracker.project(), tracker.stage("evaluation") as run:
        tracker.log_metrics({f"fid_diag/{s}": float(i) for i, s in enumerate(styles)})
    logged = mlflow.MlflowClient(tracker.config.tracking_uri).get_run(run.info.run_id).data.metrics
    assert sorted(logged.values()) == [0.0, 1.0, 2.0, 3.0, 4.0] and logged["fid_diag/a_b"] == 1.0
    assert all(len(name) <= 250 for name in logged)
    from dmm_ray.tracking import metric_names

    assert metric_names([f"fid_diag/{s}" for s in styles]) == metric_names([f"fid_diag/{s}" for s in styles])  # the same in every run


def test_stage_tracker_glue_for_the_merge_driver(tmp_path, monkeypatch, tiny_components):
    """start_stage -> workers log per-step metrics by run id -> finish_stage logs + registers."""
    from types import SimpleNamespace

    import mlflow
    from diffusers import StableDiffusionPipeline
    from mlflow.entities import Metric

    from dmm_ray.config import MergeConfig
    from dmm_ray.tracking import make_tracker

    monkeypatch.chdir(tmp_path)
    StableDiffusionPipeline(**tiny_components).save_pretrained(tmp_path / "merged")
    cfg = MergeConfig.model_validate(
        {
            "name": "toy-merge",
            "output_dir": str(tmp_path),
            "teachers": [{"name": "a", "source": "/x/a"}],
            "student": {"base": "/x/base"},
            "data": {"base": "/x/base", "shards": "/x/s"},
            "evaluation": {"enabled": False, "prompts": "prompts.txt", "feature_net": "fnet"},
            "tracking": {"tracking_uri": f"sqlite:///{tmp_path}/mlflow.db"},
        }
    )
    ev = cfg.evaluation
    assert ev.prompts_file == "prompts.txt" and ev.extractor.path == "fnet" and not ev.enabled
    assert cfg.tracking.project == cfg.tracking.registered_model_name == "toy-merge"
    tracker = make_tracker(cfg)
    handle = tracker.start_stage("merge", {"distill": {"steps": 3}})
    client = mlflow.MlflowClient(handle["uri"])
    client.log_batch(handle["run_id"], metrics=[Metric("distill/loss", 0.5, 0, s) for s in range(2)])
    result = SimpleNamespace(merged_path=tmp_path / "merged", stage_metrics={"distill": {"loss": 0.4, "seconds": 2.0}}, seconds=3.0)
    assert tracker.finish_stage(cfg, result) is None
    assert mlflow.active_run() is None
    run = client.get_run(handle["run_id"])
    assert run.data.tags["mlflow.parentRunId"] == handle["parent_run_id"] and run.data.params["distill.steps"] == "3"
    assert run.data.metrics["distill/seconds"] == 2.0 and run.info.status == "FINISHED"
    assert client.get_registered_model("toy-merge").latest_versions[0].version in (1, "1")
    # the registered version says what it is (the Models page shows nothing else to tell versions apart)
    (tmp_path / "merged" / "dmm_merge.json").write_text(json.dumps({"styles": ["a", "b"]}))
    evaluation = SimpleNamespace(fidt=10.5, fidt_ref=10.0, ratio=1.05, diagonal=lambda: {}, ref_diagonal=lambda: {}, files={})
    monkeypatch.setattr(tracker, "log_evaluation", lambda *a, **k: None)
    handle = tracker.start_stage("incremental", cfg)
    params = client.get_run(handle["run_id"]).data.params  # a section switched off: only its `enabled`
    assert params["fast.enabled"] == "False" and not any(k.startswith("fast.") and k != "fast.enabled" for k in params)
    assert params["distill.steps"] == str(cfg.distill.steps) and params["evaluation.enabled"] == "False"
    tracker.finish_stage(cfg, SimpleNamespace(merged_path=tmp_path / "merged", evaluation=evaluation, stage_metrics={}, seconds=1.0))
    assert client.get_run(handle["run_id"]).data.tags["dmm.output_dir"] == str(tmp_path)  # the merge's folder, on its runs
    version = client.get_model_version("toy-merge", "2")
    assert version.description == "incremental: 2 style(s) (a, b); FIDt 10.50, FIDt_ref 10.00, ratio 1.050"
    assert version.tags["dmm.styles"] == "a,b" and version.tags["FIDt_ratio"] == "1.0500" and version.tags["dmm.stage"] == "incremental"


def test_interrupted_runs_are_killed_and_a_dead_merges_runs_are_closed(tmp_path):
    """Ctrl-C / SIGTERM end the runs KILLED (re-running resumes), other errors FAILED. A stage run a
    killed driver left RUNNING is marked KILLED when the next job of its kind starts on the same
    folder; other folders' runs, and a few-step job's runs beside a merge, are left alone."""
    from mlflow import MlflowClient
    from pydantic import BaseModel

    from dmm_ray.tracking import OUTPUT_TAG, STAGE_TAG, StageTracker, TrackingConfig, run_status

    class Folder(BaseModel):
        output_dir: str

    assert run_status(KeyboardInterrupt()) == "KILLED" and run_status(ValueError()) == "FAILED"
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tracker = StageTracker(TrackingConfig(tracking_uri=uri, project="p", registered_model_name=None))
    client = MlflowClient(uri)
    out = str(tmp_path / "out")

    def left_running(output, stage):
        return client.create_run(tracker.experiment_id, tags={OUTPUT_TAG: output, STAGE_TAG: stage}, run_name=stage).info.run_id

    dead, elsewhere, fast = left_running(out, "merge"), left_running(str(tmp_path / "other"), "merge"), left_running(out, "fast")
    handle = tracker.start_stage("merge", Folder(output_dir=out))
    status = {r: client.get_run(r).info.status for r in (dead, elsewhere, fast)}
    assert status == {dead: "KILLED", elsewhere: "RUNNING", fast: "RUNNING"}
    tracker.abort(KeyboardInterrupt())
    assert client.get_run(handle["run_id"]).info.status == "KILLED"


def test_registered_dmm_model_loads_as_pyfunc_and_generates(tracker, tmp_path, tiny_components):
    import mlflow.pyfunc
    import pandas as pd

    from dmm_ray import DMMPipeline, StyleUNet

    c = tiny_components
    student = StyleUNet.from_unet(c["unet"], ["ink", "neon"])
    DMMPipeline.from_components(student, c["vae"], c["text_encoder"], c["tokenizer"], c["scheduler"]).save_pretrained(tmp_path / "dmm")
    with tracker.project(), tracker.stage("merge"):
        uri = tracker.log_merged_model(tmp_path / "dmm")
    model = mlflow.pyfunc.load_model(uri)
    frame = pd.DataFrame({"prompt": ["a red circle", "a blue square"], "style": ["ink", "1"]})
    out = model.predict(frame, params={"seed": 3})
    assert list(out["style"]) == ["ink", "neon"] and list(out["prompt"]) == list(frame["prompt"])
    as_numbers = model.predict(pd.DataFrame({"prompt": list(frame["prompt"]), "style": [0, 1]}), params={"seed": 3})  # an int column
    assert as_numbers.equals(out)
    with_gap = model.predict(pd.DataFrame({"prompt": list(frame["prompt"]), "style": [None, 1]}), params={"seed": 3})
    assert with_gap.equals(out)  # pandas stores [None, 1] as float64 [NaN, 1.0]: a missing style, then index 1
    images = decode_images(out)
    assert len(images) == 2 and images[0].size == images[1].size
    # seeded: the same frame gives the same images; in-process PIL on request
    pil = model.predict(frame, params={"seed": 3, "output": "pil"})
    assert [np.asarray(a).tolist() for a in pil] == [np.asarray(a).tolist() for a in images]
    # the signature carries the steps param through (without one MLflow drops params with a warning)
    pipe = model.unwrap_python_model().pipe
    seen = []
    pipe.scheduler.set_timesteps = (lambda real: lambda n, *a, **k: (seen.append(n), real(n, *a, **k))[1])(pipe.scheduler.set_timesteps)
    model.predict(pd.DataFrame({"prompt": ["a red circle"], "style": ["1"]}), params={"num_inference_steps": 2})
    assert seen == [2]
    assert StyleUNet.load_config(resolve_model_uri(uri, dst=tmp_path / "dl") / "unet")["style_names"] == ["ink", "neon"]
    # where it runs: model_config={"device": ...} ("auto": the GPU when there is one)
    assert str(mlflow.pyfunc.load_model(uri, model_config={"device": "cpu"}).unwrap_python_model().pipe.device) == "cpu"
    with pytest.raises(ValueError, match="model_config device nodevice: not usable here"):
        mlflow.pyfunc.load_model(uri, model_config={"device": "nodevice"})


def test_registered_model_is_servable_by_mlflow_models_serve(tracker, tmp_path, tiny_components, monkeypatch):
    """`mlflow models serve` answers JSON: the images as base64 PNG; a bad row is a 400 naming it, and
    the server goes on serving (the scoring server's own app, in-process). output "pil" is a 400 there:
    it was a 500 once every image was made (PIL images cannot be sent as JSON)."""
    import mlflow.pyfunc
    from fastapi.testclient import TestClient
    from mlflow.pyfunc import scoring_server

    from dmm_ray import DMMPipeline, StyleUNet

    c = tiny_components
    student = StyleUNet.from_unet(c["unet"], ["ink", "neon"])
    DMMPipeline.from_components(student, c["vae"], c["text_encoder"], c["tokenizer"], c["scheduler"]).save_pretrained(tmp_path / "dmm")
    with tracker.project(), tracker.stage("merge"):
        uri = tracker.log_merged_model(tmp_path / "dmm")
    monkeypatch.setenv("_MLFLOW_IS_IN_SERVING_ENVIRONMENT", "false")  # init() sets it for the process: undone after the test
    model = mlflow.pyfunc.load_model(uri)
    client = TestClient(scoring_server.init(model))

    def ask(rows, **params):
        body = {"dataframe_records": rows, "params": {"num_inference_steps": 2, **params}}
        return client.post("/invocations", json=body)

    pil = ask([{"prompt": "a red circle"}], output="pil")
    assert pil.status_code == 400 and "output 'pil' gives PIL images in-process only" in pil.text and "'png'" in pil.text, pil.text

    ok = ask([{"prompt": "a red circle", "style": "neon"}, {"prompt": "a blue square"}], seed=0)
    assert ok.status_code == 200, ok.text
    predictions = ok.json()["predictions"]
    assert [p["style"] for p in predictions] == ["neon", "ink"]
    images = decode_images(predictions)
    assert len(images) == 2 and images[0].size == images[1].size
    bad = ask([{"prompt": "a red circle"}, {"prompt": "a blue square", "style": "sepia"}])
    assert bad.status_code == 400 and "row 1" in bad.text and "sepia" in bad.text
    assert ask([{"prompt": "a red circle"}], output="jpeg").status_code == 400
    again = ask([{"prompt": "a red circle", "style": "neon"}, {"prompt": "a blue square"}], seed=0)
    assert again.status_code == 200 and again.json() == ok.json()  # still serving, and seeded
    # a mixture in the style column; one style's whole weight is that style
    mixed = ask([{"prompt": "a red circle", "style": "ink=1,neon=3"}, {"prompt": "a blue square", "style": "0=2"}], seed=0)
    assert mixed.status_code == 200, mixed.text
    assert [p["style"] for p in mixed.json()["predictions"]] == ["ink=0.25,neon=0.75", "ink"]
    assert mixed.json()["predictions"][1]["image"] == predictions[1]["image"]
    assert mixed.json()["predictions"][0]["image"] != predictions[0]["image"]
    bad = ask([{"prompt": "a red circle", "style": "ink=1,,neon=1"}])
    assert bad.status_code == 400 and "row 0: style 'ink=1,,neon=1' has an empty entry" in bad.text
    # an index as a JSON number is the same style as its name; a number out of range or of another type is a 400 naming the row
    # (a list is the N weights, as in the Python API)
    by_index = ask([{"prompt": "a red circle", "style": 1}, {"prompt": "a blue square", "style": [1, 0]}], seed=0)
    assert by_index.status_code == 200, by_index.text
    assert by_index.json()["predictions"] == predictions
    for wrong, words in ((5, "row 0"), (1.5, "row 0"), ([1, 0, 0], "row 0"), (True, "row 0")):
        bad = ask([{"prompt": "a red circle", "style": wrong}])
        assert bad.status_code == 400 and words in bad.text, (wrong, bad.text)


def test_a_few_step_models_steps_above_its_grid_are_a_400(tracker, tmp_path, tiny_components):
    """A few-step model's TCD scheduler samples at most its training grid's steps (original_inference_steps)
    and raises on more: the answer was MLflow's "unexpected error while evaluating the model" with
    diffusers' advice to raise `strength` (which the pyfunc has no param for); it is the pyfunc's own
    bad-parameter answer naming the limit, as Serve's. The grid's own count still samples."""
    import mlflow.pyfunc
    from diffusers import TCDScheduler
    from fastapi.testclient import TestClient
    from mlflow.pyfunc import scoring_server

    from dmm_ray import DMMPipeline, StyleUNet

    c = tiny_components
    pipe = DMMPipeline.from_components(StyleUNet.from_unet(c["unet"], ["ink", "neon"]), c["vae"], c["text_encoder"], c["tokenizer"], c["scheduler"])
    pipe.scheduler = TCDScheduler.from_config(pipe.scheduler.config, original_inference_steps=6)
    pipe.save_pretrained(tmp_path / "fast")
    with tracker.project(), tracker.stage("merge"):
        uri = tracker.log_merged_model(tmp_path / "fast")
    client = TestClient(scoring_server.init(mlflow.pyfunc.load_model(uri)))

    def ask(steps):
        return client.post(
            "/invocations", json={"dataframe_records": [{"prompt": "a red circle", "style": "neon"}], "params": {"num_inference_steps": steps}}
        )

    too_many = ask(7)
    assert too_many.status_code == 400, too_many.text
    assert "num_inference_steps 7" in too_many.text and "at most 6 steps" in too_many.text
    assert ask(6).status_code == 200


def test_steps_above_the_schedulers_training_timesteps_are_a_400(tracker, tmp_path, tiny_components):
    """num_inference_steps above the scheduler's training timesteps (1000) went to diffusers: the toy model's
    DPM-Solver++ gave NaN images at 1001 steps, and 10**12 was a MemoryError (a 500 through `mlflow models
    serve`). It is the pyfunc's own bad-parameter answer naming the limit, before anything is sampled."""
    import mlflow.pyfunc
    import pandas as pd
    from mlflow.exceptions import MlflowException

    from dmm_ray import DMMPipeline, StyleUNet

    c = tiny_components
    DMMPipeline.from_components(
        StyleUNet.from_unet(c["unet"], ["ink", "neon"]), c["vae"], c["text_encoder"], c["tokenizer"], c["scheduler"]
    ).save_pretrained(tmp_path / "dmm")
    with tracker.project(), tracker.stage("merge"):
        uri = tracker.log_merged_model(tmp_path / "dmm")
    model = mlflow.pyfunc.load_model(uri)
    for steps in (1001, 10**12):
        with pytest.raises(MlflowException, match=f"num_inference_steps {steps}: .* has 1000 training timesteps") as error:
            model.predict(pd.DataFrame({"prompt": ["a red circle"]}), params={"num_inference_steps": steps})
        assert error.value.error_code == "INVALID_PARAMETER_VALUE"  # a 400 through `mlflow models serve`


def test_a_weighted_merge_registered_by_track_generates_from_prompts(tracker, tiny_base_dir):
    """`jobs/weighted_merge.py --track` registers its weighted merge, a plain diffusers folder (no StyleUNet,
    no styles), through the same pyfunc: it loaded, and every predict() was an AttributeError ('DMMPipeline'
    object has no attribute 'styles'; a 500 through `mlflow models serve`). It generates from prompts; a
    style is a bad request saying the model has none."""
    import mlflow.pyfunc
    import pandas as pd
    from mlflow.exceptions import MlflowException

    with tracker.project(), tracker.stage("weighted-merge"):
        uri = tracker.log_merged_model(tiny_base_dir)
    model = mlflow.pyfunc.load_model(uri)
    out = model.predict(pd.DataFrame({"prompt": ["a red circle", "a blue square"]}), params={"seed": 0, "num_inference_steps": 2})
    assert list(out["prompt"]) == ["a red circle", "a blue square"] and list(out["style"]) == ["", ""]
    assert len(decode_images(out)) == 2
    with pytest.raises(MlflowException, match="row 0: style 'ink': this model has no styles") as error:
        model.predict(pd.DataFrame({"prompt": ["a red circle"], "style": ["ink"]}))
    assert error.value.error_code == "INVALID_PARAMETER_VALUE"  # a 400 through `mlflow models serve`


def _logged_model(tmp_path) -> tuple[str, str]:
    """(store, runs:/ URI) of a tiny pipeline folder logged as a run artifact, without touching
    MLflow's global tracking URI."""
    from mlflow import MlflowClient

    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "model_index.json").write_text("{}")
    store = f"sqlite:///{tmp_path}/logged.db"
    client = MlflowClient(store)
    run = client.create_run(client.create_experiment("logged", artifact_location=(tmp_path / "artifacts").as_uri()))
    client.log_artifacts(run.info.run_id, str(folder), "merged_model")
    return store, f"runs:/{run.info.run_id}/merged_model"


def test_an_explicit_store_is_read_with_its_own_registry_after_another_tracker_ran(tmp_path, monkeypatch):
    """mlflow.set_registry_uri (the tracker's) also rewrites $MLFLOW_REGISTRY_URI: a models:/ URI read
    with an explicit tracking_uri used to go to that earlier store's registry and not find the model."""
    import mlflow
    from mlflow import MlflowClient

    import dmm_ray.tracking

    monkeypatch.setattr(dmm_ray.tracking, "_USER_REGISTRY_URI", None)  # no registry named by the user
    store, runs_uri = _logged_model(tmp_path)
    client = MlflowClient(store, registry_uri=store)
    client.create_registered_model("logged")
    run_id = runs_uri.split("/")[1]
    client.create_model_version("logged", f"{client.get_run(run_id).info.artifact_uri}/merged_model", run_id=run_id)
    other = f"sqlite:///{tmp_path}/other.db"
    MlflowClient(other, registry_uri=other).search_registered_models()  # an earlier tracker's store exists
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", other)
    mlflow.set_registry_uri(other)  # what an earlier tracker in this process leaves behind
    folder = resolve_model_uri("models:/logged/1", dst=tmp_path / "dl", tracking_uri=store)
    assert (folder / "model_index.json").is_file()


def test_local_model_removes_its_download_when_the_block_ends(tmp_path, monkeypatch):
    """What the jobs use for --model models:/...: never a model copy left in /tmp, errors included."""
    import tempfile

    from dmm_ray.tracking import local_model

    store, uri = _logged_model(tmp_path)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    with local_model(uri, store) as folder:
        assert (folder / "model_index.json").is_file() and tmp_path / "tmp" in folder.parents
    assert not folder.exists() and not list((tmp_path / "tmp").iterdir())
    with pytest.raises(RuntimeError, match="inside"):
        with local_model(uri, store) as folder:
            raise RuntimeError("inside the block")
    assert not folder.exists()
    with pytest.raises(FileNotFoundError, match="could not resolve"):
        with local_model(uri.replace("merged_model", "nothing_there"), store):
            pass
    with pytest.raises(FileNotFoundError, match="could not resolve"):
        resolve_model_uri(uri.replace("merged_model", "nothing_there"), tracking_uri=store)  # its own temp folder
    assert not list((tmp_path / "tmp").iterdir())
    with local_model(str(tmp_path / "model")) as folder:  # a local folder: used in place, kept
        assert folder == tmp_path / "model"
    assert (tmp_path / "model" / "model_index.json").is_file()
    with local_model(None) as folder:
        assert folder is None


def test_local_model_reads_an_object_storage_model_as_serve_does(tmp_path):
    """Finding: jobs/evaluate.py and jobs/style_mixing.py --model file://.../merged (s3://, gs://: a merge's <output_dir
    URI>/merged) downloaded it with MLflow, whatever was there: while a merge's upload replaced it, or after one was cut
    short, 'holds no diffusers pipeline folder' (or a half-uploaded model), where Serve, jobs/export.py and
    load_dmm_pipeline load the complete previous model (fsu.model_to_read). local_model reads it as they do."""
    from dmm_ray.tracking import local_model

    old = tmp_path / "bucket" / "merged.old"  # the previous model, aside while the upload replaces merged/
    (old / "unet").mkdir(parents=True)
    (old / "unet" / "config.json").write_text('{"previous": 1}')
    (old / "model_index.json").write_text("{}")
    (tmp_path / "bucket" / "merged" / "unet").mkdir(parents=True)  # half of the new one: no model_index.json yet
    with local_model((tmp_path / "bucket" / "merged").as_uri()) as folder:
        assert (folder / "unet" / "config.json").read_text() == '{"previous": 1}'
    assert not folder.exists()  # a download, removed at the block's end


def test_a_store_mlflow_cannot_open_is_refused_before_any_work(tmp_path, monkeypatch):
    """check_tracking_store: a file store (MLflow 3 refuses it), an unknown scheme; nothing contacted."""
    from dmm_ray.tracking import TrackingError, check_registered_name, check_tracking, check_tracking_store

    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    for uri in ("mlruns", str(tmp_path / "runs"), (tmp_path / "runs").as_uri()):
        with pytest.raises(TrackingError, match="is a file store, which MLflow .* refuses; use sqlite:///"):
            check_tracking_store(uri, "--tracking-uri")
    with pytest.raises(TrackingError, match="--tracking-uri 'banana://x': MLflow cannot open this store"):
        check_tracking_store("banana://x", "--tracking-uri")
    check_tracking_store("http://127.0.0.1:9", "--tracking-uri")  # a server down now is an outage, ridden out later
    # an http(s) URI without a server, or with no port, was an "Invalid url" only at the tracker's first request
    for uri, problem in (("http://", "no host"), ("http:///mlflow", "no host"), ("https://:5000", "no host"), ("http://localhost:50x0", "port")):
        with pytest.raises(
            TrackingError, match=rf"tracking.uri '{re.escape(uri)}' .*{problem}.*write http\(s\)://HOST\[:PORT\], e.g. http://localhost:5000"
        ):
            check_tracking(TrackingConfig(tracking_uri=uri), "tracking.uri")
    with pytest.raises(TrackingError, match="tracking.registry_uri 'http://' names no tracking server"):
        check_tracking(TrackingConfig(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db", registry_uri="http://"))
    check_tracking_store(f"sqlite:///{tmp_path}/mlflow.db", "--tracking-uri")
    # MLflow's named stores are no paths (they were refused as file stores): Databricks' default profile,
    # and Unity Catalog's registry, which is no tracking store
    check_tracking(TrackingConfig(tracking_uri="databricks", registry_uri="databricks-uc"))
    check_tracking(TrackingConfig(tracking_uri="databricks://profile", registry_uri="databricks-uc"))
    with pytest.raises(TrackingError, match="tracking.tracking_uri 'databricks-uc': MLflow cannot open this store"):
        check_tracking(TrackingConfig(tracking_uri="databricks-uc"))
    check_tracking_store("sqlite:///mlflow.db", "--tracking-uri")  # relative to the current folder, as SQLAlchemy opens it
    # a typo of sqlite:/// (SQLAlchemy's parse error came when the tracker opened it, after a dry run said OK), and a
    # store in memory, whose runs were gone when the job ended
    for uri in ("sqlite://mlflow.db", "sqlite:mlflow.db", "sqlite://", "sqlite:///:memory:", "sqlite:///"):
        with pytest.raises(TrackingError, match=rf"--tracking-uri '{re.escape(uri)}' is not an sqlite database file: write sqlite:////ABSOLUTE"):
            check_tracking_store(uri, "--tracking-uri")
    with pytest.raises(TrackingError, match="tracking.tracking_uri 'sqlite://mlflow.db' is not an sqlite database file"):
        check_tracking(TrackingConfig(tracking_uri="sqlite://mlflow.db"))
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "runs").exists()  # nothing created
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow's own opt-out
    check_tracking_store(str(tmp_path / "runs"), "--tracking-uri")
    with pytest.raises(TrackingError, match="--registered-name: 'a/b' contains '/'"):
        check_registered_name("a/b", "--registered-name")
    with pytest.raises(ValueError, match="the folder of tracking.tracking_uri's database"):
        (tmp_path / "file").write_text("")
        check_tracking(TrackingConfig(tracking_uri=f"sqlite:///{tmp_path}/file/mlflow.db"))
    check_tracking(TrackingConfig(enabled=False, tracking_uri="banana://x"))  # tracking off: nothing to check


def test_a_tracking_server_that_does_not_answer_is_said_at_once(monkeypatch):
    """The tracker's first request went through MLflow's retries: four minutes of retry warnings, then
    MLflow's own error, for a server that is not there."""
    import socket
    import time

    from dmm_ray.tracking import TrackingError

    with socket.socket() as s:  # a port where nothing listens
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    started = time.monotonic()
    with pytest.raises(TrackingError, match=rf"the MLflow tracking store 'http://127.0.0.1:{port}' cannot be used: .*start its server"):
        MergeTracker(TrackingConfig(tracking_uri=f"http://127.0.0.1:{port}", project="p"))
    assert time.monotonic() - started < 60
    # a store that answered this process before (the few-step stage's tracker after the merge's) keeps
    # MLflow's own retries: an outage (none here, to keep the test short), not a store that is not there
    from mlflow.exceptions import MlflowException

    from dmm_ray import tracking

    monkeypatch.setattr(tracking, "_ANSWERED", {f"http://127.0.0.1:{port}"})
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    with pytest.raises(MlflowException):
        MergeTracker(TrackingConfig(tracking_uri=f"http://127.0.0.1:{port}", project="p"))


def test_a_failed_job_leaves_a_finished_project_finished_and_its_own_run_says_why(tmp_path):
    """The parent run stands for the project: a later job that fails (an evaluation, a merge) or is
    interrupted marks its own stage run FAILED / KILLED and gives the parent back FINISHED. A project
    whose only job failed is FAILED; a re-run that succeeds makes it FINISHED."""
    from mlflow import MlflowClient
    from pydantic import BaseModel

    from dmm_ray.tracking import StageTracker, TrackingConfig

    class Folder(BaseModel):
        output_dir: str

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)

    def tracker(project="p"):
        return StageTracker(TrackingConfig(tracking_uri=uri, project=project, registered_model_name=None))

    def status(run_id):
        return client.get_run(run_id).info.status

    def failing_evaluation(error):  # as jobs/evaluate.py --track opens its runs
        t = tracker()
        with pytest.raises(type(error)), t.project(), t.stage("evaluation") as run:
            ids.append(run.info.run_id)
            raise error
        return t.parent_run_id

    ids = []
    # a project whose first job fails is FAILED
    first = tracker("q")
    with pytest.raises(ValueError), first.project(), first.stage("merge"):
        raise ValueError("bad")
    assert status(first.parent_run_id) == "FAILED"
    # a good merge, then jobs that fail after resuming it: their runs say why, the project stays FINISHED
    good = tracker()
    good.start_stage("merge", Folder(output_dir=str(tmp_path / "out")))
    good.close()
    parent = good.parent_run_id
    assert status(parent) == "FINISHED"
    assert failing_evaluation(ValueError("no teachers")) == parent
    assert failing_evaluation(KeyboardInterrupt()) == parent
    assert [status(r) for r in ids] == ["FAILED", "KILLED"] and status(parent) == "FINISHED"
    again = tracker()  # the merge driver's way: start_stage, then abort on an error
    handle = again.start_stage("incremental-1", Folder(output_dir=str(tmp_path / "out")))
    again.abort(RuntimeError("worker died"))
    assert status(handle["run_id"]) == "FAILED" and status(parent) == "FINISHED"
    # the failed project: a good re-run makes it FINISHED
    rerun = tracker("q")
    with rerun.project(), rerun.stage("merge"):
        pass
    assert rerun.parent_run_id == first.parent_run_id and status(first.parent_run_id) == "FINISHED"


def test_a_failure_while_a_stage_run_opens_ends_its_runs_failed_or_killed(tmp_path, monkeypatch):
    """start_stage opens the project run, then the stage run and logs its config. A failure there
    (the store refuses a param, a Ctrl-C) comes before the job's own abort covers it: the runs are
    ended here, FAILED or KILLED (the project FINISHED again when it was), never left open for
    MLflow's exit hook, which ended the project FINISHED."""
    import mlflow
    from mlflow import MlflowClient

    from dmm_ray.tracking import StageTracker, run_status

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)

    def failing_start(project, error):
        tracker = StageTracker(TrackingConfig(tracking_uri=uri, project=project, registered_model_name=None))

        def refuse(*args, **kwargs):
            raise error

        monkeypatch.setattr(tracker, "log_config", refuse)
        with pytest.raises(type(error)):
            tracker.start_stage("merge", {"distill": {"steps": 3}}, output=str(tmp_path / project))
        assert mlflow.active_run() is None
        stage = client.search_runs([tracker.experiment_id], f"tags.`dmm.project` = '{project}' and tags.`dmm.kind` = 'stage'")
        return client.get_run(tracker.parent_run_id).info.status, [r.info.status for r in stage]

    for error in (RuntimeError("the store refused a param"), KeyboardInterrupt()):
        status = run_status(error)
        assert failing_start(f"new-{status}", error) == (status, [status])
    good = StageTracker(TrackingConfig(tracking_uri=uri, project="good", registered_model_name=None))
    with good.project(), good.stage("merge"):
        pass
    assert failing_start("good", RuntimeError("the store refused a param")) == ("FINISHED", ["FAILED", "FINISHED"])


def test_an_experiment_deleted_in_the_ui_is_said_when_the_tracker_opens(tmp_path):
    """A deleted experiment keeps its name: MLflow refused the merge's first run only when its stage
    opened (after the encode), with its own MlflowException. The tracker says so before any work, with
    the way back; restored, the project resumes."""
    from mlflow import MlflowClient

    from dmm_ray.tracking import StageTracker, TrackingError

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cfg = TrackingConfig(tracking_uri=uri, project="p", registered_model_name=None)
    first = StageTracker(cfg)
    first.start_stage("merge", {"a": 1}, output=str(tmp_path / "out"))
    first.close()
    client = MlflowClient(uri)
    client.delete_experiment(first.experiment_id)
    with pytest.raises(
        TrackingError,
        match=rf"experiment 'dmm-ray' \(id {first.experiment_id}\) in {re.escape(uri)} was deleted: restore it .*mlflow experiments restore --experiment-id {first.experiment_id}\) or, in a merge config, name another experiment \(tracking.experiment\)",
    ):
        StageTracker(cfg)
    client.restore_experiment(first.experiment_id)
    again = StageTracker(cfg)
    again.start_stage("merge", {"a": 1}, output=str(tmp_path / "out"))
    again.close()
    assert again.parent_run_id == first.parent_run_id


def test_jobs_started_together_on_a_fresh_sqlite_store_all_open_it(tmp_path):
    """MLflow creates and migrates a new sqlite database without a lock: of trackers opened together
    on a store that did not exist (a sweep), all but one failed with "duplicate column name"."""
    import os
    import subprocess
    import sys
    import time

    uri, go, n = f"sqlite:///{tmp_path}/mlflow.db", tmp_path / "go", 4
    child = (  # imported, it says so (ready<i>), then waits for the start line (go)
        "import os, sys, time\n"
        "from dmm_ray.tracking import MergeTracker, TrackingConfig\n"
        f"cfg = TrackingConfig(tracking_uri={uri!r}, experiment='sweep', project='p', registered_model_name=None)\n"
        f"open(os.path.join({str(tmp_path)!r}, 'ready' + sys.argv[1]), 'w').close()\n"
        f"while not os.path.exists({str(go)!r}): time.sleep(0.005)\n"
        "print(MergeTracker(cfg).experiment_id)\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    jobs = [
        subprocess.Popen([sys.executable, "-c", child, str(i)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for i in range(n)
    ]
    deadline = time.monotonic() + 300
    while not all((tmp_path / f"ready{i}").exists() for i in range(n)) and time.monotonic() < deadline:
        time.sleep(0.05)
    go.write_text("")
    answers = [job.communicate(timeout=300) for job in jobs]
    assert [job.returncode for job in jobs] == [0] * n, [err[-400:] for _, err in answers]
    assert len({out.strip() for out, _ in answers}) == 1  # one experiment for all
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith("mlflow.db") and p.name != "mlflow.db"]  # the lock leaves no file


def test_params_over_mlflows_limit_still_tell_two_merges_apart(tracker):
    """A value over MLflow's 6000 characters (a long list of eval prompts) was cut with a plain "...":
    two merges differing only past the cut showed the same param in the compare view."""
    import mlflow

    from dmm_ray.tracking import MAX_PARAM_LEN

    logged = []
    for last in ("a blue square", "a red circle"):
        prompts = [f"prompt number {i} of a long list of evaluation prompts" for i in range(150)] + [last]
        with tracker.project(), tracker.stage("merge", config={"evaluation": {"prompts": prompts}}) as run:
            run_id = run.info.run_id
        logged.append(mlflow.get_run(run_id).data.params["evaluation.prompts"])
    assert all(len(value) == MAX_PARAM_LEN for value in logged)
    assert logged[0] != logged[1]
    assert logged[0].startswith('["prompt number 0') and logged[0].endswith("]") and " chars, sha256 " in logged[0]


def test_a_project_and_an_output_folder_with_an_apostrophe_are_found_again(tmp_path):
    """MLflow's filter grammar has no escapes: `bob's-merge` inside '...' was an "Invalid clause"
    error once Ray had started (and close_stale_runs skipped such folders)."""
    from mlflow import MlflowClient

    from dmm_ray.tracking import StageTracker, TrackingConfig

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cfg = TrackingConfig(tracking_uri=uri, project="bob's-merge", registered_model_name=None)
    first = StageTracker(cfg)
    with first.project():
        parent = first.find_project_run().info.run_id
    again = StageTracker(cfg)
    assert again.find_project_run().info.run_id == parent
    out = str(tmp_path / "bob's out")
    stale = MlflowClient(uri).create_run(again.experiment_id, tags={"dmm.output_dir": out, "dmm.stage": "merge"})
    again.close_stale_runs(out, "merge")
    assert MlflowClient(uri).get_run(stale.info.run_id).info.status == "KILLED"
    # a trailing \ escapes the literal's closing quote in that grammar: the project is refused up front (a
    # config error, not a parse error when the stage opened), such a folder's stale runs are left alone
    with pytest.raises(ValueError, match=r"'team\\\\' ends with \\, which MLflow's run search reads as escaping the closing quote"):
        TrackingConfig(tracking_uri=uri, project="team\\")
    again.close_stale_runs(str(tmp_path / "out\\"), "merge")


def test_a_version_of_a_merge_to_a_uri_output_dir_names_where_its_model_is(tmp_path, monkeypatch, tiny_components):
    """The merge of an output_dir URI logs its local staging copy (merged_path) but the model is at
    <uri>/merged (result.location): the version's dmm.merged_path tag used to name the driver's staging folder."""
    from types import SimpleNamespace

    from diffusers import StableDiffusionPipeline
    from mlflow import MlflowClient

    from dmm_ray.tracking import StageTracker

    monkeypatch.chdir(tmp_path)
    StableDiffusionPipeline(**tiny_components).save_pretrained(tmp_path / "staging" / "merged")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tracker = StageTracker(TrackingConfig(tracking_uri=uri, artifact_location=str(tmp_path / "artifacts"), project="p", registered_model_name="p"))
    tracker.start_stage("merge", None, output="s3://bucket/run")
    result = SimpleNamespace(merged_path=tmp_path / "staging" / "merged", location="s3://bucket/run/merged", stage_metrics={}, seconds=1.0)
    tracker.finish_stage(None, result)
    assert MlflowClient(uri).get_model_version("p", "1").tags["dmm.merged_path"] == "s3://bucket/run/merged"
