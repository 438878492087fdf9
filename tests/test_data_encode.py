"""Latent encoding: shards hold exactly the VAE's scaled latents, broken/missing images are counted
not fatal, re-runs skip committed shards, and a half-written shard is never taken as complete."""

import json
import os
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import torch
from data_fixtures import caption, make_folder, make_journeydb, save_tiny_base

from dmm_ray.data import shards as sh
from dmm_ray.data.config import DataConfig


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    return save_tiny_base(tmp_path_factory.mktemp("base"))


def _jdb_config(root, base, shards, **encode):
    return DataConfig(
        base=str(base),
        shards=str(shards),
        source=dict(kind="journeydb", root=str(root / "data" / "train" / "imgs"), annotations=[str(root / "data" / "train" / "train_anno.jsonl")]),
        encode=dict(resolution=32, shard_size=4, batch_size=3, **encode),
    )


# ---- commit protocol (no Ray) ---------------------------------------------------------------


def _table(n=3):
    return sh.latent_table(np.arange(n * 4 * 2 * 2, dtype=np.float32).reshape(n, 4, 2, 2), [f"c{i}" for i in range(n)], [f"s{i}" for i in range(n)])


def test_committed_shard_is_complete_and_round_trips(tmp_path):
    fs = pafs.LocalFileSystem()
    sh.write_shard(fs, str(tmp_path), 0, _table(), skipped={"missing_file": 2})
    assert sh.is_shard_complete(fs, str(tmp_path), 0)
    t = pq.read_table(sh.shard_path(str(tmp_path), 0))
    assert t.schema.field("latent").type == pa.list_(pa.float32())
    assert t.column("latent_shape").to_pylist()[0] == [4, 2, 2]
    assert t.column("latent").to_pylist()[1] == list(np.arange(16, 32, dtype=np.float32))
    assert sh.skipped_totals(fs, str(tmp_path), [0]) == {"missing_file": 2}


def test_half_written_shards_are_detected(tmp_path):
    fs, root = pafs.LocalFileSystem(), str(tmp_path)
    for i in range(4):
        sh.write_shard(fs, root, i, _table())
    # 1: crash before the marker was written (parquet complete, no commit)
    os.remove(sh.marker_path(root, 1))
    # 2: parquet truncated after commit (e.g. a partial copy / disk trouble)
    path = sh.shard_path(root, 2)
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])
    # 3: crash mid-write of the parquet: only the .tmp exists and a stale marker claims other contents
    os.replace(sh.shard_path(root, 3), sh.shard_path(root, 3) + ".tmp")
    assert [sh.is_shard_complete(fs, root, i) for i in range(4)] == [True, False, False, False]
    _, paths = sh.complete_shards(root)
    assert paths == [sh.shard_path(root, 0)]
    # a marker whose row count disagrees with the footer is not complete either
    json.dump({"rows": 99, "bytes": os.path.getsize(sh.shard_path(root, 0)), "skipped": {}}, open(sh.marker_path(root, 0), "w"))
    assert not sh.is_shard_complete(fs, root, 0)
    with pytest.raises(FileNotFoundError, match="no complete latent shards"):
        sh.complete_shards(root)


def test_a_stray_parquet_whose_name_ends_like_a_shard_is_not_that_shard_again(tmp_path):
    import shutil

    fs, root = pafs.LocalFileSystem(), str(tmp_path)
    for i in range(2):
        sh.write_shard(fs, root, i, _table())
    # a backup copy and an unpadded name used to stand for shard 0 a second time: its rows streamed twice
    shutil.copy(sh.shard_path(root, 0), tmp_path / "backup-shard-00000.parquet")
    shutil.copy(sh.shard_path(root, 0), tmp_path / "shard-0.parquet")
    assert sh.shard_indices(fs, root) == [0, 1]
    assert sh.complete_shards(root)[1] == [sh.shard_path(root, 0), sh.shard_path(root, 1)]
    assert sh.shard_set_state(root).rows == 6


# ---- an encode that did not finish is never trained on (no Ray) ------------------------------


def _encoded_set(root: str, rows_per_shard=(3, 3, 3), manifest=True, meta=True) -> pafs.FileSystem:
    """Shards as run_encode leaves them: _encode.json first, then the shards, _complete.json last."""
    fs = pafs.LocalFileSystem()
    if meta:
        sh.write_meta(fs, root, {"records": sum(rows_per_shard), "shard_size": 3})
    for i, n in enumerate(rows_per_shard):
        sh.write_shard(fs, root, i, _table(n))
    if manifest:
        sh.write_manifest(fs, root, len(rows_per_shard), sum(rows_per_shard), sum(rows_per_shard))
    return fs


def _drop_shard(root: str, index: int) -> None:
    os.remove(sh.shard_path(root, index))
    os.remove(sh.marker_path(root, index))


def test_shard_set_state_tells_a_finished_encode_from_an_interrupted_one(tmp_path):
    root = str(tmp_path / "a")
    fs = _encoded_set(root)
    state = sh.shard_set_state(root)
    assert (state.status, state.shards, state.rows, state.expected_shards, state.expected_rows) == ("complete", 3, 9, 3, 9)
    # a set encoded before the manifest existed: _encode.json's record count says every shard is there
    sh.remove_manifest(fs, root)
    assert sh.shard_set_state(root).status == "complete"
    # killed mid-encode: shards 0 and 1 committed, shard 2 never written, no manifest
    _drop_shard(root, 2)
    state = sh.shard_set_state(root)
    assert state.status == "partial" and state.detail() == "2 of 3 shards complete"
    # the manifest's counts are checked too (a shard lost after the encode finished)
    sh.write_manifest(fs, root, 3, 9, 9)
    assert sh.shard_set_state(root).detail() == "2 of 3 shards complete, 6 of 9 latents"
    # shards written by other code (no encode records): complete as soon as one is; none: empty
    _encoded_set(str(tmp_path / "b"), (2,), manifest=False, meta=False)
    assert sh.shard_set_state(str(tmp_path / "b")).status == "complete"
    assert sh.shard_set_state(str(tmp_path / "missing")).status == "empty"


def test_shards_beyond_the_encoded_set_are_not_read_counted_or_fingerprinted(tmp_path, caplog):
    """A complete set (manifest: shards 0-2) with a fourth complete shard beside it (copied in, left by another
    encode): shard_set_state called it complete with 3 shards and 9 latents, but the stream read the 4th shard
    too, the row check counted it and the fingerprint recorded it. All of them take the set's 3 now, the
    listing says what it leaves out; shards with no encode records are still whatever is there."""
    from types import SimpleNamespace

    from dmm_ray.data import latents
    from dmm_ray.fingerprint import _shards

    root = str(tmp_path / "a")
    fs = _encoded_set(root)
    sh.write_shard(fs, root, 3, _table(5))
    assert sh.shard_set_state(root).detail() == "3 of 3 shards complete, 9 of 9 latents"
    with caplog.at_level("WARNING"):
        assert sh.complete_shards(root)[1] == [sh.shard_path(root, i) for i in range(3)]  # was shards 0-3
    assert "ignoring 1 shard(s)" in caplog.text and "beyond its encoded set (shards 0-2" in caplog.text
    assert _shards(SimpleNamespace(data=SimpleNamespace(shards=root)))["rows"] == [[0, 3], [1, 3], [2, 3]]
    cfg = SimpleNamespace(data=SimpleNamespace(shards=root, stream=SimpleNamespace(batch_size=10), synthetic_fraction=0), num_workers=1)
    with pytest.raises(ValueError, match="data.shards has 9 latents"):  # was 14, and passed
        latents.check_enough_rows(cfg)
    sh.remove_manifest(fs, root)  # an encode that started: _encode.json's 9 records in shards of 3
    assert sh.complete_shards(root)[1] == [sh.shard_path(root, i) for i in range(3)]
    (Path(root) / sh.META_NAME).unlink()  # no encode records: every shard there
    assert len(sh.complete_shards(root)[1]) == 4


def _merge_cfg(tmp_path, shards, source=True):
    from merge_fixtures import build_world, tiny_merge_config

    from dmm_ray.config import MergeConfig

    world = build_world(tmp_path / "world", rows=8)
    data = {"shards": str(shards), "stream": {"batch_size": 2}}
    if source:
        data["source"] = {"kind": "folder", "root": str(tmp_path / "images")}
    return MergeConfig.model_validate(tiny_merge_config(world, tmp_path / "out", data=data))


def test_merge_resumes_an_unfinished_encode_instead_of_training_on_a_subset(tmp_path, monkeypatch, capsys):
    from dmm_ray.data import encode, latents

    shards = tmp_path / "latents"
    fs = _encoded_set(str(shards), manifest=False)
    _drop_shard(str(shards), 2)  # the crash: 6 of 9 latents on disk, and nothing says so but the count
    calls = []

    def finish(data_cfg, show_progress=True, plan=None):  # what run_encode does on resume: the missing shard, then the manifest
        calls.append(data_cfg.shards)
        sh.write_shard(fs, str(shards), 2, _table(3))
        sh.write_manifest(fs, str(shards), 3, 9, 9)
        return encode.EncodeReport(9, 3, 2, 1, 3, 9)

    monkeypatch.setattr(encode, "run_encode", finish)
    latents.ensure_latents(_merge_cfg(tmp_path, shards))
    assert calls == [str(shards)]
    assert "are incomplete (2 of 3 shards complete; an encode did not finish): resuming the encode" in capsys.readouterr().out
    # a whole set is used as it is; the line names the job that asked (the few-step stage trains on the merge's shards)
    latents.ensure_latents(_merge_cfg(tmp_path, shards), job="fast")
    assert calls == [str(shards)]
    assert "[dmm-fast " in capsys.readouterr().out


def test_a_merge_that_encodes_reads_the_source_index_once(tmp_path, monkeypatch):
    """Review mend: the check before Ray (validate_before_ray's check_latents) made the encode's plan and
    dropped it, so a merge that still had to encode read the source's annotation index twice, there and in
    run_encode. The plan goes on to the encode. The stages are left out and the encode is a stand-in (no Ray)."""
    from dmm_ray import merge
    from dmm_ray.data import encode

    make_folder(tmp_path / "images", n=9)
    shards = tmp_path / "latents"
    cfg = _merge_cfg(tmp_path, shards)
    reads, real_read, plans = [], encode.read_image_index, []
    monkeypatch.setattr(encode, "read_image_index", lambda source: reads.append(source.root) or real_read(source))

    def run_encode(data_cfg, show_progress=True, plan=None):  # the real one's start, then a whole set of 9 rows
        plans.append(plan)
        plan = plan or encode.plan_encode(data_cfg)
        _encoded_set(data_cfg.shards)
        return encode.EncodeReport(len(plan.records), 3, 0, 3, 9, 9)

    monkeypatch.setattr(encode, "run_encode", run_encode)
    monkeypatch.setattr(merge, "STAGES", ())
    monkeypatch.setattr(merge, "init_for_training", lambda address: False)
    monkeypatch.setattr(merge, "plan_cluster", lambda cfg: None)
    monkeypatch.setattr(merge, "with_plan", lambda cfg, plan: cfg)
    merge.run_merge(cfg)
    assert sh.shard_set_state(str(shards)).status == "complete"
    assert reads == [str(tmp_path / "images")]  # was read again by run_encode
    assert plans[0] is not None and len(plans[0].records) == 9


def test_an_unfinished_encode_made_with_other_settings_is_refused_before_ray(tmp_path):
    """data.shards holding a killed encode of other settings (shards of 1 record): the merge's checks before
    Ray (and --dry-run) let it pass, and the encode stage refused it only once Ray had started. So is a
    source without a usable record. The same settings resume."""
    from dmm_ray.data import latents
    from dmm_ray.data.encode import plan_encode

    make_folder(tmp_path / "images", n=3)
    shards = tmp_path / "latents"
    cfg = _merge_cfg(tmp_path, shards)
    assert cfg.data.encode.shard_size != 1
    before = cfg.model_copy(update={"data": cfg.data.model_copy(update={"encode": cfg.data.encode.model_copy(update={"shard_size": 1})})})
    fs = pafs.LocalFileSystem()
    sh.write_meta(fs, str(shards), plan_encode(before.data).meta)  # what run_encode records first
    sh.write_shard(fs, str(shards), 0, _table(1))  # shard 0 of 3 committed, then the kill
    assert sh.shard_set_state(str(shards)).status == "partial"
    with pytest.raises(ValueError, match=rf"cannot resume encoding into .*shard_size: shards have 1, config gives {cfg.data.encode.shard_size}\)"):
        latents.check_latents(cfg)
    assert latents.check_latents(before)[0].status == "partial"  # the same settings: resumed by the encode stage
    (tmp_path / "images" / "manifest.jsonl").write_text('{"image": "images/000.png", "caption": "a"}\n')
    with pytest.raises(ValueError, match="yielded no usable records .*1 lack the image path field 'file'"):
        latents.check_latents(_merge_cfg(tmp_path, tmp_path / "empty"))


def test_unfinished_encode_without_a_source_stops_the_merge(tmp_path):
    from dmm_ray.data import latents

    shards = tmp_path / "latents"
    _encoded_set(str(shards), manifest=False)
    _drop_shard(str(shards), 1)
    with pytest.raises(FileNotFoundError, match=r"unfinished encode \(2 of 3 shards complete\) and data.source is not set"):
        latents.ensure_latents(_merge_cfg(tmp_path, shards, source=False))


def test_a_complete_set_encoded_with_other_settings_than_data_encode_is_refused(tmp_path):
    """A complete set was used as it is whatever data.encode said: distill trained at the shards' resolution
    while the memory plan and synthesis's default took data.encode.resolution."""
    from dmm_ray.data import latents

    shards = tmp_path / "latents"
    fs = _encoded_set(str(shards))
    cfg = _merge_cfg(tmp_path, shards)
    resolution = cfg.data.encode.resolution
    sh.write_meta(fs, str(shards), {"records": 9, "shard_size": 3, "resolution": resolution, "latent_sampling": "mean"})
    assert latents.check_latents(cfg)[0].status == "complete"
    sh.write_meta(fs, str(shards), {"records": 9, "shard_size": 3, "resolution": resolution + 8, "latent_sampling": "sample"})
    with pytest.raises(
        ValueError,
        match=rf"complete latent set made with other settings: data.encode.resolution is {resolution} but the shards were encoded with "
        rf"{resolution + 8}; data.encode.latent_sampling is 'mean' but the shards were encoded with 'sample'",
    ):
        latents.ensure_latents(cfg)


def test_enough_latent_rows_is_checked_with_the_stage_own_workers_and_shard_rows(tmp_path):
    """A worker needs one batch of shard rows per epoch. The check took data.stream.batch_size x the merge's
    workers for every stage: a merge whose data.synthetic_fraction takes half of each batch elsewhere was
    refused, and a few-step stage with more workers (fast.num_workers) than the rows feed passed, to stop
    inside Ray Train ('yielded no batch')."""
    from merge_fixtures import build_world, tiny_merge_config

    from dmm_ray.config import MergeConfig
    from dmm_ray.data import latents

    world = build_world(tmp_path / "world", names=["t0", "t1"])  # 64 latent rows; 2 teachers: W = 2

    def cfg(stream_batch, **sections):
        raw = tiny_merge_config(world, tmp_path / "out", **sections)
        raw["data"]["stream"] = {"batch_size": stream_batch}
        return MergeConfig.model_validate(raw)

    latents.check_enough_rows(cfg(40, data={"synthetic_fraction": 0.5}))  # 2 x 20 shard rows of 64: was refused (80)
    with pytest.raises(
        ValueError, match=r"64 latents but 2 workers x data.stream.batch_size 40 need at least 80; add data or lower data.stream.batch_size"
    ):
        latents.check_enough_rows(cfg(40))
    latents.check_enough_rows(cfg(40, fast={"num_workers": 1}), job="fast")  # the merge's 2 x 40 do not apply: was refused
    with pytest.raises(ValueError, match=r"64 latents but 4 fast.num_workers x fast.batch_size 32 need at least 128"):
        latents.check_enough_rows(cfg(32, fast={"num_workers": 4}), job="fast")  # was accepted (2 x 32 = 64)


def test_a_complete_set_too_small_for_the_workers_is_refused_before_ray_and_by_the_dry_run(tmp_path, capsys):
    """Finding: a complete latent set with fewer rows than the workers' batches take passed --dry-run and the
    checks before Ray (validate_before_ray, the few-step stage's check_before_ray), and was refused only by
    ensure_latents, after Ray started; a merge's few-step stage (fast.enabled) only after the whole merge.
    Both are refused before Ray now, and by --dry-run."""
    import yaml
    from merge_fixtures import build_world, tiny_merge_config

    from dmm_ray import DMMPipeline, StyleUNet
    from dmm_ray.config import MergeConfig
    from dmm_ray.fast.job import check_before_ray
    from dmm_ray.merge import validate_before_ray
    from dmm_ray.tiny import tiny_sd_components
    from jobs import merge as job

    world = build_world(tmp_path / "world", names=["t0", "t1"])  # 64 latent rows; 2 teachers: W = 2

    def config(batch_size, **sections):
        raw = tiny_merge_config(world, tmp_path / "out", **sections)
        raw["data"]["stream"] = {"batch_size": batch_size}
        return raw

    refused = r"64 latents but 2 workers x data.stream.batch_size 40 need at least 80"
    with pytest.raises(ValueError, match=refused):
        validate_before_ray(MergeConfig.model_validate(config(40)))
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(config(40)))
    assert job.main(["--config", str(path), "--dry-run"]) == 2
    assert "need at least 80" in capsys.readouterr().err
    fast = {"enabled": True, "num_workers": 4}
    with pytest.raises(ValueError, match=r"64 latents but 4 fast.num_workers x fast.batch_size 32 need at least 128"):
        validate_before_ray(MergeConfig.model_validate(config(32, fast=fast)))
    c = tiny_sd_components(seed=0)
    merged = tmp_path / "merged"
    DMMPipeline.from_components(
        StyleUNet.from_unet(c["unet"], ["t0", "t1"]), c["vae"], c["text_encoder"], c["tokenizer"], c["scheduler"]
    ).save_pretrained(merged)
    with pytest.raises(ValueError, match=r"need at least 128"):  # jobs/fast.py (and its --dry-run)
        check_before_ray(MergeConfig.model_validate(config(32, fast=fast)), merged)
    validate_before_ray(MergeConfig.model_validate(config(32)))  # the merge's 2 x 32 = 64 rows


# ---- the Ray job -----------------------------------------------------------------------------


@pytest.mark.ray
def test_encode_journeydb_counts_skips_matches_vae_and_resumes(ray_cluster, tmp_path, tiny_base):
    from diffusers import AutoencoderKL

    from dmm_ray.data.encode import run_encode
    from dmm_ray.data.images import preprocess_image, to_model_input

    make_journeydb(tmp_path, n=10)  # record 3: broken jpeg, 6: missing file, 8: empty caption, + 1 malformed line
    cfg = _jdb_config(tmp_path, tiny_base, tmp_path / "shards")
    report = run_encode(cfg, show_progress=False)
    assert report.skipped == {"bad_annotation": 1, "empty_caption": 1, "missing_file": 1, "unreadable_image": 1}
    assert (report.records, report.shards_total, report.shards_written, report.encoded_this_run) == (9, 3, 3, 7)

    # shards hold exactly vae.encode(x).latent_dist.mean * scaling_factor, in index order
    table = pq.read_table([sh.shard_path(str(tmp_path / "shards"), i) for i in range(3)])
    ids = table.column("source_id").to_pylist()
    assert ids == [f"{i % 2:03d}/img{i:04d}.jpg" for i in (0, 1, 2, 4, 5, 7, 9)]
    assert table.column("caption").to_pylist()[1] == caption(1)
    vae = AutoencoderKL.from_pretrained(tiny_base / "vae").eval()
    imgs = tmp_path / "data" / "train" / "imgs"
    px = np.stack([preprocess_image((imgs / sid).read_bytes(), 32) for sid in ids])
    with torch.no_grad():
        want = vae.encode(torch.from_numpy(to_model_input(px))).latent_dist.mean * vae.config.scaling_factor  # (7, 4, 16, 16)
    assert table.column("latent_shape").to_pylist() == [[4, 16, 16]] * 7  # tiny VAE: 2x downsampling
    got = np.array(table.column("latent").to_pylist(), dtype=np.float32).reshape(7, 4, 16, 16)
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-5, atol=1e-5)

    # resume: nothing to do, finished shards untouched
    shards = tmp_path / "shards"
    mtimes = {p.name: p.stat().st_mtime_ns for p in shards.glob("shard-*")}
    again = run_encode(cfg, show_progress=False)
    assert (again.shards_already_complete, again.shards_written, again.encoded_this_run) == (3, 0, 0)
    assert again.skipped == report.skipped  # the full picture, from the markers
    # simulate a crash while shard 1 was being written: only shard 1 is redone
    os.remove(sh.marker_path(str(shards), 1))
    data = (shards / "shard-00001.parquet").read_bytes()
    (shards / "shard-00001.parquet").write_bytes(data[:100])
    third = run_encode(cfg, show_progress=False)
    assert (third.shards_already_complete, third.shards_written) == (2, 1)
    assert third.encoded_this_run == 3  # shard 1 = records 4, 5, 6 (missing file), 7
    for name in ("shard-00000.parquet", "shard-00002.parquet", "shard-00000.done.json"):
        assert (shards / name).stat().st_mtime_ns == mtimes[name]
    assert pq.read_table(shards / "shard-00001.parquet").column("source_id").to_pylist() == ids[3:6]
    assert sh.is_shard_complete(pafs.LocalFileSystem(), str(shards), 1)

    # resuming with different settings is refused, naming the setting
    with pytest.raises(ValueError, match="resolution"):
        run_encode(
            _jdb_config(tmp_path, tiny_base, shards).model_copy(update={"encode": cfg.encode.model_copy(update={"resolution": 64})}),
            show_progress=False,
        )


@pytest.mark.ray
def test_encode_records_its_manifest_only_once_every_shard_is_committed(ray_cluster, tmp_path, tiny_base, monkeypatch):
    from dmm_ray.data import encode

    make_journeydb(tmp_path, n=10)  # 9 indexed records -> 3 shards of 4, 7 latents (see the test above)
    cfg = _jdb_config(tmp_path, tiny_base, tmp_path / "shards")
    root = str(tmp_path / "shards")
    commit, committed = encode._commit_shard, []

    def killed_after_one_shard(*args):
        if committed:
            raise RuntimeError("killed mid-encode")
        committed.append(commit(*args))
        return committed[-1]

    monkeypatch.setattr(encode, "_commit_shard", killed_after_one_shard)
    with pytest.raises(RuntimeError, match="killed mid-encode"):
        encode.run_encode(cfg, show_progress=False)
    assert sh.read_manifest(pafs.LocalFileSystem(), root) is None
    state = sh.shard_set_state(root)
    assert (state.status, state.shards, state.expected_shards) == ("partial", 1, 3)
    monkeypatch.setattr(encode, "_commit_shard", commit)
    report = encode.run_encode(cfg, show_progress=False)  # the resume: the two missing shards only
    assert (report.shards_already_complete, report.shards_written) == (1, 2)
    assert sh.read_manifest(pafs.LocalFileSystem(), root) == {"shards": 3, "rows": 7, "records": 9}
    assert sh.shard_set_state(root).status == "complete"


@pytest.mark.ray
def test_encode_job_cli_on_a_folder_source_via_file_uri(ray_cluster, tmp_path, tiny_base):
    from jobs import encode_latents

    make_folder(tmp_path / "imgs", n=5, manifest="csv")
    (tmp_path / "data.yaml").write_text(f"data:\n  base: {tiny_base}\n  encode: {{shard_size: 10, batch_size: 4}}\n")
    rc = encode_latents.main(
        [
            "--config",
            str(tmp_path / "data.yaml"),
            "--source",
            "folder",
            "--root",
            f"file://{tmp_path / 'imgs'}",
            "--out",
            f"file://{tmp_path / 'shards'}",
            "--set",
            "data.encode.resolution=16",
            "--no-progress",
        ]
    )
    assert rc == 0
    report = json.loads((tmp_path / "shards" / "_encode_report.json").read_text())
    assert (report["encoded_this_run"], report["shards_total"], report["skipped"]) == (5, 1, {})
    t = pq.read_table(tmp_path / "shards" / "shard-00000.parquet")
    assert t.column("source_id").to_pylist() == [f"img-{i}" for i in range(5)]
    assert t.column("latent_shape").to_pylist()[0] == [4, 8, 8]


def test_encode_job_cli_rejects_bad_config_before_starting_ray(tmp_path, capsys):
    from jobs import encode_latents

    with pytest.raises(SystemExit) as e:
        encode_latents.main(["--help"])
    assert e.value.code == 0
    assert "--num-gpus" in capsys.readouterr().out
    rc = encode_latents.main(["--base", "/b", "--out", str(tmp_path), "--root", str(tmp_path), "--set", "encode.batchsize=3"])
    assert rc == 2
    assert "encode.batchsize" in capsys.readouterr().err


def test_encode_job_checks_its_paths_before_ray_and_writes_nothing(tmp_path, tiny_base, capsys):
    """A missing VAE or one given as a URI, image folder or --out, or an --out that is a file: exit 2 with the option named,
    before Ray starts, and no `_encode.json` left in the output folder."""
    from jobs import encode_latents

    make_folder(tmp_path / "imgs", n=2, manifest="csv")
    common = ["--source", "folder", "--root", str(tmp_path / "imgs"), "--resolution", "16", "--no-progress"]
    (tmp_path / "a_file").write_text("x")
    cases = [
        (["--base", str(tmp_path / "nope"), "--out", str(tmp_path / "o1")], r"data.base \(--base\): no VAE at"),
        # a URI base passed this check, and every VAE actor failed on it with diffusers' "couldn't connect to huggingface.co"
        (
            ["--base", tiny_base.as_uri(), "--out", str(tmp_path / "o1")],
            r"data.base \(--base\): the VAE file://.*/vae is a URI, but it is loaded from a local folder",
        ),
        (
            ["--vae", (tiny_base / "vae").as_uri(), "--base", str(tiny_base), "--out", str(tmp_path / "o1")],
            r"data.vae \(--vae\): the VAE file://.* is a URI",
        ),
        (["--base", str(tiny_base)], "give --out"),
        (["--base", str(tiny_base), "--out", str(tmp_path / "a_file")], r"--out \(shards\) .* is a file, not a folder"),
        (
            ["--base", str(tiny_base), "--out", str(tmp_path / "o2"), "--root", str(tmp_path / "none")],
            r"source.root \(--root\) .*no such image folder",
        ),
    ]
    for extra, message in cases:
        assert encode_latents.main(common + extra) == 2
        assert re.search(message, capsys.readouterr().err), message
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


def test_a_source_that_yields_no_record_names_the_field_it_looked_for_and_its_setting(tmp_path, tiny_base, capsys):
    """A manifest whose columns are `image` / `text`: the error said only `{'no_image_field': 2}`, then
    `{'empty_caption': 2}`, naming neither the field looked for nor the setting; a JourneyDB root without
    *.jsonl blamed source.annotations, which was not set. Exit 2 before Ray, naming them."""
    from jobs import encode_latents

    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "manifest.jsonl").write_text('{"image": "a.png", "text": "a"}\n{"image": "b.png", "text": "b"}\n')
    (tmp_path / "jdb").mkdir()
    common = ["--base", str(tiny_base), "--out", str(tmp_path / "out"), "--resolution", "16", "--no-progress"]
    cases = [
        (["--source", "folder", "--root", str(tmp_path / "imgs")], r"2 lack the image path field 'file': set source.image_field"),
        (
            ["--source", "folder", "--root", str(tmp_path / "imgs"), "--set", "source.image_field=image"],
            r"2 have no caption in \['prompt', 'Task2.Caption', 'caption'\].*set source.caption_fields",
        ),
        (
            ["--source", "journeydb", "--root", str(tmp_path / "jdb")],
            r"no \*.jsonl annotation files in source.root .*jdb' \(source.annotations is unset.*give source.annotations \(--annotations\)",
        ),
    ]
    for extra, message in cases:
        assert encode_latents.main(common + extra) == 2
        assert re.search(message, capsys.readouterr().err), message
    assert not (tmp_path / "out").exists()


def test_encode_job_refuses_a_resume_with_other_settings_before_ray(tmp_path, tiny_base, capsys, monkeypatch):
    """A shard folder encoded with other settings (a committed shard at another resolution): exit 2 naming
    the setting, before Ray starts (it used to start a private Ray first), the folder untouched."""
    import dmm_ray.ray_session
    from jobs import encode_latents

    monkeypatch.setattr(dmm_ray.ray_session, "ensure_ray", lambda *a, **k: pytest.fail("Ray may not start"))
    make_folder(tmp_path / "imgs", n=2, manifest="csv")
    shards = tmp_path / "shards"
    sh.write_shard(pafs.LocalFileSystem(), str(shards), 0, sh.latent_table(np.zeros((1, 4, 8, 8)), ["x"], ["img-0"]))
    sh.write_meta(pafs.LocalFileSystem(), str(shards), {"resolution": 64})
    before = {p.name: p.read_bytes() for p in shards.iterdir()}
    args = [
        "--source",
        "folder",
        "--root",
        str(tmp_path / "imgs"),
        "--base",
        str(tiny_base),
        "--out",
        str(shards),
        "--resolution",
        "16",
        "--no-progress",
    ]
    assert encode_latents.main(args) == 2
    err = capsys.readouterr().err
    assert "cannot resume encoding into" in err and "resolution: shards have 64, config gives 16" in err
    assert {p.name: p.read_bytes() for p in shards.iterdir()} == before


# ---- the two stages, in-process (no Ray) -------------------------------------------------------


def test_decode_stage_reports_reasons_per_row(tmp_path):
    from dmm_ray.data.encode import decode_images

    make_folder(tmp_path, n=2)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    paths = [str(tmp_path / "images" / "000.png"), str(tmp_path / "nope.png"), str(tmp_path / "broken.png")]
    paths += [f"file://{tmp_path / 'images' / '000.png'}", str(tmp_path / "a\x00b.png")]  # pyarrow refuses these paths (a ValueError)
    ids = np.array(["a", "b", "c", "d", "e"], dtype=object)
    out = decode_images({"path": np.array(paths, dtype=object), "source_id": ids}, 16, pafs.LocalFileSystem())
    assert list(out["status"]) == ["ok", "missing_file", "unreadable_image", "read_error", "read_error"]  # counted, not the job's end
    assert out["pixels"].shape == (5, 16, 16, 3) and out["pixels"][0].any() and not out["pixels"][1:].any()
    assert "path" not in out and list(out["source_id"]) == list(ids)


def test_a_resume_from_another_source_with_the_same_ids_is_refused(tmp_path, tiny_base):
    """Another folder with the same file names (000.png ...) but other images and captions gave the
    same fingerprint: its encode resumed into the first one's shards, mixing the two."""
    from dmm_ray.data.config import DataConfig
    from dmm_ray.data.encode import plan_encode

    shards = tmp_path / "shards"
    for name, n in (("a", 3), ("b", 3)):
        make_folder(tmp_path / name, n=n, manifest="csv")
    (tmp_path / "b" / "manifest.csv").write_text((tmp_path / "b" / "manifest.csv").read_text().replace("a ", "another "))

    def cfg(name):
        return DataConfig.model_validate(
            {
                "base": str(tiny_base),
                "shards": str(shards),
                "source": {"kind": "folder", "root": str(tmp_path / name)},
                "encode": {"resolution": 16, "shard_size": 1},
            }
        )

    plan = plan_encode(cfg("a"))
    commit_one_shard(shards, plan.meta)  # one shard of a finished
    with pytest.raises(ValueError, match="records_sha256: shards have"):
        plan_encode(cfg("b"))
    assert plan_encode(cfg("a")).meta == plan.meta  # the same source resumes


def commit_one_shard(shards, meta: dict):
    """One committed shard of a set begun with `meta` (what a resume checks against); returns the filesystem."""
    fs = pafs.LocalFileSystem()
    sh.write_shard(fs, str(shards), 0, sh.latent_table(np.zeros((1, 4, 8, 8)), ["x"], ["img-0"]))
    sh.write_meta(fs, str(shards), meta)
    return fs


def test_a_resume_in_another_dtype_is_refused(tmp_path, tiny_base):
    """encode.dtype was not recorded: an encode resumed in float16 into a set whose committed shards were
    encoded in float32 was accepted, mixing the two precisions in one set."""
    from dmm_ray.data.config import DataConfig
    from dmm_ray.data.encode import plan_encode

    shards = tmp_path / "shards"
    make_folder(tmp_path / "imgs", n=2, manifest="csv")

    def cfg(dtype):
        source = {"kind": "folder", "root": str(tmp_path / "imgs")}
        return DataConfig.model_validate(
            {"base": str(tiny_base), "shards": str(shards), "source": source, "encode": {"resolution": 16, "shard_size": 1, "dtype": dtype}}
        )

    plan = plan_encode(cfg("float32"))
    fs = commit_one_shard(shards, plan.meta)  # one shard committed in float32
    with pytest.raises(ValueError, match="dtype: shards have 'float32', config gives 'float16'"):
        plan_encode(cfg("float16"))
    assert plan_encode(cfg("float32")).meta == plan.meta  # the same dtype resumes
    sh.write_meta(fs, str(shards), {k: v for k, v in plan.meta.items() if k != "dtype"})
    assert plan_encode(cfg("float16")).meta["dtype"] == "float16"  # a set from before dtype was recorded: not compared


def test_vae_encoder_posterior_sample_is_keyed_by_source_id(tmp_path, tiny_base):
    from dmm_ray.data.encode import VAEEncoder

    rng = np.random.default_rng(0)
    px = rng.integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)

    def batch(order):
        return {
            "pixels": px[order],
            "status": np.array(["ok"] * len(order), dtype=object),
            "source_id": np.array([f"id{i}" for i in order], dtype=object),
        }

    sample = VAEEncoder(str(tiny_base / "vae"), resolution=16, latent_sampling="sample", seed=1)
    mean = VAEEncoder(str(tiny_base / "vae"), resolution=16, latent_sampling="mean")
    a, b = sample(batch([0, 1, 2])), sample(batch([2, 0]))
    assert a["latent"].shape == (3, 4 * 8 * 8) and list(a["latent_shape"][0]) == [4, 8, 8]
    np.testing.assert_array_equal(a["latent"][[2, 0]], b["latent"])  # same image, same draw, whatever the batch
    m = mean(batch([0, 1, 2]))["latent"]
    # exactly diffusers' DiagonalGaussian sample (mean + std * eps), eps drawn from the id-keyed generator
    from dmm_ray.data.encode import _sample_key
    from dmm_ray.data.images import to_model_input

    with torch.no_grad():
        dist = mean.vae.encode(torch.from_numpy(to_model_input(px))).latent_dist
    eps = np.stack([np.random.default_rng(_sample_key(f"id{i}", 1)).standard_normal((4, 8, 8), dtype=np.float32) for i in range(3)])
    want = (dist.mean + dist.std * torch.from_numpy(eps)) * mean.scaling
    np.testing.assert_allclose(a["latent"], want.reshape(3, -1).numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(m, (dist.mean * mean.scaling).reshape(3, -1).numpy(), rtol=1e-5, atol=1e-5)
    # rows that failed decoding come back as zeros (the shard writer drops them)
    bad = batch([0, 1])
    bad["status"] = np.array(["ok", "missing_file"], dtype=object)
    out = mean(bad)["latent"]
    np.testing.assert_allclose(out[0], m[0], rtol=1e-5, atol=1e-6)
    assert not out[1].any()


def test_journeydb_preset_and_overrides_validate():
    from jobs import encode_latents

    preset = Path(__file__).resolve().parents[1] / "jobs" / "configs" / "data_journeydb.yaml"
    cfg = encode_latents.build_config(encode_latents.parse_args(["--config", str(preset), "--set", "base=/m/sd15", "--batch-size", "8"]))
    assert cfg.source.kind == "journeydb" and cfg.source.caption_fields == ["prompt", "Task2.Caption"]
    assert (cfg.vae_path(), cfg.encode.batch_size, cfg.encode.resolution) == ("/m/sd15/vae", 8, 512)
