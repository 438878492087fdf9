import re
from pathlib import Path

import pytest
import torch

from dmm_ray import DMMPipeline, StyleUNet
from dmm_ray.models.style_unet import StyleError
from dmm_ray.pipeline import PAPER_NEGATIVE_PROMPT

STYLES = ["noir", "neon", "pastel"]


@pytest.fixture
def pipe(tiny_components):
    torch.manual_seed(0)
    student = StyleUNet.from_unet(tiny_components["unet"], STYLES)
    with torch.no_grad():  # spread the codebook so styles visibly differ on an untrained model
        student.class_embedding.codebook.weight.mul_(20)
    c = tiny_components
    pipe = DMMPipeline.from_components(student, c["vae"], c["text_encoder"], c["tokenizer"], c["scheduler"])
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _gen(pipe, prompts, **kw):
    generators = [torch.Generator().manual_seed(i) for i in range(len(prompts))]
    return pipe(prompts, num_inference_steps=2, height=32, width=32, output_type="pt", generator=generators, **kw).images


def test_paper_defaults(pipe):
    assert type(pipe.scheduler).__name__ == "DPMSolverMultistepScheduler"
    assert pipe.scheduler.config.algorithm_type == "dpmsolver++"
    import inspect

    sig = inspect.signature(DMMPipeline.__call__)
    # a call that names no sampler takes the model's own: for a merged model the paper's 25 steps, CFG 7
    assert sig.parameters["num_inference_steps"].default is None and sig.parameters["guidance_scale"].default is None
    assert pipe.sampler_defaults == {
        "scheduler": "DPMSolverMultistepScheduler",
        "num_inference_steps": 25,
        "guidance_scale": 7.0,
        "negative_prompt": PAPER_NEGATIVE_PROMPT,
    }
    assert "nsfw" in PAPER_NEGATIVE_PROMPT


def test_one_image_per_style_and_styles_differ(pipe):
    images = [_gen(pipe, ["a red circle"], style=s) for s in STYLES]
    assert all(img.shape == (1, 3, 32, 32) for img in images)
    assert not torch.allclose(images[0], images[1]) and not torch.allclose(images[1], images[2])
    assert pipe.styles == STYLES


def test_per_prompt_styles_under_cfg_match_single_runs(pipe):
    mixed = _gen(pipe, ["a red circle", "a blue square"], style=["noir", 2])
    noir = _gen(pipe, ["a red circle", "a blue square"], style="noir")
    pastel = _gen(pipe, ["a red circle", "a blue square"], style="pastel")
    torch.testing.assert_close(mixed[0], noir[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(mixed[1], pastel[1], rtol=0, atol=1e-6)


def test_style_weights_mixture(pipe):
    one_hot = _gen(pipe, ["a red circle"], style_weights={"neon": 1.0})
    assert torch.equal(one_hot, _gen(pipe, ["a red circle"], style="neon"))
    mix = _gen(pipe, ["a red circle"], style_weights=[1.0, 1.0, 0.0])
    assert not torch.allclose(mix, one_hot)


def test_bad_style_errors(pipe):
    with pytest.raises(StyleError, match="known styles"):
        _gen(pipe, ["x"], style="anime")
    with pytest.raises(StyleError, match="exactly one"):
        _gen(pipe, ["x"])
    with pytest.raises(StyleError, match="one per prompt"):
        _gen(pipe, ["x", "y"], style=["noir"])


def test_save_and_load_offline(pipe, tmp_path):
    pipe.save_pretrained(tmp_path)
    loaded = DMMPipeline.from_pretrained(tmp_path, local_files_only=True)
    loaded.set_progress_bar_config(disable=True)
    assert isinstance(loaded.unet, StyleUNet) and loaded.styles == STYLES
    assert torch.equal(_gen(loaded, ["a red circle"], style="neon"), _gen(pipe, ["a red circle"], style="neon"))


def test_save_pretrained_keeps_the_models_sampler_and_style_records(pipe, tmp_path):
    """A merged model saved again (pipe.save_pretrained) keeps its sampler.json and styles.json: without
    them the copy sampled with the paper's 25 steps, CFG 7 and negative prompt, not the model's own."""
    import json

    from dmm_ray.merged_model import STYLES_RECORD
    from dmm_ray.pipeline import SAMPLER_RECORD, sampler_record

    pipe.save_pretrained(tmp_path / "a")
    (tmp_path / "a" / SAMPLER_RECORD).write_text(json.dumps(sampler_record(2, 5.0, "")))
    (tmp_path / "a" / STYLES_RECORD).write_text(json.dumps([{"name": n, "description": n} for n in STYLES]))
    own = DMMPipeline.from_pretrained(tmp_path / "a", local_files_only=True)
    own.save_pretrained(tmp_path / "b")
    for record in (SAMPLER_RECORD, STYLES_RECORD):
        assert (tmp_path / "b" / record).read_text() == (tmp_path / "a" / record).read_text()
    copy = DMMPipeline.from_pretrained(tmp_path / "b", local_files_only=True)
    assert copy.sampler_defaults == own.sampler_defaults and copy.sampler_defaults["num_inference_steps"] == 2
    own.save_pretrained(tmp_path / "a")  # over its own folder: nothing to copy, nothing lost
    assert json.loads((tmp_path / "a" / SAMPLER_RECORD).read_text())["num_inference_steps"] == 2


def test_save_pretrained_with_push_to_hub_uploads_the_records(pipe, tmp_path, monkeypatch):
    """diffusers' save_pretrained(push_to_hub=True) uploads the folder at the end of its own save: the
    records, copied after it, never reached the Hub, whose copy then sampled with the paper's defaults.
    The Hub is a stand-in that lists the folder at upload time."""
    import json
    from types import SimpleNamespace

    import diffusers.pipelines.pipeline_utils as pipeline_utils

    from dmm_ray.merged_model import STYLES_RECORD
    from dmm_ray.pipeline import SAMPLER_RECORD, sampler_record

    pipe.save_pretrained(tmp_path / "a")
    (tmp_path / "a" / SAMPLER_RECORD).write_text(json.dumps(sampler_record(2, 5.0, "")))
    (tmp_path / "a" / STYLES_RECORD).write_text("[]")
    own = DMMPipeline.from_pretrained(tmp_path / "a", local_files_only=True)
    uploaded, repos = [], []
    monkeypatch.setattr(pipeline_utils, "create_repo", lambda repo_id, **kwargs: repos.append(repo_id) or SimpleNamespace(repo_id=f"me/{repo_id}"))
    monkeypatch.setattr(pipeline_utils, "load_or_create_model_card", lambda *args, **kwargs: SimpleNamespace(save=lambda path: None))
    monkeypatch.setattr(pipeline_utils, "populate_model_card", lambda card, *args, **kwargs: card)
    monkeypatch.setattr(
        DMMPipeline, "_upload_folder", lambda self, folder, repo_id, **kwargs: uploaded.extend(p.name for p in Path(folder).iterdir())
    )
    own.save_pretrained(str(tmp_path / "b"), push_to_hub=True)
    assert {SAMPLER_RECORD, STYLES_RECORD, "model_index.json", "unet"} <= set(uploaded)
    assert repos == ["b"]  # named after the folder asked for, not the hidden one the save is written in first


def _tree(folder: Path) -> dict:
    import hashlib

    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("error", [OSError(28, "No space left on device"), KeyboardInterrupt()], ids=["error", "ctrl-c"])
def test_a_save_over_an_earlier_one_that_fails_part_way_leaves_the_earlier_one_whole(pipe, tmp_path, monkeypatch, error):
    """Finding: save_pretrained wrote into the folder in place, so a save over an earlier one that failed after
    its first modules (here the scheduler's save, after the VAE, text encoder and UNet) left the folder a mix:
    the new UNet beside the earlier model's scheduler and records. It is written whole beside the earlier save,
    inside the folder, and moved in only once complete; what the folder holds beside the pipeline stays."""
    import json

    from diffusers import DPMSolverMultistepScheduler

    from dmm_ray.pipeline import SAMPLER_RECORD, sampler_record

    folder = tmp_path / "model"
    pipe.save_pretrained(folder)
    (folder / SAMPLER_RECORD).write_text(json.dumps(sampler_record(2, 5.0, "")))
    (folder / "dmm_merge.json").write_text('{"name": "earlier"}')  # beside the pipeline: no save of it writes one
    earlier = _tree(folder)
    with torch.no_grad():
        pipe.unet.conv_in.weight.add_(1.0)  # another model

    def fails(self, *args, **kwargs):
        raise error

    with monkeypatch.context() as m:
        m.setattr(DPMSolverMultistepScheduler, "save_pretrained", fails)
        with pytest.raises(type(error)):
            pipe.save_pretrained(folder)
    assert _tree(folder) == earlier  # before: unet/ and vae/config.json were the new save's
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"] and not list(folder.glob(".*"))
    with pytest.raises(type(error)), monkeypatch.context() as m:
        m.setattr(DPMSolverMultistepScheduler, "save_pretrained", fails)
        pipe.save_pretrained(tmp_path / "new" / "model")  # folders the save made: gone again
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]

    pipe.save_pretrained(folder)
    saved = DMMPipeline.from_pretrained(folder, local_files_only=True)
    assert torch.equal(saved.unet.conv_in.weight, pipe.unet.conv_in.weight) and not (folder / SAMPLER_RECORD).exists()
    assert (folder / "dmm_merge.json").read_text() == '{"name": "earlier"}' and not list(folder.glob(".*"))


def test_a_save_killed_part_way_is_undone_by_the_next_save_into_its_folder(pipe, tmp_path, monkeypatch):
    """A save killed while it moved its entries in left the earlier ones parked in `.dmm-save-<pid>.old` (and its
    staging folder): the next save into the folder, under another pid, puts them back before it writes, so a
    next save that fails too leaves the earlier model; a running save's folders are left alone."""
    import os
    import shutil
    import subprocess
    import sys
    import time

    from diffusers import DPMSolverMultistepScheduler

    folder = tmp_path / "model"
    pipe.save_pretrained(folder)
    earlier = _tree(folder)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True).stdout.strip()
    parked, staging = folder / f".dmm-save-{dead}.old", folder / f".dmm-save-{dead}.tmp"
    parked.mkdir()
    shutil.copytree(folder / "unet", staging / "text_encoder")  # the kill's staged rest
    os.replace(folder / "scheduler", parked / "scheduler")  # killed between parking the scheduler and moving the new one in
    os.replace(folder / "unet", parked / "unet")  # the new UNet moved in
    shutil.copytree(parked / "scheduler", folder / "unet")
    for left in (parked, staging):
        os.utime(left, (time.time() - 3600,) * 2)  # written before this process started, as a killed run's are
    running = folder / f".dmm-save-{os.getppid()}.tmp"  # a save under way in a running process: left alone
    running.mkdir()

    def fails(self, *args, **kwargs):
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(DPMSolverMultistepScheduler, "save_pretrained", fails)
        with pytest.raises(OSError):
            pipe.save_pretrained(folder)
    assert sorted(p.name for p in folder.glob(".*")) == [running.name]
    running.rmdir()
    assert _tree(folder) == earlier


def test_save_pretrained_over_another_save_leaves_none_of_its_records(pipe, tmp_path, monkeypatch):
    """A pipeline with no sampler.json / styles.json of its own (built from components) saved into a folder
    of an earlier save left that model's records there: the folder then loaded with the other model's
    sampler defaults and style descriptions. They go now, but only once the save is complete: a failed
    save leaves the earlier model's records in place (and no hidden leftovers)."""
    import json

    from diffusers import StableDiffusionPipeline

    from dmm_ray.merged_model import STYLES_RECORD
    from dmm_ray.pipeline import SAMPLER_RECORD, sampler_record

    folder = tmp_path / "model"
    pipe.save_pretrained(folder)
    earlier = {SAMPLER_RECORD: json.dumps(sampler_record(2, 5.0, "")), STYLES_RECORD: json.dumps([{"name": "anime", "description": "x"}])}
    for name, text in earlier.items():
        (folder / name).write_text(text)
    pipe.save_pretrained(tmp_path / "own")
    (tmp_path / "own" / SAMPLER_RECORD).write_text(json.dumps(sampler_record(4, 1.0, "")))
    own = DMMPipeline.from_pretrained(tmp_path / "own", local_files_only=True)

    def fails(self, *args, **kwargs):
        raise OSError("disk full")

    with monkeypatch.context() as m:
        m.setattr(StableDiffusionPipeline, "save_pretrained", fails)
        for saving in (pipe, own):  # without records of its own / with a sampler.json of its own
            with pytest.raises(OSError, match="disk full"):
                saving.save_pretrained(folder)
            assert {name: (folder / name).read_text() for name in earlier} == earlier
            assert not list(folder.glob(".*")) and not list(tmp_path.glob(".*"))

    own.save_pretrained(folder)  # its own sampler.json; the earlier styles.json, not its model's, goes
    assert (folder / SAMPLER_RECORD).read_text() == (tmp_path / "own" / SAMPLER_RECORD).read_text()
    assert not (folder / STYLES_RECORD).exists() and not list(folder.glob(".*"))
    pipe.save_pretrained(folder)
    assert not (folder / SAMPLER_RECORD).exists() and not (folder / STYLES_RECORD).exists()
    assert not list(folder.glob(".*"))
    assert DMMPipeline.from_pretrained(folder, local_files_only=True).sampler_defaults["num_inference_steps"] == 25


def test_styles_as_tensors_and_arrays_are_one_per_prompt(pipe):
    """A 1-D integer tensor / array of indices (or an array of names) is one style per prompt, and a
    (B, N) weight tensor one mixture per prompt (the StyleUNet's own shape), as lists are: a 1-D int
    tensor with N prompts used to be read as ONE mixture of weights 0..N-1."""
    import numpy as np

    prompts = ["a red circle", "a blue square", "a green dot"]
    by_list = _gen(pipe, prompts, style=[2, 0, 1])
    as_objects = (np.array(["pastel", "noir", "neon"], dtype=object), np.array([2, 0, 1], dtype=object))  # a pandas column's .to_numpy()
    for style in (torch.tensor([2, 0, 1]), np.array([2, 0, 1]), np.array(["pastel", "noir", "neon"]), *as_objects):
        torch.testing.assert_close(_gen(pipe, prompts, style=style), by_list)
    weights = torch.eye(3)[[2, 0, 1]]
    torch.testing.assert_close(_gen(pipe, prompts, style_weights=weights), by_list)
    torch.testing.assert_close(_gen(pipe, prompts, style_weights=weights.numpy()), by_list)
    with pytest.raises(StyleError):
        _gen(pipe, prompts, style_weights=torch.ones(2, 3))  # two rows for three prompts
    one = _gen(pipe, prompts, style_weights=torch.tensor([0.0, 1.0, 3.0]))  # a float 1-D tensor: still one mixture
    torch.testing.assert_close(one, _gen(pipe, prompts, style_weights={"neon": 0.25, "pastel": 0.75}))


@pytest.mark.parametrize("prompt", [5, ["a cat", 5], None])
def test_a_prompt_that_is_not_text_is_a_clear_error(pipe, prompt):
    with pytest.raises(ValueError, match="prompt must be a str or a list of str|give prompt="):
        pipe(prompt, style="noir", num_inference_steps=1, height=32, width=32)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(prompt=[]), "prompt is an empty list; give at least one prompt"),
        (dict(prompt="a cat", num_images_per_prompt=0), "num_images_per_prompt must be a whole number >= 1, got 0"),
        (dict(prompt="a cat", num_images_per_prompt=2.0), "num_images_per_prompt must be a whole number >= 1, got 2.0"),
    ],
)
@pytest.mark.parametrize("regional", [False, True])
def test_an_empty_batch_is_a_clear_error(pipe, kwargs, match, regional):
    """An empty prompt list failed in the tokenizer with a bare IndexError, num_images_per_prompt=0 in the text
    encoder ("cannot reshape tensor of 0 elements") and 2.0 in repeat_interleave, with regions too."""
    from dmm_ray.regions import Region

    selection = dict(regions=[Region(box=(0, 0, 1, 1), style="noir")]) if regional else dict(style="noir")
    with pytest.raises(ValueError, match=match):
        pipe(**kwargs, **selection, num_inference_steps=1, height=32, width=32)


def test_negative_prompt_default_and_explicit_empty(pipe):
    """None means the paper's negative prompt; an explicit "" (what the zoo models were trained
    with as their unconditional caption) is kept, not replaced."""
    default = _gen(pipe, ["a red circle"], style="noir")
    paper = _gen(pipe, ["a red circle"], style="noir", negative_prompt=PAPER_NEGATIVE_PROMPT)
    empty = _gen(pipe, ["a red circle"], style="noir", negative_prompt="")
    torch.testing.assert_close(default, paper)
    assert not torch.allclose(empty, paper)


def test_a_model_with_its_own_sampler_record_is_sampled_with_it(pipe, tmp_path):
    """A merge writes sampler.json from its synthesis settings (the toy zoo: 10 steps, CFG 5, ""); a
    call that names no sampler then uses them, negative prompt included, instead of the paper's."""
    import json

    from dmm_ray.pipeline import SAMPLER_RECORD, sampler_record

    pipe.save_pretrained(tmp_path)
    (tmp_path / SAMPLER_RECORD).write_text(json.dumps(sampler_record(2, 5.0, "")))
    own = DMMPipeline.from_pretrained(tmp_path, local_files_only=True)
    own.set_progress_bar_config(disable=True)
    assert own.sampler_defaults == {
        "scheduler": "DPMSolverMultistepScheduler",
        "num_inference_steps": 2,
        "guidance_scale": 5.0,
        "negative_prompt": "",
    }

    def run(p, **kw):
        return p(["a red circle"], style="noir", height=32, width=32, output_type="pt", generator=[torch.Generator().manual_seed(0)], **kw).images

    torch.testing.assert_close(run(own), run(pipe, num_inference_steps=2, guidance_scale=5.0, negative_prompt=""))
    assert not torch.allclose(run(own), run(pipe, num_inference_steps=2, guidance_scale=5.0))  # the paper's negative differs


def test_a_few_step_scheduler_on_a_merged_model_takes_few_step_defaults(pipe, tmp_path):
    """The merged model's sampler.json (DPM-Solver++, 2 steps, CFG 5) is for its own sampler: with its
    scheduler swapped for TCD (an LCM-LoRA on the merged model) a call samples 4 steps, CFG off, and a save
    records that."""
    import json

    from diffusers import TCDScheduler

    from dmm_ray.pipeline import SAMPLER_RECORD, sampler_defaults, sampler_record

    pipe.save_pretrained(tmp_path)
    (tmp_path / SAMPLER_RECORD).write_text(json.dumps(sampler_record(2, 5.0, "")))
    own = DMMPipeline.from_pretrained(tmp_path, local_files_only=True)
    own.scheduler = TCDScheduler.from_config(own.scheduler.config)
    assert own.sampler_defaults == {"scheduler": "TCDScheduler", "num_inference_steps": 4, "guidance_scale": 1.0, "negative_prompt": ""}
    # the folder alone (style-mixing, evaluation): the record's own scheduler and settings
    assert sampler_defaults(tmp_path)["num_inference_steps"] == 2
    # saved so (the LCM-LoRA fused in): the record says what it samples with, not DPM-Solver++ at 2 steps with CFG 5
    # beside the TCD scheduler, which the folder's readers (jobs/style_mixing.py --student-steps) sampled with
    own.save_pretrained(tmp_path / "saved")
    assert sampler_defaults(tmp_path / "saved") == own.sampler_defaults
    assert DMMPipeline.from_pretrained(tmp_path / "saved", local_files_only=True).sampler_defaults == own.sampler_defaults
    # a few-step record read with a non-few-step scheduler: the paper's settings, not 4 steps without CFG
    (tmp_path / SAMPLER_RECORD).write_text(json.dumps(sampler_record(4, 1.0, "", scheduler="TCDScheduler")))
    assert sampler_defaults(tmp_path)["num_inference_steps"] == 4
    assert sampler_defaults(tmp_path, pipe.scheduler)["num_inference_steps"] == 25


def test_a_sampler_record_that_is_not_one_is_a_clear_error(tmp_path):
    """A hand-edited sampler.json failed the first call with a bare JSONDecodeError, KeyError or
    AttributeError naming neither the file nor what it should hold. Now: a ValueError naming both; a
    record that gives only some keys sets those (the rest stay the defaults); 10.0 steps read as 10."""
    import json

    from dmm_ray.pipeline import SAMPLER_RECORD, sampler_defaults

    record = tmp_path / SAMPLER_RECORD
    for text, words in (
        ("{not json", "is not JSON"),
        (json.dumps(["TCDScheduler", 4]), "holds a JSON list"),
        (json.dumps({"num_inference_steps": "four"}), "num_inference_steps is 'four', not a whole number >= 1"),
        (json.dumps({"guidance_scale": None}), "guidance_scale is None, not a number"),
        (json.dumps({"negative_prompt": 3}), "negative_prompt is 3, not text or null"),
    ):
        record.write_text(text)
        with pytest.raises(ValueError, match=f"{SAMPLER_RECORD}.*{re.escape(words)}.*delete it to sample with the paper's defaults"):
            sampler_defaults(tmp_path)
    record.write_text(json.dumps({"negative_prompt": "blurry"}))
    assert sampler_defaults(tmp_path) == {
        "scheduler": "DPMSolverMultistepScheduler",
        "num_inference_steps": 25,
        "guidance_scale": 7.0,
        "negative_prompt": "blurry",
    }
    record.write_text(json.dumps({"num_inference_steps": 10.0, "guidance_scale": 5}))
    assert sampler_defaults(tmp_path)["num_inference_steps"] == 10 and sampler_defaults(tmp_path)["guidance_scale"] == 5.0


def test_prompt_embeds_batch_without_a_negative_prompt(pipe):
    """diffusers encodes a str negative once: the model's default negative must become one per prompt
    for a batch of prompt_embeds, as for a list of prompts."""
    prompts = ["a red circle", "a blue square"]
    embeds = pipe.encode_prompt(prompts, "cpu", 1, False)[0]  # (2, L, D)
    generators = [torch.Generator().manual_seed(i) for i in range(2)]
    out = pipe(prompt_embeds=embeds, style="noir", num_inference_steps=2, height=32, width=32, output_type="pt", generator=generators)
    torch.testing.assert_close(out.images, _gen(pipe, prompts, style="noir"), rtol=0, atol=1e-6)


def test_arguments_after_the_prompt_are_keyword_only(pipe):
    """diffusers' positional order is (prompt, height, width, ...): pipe("x", 32, 32) must not bind style=32."""
    with pytest.raises(TypeError, match="positional"):
        pipe("a red circle", 32, 32)


def test_sdxl_merged_pipeline_from_base(tmp_path):
    """DMMXLPipeline.from_base wraps a StyleUNet in an SDXL base folder; the loader picks the XL class."""
    from diffusers import StableDiffusionXLPipeline

    from dmm_ray.pipeline import DMMXLPipeline, load_dmm_pipeline
    from dmm_ray.tiny import tiny_sdxl_components

    c = tiny_sdxl_components(seed=0)
    StableDiffusionXLPipeline(**c).save_pretrained(tmp_path / "base")
    xl = DMMXLPipeline.from_base(tmp_path / "base", StyleUNet.from_unet(c["unet"], STYLES))
    xl.save_pretrained(tmp_path / "merged")
    loaded = load_dmm_pipeline(tmp_path / "merged")
    assert isinstance(loaded, DMMXLPipeline) and loaded.styles == STYLES
    loaded.set_progress_bar_config(disable=True)
    images = _gen(loaded, ["a red circle", "a blue square"], style=["noir", "pastel"])
    assert images.shape == (2, 3, 32, 32)


def _adapter_pipe(c, seed=0):
    """The tiny pipeline with rank-2 style adapters, every style a different nonzero delta."""
    torch.manual_seed(seed)
    student = StyleUNet.from_unet(c["unet"], STYLES, adapter_rank=2)
    with torch.no_grad():
        student.class_embedding.codebook.weight.mul_(20)
        for adapter in student.class_embedding.adapters.values():
            adapter.up.normal_(0, 0.05)
    pipe = DMMPipeline.from_components(student, c["vae"], c["text_encoder"], c["tokenizer"], c["scheduler"])
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_a_call_of_one_style_folds_its_adapters_and_gives_the_per_sample_images(tiny_components, monkeypatch):
    """With per-style adapters, a call whose images share one style (or mixture) runs the UNet with
    that style folded into its layers (`fuse_styles`, default on): no per-sample adapter products, the
    same images as the per-sample path to float tolerance, and a per-prompt style list still matches
    single-style calls; the UNet's weights are untouched afterwards."""
    from dmm_ray.models.style_adapters import StyleAdapter

    pipe = _adapter_pipe(tiny_components)
    student = pipe.unet
    computed = []
    add = StyleAdapter.add_delta_  # the per-sample path when sampling (no autograd)
    monkeypatch.setattr(StyleAdapter, "add_delta_", lambda self, *a: computed.append(1) or add(self, *a))
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    prompts = ["a red circle", "a blue square"]
    for style in ("neon", {"noir": 0.5, "pastel": 0.5}):
        kw = {"style": style} if isinstance(style, str) else {"style_weights": style}
        pipe.fuse_styles = False
        computed.clear()
        per_sample = _gen(pipe, prompts, **kw)
        assert computed
        pipe.fuse_styles = True
        computed.clear()
        fused = _gen(pipe, prompts, **kw)
        assert not computed, style
        torch.testing.assert_close(fused, per_sample, rtol=0, atol=1e-5)
    assert not torch.allclose(_gen(pipe, prompts, style="noir"), fused, atol=1e-3)  # not vacuous: styles differ
    mixed = _gen(pipe, prompts, style=["noir", "pastel"])  # rows differ: the per-sample path
    torch.testing.assert_close(mixed[1], _gen(pipe, prompts, style="pastel")[1], rtol=0, atol=1e-5)
    assert all(torch.equal(p, before[n]) for n, p in student.named_parameters())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_folded_call_in_half_precision_runs_no_per_sample_adapter_product(tiny_components, monkeypatch, dtype):
    """In float16 / bfloat16 the rows' weights, read back from their rounded e~ by least squares, miss the
    folded style's by 1e-4..1e-3: the folded call still ran every adapter product on top of the fold.
    Rows that hold the folded style's own e~ now add nothing; a row of another style keeps its delta."""
    from dmm_ray.models.style_adapters import StyleAdapter

    pipe = _adapter_pipe(tiny_components).to(dtype)
    computed = []
    add = StyleAdapter.add_delta_
    monkeypatch.setattr(StyleAdapter, "add_delta_", lambda self, *a: computed.append(1) or add(self, *a))
    prompts = ["a red circle", "a blue square"]
    for kw in ({"style": "neon"}, {"style_weights": {"noir": 0.3, "neon": 0.7}}):
        computed.clear()
        fused = _gen(pipe, prompts, **kw)
        assert not computed, kw
        pipe.fuse_styles = False
        per_sample = _gen(pipe, prompts, **kw)
        pipe.fuse_styles = True
        torch.testing.assert_close(fused.float(), per_sample.float(), rtol=0, atol=0.05)
    # inside a fold, a row of another style still gets its own delta (the hooks run for it)
    student, x = pipe.unet, torch.randn(2, 4, 8, 8, dtype=dtype)
    ehs, w = torch.randn(2, 77, student.config.cross_attention_dim, dtype=dtype), torch.eye(3)[[1, 1]]
    with torch.no_grad(), student.fused_style(w):
        computed.clear()
        student(x, 10, ehs, style_weights=w)
        assert not computed
        other = student(x, 10, ehs, style_weights=torch.eye(3)[[1, 2]]).sample
        assert computed
    with torch.no_grad():
        torch.testing.assert_close(
            other[1].float(), student(x[1:], 10, ehs[1:], style_weights=torch.eye(3)[[2]]).sample[0].float(), rtol=0, atol=0.02
        )


def test_layerwise_casting_keeps_the_codebook_readable(tiny_components):
    """diffusers' layerwise casting (fp8 storage) stored the codebook in fp8 too, and the pipeline reads it
    outside any layer's forward (style_embeds_for): every call failed. The codebook keeps its dtype."""
    pipe = _adapter_pipe(tiny_components)
    pipe.unet.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)
    assert pipe.unet.class_embedding.codebook.weight.dtype == torch.float32
    assert pipe.unet.class_embedding.mlp.linear_1.weight.dtype == torch.float8_e4m3fn  # the layers still cast
    images = _gen(pipe, ["a red circle", "a blue square"], style=["noir", "neon"])
    assert images.shape == (2, 3, 32, 32) and torch.isfinite(images).all()
    assert _gen(pipe, ["a red circle"], style="pastel").shape == (1, 3, 32, 32)


def test_an_ema_copy_into_the_codebook_is_seen_by_the_next_call(tiny_components):
    """diffusers' EMAModel.copy_to writes `param.data.copy_(...)`: neither the codebook's version counter
    nor its address moves, and the adapters kept selecting their styles with the old codebook's C^+."""
    from diffusers.training_utils import EMAModel

    from dmm_ray.tiny import tiny_sd_components

    source = _adapter_pipe(tiny_sd_components(seed=0), seed=5)  # holds the "EMA" weights
    ema = EMAModel(source.unet.parameters())
    pipe = _adapter_pipe(tiny_components, seed=0)
    prompts = ["a red circle", "a blue square"]
    _gen(pipe, prompts, style="neon")  # fills the C^+ cache
    ema.copy_to(pipe.unet.parameters())
    for kw in ({"style": "neon"}, {"style": ["noir", "pastel"]}):
        torch.testing.assert_close(_gen(pipe, prompts, **kw), _gen(source, prompts, **kw), rtol=0, atol=1e-6)


def test_a_compiled_unet_samples_the_same_styles(tiny_components):
    """`pipe.unet = torch.compile(pipe.unet)`, diffusers' documented speed-up, made every call a TypeError
    ("needs a StyleUNet, got OptimizedModule"), a panorama too, and `with_controlnet` gave diffusers' own
    ControlNet pipeline, which takes no style=. They now read the StyleUNet inside the wrapper; the compiled
    wrapper runs the same styles (the eager backend: no C compiler needed)."""
    from dmm_ray.plugins import DMMControlNetPipeline, with_controlnet
    from dmm_ray.tiny_plugins import make_controlnet

    pipe = _adapter_pipe(tiny_components)
    prompts = ["a red circle", "a blue square"]

    def calls():
        panorama = pipe(prompts[0], style_map=[(0, 0.5, "noir"), (0.5, 1, "pastel")], num_inference_steps=2, height=32, width=64, output_type="pt")
        return [_gen(pipe, prompts, style=["noir", "pastel"]), _gen(pipe, prompts, style="neon"), panorama.images]

    torch.manual_seed(0)
    plain = calls()
    net = make_controlnet(pipe.unet)
    pipe.unet = torch.compile(pipe.unet, backend="eager")
    try:
        torch.manual_seed(0)
        compiled = calls()
        assert type(with_controlnet(pipe, net)) is DMMControlNetPipeline
    finally:
        torch._dynamo.reset()
    for a, b in zip(compiled, plain):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_fusing_qkv_projections_is_refused_when_adapters_sit_on_them(tiny_components):
    """diffusers' fused attention calls to_qkv / to_kv, which carry no adapter hooks: the q/k/v style
    deltas silently dropped out. A model without q/k/v adapters still fuses."""
    pipe = _adapter_pipe(tiny_components)
    with pytest.raises(ValueError, match="bypass the style adapters"):
        pipe.fuse_qkv_projections()
    plain = DMMPipeline.from_components(
        StyleUNet.from_unet(tiny_components["unet"], STYLES), *[tiny_components[k] for k in ("vae", "text_encoder", "tokenizer", "scheduler")]
    )
    plain.set_progress_bar_config(disable=True)
    before = _gen(plain, ["a red circle"], style="neon")
    plain.fuse_qkv_projections()
    torch.testing.assert_close(_gen(plain, ["a red circle"], style="neon"), before, rtol=0, atol=1e-5)


def test_from_official_loads_an_sdxl_folder_as_dmmxlpipeline(tmp_path):
    """An SDXL folder in the published format (`model_merge_xl`) loads with DMMXLPipeline.from_official and
    samples as the model it was saved from; DMMPipeline.from_official used to load it as an SD1.5 pipeline
    (second text encoder dropped) that failed at its first call, and now names the right class."""
    import shutil

    from dmm_ray.models.official_format import save_official_unet
    from dmm_ray.pipeline import DMMXLPipeline
    from dmm_ray.tiny import tiny_sdxl_components

    c = tiny_sdxl_components(seed=0)
    c["unet"] = StyleUNet.from_unet(c["unet"], STYLES)
    xl = DMMXLPipeline(**c)
    xl.set_progress_bar_config(disable=True)
    xl.save_pretrained(tmp_path)
    shutil.rmtree(tmp_path / "unet")
    save_official_unet(xl.unet, tmp_path / "unet")
    with pytest.raises(ValueError, match="DMMXLPipeline.from_official"):
        DMMPipeline.from_official(tmp_path, local_files_only=True)
    loaded = DMMXLPipeline.from_official(tmp_path, local_files_only=True)
    loaded.set_progress_bar_config(disable=True)
    assert isinstance(loaded.unet, StyleUNet) and loaded.styles == STYLES
    # 1e-5: the loaded model's sums come out up to 1.7e-6 apart on an AMD EPYC
    torch.testing.assert_close(_gen(loaded, ["a red circle"], style="neon"), _gen(xl, ["a red circle"], style="neon"), rtol=0, atol=1e-5)


def test_from_official_loads_the_unet_in_the_asked_dtype(tiny_components, tmp_path):
    """The official UNet is loaded by hand and passed to from_pretrained, which leaves a passed component in
    its own dtype: with torch_dtype=bfloat16 (the reference's inference.py loads float16) the UNet stayed
    float32 beside a bfloat16 VAE and text encoder, and the first call failed on mixed dtypes."""
    import shutil

    from dmm_ray.models.official_format import save_official_unet

    c = dict(tiny_components, unet=StyleUNet.from_unet(tiny_components["unet"], STYLES))
    DMMPipeline(**c).save_pretrained(tmp_path)
    shutil.rmtree(tmp_path / "unet")
    save_official_unet(c["unet"], tmp_path / "unet")
    # torch_dtype=, and dtype= (diffusers' name for it since 0.42), which the UNet did not follow
    for name, dtype in [
        (name, dtype) for name in ("torch_dtype", "dtype") for dtype in (torch.bfloat16, {"unet": torch.bfloat16, "default": torch.bfloat16})
    ]:
        loaded = DMMPipeline.from_official(tmp_path, local_files_only=True, **{name: dtype})
        assert loaded.unet.dtype == loaded.text_encoder.dtype == torch.bfloat16
        assert torch.equal(loaded.unet.class_embedding.codebook.weight, c["unet"].class_embedding.codebook.weight.to(torch.bfloat16))
    loaded.set_progress_bar_config(disable=True)
    assert torch.isfinite(_gen(loaded, ["a red circle"], style="neon")).all()


def test_a_model_loaded_by_hub_id_samples_with_and_saves_its_own_records(pipe, tmp_path, monkeypatch):
    """Loaded by Hub id, `_name_or_path` was the id, so sampler.json / styles.json were looked up under the
    cwd: the model sampled with the paper's defaults and save_pretrained dropped its records. diffusers'
    download also leaves the records out; DMM's download fetches them (here a stand-in for the Hub)."""
    import json

    import huggingface_hub

    from dmm_ray.merged_model import STYLES_RECORD
    from dmm_ray.pipeline import SAMPLER_RECORD, sampler_record

    commit, cache = "0" * 40, tmp_path / "hub"
    snapshot = cache / "models--me--toy-merge" / "snapshots" / commit
    pipe.save_pretrained(snapshot)
    (cache / "models--me--toy-merge" / "refs").mkdir()
    (cache / "models--me--toy-merge" / "refs" / "main").write_text(commit)
    record = json.dumps(sampler_record(2, 5.0, ""))
    fetched = []

    def hub(repo_id, revision, allow_patterns, **kwargs):  # the Hub holds sampler.json, not styles.json
        fetched.append((repo_id, revision, sorted(allow_patterns)))
        (snapshot / SAMPLER_RECORD).write_text(record)
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", hub)
    by_id = DMMPipeline.from_pretrained("me/toy-merge", cache_dir=cache)
    assert fetched == [("me/toy-merge", commit, sorted([SAMPLER_RECORD, STYLES_RECORD]))]
    assert by_id.sampler_defaults["num_inference_steps"] == 2 and by_id.sampler_defaults["negative_prompt"] == ""
    by_id.save_pretrained(tmp_path / "copy")
    assert (tmp_path / "copy" / SAMPLER_RECORD).read_text() == record
    offline = DMMPipeline.from_pretrained("me/toy-merge", cache_dir=cache, local_files_only=True)  # the cache alone
    assert offline.sampler_defaults["num_inference_steps"] == 2 and len(fetched) == 1
