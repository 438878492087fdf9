"""Incremental merging (paper 3.5): codebook growth, the frozen regulariser, early rejections."""

import json
import re
import time
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline
from merge_fixtures import build_world, hold_in_another_process, kill_between_save_and_record, tiny_merge_config

from dmm_ray import DMMPipeline, StyleUNet
from dmm_ray.config import MergeConfig
from dmm_ray.distill.layout import regularizer_style_ids, worker_layout
from dmm_ray.distill.step import DistillStep, LossSettings
from dmm_ray.merge import run_merge, validate_before_ray
from dmm_ray.merged_model import MERGE_RECORD
from dmm_ray.teachers import TeacherError
from dmm_ray.tiny import tiny_sd_components, training_noise_scheduler


@pytest.fixture(scope="module")
def merged_world(tmp_path_factory):
    root = tmp_path_factory.mktemp("incr")
    world = build_world(root, names=["old0", "old1", "new0"])
    c = tiny_sd_components(seed=0)
    torch.manual_seed(0)
    pipe = DMMPipeline.from_components(StyleUNet.from_unet(c["unet"], ["old0", "old1"]), c["vae"], c["text_encoder"], c["tokenizer"], c["scheduler"])
    pipe.save_pretrained(root / "merged")
    # the record a merge writes beside its model: the old styles' teachers, which evaluation needs again
    (root / "merged" / MERGE_RECORD).write_text(json.dumps({"teachers": [t for t in world["teachers"] if t["name"].startswith("old")]}))
    world["merged"] = str(root / "merged")
    return world


def test_regulariser_draws_only_old_styles():
    ids = regularizer_style_ids(10_000, 4, torch.Generator().manual_seed(0))
    assert ids.min() >= 0 and ids.max() <= 3 and set(ids.tolist()) == {0, 1, 2, 3}


def test_layout_is_new_teachers_times_k_plus_one():
    roles = worker_layout(num_teachers=4, workers_per_teacher=2, num_old_styles=4, regularization=True)
    assert len(roles) == 4 * 2 + 1
    assert [r.style_index for r in roles[:4]] == [4, 5, 6, 7]  # new rows come after the old ones
    assert roles[-1].kind == "regularizer" and roles[-1].style_index is None
    assert len(worker_layout(4, 2, num_old_styles=4, regularization=False)) == 8


def test_regularisation_teacher_never_changes(merged_world):
    frozen = StyleUNet.from_pretrained(f"{merged_world['merged']}/unet").requires_grad_(False).eval()
    student = StyleUNet.from_pretrained(f"{merged_world['merged']}/unet")
    student.add_styles(["new0"], seed=0)
    before = {k: v.clone() for k, v in frozen.state_dict().items()}
    c = tiny_sd_components(seed=0)
    text = c["text_encoder"].requires_grad_(False)
    sched = training_noise_scheduler()
    step = DistillStep(student, text, frozen, text, sched, LossSettings(lambda_adv=0), num_styles=3, teacher_takes_style=True)
    opt = torch.optim.AdamW(student.parameters(), lr=1e-2)
    x0 = torch.randn(4, 4, 8, 8)
    t = torch.randint(0, 1000, (4,))
    batch = {
        "noisy_latents": sched.add_noise(x0, torch.randn_like(x0), t),
        "timesteps": t,
        "input_ids": torch.tensor(c["tokenizer"](["a red circle"] * 4, padding="max_length", max_length=77).input_ids),
    }
    ids = regularizer_style_ids(4, 2, torch.Generator().manual_seed(1))
    for _ in range(2):
        logs = step.run([batch], [ids], opt)
    assert logs["loss_score"] > 0
    assert all(torch.equal(before[k], v) for k, v in frozen.state_dict().items())
    assert all(p.grad is None for p in frozen.parameters())
    assert not torch.equal(student.conv_in.weight, frozen.conv_in.weight)  # the student did move


def test_duplicate_style_name_rejected_before_ray(merged_world, tmp_path):
    teachers = [t for t in merged_world["teachers"] if t["name"] == "old1"]
    cfg = MergeConfig.model_validate(
        tiny_merge_config(merged_world, tmp_path, teachers=teachers, incremental={"base_merged": merged_world["merged"]})
    )
    with pytest.raises(TeacherError, match=r"\['old1'\] are already styles"):
        validate_before_ray(cfg)
    out = tmp_path / "refused"
    with pytest.raises(TeacherError, match=r"\['old1'\] are already styles"):
        run_merge(cfg.model_copy(update={"output_dir": str(out)}))
    assert not out.exists()  # refused before anything is written: no empty output folder, no lock


def test_dry_run_layout_of_an_incremental_merge_names_the_regulariser(merged_world, tmp_path):
    """jobs/merge.py --dry-run prints describe_layout: with regularisation on (the default) it used to
    fail with 'regularisation needs a previous merged model with at least one style'."""
    from dmm_ray.merge import describe_layout

    teachers = [t for t in merged_world["teachers"] if t["name"] == "new0"]
    cfg = MergeConfig.model_validate(
        tiny_merge_config(merged_world, tmp_path, teachers=teachers, incremental={"base_merged": merged_world["merged"]})
    )
    text = describe_layout(cfg)
    assert "+ 1 regularisation worker" in text
    assert "worker(s) [0]: new0" in text and "worker 1: the previous merged model (regularisation of the old styles)" in text
    # ... and its memory plan: the previous model's real parameters, in fp32
    from pathlib import Path

    from dmm_ray.memory_plan import describe_config

    plan = describe_config(cfg)
    params = sum(p.numel() for p in StyleUNet.from_pretrained(Path(merged_world["merged"]) / "unet").parameters())
    assert "memory plan of the incremental merge's regularisation worker" in plan and f"previous merged model: {params / 1e6:.1f}M parameters" in plan


def test_evaluating_a_previous_model_without_its_teachers_record_is_refused_before_ray(merged_world, tmp_path, capsys):
    """A previous merged model made elsewhere has no dmm_merge.json: the evaluation of its old styles has
    no teachers. It used to pass --dry-run and fail only after training and the save."""
    import shutil

    import yaml

    from jobs import merge as merge_job

    previous = shutil.copytree(merged_world["merged"], tmp_path / "previous")
    (previous / MERGE_RECORD).unlink()
    new = [t for t in merged_world["teachers"] if t["name"] == "new0"]
    evaluation = {"enabled": True, "prompts": ["a red circle"], "extractor": {"kind": "import", "path": "eval_helpers:SeededConvExtractor"}}
    config = tiny_merge_config(merged_world, tmp_path / "out", teachers=new, incremental={"base_merged": str(previous)}, evaluation=evaluation)
    with pytest.raises(TeacherError, match=r"incremental.base_merged: .*dmm_merge.json is missing.*evaluation.enabled: false"):
        validate_before_ray(MergeConfig.model_validate(config))
    (tmp_path / "merge.yaml").write_text(yaml.safe_dump(config))
    assert merge_job.main(["--config", str(tmp_path / "merge.yaml"), "--dry-run"]) == 2
    assert "incremental.base_merged" in capsys.readouterr().err and not (tmp_path / "out").exists()
    validate_before_ray(MergeConfig.model_validate({**config, "evaluation": {"enabled": False}}))  # merged without evaluating


def test_a_previous_model_whose_own_merge_is_running_is_refused_before_ray(merged_world, tmp_path, capsys):
    """Finding: an incremental merge whose base_merged is another output_dir's merged/ did not read that
    folder's merge.lock, so it passed --dry-run and started while a merge there (another process) held it,
    whose save could swap the previous model mid-read (the regulariser, the student, the save all read it),
    as jobs/fast.py, evaluate.py and export.py refuse to. Now it is refused before Ray, in the dry run too,
    naming the holder and what to do, and writes nothing; an evaluation holding the lock (it only reads the
    model) and a merge that is gone are no obstacle."""
    import shutil

    import yaml

    from dmm_ray import output_lock
    from dmm_ray.output_lock import OutputDirBusyError
    from jobs import merge as merge_job

    first = tmp_path / "first"
    previous = shutil.copytree(merged_world["merged"], first / "merged")
    new = [t for t in merged_world["teachers"] if t["name"] == "new0"]
    config = tiny_merge_config(merged_world, tmp_path / "out", teachers=new, incremental={"base_merged": str(previous)})
    cfg = MergeConfig.model_validate(config)
    (tmp_path / "merge.yaml").write_text(yaml.safe_dump(config))
    refusal = f"incremental.base_merged {previous} is the merged model of output_dir {first}, whose merge.lock a running merge holds"
    proc = hold_in_another_process(first)
    try:
        with pytest.raises(OutputDirBusyError, match=f"{refusal} .*pid {proc.pid}.*kill {proc.pid}.*give incremental.base_merged a copy"):
            validate_before_ray(cfg)
        with pytest.raises(OutputDirBusyError, match=refusal):
            run_merge(cfg)
        assert merge_job.main(["--config", str(tmp_path / "merge.yaml"), "--dry-run"]) == 2
        assert refusal in capsys.readouterr().err
    finally:
        proc.kill()
        proc.wait()
    assert not (tmp_path / "out").exists()  # refused before anything is written
    validate_before_ray(cfg)  # its merge is gone (a stale lock): read as before
    proc = hold_in_another_process(first, job=output_lock.EVALUATION, fix="--out OUT", holder="merge")
    try:
        validate_before_ray(cfg)  # an evaluation there only reads the model
    finally:
        proc.kill()
        proc.wait()


def test_architecture_mismatch_rejected_before_ray(merged_world, tmp_path):
    StableDiffusionPipeline(**tiny_sd_components(seed=0, cross_attention_dim=16)).save_pretrained(tmp_path / "odd")
    cfg = MergeConfig.model_validate(
        tiny_merge_config(
            merged_world, tmp_path, teachers=[{"name": "odd", "source": str(tmp_path / "odd")}], incremental={"base_merged": merged_world["merged"]}
        )
    )
    with pytest.raises(TeacherError, match="teacher 'odd'.*cross_attention_dim"):
        validate_before_ray(cfg)


def test_student_extensions_other_than_the_previous_models_are_refused_before_ray(merged_world, tmp_path):
    """The incremental student is the previous model grown (its FiLM and adapters as they are): a config
    asking for rank-4 adapters and FiLM on a model without them passed, and trained without them."""
    new = [t for t in merged_world["teachers"] if t["name"] == "new0"]

    def cfg(**student):
        raw = tiny_merge_config(merged_world, tmp_path, teachers=new, incremental={"base_merged": merged_world["merged"]})
        return MergeConfig.model_validate({**raw, "student": {**raw["student"], **student}})

    validate_before_ray(cfg())  # as the previous model: no FiLM, no adapters
    with pytest.raises(
        TeacherError,
        match=r"student.style_film is true but the previous model has false; student.style_adapters.rank is 4 but the previous model "
        r"has 0\. An incremental merge grows .*'s student as it is; set student.style_film: false, student.style_adapters.rank: 0",
    ):
        validate_before_ray(cfg(style_film=True, style_adapters={"rank": 4}))


def test_adapter_targets_other_than_the_previous_models_layers_are_refused_before_ray(merged_world, tmp_path):
    """The incremental student keeps the previous model's adapted layers: a config whose
    student.style_adapters.targets resolve to other layers (the default targets, or a subset) passed and
    was silently ignored. The resolved layer sets are compared, so the same layers in another order pass,
    and the message gives targets that resolve to the previous model's layers."""
    import shutil

    c = tiny_sd_components(seed=0)
    unet = StyleUNet.from_unet(c["unet"], ["old0", "old1"], adapter_rank=2, adapter_targets=["to_q", "conv1"])
    merged = tmp_path / "merged"
    DMMPipeline.from_components(unet, c["vae"], c["text_encoder"], c["tokenizer"], c["scheduler"]).save_pretrained(merged)
    shutil.copy(f"{merged_world['merged']}/{MERGE_RECORD}", merged / MERGE_RECORD)
    new = [t for t in merged_world["teachers"] if t["name"] == "new0"]

    def cfg(style_film=False, **adapters):
        raw = tiny_merge_config(merged_world, tmp_path, teachers=new, incremental={"base_merged": str(merged)})
        student = {**raw["student"], "style_film": style_film, "style_adapters": {"rank": 2, **adapters}}
        return MergeConfig.model_validate({**raw, "student": student})

    validate_before_ray(cfg(targets=["to_q", "conv1"]))
    validate_before_ray(cfg(targets=["conv1", "attn1.to_q", "attn2.to_q"]))  # the same 16 layers spelled otherwise
    grows = r"\. An incremental merge grows .*'s student as it is; set "
    fix = r'student.style_adapters.targets: \["to_q", "conv1"\]$'
    with pytest.raises(
        TeacherError,
        match=r'student.style_adapters.targets \["to_q"\] resolve to 8 layers, not the previous model\'s 16: '
        r"they leave out 8 layers it adapts \(down_blocks.0.resnets.0.conv1, .* and 5 more\)" + grows + fix,
    ):
        validate_before_ray(cfg(targets=["to_q"]))
    with pytest.raises(
        TeacherError, match=r"resolve to 74 layers, not the previous model's 16: they add 58 layers it does not adapt \(.*\)" + grows + fix
    ):
        validate_before_ray(cfg())  # the default targets
    with pytest.raises(
        TeacherError,
        match=r"student.style_film is true but the previous model has false; student.style_adapters.targets \[\"to_k\"\] resolve to 8 "
        r"layers, not the previous model's 16: they leave out 16 .*, they add 8 .*" + grows + "student.style_film: false, " + fix,
    ):
        validate_before_ray(cfg(style_film=True, targets=["to_k"]))


def _regulariser_batches(cfg, monkeypatch, datasets: dict, stage: str = "distill"):
    """The regulariser's StageBatches for `cfg`'s `stage`, its Ray Data shards replaced by `datasets`."""
    import ray.train

    from dmm_ray.distill.layout import worker_layout
    from dmm_ray.distill.loop import Start, Worker
    from dmm_ray.distill.streams import StageBatches

    monkeypatch.setattr(ray.train, "get_dataset_shard", lambda name: datasets[name])
    old = ["old0", "old1"]
    roles = worker_layout(len(cfg.teachers), 1, len(old), True)
    worker = Worker(cfg, stage, len(roles) - 1, len(roles), torch.device("cpu"), roles, old, old + [t.name for t in cfg.teachers])
    assert worker.role.kind == "regularizer"
    return StageBatches(worker, training_noise_scheduler(), Start(), torch.Generator().manual_seed(0))


@pytest.mark.ray
def test_regulariser_mixes_in_the_previous_models_samples_under_their_own_styles(ray_cluster, merged_world, tmp_path, monkeypatch):
    """incremental.old_style_samples: beside its common rows (a random old style each), the regulariser
    reads the previous model's samples of the old styles at data.synthetic_fraction, each row under the
    style it was sampled with, every style in every batch; the new teachers' samples are not its own."""
    import numpy as np
    from pyarrow import fs as pafs

    from dmm_ray.data.shards import latent_table, write_shard
    from dmm_ray.data.stream import build_latent_dataset

    folders = []
    for style in range(3):  # old0, old1 (the previous model's samples) and new0 (its teacher's)
        rows = 8
        latents = np.full((rows, 4, 8, 8), float(style), dtype=np.float32)  # a row's value names its style
        folders.append(str(tmp_path / f"style_{style}"))
        write_shard(
            pafs.LocalFileSystem(),
            folders[-1],
            0,
            latent_table(latents, ["a red circle"] * rows, [f"s{style}-{i}" for i in range(rows)], [style] * rows),
        )
    new = [t for t in merged_world["teachers"] if t["name"] == "new0"]
    sections = dict(teachers=new, data={**tiny_merge_config(merged_world, tmp_path)["data"], "synthetic_fraction": 0.5})
    on = MergeConfig.model_validate(
        tiny_merge_config(merged_world, tmp_path / "on", **sections, incremental={"base_merged": merged_world["merged"], "old_style_samples": True})
    )
    off = on.model_copy(update={"incremental": on.incremental.model_copy(update={"old_style_samples": False})})
    datasets = {"train": build_latent_dataset(on.data), "synth": build_latent_dataset(on.data, shards=folders)}

    batches = _regulariser_batches(on, monkeypatch, datasets)
    for _ in range(3):
        [batch], [ids] = batches.next_step()
        assert batch["noisy_latents"].shape[0] == 4 and ids.shape == (4,)  # 2 common + 2 synthesized rows, as a teacher worker's 4
        common, synthesized = ids[:2], ids[2:]
        assert ((common >= 0) & (common < 2)).all()
        assert torch.equal(synthesized, batch["latents"][2:, 0, 0, 0].long())  # each sample under the style it was drawn with
        assert sorted(synthesized.tolist()) == [0, 1]  # both old styles in every batch, never the new teacher's samples
    [batch], [ids] = _regulariser_batches(off, monkeypatch, datasets).next_step()
    assert batch["noisy_latents"].shape[0] == 2  # the paper's regulariser: the common rows only
    assert ((ids >= 0) & (ids < 2)).all()


class _Delivered:
    """A dataset shard delivering numpy columns in the order given, `block` rows at a time, whatever
    batch size is asked for (as Ray Data's batches follow its block layout and execution order)."""

    def __init__(self, columns, order, block: int):
        self.columns, self.order, self.block = columns, order, block

    def iter_batches(self, batch_size=None, batch_format="numpy", drop_last=False, **_):
        for i in range(0, len(self.order), self.block):
            yield {k: v[self.order[i : i + self.block]] for k, v in self.columns.items()}


@pytest.mark.parametrize("stage, old_style_samples", [("distill", True), ("finetune", True), ("finetune", False)])
def test_the_regulariser_pools_the_synthesized_sets_in_one_order_whatever_the_delivery(merged_world, tmp_path, monkeypatch, stage, old_style_samples):
    """The regulariser pooled the synthesized sets in the order Ray Data delivered them (the styles in the
    order they first arrived, each style's rows as they arrived), so its batches hung on the block layout
    and execution order, and a resumed run could train on other batches than the run it resumes. The
    pool (the previous model's samples under their own styles, or without them every synthesized sample
    under random old styles in the fine-tune) is now in style, then source-id order: the same batches
    whatever the delivery."""
    import numpy as np

    from dmm_ray.data.stream import load_tokenizer, tokenize

    new = [t for t in merged_world["teachers"] if t["name"] == "new0"]
    sections = dict(teachers=new, data={**tiny_merge_config(merged_world, tmp_path)["data"], "synthetic_fraction": 0.5})
    incremental = {"base_merged": merged_world["merged"], "old_style_samples": old_style_samples}
    cfg = MergeConfig.model_validate(tiny_merge_config(merged_world, tmp_path / "out", **sections, incremental=incremental))
    tok = load_tokenizer(cfg.data.tokenizer_path())

    def columns(ids, styles=None):
        n = len(ids)
        cols = {
            "latents": np.random.default_rng(0).standard_normal((n, 4, 4, 4)).astype(np.float32),
            "input_ids": tokenize(tok, ["a red circle"] * n),
            "caption": np.array(["a red circle"] * n, dtype=object),
            "source_id": np.array(ids, dtype=object),
        }
        return cols if styles is None else {**cols, "style": np.array(styles, dtype=np.int64)}

    names = ["old0", "old1", "new0"]  # styles 0, 1: the previous model's samples; 2: the new teacher's
    synth = columns([f"synth-{names[s]}-{i}" for s in range(3) for i in range(4)], [s for s in range(3) for _ in range(4)])
    common = columns([f"common-{i}" for i in range(8)])
    seen = []
    for order in (np.arange(12), np.arange(12)[::-1]):  # the sets as written, and the other way round
        shards = {"train": _Delivered(common, np.arange(8), 8), "synth": _Delivered(synth, order, 3)}
        batches = _regulariser_batches(cfg, monkeypatch, shards, stage)
        steps = [batches.next_step() for _ in range(4)]
        seen.append([(sid, int(i)) for [batch], [ids] in steps for sid, i in zip(batch["source_ids"], ids)])
    assert any(sid.startswith("synth-") for sid, _ in seen[0])
    assert seen[0] == seen[1]  # the same rows under the same styles, step after step


def test_old_style_samples_need_the_regulariser_and_a_reader(merged_world, tmp_path):
    new = [t for t in merged_world["teachers"] if t["name"] == "new0"]
    base = tiny_merge_config(merged_world, tmp_path / "out", teachers=new, synthesis={"finetune_steps": 0})
    with pytest.raises(ValueError, match="incremental.base_merged and incremental.regularization: true"):
        MergeConfig.model_validate(
            {**base, "incremental": {"base_merged": merged_world["merged"], "regularization": False, "old_style_samples": True}}
        )
    with pytest.raises(ValueError, match="data.synthetic_fraction > 0"):
        MergeConfig.model_validate({**base, "incremental": {"base_merged": merged_world["merged"], "old_style_samples": True}})
    # unset: on exactly when the regulariser runs and the teachers' samples join the stream
    mixed = {**base, "data": {**base["data"], "synthetic_fraction": 0.5}}
    for config, incremental, expected in [
        (mixed, {"base_merged": merged_world["merged"]}, True),
        (base, {"base_merged": merged_world["merged"]}, False),
        (mixed, {"base_merged": merged_world["merged"], "regularization": False}, False),
        (mixed, {"base_merged": merged_world["merged"], "old_style_samples": False}, False),
        (mixed, {}, False),
    ]:
        assert MergeConfig.model_validate({**config, "incremental": incremental}).old_style_samples is expected, incremental


def test_a_regulariser_pool_smaller_than_its_batch_is_refused_before_ray(merged_world, tmp_path):
    """The regulariser takes one read's synthesized rows per teacher a worker hosts, from the pool of the
    old styles' samples: 1 old style x 2 images cannot fill 2 reads x 2 rows. That used to stop the merge in
    Ray Train after the synthesis ('synthesized samples has 2 rows, fewer than a batch of 4')."""
    c = tiny_sd_components(seed=0)
    one = tmp_path / "one_style"
    DMMPipeline.from_components(
        StyleUNet.from_unet(c["unet"], ["old0"]), c["vae"], c["text_encoder"], c["tokenizer"], c["scheduler"]
    ).save_pretrained(one)
    new = [t for t in merged_world["teachers"] if t["name"] != "old0"]  # 2 new teachers, one worker hosts both
    config = tiny_merge_config(
        merged_world,
        tmp_path / "out",
        teachers=new,
        incremental={"base_merged": str(one)},
        data={**tiny_merge_config(merged_world, tmp_path)["data"], "synthetic_fraction": 0.5},  # 2 of a batch of 4 rows
        scaling={"teachers_per_worker": 2},
        synthesis={"images_per_teacher": 2, "finetune_batch_size": 2},
    )
    cfg = MergeConfig.model_validate(config)
    assert cfg.old_style_samples
    with pytest.raises(
        ValueError, match=r"takes 4 of the previous model's samples \(2 synthesized rows x 2 teachers per worker\), .* give 2; synthesize at least 4"
    ):
        validate_before_ray(cfg)
    validate_before_ray(MergeConfig.model_validate({**config, "synthesis": {**config["synthesis"], "images_per_teacher": 4}}))
    validate_before_ray(MergeConfig.model_validate({**config, "scaling": {"teachers_per_worker": 1}}))  # one read per step: 2 rows


@pytest.mark.ray
def test_incremental_merge_end_to_end(ray_cluster, merged_world, tmp_path, monkeypatch):
    from dmm_ray.evaluation import api
    from dmm_ray.merge import run_merge

    evaluated = []  # evaluation is a merge stage, over every style merged so far (the FID machinery has its own tests)
    monkeypatch.setattr(api, "evaluate_merge", lambda path, teachers, config, **kw: evaluated.append((path, [t.name for t in teachers])) or "fid")

    new = [t for t in merged_world["teachers"] if t["name"] == "new0"]
    cfg = MergeConfig.model_validate(
        tiny_merge_config(
            merged_world,
            tmp_path / "out",
            teachers=new,
            incremental={"base_merged": merged_world["merged"], "old_style_samples": True},
            data={**tiny_merge_config(merged_world, tmp_path)["data"], "synthetic_fraction": 0.5, "encode": {"resolution": 16}},  # the shards' size
            synthesis={"finetune_steps": 0, "actors": 1, "resolution": 16},
            distill={"steps": 2, "lambda_adv": 0},
            evaluation={"enabled": True, "prompts": ["a red circle"], "extractor": {"kind": "import", "path": "eval_helpers:SeededConvExtractor"}},
        )
    )
    assert cfg.num_workers == 2  # 1 new teacher x 1 + the regulariser
    old = StyleUNet.from_pretrained(f"{merged_world['merged']}/unet")
    result = run_merge(cfg)
    assert result.evaluation == "fid" and evaluated == [(result.merged_path, ["old0", "old1", "new0"])]
    # the previous model sampled its two styles (rows 0, 1), the new teacher its own (row 2)
    assert sorted(p.name for p in (tmp_path / "out" / "synthesized").iterdir()) == ["style_0", "style_1", "style_2"]
    merged = DMMPipeline.from_pretrained(result.merged_path)
    assert merged.styles == ["old0", "old1", "new0"]
    assert merged.unet.class_embedding.codebook.weight.shape[0] == 3
    assert not torch.equal(
        merged.unet.class_embedding.codebook.weight[:2], old.class_embedding.codebook.weight
    )  # old rows fine-tuned by the regulariser


def test_an_incremental_merge_into_its_own_output_evaluates_the_styles_it_saved(merged_world, tmp_path, monkeypatch):
    """base_merged = <output_dir>/merged (a teacher added to the model in its own output_dir): the save
    replaces the previous model and its record, and the evaluation used to read that record again after
    it: the new teachers twice, one spec more than the model has styles. The merge reads them once,
    before any stage. (Training is stubbed: the distilled student is the previous model + the new style.)"""

    from dmm_ray import merge
    from dmm_ray.evaluation import api

    out, cfg = _adding_new0_into_its_own_output(merged_world, tmp_path)

    def distill(run):  # as distill/loop.py::_load_student starts it
        student = StyleUNet.from_pretrained(out / "merged" / "unet")
        student.add_styles(["new0"], seed=0)
        run.student_dir = out / "stages" / "distill_student"
        student.save_pretrained(run.student_dir)

    evaluated = []
    monkeypatch.setattr(api, "evaluate_merge", lambda path, teachers, config, **kw: evaluated.append([t.name for t in teachers]) or "fid")
    monkeypatch.setattr(merge, "init_for_training", lambda address: False)
    monkeypatch.setattr(merge, "plan_cluster", lambda cfg: None)
    monkeypatch.setattr(merge, "with_plan", lambda cfg, plan: cfg)
    monkeypatch.setattr(merge, "ensure_latents", lambda cfg, plan=None: None)
    monkeypatch.setattr(merge, "STAGES", (merge.Stage("distill", distill), *(s for s in merge.STAGES if s.name in ("save", "evaluate"))))
    result = merge.run_merge(cfg)
    assert DMMPipeline.from_pretrained(result.merged_path).styles == ["old0", "old1", "new0"]
    assert result.evaluation == "fid" and evaluated == [["old0", "old1", "new0"]]  # was old0, old1, new0, new0
    assert [t["name"] for t in json.loads((out / "merged" / MERGE_RECORD).read_text())["teachers"]] == ["old0", "old1", "new0"]
    # the previous model is gone: a re-run that finds no record of the save (a crash between the save's
    # swap and its record) resumes on the saved model's own record (test_..._between_its_save_and_its_record);
    # one from another model there is refused, and the refusal says why
    merge.forget(out, merge.COMPLETE_RECORD)
    validate_before_ray(cfg)
    record = json.loads((out / "merged" / MERGE_RECORD).read_text())
    (out / "merged" / MERGE_RECORD).write_text(json.dumps({**record, merge.SAVED_BY: "another merge's"}))
    with pytest.raises(TeacherError, match=r"\['new0'\] are already styles.*this merge's own output.*a copy of the previous model"):
        validate_before_ray(cfg)


def test_an_incremental_merge_into_its_own_output_resumes_after_its_save(merged_world, tmp_path, monkeypatch):
    """base_merged = <output_dir>/merged, fast.enabled: a re-run after the save (the few-step stage failed,
    or the whole merge finished) was refused ('already styles ... this merge's own output'), though the
    completion record says the merged model there is this config's and only the few-step stage, which reads
    that model, is left (a plain merge runs only that stage, or nothing). It now does the same. Its stages'
    records name the previous model's checksum, which its own save changed: that alone is not stale state.
    --restart, or another config, would merge from the model the save made: still refused. (Training is
    stubbed: the distilled student is the previous model + the new style.)"""
    import shutil

    from dmm_ray import fingerprint, merge

    out = tmp_path / "out"
    shutil.copytree(merged_world["merged"], out / "merged")
    new = [t for t in merged_world["teachers"] if t["name"] == "new0"]
    cfg = MergeConfig.model_validate(
        tiny_merge_config(merged_world, out, teachers=new, incremental={"base_merged": str(out / "merged")}, fast={"enabled": True})
    ).with_absolute_paths()
    ran, fail_fast = [], [True]

    def distill(run):  # as distill_stage: its inputs recorded, its state (checkpoints) left in output_dir
        ran.append("distill")
        fingerprint.record(run.cfg, run.state, "distill")
        (out / "ray_results" / f"{cfg.name}-distill").mkdir(parents=True, exist_ok=True)
        (out / "ray_results" / f"{cfg.name}-distill" / "checkpoint").write_text("")
        student = StyleUNet.from_pretrained(out / "merged" / "unet")
        student.add_styles(["new0"], seed=0)
        run.student_dir = out / "stages" / "distill_student"
        student.save_pretrained(run.student_dir)

    def fast(run):  # reads the saved model only
        ran.append("fast")
        assert DMMPipeline.from_pretrained(run.result.merged_path).styles == ["old0", "old1", "new0"]
        if fail_fast[0]:
            raise RuntimeError("the few-step stage failed")
        (out / "fast" / "model").mkdir(parents=True, exist_ok=True)
        (out / "fast" / "model" / "model_index.json").write_text("{}")
        (out / "fast" / "model" / "fast.json").write_text("{}")  # a few-step model, as the stage saves it

    monkeypatch.setattr(merge, "init_for_training", lambda address: False)
    monkeypatch.setattr(merge, "plan_cluster", lambda cfg: None)
    monkeypatch.setattr(merge, "with_plan", lambda cfg, plan: cfg)
    monkeypatch.setattr(merge, "ensure_latents", lambda cfg, plan=None: None)
    save = next(s for s in merge.STAGES if s.name == "save")
    monkeypatch.setattr(merge, "STAGES", (merge.Stage("distill", distill), save, merge.Stage("fast", fast)))
    with pytest.raises(RuntimeError, match="few-step stage failed"):
        merge.run_merge(cfg)
    assert ran == ["distill", "fast"]
    ran.clear()
    fail_fast[0] = False
    result = merge.run_merge(cfg)  # was refused: only the failed stage runs
    assert ran == ["fast"] and not result.already_complete
    assert DMMPipeline.from_pretrained(result.merged_path).styles == ["old0", "old1", "new0"]
    ran.clear()
    assert merge.run_merge(cfg).already_complete and ran == []  # was refused: nothing to do
    refused = r"\['new0'\] are already styles.*this merge's own output.*a copy of the previous model"
    with pytest.raises(TeacherError, match=refused):  # a merge from the saved model as its previous one
        merge.run_merge(cfg, restart=True)
    with pytest.raises(TeacherError, match=refused):
        merge.run_merge(cfg.model_copy(update={"distill": cfg.distill.model_copy(update={"steps": cfg.distill.steps + 1})}))
    assert ran == [] and DMMPipeline.from_pretrained(out / "merged").styles == ["old0", "old1", "new0"]


def test_relative_paths_are_made_absolute_for_workers(tmp_path):
    """Train workers run in another directory: `outputs/x/merged` must name the same folder there."""
    from dmm_ray.config import MergeConfig

    cfg = MergeConfig.model_validate(
        {
            "teachers": [{"name": "new", "source": "zoo/teachers/new"}],
            "student": {"base": "zoo/base"},
            "data": {"base": "zoo/base", "shards": "outputs/latents", "source": {"root": "zoo/images", "manifest": "manifest.jsonl"}},
            "incremental": {"base_merged": "outputs/first/merged"},
            "output_dir": "outputs/incr",
            "synthesis": {"prompts": "s3://bucket/prompts.txt"},
        }
    ).with_absolute_paths(tmp_path)
    assert cfg.incremental.base_merged == str(tmp_path / "outputs/first/merged")
    assert cfg.output_dir == str(tmp_path / "outputs/incr") and cfg.student.base == str(tmp_path / "zoo/base")
    assert cfg.teachers[0].source == str(tmp_path / "zoo/teachers/new") and cfg.data.shards == str(tmp_path / "outputs/latents")
    assert cfg.data.source.root == str(tmp_path / "zoo/images") and cfg.data.source.manifest == "manifest.jsonl"  # relative to root
    assert cfg.synthesis.prompts == "s3://bucket/prompts.txt"  # URIs untouched


def _merge_from_a_model_without_a_record(merged_world, tmp_path, monkeypatch):
    """An incremental merge (evaluation off, training stubbed: the previous model + new0) from a previous
    model made elsewhere: no dmm_merge.json, a styles.json of its own. Returns the saved folder."""
    import shutil

    from dmm_ray import merge
    from dmm_ray.merged_model import STYLES_RECORD

    previous = shutil.copytree(merged_world["merged"], tmp_path / "previous")
    (previous / MERGE_RECORD).unlink()
    (previous / STYLES_RECORD).write_text(json.dumps([{"name": "old0", "description": "ink"}, {"name": "old1", "description": "neon"}]))
    out = tmp_path / "out"
    new = [t for t in merged_world["teachers"] if t["name"] == "new0"]
    cfg = MergeConfig.model_validate(tiny_merge_config(merged_world, out, teachers=new, incremental={"base_merged": str(previous)}))

    def distill(run):
        student = StyleUNet.from_pretrained(previous / "unet")
        student.add_styles(["new0"], seed=0)
        run.student_dir = out / "stages" / "distill_student"
        student.save_pretrained(run.student_dir)

    monkeypatch.setattr(merge, "init_for_training", lambda address: False)
    monkeypatch.setattr(merge, "plan_cluster", lambda cfg: None)
    monkeypatch.setattr(merge, "with_plan", lambda cfg, plan: cfg)
    monkeypatch.setattr(merge, "ensure_latents", lambda cfg, plan=None: None)
    monkeypatch.setattr(merge, "STAGES", (merge.Stage("distill", distill), *(s for s in merge.STAGES if s.name == "save")))
    return merge.run_merge(cfg).merged_path


def test_an_incremental_merge_keeps_the_old_styles_descriptions(merged_world, tmp_path, monkeypatch):
    """The old styles' descriptions (the previous model's styles.json, what Serve's /styles showed) used
    to be dropped when its record did not carry them: the new styles.json said "" for each."""
    from dmm_ray.merged_model import STYLES_RECORD

    merged = _merge_from_a_model_without_a_record(merged_world, tmp_path, monkeypatch)
    described = {s["name"]: s["description"] for s in json.loads((merged / STYLES_RECORD).read_text())}
    assert described == {"old0": "ink", "old1": "neon", "new0": ""}


def test_a_record_without_every_styles_teacher_counts_as_none(merged_world, tmp_path, monkeypatch):
    """The merge above saves a record that names new0 alone for styles old0, old1, new0. The next
    incremental merge used to take it as the whole list and evaluate new0 and its own teacher only,
    silently leaving out old0 and old1; it is refused before Ray, as a model without a record is."""
    from dmm_ray.merged_model import recorded_teachers

    merged = _merge_from_a_model_without_a_record(merged_world, tmp_path, monkeypatch)
    assert recorded_teachers(merged) is None
    evaluation = {"enabled": True, "prompts": ["a red circle"], "extractor": {"kind": "import", "path": "eval_helpers:SeededConvExtractor"}}
    later = [{**t, "name": "new1"} for t in merged_world["teachers"] if t["name"] == "new0"]
    again = tiny_merge_config(merged_world, tmp_path / "out2", teachers=later, incremental={"base_merged": str(merged)}, evaluation=evaluation)
    with pytest.raises(TeacherError, match=r"incremental.base_merged: .*dmm_merge.json does not name a teacher for each of the model's styles"):
        validate_before_ray(MergeConfig.model_validate(again))


def _stub_training(monkeypatch, added: list[str], ran: list | None = None):
    """The merge's stages without Ray: distill is the previous model + `added` (as distill/loop.py's
    _load_student starts it; its inputs recorded and its state left in output_dir, as distill_stage's),
    then the real save, evaluate and track. `ran`: each stage's name, appended as it starts."""
    from dmm_ray import fingerprint, merge

    def distill(run):
        fingerprint.record(run.cfg, run.state, "distill")
        (run.out / "ray_results" / f"{run.cfg.name}-distill").mkdir(parents=True, exist_ok=True)
        (run.out / "ray_results" / f"{run.cfg.name}-distill" / "checkpoint").write_text("")
        student = StyleUNet.from_pretrained(f"{run.cfg.incremental.base_merged}/unet")
        student.add_styles(added, seed=0)
        run.student_dir = run.out / "stages" / "distill_student"
        student.save_pretrained(run.student_dir)
        run.timed("distill", time.time(), {"step": 2, "loss_score": 0.5})

    def counted(stage):
        def run(merge_run):
            (ran if ran is not None else []).append(stage.name)
            stage.run(merge_run)

        return merge.Stage(stage.name, run, stage.when)

    monkeypatch.setattr(merge, "init_for_training", lambda address: False)
    monkeypatch.setattr(merge, "plan_cluster", lambda cfg: None)
    monkeypatch.setattr(merge, "with_plan", lambda cfg, plan: cfg)
    monkeypatch.setattr(merge, "ensure_latents", lambda cfg, plan=None: None)
    later = (s for s in merge.STAGES if s.name in ("save", "evaluate", "track"))
    monkeypatch.setattr(merge, "STAGES", tuple(counted(s) for s in (merge.Stage("distill", distill), *later)))


def test_each_increments_mlflow_run_names_what_it_adds(merged_world, tmp_path, monkeypatch):
    """Every increment's stage run was called `incremental`: in the runs table one project's increments
    could not be told apart. Each is named for the styles it adds and how many the model then holds;
    the dmm.stage tag (filters, the registered version's description) stays `incremental`."""
    import mlflow

    from dmm_ray import merge
    from dmm_ray.tracking import make_tracker

    tracking = {"uri": f"sqlite:///{tmp_path}/mlflow.db", "registered_model_name": None}
    previous = merged_world["merged"]
    for added in (["new0"], ["new1", "new2", "new3", "new4", "new5"]):
        teachers = [{**merged_world["teachers"][2], "name": name} for name in added]  # new0's checkpoint under each name
        out = tmp_path / added[0]
        cfg = MergeConfig.model_validate(
            tiny_merge_config(merged_world, out, teachers=teachers, incremental={"base_merged": previous}, tracking=tracking)
        )
        _stub_training(monkeypatch, added)
        previous = str(merge.run_merge(cfg, tracker=make_tracker(cfg)).merged_path)
    client = mlflow.MlflowClient(tracking["uri"])
    runs = client.search_runs(
        [client.get_experiment_by_name("dmm-ray").experiment_id], "tags.`dmm.kind` = 'stage'", order_by=["attributes.start_time"]
    )
    assert [r.info.run_name for r in runs] == ["incremental +new0 (3 styles)", "incremental +new1, new2, new3 and 2 more (8 styles)"]
    assert [r.data.tags["dmm.stage"] for r in runs] == ["incremental", "incremental"]


def _on_another_folders_model(merged_world, tmp_path, monkeypatch):
    """An incremental merge into tmp_path/later of the style new0 on a copy of the world's merged model in another
    output folder (tmp_path/first/merged), training stubbed: (previous model, output_dir, config, stages run)."""
    import shutil

    previous = shutil.copytree(merged_world["merged"], tmp_path / "first" / "merged")
    out = tmp_path / "later"
    new = [t for t in merged_world["teachers"] if t["name"] == "new0"]
    cfg = MergeConfig.model_validate(tiny_merge_config(merged_world, out, teachers=new, incremental={"base_merged": str(previous)}))
    ran = []
    _stub_training(monkeypatch, ["new0"], ran)
    return previous, out, cfg, ran


def _remake_in_place(folder: Path) -> None:
    """Other weights at the same path (a model re-made in place): the last byte of its first safetensors file flipped."""
    weights_file = next(Path(folder).glob("*.safetensors"))
    weights = bytearray(weights_file.read_bytes())
    weights[-1] ^= 0xFF
    weights_file.write_bytes(bytes(weights))


def test_a_finished_incremental_merge_whose_previous_model_was_re_merged_in_place_is_not_complete(merged_world, tmp_path, monkeypatch, capsys):
    """The completion record compared the config alone, which names the previous model (incremental.base_merged)
    by its path: that model re-merged in place since (other settings, --restart) left the re-run "already
    complete", its model grown from the old one. The record holds the previous model's UNet checksum too: the
    same model is still complete (so is a record written before the checksum was); a changed one merges again,
    saying why, once the stages' state is gone, and is refused naming its checksum while that state is there.
    (Training is stubbed: the distilled student is the previous model + the new style.)"""
    import shutil

    from dmm_ray import merge
    from dmm_ray.fingerprint import StaleStateError

    previous, out, cfg, ran = _on_another_folders_model(merged_world, tmp_path, monkeypatch)
    merge.run_merge(cfg)
    assert ran[:2] == ["distill", "save"]
    ran.clear()
    assert merge.run_merge(cfg).already_complete and ran == []  # the same previous model: nothing to do

    _remake_in_place(previous / "unet")  # the previous model re-merged in place: other weights at the same path
    with pytest.raises(StaleStateError, match="incremental.base_merged.checksum"):  # its stages' state: refused, as before
        merge.run_merge(cfg)
    shutil.rmtree(out / "ray_results")  # the finished merge's checkpoints deleted: only its completion record is left
    capsys.readouterr()
    result = merge.run_merge(cfg)  # was "already complete"
    assert not result.already_complete and ran[:2] == ["distill", "save"]
    assert f"incremental.base_merged {previous} has changed since" in capsys.readouterr().out
    ran.clear()
    assert merge.run_merge(cfg).already_complete and ran == []  # complete again, from the model there now
    record = json.loads((out / merge.COMPLETE_RECORD).read_text())
    del record["asked"][merge.PREVIOUS_MODEL]  # written before the record held it: compared by the config alone
    (out / merge.COMPLETE_RECORD).write_text(json.dumps(record))
    assert merge.run_merge(cfg).already_complete and ran == []


def test_a_finished_incremental_merge_into_its_own_output_whose_teacher_was_re_made_in_place_is_refused(merged_world, tmp_path, monkeypatch):
    """base_merged = <output_dir>/merged, finished; its new teacher re-made in place since and the stages' checkpoints
    deleted: the re-run said "already complete" (the completion record compared the config alone, which names the
    teacher by its path) and kept the style of the old teacher. It cannot merge again (its save replaced the previous
    model): refused, naming the teacher that changed. (Training is stubbed: the previous model + the new style.)"""
    import shutil

    from dmm_ray import merge
    from dmm_ray.teachers import TeacherError

    out = tmp_path / "out"
    shutil.copytree(merged_world["merged"], out / "merged")
    new = [{**t, "source": str(shutil.copytree(t["source"], tmp_path / "new0"))} for t in merged_world["teachers"] if t["name"] == "new0"]
    cfg = MergeConfig.model_validate(tiny_merge_config(merged_world, out, teachers=new, incremental={"base_merged": str(out / "merged")}))
    ran = []
    _stub_training(monkeypatch, ["new0"], ran)
    merge.run_merge(cfg)
    assert ran[:2] == ["distill", "save"] and merge.run_merge(cfg).already_complete
    _remake_in_place(tmp_path / "new0" / "unet")  # the teacher re-made in place: other weights at the same path
    shutil.rmtree(out / "ray_results")
    with pytest.raises(TeacherError, match=re.escape(f"from other inputs: teacher 'new0' ({tmp_path / 'new0'}) has changed since")):
        merge.run_merge(cfg)  # was "already complete"


def test_an_incremental_merge_whose_previous_model_is_re_merged_while_it_runs_records_the_model_it_read(merged_world, tmp_path, monkeypatch):
    """The completion record took the previous model's checksum when the merge finished: a merge in that model's
    output_dir that saved another model there while this one ran (after this one's start, whose lock check it
    passed) left a record naming the new previous model, so once the stages' checkpoints were gone the re-run said
    "already complete" and kept a model grown from the old one (what fa3dafd's record is for). It records the
    checksum of the model as the merge read it (at its start), so the re-run merges again from the model there now."""
    import shutil

    from dmm_ray import merge

    previous, out, cfg, ran = _on_another_folders_model(merged_world, tmp_path, monkeypatch)
    distill = merge.STAGES[0].run

    def distill_then_re_merged_there(run):  # grown from the previous model, then another merge saves over it
        distill(run)
        _remake_in_place(previous / "unet")

    monkeypatch.setattr(merge, "STAGES", (merge.Stage("distill", distill_then_re_merged_there), *merge.STAGES[1:]))
    merge.run_merge(cfg)
    assert ran[:2] == ["distill", "save"]
    shutil.rmtree(out / "ray_results")  # the finished merge's checkpoints deleted: only its completion record is left
    ran.clear()
    result = merge.run_merge(cfg)  # was "already complete": a model grown from the old previous model
    assert not result.already_complete and ran[:2] == ["distill", "save"]


def test_an_incremental_merge_into_its_own_output_resumes_after_a_crash_in_evaluate_or_track(merged_world, tmp_path, monkeypatch):
    """base_merged = <output_dir>/merged: the save replaces the previous model, so a re-run after a crash
    in evaluate or track used to be refused ('already styles ... this merge's own output ... a copy of the
    previous model'), though the model it had saved was there and only evaluate and track were left. The
    save is recorded (merge_complete.json, evaluate_pending); the same command (or one whose evaluation:
    settings were fixed) now skips the training and the save and runs evaluate and track on the saved
    model, each style's teacher once, logging what the training measured. A config that would train again
    (another training setting, --restart) still finds the previous model gone: refused."""

    from dmm_ray import merge
    from dmm_ray.evaluation import api

    out, cfg = _adding_new0_into_its_own_output(merged_world, tmp_path)
    cfg = cfg.with_absolute_paths()
    ran, evaluated, failing = [], [], {"evaluate", "track"}

    def evaluate_merge(path, teachers, config, **kw):
        evaluated.append([t.name for t in teachers])
        if "evaluate" in failing:
            raise RuntimeError("the evaluation crashed")
        return None

    class Tracker:  # the merge's tracker: its stage runs, and what each registers
        def __init__(self):
            self.runs, self.logged = [], []

        def start_stage(self, name, cfg, run_name=None):
            self.runs.append(run_name)
            return {"run_id": f"run{len(self.runs)}"}

        def finish_stage(self, cfg, result):
            if "track" in failing:
                raise RuntimeError("the tracking store went away")
            self.logged.append(result.stage_metrics)

        def abort(self, error):
            pass

    monkeypatch.setattr(api, "evaluate_merge", evaluate_merge)
    _stub_training(monkeypatch, ["new0"], ran)
    tracker = Tracker()
    with pytest.raises(RuntimeError, match="the evaluation crashed"):
        merge.run_merge(cfg, tracker=tracker)
    assert ran == ["distill", "save", "evaluate"] and DMMPipeline.from_pretrained(out / "merged").styles == ["old0", "old1", "new0"]
    ran.clear()
    failing.discard("evaluate")
    # was refused: resumes after the save; the store failing in track stops nothing (an observer), the merge
    # stays recorded as saved, not tracked
    assert "the tracking store went away" in merge.run_merge(cfg, tracker=tracker).tracking_failed
    assert ran == ["evaluate", "track"]
    ran.clear()
    failing.clear()
    fixed = cfg.model_copy(update={"evaluation": cfg.evaluation.model_copy(update={"images_per_prompt": 2})})
    result = merge.run_merge(fixed, tracker=tracker)  # evaluation: settings changed: still the saved model's re-run
    assert ran == ["evaluate", "track"] and result.run_id == "run3" and not result.already_complete
    assert evaluated == [["old0", "old1", "new0"]] * 3  # each style's teacher once, from the saved model's record
    assert tracker.runs == ["incremental +new0 (3 styles)"] * 3
    assert tracker.logged == [{"distill": {"step": 2, "loss_score": 0.5, "seconds": pytest.approx(0, abs=10)}}]  # the first run's
    ran.clear()
    assert merge.run_merge(fixed, tracker=tracker).already_complete and ran == []
    refused = r"\['new0'\] are already styles.*this merge's own output.*a copy of the previous model"
    with pytest.raises(TeacherError, match=refused):  # a merge from the saved model as its previous one
        merge.run_merge(fixed, tracker=tracker, restart=True)
    with pytest.raises(TeacherError, match=refused):
        merge.run_merge(fixed.model_copy(update={"distill": fixed.distill.model_copy(update={"steps": 3})}), tracker=tracker)
    assert ran == [] and DMMPipeline.from_pretrained(out / "merged").styles == ["old0", "old1", "new0"]


def test_an_increment_on_another_student_base_than_the_previous_models_is_refused_before_ray(merged_world, tmp_path, monkeypatch):
    """The merged model holds its student base's text encoder, tokenizer, VAE and scheduler. An increment
    with a student.base of the same architecture but other weights was accepted: the new styles and the
    regulariser trained on the other text encoder and the save swapped it (and the VAE) in under the old
    styles. The record names the base's checksum now; another base is refused, a copy of it passes, and
    a previous model whose record predates it (merged_world's) is not checked."""
    import shutil

    from dmm_ray import merge

    new = [t for t in merged_world["teachers"] if t["name"] == "new0"]
    first = MergeConfig.model_validate(
        tiny_merge_config(merged_world, tmp_path / "first", teachers=new, incremental={"base_merged": merged_world["merged"]})
    )
    _stub_training(monkeypatch, ["new0"])
    previous = merge.run_merge(first).merged_path
    other = tmp_path / "other_base"
    c = tiny_sd_components(seed=0)
    with torch.no_grad():
        for p in c["text_encoder"].parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(0)))
    StableDiffusionPipeline(**c).save_pretrained(other)
    later = [{**new[0], "name": "new1"}]

    def increment(base):
        return MergeConfig.model_validate(
            tiny_merge_config(
                merged_world, tmp_path / "later", teachers=later, incremental={"base_merged": str(previous)}, student={"base": str(base)}
            )
        )

    with pytest.raises(TeacherError, match=rf"incremental.base_merged: .* was merged on the student base {merged_world['base']}.*Set student.base: "):
        validate_before_ray(increment(other))
    validate_before_ray(increment(shutil.copytree(merged_world["base"], tmp_path / "copy_of_base")))


def _adding_new0_into_its_own_output(merged_world, tmp_path):
    """(output_dir, config) of an incremental merge adding teacher new0 to a copy of the previous model in
    its own <output_dir>/merged (base_merged = that folder), evaluated with the seeded test extractor."""
    import shutil

    out = tmp_path / "out"
    shutil.copytree(merged_world["merged"], out / "merged")
    new = [t for t in merged_world["teachers"] if t["name"] == "new0"]
    evaluation = {"enabled": True, "prompts": ["a red circle"], "extractor": {"kind": "import", "path": "eval_helpers:SeededConvExtractor"}}
    config = tiny_merge_config(merged_world, out, teachers=new, incremental={"base_merged": str(out / "merged")}, evaluation=evaluation)
    return out, MergeConfig.model_validate(config)


def test_an_incremental_merge_into_its_own_output_resumes_after_a_crash_between_its_save_and_its_record(merged_world, tmp_path, monkeypatch):
    """base_merged = <output_dir>/merged: a merge killed after its save swapped the new model in but before
    it wrote its record (merge_complete.json, evaluate_pending) was refused on the next run ('already styles
    ... this merge's own output'): the previous model was gone and nothing said the model there was this
    merge's. The saved model's own record (dmm_merge.json) names the merge that saved it now: the same
    command resumes after the save (evaluate, track), and --restart or another training setting is still
    refused. (Training is stubbed: the distilled student is the previous model + the new style.)"""
    from dmm_ray import merge
    from dmm_ray.evaluation import api

    out, cfg = _adding_new0_into_its_own_output(merged_world, tmp_path)
    cfg = cfg.with_absolute_paths()
    ran, evaluated = [], []
    monkeypatch.setattr(api, "evaluate_merge", lambda path, teachers, config, **kw: evaluated.append([t.name for t in teachers]))
    _stub_training(monkeypatch, ["new0"], ran)
    record_complete = merge.record_complete
    kill_between_save_and_record(monkeypatch)
    with pytest.raises(SystemExit):
        merge.run_merge(cfg)
    monkeypatch.setattr(merge, "record_complete", record_complete)
    assert ran == ["distill", "save"] and not (out / merge.COMPLETE_RECORD).exists()
    assert DMMPipeline.from_pretrained(out / "merged").styles == ["old0", "old1", "new0"]
    ran.clear()
    result = merge.run_merge(cfg)  # was refused: resumes after the save
    assert ran == ["evaluate"] and not result.already_complete and evaluated == [["old0", "old1", "new0"]]
    assert merge.run_merge(cfg).already_complete and ran == ["evaluate"]
    merge.forget(out, merge.COMPLETE_RECORD)
    refused = r"\['new0'\] are already styles.*this merge's own output.*a copy of the previous model"
    with pytest.raises(TeacherError, match=refused):  # a merge from the saved model as its previous one
        merge.run_merge(cfg, restart=True)
    with pytest.raises(TeacherError, match=refused):
        merge.run_merge(cfg.model_copy(update={"distill": cfg.distill.model_copy(update={"steps": 3})}))
    assert DMMPipeline.from_pretrained(out / "merged").styles == ["old0", "old1", "new0"]


def test_the_dry_run_of_an_incremental_merge_into_its_own_output_checks_the_model_its_killed_save_parked(merged_world, tmp_path, capsys):
    """The case below through jobs/merge.py --dry-run: it refused the merge (exit 2, 'not a merged-model folder ...
    which the merge puts back before it starts') and checked nothing after it, while the run puts the model back
    and merges. The dry run now checks (and plans with) the parked model the run will read, says it will put it back,
    and changes nothing."""
    import yaml

    from jobs import merge as job

    out, cfg = _adding_new0_into_its_own_output(merged_world, tmp_path)
    (out / "merged").rename(out / "merged.old")
    config = tmp_path / "merge.yaml"
    config.write_text(yaml.safe_dump(cfg.model_dump(mode="json", exclude_unset=True)))
    assert job.main(["--config", str(config), "--dry-run"]) == 0  # was: 2
    printed = capsys.readouterr().out
    assert f"a run would first restore {out / 'merged'} from merged.old" in printed and "regularisation worker" in printed
    assert (out / "merged.old").is_dir() and not (out / "merged").exists()


def test_an_incremental_merge_into_its_own_output_puts_back_a_model_its_killed_save_parked(merged_world, tmp_path, monkeypatch):
    """base_merged = <output_dir>/merged, and the last save was killed between its two renames: the previous
    model is <output_dir>/merged.old, merged/ is gone. The merge validated base_merged before it put that model
    back (recover_merged, after the lock), and refused ('not a merged-model folder'). It puts it back first
    now and merges; --dry-run, which changes nothing, says what the merge will do."""
    from dmm_ray import merge

    out, cfg = _adding_new0_into_its_own_output(merged_world, tmp_path)
    (out / "merged").rename(out / "merged.old")
    with pytest.raises(TeacherError, match=r"incremental.base_merged: .*/merged.old, which the merge puts back before it starts"):
        validate_before_ray(cfg)  # (--dry-run)
    ran = []
    _stub_training(monkeypatch, ["new0"], ran)
    result = merge.run_merge(cfg)
    assert ran == ["distill", "save", "evaluate"] and not (out / "merged.old").exists()
    assert DMMPipeline.from_pretrained(result.merged_path).styles == ["old0", "old1", "new0"]
