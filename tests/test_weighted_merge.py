"""Weighted-merge baseline: identity on identical models, linearity, weight validation."""

import os

import pytest
import torch
from diffusers import StableDiffusionPipeline

from dmm_ray.baselines.weighted_merge import (
    MergeWeightsError,
    validate_weights,
    weighted_merge_modules,
    weighted_merge_pipelines,
)
from dmm_ray.tiny import tiny_sd_components


def _unet(seed):
    return tiny_sd_components(seed=seed)["unet"]


def test_merge_of_identical_models_is_identity():
    unet = _unet(0)
    merged = weighted_merge_modules([unet, _unet(0), _unet(0)], [0.2, 0.3, 0.5], ["a", "b", "c"])
    assert merged is not unet
    for (k, v), (k2, v2) in zip(unet.state_dict().items(), merged.state_dict().items()):
        assert k == k2
        torch.testing.assert_close(v2, v, rtol=1e-6, atol=1e-7)


def test_merge_is_the_weighted_sum():
    a, b = _unet(0), _unet(1)
    merged = weighted_merge_modules([a, b], [0.25, 0.75], ["a", "b"])
    sa, sb, sm = a.state_dict(), b.state_dict(), merged.state_dict()
    for k in sm:
        torch.testing.assert_close(sm[k], 0.25 * sa[k] + 0.75 * sb[k], rtol=1e-5, atol=1e-6)
    first = weighted_merge_modules([a, b], [1.0, 0.0], ["a", "b"]).state_dict()
    for k in first:
        torch.testing.assert_close(first[k], sa[k], rtol=0, atol=0)


def test_weight_validation_errors_name_the_problem():
    names = ["ink", "neon"]
    assert validate_weights(None, names) == [0.5, 0.5]
    with pytest.raises(MergeWeightsError, match="sum to 1"):
        validate_weights([0.5, 0.6], names)
    with pytest.raises(MergeWeightsError, match="'neon': -0.5"):
        validate_weights([1.5, -0.5], names)
    with pytest.raises(MergeWeightsError, match="got 3 weights for 2 models"):
        validate_weights([0.2, 0.3, 0.5], names)
    with pytest.raises(MergeWeightsError, match="finite"):
        validate_weights([float("nan"), 1.0], names)


def test_different_architectures_are_rejected():
    small = _unet(0)
    big = tiny_sd_components(seed=0, block_out_channels=(32, 32))["unet"]
    with pytest.raises(ValueError, match="'big' has different parameters from 'small'"):
        weighted_merge_modules([small, big], None, ["small", "big"])
    wide = tiny_sd_components(seed=0, cross_attention_dim=64)["unet"]
    with pytest.raises(ValueError, match="has shape .* in 'wide'"):
        weighted_merge_modules([small, wide], None, ["small", "wide"])


def test_merged_pipeline_saves_as_diffusers_folder(tmp_path):
    pipes = [StableDiffusionPipeline(**tiny_sd_components(seed=s)) for s in (0, 1)]
    merged = weighted_merge_pipelines(pipes, [0.5, 0.5], ["a", "b"])
    merged.save_pretrained(tmp_path / "wm")
    loaded = StableDiffusionPipeline.from_pretrained(tmp_path / "wm")
    k = "conv_in.weight"
    expected = 0.5 * pipes[0].unet.state_dict()[k] + 0.5 * pipes[1].unet.state_dict()[k]
    torch.testing.assert_close(loaded.unet.state_dict()[k], expected, rtol=1e-5, atol=1e-6)
    te_key = [k for k in merged.text_encoder.state_dict() if k.endswith("final_layer_norm.weight")][0]
    te_expected = 0.5 * pipes[0].text_encoder.state_dict()[te_key] + 0.5 * pipes[1].text_encoder.state_dict()[te_key]
    torch.testing.assert_close(loaded.text_encoder.state_dict()[te_key], te_expected)


def test_sdxl_teachers_merge_into_an_sdxl_pipeline_that_generates(tmp_path):
    """Finding: SDXL teachers were saved as a StableDiffusionPipeline without text_encoder_2 /
    tokenizer_2: reported as written, then failed to generate."""
    from diffusers import StableDiffusionXLPipeline

    from dmm_ray.architectures import load_plain_pipeline
    from dmm_ray.tiny import tiny_sdxl_components

    pipes = [StableDiffusionXLPipeline(**tiny_sdxl_components(seed=s)) for s in (0, 1)]
    merged = weighted_merge_pipelines(pipes, [0.5, 0.5], ["a", "b"])
    merged.save_pretrained(tmp_path / "wm")
    loaded = load_plain_pipeline(str(tmp_path / "wm"))
    assert isinstance(loaded, StableDiffusionXLPipeline)
    key = [k for k in merged.text_encoder_2.state_dict() if k.endswith("final_layer_norm.weight")][0]
    both = 0.5 * pipes[0].text_encoder_2.state_dict()[key] + 0.5 * pipes[1].text_encoder_2.state_dict()[key]
    torch.testing.assert_close(loaded.text_encoder_2.state_dict()[key], both)
    image = loaded("a red circle", num_inference_steps=2, height=16, width=16, output_type="pt").images
    assert image.shape == (1, 3, 16, 16) and torch.isfinite(image).all()


def test_weighted_merge_job_never_writes_over_another_model(tmp_path, capsys):
    """--out may be new, empty or an earlier weighted merge; a merged model's folder (or any other
    non-empty folder) is refused before a teacher is loaded, and left as it was."""
    from jobs import weighted_merge as job

    other = tmp_path / "merged"
    (other / "unet").mkdir(parents=True)
    (other / "unet" / "config.json").write_text("{}")
    assert job.main(["--teachers", str(tmp_path / "zoo.yaml"), "--out", str(other)]) == 2
    assert "is not an earlier weighted merge (no weighted_merge.json)" in capsys.readouterr().err
    assert sorted(p.name for p in other.rglob("*")) == ["config.json", "unet"]
    (tmp_path / "f").write_text("x")
    assert job.main(["--teachers", str(tmp_path / "zoo.yaml"), "--out", str(tmp_path / "f")]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    from dmm_ray.baselines.weighted_merge import RECORD, check_output

    (tmp_path / "earlier").mkdir()
    (tmp_path / "earlier" / RECORD).write_text("{}")
    check_output(tmp_path / "earlier")  # an earlier weighted merge is replaced; so is an empty or new folder
    check_output(tmp_path / "new")


def test_an_out_uri_is_refused_not_written_to_a_local_folder_named_after_its_scheme(tmp_path, monkeypatch, capsys):
    """Finding: jobs/weighted_merge.py --out s3://bucket/wm (jobs/style_mixing.py --out or --weighted-merge too) passed
    the output checks (check_writable_folder leaves a URI to its store), and the folder was Path(uri): a local folder
    named `s3:` (`file:`) in the current directory. Each is refused, naming the option, before a teacher is read."""
    from dmm_ray.baselines.weighted_merge import check_output
    from jobs import style_mixing
    from jobs import weighted_merge as job

    monkeypatch.chdir(tmp_path)
    uri = (tmp_path / "remote" / "wm").as_uri()
    with pytest.raises(ValueError, match=r"--out 's3://bucket/wm' is a URI, but --out must be a local folder"):
        check_output("s3://bucket/wm", "--out")
    assert job.main(["--teachers", str(tmp_path / "zoo.yaml"), "--out", uri]) == 2
    assert f"--out {uri!r} is a URI, but --out must be a local folder" in capsys.readouterr().err
    for option in ("--out", "--weighted-merge"):
        with pytest.raises(SystemExit) as exited:
            style_mixing.main(["--model", "m", "--teachers", "t.yaml", "--group", "a,b", option, "s3://bucket/x"])
        assert exited.value.code == 2 and f"{option} 's3://bucket/x' is a URI, but {option} must be a local folder" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


# --- the job on disk: tiny teachers in a zoo.yaml ---------------------------------------------------


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """Three tiny diffusers teachers (a, b share seed 0's VAE/text encoder; c is seed 1) and their zoo.yaml."""
    import yaml

    root = tmp_path_factory.mktemp("wmzoo")
    for name, seed in (("a", 0), ("b", 2), ("c", 1)):
        StableDiffusionPipeline(**tiny_sd_components(seed=seed)).save_pretrained(root / name)
    teachers = [{"name": n, "format": "diffusers", "source": str(root / n), "description": "toy"} for n in "abc"]
    (root / "zoo.yaml").write_text(yaml.safe_dump({"base": str(root / "a"), "teachers": teachers}))
    return root / "zoo.yaml"


def _specs(zoo, names):
    from dmm_ray.evaluation.sources import load_eval_setup

    known = {s.name: s for s in load_eval_setup(zoo).teachers}
    return [known[n] for n in names]


def _snapshot(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_weighted_merge_job_refuses_empty_and_repeated_names(zoo, tmp_path, capsys, monkeypatch):
    """--names "" used to merge every teacher, --names a,a to 'merge' a with itself: both exit 2 before any merge."""
    from dmm_ray.baselines import weighted_merge as wm
    from jobs import weighted_merge as job

    monkeypatch.setattr(wm, "weighted_merge_teachers", lambda *a, **k: pytest.fail("merged despite bad --names"))
    for names, message in (("", "--names '' is empty"), (" , ", "--names ' , ' is empty"), ("a,b,a", "--names 'a,b,a' lists ['a'] more than once")):
        assert job.main(["--teachers", str(zoo), "--names", names, "--out", str(tmp_path / "wm")]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {message}; give each teacher once") and "['a', 'b', 'c']" in err and "Traceback" not in err, err
    assert not (tmp_path / "wm").exists()


@pytest.mark.parametrize("weights, empty", [("0.5,,0.2,0.3", "entry 2 of 4"), ("0.5,0.5,", "entry 3 of 3"), (",0.5,0.5", "entry 1 of 3")])
def test_weighted_merge_job_refuses_an_empty_weight(weights, empty, zoo, tmp_path, capsys, monkeypatch):
    """An empty --weights entry was skipped: `--names a,b,c --weights 0.5,,0.2,0.3` merged a 0.5, b 0.2,
    c 0.3 (each later weight moved onto the teacher before it). Now exit 2 naming the entry, before any merge."""
    from dmm_ray.baselines import weighted_merge as wm
    from jobs import weighted_merge as job

    monkeypatch.setattr(wm, "weighted_merge_teachers", lambda *a, **k: pytest.fail("merged despite an empty --weights entry"))
    names = "a,b,c" if weights.count(",") == 3 else "a,b"
    assert job.main(["--teachers", str(zoo), "--names", names, "--weights", weights, "--out", str(tmp_path / "wm")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --weights {weights}: {empty} is empty") and f"one weight per teacher ({names.replace(',', ', ')})" in err, err
    assert not (tmp_path / "wm").exists()


@pytest.mark.parametrize("option", ["--weights", "--out", "--teachers"])
def test_weighted_merge_job_refuses_an_empty_value(option, tmp_path, capsys, monkeypatch):
    """`--weights ""` merged with equal weights and `--out ""` wrote the merge over the current folder
    (an unset shell variable): both are usage errors naming the option, before anything is read."""
    from jobs import weighted_merge as job

    monkeypatch.chdir(tmp_path)
    args = {"--teachers": "zoo.yaml", "--weights": "0.5,0.5", "--out": "wm"} | {option: ""}
    with pytest.raises(SystemExit) as stop:
        job.main([a for pair in args.items() for a in pair])
    assert stop.value.code == 2 and f"error: {option} is empty; give a value or leave the option out" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_failed_save_leaves_the_previous_merge_as_it_was(zoo, tmp_path, monkeypatch):
    """diffusers only logs some save failures (a component it cannot write is skipped): the new merge is
    written beside --out, checked complete, and only then swapped in; a save that fails or leaves a
    component out raises and leaves the previous merge byte for byte, with no leftovers."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from dmm_ray.baselines.weighted_merge import RECORD, MergeSaveError, read_record, weighted_merge_teachers

    out = tmp_path / "wm"
    assert weighted_merge_teachers(_specs(zoo, ["a", "c"]), [0.25, 0.75], out) == out
    before = _snapshot(out)
    assert read_record(out)["teachers"] == ["a", "c"] and "vae/diffusion_pytorch_model.safetensors" in before

    monkeypatch.setattr(AutoencoderKL, "save_pretrained", lambda self, *a, **k: None)  # "logged", not written
    with pytest.raises(MergeSaveError, match=r"saving the weighted merge failed: .*vae.*; .*/wm was left as it was"):
        weighted_merge_teachers(_specs(zoo, ["a", "b"]), None, out)
    assert _snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["wm"]  # the half-written sibling is gone
    monkeypatch.undo()

    def disk_full(self, *a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(UNet2DConditionModel, "save_pretrained", disk_full)
    with pytest.raises(OSError, match="No space left"):
        weighted_merge_teachers(_specs(zoo, ["a", "b"]), None, out)
    assert _snapshot(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["wm"]
    monkeypatch.undo()
    assert (out / RECORD).is_file()


def test_a_second_weighted_merge_on_the_same_folder_refuses_before_loading(zoo, tmp_path, monkeypatch):
    """Two weighted merges into one --out would share the save's hidden siblings (and the first one's
    `recover` would delete the other's half-written model): the second refuses, naming the first, before
    it loads a teacher; the lock goes when a merge ends, so the next one runs."""
    from dmm_ray import output_lock
    from dmm_ray.baselines import weighted_merge as wm

    out = tmp_path / "wm"
    lock = f".wm.{wm.SAVE_TAG}.lock"
    owner = output_lock.acquire(tmp_path, name=lock, job="weighted merge")  # a merge in progress (this live process; its lock names its kind)
    with monkeypatch.context() as m:
        m.setattr("dmm_ray.teachers.load_teacher_pipeline", lambda *a, **k: pytest.fail("loaded a teacher despite the busy folder"))
        with pytest.raises(output_lock.OutputDirBusyError, match=rf"output_dir {out} is in use by another weighted merge \(.*pid {os.getpid()}"):
            wm.weighted_merge_teachers(_specs(zoo, ["a", "b"]), None, out)
    assert not out.exists()
    output_lock.release(tmp_path, owner, name=lock)
    assert wm.weighted_merge_teachers(_specs(zoo, ["a", "b"]), None, out) == out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["wm"]  # the lock is gone with the merge


def test_weighted_merge_job_replaces_a_broken_earlier_merge_whole(zoo, tmp_path, capsys):
    """QA: --out's vae replaced by a file used to be 'saved' with rc 0 and no VAE; now the new merge is a
    fresh folder swapped in. A save interrupted between its two renames is put back first."""
    from dmm_ray.baselines.weighted_merge import RECORD, SAVE_TAG, read_record
    from dmm_ray.merged_model import recover, save_siblings
    from dmm_ray.teachers import check_pipeline_folder
    from jobs import weighted_merge as job

    out = tmp_path / "wm"
    args = ["--teachers", str(zoo), "--names", "a,b", "--out", str(out)]
    assert job.main(args) == 0
    import shutil

    shutil.rmtree(out / "vae")
    (out / "vae").write_text("not a folder")
    assert job.main(args + ["--weights", "0.3,0.7"]) == 0
    check_pipeline_folder(out, "test")  # every component, with its weights
    assert read_record(out)["weights"] == [0.3, 0.7]
    capsys.readouterr()

    tmp, old = save_siblings(out, SAVE_TAG)
    out.rename(old)  # killed between the two renames: no --out, the previous merge parked beside a half-written one
    tmp.mkdir()
    (tmp / "half").write_text("x")
    recover(out, SAVE_TAG, marker=RECORD)
    assert read_record(out)["weights"] == [0.3, 0.7] and not tmp.exists() and not old.exists()
    out.rename(old)
    tmp.mkdir()
    (tmp / "half").write_text("x")
    assert job.main(["--teachers", str(zoo), "--names", "a,c", "--out", str(out)]) == 0
    assert read_record(out)["teachers"] == ["a", "c"] and not tmp.exists() and not old.exists()
    assert not (out / "half").exists()


def test_weighted_merge_job_checks_tracking_settings_before_the_merge(zoo, tmp_path, capsys, monkeypatch):
    """--track with a store MLflow cannot open or a name its registry refuses: exit 2 naming the option,
    before a teacher is loaded (it used to be a traceback after the merge was written)."""
    from dmm_ray.baselines import weighted_merge as wm
    from jobs import weighted_merge as job

    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    monkeypatch.setattr(wm, "weighted_merge_teachers", lambda *a, **k: pytest.fail("merged despite bad tracking settings"))
    base = ["--teachers", str(zoo), "--names", "a,b", "--out", str(tmp_path / "wm"), "--track"]
    cases = [
        (["--tracking-uri", "/proc/nope"], "error: --tracking-uri '/proc/nope' is a file store"),
        (["--tracking-uri", "banana://x"], "error: --tracking-uri 'banana://x': MLflow cannot open this store"),
        (["--tracking-uri", f"sqlite:///{tmp_path}/f/mlflow.db"], "error: the folder of --tracking-uri's database"),
        (["--registered-name", "a/b"], "error: --registered-name: 'a/b' contains '/'"),
        (["--registered-name", "x:1"], "error: --registered-name: 'x:1' contains ':'"),
        (["--registered-name", ""], "error: --registered-name: a registered model name must be a non-empty string"),
        # TrackingConfig refused these only after the merge was written (MLflow's run search cannot find them again)
        (["--project", 'bob\'s "x"'], "error: --project: 'bob\\'s \"x\"' holds both ' and \"; MLflow's run search cannot match"),
        (["--project", "x\\"], "error: --project: 'x\\\\' ends with \\, which MLflow's run search reads as escaping"),
    ]
    (tmp_path / "f").write_text("a file where the database's folder goes")
    import socket

    with socket.socket() as s:  # a port where nothing listens: the tracker was opened after the merge, which it then failed
        s.bind(("127.0.0.1", 0))
        cases.append((["--tracking-uri", f"http://127.0.0.1:{s.getsockname()[1]}"], "error: the MLflow tracking store 'http://127.0.0.1:"))
    for extra, message in cases:
        assert job.main(base + extra) == 2, extra
        err = capsys.readouterr().err
        assert err.startswith(message) and "Traceback" not in err and err.count("\n") == 1, err
    assert not (tmp_path / "wm").exists()


def test_a_tracked_weighted_merges_version_says_what_it_is(zoo, tmp_path, monkeypatch):
    """README: each registered version says what it is on the Models page (a description and dmm.* tags), as a
    merge's does. A weighted merge's version had neither: one mix could not be told from another."""
    from mlflow import MlflowClient

    from jobs import weighted_merge as job

    monkeypatch.chdir(tmp_path)
    store = f"sqlite:///{tmp_path}/mlflow.db"
    args = ["--teachers", str(zoo), "--names", "a,c", "--weights", "0.25,0.75", "--out", str(tmp_path / "wm"), "--track", "--tracking-uri", store]
    assert job.main(args) == 0
    version = MlflowClient(store).get_model_version("dmm-weighted-merge", "1")
    assert version.description == "weighted-merge: 2 teacher(s) (a 0.25, c 0.75)"
    assert version.tags == {"dmm.stage": "weighted-merge", "dmm.styles": "a,c", "dmm.weights": "0.25,0.75", "dmm.merged_path": str(tmp_path / "wm")}


def test_weighted_merge_job_refuses_tracking_options_without_track(tmp_path, capsys):
    """--tracking-uri / --project / --registered-name say where --track logs: without --track they
    were ignored and the job exited 0; now a usage error saying to add --track, before anything is read."""
    from jobs import weighted_merge as job

    base = ["--teachers", str(tmp_path / "never-read.yaml"), "--out", str(tmp_path / "wm")]
    for extra, named in (
        (["--tracking-uri", "foo://x"], "--tracking-uri"),
        (["--project", "p"], "--project"),
        (["--tracking-uri", "foo://x", "--registered-name", "foo"], "--tracking-uri, --registered-name"),
    ):
        with pytest.raises(SystemExit) as info:
            job.main(base + extra)
        err = capsys.readouterr().err
        assert info.value.code == 2 and f"error: {named} only apply with --track" in err and "add --track" in err, err
    assert not (tmp_path / "wm").exists()


def test_weighted_merge_job_answers_ctrl_c_with_one_line(zoo, tmp_path, capsys, monkeypatch):
    from dmm_ray.baselines import weighted_merge as wm
    from jobs import weighted_merge as job

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(wm, "weighted_merge_teachers", interrupted)
    assert job.main(["--teachers", str(zoo), "--out", str(tmp_path / "wm")]) == 130
    err = capsys.readouterr().err
    assert err.strip().startswith("interrupted: --out keeps the previous weighted merge") and err.strip().count("\n") == 0, err


def test_merge_mismatch_compares_the_mix_the_teachers_files_and_completeness(zoo, tmp_path):
    """What jobs/style_mixing.py reuses: a folder whose record is these teachers at these weights (in any
    order), built from the teachers' current files, with every component present."""
    import shutil

    from dmm_ray.baselines.weighted_merge import merge_mismatch, weighted_merge_teachers
    from dmm_ray.teachers import TeacherSpec

    a, b = _specs(zoo, ["a", "b"])
    b = TeacherSpec(name="b", source=str(shutil.copytree(b.source, tmp_path / "b")))
    out = tmp_path / "wm"
    weighted_merge_teachers([a, b], None, out)
    assert merge_mismatch(out, [a, b]) is None and merge_mismatch(out, [b, a]) is None
    assert merge_mismatch(out, [a, b], [0.25, 0.75]) == "it merges {a: 0.5, b: 0.5}, not {a: 0.25, b: 0.75}"
    assert merge_mismatch(out, _specs(zoo, ["a", "c"])) == "it merges {a: 0.5, b: 0.5}, not {a: 0.5, c: 0.5}"
    weighted_merge_teachers([a, b], None, out, merge_text_encoder=False)  # a UNet-only merge is not the Table 3 baseline
    assert merge_mismatch(out, [a, b]) == "it merges the UNets only (--no-text-encoder)"
    assert merge_mismatch(out, [a, b], merge_text_encoder=False) is None
    weighted_merge_teachers([a, b], None, out)
    (tmp_path / "b" / "unet" / "config.json").write_text((tmp_path / "b" / "unet" / "config.json").read_text() + "\n")  # retrained, say
    assert "teacher(s) ['b'] changed since it was built" in merge_mismatch(out, [a, b])
    weighted_merge_teachers([a, b], None, out)
    (out / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    assert merge_mismatch(out, [a, b]).startswith("it is incomplete (weighted merge: ") and "vae has no weights file" in merge_mismatch(out, [a, b])


def test_a_weighted_merge_recorded_by_an_earlier_checksum_rule_is_still_of_its_teachers(zoo, tmp_path):
    """The weighted merge's record holds its teachers' checksums, compared by the current files_checksum rule alone:
    one built before 1c17d28 from a teacher with a 16-32 MiB file (a rank 16-32 LoRA), whose tail that rule did not
    hash, was "changed since it was built", the same files, so style_mixing rebuilt it (or refused the one
    --weighted-merge names). Compared by the earlier rules too (fingerprint.recorded_by_an_earlier_rule), as a
    merge's resume compares them; a teacher changed since is still found."""
    import json
    import shutil

    from dmm_ray.baselines.weighted_merge import RECORD, merge_mismatch, weighted_merge_teachers
    from dmm_ray.teachers import TeacherSpec, teacher_checksum

    a, b = _specs(zoo, ["a", "b"])
    b = TeacherSpec(name="b", source=str(shutil.copytree(b.source, tmp_path / "b")))
    extra = tmp_path / "b" / "unet" / "extra.bin"
    extra.write_bytes(bytes(range(256)) * (20 << 12))  # 20 MiB: the first rule hashed its first 16 MiB only
    out = tmp_path / "wm"
    weighted_merge_teachers([a, b], None, out)
    record = json.loads((out / RECORD).read_text())
    record["checksums"] = [teacher_checksum(s, rule="first-chunk") for s in (a, b)]  # as a dmm-ray before 1c17d28 recorded them
    assert record["checksums"][1] != teacher_checksum(b)
    (out / RECORD).write_text(json.dumps(record))
    assert merge_mismatch(out, [a, b]) is None  # was: teacher(s) ['b'] changed since it was built
    data = bytearray(extra.read_bytes())
    data[0] ^= 0xFF  # in the first chunk, which every rule hashes
    extra.write_bytes(bytes(data))
    assert "teacher(s) ['b'] changed since it was built" in merge_mismatch(out, [a, b])
