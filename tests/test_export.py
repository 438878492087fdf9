"""Baking a style into a stock checkpoint is exact (SD1.5 and SDXL, style FiLM included), and the
exports load with diffusers' own loaders and carry their provenance (issue 16, section 1)."""

from __future__ import annotations

import copy
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from export_helpers import MIXTURE, OTHER_MIXTURE, STYLES, gen, mlflow_store, save_merged, tiny_merged, tree

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def merged():
    return {arch: tiny_merged(arch) for arch in ("sd15", "sdxl")}


def relative_error(style_unet, plain_unet, **style) -> float:
    from dmm_ray.export import unet_relative_error

    return unet_relative_error(style_unet, plain_unet, batch=3, **style)


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
@pytest.mark.parametrize("film,adapters", [(True, 0), (False, 0), (True, 2)])
@pytest.mark.parametrize("style", [{"style": "neon"}, {"style": 2}, {"style_weights": MIXTURE}])
def test_baked_unet_equals_style_unet(arch, film, adapters, style):
    from diffusers import UNet2DConditionModel

    from dmm_ray.export import bake_unet

    pipe = tiny_merged(arch, film=film, adapter_rank=adapters)
    plain = bake_unet(pipe.unet, **style)
    assert type(plain) is UNet2DConditionModel and plain.class_embedding is None
    assert "style_names" not in plain.config and "style_film" not in plain.config
    assert not plain._forward_hooks and all(not m._forward_hooks for m in plain.modules())
    assert relative_error(pipe.unet, plain, **style) <= 1e-5
    # Not vacuous: the style moves the output far beyond the tolerance, and so does FiLM.
    other = bake_unet(pipe.unet, style="ink")
    assert relative_error(pipe.unet, other, **style) > 1e-2
    if film:
        no_film = copy.deepcopy(pipe.unet)  # same trunk, FiLM at its identity init
        with torch.no_grad():
            for p in no_film.class_embedding.film.parameters():
                p.zero_()
        assert relative_error(pipe.unet, bake_unet(no_film, **style), **style) > 1e-3
    if adapters:  # and so do the per-style adapters
        no_adapters = copy.deepcopy(pipe.unet)
        with torch.no_grad():
            for a in no_adapters.class_embedding.adapters.values():
                a.up.zero_()
        assert relative_error(pipe.unet, bake_unet(no_adapters, **style), **style) > 1e-3


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_baked_pipeline_generates_the_same_image(merged, arch):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    from dmm_ray.export import bake

    pipe = merged[arch]
    for style in ({"style": "pixel"}, {"style_weights": MIXTURE}):
        plain = bake(pipe, **style)
        assert type(plain) is (StableDiffusionXLPipeline if arch == "sdxl" else StableDiffusionPipeline)
        a, b = gen(pipe, **style), gen(plain, styled=False)
        assert np.abs(a - b).max() < 1e-4, style
        assert ((a * 255).round() == (b * 255).round()).all()  # identical 8-bit images
    assert np.abs(gen(pipe, style="pixel") - gen(pipe, style="ink")).mean() > 1e-3  # the style shows in the image
    assert np.abs(gen(bake(pipe, style_weights=MIXTURE), styled=False) - gen(bake(pipe, style_weights=OTHER_MIXTURE), styled=False)).mean() > 1e-3
    assert isinstance(pipe.unet, type(merged[arch].unet)) and pipe.unet.class_embedding is not None  # pipe untouched


def test_bake_leaves_the_merged_model_untouched_and_rejects_bad_styles(merged):
    from dmm_ray.export import ExportError, bake, bake_unet
    from dmm_ray.models.style_unet import StyleError

    pipe = merged["sd15"]
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    bake(pipe, style="ink")
    assert all(torch.equal(v, pipe.unet.state_dict()[k]) for k, v in before.items())
    with pytest.raises(StyleError, match="known styles"):
        bake(pipe, style="watercolor")
    with pytest.raises(StyleError, match=">= 0"):
        bake(pipe, style_weights={"ink": -1, "neon": 2})
    with pytest.raises(StyleError, match="exactly one"):
        bake(pipe, style="ink", style_weights=MIXTURE)
    with pytest.raises(ExportError, match="plain UNet"):
        bake_unet(bake(pipe, style="ink").unet, style="ink")


def test_a_compiled_unet_is_baked_and_exported_and_an_unbaked_one_refused(merged, tmp_path):
    """`pipe.unet = torch.compile(pipe.unet)` (diffusers' documented speed-up) hid the StyleUNet from the
    export: bake said "got OptimizedModule (already a plain UNet?)", export_pipeline wrote the unbaked model
    as a diffusers-folder export (a StyleUNet where a plain pipeline's UNet belongs), and a baked UNet
    compiled afterwards failed the single file on its `_orig_mod.` keys. They now read the UNet inside the
    wrapper (nothing here runs the compiled module)."""
    from safetensors.torch import load_file

    from dmm_ray.export import ExportError, bake, export_pipeline

    pipe = merged["sd15"]
    unet = pipe.unet
    reference = bake(pipe, style="neon")
    pipe.unet = torch.compile(unet, backend="eager")
    try:
        for fmt, out in (("diffusers", tmp_path / "unbaked"), ("single_file", tmp_path / "unbaked.safetensors")):
            with pytest.raises(ExportError, match="still holds a StyleUNet"):
                export_pipeline(pipe, out, fmt=fmt)
            assert not out.exists()
        baked = bake(pipe, style="neon")
    finally:
        pipe.unet = unet  # the module-scoped fixture, as the other tests expect it
    assert all(torch.equal(v, baked.unet.state_dict()[k]) for k, v in reference.unet.state_dict().items())
    baked.unet = torch.compile(baked.unet, backend="eager")
    exported = load_file(str(export_pipeline(baked, tmp_path / "neon.safetensors")))
    expected = load_file(str(export_pipeline(reference, tmp_path / "reference.safetensors")))
    assert exported.keys() == expected.keys() and all(torch.equal(exported[k], expected[k]) for k in expected)


def test_fused_qkv_projections_are_baked_and_exported_as_the_plain_layers(tmp_path):
    """`pipe.fuse_qkv_projections()` (a model without style adapters on q/k/v fuses, README) adds `to_qkv` / `to_kv`
    copies of the projections to the UNet's and VAE's state dicts, kept after `unfuse_qkv_projections()`: bake failed
    with "does not map onto a plain UNet: ... unexpected [...to_qkv.weight...]", and a baked pipeline fused
    afterwards was written to its single file with them (the VAE's as `attn_1.to_qkto_v`), names no loader reads.
    They are left out: the baked, unfused UNet gives the fused model's image, and the file holds no fused key."""
    from safetensors import safe_open

    from dmm_ray.export import bake, export_pipeline

    pipe = tiny_merged("sd15")
    reference = gen(pipe, style="ink")
    pipe.fuse_qkv_projections()
    plain = bake(pipe, style="ink")
    assert np.abs(gen(plain, styled=False) - reference).max() < 1e-4
    pipe.unfuse_qkv_projections()  # the fused copies stay in the state dict
    plain = bake(pipe, style="ink")
    plain.fuse_qkv_projections()
    with safe_open(str(export_pipeline(plain, tmp_path / "ink.safetensors")), "pt") as f:
        keys = list(f.keys())
    assert keys and not [k for k in keys if "to_qk" in k or "to_kv" in k]


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_single_file_loads_with_from_single_file_and_carries_provenance(merged, arch, tmp_path):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    from dmm_ray.export import bake, export_pipeline, provenance, read_metadata, write_config_folder
    from dmm_ray.teachers import TeacherSpec, teacher_checksum

    pipe = merged[arch]
    folder = save_merged(pipe, tmp_path / "merged", teachers_root=tmp_path / "teachers", mlflow={"run_id": "abc123", "tracking_uri": "x"})
    plain = bake(pipe, style_weights=MIXTURE)
    meta = provenance(pipe, str(folder), style_weights=MIXTURE, model_dir=folder)
    path = export_pipeline(plain, tmp_path / "mix.safetensors", fmt="single_file", metadata=meta)
    config = write_config_folder(plain, tmp_path / "mix.config")
    assert not list(config.rglob("*.safetensors"))  # configs only

    cls = StableDiffusionXLPipeline if arch == "sdxl" else StableDiffusionPipeline
    extra = {} if arch == "sdxl" else {"safety_checker": None}
    loaded = cls.from_single_file(str(path), config=str(config), local_files_only=True, **extra)
    for name in ["unet", "vae", "text_encoder"] + (["text_encoder_2"] if arch == "sdxl" else []):
        want, got = getattr(plain, name).state_dict(), getattr(loaded, name).state_dict()
        assert set(want) <= set(got), name
        assert all(torch.equal(want[k], got[k]) for k in want), name
    loaded.set_progress_bar_config(disable=True)
    loaded.scheduler = plain.scheduler
    assert np.abs(gen(loaded, styled=False) - gen(pipe, style_weights=MIXTURE)).max() < 1e-4

    md = read_metadata(path)
    assert md["dmm.merged_model"] == str(folder) and md["dmm.merged_name"] == "tiny-merge"
    assert md["dmm.merge_run_id"] == "abc123"
    assert json.loads(md["dmm.style_weights"]) == MIXTURE and "dmm.style" not in md
    assert json.loads(md["dmm.styles"]) == STYLES
    assert md["dmm.architecture"] == arch and md["dmm.version"] == __import__("dmm_ray").__version__
    assert len(md["dmm.merged_unet_fingerprint"]) == 16
    teachers = json.loads(md["dmm.teachers"])
    assert [t["name"] for t in teachers] == STYLES
    record = json.loads((folder / "dmm_merge.json").read_text())["teachers"]
    assert [t["checksum"] for t in teachers] == [teacher_checksum(TeacherSpec.model_validate(t)) for t in record]
    assert len(set(t["checksum"] for t in teachers)) == 3


def test_provenance_records_a_mixture_given_as_style_as_a_mixture(merged):
    """`style=` takes a mixture too (a dict, or one weight per style), and bake folds that mixture; the
    provenance recorded `dmm.style` = its largest style, as if one style had been baked."""
    from dmm_ray.export import provenance

    pipe = merged["sd15"]
    for selection in (MIXTURE, [0.25, 0.75, 0.0]):
        meta = provenance(pipe, "m", style=selection)
        assert "dmm.style" not in meta and json.loads(meta["dmm.style_weights"]) == MIXTURE, selection
    assert provenance(pipe, "m", style={"neon": 2})["dmm.style"] == "neon"  # one style, however given
    assert provenance(pipe, "m", style=1)["dmm.style"] == "neon"


def test_fp16_export_and_diffusers_folder(merged, tmp_path):
    from diffusers import StableDiffusionPipeline

    from dmm_ray.export import EXPORT_RECORD, bake, export_pipeline, read_metadata

    plain = bake(merged["sd15"], style="neon")
    out = export_pipeline(plain, tmp_path / "neon", fmt="diffusers", metadata={"dmm.style": "neon"})
    assert read_metadata(out)["dmm.style"] == "neon" and json.loads((out / EXPORT_RECORD).read_text())["dmm.style"] == "neon"
    loaded = StableDiffusionPipeline.from_pretrained(out, local_files_only=True)
    assert all(torch.equal(v, loaded.unet.state_dict()[k]) for k, v in plain.unet.state_dict().items())
    full = export_pipeline(plain, tmp_path / "neon32.safetensors")
    half = export_pipeline(plain, tmp_path / "neon16.safetensors", dtype="fp16")
    assert plain.unet.dtype == plain.vae.dtype == torch.float32  # the caller's modules are not cast in place
    from safetensors import safe_open

    with safe_open(str(half), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}
        assert f.metadata()["dmm.dtype"] == "fp16"
    assert 0.45 < half.stat().st_size / full.stat().st_size < 0.55


@pytest.mark.parametrize("fmt", ["single_file", "diffusers"])
@pytest.mark.parametrize("unet_dtype,other_dtype,dtype", [(torch.float32, torch.float16, "fp32"), (torch.float16, torch.float32, "fp16")])
def test_every_module_is_written_in_the_asked_dtype_not_only_the_unet(tmp_path, fmt, unet_dtype, other_dtype, dtype):
    """export_pipeline cast the modules only when the UNet's dtype differed from the asked one: a VAE and text
    encoder in another dtype (an fp16 VAE swapped in, `pipe.unet.half()` alone) were written as they were, under a
    `dmm.dtype` naming the asked one (an "fp16" file with float32 VAE and text encoder, or the reverse)."""
    from safetensors import safe_open

    from dmm_ray.export import bake, export_pipeline, read_metadata

    pipe = tiny_merged("sd15")
    pipe.unet.to(unet_dtype)
    pipe.vae.to(other_dtype)
    pipe.text_encoder.to(other_dtype)
    plain = bake(pipe, style="neon")
    out = export_pipeline(plain, tmp_path / ("neon.safetensors" if fmt == "single_file" else "neon"), fmt=fmt, dtype=dtype)
    assert read_metadata(out)["dmm.dtype"] == dtype
    want = {"fp32": "F32", "fp16": "F16"}[dtype]
    files = [out] if out.is_file() else [p for p in out.rglob("*.safetensors")]
    written = {}
    for file in files:
        with safe_open(str(file), "pt") as f:
            written[file.name if out.is_file() else file.parent.name] = {f.get_slice(k).get_dtype() for k in f.keys()} - {"I64"}
    assert written and all(kinds == {want} for kinds in written.values()), written
    assert plain.vae.dtype == plain.text_encoder.dtype == other_dtype and plain.unet.dtype == unet_dtype  # the caller's modules not cast


def test_an_export_killed_between_its_two_renames_is_undone_by_the_next(merged, tmp_path, monkeypatch):
    """Finding: a diffusers export killed (SIGKILL) between swap_in's two renames left the previous
    export only as `.<out>.export-<pid>.old`; the next export, under another pid, neither put it back
    nor removed it, so a failed next export left no export at `out` and the parked copies stayed forever."""
    import os
    import subprocess
    import sys
    import time

    import dmm_ray.export
    from dmm_ray.export import bake, export_pipeline, read_metadata

    plain = bake(merged["sd15"], style="neon")
    out = export_pipeline(plain, tmp_path / "neon", fmt="diffusers", metadata={"dmm.style": "neon"})
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True).stdout.strip()
    parked = tmp_path / f".neon.export-{dead}.old"  # what the kill leaves: the previous export parked, the new one staged
    os.replace(out, parked)
    shutil.copytree(parked, tmp_path / f".neon.export-{dead}.tmp")
    for left in (parked, tmp_path / f".neon.export-{dead}.tmp"):
        os.utime(left, (time.time() - 3600,) * 2)  # written before this process started, as a killed run's are
    running = tmp_path / f".neon.export-{os.getppid()}.tmp"  # an export under way in a running process: left alone
    running.mkdir()

    def no_space(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(dmm_ray.export, "_rewrite_with_metadata", no_space)
    with pytest.raises(OSError, match="No space"):
        export_pipeline(plain, out, fmt="diffusers", metadata={"dmm.style": "ink"})
    assert read_metadata(out)["dmm.style"] == "neon"  # the previous export back, though this one failed
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["neon", running.name])
    monkeypatch.undo()
    export_pipeline(plain, out, fmt="diffusers", metadata={"dmm.style": "ink"})
    assert read_metadata(out)["dmm.style"] == "ink" and running.is_dir()


def test_export_job_end_to_end_logs_to_the_merge_run(tmp_path, capsys):
    """jobs/export.py: bake, write, verify, and log the export under the merge's MLflow run."""
    import mlflow
    from mlflow import MlflowClient

    from jobs import export as job

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    exp = client.create_experiment("dmm-ray", artifact_location=str(tmp_path / "artifacts"))
    run = client.create_run(exp, run_name="merge")
    folder = save_merged(
        tiny_merged("sd15"), tmp_path / "merged", teachers_root=tmp_path / "teachers", mlflow={"run_id": run.info.run_id, "tracking_uri": uri}
    )
    out = tmp_path / "ink.safetensors"
    assert job.main(["--model", str(folder), "--style", "ink", "--out", str(out), "--verify"]) == 0
    printed = capsys.readouterr().out
    assert "verify: max relative difference to the merged model: unet " in printed and "(ok)" in printed
    assert f"logged under run {run.info.run_id}" in printed
    assert out.is_file() and (tmp_path / "ink.config" / "model_index.json").is_file()
    arts = {a.path for a in client.list_artifacts(run.info.run_id, "exports")}
    assert {"exports/ink.safetensors", "exports/ink.safetensors.json", "exports/ink.config"} <= arts
    assert client.get_run(run.info.run_id).data.tags["dmm.export.ink.safetensors"] == "ink"
    del mlflow

    # a mixture as a diffusers folder, no tracking
    assert job.main(["--model", str(folder), "--weights", "ink=1,pixel=3", "--out", str(tmp_path / "mix"), "--no-track"]) == 0
    from dmm_ray.export import read_metadata

    assert json.loads(read_metadata(tmp_path / "mix")["dmm.style_weights"]) == {"ink": 0.25, "pixel": 0.75}
    # bad input: a clear error and exit code 2, nothing written
    assert job.main(["--model", str(folder), "--style", "nope", "--out", str(tmp_path / "x.safetensors"), "--no-track"]) == 2
    assert "known styles" in capsys.readouterr().err and not (tmp_path / "x.safetensors").exists()
    assert job.main(["--model", str(tmp_path), "--style", "ink", "--out", str(tmp_path / "y.safetensors")]) == 2
    # an export replaces only an earlier export: never the merged model, nor another checkpoint
    before = sorted(p.name for p in folder.rglob("*"))
    assert job.main(["--model", str(folder), "--style", "ink", "--out", str(folder), "--format", "diffusers", "--no-track"]) == 2
    assert "not an earlier dmm-ray export; refusing to replace it" in capsys.readouterr().err
    assert sorted(p.name for p in folder.rglob("*")) == before
    from safetensors.torch import save_file

    save_file({"w": torch.ones(2)}, str(tmp_path / "other.safetensors"))
    assert job.main(["--model", str(folder), "--style", "ink", "--out", str(tmp_path / "other.safetensors"), "--no-track"]) == 2
    assert not (tmp_path / "other.config").exists()  # nothing written beside it either
    assert job.main(["--model", str(folder), "--style", "pixel", "--out", str(out), "--no-track"]) == 0  # an earlier export: replaced
    assert read_metadata(out)["dmm.style"] == "pixel"
    # an output folder that cannot be written: said before anything is loaded, and nothing left behind
    assert job.main(["--model", str(folder), "--style", "ink", "--out", str(out / "z.safetensors"), "--no-track"]) == 2
    assert "--out's folder " + str(out) + " is a file, not a folder" in capsys.readouterr().err


def test_export_of_a_registered_model_logs_to_the_run_that_registered_it(tmp_path, capsys, monkeypatch):
    """--model models:/name/version: the folder comes from the registry, the export goes to its run."""
    from mlflow import MlflowClient

    from dmm_ray import tracking
    from dmm_ray.export import read_metadata
    from dmm_ray.tracking import MergeTracker, TrackingConfig
    from jobs import export as job

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tracker = MergeTracker(TrackingConfig(tracking_uri=uri, artifact_location=str(tmp_path / "artifacts"), project="tiny"))
    folder = save_merged(tiny_merged("sd15"), tmp_path / "merged", teachers_root=tmp_path / "teachers")
    with tracker.project(), tracker.stage("merge") as run:
        model_uri = tracker.log_merged_model(folder, registered_name="tiny-merged")
        run_id = run.info.run_id
    assert model_uri == "models:/tiny-merged/1"
    out = tmp_path / "pixel.safetensors"
    downloads = []
    real = tracking.resolve_model_uri
    monkeypatch.setattr(tracking, "resolve_model_uri", lambda *a, **kw: downloads.append(real(*a, **kw)) or downloads[-1])
    assert job.main(["--model", model_uri, "--style", "pixel", "--out", str(out), "--tracking-uri", uri]) == 0
    assert len(downloads) == 1 and not downloads[0].exists()  # the registry's copy is gone once the export is written
    assert f"logged under run {run_id}" in capsys.readouterr().out
    md = read_metadata(out)
    assert md["dmm.merged_model"] == model_uri and md["dmm.merge_run_id"] == run_id and md["dmm.style"] == "pixel"
    assert [t["name"] for t in json.loads(md["dmm.teachers"])] == STYLES  # dmm_merge.json travelled with the model
    assert "exports/pixel.safetensors" in {a.path for a in MlflowClient(uri).list_artifacts(run_id, "exports")}
    # MLflow's other forms of the same version: an alias and /latest (were "version must be an integer")
    MlflowClient(uri).set_registered_model_alias("tiny-merged", "champion", "1")
    for other in ("models:/tiny-merged@champion", "models:/tiny-merged/latest"):
        assert job.main(["--model", other, "--style", "ink", "--out", str(tmp_path / "ink.safetensors"), "--tracking-uri", uri]) == 0
        assert f"logged under run {run_id}" in capsys.readouterr().out


def test_export_of_a_merged_model_on_object_storage(tmp_path, capsys, monkeypatch):
    """Serve reads its model from object storage (s3://, gs://, file://), and the playground's export command
    names that URI as --model: the job refused it ("is not a merged-model folder"), so the printed command did
    not run. The folder is downloaded for the job (and removed after), its dmm_merge.json's run gets the export."""
    from dmm_ray.data import fs as fsu
    from dmm_ray.export import read_metadata
    from jobs import export as job

    uri, run_id = mlflow_store(tmp_path)
    folder = save_merged(
        tiny_merged("sd15"), tmp_path / "merged", teachers_root=tmp_path / "teachers", mlflow={"run_id": run_id, "tracking_uri": uri}
    )
    downloads = []
    real = fsu.fetched.__enter__
    monkeypatch.setattr(fsu.fetched, "__enter__", lambda self: downloads.append(real(self)) or downloads[-1])
    model = f"file://{folder}"
    out = tmp_path / "mix.safetensors"
    assert job.main(["--model", model, "--weights", "ink=1,pixel=3", "--out", str(out)]) == 0
    assert f"logged under run {run_id}" in capsys.readouterr().out
    assert len(downloads) == 1 and downloads[0] != folder and not downloads[0].exists()  # a copy, gone after the export
    md = read_metadata(out)
    assert (
        md["dmm.merged_model"] == model and md["dmm.merge_run_id"] == run_id and json.loads(md["dmm.style_weights"]) == {"ink": 0.25, "pixel": 0.75}
    )
    assert job.main(["--model", f"file://{tmp_path}/nothing", "--style", "ink", "--out", str(tmp_path / "x.safetensors"), "--no-track"]) == 2
    assert f"cannot read --model file://{tmp_path}/nothing" in capsys.readouterr().err and not (tmp_path / "x.safetensors").exists()


def test_export_help_documents_every_flag():
    from jobs import export as job

    parser = job.build_parser()
    text = parser.format_help()
    for action in parser._actions:
        for flag in action.option_strings:
            assert flag in text
        assert action.help, action.option_strings
    for flag in (
        "--model",
        "--style",
        "--weights",
        "--out",
        "--format",
        "--dtype",
        "--config-dir",
        "--verify",
        "--run-id",
        "--tracking-uri",
        "--no-track",
        "--device",
    ):
        assert flag in text


def test_export_metadata_keeps_non_ascii_style_names_readable(tmp_path, monkeypatch):
    """A mixture of styles named 'café' and 'nöir': dmm.style_weights (printed by jobs/export.py as
    "exported mixture ...", and the MLflow tag's value) and dmm.styles read {"caf\\u00e9": ...}, while one
    style's dmm.style read 'café'. The JSON keeps the names as written, and the safetensors header holds them."""
    import export_helpers
    from safetensors.torch import save_file

    from dmm_ray.export import provenance, read_metadata

    monkeypatch.setattr(export_helpers, "STYLES", ["café", "nöir", "pixel"])
    pipe = tiny_merged("sd15")
    meta = provenance(pipe, "m", style_weights={"café": 1, "nöir": 3})
    assert meta["dmm.style_weights"] == '{"café": 0.25, "nöir": 0.75}' and meta["dmm.styles"] == '["café", "nöir", "pixel"]'
    assert "\\u" not in "".join(meta.values())
    save_file({"x": torch.zeros(1)}, str(tmp_path / "m.safetensors"), metadata=meta)
    assert read_metadata(tmp_path / "m.safetensors") == meta


def test_export_command_round_trips_through_the_parser():
    import shlex

    from dmm_ray.export import export_command
    from dmm_ray.styles import parse_weights
    from jobs import export as job

    cmd = export_command("/m/merged dir", style_weights={"ink": 0.25, "neon": 0.75, "pixel": 0})
    argv = shlex.split(cmd)
    assert argv[:2] == ["python", "jobs/export.py"]
    args = job.build_parser().parse_args(argv[2:])
    assert args.model == "/m/merged dir" and parse_weights(args.weights) == {"ink": 0.25, "neon": 0.75}
    assert args.out == "ink-neon.safetensors" and args.format == "single_file"
    args = job.build_parser().parse_args(shlex.split(export_command("m", style="neon"))[2:])
    assert args.style == "neon" and args.out == "neon.safetensors"


def test_export_command_gives_a_mixture_of_names_with_outer_spaces_by_index():
    """--weights pairs are read with the spaces around each name stripped: a mixture naming a style ' neon'
    gave 'ink=0.3, neon=0.7', which the job refused (unknown style 'neon'); such names go by index."""
    import shlex

    from dmm_ray.export import check_selection, export_command
    from dmm_ray.styles import parse_weights, style_weights
    from jobs import export as job

    names = ["ink", " neon", "pixel "]
    cmd = export_command("m", style_weights={"ink": 0.25, " neon": 0.5, "pixel ": 0.25}, names=names)
    weights = parse_weights(job.build_parser().parse_args(shlex.split(cmd, comments=True)[2:]).weights)  # the shell drops the "# by index" comment
    check_selection(names, None, weights)
    assert style_weights(names, weights) == [0.25, 0.5, 0.25]
    assert job.build_parser().parse_args(shlex.split(export_command("m", style=" neon", names=names))[2:]).style == " neon"


def test_an_export_named_with_characters_mlflow_refuses_in_tags_is_logged(tmp_path, capsys):
    """--out ink+neon.safetensors: the export was written and its artifacts logged, then MLflow refused the
    run tag dmm.export.ink+neon.safetensors ('+' in a key) and the job said 'not logged', exit 3."""
    from mlflow import MlflowClient

    from jobs import export as job

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    run = client.create_run(client.create_experiment("dmm-ray", artifact_location=str(tmp_path / "artifacts")), run_name="merge").info.run_id
    folder = save_merged(tiny_merged("sd15"), tmp_path / "merged", mlflow={"run_id": run, "tracking_uri": uri})
    assert job.main(["--model", str(folder), "--weights", "ink=1,neon=1", "--out", str(tmp_path / "ink+neon (v2).safetensors")]) == 0
    assert f"logged under run {run}" in capsys.readouterr().out
    assert "exports/ink+neon (v2).safetensors" in {a.path for a in client.list_artifacts(run, "exports")}
    assert json.loads(client.get_run(run).data.tags["dmm.export.ink_neon _v2_.safetensors"]) == {"ink": 0.5, "neon": 0.5}


# ---- jobs/export.py: bad input is refused before anything is loaded or written ------------------
@pytest.fixture(scope="module")
def merged_dir(tmp_path_factory):
    """A saved tiny SD1.5 merged model (no MLflow record) for the job tests; never written to."""
    root = tmp_path_factory.mktemp("job")
    return save_merged(tiny_merged("sd15"), root / "merged", teachers_root=root / "teachers")


@pytest.fixture
def no_loading(monkeypatch):
    """The job must refuse before it loads the merged model: loading it fails the test."""
    import dmm_ray.pipeline

    def refuse(*args, **kwargs):
        raise AssertionError("the merged model was loaded before the input was checked")

    monkeypatch.setattr(dmm_ray.pipeline, "load_dmm_pipeline", refuse)


def run_job(*argv) -> int:
    from jobs import export as job

    return job.main([str(a) for a in argv])


def test_the_config_folder_is_written_only_where_nothing_is(merged_dir, tmp_path, capsys, no_loading):
    """Finding: --config-dir (default <out>.config) overwrote a user's folder; a file there gave Errno 17."""
    userdir = tmp_path / "userdir"
    (userdir / "unet").mkdir(parents=True)
    (userdir / "model_index.json").write_text('{"mine": 1}')
    (userdir / "unet" / "config.json").write_text('{"mine": 2}')
    (tmp_path / "new2.config").mkdir()
    (tmp_path / "new2.config" / "notes.txt").write_text("my notes")
    (tmp_path / "new.config").write_text("a file")
    (tmp_path / "cfgfile").write_text("a file")
    before = tree(tmp_path)
    model = ["--model", merged_dir, "--style", "ink", "--no-track"]

    assert run_job(*model, "--out", tmp_path / "y.safetensors", "--config-dir", userdir) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --config-dir {userdir} exists and is not an earlier export's config folder") and "--config-dir none" in err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert run_job(*model, "--out", tmp_path / "new2.safetensors") == 2  # the default, beside --out
    err = capsys.readouterr().err
    assert f"the config folder {tmp_path / 'new2.config'} exists" in err and "--config-dir DIR" in err and "--config-dir none" in err
    assert run_job(*model, "--out", tmp_path / "new.safetensors") == 2
    assert f"the config folder {tmp_path / 'new.config'} is a file" in capsys.readouterr().err
    assert run_job(*model, "--out", tmp_path / "z.safetensors", "--config-dir", tmp_path / "cfgfile") == 2
    assert f"--config-dir {tmp_path / 'cfgfile'} is a file" in capsys.readouterr().err
    for config in (tmp_path / "z.safetensors", tmp_path):  # --out itself, or a folder holding it
        assert run_job(*model, "--out", tmp_path / "z.safetensors", "--config-dir", config) == 2
        assert "overlap" in capsys.readouterr().err
    assert tree(tmp_path) == before  # nothing written, nothing changed


def test_an_sdxl_export_with_equally_wide_text_encoders_prints_a_loader_that_reads_it_right(tmp_path, capsys):
    """diffusers picks SDXL's second text encoder's converter by width: with both encoders 32 wide the
    printed `from_single_file(path, config=...)` alone read the first encoder into text_encoder_2 and
    left its projection on the meta device. The printed loader passes the second encoder too."""
    from diffusers import StableDiffusionXLPipeline

    import dmm_ray

    pipe = tiny_merged("sdxl", text_hidden_2=32)
    folder = save_merged(pipe, tmp_path / "merged")
    assert run_job("--model", folder, "--style", "ink", "--out", tmp_path / "x.safetensors", "--no-track", "--verify") == 0
    loader = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("load it with: "))
    assert "text_encoder_2=" in loader
    loaded = eval(loader.removeprefix("load it with: "), {"StableDiffusionXLPipeline": StableDiffusionXLPipeline, "dmm_ray": dmm_ray})
    for name in ("text_encoder", "text_encoder_2"):
        want, got = getattr(pipe, name).state_dict(), getattr(loaded, name).state_dict()
        assert set(want) == set(got) and all(torch.equal(want[k], got[k]) for k in want), name
    # ... and as a user runs it, in a fresh interpreter after `import dmm_ray` (here dmm_ray.formats was already
    # imported by the export): `dmm_ray.formats` was no attribute there (AttributeError: formats)
    import subprocess
    import sys

    script = (
        f"import dmm_ray\nfrom diffusers import StableDiffusionXLPipeline\npipe = {loader.removeprefix('load it with: ')}\nprint(type(pipe).__name__)"
    )
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert run.returncode == 0 and run.stdout.split()[-1] == "StableDiffusionXLPipeline", run.stderr[-2000:]


def test_verify_checks_every_component_not_only_the_unet(tmp_path, capsys, monkeypatch):
    """Finding: --verify compared only the UNet: an export whose VAE or text encoder weights, scheduler
    config or tokenizer differ from the merged model's verified "ok". Each is now compared (weights to
    the same tolerance, configs and token ids exactly), and a difference names its component, exit 1."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    import dmm_ray.export

    folder = save_merged(tiny_merged("sd15"), tmp_path / "merged")
    write, stage = dmm_ray.export.export_pipeline, dmm_ray.export.staged_config_folder

    def weights_changed(prefix):  # the export written as the job writes it, then one weight of `prefix` changed on disk
        def export_pipeline(pipe, out, **kwargs):
            path = write(pipe, out, **kwargs)
            with safe_open(str(path), "pt") as f:
                meta, state = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
            key = next(k for k in state if k.startswith(prefix) and k.endswith(".weight"))
            save_file({**state, key: state[key] * 3}, str(path), metadata=meta)
            return path

        return "export_pipeline", export_pipeline

    def configs_changed(change):  # the config folder written from a copy of the export with `change` made
        def staged_config_folder(pipe, *args, **kwargs):
            pipe = copy.deepcopy(pipe)  # the job's shares its modules with the merged model it verifies against
            change(pipe)
            return stage(pipe, *args, **kwargs)

        return "staged_config_folder", staged_config_folder

    for what, (name, replacement) in [
        ("vae", weights_changed("first_stage_model.decoder.")),
        ("text_encoder", weights_changed("cond_stage_model.transformer.")),
        ("scheduler", configs_changed(lambda pipe: pipe.scheduler.register_to_config(beta_end=0.02))),
        ("tokenizer", configs_changed(lambda pipe: pipe.tokenizer.add_tokens(["circle"]))),
    ]:
        monkeypatch.setattr(dmm_ray.export, name, replacement)
        assert run_job("--model", folder, "--style", "ink", "--out", tmp_path / f"{what}.safetensors", "--no-track", "--verify") == 1, what
        printed = capsys.readouterr().out
        assert f"(TOO LARGE: {what})" in printed and "unet " in printed, (what, printed)
        monkeypatch.undo()
    assert run_job("--model", folder, "--style", "ink", "--out", tmp_path / "ok", "--no-track", "--verify") == 0  # a diffusers folder
    assert "vae 0.00e+00, text_encoder 0.00e+00, scheduler 0.00e+00, tokenizer 0.00e+00 (ok)" in capsys.readouterr().out


def test_an_earlier_exports_config_folder_is_replaced_and_a_failed_export_changes_nothing(merged_dir, tmp_path, capsys, monkeypatch):
    from dmm_ray.export import CONFIG_RECORD, is_export_config, read_metadata
    from dmm_ray.formats import single_file

    out, config = tmp_path / "a.safetensors", tmp_path / "a.config"
    model = ["--model", merged_dir, "--no-track"]
    assert run_job(*model, "--style", "ink", "--out", out, "--verify") == 0  # from_single_file reads the marked folder
    assert "(ok)" in capsys.readouterr().out
    assert is_export_config(config) and json.loads((config / CONFIG_RECORD).read_text())["export"] == "a.safetensors"
    (config / "stray.json").write_text("{}")
    assert run_job(*model, "--style", "pixel", "--out", out) == 0  # the earlier export's folder: replaced as a whole
    assert not (config / "stray.json").exists() and (config / "unet" / "config.json").is_file()
    assert run_job(*model, "--style", "neon", "--out", tmp_path / "b.safetensors", "--config-dir", config) == 0
    assert json.loads((config / CONFIG_RECORD).read_text())["export"] == "b.safetensors"
    assert run_job(*model, "--style", "neon", "--out", tmp_path / "d", "--format", "diffusers") == 0
    capsys.readouterr()

    # a write that fails, or is interrupted, part-way: no partial file, the earlier export and
    # config folder as they were, a new config folder never created
    def partial_then(error):
        def save_file(state, path, metadata=None):
            Path(path).write_bytes(b"half")
            raise error

        return save_file

    before = tree(tmp_path)
    monkeypatch.setattr(single_file, "save_file", partial_then(OSError(28, "No space left on device")))
    assert run_job(*model, "--style", "ink", "--out", out) == 2
    assert "No space left on device" in capsys.readouterr().err
    assert run_job(*model, "--style", "ink", "--out", tmp_path / "c.safetensors") == 2
    capsys.readouterr()
    monkeypatch.setattr(single_file, "save_file", partial_then(KeyboardInterrupt()))
    assert run_job(*model, "--style", "ink", "--out", out) == 130
    assert capsys.readouterr().err.strip().startswith("interrupted: nothing half-written was left")
    assert run_job(*model, "--style", "ink", "--out", tmp_path / "c.safetensors", "--config-dir", tmp_path / "new" / "c.config") == 130
    monkeypatch.undo()
    import dmm_ray.export

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(dmm_ray.export, "_rewrite_with_metadata", interrupted)  # the diffusers folder is written, then this
    assert run_job(*model, "--style", "ink", "--out", tmp_path / "d", "--format", "diffusers") == 130
    assert tree(tmp_path) == before and read_metadata(out)["dmm.style"] == "pixel" and read_metadata(tmp_path / "d")["dmm.style"] == "neon"


def test_config_dir_with_a_diffusers_export_is_a_usage_error(merged_dir, tmp_path, capsys, no_loading):
    """Finding: --config-dir with a diffusers export (--format diffusers, or an --out without
    .safetensors) was silently ignored; it is refused when the arguments are parsed (exit 2)."""
    message = (
        "--config-dir applies to --format single_file only (a diffusers folder carries its own configs); "
        "drop it or use --format single_file with an --out ending in .safetensors"
    )
    model = ["--model", merged_dir, "--style", "ink", "--no-track", "--config-dir", tmp_path / "c.config"]
    for out in (["--out", tmp_path / "d"], ["--out", tmp_path / "d.safetensors", "--format", "diffusers"]):
        with pytest.raises(SystemExit) as exited:
            run_job(*model, *out)
        assert exited.value.code == 2, out
        assert message in capsys.readouterr().err, out
    assert list(tmp_path.iterdir()) == []
    # `--config-dir none` (skip it) still goes with a diffusers export: past every check, up to loading
    with pytest.raises(AssertionError, match="loaded before the input was checked"):
        run_job("--model", merged_dir, "--style", "ink", "--no-track", "--out", tmp_path / "d", "--config-dir", "none")


def test_a_diffusers_export_to_a_checkpoint_file_name_is_a_usage_error(merged_dir, tmp_path, capsys, no_loading):
    """--format diffusers (or the default, with an --out not ending in .safetensors) writes a folder:
    one named x.safetensors or x.ckpt is refused at parse time; the reverse, a single-file export
    over an existing folder, is refused before loading too."""
    model = ["--model", merged_dir, "--style", "ink", "--no-track"]
    for out in (["--out", tmp_path / "x.safetensors", "--format", "diffusers"], ["--out", tmp_path / "x.ckpt"]):
        with pytest.raises(SystemExit) as exited:
            run_job(*model, *out)
        assert exited.value.code == 2, out
        assert "names a checkpoint file, but a diffusers export" in capsys.readouterr().err, out
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "y.safetensors").mkdir()
    assert run_job(*model, "--out", tmp_path / "y.safetensors") == 2
    assert "y.safetensors is a folder; a single-file export needs a file path" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["y.safetensors"]
    # the suffix in capitals is still a single file, by default and with --format single_file (both were
    # refused, with advice that contradicted each other): past every check, up to loading
    for fmt in ([], ["--format", "single_file"]):
        with pytest.raises(AssertionError, match="loaded before the input was checked"):
            run_job(*model, "--out", tmp_path / "Noir.SAFETENSORS", "--config-dir", "none", *fmt)


def test_an_out_or_config_dir_uri_is_a_usage_error_not_a_local_folder_named_after_its_scheme(merged_dir, tmp_path, capsys, no_loading, monkeypatch):
    """Finding: jobs/export.py --out s3://bucket/noir.safetensors (or file://..., or --config-dir s3://...) wrote the
    export into a local folder named `s3:` (`file:`) in the current directory and said it exported there; a URI
    that lost a slash (s3:/bucket/x) too. Each is refused when the arguments are parsed (exit 2), naming the option."""
    monkeypatch.chdir(tmp_path)
    model = ["--model", merged_dir, "--style", "ink", "--no-track"]
    for argv, message in (
        (["--out", (tmp_path / "remote" / "noir.safetensors").as_uri()], "--out 'file://.*' is a URI, but --out must be a local path"),
        (["--out", "s3://bucket/noir"], "--out 's3://bucket/noir' is a URI, but --out must be a local path"),
        (["--out", "s3:/bucket/noir.safetensors"], "looks like a URI that lost a slash"),
        (
            ["--out", "noir.safetensors", "--config-dir", "s3://bucket/noir.config"],
            "--config-dir 's3://bucket/noir.config' is a URI, but --config-dir must be a local folder",
        ),
    ):
        with pytest.raises(SystemExit) as exited:
            run_job(*model, *argv)
        assert exited.value.code == 2, argv
        assert re.search(message, capsys.readouterr().err), argv
    assert list(tmp_path.iterdir()) == []


def test_parse_weights_refuses_duplicates_and_empty_entries():
    from dmm_ray.styles import StyleError, parse_weights

    assert parse_weights(" ink = 1 , neon=0.5 ") == {"ink": 1.0, "neon": 0.5}
    assert parse_weights("0=1,neon=3") == {"0": 1.0, "neon": 3.0}
    for text, message in [
        ("noir=0.2,neon=0.5,noir=0.8", "names 'noir' twice"),
        ("noir=0.5,,neon=0.5", "empty entry"),
        ("noir=0.5,", "empty entry"),
        (",noir=0.5", "empty entry"),
        ("=0.5", "no style name"),
        ("", "is empty"),
        (" , ", "empty entry"),
        ("noir", "name=weight pairs"),
        ("noir=x", "not a number"),
    ]:
        with pytest.raises(StyleError, match=message):
            parse_weights(text)


def test_styles_and_weights_are_checked_before_loading(merged_dir, tmp_path, capsys, no_loading):
    out = tmp_path / "x.safetensors"
    for selection, message in [
        (["--style", "nope"], "unknown style 'nope'; known styles: 0:ink"),
        (["--style", "7"], "style index 7 is out of range"),
        (["--weights", "ink=1,nope=1"], "unknown style 'nope'"),
        (["--weights", "ink=-1,neon=2"], ">= 0"),
        (["--weights", "ink=0,neon=0"], "all zero"),
        (["--weights", "ink=0.2,neon=0.5,ink=0.8"], "names 'ink' twice"),
        (["--weights", "ink=0.5,,neon=0.5"], "empty entry"),
        (["--weights", "ink=0.5,0=0.5"], "gives style 'ink' twice (ink= and 0=: a name and its index)"),
    ]:
        assert run_job("--model", merged_dir, *selection, "--out", out, "--no-track") == 2, selection
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1, (selection, err)
    assert list(tmp_path.iterdir()) == []


def test_a_model_path_that_does_not_exist_is_named(tmp_path, capsys, no_loading):
    assert run_job("--model", tmp_path / "nonexist", "--style", "ink", "--out", tmp_path / "x.safetensors") == 2
    err = capsys.readouterr().err
    assert f"error: --model {tmp_path / 'nonexist'} does not exist" in err and "unet/config.json" not in err
    (tmp_path / "file").write_text("x")
    assert run_job("--model", tmp_path / "file", "--style", "ink", "--out", tmp_path / "x.safetensors") == 2
    assert f"error: --model {tmp_path / 'file'} is a file, not a folder" in capsys.readouterr().err


def test_the_tracking_store_and_run_are_checked_before_loading(merged_dir, tmp_path, capsys, no_loading):
    """Finding: --run-id deadbeef or a bad --tracking-uri wrote the export, then exited 3."""
    import shutil

    from mlflow import MlflowClient

    uri, run_id = mlflow_store(tmp_path / "store")
    gone = MlflowClient(uri).create_run(MlflowClient(uri).get_run(run_id).info.experiment_id).info.run_id
    MlflowClient(uri).delete_run(gone)
    recorded = shutil.copytree(merged_dir, tmp_path / "recorded")  # a merge record naming a run the store lacks
    record = json.loads((recorded / "dmm_merge.json").read_text())
    (recorded / "dmm_merge.json").write_text(json.dumps({**record, "mlflow": {"run_id": "0123abcd", "tracking_uri": uri}}))
    before = tree(tmp_path)
    capsys.readouterr()  # MLflow's notes on creating the store
    out = tmp_path / "x.safetensors"
    missing_db = tmp_path / "none" / "mlflow.db"
    for args, message in [
        (["--run-id", "deadbeef", "--tracking-uri", uri], f"error: --run-id deadbeef is not in the MLflow store {uri} (--tracking-uri)"),
        (["--run-id", gone, "--tracking-uri", uri], f"error: --run-id {gone} is deleted in the MLflow store {uri}"),
        (["--run-id", run_id, "--tracking-uri", f"sqlite:///{missing_db}"], f"its database {missing_db} does not exist"),
        (["--tracking-uri", "/proc/nope"], "error: --tracking-uri '/proc/nope' is a file store"),
        (["--tracking-uri", "banana://x"], "error: --tracking-uri 'banana://x': MLflow cannot open this store"),
    ]:
        assert run_job("--model", merged_dir, "--style", "ink", "--out", out, *args) == 2, args
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1 and "Traceback" not in err, (args, err)
    assert run_job("--model", recorded, "--style", "ink", "--out", out) == 2
    err = capsys.readouterr().err
    assert f"the merge run 0123abcd recorded in {recorded / 'dmm_merge.json'} is not in the MLflow store {uri}" in err and "--no-track" in err
    assert tree(tmp_path) == before and not missing_db.parent.exists()  # nothing written, no database created


def test_run_id_of_another_run_is_where_the_export_is_logged_not_its_merge_run(merged_dir, tmp_path, capsys):
    """Finding: --run-id X was written into the export's metadata as dmm.merge_run_id even when the model
    records another merge run (X: a run of another project). The merge run stays the model's; the run the
    export is logged to is dmm.export_run_id, and the job says that X is not the merge run."""
    from mlflow import MlflowClient

    from dmm_ray.export import read_metadata

    uri, merge_run = mlflow_store(tmp_path / "store")
    client = MlflowClient(uri)
    other = client.create_run(
        client.create_experiment("another-project", artifact_location=str(tmp_path / "other-artifacts")), run_name="unrelated"
    ).info.run_id
    recorded = shutil.copytree(merged_dir, tmp_path / "recorded")
    record = json.loads((recorded / "dmm_merge.json").read_text())
    (recorded / "dmm_merge.json").write_text(json.dumps({**record, "mlflow": {"run_id": merge_run, "tracking_uri": uri}}))
    out = tmp_path / "ink.safetensors"
    capsys.readouterr()
    assert run_job("--model", recorded, "--style", "ink", "--out", out, "--config-dir", "none", "--run-id", other) == 0
    printed = capsys.readouterr().out
    assert f"note: --run-id {other} is not the merge run {merge_run} (recorded in {recorded / 'dmm_merge.json'})" in printed
    meta = read_metadata(out)
    assert (meta["dmm.merge_run_id"], meta["dmm.export_run_id"]) == (merge_run, other)
    assert "exports/ink.safetensors" in {a.path for a in client.list_artifacts(other, "exports")}
    # the merge's own run: no note; a model that records no run: --run-id is only where the export goes
    assert run_job("--model", recorded, "--style", "ink", "--out", out, "--config-dir", "none", "--run-id", merge_run) == 0
    assert "note: --run-id" not in capsys.readouterr().out
    assert (read_metadata(out)["dmm.merge_run_id"], read_metadata(out)["dmm.export_run_id"]) == (merge_run, merge_run)
    assert run_job("--model", merged_dir, "--style", "ink", "--out", out, "--config-dir", "none", "--run-id", other, "--tracking-uri", uri) == 0
    assert (read_metadata(out)["dmm.merge_run_id"], read_metadata(out)["dmm.export_run_id"]) == ("", other)
    assert run_job("--model", recorded, "--style", "ink", "--out", out, "--config-dir", "none", "--no-track") == 0
    assert (read_metadata(out)["dmm.merge_run_id"], read_metadata(out)["dmm.export_run_id"]) == (merge_run, "")


def test_an_http_store_that_does_not_answer_only_warns(merged_dir, tmp_path, capsys, monkeypatch):
    """The check never blocks an export on a server that is down: a warning, the export, exit 3."""
    import os
    import socket

    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", raising=False)
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "x.safetensors"
    assert run_job("--model", merged_dir, "--style", "ink", "--out", out, "--run-id", "abc", "--tracking-uri", f"http://127.0.0.1:{port}") == 3
    err = capsys.readouterr().err
    assert "warning: cannot check --run-id abc in the MLflow store" in err and "warning: export written but not logged" in err
    assert out.is_file() and "MLFLOW_HTTP_REQUEST_MAX_RETRIES" not in os.environ


def test_a_teachers_single_file_and_a_diffusers_exports_weights_are_never_replaced(merged_dir, tmp_path, capsys, no_loading):
    """Finding: `exported_by: dmm-ray` alone made a file replaceable, but the toy zoo's single-file
    teachers carry it, and so does a diffusers export's own UNet weights file: an export to either
    path overwrote it (the diffusers folder then loaded with no UNet weights)."""
    from diffusers import StableDiffusionPipeline

    from dmm_ray.export import is_export
    from dmm_ray.formats.single_file import export_single_file
    from dmm_ray.tiny import tiny_sd_components

    c = tiny_sd_components(seed=0)
    teacher = export_single_file(StableDiffusionPipeline(**c), tmp_path / "faded.safetensors")  # as the zoo writes one
    inner = tmp_path / "earlier" / "unet" / "diffusion_pytorch_model.safetensors"
    inner.parent.mkdir(parents=True)
    inner.write_bytes(teacher.read_bytes())
    (tmp_path / "earlier" / "dmm_export.json").write_text("{}")
    assert not is_export(teacher) and not is_export(inner) and is_export(tmp_path / "earlier")
    for path in (teacher, inner):
        before = path.read_bytes()
        assert run_job("--model", merged_dir, "--style", "ink", "--no-track", "--out", path, "--config-dir", "none") == 2
        assert "is a file that is not an earlier dmm-ray export; refusing to replace it" in capsys.readouterr().err
        assert path.read_bytes() == before


def test_a_device_this_build_cannot_use_is_refused_before_loading(merged_dir, tmp_path, capsys, no_loading):
    """Finding: only CUDA was checked; --device mps / xpu / meta failed after loading, with a traceback."""
    import torch

    bad = ["meta", "mps"] if not torch.backends.mps.is_available() else ["meta"]
    for device in bad:
        assert run_job("--model", merged_dir, "--style", "ink", "--no-track", "--out", tmp_path / "a.safetensors", "--device", device) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: --device {device}: ") and "Traceback" not in err


@pytest.mark.parametrize("fmt", ["single_file", "diffusers"])
def test_an_export_that_fails_verify_does_not_replace_the_earlier_one(tmp_path, capsys, monkeypatch, fmt):
    """Finding: --verify ran after the export was moved into place, so an export that failed it (exit 1)
    had already replaced the earlier good export at --out (and its config folder). It is now written into
    a hidden staging folder beside --out, checked there, and moved into place only once it passed."""
    from safetensors.torch import load_file, save_file

    import dmm_ray.export

    folder = save_merged(tiny_merged("sd15"), tmp_path / "merged")
    out = tmp_path / "exports" / ("ink.safetensors" if fmt == "single_file" else "ink")
    assert run_job("--model", folder, "--style", "ink", "--out", out, "--no-track", "--format", fmt) == 0
    before = tree(out.parent)
    write = dmm_ray.export.export_pipeline

    def export_pipeline(pipe, path, **kwargs):  # the export written as the job writes it, then its UNet changed on disk
        path = write(pipe, path, **kwargs)
        file = path if fmt == "single_file" else next((path / "unet").glob("*.safetensors"))
        state = load_file(str(file))
        key = next(k for k in state if k in ("model.diffusion_model.input_blocks.0.0.weight", "conv_in.weight"))
        save_file({**state, key: state[key] * 3}, str(file), metadata={"format": "pt", **kwargs["metadata"], "dmm.dtype": kwargs["dtype"]})
        return path

    monkeypatch.setattr(dmm_ray.export, "export_pipeline", export_pipeline)
    assert run_job("--model", folder, "--style", "neon", "--out", out, "--no-track", "--format", fmt, "--verify") == 1
    printed = capsys.readouterr()
    assert "TOO LARGE: unet" in printed.out and f"the earlier export at {out} is kept" in printed.err
    assert tree(out.parent) == before  # the export and its config folder as they were, no staging left
    monkeypatch.undo()
    assert run_job("--model", folder, "--style", "neon", "--out", out, "--no-track", "--format", fmt, "--verify") == 0
    assert dmm_ray.export.read_metadata(out if fmt == "single_file" else next((out / "unet").glob("*.safetensors")))["dmm.style"] == "neon"
    assert not list(out.parent.glob(".*verify*"))


def test_verify_without_a_config_folder_and_teachers_that_moved(tmp_path, capsys):
    """Findings: `--config-dir none --verify` loaded the file with the merged folder's configs (a
    StyleUNet: a traceback); a merge record whose teachers (no `format:`) have moved stopped the export
    instead of recording their checksums as unavailable."""
    folder = save_merged(tiny_merged("sd15"), tmp_path / "merged")
    record = json.loads((folder / "dmm_merge.json").read_text())
    record["teachers"] = [
        {"name": "ink", "source": str(tmp_path / "gone" / "ink")},
        {"name": "neon", "source": str(tmp_path / "gone" / "n.safetensors")},
    ]
    (folder / "dmm_merge.json").write_text(json.dumps(record))
    out = tmp_path / "v.safetensors"
    assert run_job("--model", folder, "--style", "neon", "--no-track", "--out", out, "--config-dir", "none", "--verify") == 0
    assert "verify: max relative difference to the merged model: unet " in capsys.readouterr().out and not out.with_suffix(".config").exists()
    from dmm_ray.export import read_metadata

    teachers = json.loads(read_metadata(out)["dmm.teachers"])
    assert [(t["name"], t["format"], t["checksum"]) for t in teachers] == [("ink", "unknown", "unavailable: TeacherError")] + [
        ("neon", "unknown", "unavailable: TeacherError")
    ]


def test_a_single_file_export_takes_an_upper_case_suffix(tiny_components, tmp_path):
    """jobs/export.py (and the teacher loader) read NOISE.SAFETENSORS as a .safetensors file; the writer
    refused that name after the model was loaded and baked ('writes .safetensors, got NOISE.SAFETENSORS')."""
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file

    from dmm_ray.formats.single_file import export_single_file

    pipe = StableDiffusionPipeline(**tiny_components)
    path = export_single_file(pipe, tmp_path / "NOISE.SAFETENSORS")
    written = load_file(str(path))
    assert path.name == "NOISE.SAFETENSORS" and torch.equal(written["model.diffusion_model.out.2.weight"], pipe.unet.conv_out.weight)
    with pytest.raises(ValueError, match=r"writes \.safetensors, got 'noise\.ckpt'"):
        export_single_file(pipe, tmp_path / "noise.ckpt")


@pytest.mark.parametrize("error", [OSError(28, "No space left on device"), KeyboardInterrupt()], ids=["error", "ctrl-c"])
def test_export_single_file_that_fails_part_way_leaves_no_temp_file(tiny_components, tmp_path, monkeypatch, error):
    """export_single_file called directly (README's interop line; the zoo's teachers): a write that failed
    part-way kept the earlier file but left its half-written `<path>.tmp`; only export_pipeline removed it."""
    from diffusers import StableDiffusionPipeline

    from dmm_ray.formats import single_file

    pipe = StableDiffusionPipeline(**tiny_components)
    path = single_file.export_single_file(pipe, tmp_path / "model.safetensors")
    good = path.read_bytes()

    def half(state, filename, metadata=None):
        Path(filename).write_bytes(b"half")
        raise error

    monkeypatch.setattr(single_file, "save_file", half)
    with pytest.raises(type(error)):
        single_file.export_single_file(pipe, path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"] and path.read_bytes() == good


SECOND_EXPORT = """
import sys
from diffusers import StableDiffusionPipeline
from dmm_ray.formats.single_file import export_single_file
from dmm_ray.tiny import tiny_sd_components
export_single_file(StableDiffusionPipeline(**tiny_sd_components(seed=1)), sys.argv[1])
"""


def test_two_single_file_exports_to_one_path_at_once_each_write_their_own_temp_file(tmp_path, monkeypatch):
    """Finding: every export of a path wrote `<path>.tmp`; a second export (another process) to the same path
    while the first was writing wrote and moved that same file, and the first then failed (FileNotFoundError)
    or moved the other's half-written file into place. A killed export's temp file (under a pid that no longer
    runs, written before this process started) is removed by the next export; a running one's is left alone."""
    import os
    import subprocess
    import sys
    import time

    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file

    from dmm_ray.formats import single_file
    from dmm_ray.tiny import tiny_sd_components

    out = tmp_path / "ink.safetensors"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True).stdout.strip()
    killed = tmp_path / f".ink.safetensors.export-{dead}.tmp"
    killed.write_bytes(b"full-size, once")
    os.utime(killed, (time.time() - 3600,) * 2)
    running = tmp_path / f".ink.safetensors.export-{os.getppid()}.tmp"  # an export under way in a running process
    running.write_bytes(b"being written")
    real, env = single_file.save_file, {**os.environ, "PYTHONPATH": str(REPO)}

    def save_file(state, filename, metadata=None):
        real(state, filename, metadata=metadata)  # this export's file written; the other starts and ends now
        subprocess.run([sys.executable, "-c", SECOND_EXPORT, str(out)], check=True, env=env, cwd=tmp_path, capture_output=True)

    monkeypatch.setattr(single_file, "save_file", save_file)
    pipe = StableDiffusionPipeline(**tiny_sd_components(seed=0))
    single_file.export_single_file(pipe, out)  # FileNotFoundError: its `<path>.tmp` was moved into place by the other
    assert torch.equal(load_file(str(out))["model.diffusion_model.out.2.weight"], pipe.unet.conv_out.weight)  # the last one moved in
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([out.name, running.name])


def test_export_job_expands_dmm_home_and_home_in_its_paths(merged_dir, tmp_path, monkeypatch):
    """Finding: --model '$DMM_HOME/outputs/...' (quoted, or after '=') was "does not exist", and a quoted
    `~` in --out made a folder named `~`: `$DMM_HOME` and `~` expand in the job's paths as in every path."""
    (tmp_path / "home").mkdir()
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("DMM_HOME", str(merged_dir.parent))
    assert run_job("--model", f"$DMM_HOME/{merged_dir.name}", "--style", "ink", "--out=~/ink.safetensors", "--config-dir", "~/ink.config") == 0
    assert (tmp_path / "home" / "ink.safetensors").is_file() and (tmp_path / "home" / "ink.config" / "model_index.json").is_file()
