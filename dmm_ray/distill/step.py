"""One DMM training step (Algorithm 1, lines 4-18) for one worker's style(s).

Shapes: x_t, eps: (B, 4, h, w); t: (B,); input_ids: (B, L); style_ids: (B,).
A worker may host several teachers (`scaling.teachers_per_worker`): the batch is then the
concatenation of one sub-batch per teacher (`concat_batches`), each teacher runs on its own
slice, and the student runs ONCE on the whole batch with per-sample style ids.
Student and teacher each come with a *conditioner* (`distill/conditioning.py`) that turns the batch
into their own text conditioning: SD1.5 a CLIP text encoder, SDXL two encoders + pooled embedding +
size ids. A plain CLIP text encoder is accepted too. The teacher UNet is a loaded teacher checkpoint
or, on the incremental-merge regularisation worker, the frozen previous merged StyleUNet, which then
also receives `style_ids`.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, fields

import torch
from torch import nn

from dmm_ray.config import DistillConfig
from dmm_ray.distill.conditioning import as_conditioner
from dmm_ray.distill.losses import feature_loss, multiclass_ce_per_sample, predict_x0, renoise, score_loss, timestep_weights
from dmm_ray.models.features import capture_block_features


def _distill_default(name: str):
    return DistillConfig.model_fields[name].default  # one home for every loss default: DistillConfig


@dataclass(frozen=True)
class LossSettings:
    """The loss switches and weights one DistillStep uses; defaults and meanings are DistillConfig's."""

    score: bool = _distill_default("score")
    score_weighting: str = _distill_default("score_weighting")  # "v": weight 1/alpha_bar_t (clipped, mean 1): see losses.timestep_weights
    score_weight_clip: float = _distill_default("score_weight_clip")
    lambda_feat: float = _distill_default("lambda_feat")  # 0 disables feature imitation
    lambda_adv: float = _distill_default("lambda_adv")  # 0 disables the adversarial term and the discriminator step
    grad_clip: float = _distill_default("grad_clip")
    renoise_max_timestep: int = _distill_default("renoise_max_timestep")
    x0_clamp: float = 10.0  # |x0| bound of the x0 predictions the discriminator sees (not a config choice)

    @classmethod
    def from_config(cls, distill: DistillConfig) -> "LossSettings":
        return cls(**{f.name: getattr(distill, f.name) for f in fields(cls) if f.name in DistillConfig.model_fields})


def _unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)


TEACHER_SLICES = "teacher_slices"  # batch key: [(teacher j, start, stop), ...] when a worker hosts several teachers
# distill.mixture_fraction: the batch's last M rows are a mixture block; MIXTURE (M, k) weighs the worker's
# teachers (TeacherBank order) in their target, MIXTURE_STYLES (M, N) the same weights over the student's styles
MIXTURE, MIXTURE_STYLES = "mixture", "mixture_styles"
_ROW_META = (TEACHER_SLICES, MIXTURE, MIXTURE_STYLES)  # batch keys that are not per-row data


def concat_batches(batches: list[dict], slices: bool = True) -> dict:
    """One batch from sub-batches (tensors concatenated on dim 0, lists joined; keys all of them have).
    With `slices`, `teacher_slices` records which rows belong to teacher j = the sub-batch's position."""
    out: dict = {}
    for key in batches[0]:
        if key in _ROW_META or any(key not in b for b in batches):
            continue
        values = [b[key] for b in batches]
        out[key] = torch.cat(values) if torch.is_tensor(values[0]) else [v for part in values for v in part]
    if not slices:
        return out
    slices, start = [], 0
    for j, b in enumerate(batches):
        n = b["noisy_latents"].shape[0]
        slices.append((j, start, start + n))
        start += n
    out[TEACHER_SLICES] = slices
    return out


def slice_batch(batch: dict, start: int, stop: int) -> dict:
    return {k: (v[start:stop] if torch.is_tensor(v) or isinstance(v, list) else v) for k, v in batch.items() if k not in _ROW_META}


def mixture_size(batch: dict) -> int:
    """M: rows of the batch's mixture block (its last rows), 0 without one."""
    mix = batch.get(MIXTURE)
    return 0 if mix is None else mix.shape[0]


def _student_style(batch: dict, style_ids: torch.Tensor, num_styles: int) -> dict:
    """The student's style kwargs: ids, or (with a mixture block) one-hot weights then the block's (B, N)."""
    mix = batch.get(MIXTURE_STYLES)
    if mix is None:
        return {"style_ids": style_ids}
    plain = torch.nn.functional.one_hot(style_ids[: style_ids.shape[0] - mix.shape[0]], num_styles).to(mix)  # (B - M, N)
    return {"style_weights": torch.cat([plain, mix])}  # (B, N)


class DistillStep:
    def __init__(
        self,
        student,
        student_conditioner,
        teacher_unet,
        teacher_conditioner,
        noise_scheduler,
        settings: LossSettings,
        num_styles: int,
        discriminator=None,
        teacher_takes_style: bool = False,
        autocast_dtype: torch.dtype | None = None,
    ):
        """`teacher_unet` / `teacher_conditioner`: one teacher, or equal-length lists (teacher j serves
        the rows of `batch["teacher_slices"]` marked j), or a `TeacherBank` (conditioner None: the
        bank's; LoRA adapters switched / offloaded teachers fetched per sub-batch)."""
        from dmm_ray.distill.teacher_bank import TeacherBank

        self.student, self.student_conditioner = student, as_conditioner(student_conditioner)
        if isinstance(teacher_unet, TeacherBank):
            self.bank = teacher_unet
        else:
            unets = list(teacher_unet) if isinstance(teacher_unet, (list, tuple)) else [teacher_unet]
            conds = list(teacher_conditioner) if isinstance(teacher_conditioner, (list, tuple)) else [teacher_conditioner]
            if len(unets) != len(conds):
                raise ValueError(f"{len(unets)} teacher UNets but {len(conds)} teacher conditioners")
            self.bank = TeacherBank.resident(unets, [as_conditioner(c) for c in conds])
        self.teacher_conditioner = as_conditioner(self.bank.conditioner(0))
        self.noise_scheduler, self.settings, self.num_styles = noise_scheduler, settings, num_styles
        self.discriminator = discriminator if settings.lambda_adv > 0 else None
        self.teacher_takes_style = teacher_takes_style
        self.autocast_dtype = autocast_dtype
        self.alphas_cumprod = noise_scheduler.alphas_cumprod
        self.score_weights = (
            None if settings.score_weighting == "eps" else timestep_weights(self.alphas_cumprod, settings.score_weighting, settings.score_weight_clip)
        )  # (T,)
        if not (settings.score or settings.lambda_feat > 0 or settings.lambda_adv > 0):
            raise ValueError("all losses are switched off: enable score, lambda_feat > 0 or lambda_adv > 0")

    def _autocast(self, device: torch.device):
        if self.autocast_dtype is None or device.type != "cuda":
            return nullcontext()
        return torch.autocast("cuda", dtype=self.autocast_dtype)

    def generator_losses(self, batch: dict, style_ids: torch.Tensor, generator: torch.Generator | None = None):
        """Student losses for one micro-batch; returns (total, terms, x0_student, x0_teacher, student_cond)
        where student_cond = (encoder_hidden_states, added_cond_kwargs) also conditions the discriminator."""
        s = self.settings
        noisy, t = batch["noisy_latents"], batch["timesteps"]
        m = mixture_size(batch)  # the batch's last m rows are a mixture block (distill.mixture_fraction)
        use_feat = s.lambda_feat > 0
        with self._autocast(noisy.device):
            with torch.no_grad():
                student_text, student_added = self.student_conditioner(batch)  # frozen base text encoder(s)
                teacher_eps, teacher_feats = self._teacher_outputs(batch, style_ids, use_feat)
            with capture_block_features(self.student) if use_feat else nullcontext([]) as student_feats:
                style = _student_style(batch, style_ids, self.num_styles)
                student_eps = self.student(noisy, t, student_text, added_cond_kwargs=student_added, **style).sample
            terms: dict[str, torch.Tensor] = {}
            total = student_eps.new_zeros((), dtype=torch.float32)
            if s.score:
                weights = None if self.score_weights is None else self.score_weights.to(t.device)[t]  # (B,)
                terms["score"] = score_loss(student_eps, teacher_eps, weights)
                total = total + terms["score"]
                if m:  # logged only (loss_score_mixture): the mixture block's share of the score term, on its own
                    with torch.no_grad():
                        terms["score_mixture"] = score_loss(student_eps[-m:], teacher_eps[-m:], None if weights is None else weights[-m:])
            if use_feat:
                terms["feat"] = feature_loss(student_feats, teacher_feats)
                total = total + s.lambda_feat * terms["feat"]
            # the discriminator knows N real and N fake classes, no mixtures: it sees the plain rows only
            plain = slice(0, noisy.shape[0] - m)
            noisy, t, style_ids, student_eps, teacher_eps = noisy[plain], t[plain], style_ids[plain], student_eps[plain], teacher_eps[plain]
            student_text = student_text[plain]
            student_added = None if student_added is None else {k: v[plain] for k, v in student_added.items()}
            x0_student = predict_x0(noisy, student_eps, t, self.alphas_cumprod, s.x0_clamp)
            x0_teacher = predict_x0(noisy, teacher_eps, t, self.alphas_cumprod, s.x0_clamp)
            if self.discriminator is not None:
                # Generator term: the student's x0 should be classified as the *real* style i.
                disc = _unwrap(self.discriminator)  # bypass DDP: D must not be synced/updated here
                disc.requires_grad_(False)
                try:
                    noisy_x0, t_d = renoise(x0_student, self.noise_scheduler, generator, s.renoise_max_timestep)
                    logits = disc(noisy_x0, t_d, student_text, student_added)
                finally:
                    disc.head.requires_grad_(True)
                terms["adv"] = multiclass_ce_per_sample(logits, style_ids)
                total = total + s.lambda_adv * terms["adv"]
        if not terms:
            raise ValueError("no loss term is enabled")
        return total, terms, x0_student.detach(), x0_teacher.detach(), (student_text, student_added)

    @torch.no_grad()
    def _teacher_outputs(self, batch: dict, style_ids: torch.Tensor, use_feat: bool):
        """eps_T (B, C, h, w) and the teachers' block features, each teacher on its own rows; the
        mixture block's rows (if any) get sum_j w_j eps_j (and features) of every hosted teacher j,
        each teacher running its own rows and the block in one forward."""
        n = batch["noisy_latents"].shape[0]
        m = mixture_size(batch)
        slices = batch.get(TEACHER_SLICES) or [(0, 0, n - m)]
        eps, feats = [], []
        mix_eps, mix_feats = 0.0, None
        for position, (j, start, stop) in enumerate(slices):
            unet = self.bank.activate(j)  # LoRA: set_adapters; offloaded: weights on the device
            if position + 1 < len(slices):
                self.bank.prefetch(slices[position + 1][0])  # offloaded: the next copy overlaps this forward
            if m:
                sub = concat_batches([slice_batch(batch, start, stop), slice_batch(batch, n - m, n)], slices=False)
            else:
                sub = batch if (start, stop) == (0, n) else slice_batch(batch, start, stop)
            text, added = as_conditioner(self.bank.conditioner(j))(sub)  # (b, L, D): the teacher's own text encoder(s)
            kwargs = {"style_ids": style_ids[start:stop]} if self.teacher_takes_style else {}
            dtype = next(unet.parameters()).dtype  # distill.teacher_dtype: inputs in the teacher's dtype, outputs fp32
            latents = sub["noisy_latents"]
            if dtype != latents.dtype and not torch.is_autocast_enabled(latents.device.type):
                latents, text = latents.to(dtype), text.to(dtype)
                added = None if added is None else {k: v.to(dtype) for k, v in added.items()}
            with capture_block_features(unet) if use_feat else nullcontext([]) as captured:
                out = unet(latents, sub["timesteps"], text, added_cond_kwargs=added, **kwargs).sample.float()
            own = stop - start
            eps.append(out[:own])
            feats.append([f.float()[:own] for f in captured])
            if m:  # the mixture block: this teacher's share of the target
                w = batch[MIXTURE][:, j].view(-1, 1, 1, 1)  # (M, 1, 1, 1)
                mix_eps = mix_eps + w * out[own:]
                maps = [w * f.float()[own:] for f in captured]
                mix_feats = maps if mix_feats is None else [a + b for a, b in zip(mix_feats, maps)]
        if m:
            eps.append(mix_eps)
            feats.append(mix_feats or [])
        if len(eps) == 1:
            return eps[0], feats[0]
        return torch.cat(eps), [torch.cat(maps) for maps in zip(*feats)]

    def discriminator_loss(self, x0_student, x0_teacher, style_ids, cond, generator=None) -> torch.Tensor:
        """CE(D(x0_S), N + i) + CE(D(x0_T), i)   (Algorithm 1, line 17). `cond`: the student's
        (encoder_hidden_states, added_cond_kwargs) from generator_losses, for fake and real alike."""
        s = self.settings
        text, added = cond
        twice = None if added is None else {k: torch.cat([v, v]) for k, v in added.items()}
        with self._autocast(x0_student.device):
            fake, t_f = renoise(x0_student, self.noise_scheduler, generator, s.renoise_max_timestep)
            real, t_r = renoise(x0_teacher, self.noise_scheduler, generator, s.renoise_max_timestep)
            logits = self.discriminator(torch.cat([fake, real]), torch.cat([t_f, t_r]), torch.cat([text, text]), twice)
            fake_logits, real_logits = logits.chunk(2)
            return multiclass_ce_per_sample(fake_logits, style_ids + self.num_styles) + multiclass_ce_per_sample(real_logits, style_ids)

    def run(
        self, micro_batches: list[dict], style_ids_per_batch: list[torch.Tensor], opt_student, opt_disc=None, generator: torch.Generator | None = None
    ) -> dict[str, float]:
        """Gradient accumulation over micro-batches, then one student and one discriminator update."""
        n = len(micro_batches)
        logs: dict[str, float] = {}
        saved = []
        opt_student.zero_grad(set_to_none=True)
        for k, (batch, style_ids) in enumerate(zip(micro_batches, style_ids_per_batch)):
            sync = k == n - 1
            with nullcontext() if sync or not hasattr(self.student, "no_sync") else self.student.no_sync():
                total, terms, x0_s, x0_t, cond = self.generator_losses(batch, style_ids, generator)
                (total / n).backward()
            saved.append((x0_s, x0_t, style_ids[: x0_s.shape[0]], cond))  # x0s of the plain rows (a mixture block comes last)
            for name, value in terms.items():
                logs[f"loss_{name}"] = logs.get(f"loss_{name}", 0.0) + value.item() / n
            logs["loss_total"] = logs.get("loss_total", 0.0) + total.item() / n
        logs["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(self.student.parameters(), self.settings.grad_clip))
        opt_student.step()
        if self.discriminator is not None and opt_disc is not None:
            opt_disc.zero_grad(set_to_none=True)
            for k, (x0_s, x0_t, style_ids, cond) in enumerate(saved):
                sync = k == n - 1
                with nullcontext() if sync or not hasattr(self.discriminator, "no_sync") else self.discriminator.no_sync():
                    d_loss = self.discriminator_loss(x0_s, x0_t, style_ids, cond, generator) / n
                    d_loss.backward()
                logs["loss_disc"] = logs.get("loss_disc", 0.0) + d_loss.item()
            torch.nn.utils.clip_grad_norm_(self.discriminator.parameters(), self.settings.grad_clip)
            opt_disc.step()
        return logs
