"""Block-output capture for feature imitation (paper eq. 10; reference: down 0-3, mid, up 0-3).

Forward hooks on the UNet's blocks instead of a copied forward: diffusers' forward stays the
single source of truth, and the hooks also work through DDP and torch.compile'd wrappers.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn


def feature_blocks(unet: nn.Module) -> list[nn.Module]:
    """Every down block, the mid block, every up block (9 maps on SD1.5), in forward order."""
    unet = getattr(unet, "module", unet)  # DDP wrapper
    blocks = list(unet.down_blocks)
    if unet.mid_block is not None:
        blocks.append(unet.mid_block)
    return blocks + list(unet.up_blocks)


@contextmanager
def capture_block_features(unet: nn.Module):
    """Yield a list that the next forward fills with one (B, C_j, h_j, w_j) map per block."""
    features: list[torch.Tensor] = []

    def hook(_module, _inputs, output):
        # Down blocks return (hidden_states, residuals); the others return hidden_states.
        features.append(output[0] if isinstance(output, tuple) else output)

    handles = [block.register_forward_hook(hook) for block in feature_blocks(unet)]
    try:
        yield features
    finally:
        for handle in handles:
            handle.remove()
