"""Unsupervised baselines of the paper's Table 1 (docs/method.md §3): GrabCut (Rother et al., 2004;
OpenCV's `cv2.grabCut`) started from a centred rectangle, the usual label-free way to run it on
object-centred datasets such as CUB (the object is assumed to lie inside the rectangle, everything
outside it is taken as sure background)."""
from __future__ import annotations

import numpy as np


def centred_rectangle(height: int, width: int, margin: float) -> tuple[int, int, int, int]:
    """(x, y, w, h) of the rectangle that leaves `margin` (a fraction of each side, 0 <= margin
    < 0.5) outside it on every side; at least one pixel of border and of inside."""
    if not 0 <= margin < 0.5:
        raise ValueError(f"grabcut margin {margin!r} must be a fraction of the side in [0, 0.5)")
    mx = min(max(1, int(round(margin * width))), (width - 1) // 2)
    my = min(max(1, int(round(margin * height))), (height - 1) // 2)
    return mx, my, max(1, width - 2 * mx), max(1, height - 2 * my)


def grabcut(image: np.ndarray, margin: float = 0.1, iterations: int = 5, seed: int = 0) -> np.ndarray:
    """GrabCut's foreground (sure and probable) of an RGB uint8 image (H, W, 3), initialised with
    the centred rectangle of `centred_rectangle(H, W, margin)`; a bool (H, W) mask.

    Deterministic: OpenCV's RNG (used by the k-means that starts the colour GMMs) is seeded with
    `seed` before each call. Images smaller than 3 pixels a side, or GrabCut failing on a
    degenerate image (e.g. one colour), give the rectangle itself."""
    import cv2

    image = np.ascontiguousarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"grabcut needs an RGB uint8 (H, W, 3) image, got {image.dtype} {image.shape}")
    h, w = image.shape[:2]
    rect = centred_rectangle(h, w, margin) if min(h, w) >= 3 else (0, 0, w, h)
    x, y, rw, rh = rect
    inside = np.zeros((h, w), bool)
    inside[y:y + rh, x:x + rw] = True
    if min(h, w) < 3:
        return inside
    mask = np.zeros((h, w), np.uint8)
    bgd, fgd = np.zeros((1, 65), np.float64), np.zeros((1, 65), np.float64)
    cv2.setRNGSeed(int(seed))
    try:
        cv2.grabCut(image[..., ::-1].copy(), mask, rect, bgd, fgd, int(iterations), cv2.GC_INIT_WITH_RECT)
    except cv2.error:  # e.g. too few distinct colours for the GMMs
        return inside
    return (mask == cv2.GC_FGD) | (mask == cv2.GC_PR_FGD)
