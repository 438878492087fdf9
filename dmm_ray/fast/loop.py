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


def saved_ema_of(params: list, fast):
    """diffusers' EMAModel over the trainable parameters (fast.saved_ema_decay), or None."""
    if not fast.saved_ema_decay:
        return None
    from diffusers.training_utils import EMAModel

    return EMAModel(params, decay=fast.saved_ema_decay, use_ema_warmup=True, power=3 / 4)


def load_saved_ema(ema, state: dict, source: str) -> None:
    """The checkpoint's EMA into `ema`, or a clear error when it was trained without one."""
    if not state.get("saved_ema"):
        raise RuntimeError(f"fast.saved_ema_decay is set but {source} holds no EMA (trained without it): unset it, or train anew")
    device = ema.shadow_params[0].device  # the parameters' (the EMA is made from them)
    ema.load_state_dict(state["saved_ema"])
    # a checkpoint is read to the CPU and EMAModel keeps the tensors as given: a GPU worker's next ema.step mixed devices
    ema.to(device=device)


def synthesized_rows(shard, num_styles: int, seed: int) -> dict:
    """The synthesized sets read whole (numpy columns, `style` = the drawing teacher's index), every
    style pooled and shuffled once with `seed`, so each batch mixes styles."""
    import numpy as np

    from dmm_ray.distill.health import TrainingInputError
    from dmm_ray.distill.streams import read_synthesized

    by_style = read_synthesized(shard, None)
    if not by_style:  # the same on every restart: TrainingInputError, not retried
        raise TrainingInputError("fast.synthetic_fraction > 0 but the synthesized sets are empty")
    bad = sorted(i for i in by_style if not 0 <= i < num_styles)
    if bad:
        raise TrainingInputError(
            f"the synthesized sets have style indices {bad}, outside the merged model's {num_styles} styles: "
            "give fast.synthesized of the merge that produced this model"
        )
    pooled = {k: np.concatenate([by_style[i][k] for i in sorted(by_style)]) for k in next(iter(by_style.values()))}
    order = np.random.default_rng(seed).permutation(len(pooled["latents"]))
    return {k: v[order] for k, v in pooled.items()}


def load_models(model_dir: Path, f, device) -> tuple:
    """(teacher, student, its trainable parameters, target or None, conditioner, scheduler), all read from the merged
    model folder `model_dir` under a reader marker (output_lock.reading), as load_dmm_pipeline reads one: a merge
    saving into that output_dir meanwhile waits for this load, so a worker never pairs one model's UNet with another's
    text encoder (a Ray Train restart loads again)."""
    from diffusers import DDPMScheduler

    from dmm_ray.distill.conditioning import load_base_conditioner
    from dmm_ray.models.style_unet import StyleUNet
    from dmm_ray.output_lock import reading

    with reading(model_dir, job="few-step worker"):
        teacher = StyleUNet.from_pretrained(model_dir / "unet").requires_grad_(False).eval().to(device)
        student, params = build_student(model_dir, f)
        student.to(device).train()
        target = None
        if f.mode == "full":  # the LCM target network: an EMA of the student
            target = StyleUNet.from_pretrained(model_dir / "unet").requires_grad_(False).eval().to(device)
        conditioner = load_base_conditioner(model_dir, device)  # the merged model's own text encoder, frozen
        scheduler = DDPMScheduler.from_pretrained(model_dir / "scheduler")
    return teacher, student, params, target, conditioner, scheduler


def train_fast_per_worker(config: dict) -> None:
    import ray.train
    import ray.train.torch

    from dmm_ray._quiet import no_loading_bars
    from dmm_ray.config import MergeConfig
    from dmm_ray.data.stream import iter_noised_batches, load_tokenizer, tokenize
    from dmm_ray.distill.checkpointing import resume_checkpoint
    from dmm_ray.distill.streams import EpochStream, cached_stream, join_batches
    from dmm_ray.fast.lcm import ConsistencyObjective, LCMSettings, update_ema
    from dmm_ray.tracking import worker_metric_logger

    no_loading_bars()
    cfg = MergeConfig.model_validate(config["merge"])
    f = cfg.fast
    model_dir = Path(config["model"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    cpus = cfg.scaling.cpus_per_worker if isinstance(cfg.scaling.cpus_per_worker, (int, float)) else 1
    torch.set_num_threads(cfg.scaling.torch_threads or max(1, min(round(cpus), os.cpu_count() or 1)))
    torch.manual_seed(f.seed)  # identical LoRA init on every rank

    teacher, student, params, target, conditioner, scheduler = load_models(model_dir, f, device)
    num_styles = teacher.num_styles
    opt = torch.optim.AdamW(params, lr=f.lr, weight_decay=f.weight_decay)
    from diffusers.optimization import get_scheduler

    lr_scheduler = get_scheduler("constant_with_warmup", opt, num_warmup_steps=min(f.lr_warmup_steps, f.steps))
    saved_ema = saved_ema_of(params, f)  # what the save keeps (fast.saved_ema_decay), or None: the last weights

    start_step, epoch, position = 0, 0, 0
    checkpoint = resume_checkpoint()  # Ray Train's, or a newer complete one it never recorded
    if checkpoint:
        with checkpoint.as_directory() as folder:
            state = torch.load(Path(folder) / TRAINABLE, map_location="cpu", weights_only=False)
            load_trainable_state(student, state["student"], f)
            opt.load_state_dict(state["opt"])
            lr_scheduler.load_state_dict(state["lr_scheduler"])
            if target is not None:
                target.load_state_dict(torch.load(Path(folder) / TARGET, map_location="cpu"))
            if saved_ema is not None:
                load_saved_ema(saved_ema, state, f"checkpoint {folder}")
            start_step, epoch, position = state["step"], state["epoch"], state["position"]
        print(f"[rank {rank}] fast: resumed from step {start_step}", flush=True)

    student_ddp = ray.train.torch.prepare_model(student) if world > 1 or device.type == "cuda" else student
    objective = ConsistencyObjective(student_ddp, teacher, scheduler, LCMSettings.from_config(f), target=target)

    batch_size = f.batch_size or cfg.data.stream.batch_size
    n_common, n_synth = f.batch_split(cfg.data.stream.batch_size)  # rows of the latent shards, of the synthesized sets
    stream_cfg = cfg.data.model_copy(
        update={"stream": cfg.data.stream.model_copy(update={"batch_size": n_common, "caption_dropout": f.caption_dropout})}
    )
    shard = ray.train.get_dataset_shard("train")
    stream = EpochStream(
        lambda ep: iter_noised_batches(shard, stream_cfg, epoch=ep, device=device, rank=rank, scheduler=scheduler), "train", epoch, position
    )
    empty_np = tokenize(load_tokenizer(str(model_dir / "tokenizer")), [""])[0]  # (L,)
    empty_ids = torch.from_numpy(empty_np).to(device)
    rng = torch.Generator().manual_seed(f.seed * 1000 + rank)
    synth = None
    if n_synth:  # every style's teacher samples, pooled and shuffled once (a fixed order: resumable by position)
        rows = synthesized_rows(ray.train.get_dataset_shard("synth"), num_styles, seed=f.seed + rank)
        synth = cached_stream(rows, n_synth, stream_cfg, scheduler, empty_np, device, "synthesized samples", consumed=start_step)
    log = worker_metric_logger(config.get("tracking"), rank)
    rollout_phase = None
    if f.rollout_steps:  # after the LCM steps: the student's own sampler, pulled to the merged model's endpoints
        rollout_phase = RolloutPhase(
            student_ddp,
            params,
            model_dir,
            f,
            ray.train.get_dataset_shard("rollout"),
            conditioner,
            f.rollout_batch_size or batch_size,
            num_styles,
            cfg.seed,
            rank,
            device,
        )
        if start_step > f.steps:  # resumed inside the rollout steps: their optimizer too
            rollout_phase.opt.load_state_dict(state["rollout_opt"])

    progress = None
    total = f.steps + f.rollout_steps
    if rank == 0:
        from tqdm import tqdm

        progress = tqdm(total=total, initial=start_step, desc="fast (LCM)", unit="step", mininterval=5)
    step, started = start_step, time.time()
    while step < total:
        if step < f.steps:  # an LCM step
            batch = stream.next()
            style_ids = torch.randint(0, num_styles, (n_common,), generator=rng).to(device)  # uniform over every style
            if synth is not None:  # + rows drawn by a teacher, with that teacher's style
                extra = synth.next()
                style_ids = torch.cat([style_ids, extra["style"].to(device)])
                batch = join_batches([batch, extra])  # latents of another size: a TrainingInputError (not retried), not torch.cat's
            latents = batch["latents"]
            b = latents.shape[0]
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
            loss_value = float(loss.detach())
            metrics = {
                "loss_lcm": loss_value,
                "lr": opt.param_groups[0]["lr"],
                "epoch": stream.epoch,
                "synthetic_share": n_synth / b,
                "samples_per_s": (step + 1 - start_step) * b * world / (time.time() - started),
            }
        else:  # a rollout step (fast.rollout_steps): the student's own sampler, pulled to the merged model's samples
            loss_value = rollout_phase.step(step)
            metrics = {"loss_rollout": loss_value, "lr": rollout_phase.opt.param_groups[0]["lr"]}
            if progress is not None:
                progress.set_description("fast (rollout)", refresh=False)
        if saved_ema is not None:
            saved_ema.step(params)
        step += 1
        metrics["resumed_from"] = start_step
        if progress is not None:
            progress.update(1)
            progress.set_postfix({"loss": f"{loss_value:.4f}"}, refresh=False)
        if step % f.log_every == 0 or step in (f.steps, total):
            log(metrics, step)
        if step % f.checkpoint_every == 0 or step in (f.steps, total):
            _report(rank, step, metrics, student, f, opt, lr_scheduler, stream, saved_ema, target, rollout_phase)
    if start_step >= total:  # a re-run of a finished stage: its final state once more, as the result (no metric logged)
        _report(rank, step, {"resumed_from": start_step}, student, f, opt, lr_scheduler, stream, saved_ema, target, rollout_phase)
    log.close()
    if progress is not None:
        progress.close()


def _report(rank, step, metrics, student, f, opt, lr_scheduler, stream, saved_ema, target, rollout_phase) -> None:
    """A checkpoint (rank 0 writes it) and the step's metrics to Ray Train."""
    from dmm_ray.distill.checkpointing import report, seal, temp_checkpoint_dir

    folder = None
    if rank == 0:
        with temp_checkpoint_dir() as folder:  # removed if the write fails
            torch.save(
                {
                    "student": trainable_state(student, f),
                    "opt": opt.state_dict(),
                    "lr_scheduler": lr_scheduler.state_dict(),
                    "step": step,
                    "epoch": stream.epoch,
                    "position": stream.position,
                    "mode": f.mode,
                    "saved_ema": saved_ema.state_dict() if saved_ema is not None else None,
                    "rollout_opt": rollout_phase.opt.state_dict() if rollout_phase is not None and step > f.steps else None,
                },
                Path(folder) / TRAINABLE,
            )
            if target is not None:
                torch.save({k: v.cpu() for k, v in target.state_dict().items()}, Path(folder) / TARGET)
            seal(folder, step)
    report({**metrics, "step": step}, folder)


class RolloutPhase:
    """The rollout steps (fast.rollout_steps; dmm_ray.fast.rollout): each step draws pairs (the merged
    model's sample and its noise), runs the student's own sampler (at fast.rollout_sampler_steps, taken
    in turn) from the noise with the pair's style and caption, CFG off, and minimises the mean squared
    distance of the two endpoints, the gradient flowing through every sampler step. Its own AdamW at
    fast.rollout_lr; the draws are keyed by (seed, rank, step), so a resumed run draws what the first
    would have. `conditioner`: the loop's frozen text encoder."""

    def __init__(self, student, params, model_dir, f, shard, conditioner, batch_size: int, num_styles: int, seed: int, rank: int, device):
        from dmm_ray.fast.rollout import pair_rows
        from dmm_ray.fast.sampler import few_step_scheduler

        self.student, self.params, self.f, self.rank, self.device = student, params, f, rank, device
        self.conditioner, self.batch_size = conditioner, batch_size
        self.pairs = pair_rows(synthesized_rows(shard, num_styles, seed=seed), seed)
        self.scheduler = few_step_scheduler(model_dir, f)  # its own copy: `rollout` moves its step index
        self.opt = torch.optim.AdamW(params, lr=f.rollout_lr or f.lr, weight_decay=f.weight_decay)

    def step(self, step: int) -> float:
        import torch.nn.functional as F

        from dmm_ray.fast.rollout import pair_batch, rollout, sampler_steps_at

        g = torch.Generator().manual_seed((self.f.seed * 1_000_003 + self.rank) * 1_000_003 + step)
        batch = pair_batch(self.pairs, self.batch_size, g, self.device)
        with torch.no_grad():
            embeds, added = self.conditioner(batch)  # (B, L, D): the frozen text encoder
        x = rollout(self.student, self.scheduler, batch["noise"], embeds, batch["style"], sampler_steps_at(self.f, step), added)  # (B, C, h, w)
        loss = F.mse_loss(x.float(), batch["target"])
        if not torch.isfinite(loss):
            raise FloatingPointError(f"fast: non-finite rollout loss at step {step + 1} (rank {self.rank}); lower fast.rollout_lr")
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, self.f.grad_clip)
        self.opt.step()
        return float(loss.detach())
