import re
from pathlib import Path

import pytest

from dmm_ray.config import ConfigError, load_config
from dmm_ray.distill.layout import worker_layout


def _write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


BASE = """
teachers: [{name: a, source: /x/a}, {name: b, source: /x/b}, {name: c, source: /x/c}]
student: {base: /x/base}
data: {base: /x/base, shards: /x/shards}
"""


def test_overrides_and_defaults(tmp_path):
    cfg = load_config(_write(tmp_path, BASE), ["distill.steps=7", "teachers.1.name=bee", "scaling.workers_per_teacher=2"])
    assert cfg.distill.steps == 7 and cfg.teachers[1].name == "bee"
    assert cfg.num_workers == 6 and cfg.distill.lambda_feat == 0.001 and cfg.distill.lambda_adv == 0.01


@pytest.mark.parametrize(
    "overrides, packing",
    [
        (["scaling.num_workers=1"], "or keep 1 with scaling.teachers_per_worker: 3"),  # one GPU, three teachers
        (["scaling.num_workers=2"], "or keep 2 with scaling.teachers_per_worker: 2"),  # groups of 2 and 1
        (["scaling.num_workers=3", "scaling.teachers_per_worker=2"], "or keep 3 with scaling.teachers_per_worker: 1"),
    ],
)
def test_fewer_workers_than_teachers_names_the_packing_that_runs_on_them(tmp_path, overrides, packing):
    """A worker count that the teacher groups do not divide (typically fewer GPUs than teachers) was
    refused naming only a larger count (e.g. 3 workers for 1 GPU); the refusal also names the fewest
    teachers per worker that the workers asked for can host."""
    with pytest.raises(ConfigError, match=re.escape(packing)):
        load_config(_write(tmp_path, BASE), overrides)
    k = int(packing.rsplit(" ", 1)[1])
    workers = int(overrides[0].split("=")[1])
    assert load_config(_write(tmp_path, BASE), [overrides[0], f"scaling.teachers_per_worker={k}"]).num_workers == workers


@pytest.mark.parametrize(
    "override, message",
    [
        ("distill.stepz=3", "distill.stepz: Extra inputs are not permitted"),
        ("distill.lr=-1", "distill.lr: Input should be greater than 0"),
        ("scaling.num_workers=4", "scaling.num_workers=4 is not a multiple of the 3 teachers"),
        ("teachers.2.name=a", "duplicate names"),
        ("teachers.1.name=''", "teachers.1.name: Value error, a teacher's name is empty"),  # StyleUNet refused it inside the workers
        ("evaluation.imagez_per_prompt=3", "evaluation.imagez_per_prompt: Extra inputs are not permitted"),
        ("tracking.urii=x", "tracking.urii: Extra inputs are not permitted"),
        ("teachers=5", "teachers: Input should be a valid list (got 5)"),  # not a TypeError from path resolution
        ("zoo=5", "zoo: Input should be a valid string (got 5)"),
        ("name=true", "name: Input should be a valid string (got True)"),
        ("name=team/a", "name: Value error, 'team/a' is not a plain name"),  # also a folder: $DMM_HOME/outputs/<name>
        ("name=..", "name: Value error, '..' is not a plain name"),
        ("tracking.registered_model_name=team/a", "'team/a' contains '/', which MLflow's model registry does not allow"),
        ("tracking.registered_model_name=a:b", "'a:b' contains ':'"),
        ("student=foo", "student: Input should be a valid dictionary or instance of StudentConfig (got 'foo')"),
        ("synthesis.resolution=-32", "synthesis.resolution: Input should be greater than or equal to 8"),
        ("synthesis.resolution=36", "synthesis.resolution: Input should be a multiple of 8"),  # found only inside a worker
        # no target is no layer: passed --dry-run, and the student refused it inside the distill workers
        ("student.style_adapters={rank: 4, targets: []}", "student.style_adapters: Value error, targets is [], so rank 4 adapts no layer"),
        ("evaluation.resolution=33", "evaluation.sampler.height: Input should be a multiple of 8"),
        ("scaling.cpus_per_worker=.nan", "scaling.cpus_per_worker.float: Input should be a finite number"),
        ("distill.lr=.inf", "distill.lr: Input should be a finite number"),
        ("fast.eval_steps=[0]", "fast.eval_steps [0]: give step counts >= 1"),  # a ZeroDivisionError after training
        ("fast.num_ddim_timesteps=3", "fast.num_ddim_timesteps 3 is below the 8 sampling steps asked for"),  # failed after training
        ("tracking.project=a'b\"c", "holds both ' and \"; MLflow's run search cannot match such a name"),
        ("tracking.project=team\\", "ends with \\, which MLflow's run search reads as escaping the closing quote"),
        ("zoo=mini", "zoo: 'mini' is not a preset (presets: full, micro, built under $DMM_HOME/zoo); for a zoo folder give its path"),
    ],
)
def test_bad_values_name_the_key(tmp_path, override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(_write(tmp_path, BASE), [override])


def test_synthesized_samples_mixed_into_distillation_are_made_at_the_shards_size(tmp_path):
    """data.synthetic_fraction > 0 joins each style's synthesized latents to latent-shard rows in one batch:
    a synthesis.resolution other than data.encode.resolution was accepted, synthesized, and stopped distill
    inside its workers ('synthesized latents (4, 16, 16) and latent shards (4, 8, 8) differ in shape')."""
    mixed = ["data.synthetic_fraction=0.5", "data.encode.resolution=256"]
    with pytest.raises(ConfigError, match=re.escape("synthesis.resolution is 512 but the shards' data.encode.resolution is 256")) as refused:
        load_config(_write(tmp_path, BASE), [*mixed, "synthesis.resolution=512"])
    assert "if the shards were encoded at 512 px, set data.encode.resolution: 512" in str(refused.value)  # shards encoded elsewhere
    assert load_config(_write(tmp_path, BASE), [*mixed, "synthesis.resolution=256"]).synthesis_resolution == 256
    assert load_config(_write(tmp_path, BASE), mixed).synthesis_resolution == 256  # the default: the shards' side
    assert load_config(_write(tmp_path, BASE), ["synthesis.resolution=512"]).synthesis_resolution == 512  # the fine-tune alone: its own size


def test_synthesized_samples_mixed_into_the_few_step_stage_are_made_at_the_shards_size(tmp_path):
    """fast.synthetic_fraction > 0 joins synthesized latents (the merge's or the merged model's, both made at
    synthesis.resolution) to latent-shard rows in one batch: with data.synthetic_fraction 0 another size passed
    the config and --dry-run and stopped the few-step stage inside its workers, with torch.cat's RuntimeError
    (retried scaling.max_failures times)."""
    few_step = ["fast.synthetic_fraction=0.5", "data.encode.resolution=256"]
    for source in ("teachers", "merged"):
        with pytest.raises(ConfigError, match=re.escape("synthesis.resolution is 512 but the shards' data.encode.resolution is 256")):
            load_config(_write(tmp_path, BASE), [*few_step, f"fast.synthetic_source={source}", "synthesis.resolution=512"])
    assert load_config(_write(tmp_path, BASE), [*few_step, "synthesis.resolution=256"]).synthesis_resolution == 256
    assert load_config(_write(tmp_path, BASE), few_step).synthesis_resolution == 256  # the default: the shards' side
    # the rollout pairs alone are never joined to shard rows: their own size
    assert load_config(_write(tmp_path, BASE), ["fast.rollout_steps=2", "synthesis.resolution=512"]).synthesis_resolution == 512


def test_the_few_step_worker_joins_shard_and_synthesized_rows_with_the_shape_check():
    """The few-step worker joined its shard rows and synthesized rows with concat_batches: latents of two sizes
    (a merge's synthesized sets made at another size than the config says) failed in torch.cat with a RuntimeError
    that Ray Train retried; it joins them as distillation does (distill.streams.join_batches: a TrainingInputError)."""
    import inspect

    from dmm_ray.fast import loop

    source = inspect.getsource(loop.train_fast_per_worker)
    assert "join_batches([batch, extra])" in source and "concat_batches" not in source


@pytest.mark.parametrize(
    "override, hint",
    [
        ("distill.stepz=3", "distill.stepz: Extra inputs are not permitted (got 3); did you mean distill.steps?"),
        ("scaling.teacher_per_worker=2", "did you mean scaling.teachers_per_worker?"),
        ("teachers.1.nme=bee", "teachers.1.nme: Extra inputs are not permitted (got 'bee'); did you mean teachers.1.name?"),
        ("distil.steps=3", "distil: Extra inputs are not permitted; did you mean distill?"),
        ("evaluation.zzz=1", "evaluation.zzz: Extra inputs are not permitted (got 1); evaluation has: enabled, prompts, "),
        # the section's shorthands are known keys too (the hint knew EvalConfig's fields only: grid_prompts was offered)
        (
            "evaluation.negative_promt=x",
            "evaluation.negative_promt: Extra inputs are not permitted (got 'x'); did you mean evaluation.negative_prompt?",
        ),
        ("evaluation.feature_nte=/x", "did you mean evaluation.feature_net?"),
        ("tracking.urii=x", "tracking.urii: Extra inputs are not permitted (got 'x'); did you mean tracking.uri?"),
        ("evaluation.zzz=1", ", grid_prompts, num_prompts, feature_net, inception_weights, resolution, num_inference_steps, guidance_scale, "),
    ],
)
def test_an_unknown_key_names_the_nearest_known_one_or_its_sections_keys(tmp_path, override, hint):
    with pytest.raises(ConfigError) as info:
        load_config(_write(tmp_path, BASE), [override])
    assert hint in str(info.value)


@pytest.mark.parametrize(
    "override, hint",
    [
        (
            "name=no",
            """name: Input should be a valid string (got False); YAML reads an unquoted yes/no/on/off/true/false as a boolean: quote it to keep the word (--set 'name="no"'""",
        ),
        (
            "distill.steps=1e3",
            "distill.steps: Input should be a valid integer, unable to parse string as an integer (got '1e3'); write it as an integer: distill.steps=1000",
        ),
        ("distill.lr=off", "distill.lr: Input should be greater than 0 (got False); YAML reads an unquoted yes/no/on/off/true/false as a boolean"),
    ],
)
def test_a_value_yaml_read_otherwise_than_it_looks_says_how_to_write_it(tmp_path, override, hint):
    """Finding: `--set name=no` was "got False" and `--set distill.steps=1e3` "got '1e3'" (YAML 1.1 reads
    no/off as booleans and an exponent without a '.' as a string), with nothing saying why or what to write."""
    with pytest.raises(ConfigError) as info:
        load_config(_write(tmp_path, BASE), [override])
    assert hint in str(info.value)


def test_num_workers_multiple_of_teachers_accepted(tmp_path):
    cfg = load_config(_write(tmp_path, BASE), ["scaling.num_workers=6"])
    assert cfg.workers_per_teacher == 2


def test_incremental_layout_adds_one_regulariser(tmp_path):
    cfg = load_config(_write(tmp_path, BASE), ["incremental.base_merged=/x/merged", "scaling.num_workers=7"])
    assert cfg.num_workers == 7 and cfg.regularization_workers == 1
    with pytest.raises(ConfigError, match=r"N\*k \+ 1"):
        load_config(_write(tmp_path, BASE), ["incremental.base_merged=/x/merged", "scaling.num_workers=6"])
    roles = worker_layout(3, 2, num_old_styles=4, regularization=True)
    assert [r.style_index for r in roles] == [4, 5, 6, 4, 5, 6, None]
    assert roles[-1].kind == "regularizer" and len(roles) == 3 * 2 + 1


def test_layout_rank_mod_n():
    roles = worker_layout(4, 2)
    assert [r.teacher_index for r in roles] == [0, 1, 2, 3, 0, 1, 2, 3]


def test_missing_file_and_bad_set(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="expected key.path=value"):
        load_config(_write(tmp_path, BASE), ["distill.steps"])


def test_a_folder_or_malformed_yaml_is_a_config_error_naming_where(tmp_path):
    """--config <a folder>, a YAML syntax error in the file or in a --set value: one ConfigError that
    says which, and where in the file, instead of a parser traceback."""
    with pytest.raises(ConfigError, match="is a folder; give a YAML file"):
        load_config(tmp_path)
    with pytest.raises(ConfigError, match=r"is not valid YAML: .* at line 2, column 1"):
        load_config(_write(tmp_path, "a: [1, 2\n"))
    with pytest.raises(ConfigError, match=r"--set 'distill.steps=\[1': the value is not valid YAML .*quote a string"):
        load_config(_write(tmp_path, BASE), ["distill.steps=[1"])


def test_an_empty_section_is_its_defaults_and_a_duplicate_key_is_an_error(tmp_path):
    """`data:` whose keys are all commented out reads as null: its defaults, not an AttributeError; a
    key given twice (PyYAML keeps the last) would silently drop the first section's settings."""
    cfg = load_config(_write(tmp_path, BASE + "distill:\n  # steps: 3\nevaluation:\n"), ["synthesis="])
    assert cfg.distill.steps == type(cfg.distill)().steps and cfg.evaluation.enabled
    with pytest.raises(ConfigError, match=r"is not valid YAML: duplicate key 'distill' at line 6, column 1"):
        load_config(_write(tmp_path, BASE + "distill: {steps: 3}\ndistill: {lr: 0.1}\n"))
    with pytest.raises(ConfigError, match=r"--set 'distill=\{steps: 1, steps: 2\}': the value is not valid YAML \(duplicate key 'steps'"):
        load_config(_write(tmp_path, BASE), ["distill={steps: 1, steps: 2}"])
    anchored = BASE + "x-common: &c {steps: 3, lr: 0.5}\n"  # a merge key: explicit keys may override what it brings
    with pytest.raises(ConfigError, match="x-common: Extra inputs"):  # (only to show the anchor parses)
        load_config(_write(tmp_path, anchored + "distill:\n  <<: *c\n  steps: 4\n"))


def test_path_rule_in_fast_evaluation_and_encode_configs(tmp_path, monkeypatch):
    """$DMM_HOME and ~ expand, and a relative path resolves against the config file's folder (against
    the current folder in an override), in `fast:` and in the configs of evaluate.py and encode_latents.py."""
    import sys

    from dmm_ray.evaluation.config import load_eval_config

    monkeypatch.setenv("DMM_HOME", str(tmp_path / "home"))
    folder = tmp_path / "cfgs"
    folder.mkdir()
    monkeypatch.chdir(tmp_path)
    merge = folder / "m.yaml"
    merge.write_text(BASE + "fast: {output_dir: $DMM_HOME/fast, synthesized: synth}\n")
    cfg = load_config(merge, ["fast.synthesized=here"]).with_absolute_paths()
    assert cfg.fast.output_dir == str(tmp_path / "home" / "fast") and cfg.fast.synthesized == str(tmp_path / "here")
    assert load_config(merge).fast.synthesized == str(folder / "synth")

    ev = folder / "e.yaml"
    ev.write_text("prompts_file: prompts.txt\ncache_dir: $DMM_HOME/cache\noutput_dir: results\n")
    e = load_eval_config(ev, ['output_dir="runs #3"'])  # an override's path: against the current folder
    assert (e.prompts_file, e.cache_dir, e.output_dir) == (str(folder / "prompts.txt"), str(tmp_path / "home" / "cache"), str(tmp_path / "runs #3"))

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from jobs.encode_latents import build_config, parse_args

    enc = folder / "d.yaml"
    enc.write_text("data:\n  base: $DMM_HOME/zoo/base\n  shards: latents\n  source: {kind: folder, root: images}\n")
    d = build_config(parse_args(["--config", str(enc)]))
    assert (d.base, d.shards, d.source.root) == (str(tmp_path / "home/zoo/base"), str(folder / "latents"), str(folder / "images"))
    assert build_config(parse_args(["--config", str(enc), "--out", "mine"])).shards == str(tmp_path / "mine")
    enc.write_text("data:\n  # base: x\n")
    with pytest.raises(ConfigError, match="no output folder"):  # an empty section, not an AttributeError
        build_config(parse_args(["--config", str(enc)]))


def test_encode_job_reads_a_merge_config_as_the_merge_does(tmp_path, monkeypatch):
    """encode_latents --config <a zoo merge config> read only the raw `data:` section: the zoo's image set
    and base were never filled in ("source.root: Field required"), nor data.shards' default
    <output_dir>/latents. It now encodes the data section the merge would, flags and --set on top."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from jobs.encode_latents import build_config, parse_args

    monkeypatch.chdir(tmp_path)
    zoo = tmp_path / "zoo"
    zoo.mkdir()
    (zoo / "zoo.yaml").write_text("base: base\ndataset: images\nteachers: [{name: a, source: teachers/a, format: diffusers}]\n")
    merge = tmp_path / "m.yaml"
    merge.write_text("name: toy-x\nzoo: ./zoo\ndata: {encode: {resolution: 32}, source: {limit: 8}}\n")
    d = build_config(parse_args(["--config", str(merge)]))
    assert d == load_config(merge).data
    assert (d.base, d.source.kind, d.source.root, d.source.limit) == (str(zoo / "base"), "folder", str(zoo / "images"), 8)
    assert d.shards == load_config(merge).output_dir + "/latents"
    d = build_config(
        parse_args(["--config", str(merge), "--out", "2024", "--batch-size", "8", "--set", "data.source.limit=4", "--set", "encode.dtype=float16"])
    )
    assert (d.shards, d.encode.batch_size, d.source.limit, d.encode.dtype) == (str(tmp_path / "2024"), 8, 4, "float16")


def test_tracking_uri_and_its_shorthand_together_are_an_error(tmp_path):
    """A file's `uri:` kept its value over a `--set tracking.tracking_uri=...`, silently."""
    with_uri = _write(tmp_path, BASE + "tracking: {uri: 'http://mlflow.internal:5000'}\n")
    with pytest.raises(
        ConfigError, match=r"tracking.uri \('http://mlflow.internal:5000'\) and tracking.tracking_uri \('sqlite:////x.db'\) are both given"
    ):
        load_config(with_uri, ["tracking.tracking_uri=sqlite:////x.db"])
    assert load_config(with_uri, ["tracking.uri=sqlite:////x.db"]).tracking.tracking_uri == "sqlite:////x.db"


def test_a_path_from_a_command_line_flag_is_taken_as_written():
    """--out 'runs #3' / --out 2024: a literal string, not YAML (a comment, a number)."""
    from dmm_ray.overrides import literal_override, parse_override

    for value in ("runs #3", "2024", "on", "a: b", 'q"u\\ote', "é 😀"):
        assert parse_override(literal_override("output_dir", value)) == (["output_dir"], value)


def test_zoo_teachers_takes_one_name_or_a_comma_list(tmp_path, monkeypatch):
    """--set zoo_teachers=noir (a YAML string) is one teacher, not the letters n, o, i, r."""
    from dmm_ray.zoo.build import build_zoo
    from dmm_ray.zoo.config import preset

    zoo = build_zoo(tmp_path / "zoo", preset("micro"), progress=False)
    names = [t["name"] for t in __import__("yaml").safe_load((zoo / "zoo.yaml").read_text())["teachers"]]
    one = load_config(None, [f"zoo={zoo}", f"zoo_teachers={names[1]}", f"output_dir={tmp_path / 'o'}"])
    assert [t.name for t in one.teachers] == [names[1]]
    two = load_config(None, [f"zoo={zoo}", f"zoo_teachers={names[2]},0", f"output_dir={tmp_path / 'o'}"])
    assert [t.name for t in two.teachers] == [names[2], names[0]]
    with pytest.raises(ConfigError, match="zoo_teachers: 'nope' is not a teacher"):
        load_config(None, [f"zoo={zoo}", "zoo_teachers=nope", f"output_dir={tmp_path / 'o'}"])
    with pytest.raises(ConfigError, match="zoo_teachers: give teacher names or indices .* got 1.5"):
        load_config(None, [f"zoo={zoo}", "zoo_teachers=1.5", f"output_dir={tmp_path / 'o'}"])


def test_a_typo_is_reported_before_a_zoo_preset_is_built(tmp_path, monkeypatch):
    """`jobs/merge.py --set distill.stepz=3` on a fresh $DMM_HOME: the typo (or a value out of range)
    stops the job at once, not after the ~11 minutes of building `zoo: full`; what the zoo fills in
    (teachers, base, data paths) and reads (zoo_teachers) still waits for the build."""
    from pathlib import Path

    Built = _zoo_build_refused(tmp_path, monkeypatch)
    toy = Path(__file__).resolve().parents[1] / "jobs" / "configs" / "toy.yaml"
    with pytest.raises(ConfigError, match=r"distill.stepz: Extra inputs are not permitted \(got 3\); did you mean distill.steps\?"):
        load_config(toy, ["distill.stepz=3"], build_zoo=True)
    with pytest.raises(ConfigError, match=r"distill.steps: Input should be greater than or equal to 0 \(got -3\)"):
        load_config(toy, ["distill.steps=-3"], build_zoo=True)
    for fine in ([], ["zoo_teachers=noir"], ["zoo_teachers=noir,neon", "distill.steps=5"]):
        with pytest.raises(Built):
            load_config(toy, fine, build_zoo=True)


def test_an_empty_teacher_list_with_a_zoo_is_refused_before_the_zoo_is_built(tmp_path, monkeypatch):
    """`teachers: []` beside a zoo was taken as unset: every zoo teacher was merged (an incremental merge
    adding no teacher was refused as adding all of the previous model's styles again); `zoo_teachers: []`
    was told "give at least one teacher (or zoo: a zoo.yaml)" though a zoo was given. Each names itself
    now, before a zoo preset is built; null (`--set zoo_teachers=`) is still unset."""
    from pathlib import Path

    Built = _zoo_build_refused(tmp_path, monkeypatch)
    incremental = Path(__file__).resolve().parents[1] / "jobs" / "configs" / "toy_incremental.yaml"
    with pytest.raises(
        ConfigError, match=r"zoo_teachers: \[\] picks no teacher of zoo full; name at least one \(for an incremental merge, the new ones\)"
    ):
        load_config(incremental, ["zoo_teachers=[]"], build_zoo=True)
    with pytest.raises(ConfigError, match=r"teachers: \[\] lists no teacher; list at least one .* or leave it out to take zoo full's"):
        load_config(incremental, ["teachers=[]"], build_zoo=True)
    with pytest.raises(Built):  # unset: the zoo's teachers, read once it is built
        load_config(incremental, ["zoo_teachers="], build_zoo=True)


def test_evaluation_config_sections_are_checked(tmp_path):
    """--section that the file lacks, or a whole merge config read without --section: a ConfigError
    that names the sections (a silently empty section would start an evaluation with the defaults)."""
    from pathlib import Path

    from dmm_ray.evaluation.config import load_eval_config

    toy = Path(__file__).resolve().parents[1] / "jobs" / "configs" / "toy.yaml"
    with pytest.raises(ConfigError, match=r"has no section 'eval'; it has: .*evaluation"):
        load_eval_config(toy, [], "eval")
    with pytest.raises(ConfigError, match="is a merge config: add --section evaluation"):
        load_eval_config(toy, [])


def test_evaluate_job_reads_a_merge_configs_evaluation_section():
    """`jobs/evaluate.py --config jobs/configs/toy.yaml --section evaluation` (what the fidelity curve's
    second seed set runs) takes the merge section's shorthands, with --set overrides on top."""
    from pathlib import Path

    from dmm_ray.evaluation.config import load_eval_config

    toy = Path(__file__).resolve().parents[1] / "jobs" / "configs" / "toy.yaml"
    cfg = load_eval_config(toy, ["seed_a=2000000", "seed_b=3000000", "num_inference_steps=4"], "evaluation")
    assert cfg.max_prompts == 32 and cfg.images_per_prompt == 4
    assert cfg.sampler.num_inference_steps == 4 and cfg.sampler.guidance_scale == 5.0 and cfg.sampler.negative_prompt == ""
    assert (cfg.seed_a, cfg.seed_b) == (2000000, 3000000)


def test_an_override_reaches_into_an_empty_section_and_a_comment_is_not_swallowed(tmp_path):
    """`--set sampler.x=1` on a file whose `sampler:` has every key commented out (YAML: null) sets the
    key in that section (it was "sampler is not a section"), in both config loaders; an unquoted
    ` #` in a value, which YAML drops as a comment (`output_dir=runs #3` became `runs`), is an error."""
    from dmm_ray.evaluation.config import load_eval_config

    ev = _write(tmp_path, "sampler:\n  # num_inference_steps: 10\n")
    assert load_eval_config(ev, ["sampler.num_inference_steps=3"]).sampler.num_inference_steps == 3
    cfg = load_config(_write(tmp_path, BASE + "distill:\n  # steps: 3\n"), ["distill.steps=5"])
    assert cfg.distill.steps == 5 and cfg.distill.lr == type(cfg.distill)().lr
    for bad, cut in [("output_dir=runs #3", "'runs'"), ("name=#2", "None"), ("evaluation.prompts=[a, b] #c", r"\['a', 'b'\]")]:
        with pytest.raises(ConfigError, match=rf"as a comment, so the value would be {cut}; quote it"):
            load_config(_write(tmp_path, BASE), [bad])
    assert load_config(_write(tmp_path, BASE), ['name="dmm #2"', "output_dir=runs#3"]).name == "dmm #2"


def test_one_override_parser_for_merge_and_evaluation_configs():
    """`--set` means the same in jobs/merge.py and jobs/evaluate.py: YAML values, list indexing,
    sections created on the way, and a clear error without '='."""
    from dmm_ray.evaluation.config import load_eval_config
    from dmm_ray.overrides import apply_overrides

    tree = apply_overrides({"teachers": [{"name": "a"}]}, ["teachers.0.name=b", "distill.steps=3", "x.flag=true"])
    assert tree == {"teachers": [{"name": "b"}], "distill": {"steps": 3}, "x": {"flag": True}}
    cfg = load_eval_config(None, ['prompts=["a cat", "a dog"]', "prompts.1=a fox", "num_inference_steps=3"])
    assert cfg.prompts == ["a cat", "a fox"] and cfg.sampler.num_inference_steps == 3  # list indexing, as in the merge job
    with pytest.raises(ConfigError, match="expected key.path=value"):
        load_eval_config(None, ["num_inference_steps"])


@pytest.mark.parametrize(
    "override, message",
    [
        ("teachers.9.name=x", r"--set teachers.9.name: teachers is a list of 3 item\(s\), so '9' must be an item number \(valid: 0 to 2\)"),
        ("teachers.x.name=x", r"so 'x' must be an item number \(valid: 0 to 2\)"),
        ("teachers.3=x", r"so '3' must be an item number"),
        ("teachers.-1.name=x", r"so '-1' must be an item number"),
        ("synthesis.prompts.0=x", r"--set synthesis.prompts.0: synthesis.prompts is not set, so it has no item 0 to change"),
    ],
)
def test_a_list_index_that_is_not_there_is_a_config_error(tmp_path, override, message):
    """--set teachers.9.name=x on 3 teachers (or a word, or a negative number, in place of the item
    number) is a ConfigError naming the list and its valid numbers, not an IndexError traceback; an
    item of a list that is not set is not silently created as a mapping."""
    with pytest.raises(ConfigError, match=message):
        load_config(_write(tmp_path, BASE), [override])


def test_typed_evaluation_and_tracking_sections(tmp_path, monkeypatch):
    """`evaluation:` is an EvalConfig and `tracking:` a TrackingConfig: the section shorthands work,
    the merge's defaults fill only what the user left unset (standalone configs keep their own),
    a dump re-validates to the same config (what Ray workers rebuild), unknown keys name the key."""
    import pydantic

    from dmm_ray import paths
    from dmm_ray.config import MergeConfig, TrackingConfig
    from dmm_ray.distill.trainer import stage_config
    from dmm_ray.evaluation.config import EvalConfig

    monkeypatch.setenv("DMM_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    text = BASE + "name: proj\noutput_dir: /x/out\n"
    text += "evaluation: {prompts: p.txt, num_prompts: 3, feature_net: fnet, resolution: 64, num_inference_steps: 4}\n"
    text += "tracking: {uri: sqlite:///db/m.db}\n"
    cfg = load_config(_write(tmp_path, text))
    ev = cfg.evaluation
    assert isinstance(ev, EvalConfig) and isinstance(cfg.tracking, TrackingConfig)
    assert ev.prompts_file == str(tmp_path / "p.txt") and ev.max_prompts == 3
    assert ev.extractor.kind == "zoo" and ev.extractor.path == str(tmp_path / "fnet")
    assert (ev.sampler.height, ev.sampler.width, ev.sampler.num_inference_steps) == (64, 64, 4)
    assert ev.output_dir == "/x/out/evaluation" and ev.cache_dir == str(tmp_path / "home" / "cache" / "fid")
    assert {"output_dir", "cache_dir"}.isdisjoint(ev.model_fields_set)  # merge defaults, not the user's
    tr = cfg.tracking
    assert tr.tracking_uri == f"sqlite:///{tmp_path}/db/m.db" and tr.project == tr.registered_model_name == "proj"
    assert "project" not in tr.model_fields_set  # jobs/fast.py: a merged model's own name may replace it

    # explicit values win over the merge defaults; a URI output_dir evaluates in its staging folder
    mine = load_config(_write(tmp_path, BASE + "output_dir: s3://bucket/run\nevaluation: {output_dir: /e, cache_dir: /c}\ntracking: {project: P}\n"))
    assert (mine.evaluation.output_dir, mine.evaluation.cache_dir) == ("/e", "/c")
    assert (mine.tracking.project, mine.tracking.registered_model_name) == ("P", "dmm-merge")
    remote = load_config(_write(tmp_path, BASE + "output_dir: s3://bucket/run\n"))
    assert remote.evaluation.output_dir == str(paths.staging_dir("s3://bucket/run") / "evaluation")

    # standalone configs keep their own output defaults; the FID cache is the merge's, under $DMM_HOME
    assert (EvalConfig().output_dir, EvalConfig().cache_dir) == ("outputs/eval", str(tmp_path / "home" / "cache" / "fid"))
    assert (TrackingConfig().project, TrackingConfig().registered_model_name) == ("dmm-merge", "dmm-merged")

    # relative locations of a config built in Python: absolute against the same root as output_dir
    built = MergeConfig.model_validate({**cfg.model_dump(), "output_dir": "rel", "evaluation": {"prompts": "q.txt"}})
    assert built.evaluation.output_dir == "rel/evaluation"
    fixed = built.with_absolute_paths()
    assert fixed.evaluation.output_dir == str(tmp_path / "rel" / "evaluation") and fixed.evaluation.prompts_file == str(tmp_path / "q.txt")
    assert fixed.evaluation.model_fields_set == built.evaluation.model_fields_set

    # the round trip Ray workers make (and MLflow params log): the same config again
    for c in (cfg, mine, remote, fixed, stage_config(cfg, steps=3)):
        for mode in ("python", "json"):
            again = MergeConfig.model_validate(c.model_dump(mode=mode))
            assert again == c and again.model_dump(mode=mode) == c.model_dump(mode=mode)

    # unknown keys name the section and the key
    for override, key in (("evaluation.num_prompt=3", "evaluation.num_prompt"), ("tracking.project_name=x", "tracking.project_name")):
        with pytest.raises(ConfigError, match=key + ": Extra inputs are not permitted"):
            load_config(_write(tmp_path, BASE), [override])
    for section, key in (("evaluation", "feature_nett"), ("tracking", "urii")):
        with pytest.raises(pydantic.ValidationError, match=rf"{section}\.{key}\n  Extra inputs are not permitted"):
            MergeConfig.model_validate({**cfg.model_dump(), section: {key: 1}})


def test_a_stage_worker_reads_one_typed_stage_config(tmp_path):
    """build_trainer hands its workers a StageConfig (as JSON) and nothing else: the fine-tune's own
    steps/lr/batch live in its MergeConfig; stage, start points and the MLflow run are typed fields."""
    import pydantic

    from dmm_ray.config import StageConfig
    from dmm_ray.distill.trainer import stage_config

    cfg = load_config(_write(tmp_path, BASE))
    spec = StageConfig(
        merge=stage_config(cfg, steps=7, lr=2e-5, batch_size=3), stage="finetune", init_student="/s", tracking={"uri": "u", "run_id": "r"}
    )
    again = StageConfig.model_validate(spec.model_dump(mode="json"))  # what a worker rebuilds
    assert again == spec
    assert (again.merge.distill.steps, again.merge.distill.lr, again.merge.data.stream.batch_size) == (7, 2e-5, 3)
    assert again.init_state is None and again.tracking["run_id"] == "r"
    with pytest.raises(pydantic.ValidationError, match="steps"):  # no loose keys beside the typed config
        StageConfig.model_validate({**spec.model_dump(mode="json"), "steps": 3})
    with pytest.raises(pydantic.ValidationError, match="stage"):
        StageConfig.model_validate({**spec.model_dump(mode="json"), "stage": "pretrain"})


def test_a_number_as_name_is_that_name(tmp_path):
    cfg = load_config(_write(tmp_path, BASE), ["name=2024"])  # YAML reads 2024 as a number
    assert cfg.name == "2024" and cfg.output_dir.endswith("/outputs/2024") and cfg.tracking.registered_model_name == "2024"


def test_a_missing_zoo_folder_is_built_where_it_is_named(tmp_path, monkeypatch):
    """`zoo: ./myzoo` (a folder not built yet) advises `build_zoo.py --out .../myzoo`, the folder itself
    (it advised its parent, where the zoo would not be found); `zoo: z/zoo.yaml` advises `--out z`."""
    monkeypatch.chdir(tmp_path)
    for value, out in [("./myzoo", tmp_path / "myzoo"), ("z/zoo.yaml", tmp_path / "z")]:
        with pytest.raises(ConfigError, match=rf"build it with `python jobs/build_zoo.py --out {re.escape(str(out))}`"):
            load_config(_write(tmp_path, BASE), [f"zoo={value}"])


def _zoo_build_refused(tmp_path, monkeypatch) -> type[Exception]:
    """A fresh DMM_HOME whose zoo preset build raises the returned exception: a config that passes its
    checks reaches the build and stops there, one that fails them never gets that far."""
    import dmm_ray.zoo.build

    class Built(Exception):
        pass

    def build(*args, **kwargs):
        raise Built

    monkeypatch.setenv("DMM_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(dmm_ray.zoo.build, "ensure_zoo_preset", build)
    return Built


def test_what_the_zoo_fills_in_is_what_the_user_left_unset(tmp_path):
    """A key beside `zoo:` that is null (`--set student.base=`: the field's own default, the zoo's) takes
    the zoo's value as a missing key does: it was kept, and the merge refused with 'give the student base
    ... (or zoo:)' though a zoo was given. And the user's `evaluation.prompts_file` is kept: the zoo's
    prompts file (filled in as the shorthand `prompts: <file>`) was written over it without a word."""
    zoo = tmp_path / "zoo"
    zoo.mkdir()
    (zoo / "zoo.yaml").write_text(
        "base: base\ndataset: images\neval_prompts: eval_prompts.txt\nfeature_net: feature_net\nteachers: [{name: a, source: teachers/a}]\n"
    )
    (tmp_path / "mine.txt").write_text("a cat\n")
    unset = load_config(None, [f"zoo={zoo}", f"output_dir={tmp_path / 'o'}"])
    nulls = ["student.base=", "data.base=", "data.source.root=", "evaluation.prompts=", "evaluation.feature_net="]
    cfg = load_config(None, [f"zoo={zoo}", f"output_dir={tmp_path / 'o'}", *nulls])
    assert cfg.student.base == cfg.data.base == unset.student.base == str(zoo / "base")
    assert cfg.data.source == unset.data.source and cfg.data.source.root == str(zoo / "images")
    assert cfg.evaluation.prompts_file == unset.evaluation.prompts_file == str(zoo / "eval_prompts.txt")
    assert cfg.evaluation.extractor == unset.evaluation.extractor and cfg.evaluation.extractor.path == str(zoo / "feature_net")
    mine = load_config(None, [f"zoo={zoo}", f"output_dir={tmp_path / 'o'}", f"evaluation.prompts_file={tmp_path / 'mine.txt'}"])
    assert mine.evaluation.prompts_file == str(tmp_path / "mine.txt") and mine.evaluation.load_prompts() == ["a cat"]


def test_a_yaml_boolean_in_zoo_teachers_is_refused_not_taken_as_an_index(tmp_path, monkeypatch):
    """YAML 1.1 reads an unquoted no/off (yes/on) as False (True), which Python takes as the index 0 (1):
    `zoo_teachers: [no, noir]` merged the zoo's first teacher without a word. Refused, saying how to
    quote it, before a zoo preset is built; a quoted name is a name."""
    from pathlib import Path

    Built = _zoo_build_refused(tmp_path, monkeypatch)
    toy = Path(__file__).resolve().parents[1] / "jobs" / "configs" / "toy.yaml"
    for value, word in [("[no, noir]", "no"), ("[on]", "yes"), ("off", "no")]:
        with pytest.raises(
            ConfigError, match=re.escape(f"""quote a teacher's name (zoo_teachers: ["{word}"], or --set 'zoo_teachers=["{word}"]')""")
        ):
            load_config(toy, [f"zoo_teachers={value}"], build_zoo=True)
    with pytest.raises(Built):
        load_config(toy, ['zoo_teachers=["no", noir]'], build_zoo=True)
