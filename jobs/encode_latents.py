#!/usr/bin/env python
"""Encode captioned images (JourneyDB, an image folder, the toy zoo's image set) into VAE latent
parquet shards with Ray Data. Resumable: re-running skips committed shards.

Examples:
  # JourneyDB (images extracted under data/train/imgs/, annotations as released)
  python jobs/encode_latents.py --source journeydb --root /data/JourneyDB/data/train/imgs \\
      --annotations /data/JourneyDB/data/train/train_anno_realease_repath.jsonl \\
      --base /models/sd15 --out s3://bucket/jdb-latents-512 --resolution 512 --num-gpus 1 --concurrency 8

  # the toy zoo's image set into a folder of your own
  python jobs/encode_latents.py --source folder --root $DMM_HOME/zoo/full/images --base $DMM_HOME/zoo/full/base \\
      --out outputs/toy-latents --resolution 32

  # from a config file plus overrides
  python jobs/encode_latents.py --config jobs/configs/data_journeydb.yaml --set encode.batch_size=64

Options given on the command line override the config file; `--set key=value` (YAML value,
keys as in DataConfig, an optional leading `data.` is accepted) overrides both. A merge config
(jobs/configs/toy.yaml) is read as jobs/merge.py reads it: the zoo's image set and base, data.shards
defaulting to <output_dir>/latents: the shards that merge would train on.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from pydantic import ValidationError

from dmm_ray.console import cli_main
from dmm_ray.data.config import DataConfig
from dmm_ray.overrides import ConfigError, add_set_argument, apply_override, config_error, parse_override, read_yaml_file


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--config",
        help="YAML with a DataConfig mapping (bare or under `data:`), or a merge config (read as the merge reads it: its zoo, its data.shards)",
    )
    add_set_argument(p, help="override one config value (repeatable)")
    g = p.add_argument_group("source")
    g.add_argument("--source", choices=["journeydb", "folder"], help="source.kind")
    g.add_argument("--root", help="source.root: image folder (path or pyarrow URI: file://, s3://, gs://)")
    g.add_argument("--annotations", nargs="+", help="source.annotations: JourneyDB JSONL files or folders")
    g.add_argument("--manifest", help="source.manifest: folder manifest relative to root (.jsonl/.csv/.parquet)")
    g.add_argument("--limit", type=int, help="source.limit: first N records only")
    g = p.add_argument_group("models and output")
    g.add_argument("--base", help="base SD diffusers folder (its vae/ is used)")
    g.add_argument("--vae", help="VAE folder (default <base>/vae)")
    g.add_argument("--out", dest="shards", help="latent shard folder (path or pyarrow URI)")
    g = p.add_argument_group("encoding")
    g.add_argument("--resolution", type=int, help="encode.resolution (px, multiple of 8)")
    g.add_argument("--shard-size", type=int, help="encode.shard_size (records per shard)")
    g.add_argument("--batch-size", type=int, help="encode.batch_size (images per VAE forward)")
    g.add_argument("--concurrency", type=int, help="encode.concurrency (VAE actors)")
    g.add_argument("--num-gpus", type=float, help="encode.num_gpus (GPUs per VAE actor; 0 = CPU)")
    g.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], help="encode.dtype (VAE compute dtype)")
    g.add_argument("--latent-sampling", choices=["mean", "sample"], help="encode.latent_sampling")
    p.add_argument("--address", default=None, help="Ray address (default: the job's cluster, or a new local one)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def _flag_settings(args: argparse.Namespace) -> dict:
    """The command-line flags that were given, by their DataConfig key."""
    flags = {
        "source.kind": args.source,
        "source.root": args.root,
        "source.annotations": args.annotations,
        "source.manifest": args.manifest,
        "source.limit": args.limit,
        "base": args.base,
        "vae": args.vae,
        "shards": args.shards,
        "encode.resolution": args.resolution,
        "encode.shard_size": args.shard_size,
        "encode.batch_size": args.batch_size,
        "encode.concurrency": args.concurrency,
        "encode.num_gpus": args.num_gpus,
        "encode.dtype": args.dtype,
        "encode.latent_sampling": args.latent_sampling,
    }
    return {key: value for key, value in flags.items() if value is not None}


def _data_key(item: str) -> str:
    """A `--set` of this job names a DataConfig key, with or without a leading `data.`: without it."""
    return item.strip()[len("data.") :] if item.strip().startswith("data.") else item


def is_merge_config(doc) -> bool:
    """A full dmm-ray (merge) config rather than a DataConfig (bare, or alone under `data:`): it has a
    top-level key that only a merge config has besides `data:` (`zoo:`, `teachers:`, `name:`, ...)."""
    from dmm_ray.config import MergeConfig

    return isinstance(doc, dict) and any(key in MergeConfig.model_fields and key not in DataConfig.model_fields and key != "data" for key in doc)


def build_config(args: argparse.Namespace) -> DataConfig:
    from dmm_ray.config import resolve_tree_paths

    doc = read_yaml_file(args.config) if args.config else None
    flags = _flag_settings(args)
    if is_merge_config(doc):
        # The data section exactly as the merge reads it (dmm_ray.config.load_config: the zoo preset's image set
        # and base, data.shards defaulting to <output_dir>/latents), so this encode writes the shards the merge
        # would; the flags and --set change its `data:` section. Reading only the raw `data:` section dropped the
        # zoo's paths ("source.root: Field required") and the default shard folder.
        from dmm_ray.config import load_config

        overrides = [f"data.{key}={json.dumps(value, ensure_ascii=False)}" for key, value in flags.items()]  # JSON is YAML: read back as given
        overrides += [f"data.{_data_key(item)}" for item in args.overrides]
        return load_config(args.config, overrides).data
    tree = (doc.get("data", doc) if isinstance(doc, dict) else doc) or {}  # `data:` with every key commented out: {}
    if not isinstance(tree, dict):
        raise ConfigError(f"config file {args.config}: data must be a mapping of settings, got {tree!r}")
    if args.config:
        resolve_tree_paths({"data": tree}, Path(args.config).resolve().parent)  # the file's paths: against its folder
    for key, value in flags.items():
        apply_override(tree, key.split("."), value)
    for item in args.overrides:
        path, value = parse_override(item)
        apply_override(tree, path[1:] if path[0] == "data" and len(path) > 1 else path, value)
    resolve_tree_paths({"data": tree}, Path.cwd())  # the flags' and overrides' paths (the file's are absolute by now)
    if not tree.get("shards"):
        raise ConfigError("no output folder: give --out (the latent shard folder: a path or a pyarrow URI) or shards: in --config")
    try:
        return DataConfig.model_validate(tree)
    except ValidationError as e:
        raise config_error(e, DataConfig, "data config") from None


@cli_main(interrupted="the shards committed so far stay in --out; the same command resumes the encode")
def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from dmm_ray.data import fs as fsu
    from dmm_ray.data.encode import plan_encode, run_encode
    from dmm_ray.ray_session import ensure_ray

    try:
        cfg = build_config(args)
        plan = plan_encode(cfg)  # inputs, the source's records, a resume's settings: before Ray starts
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    ensure_ray(args.address, log_to_driver=False)
    try:
        report = run_encode(cfg, show_progress=not args.no_progress, plan=plan)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(report.summary())
    out_fs, root = fsu.resolve(cfg.shards)
    fsu.write_bytes_atomic(
        out_fs, fsu.join(root, "_encode_report.json"), json.dumps({**report.__dict__, "skipped": dict(report.skipped)}, indent=1).encode()
    )
    if report.latents_total == 0:
        print("error: no image could be encoded (see skip reasons above)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
