"""Figures for the notebooks (matplotlib): image grids, GMM histograms, the T0 sweep."""
from __future__ import annotations

import numpy as np
import matplotlib.pyplot as plt



def _show(ax, img, title=None, cmap=None, vmin=None, vmax=None):
    ax.imshow(img, cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
    ax.set_xticks([]), ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=8)


def image_rows(rows: list[dict], columns: list[str], titles: dict | None = None, size: float = 1.6):
    """A grid: one row per image, one column per key of `rows[i]` (HxW float maps -> viridis,
    bool masks -> gray, HxWx3 -> RGB)."""
    fig, axes = plt.subplots(len(rows), len(columns), figsize=(size * len(columns), size * len(rows)),
                             squeeze=False)
    for i, row in enumerate(rows):
        for j, col in enumerate(columns):
            a = row.get(col)
            ax = axes[i, j]
            if a is None:
                ax.axis("off")
                continue
            cmap = None if a.ndim == 3 else ("gray" if a.dtype == bool else "viridis")
            _show(ax, a, (titles or {}).get(col, col) if i == 0 else None, cmap,
                  0 if a.ndim == 2 else None, 1 if a.ndim == 2 else None)
        axes[i, 0].set_ylabel(row.get("label", ""), fontsize=7)
    fig.tight_layout()
    return fig


def gmm_histogram(values: np.ndarray, info: dict, title: str = "M̂ values and the GMM threshold"):
    """Histogram of the valid map values with the two component means and the midpoint threshold."""
    fig, ax = plt.subplots(figsize=(5, 2.8))
    ax.hist(values.ravel(), bins=40, color="0.6")
    if info.get("means"):
        for mu in info["means"]:
            ax.axvline(mu, color="tab:blue", ls="--", lw=1)
        ax.axvline(info["threshold"], color="tab:red", lw=2, label=f"τ = {info['threshold']:.3f}")
        ax.legend(fontsize=8)
    ax.set_xlabel("value"), ax.set_ylabel("pixels"), ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig


def t0_sweep(T0s, aucs, chosen: int | None = None):
    """AUC-ROC of M̂ against the number of lowest noise levels averaged (the paper's Fig. 3)."""
    fig, ax = plt.subplots(figsize=(5, 2.8))
    ax.plot(T0s, aucs, marker=".")
    if chosen:
        ax.axvline(chosen, color="tab:red", ls="--", label=f"T0 = {chosen}")
        ax.legend(fontsize=8)
    ax.set_xlabel("T0 (lowest DDIM levels averaged)"), ax.set_ylabel("AUC-ROC of M̂")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def maps_strip(maps: np.ndarray, labels: list[str], title: str = "", cols: int = 10, size: float = 1.2):
    """Small multiples of (n, L, L) maps, each min-max normalised."""
    n = len(maps)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, min(cols, n), figsize=(size * min(cols, n), size * rows + 0.3),
                             squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for k, (m, lab) in enumerate(zip(maps, labels)):
        m = m.astype(np.float32)
        rng = m.max() - m.min()
        _show(axes.ravel()[k], (m - m.min()) / rng if rng > 0 else m * 0, lab, "viridis", 0, 1)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def curve(xs, ys, xlabel: str, ylabel: str, title: str = "", logy: bool = False):
    fig, ax = plt.subplots(figsize=(5, 2.8))
    ax.plot(xs, ys)
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel), ax.set_ylabel(ylabel), ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig

