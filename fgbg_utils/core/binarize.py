"""Binarization of soft maps (docs/method.md §2.2): 2-component GMM midpoint + orphan filter."""
from __future__ import annotations

import warnings

import numpy as np


def _is_degenerate(values: np.ndarray) -> bool:
    """True if there are fewer than 2 values or they are (near) constant."""
    if values.size < 2:
        return True
    vmax = float(np.max(values))
    return float(np.ptp(values)) < 1e-8 * max(1.0, abs(vmax))


def gmm_threshold(
    values: np.ndarray, seed: int = 0
) -> tuple[float, tuple[float, float]] | None:
    """Fit a seeded 2-component GMM to 1-D values; return (tau, (mu_low, mu_high)).

    tau is the midpoint of the two means (weights and variances play no part).
    Returns None for a degenerate input (fewer than 2 values, or constant).
    """
    x = np.asarray(values, dtype=np.float64).reshape(-1)
    x = x[np.isfinite(x)]
    if _is_degenerate(x):
        return None
    from sklearn.mixture import GaussianMixture  # here: sklearn + scipy.stats take ~1.5 s to import

    gmm = GaussianMixture(n_components=2, random_state=seed).fit(x.reshape(-1, 1))
    lo, hi = sorted(float(m) for m in gmm.means_.reshape(-1))
    return (lo + hi) / 2.0, (lo, hi)


def orphan_filter(mask: np.ndarray) -> np.ndarray:
    """3x3 majority vote (box mean > 0.5, i.e. >= 5 of 9) on interior pixels only.

    Border pixels (first/last row and column) keep their label. bool in, bool out.
    """
    m = np.asarray(mask, dtype=bool)
    out = m.copy()
    if m.ndim != 2 or m.shape[0] < 3 or m.shape[1] < 3:
        return out
    a = m.astype(np.int16)
    h, w = a.shape
    s = sum(
        a[dy : h - 2 + dy, dx : w - 2 + dx] for dy in range(3) for dx in range(3)
    )
    out[1:-1, 1:-1] = s >= 5
    return out


def binarize(
    soft: np.ndarray,
    valid: np.ndarray | None = None,
    seed: int = 0,
    orphan: bool = True,
    name: str = "map",
) -> tuple[np.ndarray, dict]:
    """Binarize a soft map: GMM on valid pixels, fg = soft > tau, then orphan filter.

    Returns (bool mask, info) with info keys threshold, means, degenerate and
    fg_fraction (foreground pixels / valid pixels).
    A constant map warns and yields an all-False mask.
    """
    soft = np.asarray(soft, dtype=np.float64)
    valid = np.ones(soft.shape, bool) if valid is None else np.asarray(valid, bool)
    if valid.shape != soft.shape:
        raise ValueError(f"valid shape {valid.shape} != soft shape {soft.shape}")
    fit = gmm_threshold(soft[valid], seed=seed)
    if fit is None:
        warnings.warn(
            f"{name}: the map is constant, so the 2-component GMM is degenerate; "
            "returning an empty mask. Check the object word / input image."
        )
        info = {"threshold": None, "means": None, "degenerate": True, "fg_fraction": 0.0}
        return np.zeros(soft.shape, bool), info
    tau, (lo, hi) = fit
    mask = (soft > tau) & valid
    if orphan:
        mask = orphan_filter(mask) & valid
    info = {
        "threshold": float(tau),
        "means": [lo, hi],
        "degenerate": False,
        "fg_fraction": float(mask.sum() / max(int(valid.sum()), 1)),
    }
    return mask, info
