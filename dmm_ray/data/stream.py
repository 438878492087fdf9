"""Streaming noised batches from latent shards to Ray Train workers.

Driver side (once):
    ds = build_latent_dataset(cfg)                      # read_parquet -> tokenise (actor stage)
    trainer = TorchTrainer(loop, datasets={"train": ds}, dataset_config=train_dataset_config(), ...)

Worker side (inside train_loop_per_worker):
    shard = ray.train.get_dataset_shard("train")
    for batch in iter_noised_batches(shard, cfg, epoch=epoch, device=device):
        batch["noisy_latents"]  # (B, C, h, w) float32   x_t = add_noise(x0, eps, t)
        batch["timesteps"]      # (B,) int64             t ~ U{0..T-1}
        batch["noise"]          # (B, C, h, w) float32   eps ~ N(0, I)
        batch["latents"]        # (B, C, h, w) float32   x0 (scaled VAE latents)
        batch["input_ids"]      # (B, L) int64           caption tokens, "" where dropped
        batch["dropped"]        # (B,) bool              CFG caption dropout, ONE draw per sample
        batch["captions"]       # list[str]              the captions as used ("" where dropped), for teachers with their own tokenizer
        batch["style"]          # (B,) int64             only if the shards carry a style column

Reproducibility: each sample's (t, eps, dropped) is drawn from a generator keyed by
(seed, epoch, source_id), so it does not depend on which worker or batch the sample lands in;
and with `train_dataset_config()` (preserve_order) the split of rows to workers and their
order is itself deterministic for a given seed and worker count.
"""

from __future__ import annotations

import functools
import hashlib
from typing import TYPE_CHECKING, Any, Iterator, Optional, Sequence

import numpy as np

if TYPE_CHECKING:  # annotations only: Ray Data's tokenise tasks import this module and need no torch
    import torch

from dmm_ray.data.config import DataConfig
from dmm_ray.data.shards import complete_shards


def load_tokenizer(path: str):
    """Load the base's CLIP tokenizer from a saved folder (each process loads its own copy, so no
    tokenizer object ever goes through Ray serialization)."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(path)


@functools.lru_cache(maxsize=8)
def _cached_tokenizer(path: str):
    return load_tokenizer(path)


def tokenize(tokenizer, captions: Sequence[str]) -> np.ndarray:
    """(B, L) int64 ids padded/truncated to the tokenizer's max length (77 for SD)."""
    return tokenizer(
        list(captions), padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="np"
    ).input_ids.astype(np.int64)


def load_noise_scheduler(cfg: Optional[DataConfig] = None):
    """The DDPM training schedule of the base: `<base>/scheduler` re-read as a DDPMScheduler (the
    folder may hold the inference scheduler, e.g. DPM-Solver; only the beta schedule matters for
    add_noise). Without a base folder, SD1.5's schedule."""
    from diffusers import DDPMScheduler

    path = cfg.scheduler_path() if cfg is not None else None
    if path is None:
        from dmm_ray.tiny import training_noise_scheduler

        return training_noise_scheduler()
    return DDPMScheduler.from_pretrained(path)


def tokenize_latent_rows(table, tokenizer_path: str) -> dict:
    """Ray Data stage: list-encoded latents -> (B, C, h, w) arrays, captions -> token ids.

    A plain task function: Ray reuses worker processes across tasks, and the tokenizer is loaded
    from its folder once per process (`_cached_tokenizer`), so nothing big is pickled or re-imported."""
    tokenizer = _cached_tokenizer(tokenizer_path)
    n = table.num_rows
    shapes = np.asarray(table.column("latent_shape").combine_chunks().flatten().to_numpy(zero_copy_only=False)).reshape(n, -1)
    if n and not (shapes == shapes[0]).all():
        raise ValueError(f"latent shards mix latent shapes {np.unique(shapes, axis=0).tolist()}; encode all shards at one resolution")
    flat = table.column("latent").combine_chunks().flatten().to_numpy(zero_copy_only=False)  # (B*C*h*w,)
    captions = table.column("caption").to_pylist()
    out = {
        "latents": np.asarray(flat, dtype=np.float32).reshape(n, *shapes[0]) if n else np.zeros((0, 1, 1, 1), np.float32),  # (B, C, h, w)
        "input_ids": tokenize(tokenizer, captions) if n else np.zeros((0, tokenizer.model_max_length), np.int64),  # (B, L)
        "caption": np.array(captions, dtype=object),
        "source_id": np.array(table.column("source_id").to_pylist(), dtype=object),
    }
    if "style" in table.column_names:
        out["style"] = table.column("style").to_numpy().astype(np.int64)  # (B,)
    return out


def build_latent_dataset(cfg: DataConfig, shards: "Optional[str | Sequence[str]]" = None):
    """Ray Dataset of tokenised latent rows from every complete shard in `shards` (a folder or a list
    of folders on one filesystem; default cfg.shards).

    Columns: latents (C, h, w) float32, input_ids (L,) int64, caption, source_id[, style].
    Incomplete shards are left out with a warning; no complete shard is an error.
    """
    folders = [shards or cfg.shards] if shards is None or isinstance(shards, str) else list(shards)
    paths = []
    for folder in folders:
        fs, found = complete_shards(folder)
        paths += found
    ds = _read_parquet(paths, fs)
    if cfg.stream.shuffle_blocks:
        ds = ds.randomize_block_order(seed=cfg.stream.seed)  # seeded: same order every run
    return ds.map_batches(
        tokenize_latent_rows, fn_kwargs=dict(tokenizer_path=cfg.tokenizer_path()), batch_format="pyarrow", batch_size=max(256, cfg.stream.batch_size)
    )


def _read_parquet(paths: list[str], fs):
    """`ray.data.read_parquet` through Ray Data's V1 parquet reader unless RAY_DATA_USE_DATASOURCE_V2 says
    otherwise. V2 (Ray's default since 2.5x) starts FooterReader actors, fresh processes, for every
    execution of a dataset, i.e. every epoch of every worker's split: about 6 s each on 2 cores for a few
    files. The toy merge runs 14 % faster with V1 (617 vs 719 s, README "The merge job"). Older Ray has
    only V1."""
    import os

    import ray

    ctx = ray.data.DataContext.get_current()
    if "RAY_DATA_USE_DATASOURCE_V2" in os.environ or not hasattr(ctx, "use_datasource_v2"):
        return ray.data.read_parquet(paths, filesystem=fs)
    v2, ctx.use_datasource_v2 = ctx.use_datasource_v2, False  # read_parquet picks its reader here, on the driver
    try:
        return ray.data.read_parquet(paths, filesystem=fs)
    finally:
        ctx.use_datasource_v2 = v2


def train_dataset_config(datasets_to_split: Any = "all", data_cpus: Optional[float] = None):
    """`dataset_config=` for TorchTrainer: preserve_order makes the split to workers deterministic;
    `data_cpus` caps Ray Data's CPUs at what the Train workers leave free (dmm_ray.resources)."""
    from ray.data import ExecutionOptions, ExecutionResources
    from ray.train import DataConfig as RayDataConfig

    options = ExecutionOptions(preserve_order=True)
    if data_cpus is not None:
        options.resource_limits = ExecutionResources(cpu=data_cpus)
    return RayDataConfig(datasets_to_split=datasets_to_split, execution_options=options)


def _sample_key(seed: int, epoch: int, source_id: str) -> list[int]:
    digest = hashlib.blake2b(source_id.encode("utf-8"), digest_size=16).digest()
    return [seed, epoch, int.from_bytes(digest[:8], "little"), int.from_bytes(digest[8:], "little")]


def _shuffle_seed(seed: int, epoch: int, rank: int) -> int:
    """The local shuffle's seed: a new order every epoch, per stream seed and worker. All of the key
    goes through SeedSequence (element 2 of `_sample_key` alone hashes only the rank: every epoch and
    every seed shuffled alike)."""
    return int(np.random.SeedSequence(_sample_key(seed, epoch, f"rank{rank}")).generate_state(1)[0] % 2**31)


def draw_sample_randomness(
    source_ids: Sequence[str], latent_shape: Sequence[int], *, seed: int, epoch: int, num_train_timesteps: int, caption_dropout: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-sample (timesteps (B,) int64, noise (B, C, h, w) float32, dropped (B,) bool), each sample
    from its own generator keyed by (seed, epoch, source_id): t ~ U{0..T-1}, dropped ~ Bernoulli(p),
    eps ~ N(0, I). The dropout flag is drawn exactly once per sample and shared by student and teacher."""
    b = len(source_ids)
    timesteps = np.empty(b, dtype=np.int64)
    dropped = np.empty(b, dtype=bool)
    noise = np.empty((b, *latent_shape), dtype=np.float32)
    for i, sid in enumerate(source_ids):
        rng = np.random.default_rng(_sample_key(seed, epoch, str(sid)))
        timesteps[i] = rng.integers(0, num_train_timesteps)
        dropped[i] = rng.random() < caption_dropout
        noise[i] = rng.standard_normal(tuple(latent_shape), dtype=np.float32)
    return timesteps, noise, dropped


def noised_batch(
    batch: dict, *, scheduler, empty_ids: np.ndarray, seed: int, epoch: int, caption_dropout: float, device: Optional["torch.device"] = None
) -> dict:
    """Turn one tokenised batch (numpy, from build_latent_dataset) into the training batch dict."""
    import torch  # here, not at module level: Ray Data's tokenise tasks import this module and need no torch

    x0 = torch.from_numpy(np.array(batch["latents"], dtype=np.float32))  # (B, C, h, w); a copy: Ray Data's arrays are read-only
    t, eps, dropped = draw_sample_randomness(
        batch["source_id"],
        x0.shape[1:],
        seed=seed,
        epoch=epoch,
        num_train_timesteps=scheduler.config.num_train_timesteps,
        caption_dropout=caption_dropout,
    )
    timesteps, noise = torch.from_numpy(t), torch.from_numpy(eps)
    noisy = scheduler.add_noise(x0, noise, timesteps)  # (B, C, h, w) = sqrt(a_t) x0 + sqrt(1 - a_t) eps
    ids = np.where(dropped[:, None], empty_ids[None, :], batch["input_ids"])  # (B, L)
    out = {
        "noisy_latents": noisy,
        "timesteps": timesteps,
        "noise": noise,
        "latents": x0,
        "input_ids": torch.from_numpy(np.array(ids, dtype=np.int64)),
        "dropped": torch.from_numpy(dropped),
        "captions": ["" if d else str(c) for c, d in zip(batch["caption"], dropped)],
        "source_ids": [str(s) for s in batch["source_id"]],
    }
    if "style" in batch:
        out["style"] = torch.from_numpy(np.array(batch["style"], dtype=np.int64))
    if device is not None:
        out = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in out.items()}
    return out


def _world_rank() -> int:
    try:
        import ray.train

        return ray.train.get_context().get_world_rank()
    except Exception:  # outside a Train worker (tests, benchmarks)
        return 0


def iter_noised_batches(
    shard, cfg: DataConfig, *, epoch: int = 0, device: Optional["torch.device"] = None, rank: Optional[int] = None, scheduler=None
) -> Iterator[dict]:
    """Iterate one epoch of training batches from `shard` (the worker's `ray.train.get_dataset_shard`,
    or any Ray Dataset / DataIterator). Tokenizer and scheduler are loaded here, in the worker."""
    s = cfg.stream
    scheduler = scheduler or load_noise_scheduler(cfg)
    empty_ids = tokenize(_cached_tokenizer(cfg.tokenizer_path()), [""])[0]  # (L,) the unconditional caption
    rank = _world_rank() if rank is None else rank
    shuffle = dict(local_shuffle_buffer_size=s.shuffle_buffer, local_shuffle_seed=_shuffle_seed(s.seed, epoch, rank)) if s.shuffle_buffer else {}
    for batch in shard.iter_batches(
        batch_size=s.batch_size, batch_format="numpy", drop_last=s.drop_last, prefetch_batches=s.prefetch_batches, **shuffle
    ):
        yield noised_batch(
            batch, scheduler=scheduler, empty_ids=empty_ids, seed=s.seed, epoch=epoch, caption_dropout=s.caption_dropout, device=device
        )
