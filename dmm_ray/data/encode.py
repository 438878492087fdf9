"""Encode a captioned image source into latent parquet shards with the base VAE on Ray Data.

Pipeline (streaming; one Ray Data block per pending shard at the input):

    index (source_id, caption, path, shard, pos)          driver, annotation files only
      -> map_batches(decode_images)     CPU tasks         read bytes (pyarrow fs), resize + centre-crop
      -> map_batches(VAEEncoder)        actor pool        VAE encode (GPU if encode.num_gpus > 0)
      -> driver collects rows per shard; a shard is written and committed the moment all its
         rows (encoded or skipped) have arrived.

Shards are fixed slices of the index (shard k = records [k*S, (k+1)*S)), so a re-run skips
committed shards and redoes only the rest; `_complete.json` (shard and row count) is written
once every shard is committed, so an unfinished set is never mistaken for a whole one. Missing, unreadable images are skipped and counted
by reason (empty captions and bad annotation lines are counted when indexing); nothing aborts.
With encode.num_gpus == 0 Ray fuses the decode and VAE stages into one CPU actor (same
resources); with GPUs they stay separate, so decoding never holds a GPU actor. The driver
receives only latents (SD1.5 at 512 px: 64 KiB per image), so it is not the
bottleneck next to VAE encoding.
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import pandas as pd
import pyarrow.fs as pafs

from dmm_ray.data import fs as fsu
from dmm_ray.data import shards as sh
from dmm_ray.data.config import DataConfig
from dmm_ray.data.images import MISSING_FILE, READ_ERROR, UNREADABLE_IMAGE, preprocess_image, to_model_input
from dmm_ray.data.readers import EMPTY_CAPTION, NO_IMAGE_FIELD, ImageIndex, read_image_index, skip_hints

log = logging.getLogger(__name__)

OK = "ok"


@dataclass
class EncodeReport:
    """What one encode run did. `skipped`: reason -> count over the whole source (index-time
    reasons plus the markers of every complete shard, so a resumed run reports the full picture)."""

    records: int
    shards_total: int
    shards_already_complete: int
    shards_written: int
    encoded_this_run: int
    latents_total: int = 0  # rows in all complete shards (this run and earlier ones)
    skipped: Counter = field(default_factory=Counter)

    def summary(self) -> str:
        reasons = ", ".join(f"{k}={v}" for k, v in sorted(self.skipped.items())) or "none"
        return (
            f"{self.records} indexed records in {self.shards_total} shards: {self.shards_already_complete} already complete, "
            f"{self.shards_written} written now ({self.encoded_this_run} images encoded); {self.latents_total} latents in total. Skipped: {reasons}{skip_hints(self.skipped)}"
        )


def decode_images(batch: dict, resolution: int, filesystem: pafs.FileSystem, io_threads: int = 8) -> dict:
    """Ray Data stage: read + preprocess each image; failures become a `status` reason, never an exception."""
    paths = batch["path"]

    def load(path: str) -> tuple[str, Optional[np.ndarray]]:
        try:
            data = fsu.read_bytes(filesystem, path)
        except FileNotFoundError:
            return MISSING_FILE, None
        except (OSError, ValueError):  # ValueError: pyarrow refuses the path itself (a URI, a NUL byte)
            return READ_ERROR, None
        try:
            return OK, preprocess_image(data, resolution)
        except Exception:  # PIL raises many types for corrupt input (OSError, SyntaxError, ValueError...)
            return UNREADABLE_IMAGE, None

    with ThreadPoolExecutor(max_workers=max(1, min(io_threads, len(paths)))) as pool:  # object stores are latency-bound
        results = list(pool.map(load, paths))
    pixels = np.zeros((len(paths), resolution, resolution, 3), dtype=np.uint8)  # (B, R, R, 3)
    for i, (_, px) in enumerate(results):
        if px is not None:
            pixels[i] = px
    out = {k: v for k, v in batch.items() if k != "path"}
    out["status"] = np.array([s for s, _ in results], dtype=object)
    out["pixels"] = pixels
    return out


def _sample_key(source_id: str, seed: int) -> list[int]:
    digest = hashlib.blake2b(source_id.encode("utf-8"), digest_size=8).digest()
    return [seed, int.from_bytes(digest, "little")]


class VAEEncoder:
    """Ray Data actor: hosts the VAE once, encodes batches of preprocessed pixels.

    Output `latent` is (B, C*h*w) float32, already scaled (z = (mean [+ std*eps] - shift) * scaling_factor);
    rows whose status is not "ok" get zeros and are dropped by the shard writer.
    """

    def __init__(self, vae_path: str, resolution: int, use_gpu: bool = False, dtype: str = "float32", latent_sampling: str = "mean", seed: int = 0):
        import torch
        from diffusers import AutoencoderKL

        from dmm_ray.devices import resolve_device

        self.torch = torch
        self.device = resolve_device("auto" if use_gpu else "cpu")
        self.dtype = getattr(torch, dtype)
        self.vae = AutoencoderKL.from_pretrained(vae_path, torch_dtype=self.dtype).to(self.device).eval()
        self.scaling = float(self.vae.config.scaling_factor)
        self.shift = float(getattr(self.vae.config, "shift_factor", None) or 0.0)
        self.sampling = latent_sampling
        self.seed = seed
        down = 2 ** (len(self.vae.config.block_out_channels) - 1)  # SD1.5: 8, tiny: 4
        self.latent_shape = (int(self.vae.config.latent_channels), resolution // down, resolution // down)  # (C, h, w)

    def __call__(self, batch: dict) -> dict:
        torch = self.torch
        pixels = batch.pop("pixels")  # (B, R, R, 3) uint8
        ok = np.array([s == OK for s in batch["status"]], dtype=bool)
        latents = np.zeros((len(ok), int(np.prod(self.latent_shape))), dtype=np.float32)  # (B, C*h*w)
        if ok.any():
            x = torch.from_numpy(to_model_input(pixels[ok])).to(self.device, self.dtype)  # (b, 3, R, R) in [-1, 1]
            with torch.inference_mode():
                dist = self.vae.encode(x).latent_dist
                z = dist.mean  # (b, C, h, w)
                if self.sampling == "sample":
                    # eps keyed by source id: the same image gets the same draw whatever the batching.
                    eps = np.stack(
                        [
                            np.random.default_rng(_sample_key(str(s), self.seed)).standard_normal(self.latent_shape, dtype=np.float32)
                            for s in batch["source_id"][ok]
                        ]
                    )
                    z = z + dist.std * torch.from_numpy(eps).to(z.device, z.dtype)
                z = ((z - self.shift) * self.scaling).float().cpu().numpy()
            if z.shape[1:] != self.latent_shape:
                raise RuntimeError(f"VAE produced latents {z.shape[1:]}, expected {self.latent_shape} from its config")
            latents[ok] = z.reshape(len(z), -1)
        batch["latent"] = latents
        batch["latent_shape"] = np.tile(np.array(self.latent_shape, dtype=np.int32), (len(ok), 1))  # (B, 3)
        return batch


def _fingerprint(cfg: DataConfig, records: pd.DataFrame) -> dict:
    ids = hashlib.sha256("\n".join(records["source_id"]).encode("utf-8")).hexdigest()
    # the records themselves: another folder can give the same ids (000.png ...) with other images and captions
    content = hashlib.sha256("\n".join(f"{p}\t{c}" for p, c in zip(records["path"], records["caption"])).encode("utf-8", "surrogateescape"))
    e = cfg.encode
    return {
        "records": len(records),
        "source_ids_sha256": ids,
        "records_sha256": content.hexdigest(),
        "shard_size": e.shard_size,
        "resolution": e.resolution,
        "latent_sampling": e.latent_sampling,
        "dtype": e.dtype,  # the VAE's compute dtype: a set resumed in another would mix float16 and float32 latents
        "vae": cfg.vae_path(),
        "seed": cfg.stream.seed if e.latent_sampling == "sample" else None,
    }


def _check_resumable(fs: pafs.FileSystem, root: str, meta: dict, shards_uri: str) -> None:
    old = sh.read_meta(fs, root)
    if old is None:
        if sh.shard_indices(fs, root):
            raise ValueError(f"{shards_uri!r} holds shards but no {sh.META_NAME}; use an empty folder for data.shards")
        return
    diffs = [k for k in meta if k in old and old[k] != meta[k]]  # a key an older version did not record: not compared
    if diffs and not any(sh.is_shard_complete(fs, root, i) for i in sh.shard_indices(fs, root)):
        return  # nothing finished under the old settings: start over with the new ones
    if diffs:
        detail = "; ".join(f"{k}: shards have {old.get(k)!r}, config gives {meta[k]!r}" for k in diffs)
        raise ValueError(
            f"cannot resume encoding into {shards_uri!r}, it was made with different settings ({detail}). "
            "Use a new data.shards folder or restore the old settings."
        )


def check_encode_inputs(cfg: DataConfig, shards_setting: str = "--out (shards)") -> None:
    """What can be checked before Ray starts (local paths only; the source's and output's URIs are read by
    their filesystem): a source, its image folder, a local VAE folder, and an output folder this process can write."""
    from pathlib import Path

    from dmm_ray.paths import check_writable_folder

    if cfg.source is None:
        raise ValueError("data.source is not set: nothing to encode (give --source and --root, or source: in --config)")
    if not fsu.is_uri(cfg.source.root) and not Path(cfg.source.root).is_dir():
        raise FileNotFoundError(f"source.root (--root) {cfg.source.root}: no such image folder")
    vae, what = cfg.vae_path(), "data.vae (--vae)" if cfg.vae else "data.base (--base)"  # the merge's setting and the encode job's option
    if fsu.is_uri(vae):  # every VAE actor loads it with from_pretrained, which reads local folders only: it failed there, after Ray started
        raise ValueError(f"{what}: the VAE {vae} is a URI, but it is loaded from a local folder on every node; give a local path")
    if not (Path(vae) / "config.json").is_file():
        raise FileNotFoundError(
            f"{what}: no VAE at {vae} (missing config.json); give data.base (--base: a diffusers folder with vae/) or data.vae (--vae)"
        )
    check_writable_folder(cfg.shards, shards_setting)


@dataclass
class EncodePlan:
    """What `plan_encode` read before any Ray work: the source's index, its records placed in shards,
    and the settings fingerprint the shard folder records (checked against a resumed one)."""

    index: ImageIndex
    records: pd.DataFrame  # + shard, pos columns
    meta: dict


def plan_encode(cfg: DataConfig, shards_setting: str = "--out (shards)") -> EncodePlan:
    """Everything an encode decides without Ray: its inputs (`check_encode_inputs`; `shards_setting`
    names cfg.shards in its errors), the source's records and their shards, and whether `cfg.shards` can
    be resumed with these settings (a folder made with others is refused, naming each setting). A job
    calls it before it starts Ray."""
    check_encode_inputs(cfg, shards_setting)
    index = read_image_index(cfg.source)
    records = index.records
    if len(records) == 0:
        raise ValueError(
            f"source {cfg.source.root!r} yielded no usable records (skipped: {dict(index.skipped) or 'none'}){_no_records_hint(cfg.source, index)}{skip_hints(index.skipped)}"
        )
    e = cfg.encode
    records = records.assign(shard=np.arange(len(records)) // e.shard_size, pos=np.arange(len(records)) % e.shard_size)
    out_fs, out_root = fsu.resolve(cfg.shards)
    meta = _fingerprint(cfg, records)
    _check_resumable(out_fs, out_root, meta, cfg.shards)
    return EncodePlan(index, records, meta)


def _no_records_hint(source, index: ImageIndex) -> str:
    """What to set when every record was skipped for the field it lacks: the counts alone named neither the
    field looked for nor the setting (a manifest with `image` / `text` columns gave only `no_image_field: 2`)."""
    hints, skipped = [], index.skipped
    if skipped.get(NO_IMAGE_FIELD):
        hints.append(
            f"{skipped[NO_IMAGE_FIELD]} lack the image path field {source.resolved_image_field()!r}: set source.image_field to the field that holds it"
        )
    if skipped.get(EMPTY_CAPTION):
        hints.append(
            f"{skipped[EMPTY_CAPTION]} have no caption in {source.caption_fields} (dotted fields): set source.caption_fields to those that hold it"
        )
    return "; " + "; ".join(hints) if hints else ""


def run_encode(cfg: DataConfig, show_progress: bool = True, plan: EncodePlan | None = None) -> EncodeReport:
    """Encode `cfg.source` into `cfg.shards` (resumable). Ray must be reachable (ray.init or auto).
    `plan`: `plan_encode(cfg)`'s, when the caller made it before starting Ray (else made here)."""
    import ray
    from tqdm.auto import tqdm

    plan = plan or plan_encode(cfg)
    index, records, meta = plan.index, plan.records, plan.meta
    e = cfg.encode
    n_shards = int(records["shard"].max()) + 1
    out_fs, out_root = fsu.resolve(cfg.shards)
    sh.remove_manifest(out_fs, out_root)  # written again only once every shard is committed
    sh.write_meta(out_fs, out_root, meta)

    done = {k for k in range(n_shards) if sh.is_shard_complete(out_fs, out_root, k)}
    pending = records[~records["shard"].isin(done)]
    expected = pending.groupby("shard").size().to_dict()
    written, encoded = 0, 0
    log.info("%d shards: %d complete, %d to encode", n_shards, len(done), len(expected))

    if expected:
        blocks = [g.reset_index(drop=True) for _, g in pending.groupby("shard", sort=True)]
        ds = ray.data.from_pandas(blocks)  # one block per shard: decode tasks parallelise across shards
        ds = ds.map_batches(
            decode_images,
            batch_size=e.batch_size,
            batch_format="numpy",
            num_cpus=e.decode_cpus,
            fn_kwargs=dict(resolution=e.resolution, filesystem=index.filesystem),
        )
        ds = ds.map_batches(
            VAEEncoder,
            batch_size=e.batch_size,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=e.concurrency),
            num_gpus=e.num_gpus,
            fn_constructor_kwargs=dict(
                vae_path=cfg.vae_path(),
                resolution=e.resolution,
                use_gpu=e.num_gpus > 0,
                dtype=e.dtype,
                latent_sampling=e.latent_sampling,
                seed=cfg.stream.seed,
            ),
        )
        buffers: dict[int, list[dict]] = {}
        received: Counter = Counter()
        bar = tqdm(total=len(pending), desc="encode", unit="img", disable=not show_progress)
        run_skips: Counter = Counter()
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            for shard in np.unique(batch["shard"]):
                rows = batch["shard"] == shard
                part = {k: v[rows] for k, v in batch.items()}
                buffers.setdefault(int(shard), []).append(part)
                received[int(shard)] += int(rows.sum())
                if received[int(shard)] == expected[int(shard)]:
                    n_ok, skips = _commit_shard(out_fs, out_root, int(shard), buffers.pop(int(shard)))
                    written += 1
                    encoded += n_ok
                    run_skips.update(skips)
            bar.update(len(batch["shard"]))
            bar.set_postfix(shards=f"{len(done) + written}/{n_shards}", skipped=sum(run_skips.values()))
        bar.close()
        if buffers:  # every row must come back; anything else is a bug, never a silent partial shard
            raise RuntimeError(f"encoding ended with incomplete shards {sorted(buffers)} (rows lost in the pipeline)")

    skipped = Counter(index.skipped)
    skipped.update(sh.skipped_totals(out_fs, out_root, range(n_shards)))
    total = sum((sh.read_marker(out_fs, out_root, k) or {}).get("rows", 0) for k in range(n_shards))
    _finish(out_fs, out_root, n_shards, total, len(records))
    return EncodeReport(len(records), n_shards, len(done), written, encoded, total, skipped)


def _finish(fs: pafs.FileSystem, root: str, n_shards: int, rows: int, records: int) -> None:
    """Write the set's manifest (`_complete.json`) once every shard is committed: the mark of a finished encode."""
    missing = [k for k in range(n_shards) if not sh.is_shard_complete(fs, root, k)]
    if missing:
        raise RuntimeError(f"encoding ended with shards {missing[:10]} not committed in {root}; run it again to finish them")
    sh.write_manifest(fs, root, n_shards, rows, records)


def _commit_shard(fs: pafs.FileSystem, root: str, shard: int, parts: list[dict]) -> tuple[int, Counter]:
    cols = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    order = np.argsort(cols["pos"], kind="stable")  # index order inside the shard, whatever the arrival order
    cols = {k: v[order] for k, v in cols.items()}
    ok = cols["status"] == OK
    skips = Counter(str(s) for s in cols["status"][~ok])
    if ok.any():
        shape = tuple(int(x) for x in cols["latent_shape"][ok][0])
        latents = np.asarray(cols["latent"][ok], dtype=np.float32).reshape(-1, *shape)  # (n, C*h*w) -> (n, C, h, w)
        table = sh.latent_table(latents, list(cols["caption"][ok]), list(cols["source_id"][ok]))
    else:
        table = sh.empty_table()
    sh.write_shard(fs, root, shard, table, skipped=dict(skips))
    return int(ok.sum()), skips
