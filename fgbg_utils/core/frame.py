"""The canonical frame (docs/method.md §2.0): every map lives on one size×size canvas.

The image is resized so that its long edge is ``size`` (short side rounded to a multiple of
``multiple``), then padded bottom/right with black. The valid box is rows [0, h), cols [0, w).
Going back to the original image: crop the valid box, then resize (nearest for masks, bilinear
for soft maps).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image


@dataclass(frozen=True)
class Frame:
    """Geometry of one image on the canvas: canvas side, valid box (h, w), original size."""

    size: int
    h: int
    w: int
    orig_h: int
    orig_w: int

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Frame":
        return cls(**{k: int(d[k]) for k in ("size", "h", "w", "orig_h", "orig_w")})

    def valid(self, scale: int = 1) -> np.ndarray:
        """Bool mask of the valid box on the (size//scale)² grid.

        At a coarser grid (e.g. the latent, scale = VAE factor) the box is rounded UP
        (ceil(h/scale)), so a grid cell that holds any valid pixel counts as valid.
        """
        scale = int(scale)
        if scale < 1 or self.size % scale:
            raise ValueError(f"scale {scale} must be a positive divisor of the frame size {self.size}")
        n = self.size // scale
        out = np.zeros((n, n), bool)
        out[: math.ceil(self.h / scale), : math.ceil(self.w / scale)] = True
        return out


def make_frame(orig_h: int, orig_w: int, size: int, multiple: int) -> Frame:
    """Long edge → size; short side rounded to a multiple of ``multiple`` in [multiple, size]."""
    if orig_h < 1 or orig_w < 1:
        raise ValueError(f"image size must be positive, got {orig_h}x{orig_w}")
    if size < 1 or multiple < 1 or size % multiple:
        raise ValueError(f"frame size {size} must be a positive multiple of {multiple}")

    def short(s: int, long: int) -> int:
        r = math.floor(s * size / long / multiple + 0.5) * multiple  # round half up
        return min(max(r, multiple), size)

    if orig_h >= orig_w:
        h, w = size, short(orig_w, orig_h)
    else:
        h, w = short(orig_h, orig_w), size
    return Frame(size=size, h=h, w=w, orig_h=int(orig_h), orig_w=int(orig_w))


def image_to_canvas(img: np.ndarray, size: int, multiple: int) -> tuple[np.ndarray, Frame]:
    """uint8 HxWx3 → (float32 3×size×size in [-1, 1], Frame); padding is black (-1)."""
    if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
        raise ValueError(f"expected a uint8 HxWx3 image, got {img.dtype} {img.shape}")
    frame = make_frame(img.shape[0], img.shape[1], size, multiple)
    if (frame.h, frame.w) != img.shape[:2]:  # PIL's bicubic resize is antialiased when shrinking
        img = np.asarray(Image.fromarray(img).resize((frame.w, frame.h), Image.BICUBIC))
    canvas = np.zeros((size, size, 3), np.uint8)
    canvas[: frame.h, : frame.w] = img
    out = canvas.astype(np.float32).transpose(2, 0, 1) / 127.5 - 1.0
    return np.ascontiguousarray(out), frame


def _resize_mask(mask: np.ndarray, h: int, w: int) -> np.ndarray:
    if mask.shape == (h, w):
        return mask.astype(bool)
    im = Image.fromarray(mask.astype(np.uint8) * 255)
    return np.asarray(im.resize((w, h), Image.NEAREST)) > 127


def _resize_soft(arr: np.ndarray, h: int, w: int) -> np.ndarray:
    arr = np.asarray(arr, np.float32)
    if arr.shape == (h, w):
        return arr.copy()
    return np.asarray(Image.fromarray(arr).resize((w, h), Image.BILINEAR), np.float32)


def mask_to_canvas(mask: np.ndarray, frame: Frame) -> np.ndarray:
    """Original-size bool mask → size×size bool canvas (nearest resize, padding False)."""
    if mask.shape != (frame.orig_h, frame.orig_w):
        raise ValueError(f"mask shape {mask.shape} does not match the frame's original size "
                         f"{(frame.orig_h, frame.orig_w)}")
    out = np.zeros((frame.size, frame.size), bool)
    out[: frame.h, : frame.w] = _resize_mask(mask, frame.h, frame.w)
    return out


def upsample_nearest(arr: np.ndarray, factor: int) -> np.ndarray:
    """Repeat every pixel factor×factor times (integer factor)."""
    factor = int(factor)
    if factor < 1:
        raise ValueError(f"upsampling factor must be >= 1, got {factor}")
    return np.repeat(np.repeat(arr, factor, axis=0), factor, axis=1)


def canvas_to_original(arr: np.ndarray, frame: Frame, kind: str) -> np.ndarray:
    """Canvas map (size×size or size//k square) → original-size map.

    kind="mask": nearest (repeat) to the canvas, crop, nearest resize → bool.
    kind="soft": bilinear to the canvas, crop, bilinear resize → float32.
    """
    if kind not in ("mask", "soft"):
        raise ValueError(f"kind must be 'mask' or 'soft', got {kind!r}")
    arr = np.asarray(arr)
    n = arr.shape[0] if arr.ndim == 2 else -1
    if arr.ndim != 2 or arr.shape[1] != n or n < 1 or frame.size % n:
        raise ValueError(f"expected a square 2-D map whose side divides {frame.size}, got {arr.shape}")
    k = frame.size // n
    if kind == "mask":
        full = upsample_nearest(arr.astype(bool), k)[: frame.h, : frame.w]
        return _resize_mask(full, frame.orig_h, frame.orig_w)
    full = _resize_soft(arr, frame.size, frame.size)[: frame.h, : frame.w]
    return _resize_soft(full, frame.orig_h, frame.orig_w)
