"""Refinement M = M_pre,up ∧ g(|x − x̂|) and the M_crop baseline (docs/method.md §2.4). Pure numpy.

All maps share the canonical frame (§2.0): x, x̂, M_pre,up, valid and M are (H, W[, 3]) arrays
on the same canvas.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

from fgbg_utils.core.binarize import binarize

STRIPS = ("left", "right", "above", "below")


def difference_map(x: np.ndarray, x_hat: np.ndarray) -> np.ndarray:
    """d = mean over RGB of |x − x̂|; x, x̂ float (H, W, 3) in [0, 1] → float32 (H, W)."""
    x = np.asarray(x, np.float32)
    x_hat = np.asarray(x_hat, np.float32)
    if x.shape != x_hat.shape or x.ndim != 3:
        raise ValueError(f"x {x.shape} and x_hat {x_hat.shape} must be equal (H, W, 3) shapes")
    return np.abs(x - x_hat).mean(axis=2).astype(np.float32)


def upsample_mask(m_pre: np.ndarray, factor: int) -> np.ndarray:
    """Nearest upsampling of a bool latent mask by an integer factor (np.repeat)."""
    factor = int(factor)
    if factor < 1:
        raise ValueError(f"upsampling factor must be >= 1, got {factor}")
    m = np.asarray(m_pre, bool)
    return np.repeat(np.repeat(m, factor, axis=0), factor, axis=1)


def refine_mask(
    m_pre_up: np.ndarray, diff: np.ndarray, valid: np.ndarray | None = None,
    seed: int = 0, orphan: bool = True,
) -> tuple[np.ndarray, dict]:
    """M = M_pre,up ∧ g(diff), g = GMM binarization (+ orphan filter) over valid pixels.

    The result is always a subset of M_pre,up (refinement can only shrink M_pre).
    Returns (M, info) with binarize's info plus ``m_pre_fraction`` (|M| / |M_pre,up|).
    """
    m_pre_up = np.asarray(m_pre_up, bool)
    diff = np.asarray(diff)
    if m_pre_up.shape != diff.shape:
        raise ValueError(f"m_pre_up {m_pre_up.shape} and diff {diff.shape} must match")
    g, info = binarize(diff, valid, seed=seed, orphan=orphan, name="difference map")
    m = m_pre_up & g
    info = dict(info)
    info["m_pre_fraction"] = float(m.sum() / max(int(m_pre_up.sum()), 1))
    return m, info


def _bbox(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """Inclusive (top, left, bottom, right) of the True pixels, or None."""
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(mask.any(axis=0))
    return int(rows[0]), int(cols[0]), int(rows[-1]), int(cols[-1])


def _strip_areas(m_pre_up: np.ndarray, valid: np.ndarray):
    """(box, valid_box, {strip: area}) or None when M_pre,up ∧ valid is empty."""
    box = _bbox(m_pre_up & valid)
    if box is None:
        return None
    vt, vl, vb, vr = _bbox(valid)
    t, l, b, r = box
    bh, bw = b - t + 1, r - l + 1
    areas = {
        "left": bh * (l - vl),
        "right": bh * (vr - r),
        "above": bw * (t - vt),
        "below": bw * (vb - b),
    }
    return box, (vt, vl, vb, vr), areas


def crop_strip(m_pre_up: np.ndarray, valid: np.ndarray | None = None) -> str | None:
    """Which strip M_crop copies ("left", "right", "above", "below"), or None.

    None means m_crop_fill returns x unchanged: M_pre,up ∧ valid is empty, or its bounding
    box spans the whole valid region so no strip exists. Ties go to the first in STRIPS order.
    """
    m_pre_up = np.asarray(m_pre_up, bool)
    valid = np.ones(m_pre_up.shape, bool) if valid is None else np.asarray(valid, bool)
    got = _strip_areas(m_pre_up, valid)
    if got is None:
        return None
    areas = got[2]
    best = max(STRIPS, key=lambda k: (areas[k], -STRIPS.index(k)))
    return best if areas[best] > 0 else None


def _reflect(k: np.ndarray, n: int) -> np.ndarray:
    """Offset k ≥ 0 from the shared edge → strip offset in [0, n), reflect-tiled (symmetric)."""
    m = k % (2 * n)
    return np.where(m < n, m, 2 * n - 1 - m)


def m_crop_fill(
    x: np.ndarray, m_pre_up: np.ndarray, valid: np.ndarray | None = None
) -> np.ndarray:
    """M_crop baseline x̂ (docs/method.md §2.4): mirror the largest background strip onto the object.

    1. Bounding box of M_pre,up ∧ valid; strips are restricted to the bounding box of
       ``valid`` (the canonical-frame valid box).
    2. Of the strips left / right (box rows) and above / below (box cols), the largest by area.
    3. Mirror it across the shared box edge: the box pixel at offset k from that edge gets the
       strip pixel at offset k on the other side; if the strip is narrower than the box the
       mirrored strip is reflect-tiled (offsets 0..n−1, n−1..0, 0..).
    4. x̂ = x outside M_pre,up ∧ valid, the mirrored content inside.
    Edge cases — all return a copy of x unchanged: empty M_pre,up ∧ valid; box spanning the
    whole valid region / every strip empty. Callers detect them with ``crop_strip(...) is None``
    (the difference map is then zero and g degenerate).
    """
    x = np.asarray(x)
    m_pre_up = np.asarray(m_pre_up, bool)
    if x.shape[:2] != m_pre_up.shape:
        raise ValueError(f"x {x.shape} and m_pre_up {m_pre_up.shape} must share (H, W)")
    valid = np.ones(m_pre_up.shape, bool) if valid is None else np.asarray(valid, bool)
    out = x.copy()
    strip = crop_strip(m_pre_up, valid)
    if strip is None:
        return out
    (t, l, b, r), (vt, vl, vb, vr), _ = _strip_areas(m_pre_up, valid)
    bh, bw = b - t + 1, r - l + 1
    if strip == "left":
        cols = l - 1 - _reflect(np.arange(bw), l - vl)
        fill = x[t : b + 1][:, cols]
    elif strip == "right":
        cols = r + 1 + _reflect(np.arange(bw)[::-1], vr - r)
        fill = x[t : b + 1][:, cols]
    elif strip == "above":
        rows = t - 1 - _reflect(np.arange(bh), t - vt)
        fill = x[rows][:, l : r + 1]
    else:
        rows = b + 1 + _reflect(np.arange(bh)[::-1], vb - b)
        fill = x[rows][:, l : r + 1]
    sel = (m_pre_up & valid)[t : b + 1, l : r + 1]
    region = out[t : b + 1, l : r + 1]
    region[sel] = fill[sel]
    return out


def optional_postprocess(mask: np.ndarray, enabled: bool = False) -> np.ndarray:
    """Optional clean-up [C, off by default]: binary_closing (3×3 cross), then fill holes.

    The mask is edge-padded by one pixel for the closing so that scipy's zero border does not
    erode foreground touching the image edge.
    """
    m = np.asarray(mask, bool)
    if not enabled:
        return m.copy()
    cross = ndimage.generate_binary_structure(2, 1)
    closed = ndimage.binary_closing(np.pad(m, 1, mode="edge"), structure=cross)[1:-1, 1:-1]
    return ndimage.binary_fill_holes(closed)
