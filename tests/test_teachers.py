import pytest
import torch
from diffusers import StableDiffusionPipeline

from dmm_ray import TeacherSpec, load_teacher
from dmm_ray.formats.single_file import export_single_file
from dmm_ray.teachers import TeacherArchitectureError, TeacherError, teacher_checksum, validate_teachers
from dmm_ray.tiny import tiny_sd_components


def _perturbed(seed):
    """A 'fine-tuned' teacher: the base with its UNet nudged."""
    c = tiny_sd_components(seed=0)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in c["unet"].parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=g))
    return StableDiffusionPipeline(**c)


@pytest.fixture(scope="session")
def teacher_files(tiny_base_dir, tmp_path_factory):
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    root = tmp_path_factory.mktemp("teachers")
    folder = _perturbed(1)
    folder.save_pretrained(root / "folder")
    single = _perturbed(2)
    export_single_file(single, root / "single.safetensors")
    lora_pipe = StableDiffusionPipeline.from_pretrained(tiny_base_dir)
    torch.manual_seed(3)
    lora_pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_lora_weights="gaussian"))
    with torch.no_grad():
        for name, p in lora_pipe.unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    StableDiffusionPipeline.save_lora_weights(root / "lora", unet_lora_layers=get_peft_model_state_dict(lora_pipe.unet), safe_serialization=True)
    return dict(root=root, folder_pipe=folder, single_pipe=single, lora_pipe=lora_pipe)


def _unet_out(unet):
    g = torch.Generator().manual_seed(0)
    x, h = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 77, 32, generator=g)
    with torch.no_grad():
        return unet(x, torch.tensor([300]), h).sample


def test_three_formats_load_frozen(teacher_files, tiny_base_dir):
    root = teacher_files["root"]
    specs = [
        TeacherSpec(name="folder", source=str(root / "folder")),
        TeacherSpec(name="single", source=str(root / "single.safetensors"), base=str(tiny_base_dir)),
        TeacherSpec(name="lora", source=str(root / "lora" / "pytorch_lora_weights.safetensors"), base=str(tiny_base_dir)),
    ]
    assert [s.resolved_format() for s in specs] == ["diffusers", "single_file", "lora"]
    validate_teachers(specs, str(tiny_base_dir))
    teachers = [load_teacher(s) for s in specs]
    for t in teachers:
        assert not any(p.requires_grad for p in t.unet.parameters())
        assert not any(p.requires_grad for p in t.text_encoder.parameters())
    # single-file export -> load is bit-exact
    a, b = teacher_files["single_pipe"].unet.state_dict(), teachers[1].unet.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the fused LoRA teacher computes what the base + active adapter computes
    torch.testing.assert_close(_unet_out(teachers[2].unet), _unet_out(teacher_files["lora_pipe"].unet), rtol=1e-4, atol=1e-5)
    base = load_teacher(TeacherSpec(name="base", source=str(tiny_base_dir)))
    assert not torch.allclose(_unet_out(teachers[2].unet), _unet_out(base.unet))


def test_architecture_mismatch_names_teacher_and_field(tmp_path, tiny_base_dir):
    StableDiffusionPipeline(**tiny_sd_components(seed=0, cross_attention_dim=16)).save_pretrained(tmp_path / "odd")
    with pytest.raises(TeacherArchitectureError, match=r"teacher 'odd'.*unet.cross_attention_dim is 16 .* has 32"):
        validate_teachers([TeacherSpec(name="odd", source=str(tmp_path / "odd"))], str(tiny_base_dir))
    export_single_file(StableDiffusionPipeline.from_pretrained(tmp_path / "odd"), tmp_path / "odd.safetensors")
    with pytest.raises(TeacherArchitectureError, match=r"teacher 'odd1'.*attn2.to_k.weight has shape"):
        validate_teachers([TeacherSpec(name="odd1", source=str(tmp_path / "odd.safetensors"), base=str(tiny_base_dir))], str(tiny_base_dir))


def test_a_zero_terminal_snr_teacher_has_another_noise_schedule(tmp_path, tiny_base_dir):
    """rescale_betas_zero_snr changes the betas (alpha_bar at the last step is 0), which validation did not
    compare: such a teacher was accepted against a base without it. A scheduler whose config leaves the
    key out (PNDM has none) has the schedulers' default, False."""
    import json
    import shutil

    def with_scheduler(name, **changes):
        folder = tmp_path / name
        shutil.copytree(tiny_base_dir, folder)
        path = folder / "scheduler" / "scheduler_config.json"
        config = {**json.loads(path.read_text()), **changes}
        path.write_text(json.dumps({k: v for k, v in config.items() if v is not None}))
        return str(folder)

    with pytest.raises(TeacherArchitectureError, match=r"teacher 'zsnr'.*scheduler.rescale_betas_zero_snr is True but the student base has False"):
        validate_teachers([TeacherSpec(name="zsnr", source=with_scheduler("zsnr", rescale_betas_zero_snr=True))], str(tiny_base_dir))
    validate_teachers([TeacherSpec(name="nokey", source=with_scheduler("nokey", rescale_betas_zero_snr=None))], str(tiny_base_dir))


def test_a_teacher_unet_of_other_tensor_shapes_is_refused_whatever_its_format(tmp_path, tiny_base_dir):
    """validate_teachers compared 9 UNet config fields of a diffusers teacher (or a file teacher's base:),
    not its tensors: use_linear_projection (Linear proj_in/proj_out) or transformer_layers_per_block 2 was
    accepted, and the style adapters' start (teacher weight minus base weight) failed inside the workers."""
    from diffusers import UNet2DConditionModel

    from dmm_ray.tiny import tiny_unet_config

    def teacher(name, **unet):
        components = tiny_sd_components(seed=0)
        components["unet"] = UNet2DConditionModel(**tiny_unet_config(), **unet)
        StableDiffusionPipeline(**components).save_pretrained(tmp_path / name)
        return str(tmp_path / name)

    linear = teacher("linear", use_linear_projection=True)
    with pytest.raises(
        TeacherArchitectureError,
        match=r"teacher 'linear'.*proj_in.weight has shape \(32, 32\) but the student base has it with shape \(32, 32, 1, 1\)",
    ):
        validate_teachers([TeacherSpec(name="linear", source=linear)], str(tiny_base_dir))
    export_single_file(StableDiffusionPipeline.from_pretrained(linear), tmp_path / "linear.safetensors")
    with pytest.raises(TeacherArchitectureError, match=r"teacher 'file' \(.*linear.safetensors, base .*linear\): UNet tensor .*proj_in.weight"):
        validate_teachers([TeacherSpec(name="file", source=str(tmp_path / "linear.safetensors"), base=linear)], str(tiny_base_dir))
    deeper = teacher("deeper", transformer_layers_per_block=2)
    with pytest.raises(
        TeacherArchitectureError, match=r"teacher 'deeper'.*UNet tensor\(s\) the student base does not have \(e.g. .*transformer_blocks.1"
    ):
        validate_teachers([TeacherSpec(name="deeper", source=deeper)], str(tiny_base_dir))


def test_corrupt_missing_and_pickled_files(teacher_files, tiny_base_dir, tmp_path):
    good = (teacher_files["root"] / "single.safetensors").read_bytes()
    (tmp_path / "trunc.safetensors").write_bytes(good[: len(good) // 2])
    with pytest.raises(TeacherError, match="teacher 'cut'.*truncated or not a valid safetensors"):
        load_teacher(TeacherSpec(name="cut", source=str(tmp_path / "trunc.safetensors"), base=str(tiny_base_dir)))
    (tmp_path / "junk.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(TeacherError, match="teacher 'junk'"):
        load_teacher(TeacherSpec(name="junk", source=str(tmp_path / "junk.safetensors"), base=str(tiny_base_dir)))
    with pytest.raises(TeacherError, match="teacher 'gone'.*does not exist"):
        load_teacher(TeacherSpec(name="gone", source=str(tmp_path / "nope.safetensors")))
    with pytest.raises(TeacherError, match="needs `base:`"):
        load_teacher(TeacherSpec(name="nobase", source=str(teacher_files["root"] / "single.safetensors")))
    from safetensors.torch import load_file

    torch.save(load_file(str(teacher_files["root"] / "single.safetensors")), tmp_path / "t.ckpt")
    with pytest.raises(TeacherError, match="pickled checkpoint.*allow_pickle"):
        load_teacher(TeacherSpec(name="pkl", source=str(tmp_path / "t.ckpt"), base=str(tiny_base_dir)))
    teacher = load_teacher(TeacherSpec(name="pkl", source=str(tmp_path / "t.ckpt"), base=str(tiny_base_dir), allow_pickle=True))
    assert torch.equal(teacher.unet.conv_in.weight, teacher_files["single_pipe"].unet.conv_in.weight)


def test_a_lora_teacher_that_is_no_safetensors_file_says_so(teacher_files, tiny_base_dir, tmp_path):
    """format: lora on a pickled .bin LoRA (diffusers' older default) was read as a safetensors file: the file
    checks called it truncated ("copy or download it again") and validate_teachers raised safetensors' own
    SafetensorError. A LoRA teacher is one .safetensors file, and the error says so and how to convert."""
    from safetensors.torch import load_file

    from dmm_ray.teachers import check_teacher_files

    torch.save(load_file(str(teacher_files["root"] / "lora" / "pytorch_lora_weights.safetensors")), tmp_path / "lora.bin")
    for source in (tmp_path / "lora.bin", teacher_files["root"] / "lora"):  # a pickled LoRA; the folder save_lora_weights wrote
        spec = TeacherSpec(name="old", source=str(source), format="lora", base=str(tiny_base_dir), allow_pickle=True)
        for check in (lambda: check_teacher_files([spec]), lambda: validate_teachers([spec], str(tiny_base_dir)), lambda: load_teacher(spec)):
            with pytest.raises(TeacherError, match=rf"teacher 'old': {source.name} is not a .safetensors file, and a LoRA teacher .*is one"):
                check()
    spec = TeacherSpec(name="pkl", source=str(tmp_path / "lora.bin"), format="single_file", base=str(tiny_base_dir), allow_pickle=True)
    with pytest.raises(
        TeacherError, match=r"teacher 'pkl': lora.bin is not a .safetensors file, and a single_file teacher is one; .* is format ckpt"
    ):
        check_teacher_files([spec])


def test_a_lora_read_as_a_whole_checkpoint_says_it_is_a_lora(teacher_files, tiny_base_dir, tmp_path):
    """A pickled .bin LoRA with no format (allow_pickle) is found to be a .ckpt, and a LoRA given format
    single_file is read as one: both were refused with "the file holds no VAE weights ... use the complete
    checkpoint", which sent the user looking for a checkpoint. The error says the file is a LoRA, what a
    LoRA teacher is, and (for the pickled one) how to convert it."""
    from safetensors.torch import load_file

    lora = teacher_files["root"] / "lora" / "pytorch_lora_weights.safetensors"
    torch.save(load_file(str(lora)), tmp_path / "lora.bin")
    pickled = TeacherSpec(name="old", source=str(tmp_path / "lora.bin"), base=str(tiny_base_dir), allow_pickle=True)
    is_a_lora = r"the file holds LoRA weights \(.*lora.*, \.\.\.\), not a whole checkpoint; a LoRA teacher is format: lora with base: and one .safetensors file"
    with pytest.raises(TeacherError, match=rf"teacher 'old' .*: {is_a_lora}; a pickled .bin/.pt LoRA, .* converts with safetensors.torch.save_file"):
        validate_teachers([pickled], str(tiny_base_dir))
    as_single = TeacherSpec(name="single", source=str(lora), format="single_file", base=str(tiny_base_dir))
    with pytest.raises(TeacherError, match=rf"teacher 'single' .*: {is_a_lora}$"):
        validate_teachers([as_single], str(tiny_base_dir))


def test_lora_scale_on_a_teacher_that_is_no_lora_is_refused(teacher_files, tiny_base_dir):
    """lora_scale on a diffusers, single_file or ckpt teacher was ignored without a word (only a LoRA is fused
    at a scale). Refused, naming the teacher and the key: with the config when the format is given, by the
    file checks when it is found from the files; the default 1.0 (every merge record lists it) stays fine."""
    from pydantic import ValidationError

    from dmm_ray.teachers import check_teacher_files

    root, base = teacher_files["root"], str(tiny_base_dir)
    refused = r"teacher 'x': lora_scale 0.5 scales a LoRA teacher \(format lora\), and this one is format {}, which has no LoRA to scale"
    with pytest.raises(ValidationError, match=refused.format("diffusers")):
        TeacherSpec(name="x", source=str(root / "folder"), format="diffusers", lora_scale=0.5)
    for source, fmt in ((root / "folder", "diffusers"), (root / "single.safetensors", "single_file")):  # the format found from the files
        spec = TeacherSpec(name="x", source=str(source), base=base, lora_scale=0.5)
        with pytest.raises(TeacherError, match=refused.format(fmt)):
            check_teacher_files([spec])
    lora = TeacherSpec(name="x", source=str(root / "lora" / "pytorch_lora_weights.safetensors"), base=base, lora_scale=0.5)
    check_teacher_files([lora, TeacherSpec(name="y", source=str(root / "folder"), format="diffusers", lora_scale=1.0)])


def test_a_merge_record_with_lora_scale_on_a_teacher_that_is_no_lora_still_reads(teacher_files, tiny_base_dir, tmp_path, caplog):
    """Until lora_scale on a teacher that is no LoRA was refused, a config could give it (it did nothing), and
    the merged model's dmm_merge.json lists it: reading that record (an incremental merge's old styles, the
    few-step stage, an export's provenance) failed with the refusal. Such a record reads with lora_scale 1.0
    and a warning, its format given or found from the files; a LoRA keeps its scale; a new spec is still refused."""
    import json
    import logging

    from pydantic import ValidationError

    from dmm_ray.export import teacher_checksums
    from dmm_ray.merged_model import MERGE_RECORD, recorded_teachers

    root, base = teacher_files["root"], str(tiny_base_dir)
    teachers = [  # as save_merged writes them (TeacherSpec.model_dump)
        {"name": "a", "source": str(root / "folder"), "format": "diffusers", "base": None, "lora_scale": 0.5},
        {"name": "b", "source": str(root / "single.safetensors"), "format": None, "base": base, "lora_scale": 0.7},
        {"name": "c", "source": str(root / "lora" / "pytorch_lora_weights.safetensors"), "format": "lora", "base": base, "lora_scale": 0.3},
    ]
    teachers = [{**t, "description": "", "allow_pickle": False} for t in teachers]
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text(json.dumps({"style_names": ["a", "b", "c"]}))
    (tmp_path / MERGE_RECORD).write_text(json.dumps({"name": "old", "styles": ["a", "b", "c"], "teachers": teachers}))
    with caplog.at_level(logging.WARNING, logger="dmm_ray.teachers"):
        specs = recorded_teachers(tmp_path)
    assert [(t.name, t.lora_scale) for t in specs] == [("a", 1.0), ("b", 1.0), ("c", 0.3)]
    assert "teacher 'a': the merged model's record gives lora_scale 0.5 on a diffusers teacher" in caplog.text
    assert "teacher 'b': the merged model's record gives lora_scale 0.7 on a single_file teacher" in caplog.text and "'c'" not in caplog.text
    provenance = teacher_checksums({"teachers": teachers})
    assert [t["format"] for t in provenance] == ["diffusers", "single_file", "lora"]
    # the checksum a config of the same teacher without lora_scale gives: what the merge read
    assert provenance[0]["checksum"] == teacher_checksum(TeacherSpec(name="a", source=str(root / "folder"), format="diffusers"))
    with pytest.raises(ValidationError, match="lora_scale 0.5 scales a LoRA teacher"):
        TeacherSpec.model_validate(teachers[0])  # a new config's teacher


def test_every_teacher_with_a_problem_is_named_at_once(teacher_files, tiny_base_dir, tmp_path):
    """A config whose paths are all wrong says so once, one line per teacher, not one per run."""
    from dmm_ray.teachers import check_teacher_files

    specs = [TeacherSpec(name=f"t{i}", source=str(tmp_path / f"gone{i}.safetensors"), base=str(tiny_base_dir)) for i in range(3)]
    good = TeacherSpec(name="ok", source=str(teacher_files["root"] / "single.safetensors"), base=str(tiny_base_dir))
    with pytest.raises(TeacherError, match=r"3 of 4 teachers cannot be used:\n  teacher 't0'.*\n  teacher 't1'.*\n  teacher 't2'") as e:
        check_teacher_files([specs[0], good, specs[1], specs[2]])
    assert "'ok'" not in str(e.value)
    with pytest.raises(TeacherError, match="^teacher 't1'.*does not exist"):  # a single problem: its own message, unchanged
        check_teacher_files([good, specs[1]])


def test_checksum_tracks_content(teacher_files, tmp_path):
    import shutil

    shutil.copytree(teacher_files["root"] / "folder", tmp_path / "copy")
    a = teacher_checksum(TeacherSpec(name="t", source=str(teacher_files["root"] / "folder")))
    b = teacher_checksum(TeacherSpec(name="t", source=str(tmp_path / "copy")))
    assert a == b
    teacher_files["single_pipe"].save_pretrained(tmp_path / "copy")
    assert teacher_checksum(TeacherSpec(name="t", source=str(tmp_path / "copy"))) != a


def test_checksum_leaves_out_hidden_download_metadata(teacher_files, tmp_path):
    """`hf download --local-dir` writes .cache/huggingface/download/<file>.metadata (commit, etag, download
    time) into the folder; files_checksum hashed it, so the same teacher downloaded again got another
    checksum and a merge re-run was refused as other settings. Hidden entries below the root are left out,
    a root that is itself hidden (`--zoo .zoo`) is not, and the model's own files still count."""
    import shutil

    folder = tmp_path / ".zoo" / "teacher"
    shutil.copytree(teacher_files["root"] / "folder", folder)
    spec = TeacherSpec(name="t", source=str(folder))
    clean = teacher_checksum(spec)
    assert clean == teacher_checksum(TeacherSpec(name="t", source=str(teacher_files["root"] / "folder")))
    meta = folder / ".cache" / "huggingface" / "download" / "unet" / "diffusion_pytorch_model.safetensors.metadata"
    meta.parent.mkdir(parents=True)
    (folder / ".cache" / "huggingface" / ".gitignore").write_text("*\n")
    for downloaded_at in ("1765000000.1", "1765000960.7"):  # downloaded twice, the same files
        meta.write_text(f'0123abcd\n"etag"\n{downloaded_at}\n')
        assert teacher_checksum(spec) == clean
    (folder / "unet" / ".DS_Store").write_bytes(b"finder")
    assert teacher_checksum(spec) == clean
    (folder / "unet" / "config.json").write_text((folder / "unet" / "config.json").read_text() + " ")
    assert teacher_checksum(spec) != clean


@pytest.mark.parametrize("size", [6, 8, 11])  # between one and two chunks, exactly two, over two
def test_checksum_sees_an_edit_in_a_files_last_chunk(tmp_path, size):
    """The first and last `chunk` bytes are hashed: a file under two chunks long had its tail after the
    first chunk skipped, so a LoRA of 16-32 MiB edited there kept its checksum (and resumed as unchanged)."""
    from dmm_ray.teachers import files_checksum

    path = tmp_path / "lora.safetensors"
    path.write_bytes(b"a" * size)
    before = files_checksum([path], chunk=4)
    path.write_bytes(b"a" * (size - 1) + b"b")
    assert files_checksum([path], chunk=4) != before


def test_file_checks_say_what_is_wrong_with_the_path(tiny_base_dir, tmp_path):
    """A folder given as a single file, a diffusers folder that is not there: said as such."""
    from dmm_ray.teachers import check_teacher_files

    with pytest.raises(TeacherError, match="teacher 'f'.* is a folder, not a .safetensors file"):
        check_teacher_files([TeacherSpec(name="f", source=str(tiny_base_dir), format="single_file", base=str(tiny_base_dir))])
    with pytest.raises(TeacherError, match="teacher 'g'.*nowhere does not exist"):
        check_teacher_files([TeacherSpec(name="g", source=str(tmp_path / "nowhere"), format="diffusers")])


def test_zoo_manifest_errors_name_the_manifest_and_the_teacher(tmp_path):
    from dmm_ray.config import ConfigError
    from dmm_ray.evaluation.sources import load_eval_setup
    from dmm_ray.zoo.manifest import load_zoo_manifest

    (tmp_path / "zoo.yaml").write_text("teachers: 5\n")
    with pytest.raises(ValueError, match="teachers must be a list of"):
        load_zoo_manifest(tmp_path / "zoo.yaml")
    (tmp_path / "zoo.yaml").write_text("teachers: [{name: a, source: x, format: weird}]\n")
    with pytest.raises(ConfigError, match=r"teachers\[0\] \(a\) of the zoo manifest in .*\n  format: Input should be"):
        load_zoo_manifest(tmp_path / "zoo.yaml")
    (tmp_path / "zoo.yaml").write_text("teachers: [{name: a, source: x}]\n")
    assert [t.name for t in load_eval_setup(tmp_path).teachers] == ["a"]  # --teachers: a zoo's folder is its zoo.yaml


def test_an_unknown_key_of_a_zoo_teacher_is_refused_naming_it(tmp_path):
    """Finding: a misspelt key of a zoo.yaml teacher (`fromat:`, `wieght:`) was dropped without a word
    (the teacher then loaded with its format guessed). Refused now, naming the teacher, the key and
    the keys a teacher entry has; the build's own extras (group, own_text_encoder) still load."""
    from dmm_ray.config import ConfigError
    from dmm_ray.zoo.manifest import load_zoo_manifest

    (tmp_path / "zoo.yaml").write_text("teachers: [{name: a, source: x, group: grade, own_text_encoder: true}, {name: b, source: y, fromat: lora}]\n")
    with pytest.raises(
        ConfigError, match=r"teachers\[1\] \(b\) of the zoo manifest in .*\n  fromat: Extra inputs are not permitted.*did you mean format\?"
    ):
        load_zoo_manifest(tmp_path / "zoo.yaml")
    (tmp_path / "zoo.yaml").write_text("teachers: [{name: a, source: x, wieght: 0.5}]\n")
    with pytest.raises(
        ConfigError, match=r"\(a\) .*\n  wieght: .* has: name, source, format, base, description, lora_scale, allow_pickle, group, own_text_encoder"
    ):
        load_zoo_manifest(tmp_path / "zoo.yaml")
    (tmp_path / "zoo.yaml").write_text("teachers: [{name: a, source: x, group: grade, own_text_encoder: true}]\n")
    assert [t.model_dump(exclude_unset=True) for t in load_zoo_manifest(tmp_path).teachers] == [
        {"name": "a", "source": str(tmp_path.resolve() / "x"), "base": None}
    ]


def test_an_unknown_top_level_key_of_zoo_yaml_is_refused_naming_it(tmp_path):
    """Finding: a misspelt top-level key of zoo.yaml (`feature_nte:`) was dropped without a word: the
    evaluation then ran without the zoo's feature net and a merge config's `zoo:` without its dataset.
    Refused now (by the one reader, for `--teachers`, `zoo:` and the zoo report alike), naming the file,
    the key and the nearest known key or the keys a zoo.yaml has; what build_zoo writes still loads."""
    from dmm_ray.config import ConfigError
    from dmm_ray.evaluation.sources import load_eval_setup
    from dmm_ray.zoo.manifest import load_zoo_manifest, read_manifest

    (tmp_path / "zoo.yaml").write_text("feature_nte: feature_net\nteachers: [{name: a, source: x}]\n")
    with pytest.raises(ConfigError, match=r"zoo manifest '.*zoo\.yaml':\n  feature_nte: Extra inputs are not permitted.*did you mean feature_net\?"):
        load_eval_setup(tmp_path)
    (tmp_path / "zoo.yaml").write_text("teachers: [{name: a, source: x}]\nweights: 1\n")
    with pytest.raises(
        ConfigError, match=r"weights: .* the top level has: base, dataset, eval_prompts, feature_net, image_size, seed, size, teachers"
    ):
        read_manifest(tmp_path)
    written = "base: base\ndataset: images\neval_prompts: p.txt\nfeature_net: fn\nimage_size: 32\nseed: 0\nsize: micro\n"  # build_zoo's keys
    (tmp_path / "zoo.yaml").write_text(written + "teachers: [{name: a, source: x, group: grade, own_text_encoder: false}]\n")
    assert load_zoo_manifest(tmp_path).feature_net == (tmp_path / "fn").resolve()


def test_a_tokenizer_without_its_vocabulary_is_an_incomplete_folder(teacher_files, tmp_path):
    """Finding: a teacher folder whose tokenizer files were lost passed every check and loaded as an
    empty tokenizer (every prompt to [0, 2, 2, ...]: a teacher conditioned on nothing)."""
    import shutil

    from dmm_ray.teachers import check_teacher_files

    folder = shutil.copytree(teacher_files["root"] / "folder", tmp_path / "notok")
    for f in (folder / "tokenizer").iterdir():
        if f.name != "tokenizer_config.json":
            f.unlink()
    with pytest.raises(TeacherError, match=r"teacher 'notok': .*tokenizer holds no vocabulary"):
        check_teacher_files([TeacherSpec(name="notok", source=str(folder))])


def test_every_teachers_architecture_problem_at_once_and_formats_read_from_any_suffix(teacher_files, tiny_base_dir, tmp_path):
    """validate_teachers stopped at the first teacher; a single file without a text encoder escaped as
    diffusers' own error; NOISE.SAFETENSORS could not tell its format."""
    import shutil

    from safetensors.torch import save_file

    from dmm_ray.formats.single_file import to_ldm_state_dict

    StableDiffusionPipeline(**tiny_sd_components(seed=0, cross_attention_dim=16)).save_pretrained(tmp_path / "odd")
    specs = [TeacherSpec(name=n, source=str(tmp_path / "odd")) for n in ("odd_a", "odd_b")]
    with pytest.raises(TeacherArchitectureError, match=r"2 teachers cannot be merged:\n  teacher 'odd_a'.*\n  teacher 'odd_b'"):
        validate_teachers(specs, str(tiny_base_dir))
    upper = shutil.copy(teacher_files["root"] / "single.safetensors", tmp_path / "SINGLE.SAFETENSORS")
    spec = TeacherSpec(name="upper", source=str(upper), base=str(tiny_base_dir))
    assert spec.resolved_format() == "single_file"
    pipe = teacher_files["single_pipe"]
    unet_only = {
        k: v.contiguous() for k, v in to_ldm_state_dict(pipe.unet, pipe.vae, pipe.text_encoder).items() if not k.startswith("cond_stage_model.")
    }
    save_file(unet_only, str(tmp_path / "no_te.safetensors"))
    with pytest.raises(TeacherError, match=r"teacher 'no_te': could not load .* as single_file"):
        load_teacher(TeacherSpec(name="no_te", source=str(tmp_path / "no_te.safetensors"), base=str(tiny_base_dir)))


def test_zoo_teachers_without_a_format_take_the_zoos_base(tmp_path):
    """A manifest's single-file or LoRA teacher with no `format:` (it is optional) was refused for
    want of `base:`: the zoo's base went only to teachers whose format was written out."""
    from dmm_ray.zoo.manifest import load_zoo_manifest

    (tmp_path / "zoo.yaml").write_text("base: base\nteachers: [{name: a, source: teachers/a.safetensors}, {name: b, source: teachers/b}]\n")
    a, b = load_zoo_manifest(tmp_path / "zoo.yaml").teachers
    assert a.base == str(tmp_path / "base") and b.base is None  # a folder is a whole pipeline: no base


def test_a_zoo_yaml_expands_home_and_dmm_home_as_a_merge_config_does(tmp_path, monkeypatch):
    """A zoo.yaml's paths (usable as `zoo:`) were joined to its folder as written: `~/ckpts/a.safetensors`
    became `<zoo>/~/ckpts/a.safetensors` ("does not exist"), where a merge config's teachers expand `~` and
    `$DMM_HOME` (dmm_ray.paths.resolve, the one rule); the zoo's base, dataset and prompts too."""
    from dmm_ray.config import load_config
    from dmm_ray.zoo.manifest import load_zoo_manifest

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("DMM_HOME", str(tmp_path / "dmm"))
    zoo = tmp_path / "zoo"
    zoo.mkdir()
    (zoo / "zoo.yaml").write_text(
        "base: ~/sd15\neval_prompts: $DMM_HOME/prompts.txt\n"
        "teachers: [{name: a, source: ~/ckpts/a.safetensors}, {name: b, source: $DMM_HOME/b, format: diffusers}, {name: c, source: c}]\n"
    )
    a, b, c = load_zoo_manifest(zoo).teachers
    assert (a.source, a.base) == (str(tmp_path / "home" / "ckpts" / "a.safetensors"), str(tmp_path / "home" / "sd15"))
    assert (b.source, c.source) == (str(tmp_path / "dmm" / "b"), str(zoo / "c"))
    assert load_zoo_manifest(zoo).base == tmp_path / "home" / "sd15"
    (tmp_path / "merge.yaml").write_text(f"zoo: {zoo}\ndata: {{shards: {tmp_path / 'shards'}}}\n")
    cfg = load_config(tmp_path / "merge.yaml")
    assert cfg.student.base == str(tmp_path / "home" / "sd15") and cfg.teachers[0].source == a.source
    assert cfg.evaluation.prompts_file == str(tmp_path / "dmm" / "prompts.txt")


def test_lora_ckpt_and_single_file_teachers_are_opened_before_ray(teacher_files, tiny_base_dir, tmp_path):
    """Finding: the checks before Ray (check_teacher_files + validate_teachers) read a LoRA's header
    only and a .ckpt not at all, so a LoRA for another architecture, a truncated or foreign .ckpt, and
    a single file or .ckpt without its text encoder or VAE failed only inside a Ray Train worker; a
    LoRA whose keys name no layer of its base even loaded, as nothing (the teacher was its base)."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import load_file, save_file

    from dmm_ray.formats.single_file import to_ldm_state_dict
    from dmm_ray.teachers import check_teacher_files

    def preflight(**kw):
        spec = TeacherSpec(base=str(tiny_base_dir), **kw)
        check_teacher_files([spec])
        validate_teachers([spec], str(tiny_base_dir))

    odd = StableDiffusionPipeline(**tiny_sd_components(seed=0, cross_attention_dim=16))
    odd.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_k", "to_v"]))
    StableDiffusionPipeline.save_lora_weights(tmp_path / "odd_lora", unet_lora_layers=get_peft_model_state_dict(odd.unet), safe_serialization=True)
    with pytest.raises(TeacherArchitectureError, match=r"teacher 'l1' .*unet layer .*attn2.to_k has 32 inputs in the base .* has shape \(4, 16\)"):
        preflight(name="l1", source=str(tmp_path / "odd_lora" / "pytorch_lora_weights.safetensors"))
    lora = load_file(str(teacher_files["root"] / "lora" / "pytorch_lora_weights.safetensors"))
    save_file({k.replace("down_blocks.", "downblocks."): v for k, v in lora.items()}, str(tmp_path / "elsewhere.safetensors"))
    with pytest.raises(TeacherArchitectureError, match=r"teacher 'l2' .*: 16 of its 64 unet tensors name no layer of the base .*skip them"):
        preflight(name="l2", source=str(tmp_path / "elsewhere.safetensors"), format="lora")

    single = load_file(str(teacher_files["root"] / "single.safetensors"))
    torch.save(single, tmp_path / "t.ckpt")
    (tmp_path / "cut.ckpt").write_bytes((tmp_path / "t.ckpt").read_bytes()[:5000])
    with pytest.raises(TeacherError, match=r"teacher 'c1': could not read .*cut.ckpt as a torch checkpoint \(.*\); it is truncated"):
        preflight(name="c1", source=str(tmp_path / "cut.ckpt"), allow_pickle=True)
    pipe = StableDiffusionPipeline(**tiny_sd_components(seed=0, cross_attention_dim=16))  # `odd` has an adapter now
    torch.save({k: v.contiguous() for k, v in to_ldm_state_dict(pipe.unet, pipe.vae, pipe.text_encoder).items()}, tmp_path / "odd.ckpt")
    with pytest.raises(
        TeacherArchitectureError, match=r"teacher 'c2' .*UNet tensor .*attn2.to_k.weight has shape \(32, 16\) but the base has \(32, 32\)"
    ):
        preflight(name="c2", source=str(tmp_path / "odd.ckpt"), allow_pickle=True)
    torch.save({k: v for k, v in single.items() if not k.startswith("cond_stage_model.")}, tmp_path / "no_te.ckpt")
    with pytest.raises(TeacherError, match=r"teacher 'c3' .*holds no weights for the base's text_encoder \(CLIPTextModel\)"):
        preflight(name="c3", source=str(tmp_path / "no_te.ckpt"), allow_pickle=True)
    save_file({k: v for k, v in single.items() if not k.startswith("first_stage_model.")}, str(tmp_path / "no_vae.safetensors"))
    with pytest.raises(TeacherError, match=r"teacher 's1' .*holds no VAE weights"):
        preflight(name="s1", source=str(tmp_path / "no_vae.safetensors"))
    with pytest.raises(TeacherError, match=r"pickled checkpoint.*allow_pickle"):  # validate_teachers does not open a refused .ckpt
        validate_teachers([TeacherSpec(name="p", source=str(tmp_path / "t.ckpt"), base=str(tiny_base_dir))], str(tiny_base_dir))
    # the intact ones still pass
    preflight(name="ok_ckpt", source=str(tmp_path / "t.ckpt"), allow_pickle=True)
    preflight(name="ok_lora", source=str(teacher_files["root"] / "lora" / "pytorch_lora_weights.safetensors"))
    preflight(name="ok_single", source=str(teacher_files["root"] / "single.safetensors"))


def test_the_pre_flight_unpickles_a_ckpt_teacher_once(teacher_files, tmp_path, monkeypatch):
    """Finding: validate_before_ray read an allowed .ckpt with torch.load twice, in the file check and
    again for the shape check (the whole file twice for a legacy, not memory-mappable checkpoint)."""
    from merge_fixtures import build_world, tiny_merge_config
    from safetensors.torch import load_file

    from dmm_ray.config import MergeConfig
    from dmm_ray.merge import validate_before_ray

    world = build_world(tmp_path / "world", num_teachers=1)
    torch.save(load_file(str(teacher_files["root"] / "single.safetensors")), tmp_path / "t.ckpt")
    teachers = [{"name": "c", "source": str(tmp_path / "t.ckpt"), "base": world["base"], "allow_pickle": True}]
    cfg = MergeConfig.model_validate(tiny_merge_config(world, tmp_path / "out", teachers=teachers))
    reads, load = [], torch.load
    monkeypatch.setattr(torch, "load", lambda f, *a, **kw: reads.append(f) or load(f, *a, **kw))
    for deep in (False, True):
        reads.clear()
        validate_before_ray(cfg, deep=deep)
        assert reads == [tmp_path / "t.ckpt"], f"deep={deep}"


@pytest.mark.parametrize("suffix", ["safetensors", "ckpt"])
def test_sdxl_single_file_with_equally_wide_text_encoders_round_trips(tmp_path, suffix):
    """The tiny SDXL base's two text encoders are both 32 wide, and diffusers picks the converter for
    text_encoder_2 by width: on its own it reads the first encoder's weights into text_encoder_2 and
    leaves the OpenCLIP `text_projection` on the meta device. The teacher loader converts it itself."""
    from diffusers import StableDiffusionXLPipeline
    from safetensors.torch import load_file

    from dmm_ray.formats.single_file import SDXL_OPENCLIP_PREFIX, sdxl_text_encoder_2
    from dmm_ray.tiny import tiny_sdxl_components

    source = StableDiffusionXLPipeline(**tiny_sdxl_components(seed=0))
    assert source.text_encoder.config.hidden_size == source.text_encoder_2.config.hidden_size
    source.save_pretrained(tmp_path / "base")
    path = export_single_file(source, tmp_path / "sdxl.safetensors")
    state = load_file(str(path))
    # the export holds the projection in OpenCLIP's (transposed) layout
    assert torch.equal(state[SDXL_OPENCLIP_PREFIX + "text_projection"], source.text_encoder_2.text_projection.weight.T)
    if suffix == "ckpt":
        torch.save(state, tmp_path / "sdxl.ckpt")
        path = tmp_path / "sdxl.ckpt"
    teacher = load_teacher(TeacherSpec(name="xl", source=str(path), base=str(tmp_path / "base"), allow_pickle=True))
    for name in ("unet", "text_encoder", "text_encoder_2"):
        want, got = getattr(source, name).state_dict(), getattr(teacher, name).state_dict()
        assert set(want) == set(got), name
        assert all(torch.equal(want[k], got[k]) for k in want), (name, [k for k in want if not torch.equal(want[k], got[k])])
    # diffusers' own loader reads the file right when given the second encoder
    text_encoder_2 = sdxl_text_encoder_2(path, tmp_path / "base")
    loaded = StableDiffusionXLPipeline.from_single_file(
        str(path), config=str(tmp_path / "base"), local_files_only=True, text_encoder_2=text_encoder_2
    )
    assert torch.equal(loaded.text_encoder_2.text_projection.weight, source.text_encoder_2.text_projection.weight)
    # real SDXL's encoders differ in width (768, 1280), and SD1.5 has one: diffusers needs no help there
    StableDiffusionXLPipeline(**tiny_sdxl_components(seed=0, text_hidden_2=48)).save_pretrained(tmp_path / "wide")
    assert sdxl_text_encoder_2(path, tmp_path / "wide") is None
    StableDiffusionPipeline(**tiny_sd_components(seed=0)).save_pretrained(tmp_path / "sd15")
    assert sdxl_text_encoder_2(path, tmp_path / "sd15") is None
