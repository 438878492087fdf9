"""Fréchet distance between two feature sets (FID's formula) in float64.

Uses `dmm_ray.evaluation.fid.fid_from_features` when the evaluation package provides it (one
implementation for the whole project); otherwise this module's scipy version, which is the
pytorch-fid reference formula.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import linalg


def _frechet_scipy(x: np.ndarray, y: np.ndarray) -> float:
    mu1, mu2 = x.mean(0), y.mean(0)
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)  # (D, D)
    covmean, _ = linalg.sqrtm(s1 @ s2, disp=False)
    if not np.isfinite(covmean).all():  # singular product: regularise as pytorch-fid does
        eps = np.eye(s1.shape[0]) * 1e-6
        covmean = linalg.sqrtm((s1 + eps) @ (s2 + eps))
    covmean = covmean.real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def frechet_distance(x: torch.Tensor | np.ndarray, y: torch.Tensor | np.ndarray) -> float:
    """x: (n, D), y: (m, D) features -> FID-style Fréchet distance of their Gaussian fits."""
    x = np.asarray(x.detach().cpu() if isinstance(x, torch.Tensor) else x, dtype=np.float64)
    y = np.asarray(y.detach().cpu() if isinstance(y, torch.Tensor) else y, dtype=np.float64)
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"features must be (n, D) and (m, D) with the same D, got {x.shape} and {y.shape}")
    try:
        from dmm_ray.evaluation.fid import fid_from_features
    except ImportError:
        return _frechet_scipy(x, y)
    return float(fid_from_features(x, y))


def which_implementation() -> str:
    try:
        from dmm_ray.evaluation.fid import fid_from_features  # noqa: F401
    except ImportError:
        return "dmm_ray.zoo.frechet (scipy sqrtm, float64)"
    return "dmm_ray.evaluation.fid.fid_from_features"
