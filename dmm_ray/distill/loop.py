"""`train_loop_per_worker(config)`: one Ray Train worker of a DMM merge. Reads only its config.

Worker r hosts teacher i = r mod N (frozen, its own text encoder) and a DDP replica of the student
(StyleUNet, base text encoder frozen) and of the discriminator head. Stages:
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

    if init_student:  # fine-tune stage: continue from the distilled student
        return StyleUNet.from_pretrained(init_student)
    if cfg.incremental.base_merged:
        student = StyleUNet.from_pretrained(Path(cfg.incremental.base_merged) / "unet")
        student.add_styles([t.name for t in cfg.teachers], seed=cfg.student.codebook_seed)
        return student
    torch.manual_seed(cfg.student.codebook_seed)  # identical codebook init on every rank
    return StyleUNet.from_unet(UNet2DConditionModel.from_pretrained(Path(cfg.student.base) / "unet"), style_names)


def _mlflow_logger(tracking: dict | None, rank: int):
    if not tracking or rank != 0 or not tracking.get("run_id"):
        return lambda metrics, step: None
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    client, run_id = MlflowClient(tracking["uri"]), tracking["run_id"]
    prefix = tracking.get("prefix", "")

    def log(metrics: dict, step: int):
        now = int(time.time() * 1000)
        client.log_batch(run_id, metrics=[Metric(prefix + k, float(v), now, step) for k, v in metrics.items()])

    return log


def train_loop_per_worker(config: dict) -> None:
    import ray.train
    import ray.train.torch
    from diffusers.training_utils import EMAModel
    from dmm_ray.config import MergeConfig
    from dmm_ray.data.stream import iter_noised_batches, load_noise_scheduler, load_tokenizer, noised_batch, tokenize
    from dmm_ray.distill.conditioning import conditioner_for, load_base_conditioner, vae_scale_factor
    from dmm_ray.distill.checkpointing import load_training_state, save_training_state, temp_checkpoint_dir
    from dmm_ray.distill.layout import regularizer_style_ids, worker_layout
    from dmm_ray.distill.step import DistillStep, LossSettings
    from dmm_ray.models.discriminator import MultiClassDiscriminator
    from dmm_ray.models.style_unet import StyleUNet, merged_style_names
    from dmm_ray.teachers import load_teacher

    cfg = MergeConfig.model_validate(config["merge"])
    stage = config.get("stage", "distill")
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    torch.set_num_threads(max(1, int(cfg.scaling.cpus_per_worker)))
    d = cfg.distill
    steps = config.get("steps", d.steps)

    # ---- who am I ---------------------------------------------------------------------------
    old_styles: list[str] = []
    if cfg.incremental.base_merged:
        old_styles = merged_style_names(cfg.incremental.base_merged)
    style_names = old_styles + [t.name for t in cfg.teachers]
    roles = worker_layout(len(cfg.teachers), cfg.workers_per_teacher, len(old_styles), cfg.regularization_workers > 0)
    if len(roles) != world:
        raise RuntimeError(f"worker layout has {len(roles)} roles but Ray started {world} workers")
    role = roles[rank]

    # ---- models -----------------------------------------------------------------------------
    base_dir = Path(cfg.student.base)
    # Conditioners: SD1.5 -> one CLIP on the stream's token ids; SDXL -> both encoders, pooled, size ids.
    student_conditioner = load_base_conditioner(base_dir, device)  # the base's text encoder(s), frozen
    if role.kind == "teacher":
        teacher = load_teacher(cfg.teachers[role.teacher_index], device=device)
        teacher_unet, teacher_takes_style = teacher.unet, False
        teacher_conditioner = conditioner_for(teacher, vae_scale_factor(base_dir), device)  # the teacher's own encoder(s)
    else:  # regularisation worker: the frozen previous merged model supervises random old styles
        teacher_unet = StyleUNet.from_pretrained(Path(cfg.incremental.base_merged) / "unet").requires_grad_(False).eval().to(device)
        teacher_conditioner, teacher_takes_style = student_conditioner, True
    student = _load_student(cfg, stage, config.get("init_student"), style_names).to(device).train()
    discriminator = None
    if d.lambda_adv > 0:
        from diffusers import UNet2DConditionModel

        torch.manual_seed(cfg.seed + 1)
        discriminator = MultiClassDiscriminator(UNet2DConditionModel.from_pretrained(base_dir / "unet"), len(style_names)).to(device)
    noise_scheduler = load_noise_scheduler(cfg.data)

    ema = EMAModel(student.parameters(), decay=d.ema_decay) if d.ema_decay else None
    opt_student = torch.optim.AdamW(student.parameters(), lr=config.get("lr", d.lr), weight_decay=d.weight_decay)
    opt_disc = torch.optim.AdamW(discriminator.head.parameters(), lr=d.disc_lr, weight_decay=d.weight_decay) if discriminator else None

    # ---- resume (FailureConfig restarts and re-submitted jobs land here) ----------------------
    start_step, epoch, skip_batches = 0, 0, 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as folder:
            state = load_training_state(Path(folder))
            student.load_state_dict(StyleUNet.from_pretrained(Path(folder) / "student").state_dict())
            opt_student.load_state_dict(state["opt_student"])
            if discriminator is not None and state["disc_head"] is not None:
                discriminator.head.load_state_dict(state["disc_head"])
                opt_disc.load_state_dict(state["opt_disc"])
            if ema is not None and state["ema"] is not None:
                ema.load_state_dict(state["ema"])
            start_step, epoch, skip_batches = state["step"], state["epoch"], state["batches_in_epoch"]
        print(f"[rank {rank}] resumed from step {start_step} (epoch {epoch}, batch {skip_batches})", flush=True)

    student_ddp = ray.train.torch.prepare_model(student) if world > 1 or device.type == "cuda" else student
    disc_ddp = ray.train.torch.prepare_model(discriminator) if discriminator is not None and (world > 1 or device.type == "cuda") else discriminator
    step_fn = DistillStep(
        student_ddp, student_conditioner, teacher_unet, teacher_conditioner, noise_scheduler,
        LossSettings(score=d.score, lambda_feat=d.lambda_feat, lambda_adv=d.lambda_adv, grad_clip=d.grad_clip,
                     renoise_max_timestep=d.renoise_max_timestep),
        num_styles=len(style_names), discriminator=disc_ddp, teacher_takes_style=teacher_takes_style,
        autocast_dtype=torch.bfloat16 if d.bf16 else None,
    )
    log = _mlflow_logger(config.get("tracking"), rank)
    rng = torch.Generator().manual_seed(cfg.seed * 1000 + rank)

    # ---- data ---------------------------------------------------------------------------------
    dataset_name = f"synth_{role.style_index}" if stage == "finetune" and role.kind == "teacher" else "train"
    if stage == "finetune" and role.kind == "regularizer":
        dataset_name = "regularizer"
    shard = ray.train.get_dataset_shard(dataset_name)
    data_cfg = cfg.data.model_copy(update={"stream": cfg.data.stream.model_copy(update={"batch_size": config.get("batch_size", cfg.data.stream.batch_size)})})
    empty_ids = tokenize(load_tokenizer(data_cfg.tokenizer_path()), [""])[0]  # (L,) the unconditional caption

    cached: list | None = None

    def batches_from(ep: int, skip: int):
        nonlocal cached
        if stage == "finetune":
            # Synthesized sets are small (paper: 1.5k images/teacher): read the worker's style once and
            # re-noise it every epoch, instead of re-running a Ray Data execution each few steps.
            if cached is None:
                cached = list(shard.iter_batches(batch_size=data_cfg.stream.batch_size, batch_format="numpy", drop_last=True))
            s = data_cfg.stream
            it = (noised_batch(b, scheduler=noise_scheduler, empty_ids=empty_ids, seed=s.seed, epoch=ep,
                               caption_dropout=s.caption_dropout, device=device) for b in cached)
        else:
            it = iter_noised_batches(shard, data_cfg, epoch=ep, device=device, rank=rank, scheduler=noise_scheduler)
        return itertools.islice(it, skip, None)  # data position: skip what the checkpoint consumed

    step, batches_in_epoch = start_step, skip_batches
    stream = batches_from(epoch, skip_batches)
    started = time.time()
    progress = None
    if rank == 0:
        from tqdm import tqdm

        progress = tqdm(total=steps, initial=start_step, desc=f"{stage}", unit="step", mininterval=5)
    while step < steps:
        micro, styles = [], []
        while len(micro) < d.grad_accum:
            batch = next(stream, None)
            if batch is None:  # epoch done: the next epoch re-draws t, eps and dropout (keyed by epoch)
                epoch, batches_in_epoch = epoch + 1, 0
                stream = batches_from(epoch, 0)
                batch = next(stream, None)
                if batch is None:
                    raise RuntimeError(f"[rank {rank}] dataset {dataset_name!r} yielded no batch; it needs at least {data_cfg.stream.batch_size * world} rows")
            batches_in_epoch += 1
            b = batch["noisy_latents"].shape[0]
            if role.style_index is not None:
                ids = torch.full((b,), role.style_index, dtype=torch.long, device=device)
            else:  # regulariser: a random old style per sample
                ids = regularizer_style_ids(b, len(old_styles), rng).to(device)
            micro.append(batch)
            styles.append(ids)
        if d.fail_at_step is not None and step == d.fail_at_step and rank == min(1, world - 1):
            marker = Path(cfg.output_dir) / f".failed_once_{stage}"
            if not marker.exists():
                marker.parent.mkdir(parents=True, exist_ok=True)
                marker.write_text(str(step))
                print(f"[rank {rank}] fault injection: killing this worker at step {step}", flush=True)
                time.sleep(10)  # crash a moment *after* the last checkpoint was reported, as a real fault would
                os._exit(1)
        logs = step_fn.run(micro, styles, opt_student, opt_disc, generator=rng)
        if ema is not None:
            ema.step(student.parameters())
        step += 1
        if progress is not None:
            progress.update(1)
            progress.set_postfix({k: f"{v:.4f}" for k, v in logs.items() if k.startswith("loss")}, refresh=False)
        metrics = {**logs, "step": step, "epoch": epoch, "resumed_from": start_step,
                   "samples_per_s": step and (step - start_step) * b * d.grad_accum * world / (time.time() - started)}
        if step % d.log_every == 0 or step == steps:
            log({k: v for k, v in metrics.items() if k not in ("step",)}, step)
        if step % d.checkpoint_every == 0 or step == steps:
            folder = None
            if rank == 0:
                folder = temp_checkpoint_dir()
                final_student = student
                if ema is not None and step == steps:
                    ema.store(student.parameters())
                    ema.copy_to(student.parameters())  # the saved student is the EMA
                save_training_state(folder, student=final_student, discriminator=discriminator, opt_student=opt_student,
                                    opt_disc=opt_disc, ema=ema, step=step, epoch=epoch, batches_in_epoch=batches_in_epoch)
                if ema is not None and step == steps:
                    ema.restore(student.parameters())
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(folder)) if folder else None)
    if progress is not None:
        progress.close()
