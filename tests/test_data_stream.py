"""Streaming noised batches: add_noise formula exactly, one dropout draw per sample at the
configured rate, per-sample randomness independent of batching, and reproducible streams for a
given seed and worker count (through Ray Data's streaming split and a real TorchTrainer)."""

import json
import threading

import numpy as np
import pyarrow.fs as pafs
import pytest
import torch
from data_fixtures import caption, save_tiny_base

from dmm_ray.data import shards as sh
from dmm_ray.data.config import DataConfig
from dmm_ray.data.stream import draw_sample_randomness, load_noise_scheduler, load_tokenizer, noised_batch, tokenize


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    return save_tiny_base(tmp_path_factory.mktemp("base"))


def write_fixture_shards(root, n_shards=3, rows=16, shape=(4, 4, 4), style=False):
    fs = pafs.LocalFileSystem()
    rng = np.random.default_rng(0)
    for k in range(n_shards):
        ids = [f"s{k}-{i}" for i in range(rows)]
        lat = rng.standard_normal((rows, *shape)).astype(np.float32)
        styles = [i % 3 for i in range(rows)] if style else None
        sh.write_shard(fs, str(root), k, sh.latent_table(lat, [caption(k * rows + i) for i in range(rows)], ids, styles))
    return root


def _cfg(base, shards, **stream):
    return DataConfig(base=str(base), shards=str(shards), stream=dict(batch_size=8, **stream))


def _numpy_batch(tokenizer, n=64, shape=(4, 4, 4)):
    rng = np.random.default_rng(1)
    caps = [caption(i) for i in range(n)]
    return {
        "latents": rng.standard_normal((n, *shape)).astype(np.float32),
        "input_ids": tokenize(tokenizer, caps),
        "caption": np.array(caps, dtype=object),
        "source_id": np.array([f"id{i}" for i in range(n)], dtype=object),
    }


def test_noising_equals_the_ddpm_formula_exactly(tiny_base):
    cfg = _cfg(tiny_base, "/unused")
    scheduler = load_noise_scheduler(cfg)
    assert type(scheduler).__name__ == "DDPMScheduler" and scheduler.config.num_train_timesteps == 1000
    assert scheduler.config.beta_schedule == "scaled_linear"  # the base's schedule, re-read as DDPM
    tok = load_tokenizer(cfg.tokenizer_path())
    out = noised_batch(_numpy_batch(tok), scheduler=scheduler, empty_ids=tokenize(tok, [""])[0], seed=3, epoch=0, caption_dropout=0.1)
    a = scheduler.alphas_cumprod.to(torch.float32)[out["timesteps"]].view(-1, 1, 1, 1)  # (B, 1, 1, 1)
    want = a.sqrt() * out["latents"] + (1 - a).sqrt() * out["noise"]
    assert torch.equal(out["noisy_latents"], want)
    assert out["noisy_latents"].dtype == torch.float32 and out["timesteps"].dtype == torch.int64
    assert out["timesteps"].min() >= 0 and out["timesteps"].max() < 1000
    assert out["input_ids"].dtype == torch.int64 and out["input_ids"].shape == (64, 77)
    # noise is standard normal-ish and independent of x0
    assert abs(out["noise"].mean()) < 0.05 and abs(out["noise"].std() - 1) < 0.05


def test_caption_dropout_rate_and_one_shared_draw(tiny_base):
    ids = [f"img{i}" for i in range(20000)]
    _, _, dropped = draw_sample_randomness(ids, (1, 1, 1), seed=0, epoch=0, num_train_timesteps=1000, caption_dropout=0.1)
    # 20000 Bernoulli(0.1): std of the rate is 0.0021, so +-0.01 is ~5 sigma
    assert abs(dropped.mean() - 0.1) < 0.01
    _, _, none = draw_sample_randomness(ids[:2000], (1, 1, 1), seed=0, epoch=0, num_train_timesteps=1000, caption_dropout=0.0)
    assert not none.any()
    t, _, _ = draw_sample_randomness(ids, (1, 1, 1), seed=0, epoch=0, num_train_timesteps=1000, caption_dropout=0.1)
    assert t.min() == 0 and t.max() == 999 and abs(t.mean() - 499.5) < 10  # U{0..999}

    cfg = _cfg(tiny_base, "/unused")
    tok = load_tokenizer(cfg.tokenizer_path())
    empty = tokenize(tok, [""])[0]
    batch = _numpy_batch(tok, n=200)
    out = noised_batch(batch, scheduler=load_noise_scheduler(cfg), empty_ids=empty, seed=0, epoch=0, caption_dropout=0.3)
    d = out["dropped"].numpy()
    assert 0 < d.sum() < 200
    # the one flag drives ids and captions alike (student and teacher see the same drop)
    assert (out["input_ids"][d] == torch.from_numpy(empty)).all()
    assert (out["input_ids"][~d] == torch.from_numpy(batch["input_ids"][~d])).all()
    assert [c == "" for c in out["captions"]] == list(d)


def test_per_sample_draws_do_not_depend_on_batching():
    ids = [f"x{i}" for i in range(10)]
    kw = dict(seed=5, epoch=2, num_train_timesteps=1000, caption_dropout=0.5)
    t_all, n_all, d_all = draw_sample_randomness(ids, (2, 3, 3), **kw)
    t_sub, n_sub, d_sub = draw_sample_randomness(ids[7:2:-1], (2, 3, 3), **kw)
    assert np.array_equal(t_sub, t_all[7:2:-1]) and np.array_equal(n_sub, n_all[7:2:-1]) and np.array_equal(d_sub, d_all[7:2:-1])
    t_e3, n_e3, _ = draw_sample_randomness(ids, (2, 3, 3), **{**kw, "epoch": 3})
    t_s6, _, _ = draw_sample_randomness(ids, (2, 3, 3), **{**kw, "seed": 6})
    assert not np.array_equal(n_e3, n_all) and not np.array_equal(t_e3, t_all) and not np.array_equal(t_s6, t_all)


def _split_streams(cfg, n_workers, epoch=0):
    """Consume streaming_split(n, equal=True) with preserve_order (what train_dataset_config gives
    TorchTrainer) from n threads, like n Train workers; return per-worker (source ids, timesteps, noise sums)."""
    from ray.data import DataContext

    from dmm_ray.data.stream import build_latent_dataset, iter_noised_batches

    ctx = DataContext.get_current()
    old = ctx.execution_options.preserve_order
    ctx.execution_options.preserve_order = True
    try:
        its = build_latent_dataset(cfg).streaming_split(n_workers, equal=True)
        results = [None] * n_workers

        def run(r):
            got = []
            for b in iter_noised_batches(its[r], cfg, epoch=epoch, rank=r):
                got.append((tuple(b["source_ids"]), b["timesteps"].tolist(), b["noise"].sum().item(), b["dropped"].tolist()))
            results[r] = got

        threads = [threading.Thread(target=run, args=(r,)) for r in range(n_workers)]
        [t.start() for t in threads]
        [t.join(timeout=120) for t in threads]
    finally:
        ctx.execution_options.preserve_order = old
    return results


@pytest.mark.ray
def test_stream_is_reproducible_for_seed_and_worker_count(ray_cluster, tmp_path, tiny_base):
    write_fixture_shards(tmp_path / "shards", n_shards=4, rows=16)
    cfg = _cfg(tiny_base, tmp_path / "shards", seed=7, shuffle_buffer=16)
    a = _split_streams(cfg, 2)
    b = _split_streams(cfg, 2)
    assert a == b
    ids = [i for worker in a for batch in worker for i in batch[0]]
    assert len(ids) == len(set(ids)) == 64  # every row once, split over the two workers
    assert all(len(batch[0]) == 8 for worker in a for batch in worker)
    # (a different seed changing the draws is covered without Ray in test_per_sample_draws_do_not_depend_on_batching)


@pytest.mark.ray
def test_local_shuffle_reorders_each_epoch_and_follows_the_seed(ray_cluster, tmp_path, tiny_base, monkeypatch):
    """The local shuffle's seed is keyed by (stream.seed, epoch, rank): it hashed only the rank, so every
    epoch and every seed gave the same batches."""
    from ray.data import DataContext

    from dmm_ray.data.stream import build_latent_dataset, iter_noised_batches

    monkeypatch.setattr(DataContext.get_current().execution_options, "preserve_order", True)  # what train_dataset_config gives the trainer
    write_fixture_shards(tmp_path / "shards", n_shards=2, rows=16)

    def order(seed, epoch, rank=0):
        cfg = _cfg(tiny_base, tmp_path / "shards", seed=seed, shuffle_buffer=32, shuffle_blocks=False)
        return [i for b in iter_noised_batches(build_latent_dataset(cfg), cfg, epoch=epoch, rank=rank) for i in b["source_ids"]]

    first = order(0, 0)
    assert sorted(first) == sorted(f"s{k}-{i}" for k in range(2) for i in range(16))
    assert order(0, 0) == first  # reproducible
    assert order(0, 1) != first and order(1, 0) != first and order(0, 0, rank=1) != first


@pytest.mark.ray
def test_latent_dataset_reads_through_the_v1_parquet_reader_unless_told(ray_cluster, tmp_path, tiny_base, monkeypatch):
    """Ray Data's V2 parquet reader starts actor processes for every execution (each epoch of every split):
    the stream reads through V1, leaves Ray's own setting as it was, and follows the env variable if set."""
    import ray

    from dmm_ray.data.stream import build_latent_dataset

    def operators(ds) -> list[str]:
        op, names = ds._logical_plan.dag, []
        while op is not None:
            names.append(op.name)
            op = op.input_dependencies[0] if op.input_dependencies else None
        return names

    write_fixture_shards(tmp_path / "shards", n_shards=2, rows=8)
    cfg = _cfg(tiny_base, tmp_path / "shards")
    ctx = ray.data.DataContext.get_current()
    monkeypatch.delenv("RAY_DATA_USE_DATASOURCE_V2", raising=False)
    monkeypatch.setattr(ctx, "use_datasource_v2", True)
    ds = build_latent_dataset(cfg)
    assert "ReadParquet" in operators(ds) and "ListFiles" not in operators(ds), operators(ds)
    assert ctx.use_datasource_v2 is True  # restored
    assert sorted(r["source_id"] for r in ds.take_all()) == sorted(f"s{k}-{i}" for k in range(2) for i in range(8))
    monkeypatch.setenv("RAY_DATA_USE_DATASOURCE_V2", "1")  # a user who asks for V2 gets it
    assert "ListFiles" in operators(build_latent_dataset(cfg))


@pytest.mark.ray
@pytest.mark.slow  # starting a TorchTrainer's controller and workers takes ~1 min on 2 shared cores
def test_torch_trainer_workers_receive_contract_batches(ray_cluster, tmp_path, tiny_base):
    """The way the lead's loop uses it: TorchTrainer + get_dataset_shard + iter_noised_batches."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from dmm_ray.data.stream import build_latent_dataset, iter_noised_batches, train_dataset_config

    write_fixture_shards(tmp_path / "shards", n_shards=2, rows=8, style=True)
    cfg = _cfg(tiny_base, tmp_path / "shards")

    out_dir = tmp_path / "seen"
    out_dir.mkdir()

    def loop(config):
        import json

        import ray.train

        c = DataConfig.model_validate(config["data"])
        seen = []
        for b in iter_noised_batches(ray.train.get_dataset_shard("train"), c, epoch=0):
            assert b["noisy_latents"].shape == b["latents"].shape == b["noise"].shape == (8, 4, 4, 4)
            assert b["timesteps"].shape == b["dropped"].shape == b["style"].shape == (8,)
            assert b["input_ids"].shape == (8, 77) and b["input_ids"].dtype == torch.int64
            seen += b["source_ids"]
        (out_dir / f"rank{ray.train.get_context().get_world_rank()}.json").write_text(json.dumps(seen))

    trainer = TorchTrainer(
        loop,
        train_loop_config={"data": cfg.model_dump()},
        scaling_config=ScalingConfig(num_workers=2),
        datasets={"train": build_latent_dataset(cfg)},
        dataset_config=train_dataset_config(),
        run_config=RunConfig(storage_path=str(tmp_path / "ray_results")),
    )
    result = trainer.fit()
    assert result.error is None
    seen = [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(2)]
    assert [len(s) for s in seen] == [8, 8]  # 16 rows, 2 workers, batch 8
    assert sorted(seen[0] + seen[1]) == sorted(f"s{k}-{i}" for k in range(2) for i in range(8))


class _ListShard:
    """A worker's dataset shard as StageBatches reads it: numpy columns in fixed batches."""

    def __init__(self, columns):
        self.columns = columns

    def iter_batches(self, batch_size, batch_format="numpy", drop_last=False, **_):
        n = len(self.columns["latents"])
        for i in range(0, n - batch_size + 1 if drop_last else n, batch_size):
            yield {k: v[i : i + batch_size] for k, v in self.columns.items()}


def test_replicas_of_a_teacher_train_on_disjoint_synthesized_rows(tmp_path, monkeypatch):
    """scaling.workers_per_teacher: 2: the synthesized sets are not split by Ray (every worker reads them
    whole), and both replicas of a teacher took the same rows with the same noise each step, so DDP
    averaged two identical gradients for that share. Each replica now trains on its own rows."""
    import ray.train
    from merge_fixtures import build_world, tiny_merge_config

    from dmm_ray.config import MergeConfig
    from dmm_ray.distill.layout import worker_layout
    from dmm_ray.distill.loop import Start, Worker
    from dmm_ray.distill.streams import StageBatches

    world = build_world(tmp_path / "w", names=["t0"])
    raw = tiny_merge_config(world, tmp_path / "out", scaling={"workers_per_teacher": 2})
    raw["data"]["synthetic_fraction"] = 0.5
    cfg = MergeConfig.model_validate(raw)
    tok = load_tokenizer(cfg.data.tokenizer_path())

    def columns(prefix, n, style=None):
        cols = {
            "latents": np.random.default_rng(0).standard_normal((n, 4, 4, 4)).astype(np.float32),
            "input_ids": tokenize(tok, ["a red circle"] * n),
            "caption": np.array(["a red circle"] * n, dtype=object),
            "source_id": np.array([f"{prefix}{i}" for i in range(n)], dtype=object),
        }
        return cols if style is None else {**cols, "style": np.zeros(n, dtype=np.int64)}

    synth = columns("synth-t0-", 8, style=0)
    roles = worker_layout(1, 2)
    seen = []
    for rank in (0, 1):
        order = np.arange(8) if rank == 0 else np.arange(8)[::-1]  # each worker reads the set in Ray Data's order, not always the same
        shards = {"train": _ListShard(columns(f"common-{rank}-", 8)), "synth": _ListShard({k: v[order] for k, v in synth.items()})}
        monkeypatch.setattr(ray.train, "get_dataset_shard", lambda name: shards[name])
        worker = Worker(cfg, "distill", rank, 2, torch.device("cpu"), roles, [], ["t0"])
        batches = StageBatches(worker, load_noise_scheduler(cfg.data), Start(), torch.Generator().manual_seed(rank))
        seen.append([i for _ in range(2) for i in batches.next_step()[0][0]["source_ids"] if i.startswith("synth")])
    assert len(seen[0]) == len(seen[1]) == 4  # 2 steps x 2 synthesized rows of the batch of 4
    assert not set(seen[0]) & set(seen[1])  # was the same 4 rows (and noise) on both
    assert sorted(seen[0] + seen[1]) == sorted(f"synth-t0-{i}" for i in range(8))  # between them, every row once per epoch


def test_cached_rows_past_the_last_full_batch_are_trained_on_in_turn(tiny_base):
    """A synthesized set of 10 rows in batches of 4: fixed batches per epoch dropped rows 8 and 9 every
    epoch (never trained on). Batches go round the set instead, each pass re-noised as its own epoch, and
    a stream resumed after k batches gives what the uninterrupted one gives from batch k."""
    from dmm_ray.distill.streams import cached_stream

    cfg = _cfg(tiny_base, "unused")
    tok = load_tokenizer(cfg.tokenizer_path())
    rows = {k: v[:10] for k, v in _numpy_batch(tok).items()}
    ids = [str(s) for s in rows["source_id"]]
    args = (cfg, load_noise_scheduler(cfg), tokenize(tok, [""])[0], "cpu", "style 0's synthesized samples")

    run = cached_stream(rows, 4, *args)
    batches = [run.next() for _ in range(5)]  # 20 rows: two passes over the 10
    assert [b["source_ids"] for b in batches] == [ids[0:4], ids[4:8], ids[8:10] + ids[0:2], ids[2:6], ids[6:10]]
    straddling = batches[2]  # rows 8, 9 of the first pass, then 0, 1 of the second: noised with each pass's epoch
    for part, epoch, rows_of in ((slice(0, 2), 0, slice(8, 10)), (slice(2, 4), 1, slice(0, 2))):
        t, eps, _ = draw_sample_randomness(
            ids[rows_of],
            (4, 4, 4),
            seed=0,
            epoch=epoch,
            num_train_timesteps=args[1].config.num_train_timesteps,
            caption_dropout=cfg.stream.caption_dropout,
        )
        assert torch.equal(straddling["timesteps"][part], torch.from_numpy(t)) and torch.equal(straddling["noise"][part], torch.from_numpy(eps))
    assert not torch.equal(batches[0]["noise"][:2], straddling["noise"][2:])  # the same rows, re-noised in the next pass

    resumed = cached_stream(rows, 4, *args, consumed=2)
    for b in batches[2:]:
        again = resumed.next()
        assert again["source_ids"] == b["source_ids"] and torch.equal(again["noisy_latents"], b["noisy_latents"])
