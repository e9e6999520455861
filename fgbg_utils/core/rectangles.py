"""Background-rectangle sampler and masked ε-loss for fine-tuning (docs/method.md §2.3).

Edge convention (unit-tested): the two sampled corners (y0, x0) and (y1, x1) are background
pixels and the box is INCLUSIVE of both corners, i.e. rows min(y0, y1) .. max(y0, y1) and cols
min(x0, x1) .. max(x0, x1), so h = |y1 - y0| + 1 and w = |x1 - x0| + 1.

A box is rejected (exactly docs/method.md §2.3) if
  w <= min_side or h <= min_side;  w*h < min_area;  w > max_both_side and h > max_both_side;
  w*h > max_area;  (background pixels in box) / (w*h) < min_bg_fraction.
The first accepted candidate in draw order wins; all ``attempts`` candidates are drawn at once
and their background counts come from a summed-area table (O(1) per box).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

Box = tuple[int, int, int, int]  # (top, left, bottom, right), all inclusive


@dataclass(frozen=True)
class RectRules:
    """Rejection rules; the defaults are the 64×64-latent-grid numbers (SD v1 at 512 px)."""

    min_side: float = 10
    min_area: float = 256
    max_both_side: float = 32
    max_area: float = 1024
    min_bg_fraction: float = 2 / 3
    attempts: int = 100

    @classmethod
    def for_grid(cls, size: int, **overrides) -> "RectRules":
        """Rules for an L×L latent grid: lengths × L/64, areas × (L/64)² (kept as floats)."""
        if size < 1:
            raise ValueError(f"grid size must be positive, got {size}")
        s = float(size) / 64.0
        base = cls()
        kw = dict(
            min_side=base.min_side * s,
            min_area=base.min_area * s * s,
            max_both_side=base.max_both_side * s,
            max_area=base.max_area * s * s,
            min_bg_fraction=base.min_bg_fraction,
            attempts=base.attempts,
        )
        kw.update(overrides)
        return cls(**kw)


def _integral(background: np.ndarray) -> np.ndarray:
    """Summed-area table S with S[i, j] = background[:i, :j].sum(); shape (H+1, W+1)."""
    h, w = background.shape
    s = np.zeros((h + 1, w + 1), np.int64)
    s[1:, 1:] = background.astype(np.int64).cumsum(0).cumsum(1)
    return s


def accept_boxes(
    top: np.ndarray, left: np.ndarray, bottom: np.ndarray, right: np.ndarray,
    bg_count: np.ndarray, rules: RectRules,
) -> np.ndarray:
    """Vectorised acceptance test for inclusive boxes with given background counts."""
    h = (bottom - top + 1).astype(np.float64)
    w = (right - left + 1).astype(np.float64)
    area = h * w
    reject = (
        (w <= rules.min_side) | (h <= rules.min_side)
        | (area < rules.min_area)
        | ((w > rules.max_both_side) & (h > rules.max_both_side))
        | (area > rules.max_area)
        | (bg_count / area < rules.min_bg_fraction)
    )
    return ~reject


def sample_rectangle(
    background: np.ndarray, rng: np.random.Generator, rules: RectRules = RectRules()
) -> tuple[np.ndarray, str, Box | None]:
    """Sample a background rectangle mask (docs/method.md §2.3).

    Returns (mask, kind, box):
      * "empty":    fewer than 2 background pixels → all-False mask, box None;
      * "box":      first accepted candidate → mask = box ∧ background, box = (top, left,
                    bottom, right) inclusive;
      * "fallback": no candidate accepted in ``rules.attempts`` draws → mask = whole
                    background, box None.
    Corners are two background pixels drawn uniformly (with replacement; an identical pair
    gives a 1×1 box, which is always rejected).
    """
    bg = np.asarray(background, dtype=bool)
    if bg.ndim != 2:
        raise ValueError(f"background must be 2-D, got shape {bg.shape}")
    idx = np.flatnonzero(bg)
    if idx.size < 2:
        return np.zeros(bg.shape, bool), "empty", None
    n = max(int(rules.attempts), 0)
    pick = idx[rng.integers(0, idx.size, size=(n, 2))]
    ys, xs = np.divmod(pick, bg.shape[1])
    top, bottom = ys.min(1), ys.max(1)
    left, right = xs.min(1), xs.max(1)
    s = _integral(bg)
    count = s[bottom + 1, right + 1] - s[top, right + 1] - s[bottom + 1, left] + s[top, left]
    ok = np.flatnonzero(accept_boxes(top, left, bottom, right, count, rules))
    if ok.size == 0:
        return bg.copy(), "fallback", None
    i = int(ok[0])
    box = (int(top[i]), int(left[i]), int(bottom[i]), int(right[i]))
    mask = np.zeros(bg.shape, bool)
    mask[box[0] : box[2] + 1, box[1] : box[3] + 1] = True
    return mask & bg, "box", box


def training_mask(
    m_pre: np.ndarray, rng: np.random.Generator, rules: RectRules = RectRules(),
    p_full: float = 0.5,
) -> tuple[np.ndarray, str, str]:
    """One training sample's mask: (mask, kind, prompt_key).

    With probability p_full → (all-ones, "full", "y_f"); otherwise a background rectangle on
    ¬M_pre → (mask, kind ∈ {"box", "fallback", "empty"}, "y_b").
    """
    m_pre = np.asarray(m_pre, dtype=bool)
    if rng.random() < p_full:
        return np.ones(m_pre.shape, bool), "full", "y_f"
    mask, kind, _ = sample_rectangle(~m_pre, rng, rules)
    return mask, kind, "y_b"


LOSS_NORMS = ("latent", "mask")


def masked_eps_loss(pred, target, mask, norm: str = "latent"):
    """Masked ε-prediction MSE (docs/method.md §2.3), averaged over the batch.

    pred, target: (B, C, H, W); mask: (B, 1, H, W) or (B, C, H, W), broadcast to C channels.
      * "latent": Σ (m ⊙ (target − pred))² / (C·H·W) per sample (official code);
      * "mask":   Σ (m ⊙ (target − pred))² / Σ m (Σ over the C-broadcast mask, = C·Σ m for a
                  1-channel mask); a sample with Σ m = 0 contributes 0 (no NaN).
    """
    import torch

    if norm not in LOSS_NORMS:
        raise ValueError(f"finetune.loss_norm must be one of {LOSS_NORMS}, got {norm!r}")
    if pred.shape != target.shape or pred.ndim != 4:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} must be "
                         "equal (B, C, H, W) shapes")
    b, c, h, w = pred.shape
    if mask.ndim != 4 or mask.shape[0] != b or mask.shape[1] not in (1, c) \
            or tuple(mask.shape[2:]) != (h, w):
        raise ValueError(f"mask shape {tuple(mask.shape)} must be (B, 1 or C, H, W) for "
                         f"pred {tuple(pred.shape)}")
    m = mask.to(pred.dtype).expand(b, c, h, w)
    per = ((m * (target - pred)) ** 2).flatten(1).sum(1)
    if norm == "latent":
        return (per / (c * h * w)).mean()
    denom = m.flatten(1).sum(1)
    safe = torch.where(denom > 0, denom, torch.ones_like(denom))
    return torch.where(denom > 0, per / safe, torch.zeros_like(per)).mean()
