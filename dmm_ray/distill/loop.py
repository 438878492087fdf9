"""`train_loop_per_worker(config)`: one Ray Train worker of a DMM merge. Reads only its config.

Worker r hosts teacher i = r mod N (frozen, its own text encoder) and a DDP replica of the student
(StyleUNet, base text encoder frozen) and of the discriminator head; with scaling.teachers_per_worker
k > 1 it hosts k teachers in a TeacherBank (distill/teacher_bank.py: LoRAs of one base as adapters
on it, full teachers resident or offloaded). Stages:
  "distill"   score distillation on the common latent stream (paper 3.3-3.4)
  "finetune"  the same objective on the teachers' synthesized samples; worker i reads style i's data
"""

from __future__ import annotations

import itertools
import os
import time
from pathlib import Path

import torch


def _load_student(cfg, stage: str, init_student: str | None, style_names: list[str]):
    from diffusers import UNet2DConditionModel

    from dmm_ray.models.style_unet import StyleUNet

    if init_student:  # fine-tune stage: continue from the distilled student (a folder, or a URI under output_dir)
        from dmm_ray.data import fs as fsu

        with fsu.fetched(init_student) as folder:
            return StyleUNet.from_pretrained(folder)
    adapters = cfg.student.style_adapters
    base = UNet2DConditionModel.from_pretrained(Path(cfg.student.base) / "unet")
    if cfg.incremental.base_merged:
        student = StyleUNet.from_pretrained(Path(cfg.incremental.base_merged) / "unet")
        first = student.add_styles([t.name for t in cfg.teachers], seed=cfg.student.codebook_seed)[0]
    else:
        torch.manual_seed(cfg.student.codebook_seed)  # identical codebook (and adapter) init on every rank
        student = StyleUNet.from_unet(
            base,
            style_names,
            style_init=cfg.student.style_init,
            style_film=cfg.student.style_film,
            adapter_rank=adapters.rank,
            adapter_targets=adapters.targets,
        )
        first = 0
    if student.config.get("style_adapter_rank") and adapters.init == "svd":
        _init_adapters_from_teachers(cfg, student, base, first)
    return student


def _init_adapters_from_teachers(cfg, student, base, first: int) -> None:
    """Each new style's adapters start at its teacher's rank-r weight delta (one teacher in memory
    at a time, on CPU; deterministic, so every rank computes the same start)."""
    from dmm_ray.models.style_adapters import init_from_teachers
    from dmm_ray.teachers import load_teacher

    base_state = base.state_dict()
    for j, spec in enumerate(cfg.teachers):
        kept = init_from_teachers(student, base_state, [load_teacher(spec, device="cpu").unet.state_dict()], first_style=first + j)
        print(
            f"style adapters: {spec.name} starts at rank {student.config.style_adapter_rank}, "
            f"{100 * kept[spec.name]:.0f}% of its teacher's adapted-layer change"
        )


def _mlflow_logger(tracking: dict | None, rank: int):
    """Rank 0's per-step metric logger: a `BufferedMetricLogger`, so an MLflow outage (server down,
    SQLite locked) costs one warning and buffered metrics, never an exception (or a Ray Train retry)."""
    from dmm_ray.tracking import BufferedMetricLogger

    if not tracking or rank != 0 or not tracking.get("run_id"):
        return BufferedMetricLogger(None)
    # A down HTTP server must not stall a step for minutes of MLflow's default retries (user settings win).
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    uri, run_id = tracking["uri"], tracking["run_id"]
    prefix = tracking.get("prefix", "")
    client = None

    def write(entries: list):
        nonlocal client
        from mlflow.entities import Metric
        from mlflow.tracking import MlflowClient

        if client is None:
            client = MlflowClient(uri)
        client.log_batch(run_id, metrics=[Metric(prefix + k, float(v), ts, step) for metrics, step, ts in entries for k, v in metrics.items()])

    return BufferedMetricLogger(write, retry_s=tracking.get("retry_s", 30.0), what=f"MLflow ({uri})")


def _optimizer(student, d, lr: float, steps: int, warmup: int):
    """AdamW over the student (the style codebook + MLP at lr * style_lr_mult) and its lr schedule."""
    from diffusers.optimization import get_scheduler

    # the codebook, MLP and FiLM are new and learn fast; the per-style adapters are UNet weights and keep the UNet's lr
    is_style = lambda n: n.startswith("class_embedding.") and not n.startswith("class_embedding.adapters.")  # noqa: E731
    style = [p for n, p in student.named_parameters() if is_style(n)]
    rest = [p for n, p in student.named_parameters() if not is_style(n)]
    groups = [{"params": rest, "lr": lr}, {"params": style, "lr": lr * d.style_lr_mult}]
    opt = make_adamw(groups, lr, d.weight_decay, getattr(d, "optimizer", "adamw"))
    name = {"constant": "constant_with_warmup", "cosine": "cosine", "linear": "linear"}[d.lr_schedule]
    return opt, get_scheduler(name, opt, num_warmup_steps=warmup, num_training_steps=max(1, steps))


def make_adamw(params, lr: float, weight_decay: float, kind: str = "adamw"):
    """distill.optimizer: adamw | adamw_fused (torch's fused kernel) | adamw8bit (bitsandbytes)."""
    if kind == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if kind == "adamw_fused":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)
    if kind == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError as error:
            raise RuntimeError(
                f"distill.optimizer: adamw8bit needs bitsandbytes, which cannot be imported on this worker "
                f"({error}); pip install bitsandbytes, or use adamw / adamw_fused"
            ) from None
        return bnb.optim.AdamW8bit(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"distill.optimizer: unknown {kind!r}; expected adamw, adamw_fused or adamw8bit")


def _peak_rss_mb() -> float:
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


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
                raise RuntimeError(f"dataset {self.name!r} yielded no batch; it needs at least one full batch per worker")
        self.position += 1
        return batch


def read_synthesized(shard, styles: list[int] | None) -> dict[int, dict]:
    """The synthesized set (paper: 1.5k images/teacher, small) read ONCE into memory, split by style:
    {style: numpy columns}. `styles=None` keeps every style (the regularisation worker)."""
    import numpy as np

    parts: dict[int, list[dict]] = {}
    for batch in shard.iter_batches(batch_size=1024, batch_format="numpy"):
        for style in np.unique(batch["style"]):
            if styles is None or int(style) in styles:
                keep = batch["style"] == style
                parts.setdefault(int(style), []).append({k: v[keep] for k, v in batch.items()})
    return {style: {k: np.concatenate([p[k] for p in chunks]) for k in chunks[0]} for style, chunks in parts.items()}


def cached_stream(rows: dict, batch_size: int, data_cfg, scheduler, empty_ids, device, name: str, consumed: int = 0) -> EpochStream:
    """In-memory rows (numpy columns) in fixed batches, re-noised every epoch (t, eps and dropout
    keyed by the epoch). The position follows from the number of batches already consumed."""
    from dmm_ray.data.stream import noised_batch

    n = len(rows["latents"]) // batch_size
    if n == 0:
        raise RuntimeError(
            f"{name} has {len(rows['latents'])} rows, fewer than a batch of {batch_size}; "
            "synthesize more images (synthesis.images_per_teacher) or lower the batch size"
        )
    batches = [{k: v[i * batch_size : (i + 1) * batch_size] for k, v in rows.items()} for i in range(n)]
    s = data_cfg.stream

    def epoch_batches(ep: int):
        return (
            noised_batch(b, scheduler=scheduler, empty_ids=empty_ids, seed=s.seed, epoch=ep, caption_dropout=s.caption_dropout, device=device)
            for b in batches
        )

    return EpochStream(epoch_batches, name, consumed // n, consumed % n)


def split_batch(batch_size: int, synthetic_fraction: float) -> tuple[int, int]:
    """(rows from the common stream, rows from the style's own synthesized set) of one style's batch."""
    synthetic = int(round(batch_size * synthetic_fraction))
    if synthetic_fraction > 0 and not 0 < synthetic < batch_size:
        raise ValueError(
            f"data.synthetic_fraction={synthetic_fraction} of a batch of {batch_size} leaves "
            f"{synthetic} synthetic rows; use a larger data.stream.batch_size or another fraction"
        )
    return batch_size - synthetic, synthetic


def train_loop_per_worker(config: dict) -> None:
    import ray.train
    import ray.train.torch
    from diffusers.training_utils import EMAModel

    from dmm_ray.config import MergeConfig
    from dmm_ray.data.stream import iter_noised_batches, load_noise_scheduler, load_tokenizer, tokenize
    from dmm_ray.distill.checkpointing import load_training_state, save_training_state, temp_checkpoint_dir
    from dmm_ray.distill.conditioning import conditioner_for, load_base_conditioner, vae_scale_factor
    from dmm_ray.distill.health import agree_on_nonfinite, describe_nonfinite, nonfinite_terms, raise_if_nonfinite
    from dmm_ray.distill.layout import regularizer_style_ids, worker_layout
    from dmm_ray.distill.step import DistillStep, LossSettings, concat_batches
    from dmm_ray.models.discriminator import MultiClassDiscriminator
    from dmm_ray.models.style_unet import StyleUNet, merged_style_names

    cfg = MergeConfig.model_validate(config["merge"])
    stage = config.get("stage", "distill")
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    # Logical CPUs may exceed the cores (a private local Ray declares max(4, cores)): never more threads than cores.
    torch.set_num_threads(cfg.scaling.torch_threads or max(1, min(round(cfg.scaling.cpus_per_worker), os.cpu_count() or 1)))
    d = cfg.distill
    steps, lr = d.steps, d.lr  # this stage's (the driver's stage_config: the fine-tune's own steps and lr)

    # ---- who am I ---------------------------------------------------------------------------
    old_styles: list[str] = []
    if cfg.incremental.base_merged:
        old_styles = merged_style_names(cfg.incremental.base_merged)
    style_names = old_styles + [t.name for t in cfg.teachers]
    roles = worker_layout(
        len(cfg.teachers),
        cfg.workers_per_teacher,
        len(old_styles),
        cfg.regularization_workers > 0,
        teachers_per_worker=cfg.scaling.teachers_per_worker,
    )
    if len(roles) != world:
        raise RuntimeError(f"worker layout has {len(roles)} roles but Ray started {world} workers")
    role = roles[rank]

    # ---- models -----------------------------------------------------------------------------
    base_dir = Path(cfg.student.base)
    # Conditioners: SD1.5 -> one CLIP on the stream's token ids; SDXL -> both encoders, pooled, size ids.
    student_conditioner = load_base_conditioner(base_dir, device)  # the base's text encoder(s), frozen
    if role.kind == "teacher":
        from dmm_ray.distill.teacher_bank import TEACHER_DTYPES, load_teacher_bank

        # k teachers: LoRAs of one base as named adapters on one base, full ones resident or offloaded
        teacher_unets = load_teacher_bank(
            [cfg.teachers[i] for i in role.teacher_indices],
            device,
            lambda parts: conditioner_for(parts, vae_scale_factor(base_dir), device),
            dtype=TEACHER_DTYPES[d.teacher_dtype],
            offload=cfg.scaling.teacher_offload,
            share_lora_base=cfg.scaling.share_lora_base,
        )
        teacher_conditioners, teacher_takes_style = None, False
        print(f"[rank {rank}] teachers: {teacher_unets.describe()} ({d.teacher_dtype})", flush=True)
    else:  # regularisation worker: the frozen previous merged model supervises random old styles
        teacher_unets = [StyleUNet.from_pretrained(Path(cfg.incremental.base_merged) / "unet").requires_grad_(False).eval().to(device)]
        teacher_conditioners, teacher_takes_style = [student_conditioner], True
    student = _load_student(cfg, stage, config.get("init_student"), style_names).to(device).train()
    if d.gradient_checkpointing:
        student.enable_gradient_checkpointing()
    discriminator = None
    if d.lambda_adv > 0:
        from diffusers import UNet2DConditionModel

        torch.manual_seed(cfg.seed + 1)
        discriminator = MultiClassDiscriminator(UNet2DConditionModel.from_pretrained(base_dir / "unet"), len(style_names)).to(device)
    noise_scheduler = load_noise_scheduler(cfg.data)

    ema = EMAModel(student.parameters(), decay=d.ema_decay, use_ema_warmup=d.ema_warmup, power=3 / 4) if d.ema_decay else None
    init_state = config.get("init_state")  # fine-tune: the distill stage's final training state
    warmup = 0 if init_state else min(d.warmup_steps, steps)
    opt_student, lr_scheduler = _optimizer(student, d, lr, steps, warmup)
    opt_disc = make_adamw(discriminator.head.parameters(), d.disc_lr, d.weight_decay, d.optimizer) if discriminator else None

    def restore(state: dict, folder: Path | None, same_stage: bool):
        if folder is not None:
            student.load_state_dict(StyleUNet.from_pretrained(folder / "student").state_dict())
        opt_student.load_state_dict(state["opt_student"])
        if discriminator is not None and state["disc_head"] is not None:
            discriminator.head.load_state_dict(state["disc_head"])
            opt_disc.load_state_dict(state["opt_disc"])
        if ema is not None and state["ema"] is not None:
            ema.load_state_dict(state["ema"])
        if same_stage and state.get("lr_scheduler") is not None:
            lr_scheduler.load_state_dict(state["lr_scheduler"])
        elif not same_stage:  # a new stage continues the optimizer's moments at its own lr
            for group, base_lr in zip(opt_student.param_groups, lr_scheduler.base_lrs):
                group["lr"] = group["initial_lr"] = base_lr

    # ---- resume (FailureConfig restarts and re-submitted jobs land here) ----------------------
    start_step, epoch, skip_batches = 0, 0, 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as folder:
            state = load_training_state(Path(folder))
            restore(state, Path(folder), same_stage=True)
            start_step, epoch, skip_batches = state["step"], state["epoch"], state["batches_in_epoch"]
        print(f"[rank {rank}] resumed from step {start_step} (epoch {epoch}, batch {skip_batches})", flush=True)
    elif init_state:
        from dmm_ray.data import fs as fsu

        with fsu.fetched(init_state) as folder:  # a folder, or a URI under output_dir
            training_state = load_training_state(folder)
        restore(training_state, None, same_stage=False)
        print(f"[rank {rank}] {stage}: continuing the distill stage's discriminator head and optimizer state", flush=True)

    student_ddp = ray.train.torch.prepare_model(student) if world > 1 or device.type == "cuda" else student
    disc_ddp = ray.train.torch.prepare_model(discriminator) if discriminator is not None and (world > 1 or device.type == "cuda") else discriminator
    step_fn = DistillStep(
        student_ddp,
        student_conditioner,
        teacher_unets,
        teacher_conditioners,
        noise_scheduler,
        LossSettings.from_config(d),
        num_styles=len(style_names),
        discriminator=disc_ddp,
        teacher_takes_style=teacher_takes_style,
        autocast_dtype=torch.bfloat16 if d.bf16 else None,
    )
    log = _mlflow_logger(config.get("tracking"), rank)
    if role.kind == "teacher":
        hosts = ", ".join(f"style {style_names[s]!r}, teacher {cfg.teachers[i].source}" for i, s in zip(role.teacher_indices, role.style_indices))
    else:
        hosts = f"regularisation of the old styles, teacher: the previous merged model {cfg.incremental.base_merged}"
    rng = torch.Generator().manual_seed(cfg.seed * 1000 + rank)

    # ---- data ---------------------------------------------------------------------------------
    # Each hosted style's batch: rows of the common stream (distill) plus, with data.synthetic_fraction,
    # rows of its own teacher's synthesized set; the fine-tune reads only the synthesized sets.
    batch_size = cfg.data.stream.batch_size  # rows per hosted style per step, this stage's
    data_cfg = cfg.data
    empty_ids = tokenize(load_tokenizer(data_cfg.tokenizer_path()), [""])[0]  # (L,) the unconditional caption
    consumed = start_step * d.grad_accum  # batches each cached stream has given so far
    common, synthetic = None, [None] * max(1, len(role.style_indices))

    def synthetic_streams(size: int) -> list:
        hosted = list(role.style_indices) if role.kind == "teacher" else None
        by_style = read_synthesized(ray.train.get_dataset_shard("synth"), hosted)
        if hosted is None:  # regulariser: any synthesized images, re-labelled with random old styles per step
            import numpy as np

            pooled = {k: np.concatenate([r[k] for r in by_style.values()]) for k in next(iter(by_style.values()))}
            return [cached_stream(pooled, size, data_cfg, noise_scheduler, empty_ids, device, "synthesized samples", consumed)]
        missing = [i for i in hosted if i not in by_style]
        if missing:
            raise RuntimeError(f"the synthesized set has no samples of style(s) {missing}")
        return [
            cached_stream(by_style[i], size, data_cfg, noise_scheduler, empty_ids, device, f"style {i}'s synthesized samples", consumed)
            for i in hosted
        ]

    # Ray Data's streaming split moves every worker's split into its next epoch together, so every
    # worker must read the same number of common batches per step (else the one that finishes its
    # epoch first waits for the others at the split while they wait for it in DDP's all-reduce: a
    # deadlock). Every worker reads `reads_per_step` batches of `n_common` rows: a teacher worker one
    # per hosted style (a smaller last group drops the extra), the regulariser all of them as its batch.
    reads_per_step = max(len(r.style_indices) for r in roles if r.kind == "teacher")
    if stage == "finetune":
        synthetic = synthetic_streams(batch_size)
    else:
        n_common, n_synth = split_batch(batch_size, data_cfg.synthetic_fraction)
        stream_cfg = data_cfg.model_copy(update={"stream": data_cfg.stream.model_copy(update={"batch_size": n_common})})
        shard = ray.train.get_dataset_shard("train")
        common = EpochStream(
            lambda ep: iter_noised_batches(shard, stream_cfg, epoch=ep, device=device, rank=rank, scheduler=noise_scheduler),
            "train",
            epoch,
            skip_batches,
        )
        if n_synth and role.kind == "teacher":
            synthetic = synthetic_streams(n_synth)

    def style_batch(j: int) -> dict:
        parts = ([common.next()] if common is not None else []) + ([synthetic[j].next()] if synthetic[j] is not None else [])
        if len(parts) == 1:
            return parts[0]
        shapes = {tuple(p["latents"].shape[1:]) for p in parts}
        if len(shapes) > 1:
            raise ValueError(
                f"synthesized latents {sorted(shapes)[-1]} and latent shards {sorted(shapes)[0]} differ in shape: "
                "set synthesis.resolution to the shards' data.encode.resolution"
            )
        return concat_batches(parts, slices=False)

    def next_micro_batch() -> tuple[dict, torch.Tensor]:
        if role.kind == "regularizer":  # a random old style per sample
            if common is None:  # fine-tune: the pooled synthesized samples
                batch = style_batch(0)
            else:
                parts = [common.next() for _ in range(reads_per_step)]
                batch = parts[0] if len(parts) == 1 else concat_batches(parts, slices=False)
            return batch, regularizer_style_ids(batch["noisy_latents"].shape[0], len(old_styles), rng).to(device)
        subs = [style_batch(j) for j in range(len(role.style_indices))]  # one batch per hosted teacher
        if common is not None:
            for _ in range(reads_per_step - len(subs)):  # a smaller last teacher group keeps pace with the others
                common.next()
        ids = torch.cat([torch.full((b["noisy_latents"].shape[0],), s, dtype=torch.long, device=device) for b, s in zip(subs, role.style_indices)])
        return (subs[0] if len(subs) == 1 else concat_batches(subs)), ids

    step = start_step
    started = time.time()
    progress = None
    if rank == 0:
        from tqdm import tqdm

        progress = tqdm(total=steps, initial=start_step, desc=f"{stage}", unit="step", mininterval=5)
    while step < steps:
        micro, styles = [], []
        for _ in range(d.grad_accum):
            batch, ids = next_micro_batch()
            micro.append(batch)
            styles.append(ids)
        if d.fail_at_step is not None and step == d.fail_at_step and rank == min(1, world - 1):
            from dmm_ray.data import fs as fsu

            marker_fs, marker = fsu.resolve(str(fsu.location_join(cfg.output_dir, f".failed_once_{stage}")))
            if not fsu.exists(marker_fs, marker):
                marker_fs.create_dir(marker.rsplit("/", 1)[0], recursive=True)
                fsu.write_bytes_atomic(marker_fs, marker, str(step).encode())
                print(f"[rank {rank}] fault injection: killing this worker at step {step}", flush=True)
                time.sleep(10)  # crash a moment *after* the last checkpoint was reported, as a real fault would
                os._exit(1)
        logs = step_fn.run(micro, styles, opt_student, opt_disc, generator=rng)
        # NaN/Inf stops here, on every worker at the same step, before anything is saved (never retried)
        bad = nonfinite_terms(logs)
        local = describe_nonfinite(bad, stage=stage, step=step + 1, steps=steps, rank=rank, hosts=hosts) if bad else None
        raise_if_nonfinite(agree_on_nonfinite(local, device))
        lr_scheduler.step()
        if ema is not None:
            ema.step(student.parameters())
        step += 1
        if progress is not None:
            progress.update(1)
            progress.set_postfix({k: f"{v:.4f}" for k, v in logs.items() if k.startswith("loss")}, refresh=False)
        rows = sum(s.shape[0] for s in styles)
        synthetic_rows = sum(sum(1 for sid in b["source_ids"] if sid.startswith("synth-")) for b in micro)
        metrics = {
            **logs,
            "step": step,
            "epoch": common.epoch if common else 0,
            "resumed_from": start_step,
            "synthetic_share": synthetic_rows / rows,  # data.synthetic_fraction as it really was
            "lr": opt_student.param_groups[0]["lr"],
            "samples_per_s": (step - start_step) * rows * world / (time.time() - started),
            "peak_rss_mb": _peak_rss_mb(),
        }  # this worker's (rank 0's) process peak
        if device.type == "cuda":
            metrics["peak_gpu_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
        if step % d.log_every == 0 or step == steps:
            log({k: v for k, v in metrics.items() if k not in ("step",)}, step)
        if step % d.checkpoint_every == 0 or step == steps:
            folder = None
            if rank == 0:
                folder = temp_checkpoint_dir()
                final = ema is not None and step == steps
                if final:
                    ema.store(student.parameters())
                    ema.copy_to(student.parameters())  # the saved student is the EMA
                save_training_state(
                    folder,
                    student=student,
                    discriminator=discriminator,
                    opt_student=opt_student,
                    opt_disc=opt_disc,
                    ema=ema,
                    step=step,
                    epoch=common.epoch if common else 0,
                    batches_in_epoch=common.position if common else 0,
                    extra={"lr_scheduler": lr_scheduler.state_dict()},
                )
                if final:
                    ema.restore(student.parameters())
            # the temp folder is removed once Ray Train has persisted it (storage keeps num_to_keep)
            ray.train.report(
                metrics,
                checkpoint=ray.train.Checkpoint.from_directory(str(folder)) if folder else None,
                delete_local_checkpoint_after_upload=True if folder else None,
            )
    log.close()  # buffered metrics of an MLflow outage: written now, or dropped with one warning
    if progress is not None:
        progress.close()
