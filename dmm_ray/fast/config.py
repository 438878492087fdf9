"""`fast:` — the few-step model's settings (latent consistency distillation of a merged model).

A leaf module (pydantic only, no torch): read by `dmm_ray.config.MergeConfig` (a merge with
`fast.enabled: true` ends with this stage) and by `jobs/fast.py` (on an existing merged model).
"""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..data.config import split_batch
from ..defaults import FEW_STEP_SCHEDULERS

# diffusers' examples/consistency_distillation/train_lcm_distill_lora_sd_wds.py: its default LoRA targets
LCM_LORA_TARGETS = [
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "proj_in",
    "proj_out",
    "ff.net.0.proj",
    "ff.net.2",
    "conv1",
    "conv2",
    "conv_shortcut",
    "downsamplers.0.conv",
    "upsamplers.0.conv",
    "time_emb_proj",
]


class FastConfig(BaseModel):
    """LCM (Luo et al. 2023) on the merged model: teacher = the frozen merged StyleUNet with CFG, ODE
    solver = DDIM over `num_ddim_timesteps` of its schedule, every example with its own uniformly
    drawn style (the same for teacher, student and target)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    enabled: bool = Field(False, description="a merge runs this stage after saving (and evaluating) the merged model")
    mode: Literal["lora", "full"] = Field(
        "lora",
        description="lora: a LoRA on the merged UNet (the merged weights stay "
        "frozen; fused into the saved model and also saved alone); full: every UNet "
        "weight but the style codebook trains, with an EMA target network",
    )
    lora_rank: int = Field(64, ge=1, description="LoRA rank (reference: 64)")
    lora_alpha: Optional[float] = Field(None, gt=0, description="LoRA alpha (default: lora_rank, i.e. scale 1)")
    lora_targets: list[str] = Field(
        default_factory=lambda: list(LCM_LORA_TARGETS), description="module-name suffixes that get a LoRA (the reference script's list)"
    )
    steps: int = Field(1000, ge=1, description="optimizer steps")
    lr: float = Field(1e-4, gt=0, description="AdamW learning rate (reference: 1e-4 for LoRA; use ~1e-5 for full)")
    weight_decay: float = Field(0.0, ge=0)
    lr_warmup_steps: int = Field(0, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    batch_size: Optional[int] = Field(None, ge=1, description="examples per worker per step (default: data.stream.batch_size)")
    num_ddim_timesteps: int = Field(50, ge=2, description="DDIM solver grid: the teacher takes one DDIM step of 1000/N timesteps")
    solver_substeps: int = Field(
        1,
        ge=1,
        description="the teacher crosses each skip of 1000/num_ddim_timesteps timesteps in this many equal DDIM sub-steps "
        "(each a CFG teacher call): 1 is the reference's single DDIM step; more follow the teacher's ODE more closely",
    )
    guidance_min: float = Field(
        5.0, ge=1, description="teacher CFG scale range, as a pipeline's guidance_scale (LCM's w = scale - 1); min == max: one fixed scale"
    )
    guidance_max: float = Field(5.0, ge=1)
    loss: Literal["huber", "l2"] = Field("huber", description="consistency loss (reference: huber)")
    huber_c: float = Field(0.001, gt=0)
    timestep_scaling: float = Field(10.0, gt=0, description="boundary-condition timestep scaling (LCMScheduler's default 10)")
    ema_decay: float = Field(
        0.95,
        gt=0,
        lt=1,
        description="full mode: target network EMA rate (reference full LCM: 0.95); "
        "lora mode has no target network (the reference LCM-LoRA uses the student itself)",
    )
    saved_ema_decay: Optional[float] = Field(
        None,
        gt=0,
        lt=1,
        description="save an EMA of the trained weights (diffusers EMAModel, decay ramping up as 1-(1+step)^-3/4) instead of "
        "the last step's; None: the last step's, as the reference. Not the target network (fast.ema_decay)",
    )
    caption_dropout: float = Field(
        0.0, ge=0, lt=1, description="captions replaced by '' (the reference: none; the teacher's CFG already sees the unconditional branch)"
    )
    synthetic_fraction: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="share of each batch taken from the merge's synthesized "
        "sets (each row with the style of the teacher that drew it, the rest uniform): "
        "the styled states a few-step sampler visits, not only noised base images",
    )
    synthetic_source: Literal["teachers", "merged"] = Field(
        "teachers",
        description="where the synthesized rows come from. teachers: the merge's synthesized sets (fast.synthesized); "
        "merged: before training the stage samples the merged model itself, every style, with the merge's synthesis "
        "sampler and prompts (synthesis.*), into <fast output>/synthesized: the trajectories the distilled teacher follows",
    )
    synthetic_images: Optional[int] = Field(
        None, ge=1, description="synthetic_source merged: images per style (default: synthesis.images_per_teacher)"
    )
    synthesized: Optional[str] = Field(
        None,
        description="folder (or URI) of the merge's synthesized sets (style_<i>/ shards); default: <merged model>/../synthesized, "
        "where a merge writes them (a merge into an output_dir URI: <output_dir>/synthesized there)",
    )
    rollout_steps: int = Field(
        0,
        ge=0,
        description="extension (not in the paper or LCM): optimizer steps after the LCM steps in which the student runs its own "
        "sampler (fast.sampler at fast.rollout_sampler_steps, CFG off) from the noise of a merged-model sample and the endpoint "
        "is pulled to that sample, through every step of the chain (backward distillation); 0: off",
    )
    rollout_sampler_steps: Optional[list[int]] = Field(
        None,
        description="sampler step counts the rollout steps train, taken in turn (e.g. [2, 4]); default: [fast.num_inference_steps]. "
        "The pairs: the merged model's own samples, fast.synthetic_images (else synthesis.images_per_teacher) per style",
    )
    rollout_lr: Optional[float] = Field(None, gt=0, description="learning rate of the rollout steps (default: fast.lr)")
    rollout_batch_size: Optional[int] = Field(None, ge=1, description="pairs per worker per rollout step (default: fast.batch_size)")
    num_workers: int = Field(1, ge=1, description="Ray Train workers (DDP); each holds the teacher and the student")
    checkpoint_every: int = Field(100, ge=1)
    log_every: int = Field(10, ge=1)
    seed: int = 0
    sampler: Literal[tuple(FEW_STEP_SCHEDULERS)] = Field(  # one list of samplers: the table in defaults
        "tcd",
        description="the saved model's scheduler. tcd: TCDScheduler at gamma (the pipeline's eta) 0, deterministic: each step "
        "re-noises the student's x0 with its own predicted noise, so it stays on one trajectory (measured nearer the teachers "
        "at every step count: README 'Few-step model'); lcm: LCMScheduler, fresh noise at each step (the LCM paper's sampler)",
    )
    num_inference_steps: int = Field(4, ge=1, description="the saved model's default steps (pipeline, Serve)")
    guidance_scale: float = Field(1.0, ge=0, description="the saved model's default CFG at sampling (1: off, the guidance is distilled in)")
    eval_steps: list[int] = Field(default_factory=lambda: [2, 4, 8], description="step counts evaluated (FIDt) after training")
    output_dir: Optional[str] = Field(None, description="default: <output_dir>/fast (model in <...>/model)")

    @property
    def rollout_step_counts(self) -> list[int]:
        """The sampler step counts the rollout steps train: fast.rollout_sampler_steps, else the saved model's."""
        return list(self.rollout_sampler_steps or [self.num_inference_steps])

    def batch_split(self, stream_batch_size: int) -> tuple[int, int]:
        """(rows of the latent shards, synthesized rows) of one batch (fast.batch_size, default the
        merge's data.stream.batch_size); a ValueError naming fast.* when a fraction leaves no row of either."""
        return split_batch(self.batch_size or stream_batch_size, self.synthetic_fraction, ("fast.synthetic_fraction", "fast.batch_size"))

    @property
    def samples_merged_model(self) -> bool:
        """Whether the stage samples the merged model first (synthetic_source merged, or the rollout pairs)."""
        return (self.synthetic_fraction > 0 and self.synthetic_source == "merged") or self.rollout_steps > 0

    @model_validator(mode="after")
    def _check(self) -> "FastConfig":
        if self.guidance_min > self.guidance_max:
            raise ValueError(f"fast.guidance_min {self.guidance_min} is above fast.guidance_max {self.guidance_max}")
        if self.synthetic_source != "teachers" and self.synthetic_fraction == 0:
            raise ValueError(f"fast.synthetic_source={self.synthetic_source} takes no rows at fast.synthetic_fraction 0: set a fraction (e.g. 0.5)")
        most = max([self.num_inference_steps, *self.eval_steps, *self.rollout_step_counts])
        if most > self.num_ddim_timesteps:  # the saved TCD/LCM scheduler samples at most its original_inference_steps
            raise ValueError(
                f"fast.num_ddim_timesteps {self.num_ddim_timesteps} is below the {most} sampling steps asked for "
                f"(num_inference_steps, eval_steps, rollout_sampler_steps): the model could not sample them; use at least {most}"
            )
        if self.eval_steps and min(self.eval_steps) < 1:  # [] evaluates nothing
            raise ValueError(f"fast.eval_steps {self.eval_steps}: give step counts >= 1, e.g. [2, 4, 8] (or [] for no evaluation)")
        if self.rollout_sampler_steps is not None and (not self.rollout_sampler_steps or min(self.rollout_sampler_steps) < 1):
            raise ValueError(f"fast.rollout_sampler_steps {self.rollout_sampler_steps}: give one or more step counts >= 1, e.g. [2, 4]")
        if self.rollout_steps and self.sampler != "tcd":
            raise ValueError(
                f"fast.rollout_steps needs a deterministic sampler to backpropagate through: fast.sampler=tcd (gamma 0), not {self.sampler!r}"
            )
        if not self.lora_targets and self.mode == "lora":
            raise ValueError("fast.lora_targets: give at least one module-name suffix")
        return self
