"""The latent consistency distillation objective (LCM, Luo et al. 2023), for a StyleUNet.

Follows diffusers' examples/consistency_distillation/train_lcm_distill_lora_sd_wds.py step by step
(DDIMSolver, scalings_for_boundary_conditions, the LCM-form CFG), with one addition: every call
of the teacher, the online student and the target takes the example's style (`style_ids`), the
same index for all three, so the consistency target of a "noir" example is the noir trajectory of
the merged model.

Guidance: the merged UNet has no guidance (w) embedding (`time_cond_proj_dim` is None), so, as in
the reference LCM-LoRA script, w is not an input: it is drawn from [guidance_min, guidance_max]
per example (min == max: fixed) and distilled into the weights; the few-step model samples with
CFG off (guidance_scale 1).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def extract_into_tensor(a: torch.Tensor, t: torch.Tensor, ndim: int) -> torch.Tensor:
    return a.gather(-1, t).reshape(t.shape[0], *((1,) * (ndim - 1)))


def scalings_for_boundary_conditions(timestep: torch.Tensor, sigma_data: float = 0.5, timestep_scaling: float = 10.0):
    """(c_skip, c_out) of LCMScheduler.get_scalings_for_boundary_condition_discrete."""
    scaled = timestep_scaling * timestep
    return sigma_data**2 / (scaled**2 + sigma_data**2), scaled / (scaled**2 + sigma_data**2) ** 0.5


class DDIMSolver:
    """The reference's DDIM ODE solver over `ddim_timesteps` of the training schedule's T steps."""

    def __init__(self, alphas_cumprod: torch.Tensor, timesteps: int = 1000, ddim_timesteps: int = 50):
        step_ratio = timesteps // ddim_timesteps
        self.ddim_timesteps = (torch.arange(1, ddim_timesteps + 1) * step_ratio).round().long() - 1  # (N,)
        self.ddim_alpha_cumprods = alphas_cumprod[self.ddim_timesteps]
        self.ddim_alpha_cumprods_prev = torch.cat([alphas_cumprod[:1], alphas_cumprod[self.ddim_timesteps[:-1]]])

    def to(self, device) -> "DDIMSolver":
        for k in ("ddim_timesteps", "ddim_alpha_cumprods", "ddim_alpha_cumprods_prev"):
            setattr(self, k, getattr(self, k).to(device))
        return self

    def ddim_step(self, pred_x0: torch.Tensor, pred_noise: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        prev = extract_into_tensor(self.ddim_alpha_cumprods_prev, index, pred_x0.ndim)
        return prev.sqrt() * pred_x0 + (1.0 - prev).sqrt() * pred_noise


def predicted_x0_and_eps(
    output: torch.Tensor, t: torch.Tensor, sample: torch.Tensor, prediction_type: str, alphas: torch.Tensor, sigmas: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x0, eps) from a UNet output (get_predicted_original_sample / get_predicted_noise)."""
    a, s = extract_into_tensor(alphas, t, sample.ndim), extract_into_tensor(sigmas, t, sample.ndim)
    if prediction_type == "epsilon":
        return (sample - s * output) / a, output
    if prediction_type == "sample":
        return output, (sample - a * output) / s
    if prediction_type == "v_prediction":
        return a * sample - s * output, a * output + s * sample
    raise ValueError(f"prediction_type {prediction_type!r} is not supported (epsilon, sample, v_prediction)")


@dataclass
class LCMSettings:
    num_ddim_timesteps: int = 50
    guidance_min: float = 5.0  # pipeline-style guidance scale; LCM's w = scale - 1
    guidance_max: float = 5.0
    loss: str = "huber"
    huber_c: float = 0.001
    timestep_scaling: float = 10.0
    solver_substeps: int = 1

    @classmethod
    def from_config(cls, fast) -> "LCMSettings":
        return cls(
            fast.num_ddim_timesteps, fast.guidance_min, fast.guidance_max, fast.loss, fast.huber_c, fast.timestep_scaling, fast.solver_substeps
        )


def solver_skip(num_train_timesteps: int, settings) -> int:
    """The timesteps in one solver skip (num_train_timesteps // num_ddim_timesteps), or a ValueError naming
    the setting (FastConfig / LCMSettings) that does not fit the model's schedule."""
    n, k = settings.num_ddim_timesteps, settings.solver_substeps
    if n > num_train_timesteps:
        raise ValueError(
            f"fast.num_ddim_timesteps {n} is above the model's {num_train_timesteps} training timesteps: "
            f"the solver grid is a subset of them; use at most {num_train_timesteps} (the reference: 50)"
        )
    skip = num_train_timesteps // n
    if not 1 <= k <= skip:
        raise ValueError(
            f"fast.solver_substeps {k} must be 1-{skip} (the timesteps in one solver skip: {num_train_timesteps} // fast.num_ddim_timesteps {n})"
        )
    return skip


@dataclass
class Draw:
    """The randomness of one batch: solver index (B,), noise like the latents, LCM-form w (B,)."""

    index: torch.Tensor
    noise: torch.Tensor
    w: torch.Tensor


class ConsistencyObjective:
    """model_pred = f_student(z_{t_{n+k}}, t_{n+k}, c, style);  target = f_target(x_prev, t_n, c, style)
    with x_prev one DDIM step of the CFG teacher (same style) from z_{t_{n+k}}.

    `target=None`: the student itself under no_grad (the reference LCM-LoRA: no target network)."""

    def __init__(self, student, teacher, noise_scheduler, settings: LCMSettings, target=None):
        self.student, self.teacher, self.target = student, teacher, target
        self.s = settings
        self.scheduler = noise_scheduler
        self.prediction_type = noise_scheduler.config.prediction_type
        ac = noise_scheduler.alphas_cumprod.float()
        self.alphas, self.sigmas = ac.sqrt(), (1 - ac).sqrt()
        self.topk = solver_skip(noise_scheduler.config.num_train_timesteps, settings)
        self.solver = DDIMSolver(ac, noise_scheduler.config.num_train_timesteps, settings.num_ddim_timesteps)

    def draw(self, latents: torch.Tensor, generator: torch.Generator | None = None) -> Draw:
        b = latents.shape[0]
        index = torch.randint(0, self.s.num_ddim_timesteps, (b,), generator=generator)
        noise = torch.randn(latents.shape, generator=generator)
        w = self.s.guidance_min - 1 + (self.s.guidance_max - self.s.guidance_min) * torch.rand((b,), generator=generator)
        return Draw(index.to(latents.device), noise.to(latents), w.to(latents))

    def _to(self, device):
        if self.alphas.device != device:
            self.alphas, self.sigmas = self.alphas.to(device), self.sigmas.to(device)
            self.solver.to(device)

    def pair(self, latents, cond: tuple, uncond: tuple, style_ids: torch.Tensor, draw: Draw) -> tuple[torch.Tensor, torch.Tensor]:
        """(model_pred with grad, target without). `cond` / `uncond`: (encoder_hidden_states, added_cond_kwargs)."""
        self._to(latents.device)
        nd = latents.ndim
        index = draw.index
        start = self.solver.ddim_timesteps[index]
        prev_t = (start - self.topk).clamp(min=0)
        c_skip_start, c_out_start = (
            x.reshape(-1, *((1,) * (nd - 1))) for x in scalings_for_boundary_conditions(start.float(), timestep_scaling=self.s.timestep_scaling)
        )
        c_skip, c_out = (
            x.reshape(-1, *((1,) * (nd - 1))) for x in scalings_for_boundary_conditions(prev_t.float(), timestep_scaling=self.s.timestep_scaling)
        )
        z = self.scheduler.add_noise(latents, draw.noise, start)
        embeds, added = cond
        out = self.student(z, start, encoder_hidden_states=embeds, style_ids=style_ids, added_cond_kwargs=added).sample
        x0, _ = predicted_x0_and_eps(out, start, z, self.prediction_type, self.alphas, self.sigmas)
        model_pred = c_skip_start * z + c_out_start * x0
        with torch.no_grad():
            # the teacher with the example's own style, conditional and unconditional (LCM-form CFG)
            x_prev = self.teacher_step(z, start, index, cond, uncond, style_ids, draw.w)
            target_net = self.target if self.target is not None else self.student
            t_out = target_net(x_prev, prev_t, encoder_hidden_states=embeds, style_ids=style_ids, added_cond_kwargs=added).sample
            tx0, _ = predicted_x0_and_eps(t_out, prev_t, x_prev, self.prediction_type, self.alphas, self.sigmas)
            target = c_skip * x_prev + c_out * tx0
        return model_pred, target

    def teacher_step(self, z, start, index, cond: tuple, uncond: tuple, style_ids: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """x at t_n = start - k: the CFG teacher (the example's own style, LCM-form w) integrated from z at
        `start` by `solver_substeps` equal DDIM steps; 1 is the reference's single DDIM step."""
        w = w.reshape(-1, *((1,) * (z.ndim - 1)))
        n = self.s.solver_substeps
        x, t = z, start
        for j in range(1, n + 1):
            t_cond = self.teacher(x, t, encoder_hidden_states=cond[0], style_ids=style_ids, added_cond_kwargs=cond[1]).sample
            t_unc = self.teacher(x, t, encoder_hidden_states=uncond[0], style_ids=style_ids, added_cond_kwargs=uncond[1]).sample
            cx0, ceps = predicted_x0_and_eps(t_cond, t, x, self.prediction_type, self.alphas, self.sigmas)
            ux0, ueps = predicted_x0_and_eps(t_unc, t, x, self.prediction_type, self.alphas, self.sigmas)
            x0, eps = cx0 + w * (cx0 - ux0), ceps + w * (ceps - ueps)
            if j < n:  # a DDIM step to an interior timestep of the skip
                t = start - (self.topk * j) // n  # (B,)
                x = extract_into_tensor(self.alphas, t, x.ndim) * x0 + extract_into_tensor(self.sigmas, t, x.ndim) * eps
        return self.solver.ddim_step(x0, eps, index)  # the last one lands on the solver grid, as the single step does

    def loss(self, model_pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.s.loss == "l2":
            return F.mse_loss(model_pred.float(), target.float())
        c = self.s.huber_c
        return torch.mean(torch.sqrt((model_pred.float() - target.float()) ** 2 + c**2) - c)


@torch.no_grad()
def update_ema(target_params, source_params, rate: float) -> None:
    for targ, src in zip(target_params, source_params):
        targ.detach().mul_(rate).add_(src, alpha=1 - rate)


def add_lcm_lora(unet, fast) -> list[torch.nn.Parameter]:
    """A LoRA (PEFT, through diffusers' `add_adapter`) on the merged UNet; every other weight frozen.
    Returns the trainable LoRA parameters."""
    unet.requires_grad_(False)
    unet.add_adapter(lora_config(unet, fast))
    params = [p for n, p in unet.named_parameters() if "lora_" in n]
    for p in params:
        p.requires_grad_(True)
    return params


def lora_config(unet, fast):
    """The LCM-LoRA's PEFT config, or a ValueError when fast.lora_targets names no layer of `unet` (PEFT's
    own match: a module's name or its dotted suffix). The weights are not read: a meta-device UNet does."""
    from peft import LoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists

    config = LoraConfig(r=fast.lora_rank, lora_alpha=fast.lora_alpha or fast.lora_rank, target_modules=list(fast.lora_targets))
    if not any(check_target_module_exists(config, name) for name, _ in unet.named_modules()):
        from dmm_ray.fast.config import LCM_LORA_TARGETS

        raise ValueError(
            f"fast.lora_targets {list(fast.lora_targets)} matched no layer of the UNet: give suffixes of its module names, "
            f"e.g. the default (the reference's) {LCM_LORA_TARGETS}"
        )
    return config


def full_trainable(unet) -> list[torch.nn.Parameter]:
    """Full mode: every weight trains except the style codebook (kept, so style indices and mixtures
    keep their meaning)."""
    unet.requires_grad_(True)
    unet.class_embedding.codebook.requires_grad_(False)
    return [p for p in unet.parameters() if p.requires_grad]
