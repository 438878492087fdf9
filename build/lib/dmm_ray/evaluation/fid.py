"""Fréchet distance between Gaussian feature statistics, kept in float64.

FID(P, Q) = |mu_P - mu_Q|^2 + tr(S_P + S_Q - 2 (S_P S_Q)^{1/2}).

The matrix square-root term is computed through the symmetric form
tr((S_P S_Q)^{1/2}) = tr((S_P^{1/2} S_Q S_P^{1/2})^{1/2}): both factors are symmetric PSD, so
`eigh` gives real, non-negative eigenvalues (tiny negatives from round-off are clipped) and
singular covariances (fewer images than feature dimensions) need no epsilon hack. It agrees
with scipy's `sqrtm` reference (pytorch-fid's formula) to ~1e-10 relative on well-posed data.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Sequence

import numpy as np


@dataclass(frozen=True)
class FeatureStats:
    """Mean (D,) and unbiased covariance (D, D) of `n` feature vectors, float64."""

    mu: np.ndarray
    sigma: np.ndarray
    n: int

    @classmethod
    def from_features(cls, features) -> "FeatureStats":
        """features: (n, D) array or tensor -> stats in float64."""
        if hasattr(features, "detach"):
            features = features.detach().cpu().numpy()
        x = np.asarray(features, dtype=np.float64)
        if x.ndim != 2:
            raise ValueError(f"features must be (n, D), got shape {tuple(x.shape)}")
        if x.shape[0] < 2:
            raise ValueError(f"need at least 2 feature vectors for a covariance, got {x.shape[0]}")
        if not np.isfinite(x).all():
            raise ValueError("features contain NaN or inf; check the generated images and the extractor")
        return cls(mu=x.mean(axis=0), sigma=np.cov(x, rowvar=False).reshape(x.shape[1], x.shape[1]), n=int(x.shape[0]))

    @cached_property
    def sigma_sqrt(self) -> np.ndarray:
        """sigma^(1/2), computed once per set: a matrix row reuses it for all N columns."""
        return _psd_sqrt(self.sigma)

    @property
    def dim(self) -> int:
        return int(self.mu.shape[0])

    @staticmethod
    def union(stats: Sequence["FeatureStats"]) -> "FeatureStats":
        """Statistics of the pooled sample of several sets (exact, from their moments)."""
        if not stats:
            raise ValueError("union of zero feature sets")
        n = sum(s.n for s in stats)
        mu = sum(s.n * s.mu for s in stats) / n
        # Pooled scatter: sum_k [(n_k - 1) S_k + n_k mu_k mu_k^T] - n mu mu^T, unbiased by (n - 1).
        scatter = sum((s.n - 1) * s.sigma + s.n * np.outer(s.mu, s.mu) for s in stats) - n * np.outer(mu, mu)
        return FeatureStats(mu=mu, sigma=scatter / (n - 1), n=n)

    def to_npz_dict(self) -> dict:
        return {"mu": self.mu, "sigma": self.sigma, "n": np.asarray(self.n)}

    @classmethod
    def from_npz_dict(cls, d) -> "FeatureStats":
        return cls(mu=np.asarray(d["mu"], np.float64), sigma=np.asarray(d["sigma"], np.float64), n=int(d["n"]))


def _psd_sqrt(a: np.ndarray) -> np.ndarray:
    """Square root of a symmetric PSD matrix via eigh; (D, D) -> (D, D)."""
    a = (a + a.T) / 2
    w, v = np.linalg.eigh(a)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2); all inputs promoted to float64."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.shape[0],) * 2:
        raise ValueError(f"shape mismatch: mu {mu1.shape} vs {mu2.shape}, sigma {s1.shape} vs {s2.shape}")
    return _frechet(mu1, s1, _psd_sqrt(s1), mu2, s2)


def _frechet(mu1, s1, root1, mu2, s2) -> float:
    inner = root1 @ s2 @ root1  # symmetric PSD (D, D)
    eig = np.linalg.eigvalsh((inner + inner.T) / 2)
    tr_covmean = np.sqrt(np.clip(eig, 0.0, None)).sum()
    diff = mu1 - mu2
    value = float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean)
    # Round-off can push FID(X, X) a hair below zero; the distance itself never is.
    return max(value, 0.0)


def fid_from_stats(a: FeatureStats, b: FeatureStats) -> float:
    if a.dim != b.dim:
        raise ValueError(f"feature dimensions differ: {a.dim} vs {b.dim} (were they made by the same extractor?)")
    return _frechet(a.mu, a.sigma, a.sigma_sqrt, b.mu, b.sigma)


def fid_from_features(x, y) -> float:
    """FID between two feature sets (n, D) and (m, D)."""
    return fid_from_stats(FeatureStats.from_features(x), FeatureStats.from_features(y))
