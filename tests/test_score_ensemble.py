"""The teachers' score ensemble (dmm_ray/baselines/score_ensemble.py): the mixture target of
distill.mixture_fraction as a pipeline, and its row in the Table 3 mixing study."""

import re
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline
from eval_helpers import SeededConvExtractor, fast_eval_config

from dmm_ray import DMMPipeline, StyleUNet, TeacherSpec
from dmm_ray.baselines.score_ensemble import score_ensemble_pipeline
from dmm_ray.evaluation.mixing import mixing_comparison
from dmm_ray.evaluation.sources import pipeline_folder_source, score_ensemble_source, student_source, teacher_sources
from dmm_ray.tiny import tiny_sd_components

NAMES = ["ink", "neon"]


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    """Two teachers sharing the base's text encoder, UNets perturbed two ways; and one with its own text encoder."""
    root = tmp_path_factory.mktemp("ens")
    specs = []
    for i, name in enumerate(NAMES):
        c = tiny_sd_components(seed=0)
        g = torch.Generator().manual_seed(40 + i)
        with torch.no_grad():
            for p in c["unet"].parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=g))
        StableDiffusionPipeline(**c).save_pretrained(root / name)
        specs.append(TeacherSpec(name=name, source=str(root / name)))
    StableDiffusionPipeline(**tiny_sd_components(seed=3)).save_pretrained(root / "other")
    other = TeacherSpec(name="other", source=str(root / "other"))
    return root, specs, other


def _eps(unet, g_seed=0):
    g = torch.Generator().manual_seed(g_seed)
    x, text = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 32, generator=g)
    with torch.no_grad():
        return unet(x, torch.tensor([10, 500]), text).sample, unet(x, torch.tensor([10, 500]), text, return_dict=False)[0]


def test_ensemble_unet_is_the_weighted_sum_of_the_teachers(teachers):
    _, specs, _ = teachers
    singles = [_eps(StableDiffusionPipeline.from_pretrained(s.source).unet)[0] for s in specs]
    assert (singles[0] - singles[1]).abs().max() > 1e-3
    for weights, w in ((None, [0.5, 0.5]), ([0.25, 0.75], [0.25, 0.75])):
        sample, tup = _eps(score_ensemble_pipeline(specs, weights).unet)
        torch.testing.assert_close(sample, w[0] * singles[0] + w[1] * singles[1], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(tup, sample)


def test_ensemble_moves_as_one_and_samples_with_dpm_solver(teachers):
    """Finding: `pipe.to(device)` moved only the first teacher's UNet (the others were no submodule):
    on a GPU the ensemble mixed devices. The evaluation samples it with the paper's DPM-Solver++."""
    from diffusers import PNDMScheduler

    from dmm_ray.evaluation.sources import _load_score_ensemble, _load_teacher_pipeline

    root, specs, _ = teachers
    stock = StableDiffusionPipeline(**{**tiny_sd_components(seed=0), "scheduler": PNDMScheduler()})  # as SD1.5 folders ship
    stock.save_pretrained(root / "stock")
    teacher = _load_teacher_pipeline(TeacherSpec(name="stock", source=str(root / "stock")))
    assert type(teacher.scheduler).__name__ == "DPMSolverMultistepScheduler"  # sampled as the student is, not with PNDM
    pipe = _load_score_ensemble(specs)
    assert type(pipe.scheduler).__name__ == "DPMSolverMultistepScheduler" and pipe.scheduler.config.algorithm_type == "dpmsolver++"
    reference = _eps(pipe.unet)[0]
    pipe.to(torch.float64)  # as a move to another device would: every member goes
    assert {p.dtype for p in pipe.unet.parameters()} == {torch.float64}
    g = torch.Generator().manual_seed(0)
    x, text = torch.randn(2, 4, 8, 8, generator=g).double(), torch.randn(2, 77, 32, generator=g).double()  # _eps's inputs
    with torch.no_grad():
        torch.testing.assert_close(pipe.unet(x, torch.tensor([10, 500]), text).sample.float(), reference, atol=1e-4, rtol=1e-4)


def test_ensemble_refuses_teachers_with_their_own_text_encoder(teachers):
    _, specs, other = teachers
    with pytest.raises(ValueError, match="'other' has its own text_encoder"):
        score_ensemble_pipeline([specs[0], other])
    with pytest.raises(ValueError, match=">= 2 teachers"):
        score_ensemble_pipeline(specs[:1])


def test_style_mixing_refuses_an_ensemble_of_teachers_with_their_own_text_encoder_before_any_work(teachers, tmp_path, capsys):
    """Finding: `--score-ensemble` over a group whose teachers do not share a text encoder (the toy zoo's
    noir and neon) was refused only where the ensemble's worker built it: after the group's weighted merge
    was built and every other row sampled (3 minutes at 4 images per set on the toy zoo). Now exit 2
    before anything is built or sampled."""
    from jobs.style_mixing import main

    _, specs, other = teachers
    out = tmp_path / "mix"
    base = _mixing_world(specs, other, tmp_path)
    capsys.readouterr()  # the student's save
    assert main(base + [f"--group={NAMES[0]},other", "--score-ensemble", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: score ensemble: teacher 'other' has its own text_encoder (not 'ink''s)"), err
    assert not out.exists()  # no weighted merge, no statistics


def test_an_ensemble_loads_each_teachers_unet_once(teachers, monkeypatch):
    """--score-ensemble's check before any image (check_shared_text_encoder) loaded each group teacher whole,
    and the ensemble loaded it whole again: each UNet and VAE twice. The check now loads the text encoders only."""
    import collections

    import dmm_ray.teachers
    from dmm_ray.baselines.score_ensemble import check_shared_text_encoder

    _, specs, other = teachers
    whole = collections.Counter()
    load = dmm_ray.teachers.load_teacher_pipeline

    def counting(spec, *args, **kwargs):
        pipe = load(spec, *args, **kwargs)
        whole[spec.name] += pipe.unet is not None
        return pipe

    monkeypatch.setattr(dmm_ray.teachers, "load_teacher_pipeline", counting)
    check_shared_text_encoder(specs)  # jobs/style_mixing.py, before the weighted merge or any image
    score_ensemble_pipeline(specs)  # the ensemble's row, when it is sampled
    assert whole == {name: 1 for name in NAMES}, whole
    with pytest.raises(ValueError, match="'other' has its own text_encoder"):  # the text encoders alone still tell
        check_shared_text_encoder([specs[0], other])


def test_mixing_study_gains_the_ensemble_row(teachers, tmp_path):
    root, specs, _ = teachers
    c = tiny_sd_components(seed=0)
    torch.manual_seed(0)
    DMMPipeline.from_components(StyleUNet.from_unet(c["unet"], NAMES), c["vae"], c["text_encoder"], c["tokenizer"], c["scheduler"]).save_pretrained(
        tmp_path / "student"
    )
    (tmp_path / "prompts.txt").write_text("a red circle\na blue square\n")
    cfg = fast_eval_config(tmp_path)
    res = mixing_comparison(
        student_source(tmp_path / "student"),
        teacher_sources(specs),
        NAMES,
        pipeline_folder_source("weighted merge", root / "ink"),
        cfg,
        SeededConvExtractor(),
        references={"score ensemble": score_ensemble_source(specs)},
    )
    assert res.rows == ["DMM mix", "weighted merge", "score ensemble", "teachers (ref)"]
    assert res.table.shape == (4, 3) and (res.table >= 0).all()
    assert not torch.allclose(torch.tensor(res.table[2]), torch.tensor(res.table[1]))  # its own images, not the stand-in merge's


def test_style_mixing_cli_with_score_ensemble(teachers, tmp_path, capsys):
    import yaml

    from jobs.style_mixing import main

    root, specs, _ = teachers
    (tmp_path / "prompts.txt").write_text("a red circle\na blue square\n")
    zoo = {"base": specs[0].source, "eval_prompts": str(tmp_path / "prompts.txt")}
    zoo["teachers"] = [{"name": s.name, "format": "diffusers", "source": s.source, "description": "toy"} for s in specs]
    (tmp_path / "zoo.yaml").write_text(yaml.safe_dump(zoo))
    c = tiny_sd_components(seed=0)
    DMMPipeline.from_components(StyleUNet.from_unet(c["unet"], NAMES), c["vae"], c["text_encoder"], c["tokenizer"], c["scheduler"]).save_pretrained(
        tmp_path / "student"
    )
    sets = ["sampler.num_inference_steps=2", "images_per_prompt=1", f"cache_dir={tmp_path / 'cache'}", "extractor.kind=import"]
    sets += ["extractor.path=eval_helpers:SeededConvExtractor"]
    args = ["--model", str(tmp_path / "student"), "--teachers", str(tmp_path / "zoo.yaml"), "--group", ",".join(NAMES), "--score-ensemble"]
    args += ["--no-ray", "--out", str(tmp_path / "mix")] + [a for s in sets for a in ("--set", s)]
    assert main(args) == 0
    assert "score ensemble" in capsys.readouterr().out
    assert "score ensemble" in (tmp_path / "mix" / "mixing.csv").read_text()


def test_style_mixing_refuses_the_group_options_without_group(capsys):
    """--weighted-merge / --score-ensemble are rows of the --group study: with only --sweep they were
    silently ignored while the sweep ran; now a usage error, before the teachers are read."""
    from jobs.style_mixing import main

    base = ["--model", "never-loaded", "--teachers", "never-read.yaml", "--sweep", ",".join(NAMES)]
    for extra, said in (
        (["--weighted-merge", "wm"], "--weighted-merge goes with --group"),
        (["--score-ensemble"], "--score-ensemble goes with --group"),
        (["--weighted-merge", "wm", "--score-ensemble"], "--weighted-merge and --score-ensemble go with --group"),
    ):
        with pytest.raises(SystemExit) as info:
            main(base + extra)
        assert info.value.code == 2 and said in capsys.readouterr().err


def test_style_mixing_cli_checks_styles_and_out_before_any_image(teachers, tmp_path, capsys):
    """--sweep with one style or a misspelt one, --group of unknown styles, an --out that cannot be
    written: exit 2 naming the option, before the model or a teacher is sampled."""
    import yaml

    from jobs.style_mixing import main

    _, specs, _ = teachers
    zoo = {"base": specs[0].source, "teachers": [{"name": s.name, "format": "diffusers", "source": s.source} for s in specs]}
    (tmp_path / "zoo.yaml").write_text(yaml.safe_dump(zoo))
    (tmp_path / "f").write_text("x")
    base = ["--model", str(tmp_path / "never-loaded"), "--teachers", str(tmp_path / "zoo.yaml"), "--no-ray"]
    cases = [
        (["--sweep", NAMES[0]], f"--sweep takes exactly 2 comma-separated styles, e.g. --sweep {NAMES[0]},{NAMES[-1]}; got '{NAMES[0]}'"),
        (["--sweep", f"{NAMES[0]},nope"], f"--sweep: unknown style(s) ['nope']; the teachers are {NAMES}"),
        (["--group", "nope,other"], "--group: unknown style(s) ['nope', 'other']"),
        (["--group", ",".join(NAMES), "--out", str(tmp_path / "f")], "--out .*/f is a file, not a folder"),
    ]
    for extra, message in cases:
        assert main(base + extra) == 2
        err = capsys.readouterr().err
        assert re.search(message if extra[-1].endswith("f") else re.escape(message), err), err
    # a store MLflow cannot open, for a models:/ --model: refused before the download, not after
    registry = ["--model", "models:/dmm-toy/1", *base[2:], "--group", ",".join(NAMES), "--out", str(tmp_path / "mix")]
    assert main(registry + ["--tracking-uri", "nosuchscheme://x"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --tracking-uri") and "nosuchscheme" in err and "Traceback" not in err, err
    with pytest.raises(SystemExit) as exit_info:  # an unset shell variable: not silently the default folder
        main(base + ["--group", ",".join(NAMES), "--out", ""])
    assert exit_info.value.code == 2 and "--out is empty" in capsys.readouterr().err
    assert not (tmp_path / "mix").exists()


def _mixing_world(specs, other, tmp_path):
    """zoo.yaml of ink, neon and other; a tiny student; the fast --set options."""
    import yaml

    zoo = {"base": specs[0].source, "eval_prompts": str(tmp_path / "prompts.txt")}
    zoo["teachers"] = [{"name": s.name, "format": "diffusers", "source": s.source, "description": "toy"} for s in (*specs, other)]
    (tmp_path / "prompts.txt").write_text("a red circle\na blue square\n")  # FID needs 2+ images per set
    (tmp_path / "zoo.yaml").write_text(yaml.safe_dump(zoo))
    c = tiny_sd_components(seed=0)
    DMMPipeline.from_components(
        StyleUNet.from_unet(c["unet"], [*NAMES, "other"]), c["vae"], c["text_encoder"], c["tokenizer"], c["scheduler"]
    ).save_pretrained(tmp_path / "student")
    sets = ["sampler.num_inference_steps=2", "images_per_prompt=1", f"cache_dir={tmp_path / 'cache'}", "extractor.kind=import"]
    sets += ["extractor.path=eval_helpers:SeededConvExtractor"]
    return ["--model", str(tmp_path / "student"), "--teachers", str(tmp_path / "zoo.yaml"), "--no-ray"] + [a for s in sets for a in ("--set", s)]


def test_style_mixing_uses_only_the_groups_weighted_merge(teachers, tmp_path, capsys, monkeypatch):
    """QA: OUT/weighted_merge of another group was reused (wrong Table-3 numbers, exit 0). The default
    folder is rebuilt when its record is another mix, and reused when it is the group's; an explicit
    --weighted-merge of another mix, or without a record, is refused (exit 2, both groups named)."""
    from dmm_ray.baselines import weighted_merge as wm
    from dmm_ray.baselines.weighted_merge import read_record, weighted_merge_teachers
    from dmm_ray.evaluation import mixing
    from jobs.style_mixing import main

    _, specs, other = teachers
    base = _mixing_world(specs, other, tmp_path)
    used = []

    class Result:  # the FID study itself is tested above; here only which folder it samples
        def format_table(self):
            return "table"

        def write(self, out):
            return out

    def fake_comparison(student, teachers, group, weighted_merge, *a, **k):
        folder = Path(weighted_merge.pipeline_factory.args[0])
        used.append((read_record(folder)["teachers"], read_record(folder)["weights"]))
        return Result()

    monkeypatch.setattr(mixing, "mixing_comparison", fake_comparison)
    out = tmp_path / "mix"
    weighted_merge_teachers([specs[0], other], None, out / "weighted_merge")  # an earlier run's, of another group
    assert main(base + ["--group", ",".join(NAMES), "--out", str(out)]) == 0
    assert used[-1] == (NAMES, [0.5, 0.5])
    assert "(it merges {ink: 0.5, other: 0.5}, not {ink: 0.5, neon: 0.5})" in capsys.readouterr().out
    assert read_record(out / "weighted_merge")["teachers"] == NAMES

    monkeypatch.setattr(wm, "weighted_merge_teachers", lambda *a, **k: pytest.fail("rebuilt the group's own weighted merge"))
    assert main(base + ["--group", ",".join(reversed(NAMES)), "--out", str(out)]) == 0  # the same mix, in another order
    assert used[-1] == (NAMES, [0.5, 0.5]) and "using the weighted merge" in capsys.readouterr().out

    n = len(used)
    explicit = ["--group", "ink,other", "--weighted-merge", str(out / "weighted_merge"), "--out", str(tmp_path / "mix2")]
    assert main(base + explicit) == 2
    err = capsys.readouterr().err
    assert re.search(
        r"^error: --weighted-merge .*/mix/weighted_merge is not the weighted merge of --group ink,other at equal weights: "
        r"it merges \{ink: 0.5, neon: 0.5\}, not \{ink: 0.5, other: 0.5\}; give that group's weighted merge",
        err,
    ), err
    (out / "weighted_merge" / "weighted_merge.json").unlink()
    assert main(base + explicit[:-2]) == 2
    assert "it has no weighted_merge.json, so which teachers it merges is unknown" in capsys.readouterr().err
    (tmp_path / "plainfile").write_text("x")
    assert main(base + ["--group", ",".join(NAMES), "--weighted-merge", str(tmp_path / "plainfile")]) == 2
    assert re.match(
        r"error: --weighted-merge .*/plainfile is a file, not a folder; give the folder of the group's weighted merge", capsys.readouterr().err
    )
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("x")
    assert main(base + ["--group", ",".join(NAMES), "--weighted-merge", str(tmp_path / "notes")]) == 2
    assert re.match(r"error: --weighted-merge .*/notes holds other files and is not an earlier weighted merge", capsys.readouterr().err)
    assert len(used) == n  # refused before any image


def test_style_mixing_checks_the_models_styles_before_the_weighted_merge_and_table_3(teachers, tmp_path, capsys):
    """QA: a --group style the model lacks failed only after the group's weighted merge was built, and a
    --sweep style it lacks only after the whole Table 3 study (its mixing.csv written): minutes of work
    on the real zoo. Now exit 2 naming the option and the model, before anything is built or sampled;
    so is a prompt set too small for FID (it too waited for the weighted merge)."""
    from jobs.style_mixing import main

    _, specs, other = teachers
    base = _mixing_world(specs, other, tmp_path)
    c = tiny_sd_components(seed=0)
    DMMPipeline.from_components(StyleUNet.from_unet(c["unet"], NAMES), c["vae"], c["text_encoder"], c["tokenizer"], c["scheduler"]).save_pretrained(
        tmp_path / "two"
    )
    base[1] = str(tmp_path / "two")  # a model of ink and neon only; the teachers have "other" too
    capsys.readouterr()  # the saves' progress bars
    out = tmp_path / "mix"
    for extra, option in (([f"--group={NAMES[0]},other"], "--group"), ([f"--group={','.join(NAMES)}", f"--sweep={NAMES[0]},other"], "--sweep")):
        assert main(base + extra + ["--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {option}: the model {tmp_path / 'two'} has no style(s) ['other']; its styles are {NAMES}"), err
        assert not out.exists()  # no weighted merge, no mixing.csv
    base[1] = str(tmp_path / "student")  # every style; one prompt at 1 image per set is too few for FID
    (tmp_path / "prompts.txt").write_text("a red circle\n")
    assert main(base + [f"--group={','.join(NAMES)}", "--out", str(out)]) == 2
    assert "error: 1 prompt(s) x images_per_prompt=1 is 1 image per set; FID needs at least 2" in capsys.readouterr().err
    assert not out.exists()


def test_style_mixing_reads_a_merge_configs_evaluation_section(teachers, tmp_path, capsys, monkeypatch):
    """Finding: a merge config as --config was refused with "add --section evaluation to read its evaluation
    settings", an option style_mixing.py did not have (argparse: unrecognized arguments). It has it now, as
    jobs/evaluate.py does."""
    import yaml

    import jobs.style_mixing as job

    _, specs, other = teachers
    base = _mixing_world(specs, other, tmp_path)
    merge = tmp_path / "merge.yaml"
    merge.write_text(
        yaml.safe_dump({"name": "m", "teachers": [{"name": n} for n in NAMES], "evaluation": {"num_inference_steps": 3, "seed_b": 5000}})
    )
    seen = []
    monkeypatch.setattr(job, "_compare", lambda args, cfg, *rest: seen.append(cfg) or 0)
    assert job.main(base + ["--sweep", ",".join(NAMES), "--config", str(merge), "--section", "evaluation", "--out", str(tmp_path / "mix")]) == 0
    assert (seen[0].sampler.num_inference_steps, seen[0].seed_b) == (2, 5000)  # the section, under the job's --set
    with pytest.raises(SystemExit) as stop:
        job.main(base + ["--sweep", ",".join(NAMES), "--section", "evaluation"])
    assert stop.value.code == 2 and "--section names a key of --config; give --config too" in capsys.readouterr().err


def test_style_mixing_checks_numbers_at_parse_time_and_answers_ctrl_c(teachers, tmp_path, capsys, monkeypatch):
    """--student-steps 0 was silently ignored, -3 failed after the teachers were sampled: argparse
    refuses them (exit 2, naming the flag); Ctrl-C is one `interrupted:` line and exit 130."""
    from dmm_ray.evaluation import sources
    from jobs.style_mixing import main

    base = ["--model", "never-loaded", "--teachers", "never-read.yaml", "--group", ",".join(NAMES)]
    for flag, value, message in (
        ("--student-steps", "0", "0 is not a number of sampling steps; give 1 or more"),
        ("--student-steps", "-3", "-3 is not a number of sampling steps"),
        ("--student-steps", "2.5", "'2.5' is not a whole number"),
        ("--student-guidance", "nan", "'nan' is not a CFG scale; give a number >= 0"),
        ("--student-guidance", "-1", "'-1' is not a CFG scale"),
    ):
        with pytest.raises(SystemExit) as stop:
            main(base + [flag, value])
        assert stop.value.code == 2
        assert f"error: argument {flag}: {message}" in capsys.readouterr().err

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(sources, "load_eval_setup", interrupted)
    assert main(base) == 130
    err = capsys.readouterr().err.strip()
    assert err.startswith("interrupted: finished FID statistics stay cached") and "\n" not in err, err


def test_style_mixing_student_guidance_alone_keeps_the_evaluation_samplers_steps(teachers, tmp_path, monkeypatch):
    """--student-steps defaults to the evaluation sampler's steps, as without either flag; --student-guidance
    alone sampled the model with the steps of its own sampler record instead (25, the paper's, for a model
    without one, where the evaluation asked for 2): a CFG change silently changed the step count too."""
    from types import SimpleNamespace

    from dmm_ray.evaluation import mixing
    from jobs.style_mixing import main

    _, specs, other = teachers
    base = _mixing_world(specs, other, tmp_path)
    seen = []

    def sweep(student, *args, **kwargs):
        seen.append(student.pipeline_factory.args[1:])  # OwnSampler.factory(factory, steps, guidance)
        return SimpleNamespace(weights=[], fid_a=[], fid_b=[], write=lambda out: out)

    monkeypatch.setattr(mixing, "interpolation_sweep", sweep)
    for flags, expected in (
        (["--student-guidance", "3"], (2, 3.0)),
        (["--student-steps", "4"], (4, 7.0)),
        (["--student-steps", "4", "--student-guidance", "0"], (4, 0.0)),
    ):
        assert main(base + ["--sweep", ",".join(NAMES), "--out", str(tmp_path / "mix"), *flags]) == 0
        assert seen.pop() == expected, flags


def test_style_mixing_names_a_style_given_twice():
    """--group warm,warm,cool was refused as "needs at least two different styles", though it names two:
    the message names the style given twice now (fewer than two styles keeps its own)."""
    from dmm_ray.styles import StyleError
    from jobs.style_mixing import _styles

    known = ["warm", "cool", "noir"]
    with pytest.raises(StyleError, match=re.escape("--group names ['warm'] more than once (in 'warm,warm,cool'); give each style once")):
        _styles("--group", "warm,warm,cool", known)
    with pytest.raises(StyleError, match=re.escape("--sweep names ['cool'] more than once")):
        _styles("--sweep", "cool,cool", known, count=2)
    with pytest.raises(StyleError, match="--group needs at least two different styles, got 'warm'"):
        _styles("--group", "warm", known)
    assert _styles("--group", "warm, cool", known) == ["warm", "cool"]
