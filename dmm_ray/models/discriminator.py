"""Multi-class discriminator (paper eq. 11, supplementary A.2; design after DMD2 / SDXL-Lightning).

Backbone: a *frozen* copy of the student base UNet, run up to its mid block on the re-noised
x0 estimate. Frozen and identical on every worker because (a) the discriminator is a DDP replica
shared by all styles, so its backbone cannot be teacher-specific; (b) a trainable UNet backbone
would double optimiser memory for little gain: DMD2 also trains only the head. The base (not a
teacher) is the neutral feature space in which all styles are compared.
Head: (conv3x3 -> GroupNorm -> SiLU) x 2 -> global average pool -> Linear to 2N logits;
classes 0..N-1 are "real" (teacher) styles, N..2N-1 "fake" (student) styles.
"""

from __future__ import annotations

import copy

import torch
from diffusers import UNet2DConditionModel
from torch import nn


class _StopForward(Exception):
    def __init__(self, output):
        self.output = output


class MultiClassDiscriminator(nn.Module):
    def __init__(self, backbone: UNet2DConditionModel, num_styles: int, groups: int = 32):
        super().__init__()
        backbone = copy.deepcopy(backbone)
        if hasattr(backbone, "style_context"):  # a StyleUNet: use its plain UNet behaviour
            raise TypeError("discriminator backbone must be a plain UNet2DConditionModel (the student base)")
        backbone.up_blocks = None  # never run: the forward stops after the mid block
        backbone.conv_norm_out = backbone.conv_out = None
        self.backbone = backbone.requires_grad_(False).eval()
        channels = backbone.config.block_out_channels[-1]
        groups = min(groups, channels)
        while channels % groups:
            groups -= 1
        self.head = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1),
            nn.GroupNorm(groups, channels),
            nn.SiLU(),
            nn.Conv2d(channels, channels, 3, padding=1),
            nn.GroupNorm(groups, channels),
            nn.SiLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(channels, 2 * num_styles),
        )
        self.num_styles = num_styles

    def train(self, mode: bool = True):
        super().train(mode)
        self.backbone.eval()  # frozen: no dropout/statistics changes
        return self

    def mid_features(
        self, noisy_x0: torch.Tensor, timesteps: torch.Tensor, encoder_hidden_states: torch.Tensor, added_cond_kwargs: dict | None = None
    ) -> torch.Tensor:
        """Backbone mid-block output (B, C, h/2^k, w/2^k); the forward exits right after it.
        `added_cond_kwargs`: SDXL's text_embeds and time_ids (None for SD1.5)."""

        def stop(_module, _inputs, output):
            raise _StopForward(output)

        handle = self.backbone.mid_block.register_forward_hook(stop)
        try:
            self.backbone(noisy_x0, timesteps, encoder_hidden_states, added_cond_kwargs=added_cond_kwargs)
        except _StopForward as done:
            return done.output
        finally:
            handle.remove()
        raise RuntimeError("backbone has no mid block")

    def forward(self, noisy_x0, timesteps, encoder_hidden_states, added_cond_kwargs=None) -> torch.Tensor:  # -> (B, 2N) logits
        return self.head(self.mid_features(noisy_x0, timesteps, encoder_hidden_states, added_cond_kwargs))
