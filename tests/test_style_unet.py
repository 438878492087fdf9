import copy
import json

import pytest
import torch
from diffusers import UNet2DConditionModel

from dmm_ray import StyleUNet
from dmm_ray.models.features import capture_block_features
from dmm_ray.models.official_format import load_official_unet, save_official_unet
from dmm_ray.models.style_unet import StyleError, extra_parameter_count, resolve_style
from dmm_ray.tiny import tiny_sdxl_unet_config

STYLES = ["real", "anime", "ink"]


@pytest.fixture
def student(tiny_components):
    torch.manual_seed(1)
    return StyleUNet.from_unet(tiny_components["unet"], STYLES).eval()


def _inputs(batch=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(batch, 4, 8, 8, generator=g),
        torch.randint(0, 1000, (batch,), generator=g),
        torch.randn(batch, 77, 32, generator=g),
    )


def test_from_unet_copies_every_base_weight(tiny_components, student):
    base = tiny_components["unet"].state_dict()
    ours = student.state_dict()
    assert set(ours) - set(base) == {
        "class_embedding.codebook.weight",
        "class_embedding.mlp.linear_1.weight",
        "class_embedding.mlp.linear_1.bias",
        "class_embedding.mlp.linear_2.weight",
        "class_embedding.mlp.linear_2.bias",
    }
    assert all(torch.equal(base[k], ours[k]) for k in base)


def test_sd15_extra_parameters_exact():
    # The real SD1.5 UNet config (diffusers defaults are SD1.5's), on meta tensors: no download, no memory.
    with torch.device("meta"):
        base = UNet2DConditionModel(cross_attention_dim=768, attention_head_dim=8, sample_size=64)
        student = StyleUNet(**{k: v for k, v in base.config.items() if not k.startswith("_")}, style_names=[f"s{i}" for i in range(8)])
    extra = sum(p.numel() for p in student.parameters()) - sum(p.numel() for p in base.parameters())
    assert extra == 8 * 1280 + 2 * (1280**2 + 1280) == extra_parameter_count(8, 1280) == 3_289_600


def test_one_hot_weights_equal_index_path_bit_exactly(student):
    x, t, h = _inputs()
    ids = torch.tensor([0, 2, 1])
    by_index = student(x, t, h, style_ids=ids).sample
    by_weights = student(x, t, h, style_weights=torch.nn.functional.one_hot(ids, 3).float()).sample
    assert torch.equal(by_index, by_weights)


def test_mixture_equals_interpolated_embeddings(student):
    x, t, h = _inputs(batch=1)
    w = torch.tensor([[0.25, 0.0, 0.75]])
    codebook = student.class_embedding.codebook.weight
    explicit = 0.25 * codebook[0] + 0.75 * codebook[2]
    out_w = student(x, t, h, style_weights=w).sample
    out_e = student(x, t, h, style_embeds=explicit[None]).sample
    torch.testing.assert_close(out_w, out_e, rtol=1e-5, atol=1e-6)
    # and it is not just one of the endpoints
    assert not torch.allclose(out_w, student(x, t, h, style_ids=torch.tensor([2])).sample)


def test_different_rows_give_different_outputs(student):
    x, t, h = _inputs(batch=1)
    outs = [student(x, t, h, style_ids=torch.tensor([i])).sample for i in range(3)]
    assert not torch.allclose(outs[0], outs[1]) and not torch.allclose(outs[1], outs[2])


def test_save_load_round_trip_bit_exact(student, tmp_path):
    student.save_pretrained(tmp_path)
    assert (tmp_path / "diffusion_pytorch_model.safetensors").exists()
    assert json.loads((tmp_path / "config.json").read_text())["style_names"] == STYLES
    loaded = StyleUNet.from_pretrained(tmp_path)
    assert loaded.style_names == STYLES
    a, b = student.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    x, t, h = _inputs()
    assert torch.equal(student(x, t, h, style_ids=torch.tensor([0, 1, 2])).sample, loaded(x, t, h, style_ids=torch.tensor([0, 1, 2])).sample)


def test_add_styles_keeps_old_rows(student):
    old = student.class_embedding.codebook.weight.detach().clone()
    new_ids = student.add_styles(["pixel", "sepia"], seed=3)
    assert new_ids == [3, 4] and student.style_names == STYLES + ["pixel", "sepia"]
    grown = student.class_embedding.codebook.weight
    assert grown.shape == (5, old.shape[1]) and torch.equal(grown[:3], old)
    assert not torch.equal(grown[3], grown[4])
    with pytest.raises(StyleError, match="duplicate"):
        student.add_styles(["anime"])


def test_a_second_increment_does_not_start_at_the_first_ones_rows(student):
    """An incremental merge of an incremental merge (same student.codebook_seed): the new rows are drawn by
    position, not from a stream started afresh, which gave the second increment the first one's rows."""
    twin = copy.deepcopy(student)
    student.add_styles(["pixel", "sepia"], seed=0)
    again = student.add_styles(["chalk", "neon"], seed=0)
    w = student.class_embedding.codebook.weight.detach()
    assert again == [5, 6] and not torch.equal(w[3:5], w[5:7])
    cos = torch.nn.functional.cosine_similarity(w[5:7, None], w[None, 3:5], dim=-1)  # (2, 2) new vs the first increment's
    assert cos.abs().max() < 0.5
    # deterministic per seed and position: the same growth of the same model draws the same rows
    twin.add_styles(["pixel", "sepia"], seed=0)
    twin.add_styles(["chalk", "neon"], seed=0)
    assert torch.equal(twin.class_embedding.codebook.weight, student.class_embedding.codebook.weight)


def test_block_features_cover_down_mid_up(student):
    x, t, h = _inputs(batch=2)
    with capture_block_features(student) as feats:
        student(x, t, h, style_ids=torch.tensor([0, 1]))
    n_blocks = len(student.down_blocks) + 1 + len(student.up_blocks)
    assert len(feats) == n_blocks and all(f.shape[0] == 2 and f.ndim == 4 for f in feats)
    # hooks are removed afterwards
    student(x, t, h, style_ids=torch.tensor([0, 1]))
    assert len(feats) == n_blocks


def test_official_format_round_trip(student, tmp_path):
    save_official_unet(student, tmp_path / "unet")
    config = json.loads((tmp_path / "unet" / "config.json").read_text())
    assert config["addition_embed_type"] == "model_merge" and config["num_models"] == 3
    from safetensors.torch import load_file

    keys = load_file(str(tmp_path / "unet" / "diffusion_pytorch_model.safetensors")).keys()
    assert "model_embedding.weight" in keys and "add_embedding.linear_1.weight" in keys
    loaded = load_official_unet(tmp_path / "unet")
    a, b = student.state_dict(), loaded.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    x, t, h = _inputs()
    ids = torch.tensor([2, 1, 0])
    # the reference fork's calling convention works too
    assert torch.equal(student(x, t, h, style_ids=ids).sample, loaded(x, t, h, added_cond_kwargs={"model_ids": ids}).sample)


def test_a_sharded_official_unet_loads(student, tmp_path):
    """Finding: load_official_unet read diffusion_pytorch_model.safetensors only, so a unet/ folder in
    diffusers' sharded layout (save_pretrained shards over max_shard_size, 10 GB by default, which an
    fp32 SDXL UNet exceeds) failed with FileNotFoundError. Its shards load now, a missing one named."""
    from huggingface_hub import save_torch_state_dict
    from safetensors.torch import load_file

    save_official_unet(student, tmp_path / "single")
    folder = tmp_path / "sharded"
    folder.mkdir()
    state = load_file(str(tmp_path / "single" / "diffusion_pytorch_model.safetensors"))
    save_torch_state_dict(state, folder, filename_pattern="diffusion_pytorch_model{suffix}.safetensors", max_shard_size="200KB")
    (folder / "config.json").write_text((tmp_path / "single" / "config.json").read_text())
    shards = sorted(folder.glob("diffusion_pytorch_model-*.safetensors"))
    assert len(shards) > 1 and (folder / "diffusion_pytorch_model.safetensors.index.json").is_file()
    loaded = load_official_unet(folder)
    a, b = student.state_dict(), loaded.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    shards[1].unlink()
    with pytest.raises(FileNotFoundError, match=rf"lists shard\(s\) \['{shards[1].name}'\] that are not in"):
        load_official_unet(folder)
    (folder / "diffusion_pytorch_model.safetensors.index.json").unlink()
    with pytest.raises(FileNotFoundError, match="holds no UNet weights: neither diffusion_pytorch_model.safetensors nor"):
        load_official_unet(folder)


def test_official_sdxl_layout_names_the_style_mlp_add_embedding2(tmp_path):
    """The reference fork's `model_merge_xl` UNet holds the style MLP as `add_embedding2` (no underscore):
    a checkpoint in that layout loads with its codebook and MLP, and save_official_unet writes that name.
    Both used `add_embedding_2`, so a published SDXL checkpoint failed to load (and ours did not load there);
    files written under the old name still load."""
    from diffusers.models.embeddings import TimestepEmbedding
    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)
    base = UNet2DConditionModel(**tiny_sdxl_unet_config())
    dim = base.time_embedding.linear_2.out_features
    mlp = TimestepEmbedding(dim, dim)
    state = dict(base.state_dict()) | {"model_embedding.weight": torch.randn(3, dim)}
    state |= {f"add_embedding2.{k}": v for k, v in mlp.state_dict().items()}
    config = {k: v for k, v in dict(base.config).items() if not k.startswith("_")} | {"addition_embed_type": "model_merge_xl", "num_models": 3}
    folder = tmp_path / "reference" / "unet"
    folder.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "diffusion_pytorch_model.safetensors"))
    (folder / "config.json").write_text(json.dumps(config, default=list))
    loaded = load_official_unet(folder)
    assert loaded.style_names == ["style_0", "style_1", "style_2"]
    assert torch.equal(loaded.class_embedding.codebook.weight, state["model_embedding.weight"])
    assert all(torch.equal(v, loaded.class_embedding.mlp.state_dict()[k]) for k, v in mlp.state_dict().items())
    assert torch.equal(loaded.add_embedding.linear_1.weight, base.add_embedding.linear_1.weight)  # SDXL's text_time one

    save_official_unet(loaded, tmp_path / "ours" / "unet")
    written = load_file(str(tmp_path / "ours" / "unet" / "diffusion_pytorch_model.safetensors"))
    assert set(written) == set(state) and all(torch.equal(written[k], state[k]) for k in state)

    legacy = {k.replace("add_embedding2.", "add_embedding_2."): v for k, v in written.items()}  # what earlier versions wrote
    save_file(legacy, str(tmp_path / "ours" / "unet" / "diffusion_pytorch_model.safetensors"))
    again = load_official_unet(tmp_path / "ours" / "unet")
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in loaded.state_dict().items())


@pytest.mark.parametrize("error", [OSError(28, "No space left on device"), KeyboardInterrupt()], ids=["error", "ctrl-c"])
def test_official_save_that_fails_part_way_keeps_the_earlier_one(student, tmp_path, monkeypatch, error):
    """save_official_unet wrote its weights in place: a save over an earlier one that failed part-way
    (a full disk, a Ctrl-C) left a torn diffusion_pytorch_model.safetensors, and the folder no longer loaded."""
    from dmm_ray.models import official_format

    folder = tmp_path / "unet"
    save_official_unet(student, folder)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}

    def half(state, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half")
        raise error

    monkeypatch.setattr(official_format, "save_file", half)
    with pytest.raises(type(error)):
        save_official_unet(student, folder)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert torch.equal(load_official_unet(folder).class_embedding.codebook.weight, student.class_embedding.codebook.weight)


def test_sdxl_style_unet_keeps_text_time():
    torch.manual_seed(0)
    base = UNet2DConditionModel(**tiny_sdxl_unet_config())
    student = StyleUNet.from_unet(base, ["a", "b"]).eval()
    assert student.add_embedding is not None  # SDXL's text_time embedding kept
    x = torch.randn(2, 4, 8, 8)
    cond = {"text_embeds": torch.randn(2, 32), "time_ids": torch.randn(2, 6)}
    h = torch.randn(2, 77, 64)
    out_a = student(x, torch.tensor([5, 5]), h, style_ids=torch.tensor([0, 0]), added_cond_kwargs=cond).sample
    out_b = student(x, torch.tensor([5, 5]), h, style_ids=torch.tensor([1, 1]), added_cond_kwargs=cond).sample
    assert out_a.shape == x.shape and not torch.allclose(out_a, out_b)


def test_resolve_style_errors_name_known_styles():
    assert torch.equal(resolve_style(STYLES, "ink"), torch.tensor([0.0, 0.0, 1.0]))
    assert torch.allclose(resolve_style(STYLES, {"real": 1, "ink": 3}), torch.tensor([0.25, 0.0, 0.75]))
    for bad, match in [
        ("manga", "unknown style 'manga'.*0:real, 1:anime, 2:ink"),
        (7, "out of range"),
        ({"real": -1, "ink": 2}, ">= 0"),
        ([0, 0, 0], "all zero"),
        ([1, 2], "one entry per style"),
    ]:
        with pytest.raises(StyleError, match=match):
            resolve_style(STYLES, bad)


def test_a_mixture_naming_one_style_twice_is_refused():
    """{"ink": 0.5, 2: 0.5} (a name and its index, or its digit string, as Serve's JSON keys are) added the
    two weights silently: one resolver for the pipeline, Serve and the jobs, so the refusal is there."""
    for mixture, match in [({"ink": 0.5, 2: 0.5}, "'ink' and 2"), ({"anime": 1, "1": 1, "ink": 1}, "'anime' and '1'")]:
        with pytest.raises(StyleError, match=f"give style '(ink|anime)' twice \\({match}: a name and its index\\)"):
            resolve_style(STYLES, mixture)


def test_a_bytes_style_name_is_read_as_its_name():
    """A numpy bytes array of names (dtype S) is one name per prompt (`is_per_prompt`), but each b"ink" was
    read as a sequence of weights, one per byte: with three styles, a mixture of about 1/3 each, silently."""
    import numpy as np

    from dmm_ray.pipeline import style_rows

    rows = style_rows(STYLES, 2, style=np.array(["ink", "real"], dtype="S"))
    assert torch.equal(rows, torch.tensor([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0]]))
    assert torch.equal(resolve_style(STYLES, {b"anime": 1}), torch.tensor([0.0, 1.0, 0.0]))
    with pytest.raises(StyleError, match="is not UTF-8 text"):
        resolve_style(STYLES, b"\xff\xfe\xfd")


def test_missing_style_is_a_clear_error(student):
    x, t, h = _inputs(batch=1)
    with pytest.raises(StyleError, match="no style given"):
        student(x, t, h)


@pytest.fixture
def two_students(tiny_components):
    torch.manual_seed(1)
    return StyleUNet.from_unet(tiny_components["unet"], ["a", "b"]).eval(), StyleUNet.from_unet(tiny_components["unet"], ["a", "b", "c"]).eval()


def _siblings(folder):
    return sorted(p.name for p in folder.parent.iterdir() if p.name != folder.name)


def test_official_save_interrupted_between_its_renames_keeps_the_earlier_one(two_students, tmp_path, monkeypatch):
    """save_official_unet renamed its weights, then its config, into place: a Ctrl-C between the two renames
    left the new weights (3 styles) beside the earlier config (2 styles), and the folder no longer loaded."""
    import os

    two, three = two_students
    folder = tmp_path / "unet"
    save_official_unet(two, folder)
    (folder / "notes.txt").write_text("mine")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    real, calls = os.replace, []

    def replace(src, dst):
        calls.append(src)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        save_official_unet(three, folder)
    monkeypatch.setattr(os, "replace", real)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert load_official_unet(folder).style_names == ["a", "b"] and _siblings(folder) == []

    save_official_unet(three, folder)  # the folder is replaced whole; what else it held stays
    assert load_official_unet(folder).style_names == ["a", "b", "c"] and (folder / "notes.txt").read_text() == "mine"
    assert _siblings(folder) == []


def test_two_official_saves_into_one_folder_at_once_leave_one_whole_save(two_students, tmp_path, monkeypatch):
    """Both saves staged under the same fixed `.tmp` names: one's weights written over the other's before it
    renamed them in left the weights of one save beside the config of the other (and the other save failed)."""
    import threading

    from dmm_ray.models import official_format

    two, three = two_students
    folder = tmp_path / "unet"
    real_save, first, second = official_format.save_file, threading.Event(), threading.Event()

    def save_file(state, filename, metadata=None):  # A writes, then B writes, then both go on
        if threading.current_thread().name == "A":
            real_save(state, filename, metadata)
            first.set()
            second.wait(1)  # the fix lets B start only after A: A goes on after the timeout
        else:
            first.wait(1)  # likewise when the fix let B go first
            real_save(state, filename, metadata)
            second.set()

    monkeypatch.setattr(official_format, "save_file", save_file)
    errors = []

    def save(unet):
        try:
            save_official_unet(unet, folder)
        except Exception as error:
            errors.append(error)

    threads = [threading.Thread(target=save, args=(unet,), name=name) for unet, name in ((two, "A"), (three, "B"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    loaded = load_official_unet(folder)  # one whole save (either): its weights with its own config
    saved = {len(u.style_names): u for u in (two, three)}[len(loaded.style_names)]
    assert loaded.style_names == saved.style_names
    assert torch.equal(loaded.class_embedding.codebook.weight, saved.class_embedding.codebook.weight)


def test_official_save_refuses_a_file_and_keeps_a_link(student, tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="it is a file"):
        save_official_unet(student, tmp_path / "file")
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    save_official_unet(student, tmp_path / "link")
    assert (tmp_path / "link").is_symlink() and load_official_unet(tmp_path / "real").style_names == STYLES


@pytest.mark.parametrize("film,rank", [(False, 0), (True, 2)], ids=["paper", "film+adapters"])
def test_layerwise_casting_to_another_compute_dtype_runs_like_a_stock_unet(tiny_components, film, rank):
    """enable_layerwise_casting(storage fp8, compute bf16) on a float32 model: the codebook keeps float32
    (read outside any layer's forward) and its rows met the MLP's bf16 weights ("mat1 and mat2 must have the
    same dtype"), where the stock UNet runs. The style rows now take the sample's dtype, as class labels do."""
    torch.manual_seed(1)
    student = StyleUNet.from_unet(tiny_components["unet"], STYLES, style_film=film, adapter_rank=rank).eval()
    student.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.bfloat16)
    assert student.class_embedding.codebook.weight.dtype == torch.float32
    x, t, h = (v.bfloat16() if v.is_floating_point() else v for v in _inputs(batch=2))
    with torch.no_grad():
        by_id = student(x, t, h, style_ids=torch.tensor([0, 1])).sample
        by_weights = student(x, t, h, style_weights=torch.eye(3)[[0, 1]]).sample
    assert by_id.dtype == torch.bfloat16 and torch.isfinite(by_id).all()
    assert torch.equal(by_id, by_weights)


@pytest.mark.parametrize("ids", [torch.tensor([0.9, 1.5, 0.0]), torch.tensor([True, False, True])], ids=["fractional", "bool"])
def test_style_ids_that_are_no_whole_indices_are_refused(student, ids):
    """`.long()` turned style_ids 0.9 into style 0 and 1.5 into style 1 (a mixture passed as ids ran as other
    styles), and a bool mask into styles 1/0, without a word. Whole-valued float ids still select their style."""
    x, t, h = _inputs()
    with pytest.raises(StyleError, match="whole style indices"):
        student(x, t, h, style_ids=ids)
    with torch.no_grad():
        assert torch.equal(
            student(x, t, h, style_ids=torch.tensor([2.0, 0.0, 1.0])).sample, student(x, t, h, style_ids=torch.tensor([2, 0, 1])).sample
        )


def test_official_config_with_a_key_this_diffusers_does_not_know_loads(student, tmp_path):
    """load_official_unet built the UNet with StyleUNet(**config): a config key this diffusers' UNet does not take
    (one a newer diffusers writes) failed with a bare TypeError, where diffusers' loaders drop it with a warning."""
    save_official_unet(student, tmp_path / "unet")
    config = json.loads((tmp_path / "unet" / "config.json").read_text())
    (tmp_path / "unet" / "config.json").write_text(json.dumps({**config, "a_newer_diffusers_option": True}))
    loaded = load_official_unet(tmp_path / "unet")
    assert loaded.style_names == STYLES
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in student.state_dict().items())


def test_official_loader_names_the_loader_for_a_dmm_ray_merged_model_and_a_missing_num_models(student, tmp_path):
    """from_official / load_official_unet on a dmm-ray merged model (a StyleUNet in diffusers' layout) said
    "not a DMM checkpoint", naming no loader that reads it; an official config without num_models was a bare KeyError."""
    student.save_pretrained(tmp_path / "ours")
    with pytest.raises(ValueError, match="dmm-ray merged model.*load_dmm_pipeline"):
        load_official_unet(tmp_path / "ours")
    save_official_unet(student, tmp_path / "unet")
    config = json.loads((tmp_path / "unet" / "config.json").read_text())
    del config["num_models"]
    (tmp_path / "unet" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="num_models .* must be a whole number >= 1, got None"):
        load_official_unet(tmp_path / "unet")


@pytest.mark.parametrize("names", [["x", "y", "z"], ["x", "y"]], ids=["same-n", "other-n"])
def test_from_unet_refuses_a_style_unet(student, names):
    """from_unet(a StyleUNet) copied its codebook and MLP as base weights (the same N: the old styles' rows under
    the new names, "only the codebook and MLP are new" broken) or failed with torch's size mismatch (another N)."""
    with pytest.raises(ValueError, match="already a StyleUNet.*add_styles"):
        StyleUNet.from_unet(student, names)


def test_style_adapters_refuse_more_styles_than_the_codebook_is_wide(tiny_components):
    """The adapters read each sample's style weights back from e~ by least squares against the codebook (N x d):
    with N > d (129 styles on the toy's d = 128) the rows are dependent and every style's adapters ran a blend of
    other styles' deltas, without a word. Refused at construction and in add_styles; without adapters N > d is fine."""
    unet = tiny_components["unet"]
    d = unet.time_embedding.linear_2.out_features
    with pytest.raises(ValueError, match=f"{d + 1} styles with style adapters.*at most {d}"):
        StyleUNet.from_unet(unet, [f"s{i}" for i in range(d + 1)], adapter_rank=1)
    student = StyleUNet.from_unet(unet, [f"s{i}" for i in range(d)], adapter_rank=1)
    with pytest.raises(ValueError, match=f"{d + 1} styles with style adapters"):
        student.add_styles(["one more"])
    assert student.num_styles == d
    assert StyleUNet.from_unet(unet, [f"s{i}" for i in range(d + 1)]).num_styles == d + 1
