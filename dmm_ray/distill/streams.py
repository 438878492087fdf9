"""The batches a distill or fine-tune worker trains on.

`StageBatches` gives each step's micro-batches: per hosted style, rows of the common latent stream
(Ray Data, re-noised each epoch; distill) and/or rows of that style's own synthesized set (read
once into memory; the fine-tune reads only these). Every stream resumes at a checkpointed position.
"""

from __future__ import annotations

import itertools

import torch

from dmm_ray.data.config import split_batch  # torch-free, so the config checks with it too
from dmm_ray.distill.health import TrainingInputError


class EpochStream:
    """Batches of one dataset, epoch after epoch (each epoch re-draws t, eps and caption dropout,
    keyed by the epoch), starting at a checkpointed (epoch, position)."""

    def __init__(self, make_epoch, name: str, epoch: int = 0, position: int = 0):
        self.make_epoch, self.name = make_epoch, name
        self.epoch, self.position = epoch, position
        self._it = itertools.islice(make_epoch(epoch), position, None)

    def next(self) -> dict:
        batch = next(self._it, None)
        if batch is None:
            self.epoch, self.position = self.epoch + 1, 0
            self._it = self.make_epoch(self.epoch)
            batch = next(self._it, None)
            if batch is None:
                raise TrainingInputError(f"dataset {self.name!r} yielded no batch; it needs at least one full batch per worker")
        self.position += 1
        return batch


def read_synthesized(shard, styles: list[int] | None) -> dict[int, dict]:
    """The synthesized set (paper: 1.5k images/teacher, small) read ONCE into memory, split by style:
    {style: numpy columns}, in style order, each style's rows in source-id order. `styles=None` keeps
    every style (the regularisation worker, the few-step stage)."""
    import numpy as np

    parts: dict[int, list[dict]] = {}
    for batch in shard.iter_batches(batch_size=1024, batch_format="numpy"):
        for style in np.unique(batch["style"]):
            if styles is None or int(style) in styles:
                keep = batch["style"] == style
                parts.setdefault(int(style), []).append({k: v[keep] for k, v in batch.items()})
    # Ray Data delivers the rows in an order that follows its block layout and execution, which a resumed
    # run need not share: every batch built from these rows (a pool, a replica's share, a shuffle with a
    # seed) must start from an order of their own, or the same seed and step give other rows after a restart
    out = {}
    for style in sorted(parts):
        rows = {k: np.concatenate([p[k] for p in parts[style]]) for k in parts[style][0]}
        order = np.argsort(rows["source_id"].astype(str), kind="stable")
        out[style] = {k: v[order] for k, v in rows.items()}
    return out


class CachedStream:
    """In-memory rows (numpy columns) in batches of `batch_size`, taken in turn round the set: a batch
    that reaches the end of the rows goes on at their start. Each pass over the rows is an epoch, re-noised
    (t, eps and dropout keyed by it). Fixed batches per epoch dropped the rows past the last full batch,
    the same ones every epoch: synthesized samples that were never trained on. With a row count that is a
    multiple of the batch size the batches are those fixed ones. The position follows from the number of
    batches already consumed."""

    def __init__(self, rows: dict, batch_size: int, data_cfg, scheduler, empty_ids, device, name: str, consumed: int = 0):
        self.n = len(rows["latents"])
        if self.n < batch_size:
            raise TrainingInputError(
                f"{name} has {self.n} rows, fewer than a batch of {batch_size}; "
                "synthesize more images (synthesis.images_per_teacher) or lower the batch size"
            )
        self.rows, self.batch_size = rows, batch_size
        self._noise = dict(
            scheduler=scheduler, empty_ids=empty_ids, seed=data_cfg.stream.seed, caption_dropout=data_cfg.stream.caption_dropout, device=device
        )
        self.given = consumed * batch_size  # rows given so far, over all passes

    def next(self) -> dict:
        from dmm_ray.data.stream import noised_batch
        from dmm_ray.distill.step import concat_batches

        parts, start, stop = [], self.given, self.given + self.batch_size
        while start < stop:  # at most two parts: a batch is no larger than the set
            epoch, i = divmod(start, self.n)
            j = min(self.n, i + stop - start)
            parts.append(noised_batch({k: v[i:j] for k, v in self.rows.items()}, epoch=epoch, **self._noise))
            start += j - i
        self.given = stop
        return parts[0] if len(parts) == 1 else concat_batches(parts, slices=False)


def cached_stream(rows: dict, batch_size: int, data_cfg, scheduler, empty_ids, device, name: str, consumed: int = 0) -> CachedStream:
    """In-memory rows in batches of `batch_size`, round the set and re-noised every pass (CachedStream),
    resuming after `consumed` batches."""
    return CachedStream(rows, batch_size, data_cfg, scheduler, empty_ids, device, name, consumed)


MIXTURE_SEED_OFFSET = 7919  # the mixture block's t / eps / dropout draws: not those of the plain rows of the same images


def mixture_rows(batch_size: int, fraction: float) -> int:
    """Rows each hosted style adds to the mixture block per micro-batch (at least 1)."""
    return max(1, int(round(batch_size * fraction)))


def mixture_weights(rows: int, k: int, rng: torch.Generator) -> torch.Tensor:
    """(rows, k) style weights: per row a random subset of 2..k styles, weights uniform on its simplex
    (normalised Exp(1) draws: Dirichlet(1)); every other entry 0. Covers pairs (a sweep A -> B) and
    the equal mixture of all k alike."""
    sizes = torch.randint(2, k + 1, (rows,), generator=rng)  # (rows,)
    order = torch.rand(rows, k, generator=rng).argsort(dim=1)  # a random permutation per row
    keep = order < sizes[:, None]  # the first `size` styles of each permutation
    w = -torch.log(torch.rand(rows, k, generator=rng).clamp_min(1e-12)) * keep  # Exp(1) on the kept styles
    return w / w.sum(dim=1, keepdim=True)


class StageBatches:
    """One worker's micro-batches for one stage, and the (epoch, position) a checkpoint records.

    Ray Data's streaming split moves every worker's split into its next epoch together, so every
    worker must read the same number of common batches per step (else the one that finishes its
    epoch first waits for the others at the split while they wait for it in DDP's all-reduce: a
    deadlock). Every worker reads `reads_per_step` batches of `n_common` rows: a teacher worker one
    per hosted style (a smaller last group drops the extra), the regulariser all of them as its batch.
    """

    def __init__(self, worker, noise_scheduler, start, rng: torch.Generator):
        import ray.train

        from dmm_ray.data.stream import iter_noised_batches, load_tokenizer, tokenize

        self.worker, self.rng, self.device = worker, rng, worker.device
        self.grad_accum = worker.cfg.distill.grad_accum
        self.role = worker.role
        self.reads_per_step = max(len(r.style_indices) for r in worker.roles if r.kind == "teacher")
        data_cfg, batch_size = worker.cfg.data, worker.cfg.data.stream.batch_size  # rows per hosted style per step, this stage's
        self._stream_args = (data_cfg, noise_scheduler, tokenize(load_tokenizer(data_cfg.tokenizer_path()), [""])[0], self.device)  # (L,) ""
        self._consumed = start.step * self.grad_accum  # batches each cached stream has given so far
        self.common: EpochStream | None = None
        self.synthetic: list[CachedStream | None] = [None] * max(1, len(self.role.style_indices))
        self.own_labels = False  # the regulariser's synthesized rows: labelled with their own (old) style, not a random one
        self.mixture: list[CachedStream] | None = None  # distill.mixture_fraction: per hosted style, its rows of the mixture block
        self._by_style: dict[int, dict] | None = None
        if worker.stage == "finetune":
            self.synthetic = self._synthetic_streams(batch_size)
            return
        n_common, n_synth = split_batch(batch_size, data_cfg.synthetic_fraction)
        stream_cfg = data_cfg.model_copy(update={"stream": data_cfg.stream.model_copy(update={"batch_size": n_common})})
        shard = ray.train.get_dataset_shard("train")
        self.common = EpochStream(
            lambda ep: iter_noised_batches(shard, stream_cfg, epoch=ep, device=self.device, rank=worker.rank, scheduler=noise_scheduler),
            "train",
            start.epoch,
            start.batches_in_epoch,
        )
        if n_synth and self.role.kind == "teacher":
            self.synthetic = self._synthetic_streams(n_synth)
            self.mixture = self._mixture_streams(batch_size)
        elif n_synth and worker.cfg.old_style_samples:  # the regulariser: one read of every common read's share
            self.synthetic = self._synthetic_streams(n_synth * self.reads_per_step)

    @property
    def epoch(self) -> int:
        return self.common.epoch if self.common else 0

    @property
    def position(self) -> int:
        return self.common.position if self.common else 0

    def next_step(self) -> tuple[list[dict], list[torch.Tensor]]:
        """grad_accum micro-batches and their style ids (B,)."""
        pairs = [self._micro_batch() for _ in range(self.grad_accum)]
        return [b for b, _ in pairs], [ids for _, ids in pairs]

    def _synthetic_streams(self, size: int) -> list[CachedStream]:
        import ray.train

        hosted = list(self.role.style_indices) if self.role.kind == "teacher" else None
        by_style = read_synthesized(ray.train.get_dataset_shard("synth"), hosted)
        if hosted is None:  # the regulariser
            import numpy as np

            old = {i: rows for i, rows in by_style.items() if i < len(self.worker.old_styles)}
            if self.worker.cfg.old_style_samples:  # the previous model's own samples of each old style, as labelled
                if sorted(old) != list(range(len(self.worker.old_styles))):
                    raise TrainingInputError(
                        f"incremental.old_style_samples: the synthesized set has old styles {sorted(old)}, not all of 0..{len(self.worker.old_styles) - 1}"
                    )
                by_style, self.own_labels = old, True
            # else any synthesized images (the new teachers'), re-labelled with random old styles per step
            pooled = {k: np.concatenate([r[k] for r in by_style.values()]) for k in next(iter(by_style.values()))}
            if self.own_labels:  # interleave the styles (row 0 of each, row 1 of each, ...): every batch holds all of them
                within = np.concatenate([np.arange(len(r["latents"])) for r in by_style.values()])
                order = np.lexsort((pooled["style"], within))
                pooled = {k: v[order] for k, v in pooled.items()}
            return [cached_stream(pooled, size, *self._stream_args, "synthesized samples", self._consumed)]
        missing = [i for i in hosted if i not in by_style]
        if missing:
            raise TrainingInputError(f"the synthesized set has no samples of style(s) {missing}")
        replica, replicas = self._replica()
        if replicas > 1:  # every worker reads the whole set: the replicas of a group took the same rows, with the same noise, each step
            by_style = {i: _share(rows, replica, replicas) for i, rows in by_style.items()}
        self._by_style = by_style
        return [cached_stream(by_style[i], size, *self._stream_args, f"style {i}'s synthesized samples", self._consumed) for i in hosted]

    def _replica(self) -> tuple[int, int]:
        """(this worker's index among the workers hosting its teachers, how many do: scaling.workers_per_teacher).
        They are DDP replicas of one teacher group; each trains on its own share (rows replica, replica + count,
        ...) of the group's synthesized sets, as the common stream's split gives each its own rows."""
        same = [r.rank for r in self.worker.roles if r.kind == "teacher" and r.teacher_indices == self.role.teacher_indices]
        return same.index(self.worker.rank), len(same)

    def _mixture_streams(self, batch_size: int) -> list[CachedStream] | None:
        """distill.mixture_fraction > 0 on a worker hosting k >= 2 styles: each step every hosted style
        gives `mixture_rows` of its synthesized samples to the mixture block, noised with their own
        seed (not the plain rows' draws of the same images)."""
        fraction = self.worker.cfg.distill.mixture_fraction
        if fraction <= 0 or len(self.role.style_indices) < 2:
            return None
        data_cfg, *rest = self._stream_args
        stream = data_cfg.stream
        own_seed = data_cfg.model_copy(update={"stream": stream.model_copy(update={"seed": stream.seed + MIXTURE_SEED_OFFSET})})
        m = mixture_rows(batch_size, fraction)
        return [cached_stream(self._by_style[i], m, own_seed, *rest, f"style {i}'s mixture samples", self._consumed) for i in self.role.style_indices]

    def _with_mixture(self, batch: dict, ids: torch.Tensor) -> tuple[dict, torch.Tensor]:
        """The plain rows, then the mixture block: (M, k) weights over the hosted teachers (TeacherBank
        order) and the same weights over all N styles for the student; ids of the block: its largest style."""
        from dmm_ray.distill.step import MIXTURE, MIXTURE_STYLES, TEACHER_SLICES, concat_batches

        block = concat_batches([s.next() for s in self.mixture], slices=False)
        hosted = torch.tensor(self.role.style_indices, device=self.device)
        w = mixture_weights(block["noisy_latents"].shape[0], len(self.mixture), self.rng).to(self.device)  # (M, k)
        out = concat_batches([batch, block], slices=False)
        out[TEACHER_SLICES] = batch[TEACHER_SLICES]
        out[MIXTURE] = w
        out[MIXTURE_STYLES] = torch.zeros(w.shape[0], len(self.worker.style_names), device=self.device).index_copy(1, hosted, w)  # (M, N)
        return out, torch.cat([ids, hosted[w.argmax(dim=1)]])

    def _style_batch(self, j: int) -> dict:
        synthetic = self.synthetic[j]
        return join_batches(([self.common.next()] if self.common is not None else []) + ([synthetic.next()] if synthetic is not None else []))

    def _micro_batch(self) -> tuple[dict, torch.Tensor]:
        from dmm_ray.distill.layout import regularizer_style_ids
        from dmm_ray.distill.step import concat_batches

        if self.role.kind == "regularizer":  # a random old style per sample; its own for the previous model's samples
            parts = [self.common.next() for _ in range(self.reads_per_step)] if self.common is not None else []  # as a teacher worker
            if self.synthetic[0] is not None:  # fine-tune: only these; distill (old_style_samples): the synthesized share, last
                parts.append(self.synthetic[0].next())
            batch = join_batches(parts)
            ids = regularizer_style_ids(batch["noisy_latents"].shape[0], len(self.worker.old_styles), self.rng).to(self.device)  # (B,)
            if self.own_labels:  # the previous model's samples (the last part) keep the style they were drawn with
                own = parts[-1]["style"]
                ids[ids.shape[0] - own.shape[0] :] = own.to(self.device)
            return batch, ids
        subs = [self._style_batch(j) for j in range(len(self.role.style_indices))]  # one batch per hosted teacher
        if self.common is not None:
            for _ in range(self.reads_per_step - len(subs)):  # a smaller last teacher group keeps pace with the others
                self.common.next()
        ids = torch.cat(
            [torch.full((b["noisy_latents"].shape[0],), s, dtype=torch.long, device=self.device) for b, s in zip(subs, self.role.style_indices)]
        )
        batch = subs[0] if len(subs) == 1 else concat_batches(subs)
        return self._with_mixture(batch, ids) if self.mixture is not None else (batch, ids)


def _share(rows: dict, replica: int, replicas: int) -> dict:
    """Replica `replica`'s rows of one style's synthesized set: every `replicas`-th row of read_synthesized's
    source-id order (not Ray Data's, which may differ between workers: the shares are disjoint whatever it is)."""
    return {k: v[replica::replicas] for k, v in rows.items()}


def join_batches(parts: list[dict]) -> dict:
    """Common and synthesized rows as one batch; their latents must have one shape."""
    from dmm_ray.distill.step import concat_batches

    if len(parts) == 1:
        return parts[0]
    shapes = {tuple(p["latents"].shape[1:]) for p in parts}
    if len(shapes) > 1:
        raise TrainingInputError(  # the same on every restart: not retried
            f"synthesized latents {sorted(shapes)[-1]} and latent shards {sorted(shapes)[0]} differ in shape: "
            "set synthesis.resolution to the shards' data.encode.resolution"
        )
    return concat_batches(parts, slices=False)
