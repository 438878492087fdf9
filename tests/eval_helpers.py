"""Small, seeded stand-ins for the evaluation tests (Ray workers import them too: tests/conftest.py
puts tests/ on PYTHONPATH before the shared cluster starts).

- `SeededConvExtractor`: a random-but-fixed CNN implementing the FID extractor protocol.
- `tiny_teacher_pipeline(seed)`: a tiny StableDiffusionPipeline (32 px) from `dmm_ray.tiny`.
- `RoutingStudent`: a "perfect student" that answers `style=i` with teacher i's pipeline, so its
  FID matrix must equal the teacher reference exactly.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


class SeededConvExtractor(nn.Module):
    """(B, 3, H, W) in [0, 1] -> (B, dim) features from a seeded random CNN (+ per-channel means)."""

    def __init__(self, seed: int = 0, dim: int = 16):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.conv1 = nn.Conv2d(3, 16, 3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(16, dim - 3, 3, stride=2, padding=1)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        self.name = f"seeded-cnn:{seed}:{dim}"
        self.calls = 0

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        x = images.float() * 2 - 1  # (B, 3, H, W) in [-1, 1]
        h = torch.relu(self.conv2(torch.relu(self.conv1(x))))  # (B, dim-3, H/4, W/4)
        return torch.cat([h.mean(dim=(2, 3)), images.float().mean(dim=(2, 3))], dim=1)  # (B, dim)


def tiny_teacher_pipeline(seed: int = 0):
    from diffusers import StableDiffusionPipeline

    from dmm_ray.tiny import tiny_sd_components

    return StableDiffusionPipeline(**tiny_sd_components(seed=seed))


class RoutingStudent:
    """Pipeline-like object: `pipe(..., style=name)` runs the named teacher's pipeline."""

    def __init__(self, pipes: dict):
        self.pipes = pipes

    @property
    def styles(self) -> list[str]:
        return list(self.pipes)

    def to(self, device):
        for p in self.pipes.values():
            p.to(device)
        return self

    def set_progress_bar_config(self, **kw):
        for p in self.pipes.values():
            p.set_progress_bar_config(**kw)

    def __call__(self, style=None, style_weights=None, **kwargs):
        if style_weights is not None:
            # Mixture stand-in: the heaviest style's pipeline (enough for plumbing tests).
            style = max(style_weights, key=style_weights.get)
        if style not in self.pipes:
            raise ValueError(f"unknown style {style!r}; known styles: {list(self.pipes)}")
        return self.pipes[style](**kwargs)


def routing_student(names: Sequence[str], seeds: Sequence[int]) -> RoutingStudent:
    return RoutingStudent({n: tiny_teacher_pipeline(s) for n, s in zip(names, seeds)})


def fast_eval_config(root, **kw):
    """An EvalConfig for tiny tests: root/prompts.txt, 1 image per prompt, 2 sampler steps, no Ray,
    the seeded extractor, cache and outputs under root."""
    from dmm_ray.evaluation.config import EvalConfig, SamplerConfig

    base = dict(
        prompts_file=str(root / "prompts.txt"),
        images_per_prompt=1,
        sampler=SamplerConfig(num_inference_steps=2),
        use_ray=False,
        cache_dir=str(root / "cache"),
        output_dir=str(root / "out"),
        extractor={"kind": "import", "path": "eval_helpers:SeededConvExtractor"},
        grid_prompts=2,
    )
    base.update(kw)
    return EvalConfig(**base)
