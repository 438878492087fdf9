"""Latent encoding: shards hold exactly the VAE's scaled latents, broken/missing images are counted
not fatal, re-runs skip committed shards, and a half-written shard is never taken as complete."""

import json
import os

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
        base=str(base), shards=str(shards),
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
        run_encode(_jdb_config(tmp_path, tiny_base, shards).model_copy(update={"encode": cfg.encode.model_copy(update={"resolution": 64})}),
                   show_progress=False)


@pytest.mark.ray
def test_encode_folder_source_via_file_uri(ray_cluster, tmp_path, tiny_base):
    from dmm_ray.data.encode import run_encode

    make_folder(tmp_path / "imgs", n=5, manifest="csv")
    cfg = DataConfig(base=str(tiny_base), shards=f"file://{tmp_path / 'shards'}", source=dict(kind="folder", root=f"file://{tmp_path / 'imgs'}"),
                     encode=dict(resolution=16, shard_size=10, batch_size=4))
    report = run_encode(cfg, show_progress=False)
    assert (report.encoded_this_run, report.shards_total, sum(report.skipped.values())) == (5, 1, 0)
    t = pq.read_table(tmp_path / "shards" / "shard-00000.parquet")
    assert t.column("source_id").to_pylist() == [f"img-{i}" for i in range(5)]
    assert t.column("latent_shape").to_pylist()[0] == [4, 8, 8]
