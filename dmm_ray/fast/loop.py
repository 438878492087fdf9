"""`train_fast_per_worker(config)`: one Ray Train worker of the LCM distillation. Reads only its config:
{"merge": MergeConfig json, "model": merged folder, "tracking": {uri, run_id} | None}.

Every worker holds the frozen merged UNet (the teacher), the student (LoRA on the merged UNet, or a
full copy) and, in full mode, the EMA target; it reads its split of the latent shards the merge
used and draws a style per example, uniformly.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch

TRAINABLE = "trainable.pt"  # the checkpoint: LoRA (PEFT state dict) or full UNet weights, + optimizer, step
TARGET = "target.pt"


def build_student(model_dir: str | Path, fast):
    """(student StyleUNet, its trainable parameters). LoRA: PEFT adapter on the merged weights."""
    from dmm_ray.fast.lcm import add_lcm_lora, full_trainable
    from dmm_ray.models.style_unet import StyleUNet

    student = StyleUNet.from_pretrained(Path(model_dir) / "unet")
    params = add_lcm_lora(student, fast) if fast.mode == "lora" else full_trainable(student)
    return student, params


def trainable_state(student, fast) -> dict:
    if fast.mode == "lora":
        from peft import get_peft_model_state_dict

        return {k: v.detach().cpu() for k, v in get_peft_model_state_dict(student).items()}
    return {k: v.detach().cpu() for k, v in student.state_dict().items()}


def load_trainable_state(student, state: dict, fast) -> None:
    if fast.mode == "lora":
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(student, state)
        if getattr(result, "unexpected_keys", None):
            raise RuntimeError(f"LoRA checkpoint does not fit the student: unexpected {result.unexpected_keys[:3]}")
    else:
        student.load_state_dict(state)


def train_fast_per_worker(config: dict) -> None:
    import ray.train
    import ray.train.torch
    from diffusers import DDPMScheduler

    from dmm_ray.config import MergeConfig
    from dmm_ray.data.stream import iter_noised_batches, load_tokenizer, tokenize
    from dmm_ray.distill.checkpointing import temp_checkpoint_dir
    from dmm_ray.distill.conditioning import load_base_conditioner
    from dmm_ray.distill.loop import EpochStream, _mlflow_logger
    from dmm_ray.fast.lcm import ConsistencyObjective, LCMSettings, update_ema
    from dmm_ray.models.style_unet import StyleUNet

    cfg = MergeConfig.model_validate(config["merge"])
    f = cfg.fast
    model_dir = Path(config["model"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    cpus = cfg.scaling.cpus_per_worker if isinstance(cfg.scaling.cpus_per_worker, (int, float)) else 1
    torch.set_num_threads(cfg.scaling.torch_threads or max(1, min(round(cpus), os.cpu_count() or 1)))
    torch.manual_seed(f.seed)  # identical LoRA init on every rank

    teacher = StyleUNet.from_pretrained(model_dir / "unet").requires_grad_(False).eval().to(device)
    num_styles = teacher.num_styles
    student, params = build_student(model_dir, f)
    student.to(device).train()
    target = None
    if f.mode == "full":  # the LCM target network: an EMA of the student
        target = StyleUNet.from_pretrained(model_dir / "unet").requires_grad_(False).eval().to(device)
    conditioner = load_base_conditioner(model_dir, device)  # the merged model's own text encoder, frozen
    scheduler = DDPMScheduler.from_pretrained(model_dir / "scheduler")
    opt = torch.optim.AdamW(params, lr=f.lr, weight_decay=f.weight_decay)
    from diffusers.optimization import get_scheduler

    lr_scheduler = get_scheduler("constant_with_warmup", opt, num_warmup_steps=min(f.lr_warmup_steps, f.steps))

    start_step, epoch, position = 0, 0, 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as folder:
            state = torch.load(Path(folder) / TRAINABLE, map_location="cpu", weights_only=False)
            load_trainable_state(student, state["student"], f)
            opt.load_state_dict(state["opt"])
            lr_scheduler.load_state_dict(state["lr_scheduler"])
            if target is not None:
                target.load_state_dict(torch.load(Path(folder) / TARGET, map_location="cpu"))
            start_step, epoch, position = state["step"], state["epoch"], state["position"]
        print(f"[rank {rank}] fast: resumed from step {start_step}", flush=True)

    student_ddp = ray.train.torch.prepare_model(student) if world > 1 or device.type == "cuda" else student
    objective = ConsistencyObjective(student_ddp, teacher, scheduler, LCMSettings.from_config(f), target=target)

    batch_size = f.batch_size or cfg.data.stream.batch_size
    stream_cfg = cfg.data.model_copy(update={"stream": cfg.data.stream.model_copy(update={"batch_size": batch_size, "caption_dropout": f.caption_dropout})})
    shard = ray.train.get_dataset_shard("train")
    stream = EpochStream(lambda ep: iter_noised_batches(shard, stream_cfg, epoch=ep, device=device, rank=rank, scheduler=scheduler),
                         "train", epoch, position)
    empty_ids = torch.from_numpy(tokenize(load_tokenizer(str(model_dir / "tokenizer")), [""])[0]).to(device)  # (L,)
    rng = torch.Generator().manual_seed(f.seed * 1000 + rank)
    log = _mlflow_logger(config.get("tracking"), rank)

    progress = None
    if rank == 0:
        from tqdm import tqdm

        progress = tqdm(total=f.steps, initial=start_step, desc="fast (LCM)", unit="step", mininterval=5)
    step, started = start_step, time.time()
    while step < f.steps:
        batch = stream.next()
        latents = batch["latents"]
        b = latents.shape[0]
        style_ids = torch.randint(0, num_styles, (b,), generator=rng).to(device)  # uniform over every style
        cond = conditioner(batch)
        uncond = conditioner({**batch, "input_ids": empty_ids[None].repeat(b, 1), "captions": [""] * b})
        model_pred, tgt = objective.pair(latents, cond, uncond, style_ids, objective.draw(latents, rng))
        loss = objective.loss(model_pred, tgt)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"fast: non-finite consistency loss at step {step + 1} (rank {rank}); lower fast.lr")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, f.grad_clip)
        opt.step()
        lr_scheduler.step()
        if target is not None:
            update_ema(target.parameters(), student.parameters(), f.ema_decay)
        step += 1
        metrics = {"loss_lcm": float(loss.detach()), "lr": opt.param_groups[0]["lr"], "epoch": stream.epoch, "resumed_from": start_step,
                   "samples_per_s": (step - start_step) * b * world / (time.time() - started)}
        if progress is not None:
            progress.update(1)
            progress.set_postfix({"loss": f"{metrics['loss_lcm']:.4f}"}, refresh=False)
        if step % f.log_every == 0 or step == f.steps:
            log(metrics, step)
        if step % f.checkpoint_every == 0 or step == f.steps:
            folder = None
            if rank == 0:
                folder = temp_checkpoint_dir()
                torch.save({"student": trainable_state(student, f), "opt": opt.state_dict(), "lr_scheduler": lr_scheduler.state_dict(),
                            "step": step, "epoch": stream.epoch, "position": stream.position, "mode": f.mode}, Path(folder) / TRAINABLE)
                if target is not None:
                    torch.save({k: v.cpu() for k, v in target.state_dict().items()}, Path(folder) / TARGET)
            ray.train.report({**metrics, "step": step}, checkpoint=ray.train.Checkpoint.from_directory(str(folder)) if folder else None,
                             delete_local_checkpoint_after_upload=True if folder else None)
    log.close()
    if progress is not None:
        progress.close()
