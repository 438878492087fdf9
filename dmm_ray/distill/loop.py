"""`train_loop_per_worker(config)`: one Ray Train worker of a DMM merge. Reads only its config.

Worker r hosts teacher i = r mod N (frozen, its own text encoder) and a DDP replica of the student
(StyleUNet, base text encoder frozen) and of the discriminator head; with scaling.teachers_per_worker
k > 1 it hosts k teachers in a TeacherBank (distill/teacher_bank.py: LoRAs of one base as adapters
on it, full teachers resident or offloaded). Stages:
  "distill"   score distillation on the common latent stream (paper 3.3-3.4)
  "finetune"  the same objective on the teachers' synthesized samples; worker i reads style i's data
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from dmm_ray.distill.faults import maybe_kill_worker
from dmm_ray.distill.health import TrainingInputError
from dmm_ray.distill.streams import StageBatches
from dmm_ray.process_memory import peak_rss_bytes

if TYPE_CHECKING:
    from dmm_ray.config import MergeConfig, StageConfig
    from dmm_ray.distill.layout import WorkerRole


def train_loop_per_worker(config: dict) -> None:
    """One worker of one stage: build, restore, then step and report until the stage's last step.
    `config`: a `dmm_ray.config.StageConfig`, as JSON (distill/trainer.py::build_trainer)."""
    from dmm_ray.config import StageConfig
    from dmm_ray.tracking import worker_metric_logger

    spec = StageConfig.model_validate(config)
    worker = identify(spec)
    models = build_models(worker, spec.init_student)
    optim = build_optimizers(worker, models, continuing=spec.init_state is not None)
    rng = torch.Generator().manual_seed(worker.cfg.seed * 1000 + worker.rank)  # the regulariser's style ids, the step's draws
    start = restore(worker, models, optim, spec.init_state, rng)  # a Ray Train checkpoint (rng included), or the distill stage's state
    step_fn = build_step(worker, models)
    batches = StageBatches(worker, models.noise_scheduler, start, rng)
    report = Reporter(worker, models, optim, batches, worker_metric_logger(spec.tracking, worker.rank), start.step)
    for step in range(start.step, worker.cfg.distill.steps):
        micro, styles = batches.next_step()  # grad_accum x ({latents, noisy_latents, ...} of (B, 4, h, w), style ids (B,))
        maybe_kill_worker(worker.cfg, worker.stage, step, worker.rank, worker.world)  # test hook: distill.fail_at_step
        logs = step_fn.run(micro, styles, optim.student, optim.disc, generator=rng)
        stop_if_nonfinite(worker, logs, step)  # every worker at the same step, before anything is saved (never retried)
        optim.lr_scheduler.step()
        if models.ema is not None:
            models.ema.step(models.student.parameters())
        report(step + 1, logs, micro, styles)  # progress bar, metrics, a checkpoint every checkpoint_every steps
    if start.step >= worker.cfg.distill.steps:  # a re-run of a finished stage: nothing to train
        report.finished_before()
    report.close()


@dataclass
class Worker:
    """Who this Ray Train worker is: its merge config and stage, rank, device and role."""

    cfg: MergeConfig  # this stage's (trainer.stage_config: the fine-tune's own steps, lr and batch size)
    stage: str  # "distill" | "finetune"
    rank: int
    world: int
    device: torch.device
    roles: list[WorkerRole]  # every rank's (distill/layout.py)
    old_styles: list[str]  # an incremental merge's previous styles (codebook rows 0..len-1)
    style_names: list[str]  # old styles + this merge's teachers

    @property
    def role(self) -> WorkerRole:
        return self.roles[self.rank]

    def hosts(self) -> str:
        role, cfg = self.role, self.cfg
        if role.kind == "teacher":
            return ", ".join(
                f"style {self.style_names[s]!r}, teacher {cfg.teachers[i].source}" for i, s in zip(role.teacher_indices, role.style_indices)
            )
        return f"regularisation of the old styles, teacher: the previous merged model {cfg.incremental.base_merged}"


def identify(spec: StageConfig) -> Worker:
    import ray.train
    import ray.train.torch

    from dmm_ray._quiet import no_loading_bars
    from dmm_ray.distill.layout import worker_layout
    from dmm_ray.models.style_unet import merged_style_names

    no_loading_bars()  # k teachers per worker: k loading bars each, interleaved with the stage's own bar
    cfg = spec.merge
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    # Logical CPUs may exceed the cores (a private local Ray declares max(4, cores)): never more threads than cores.
    torch.set_num_threads(cfg.scaling.torch_threads or max(1, min(round(cfg.scaling.cpus_per_worker), os.cpu_count() or 1)))
    old_styles = merged_style_names(cfg.incremental.base_merged) if cfg.incremental.base_merged else []
    roles = worker_layout(
        len(cfg.teachers),
        cfg.workers_per_teacher,
        len(old_styles),
        cfg.regularization_workers > 0,
        teachers_per_worker=cfg.scaling.teachers_per_worker,
    )
    if len(roles) != world:
        raise RuntimeError(f"worker layout has {len(roles)} roles but Ray started {world} workers")
    return Worker(cfg, spec.stage, rank, world, ray.train.torch.get_device(), roles, old_styles, old_styles + [t.name for t in cfg.teachers])


@dataclass
class Models:
    student: torch.nn.Module  # StyleUNet, trained (unwrapped: checkpoints and the EMA use it)
    student_conditioner: object  # the base's frozen text encoder(s)
    teachers: object  # a TeacherBank (teacher worker) or [previous merged StyleUNet] (regulariser)
    teacher_conditioners: list | None  # None: each teacher brings its own
    teacher_takes_style: bool  # the regulariser's teacher is a StyleUNet
    discriminator: torch.nn.Module | None  # MultiClassDiscriminator (distill.lambda_adv > 0)
    noise_scheduler: object
    ema: object | None  # diffusers EMAModel of the student (distill.ema_decay)


def build_models(worker: Worker, init_student: str | None) -> Models:
    """Teachers first, then the student and discriminator from their own seeds (same init on every rank)."""
    from diffusers.training_utils import EMAModel

    from dmm_ray.data.stream import load_noise_scheduler
    from dmm_ray.distill.conditioning import conditioner_for, load_base_conditioner, vae_scale_factor
    from dmm_ray.models.discriminator import MultiClassDiscriminator
    from dmm_ray.models.style_unet import StyleUNet

    cfg, d, device, rank = worker.cfg, worker.cfg.distill, worker.device, worker.rank
    base_dir = Path(cfg.student.base)
    # Conditioners: SD1.5 -> one CLIP on the stream's token ids; SDXL -> both encoders, pooled, size ids.
    student_conditioner = load_base_conditioner(base_dir, device)  # the base's text encoder(s), frozen
    if worker.role.kind == "teacher":
        from dmm_ray.distill.teacher_bank import TEACHER_DTYPES, load_teacher_bank

        # k teachers: LoRAs of one base as named adapters on one base, full ones resident or offloaded
        teachers = load_teacher_bank(
            [cfg.teachers[i] for i in worker.role.teacher_indices],
            device,
            lambda parts: conditioner_for(parts, vae_scale_factor(base_dir), device),
            dtype=TEACHER_DTYPES[d.teacher_dtype],
            offload=cfg.scaling.teacher_offload,
            share_lora_base=cfg.scaling.share_lora_base,
        )
        teacher_conditioners, teacher_takes_style = None, False
        # the names make each rank's line its own: Ray folds lines that differ only in numbers (its
        # log dedup) and prints the held copy when the job ends, after the results
        names = ", ".join(cfg.teachers[i].name for i in worker.role.teacher_indices)
        print(f"[rank {rank}] teachers {names}: {teachers.describe()} ({d.teacher_dtype})", flush=True)
    else:  # regularisation worker: the frozen previous merged model supervises random old styles
        teachers = [StyleUNet.from_pretrained(Path(cfg.incremental.base_merged) / "unet").requires_grad_(False).eval().to(device)]
        teacher_conditioners, teacher_takes_style = [student_conditioner], True
    student = _load_student(cfg, worker.stage, init_student, worker.style_names, report=rank == 0).to(device).train()
    if d.gradient_checkpointing:
        student.enable_gradient_checkpointing()
    discriminator = None
    if d.lambda_adv > 0:
        from diffusers import UNet2DConditionModel

        torch.manual_seed(cfg.seed + 1)
        discriminator = MultiClassDiscriminator(UNet2DConditionModel.from_pretrained(base_dir / "unet"), len(worker.style_names)).to(device)
    ema = EMAModel(student.parameters(), decay=d.ema_decay, use_ema_warmup=d.ema_warmup, power=3 / 4) if d.ema_decay else None
    return Models(
        student, student_conditioner, teachers, teacher_conditioners, teacher_takes_style, discriminator, load_noise_scheduler(cfg.data), ema
    )


@dataclass
class Optimizers:
    student: torch.optim.Optimizer  # AdamW over the student (style parameters at lr * style_lr_mult)
    disc: torch.optim.Optimizer | None  # AdamW over the discriminator head
    lr_scheduler: object


def build_optimizers(worker: Worker, models: Models, continuing: bool) -> Optimizers:
    """A stage that continues the distill stage's optimizer state (fine-tune) skips the warmup."""
    d = worker.cfg.distill
    opt_student, lr_scheduler = _optimizer(models.student, d, d.lr, d.steps, 0 if continuing else min(d.warmup_steps, d.steps))
    opt_disc = make_adamw(models.discriminator.head.parameters(), d.disc_lr, d.weight_decay, d.optimizer) if models.discriminator else None
    return Optimizers(opt_student, opt_disc, lr_scheduler)


@dataclass
class Start:
    step: int = 0
    epoch: int = 0  # of the common latent stream
    batches_in_epoch: int = 0


def restore(worker: Worker, models: Models, optim: Optimizers, init_state: str | None, rng: torch.Generator) -> Start:
    """Ray Train's checkpoint, or a newer complete one it never recorded (FailureConfig restarts and
    re-submitted jobs land here: the same stage, same position, this rank's `rng` where it left off,
    so a resumed stage ends where an uninterrupted one does; distill/checkpointing.py), else
    `init_state` (fine-tune: the distill stage's discriminator and optimizer moments, at this stage's
    own lr), else a fresh start."""
    from dmm_ray.distill.checkpointing import load_training_state, resume_checkpoint

    checkpoint = resume_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as folder:
            state = load_training_state(Path(folder))
            _load_state(models, optim, state, Path(folder), same_stage=True)
        generators = state.get("generators")  # every rank's (a checkpoint saved before they were: the seeded start)
        if generators is not None and len(generators) == worker.world:
            rng.set_state(generators[worker.rank])
        start = Start(state["step"], state["epoch"], state["batches_in_epoch"])
        print(f"[rank {worker.rank}] resumed from step {start.step} (epoch {start.epoch}, batch {start.batches_in_epoch})", flush=True)
        return start
    if init_state:
        from dmm_ray.data import fs as fsu

        with fsu.fetched(init_state) as folder:  # a folder, or a URI under output_dir
            state = load_training_state(folder)
        _load_state(models, optim, state, None, same_stage=False)
        print(f"[rank {worker.rank}] {worker.stage}: continuing the distill stage's discriminator head and optimizer state", flush=True)
    return Start()


def _load_state(models: Models, optim: Optimizers, state: dict, folder: Path | None, same_stage: bool) -> None:
    from dmm_ray.distill.checkpointing import STUDENT_DIR
    from dmm_ray.models.style_unet import StyleUNet

    if folder is not None:
        models.student.load_state_dict(StyleUNet.from_pretrained(folder / STUDENT_DIR).state_dict())
    optim.student.load_state_dict(state["opt_student"])
    if models.discriminator is not None and state["disc_head"] is not None:
        models.discriminator.head.load_state_dict(state["disc_head"])
        optim.disc.load_state_dict(state["opt_disc"])
    if models.ema is not None and state["ema"] is not None:
        models.ema.load_state_dict(state["ema"])
        # the state is read to the CPU and EMAModel keeps its tensors as given: on the student's device,
        # or a GPU worker's first ema.step mixes devices (the optimizers' load_state_dict moves theirs)
        models.ema.to(device=next(models.student.parameters()).device)
    if same_stage and state.get("lr_scheduler") is not None:
        optim.lr_scheduler.load_state_dict(state["lr_scheduler"])
    elif not same_stage:  # a new stage continues the optimizer's moments at its own lr
        for group, base_lr in zip(optim.student.param_groups, optim.lr_scheduler.base_lrs):
            group["lr"] = group["initial_lr"] = base_lr


def build_step(worker: Worker, models: Models):
    """The DistillStep over DDP replicas of the student and discriminator (several workers or a GPU)."""
    import ray.train.torch

    from dmm_ray.distill.step import DistillStep, LossSettings

    d = worker.cfg.distill
    wrap = worker.world > 1 or worker.device.type == "cuda"
    prepare = lambda m: ray.train.torch.prepare_model(m) if wrap and m is not None else m  # noqa: E731
    return DistillStep(
        prepare(models.student),
        models.student_conditioner,
        models.teachers,
        models.teacher_conditioners,
        models.noise_scheduler,
        LossSettings.from_config(d),
        num_styles=len(worker.style_names),
        discriminator=prepare(models.discriminator),
        teacher_takes_style=models.teacher_takes_style,
        autocast_dtype=torch.bfloat16 if d.bf16 else None,
    )


def stop_if_nonfinite(worker: Worker, logs: dict, step: int) -> None:
    from dmm_ray.distill.health import agree_on_nonfinite, describe_nonfinite, nonfinite_terms, raise_if_nonfinite

    bad = nonfinite_terms(logs)
    steps = worker.cfg.distill.steps
    local = describe_nonfinite(bad, stage=worker.stage, step=step + 1, steps=steps, rank=worker.rank, hosts=worker.hosts()) if bad else None
    raise_if_nonfinite(agree_on_nonfinite(local, worker.device))


class Reporter:
    """After each step: the progress bar (rank 0), metrics to MLflow every log_every steps, and every
    checkpoint_every steps a checkpoint (rank 0 writes it; the last one holds the EMA student)
    reported to Ray Train, which persists it and keeps num_to_keep."""

    def __init__(self, worker: Worker, models: Models, optim: Optimizers, batches: StageBatches, log, start_step: int):
        self.worker, self.models, self.optim, self.batches, self.log = worker, models, optim, batches, log
        self.start_step, self.started = start_step, time.time()
        self.progress = None
        if worker.rank == 0:
            from tqdm import tqdm

            self.progress = tqdm(total=worker.cfg.distill.steps, initial=start_step, desc=worker.stage, unit="step", mininterval=5)

    def __call__(self, step: int, logs: dict, micro: list[dict], styles: list[torch.Tensor]) -> None:
        d, device = self.worker.cfg.distill, self.worker.device
        if self.progress is not None:
            self.progress.update(1)
            self.progress.set_postfix({k: f"{v:.4f}" for k, v in logs.items() if k.startswith("loss")}, refresh=False)
        log_now, checkpoint_now = step % d.log_every == 0 or step == d.steps, step % d.checkpoint_every == 0 or step == d.steps
        if not (log_now or checkpoint_now):  # the metrics (a /proc read among them) only when something reads them
            return
        rows = sum(s.shape[0] for s in styles)
        synthetic_rows = sum(sum(1 for sid in b["source_ids"] if sid.startswith("synth-")) for b in micro)
        metrics = {
            **logs,
            "step": step,
            "epoch": self.batches.epoch,
            "resumed_from": self.start_step,
            "synthetic_share": synthetic_rows / rows,  # data.synthetic_fraction as it really was
            "lr": self.optim.student.param_groups[0]["lr"],
            "samples_per_s": (step - self.start_step) * rows * self.worker.world / (time.time() - self.started),
            "peak_rss_mb": peak_rss_bytes() / 2**20,  # this worker's (rank 0's) process peak
        }
        if device.type == "cuda":
            metrics["peak_gpu_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
        if log_now:
            self.log({k: v for k, v in metrics.items() if k != "step"}, step)
        if checkpoint_now:
            from dmm_ray.distill.checkpointing import report

            report(metrics, self._checkpoint(step, final=step == d.steps))

    def finished_before(self) -> None:
        """A stage resumed at its last step: report its final state once more, as the stage's result
        (Ray Train may never have recorded that checkpoint: distill/checkpointing.py), with
        resumed_from = the last step. No metric is logged: the curves end where the training did."""
        from dmm_ray.distill.checkpointing import report

        steps = self.worker.cfg.distill.steps
        report({"step": steps, "epoch": self.batches.epoch, "resumed_from": self.start_step}, self._checkpoint(steps, final=True))

    def _checkpoint(self, step: int, final: bool) -> Path | None:
        """Every rank: its generator's state to rank 0, which writes the checkpoint folder (None elsewhere)."""
        from dmm_ray.distill.checkpointing import generator_states

        generators = generator_states(self.batches.rng, self.worker.device)
        return self._save(step, final, generators) if self.worker.rank == 0 else None

    def _save(self, step: int, final: bool, generators: list[torch.Tensor]) -> Path:
        from dmm_ray.distill.checkpointing import save_training_state, temp_checkpoint_dir

        models, optim = self.models, self.optim
        with temp_checkpoint_dir() as folder:  # removed if the write fails
            swap_ema = models.ema is not None and final
            if swap_ema:
                models.ema.store(models.student.parameters())
                models.ema.copy_to(models.student.parameters())  # the saved student is the EMA
            save_training_state(
                folder,
                student=models.student,
                discriminator=models.discriminator,
                opt_student=optim.student,
                opt_disc=optim.disc,
                ema=models.ema,
                step=step,
                epoch=self.batches.epoch,
                batches_in_epoch=self.batches.position,
                extra={"lr_scheduler": optim.lr_scheduler.state_dict(), "generators": generators},
            )
            if swap_ema:
                models.ema.restore(models.student.parameters())
        return folder

    def close(self) -> None:
        self.log.close()  # buffered metrics of an MLflow outage: written now, or dropped with one warning
        if self.progress is not None:
            self.progress.close()


# ---- the pieces the builders use ------------------------------------------------------------
def _load_student(cfg, stage: str, init_student: str | None, style_names: list[str], report: bool = True):
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
        _init_adapters_from_teachers(cfg, student, base, first, report)
    return student


def _init_adapters_from_teachers(cfg, student, base, first: int, report: bool = True) -> None:
    """Each new style's adapters start at its teacher's rank-r weight delta (one teacher in memory
    at a time, on CPU; deterministic, so every rank computes the same start, and one rank, `report`,
    says how much of each teacher's change the start keeps)."""
    from dmm_ray.models.style_adapters import init_from_teachers
    from dmm_ray.teachers import load_teacher

    base_state = base.state_dict()
    for j, spec in enumerate(cfg.teachers):
        kept = init_from_teachers(student, base_state, [load_teacher(spec, device="cpu").unet.state_dict()], first_style=first + j)
        if report:
            print(
                f"style adapters: {spec.name} starts at rank {student.config.style_adapter_rank}, "
                f"{100 * kept[spec.name]:.0f}% of its teacher's adapted-layer change"
            )


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
            raise TrainingInputError(
                f"distill.optimizer: adamw8bit needs bitsandbytes, which cannot be imported on this worker "
                f"({error}); pip install bitsandbytes, or use adamw / adamw_fused"
            ) from None
        return bnb.optim.AdamW8bit(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"distill.optimizer: unknown {kind!r}; expected adamw, adamw_fused or adamw8bit")
