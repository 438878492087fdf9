"""The encode stage: make sure a merge (or the few-step stage) has a complete set of latent shards
to train on, encoding (or resuming an unfinished encode) from `data.source` when it has not."""

from __future__ import annotations

from dmm_ray.console import say


def check_latents(cfg, inputs: bool = True, job: str = "merge"):
    """`cfg`: a MergeConfig. What can be checked before Ray starts: the shard set's state
    (dmm_ray.data.shards.shard_set_state), returned with the encode's plan or None; a complete one must
    hold enough rows for `job`'s workers (check_enough_rows: it was checked only after Ray started, and
    --dry-run said OK); one that is not complete must be encodable: data.source set and (`inputs`) what the encode checks before it
    starts (`plan_encode`): its image folder and VAE there, data.shards writable, a usable record, and an
    unfinished encode in data.shards made with these settings (one made with others was refused only after
    Ray started, and --dry-run said OK). The plan (`plan_encode`'s, made when `inputs` and the set is
    not complete) goes to ensure_latents, whose encode then does not read the source's index again."""
    from dmm_ray.data.encode import plan_encode
    from dmm_ray.data.shards import shard_set_state

    state = shard_set_state(cfg.data.shards)
    if state.status == "complete":
        check_encoded_settings(cfg)
        check_enough_rows(cfg, job)
        return state, None
    if cfg.data.source is None:
        if state.status == "partial":
            raise FileNotFoundError(
                f"data.shards {cfg.data.shards} holds an unfinished encode ({state.detail()}) and data.source is not set to finish it; "
                "set data.source to the source it was encoded from (the merge then resumes the encode), or point data.shards at a complete set"
            )
        raise FileNotFoundError(f"data.shards {cfg.data.shards} has no latents and data.source is not set to encode them")
    # reads the source's annotation files (not its images); the plan goes on to run_encode, which read them again
    return state, plan_encode(cfg.data, shards_setting="data.shards") if inputs else None


def check_encoded_settings(cfg) -> None:
    """A complete set is trained on as it is: data.encode settings that would have made other latents
    (resolution, latent_sampling) and differ from what its `_encode.json` records are refused, naming
    both. They were ignored: distill trained at the shards' size while the memory plan and synthesis
    (synthesis.resolution's default) took data.encode.resolution. A set without the record is not checked."""
    from dmm_ray.data import fs as fsu
    from dmm_ray.data.shards import read_meta

    meta = read_meta(*fsu.resolve(cfg.data.shards)) or {}
    e = cfg.data.encode
    diffs = [
        f"data.encode.{k} is {getattr(e, k)!r} but the shards were encoded with {meta[k]!r}"
        for k in ("resolution", "latent_sampling")
        if k in meta and meta[k] != getattr(e, k)
    ]
    if diffs:
        raise ValueError(
            f"data.shards {cfg.data.shards} holds a complete latent set made with other settings: {'; '.join(diffs)}. "
            "Set them back to train on these latents, or give a new data.shards folder to encode with the new ones"
        )


def ensure_latents(cfg, job: str = "merge", plan=None) -> None:
    """`cfg`: a MergeConfig. A complete shard set is used as it is; none, or a set whose encode did not
    finish (dmm_ray.data.shards.shard_set_state), is encoded (resumed: committed shards are kept).
    `job`: whose log lines these are (`[dmm-merge ...]`, `[dmm-fast ...]`). `plan`: the encode's plan
    that check_latents made before Ray started (else run_encode makes it, checking its inputs)."""
    state = check_latents(cfg, inputs=False, job=job)[0]  # without a plan, run_encode checks its inputs itself
    if state.status == "complete":
        say(job, f"latent shards: {state.shards} complete shard(s) in {cfg.data.shards}")
        return
    from dmm_ray.data.encode import run_encode
    from dmm_ray.data.shards import shard_set_state

    if state.status == "partial":
        say(
            job,
            f"latent shards in {cfg.data.shards} are incomplete ({state.detail()}; an encode did not finish): "
            f"resuming the encode from {cfg.data.source.root} instead of training on a subset",
        )
    else:
        say(job, f"encoding latents from {cfg.data.source.root} -> {cfg.data.shards}")
    print(run_encode(cfg.data, plan=plan).summary(), flush=True)
    after = shard_set_state(cfg.data.shards)
    if after.status != "complete":  # run_encode raises first; this guards the contract, not a known path
        raise RuntimeError(f"encoding into {cfg.data.shards} left an incomplete set ({after.detail()})")
    check_enough_rows(cfg, job)


def check_enough_rows(cfg, job: str = "merge") -> None:
    """Every worker of the stage needs at least one full batch of latent-shard rows per epoch (Ray Data's
    split gives each worker rows / W): say so before Ray Train starts. `job`: "merge" (the merge's W
    workers, data.stream.batch_size less its data.synthetic_fraction) or "fast" (the few-step stage's own
    fast.num_workers and batch split); the merge's numbers checked the few-step stage too, and the whole
    batch, though the synthesized share of it is not read from the shards."""
    from dmm_ray.data import fs as fsu
    from dmm_ray.data.config import split_batch
    from dmm_ray.data.shards import read_marker, set_shard_indices

    fs, root = fsu.resolve(cfg.data.shards)
    rows = sum((read_marker(fs, root, i) or {}).get("rows", 0) for i in set_shard_indices(fs, root)[0])
    if job == "fast":
        workers, per_worker = cfg.fast.num_workers, cfg.fast.batch_split(cfg.data.stream.batch_size)[0]
        what, fix = "fast.num_workers", "lower fast.batch_size or fast.num_workers"
        if cfg.fast.synthetic_fraction:
            what += f" x the {per_worker} shard rows of a batch (fast.batch_size less fast.synthetic_fraction)"
        else:
            what += f" x fast.batch_size {per_worker}"
    else:
        workers, per_worker = cfg.num_workers, split_batch(cfg.data.stream.batch_size, cfg.data.synthetic_fraction)[0]
        what, fix = "workers", "lower data.stream.batch_size"
        if cfg.data.synthetic_fraction:
            what += f" x the {per_worker} shard rows of a batch (data.stream.batch_size less data.synthetic_fraction)"
        else:
            what += f" x data.stream.batch_size {per_worker}"
    need = workers * per_worker
    if rows < need:
        raise ValueError(f"data.shards has {rows} latents but {workers} {what} need at least {need}; add data or {fix}")
