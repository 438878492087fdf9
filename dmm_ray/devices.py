"""Where a model runs: the one "auto" rule (the GPU when torch sees one, else the CPU) and its check.

Every loader that takes a device (evaluation, the MLflow pyfunc, Serve replicas, the encoder and
synthesis actors) resolves it here, so "auto" means the same thing everywhere.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def resolve_device(device: str = "auto") -> torch.device:
    """ "auto" → "cuda" when torch sees a GPU, else "cpu"; any other name as torch reads it."""
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def usable_device(device: str, what: str) -> torch.device:
    """`resolve_device`, then a zero-size allocation there, so a device this process cannot use
    (e.g. "cuda" on a machine without one, a misspelt name) fails now with a ValueError naming
    `what` rather than deep inside a model load."""
    import torch

    try:
        resolved = resolve_device(device)
        torch.empty(0, device=resolved)
    except (RuntimeError, AssertionError) as error:  # torch: RuntimeError (bad name); AssertionError (no CUDA build)
        raise ValueError(f"{what} {device!s}: not usable here ({error}); give 'auto', 'cpu' or 'cuda'") from None
    return resolved
