"""Streaming evaluation metrics (docs/method.md §2.6, §5.2): int64 counts and histograms, never pixel lists."""
from __future__ import annotations

from typing import Iterable

import numpy as np


def _div(num: float, den: float, empty: float = 1.0) -> float:
    """num / den, or `empty` when den == 0."""
    return float(num) / float(den) if den else float(empty)


class SegmentationMeter:
    """Pooled confusion counts plus per-image foreground IoU and Dice, and the IoU of boxes: the
    tight box around the prediction vs the tight box around the ground truth, or, with
    gt_is_boxes=True (datasets annotated with boxes, docs/method.md §4), vs the ground-truth box image
    itself (the union of the annotated boxes)."""

    def __init__(self, gt_is_boxes: bool = False) -> None:
        self.gt_is_boxes = gt_is_boxes
        self.tp = self.fp = self.fn = self.tn = np.int64(0)
        self.ious: list[float] = []
        self.dices: list[float] = []
        self.box_inter = self.box_union = np.int64(0)
        self.box_ious: list[float] = []

    def update(self, pred: np.ndarray, gt: np.ndarray) -> None:
        """Add one image; pred and gt are bool arrays of equal shape."""
        pred, gt = np.asarray(pred), np.asarray(gt)
        if pred.shape != gt.shape:
            raise ValueError(f"pred shape {pred.shape} != gt shape {gt.shape}")
        pred, gt = pred.astype(bool), gt.astype(bool)
        tp = np.int64(np.count_nonzero(pred & gt))
        fp = np.int64(np.count_nonzero(pred & ~gt))
        fn = np.int64(np.count_nonzero(~pred & gt))
        tn = np.int64(pred.size) - tp - fp - fn
        self.tp += tp
        self.fp += fp
        self.fn += fn
        self.tn += tn
        self.ious.append(_div(tp, tp + fp + fn))  # both empty -> 1
        self.dices.append(_div(2 * tp, 2 * tp + fp + fn))
        inter, union = box_overlap(pred, gt, self.gt_is_boxes)
        self.box_inter += inter
        self.box_union += union
        self.box_ious.append(_div(inter, union))

    def result(self) -> dict:
        """Pooled acc/iou/iou_bg/miou/precision/recall and per-image mean IoU/Dice."""
        if not self.ious:
            raise ValueError("no images were scored; call update() before result()")
        tp, fp, fn, tn = (int(v) for v in (self.tp, self.fp, self.fn, self.tn))
        iou = _div(tp, tp + fp + fn)
        iou_bg = _div(tn, tn + fp + fn)
        return {
            "n_images": len(self.ious),
            "acc": _div(tp + tn, tp + fp + fn + tn),
            "iou": iou,
            "iou_bg": iou_bg,
            "miou": (iou + iou_bg) / 2.0,
            "iou_per_image": float(np.mean(self.ious)),
            "dice_per_image": float(np.mean(self.dices)),
            "precision": _div(tp, tp + fp),
            "recall": _div(tp, tp + fn),
            "box_iou": _div(int(self.box_inter), int(self.box_union)),
            "box_iou_per_image": float(np.mean(self.box_ious)),
        }


class BinnedAUC:
    """Streaming ROC AUC from two int64 score histograms over [0, 1]."""

    def __init__(self, bins: int = 10000) -> None:
        self.bins = int(bins)
        self.pos = np.zeros(self.bins, np.int64)
        self.neg = np.zeros(self.bins, np.int64)

    def update(self, scores: np.ndarray, labels: np.ndarray) -> None:
        """Add scores (clipped to [0, 1]) with bool labels of the same shape."""
        scores = np.clip(np.asarray(scores, np.float64).reshape(-1), 0.0, 1.0)
        labels = np.asarray(labels, bool).reshape(-1)
        if scores.shape != labels.shape:
            raise ValueError(f"scores size {scores.size} != labels size {labels.size}")
        idx = np.minimum((scores * self.bins).astype(np.int64), self.bins - 1)
        self.pos += np.bincount(idx[labels], minlength=self.bins)
        self.neg += np.bincount(idx[~labels], minlength=self.bins)

    def result(self) -> float:
        """Mann-Whitney AUC; pairs falling in the same bin count one half."""
        n_pos, n_neg = int(self.pos.sum()), int(self.neg.sum())
        if n_pos == 0 or n_neg == 0:
            raise ValueError(
                f"AUC needs both classes; seen {n_pos} positives and {n_neg} negatives"
            )
        pos, neg = self.pos.astype(np.float64), self.neg.astype(np.float64)
        neg_below = np.cumsum(neg) - neg  # negatives in strictly lower bins
        wins = float(np.sum(pos * (neg_below + 0.5 * neg)))
        return wins / (float(n_pos) * float(n_neg))


def segmentation_metrics(preds: Iterable[np.ndarray], gts: Iterable[np.ndarray]) -> dict:
    """SegmentationMeter over paired iterables of bool masks."""
    meter = SegmentationMeter()
    for pred, gt in zip(preds, gts, strict=True):
        meter.update(pred, gt)
    return meter.result()


def center_disc(h: int, w: int, area_fraction: float) -> np.ndarray:
    """Bool disc centred in an h x w image with area ~ area_fraction * h * w."""
    r = np.sqrt(area_fraction * h * w / np.pi)
    yy, xx = np.mgrid[0:h, 0:w]
    return (yy + 0.5 - h / 2.0) ** 2 + (xx + 0.5 - w / 2.0) ** 2 <= r * r


def all_foreground(h: int, w: int) -> np.ndarray:
    """All-True h x w mask."""
    return np.ones((h, w), bool)


def box_from_mask(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """Tight box (y0, x0, y1, x1), exclusive ends, around the True pixels; None if empty."""
    ys, xs = np.nonzero(np.asarray(mask, bool))
    if ys.size == 0:
        return None
    return int(ys.min()), int(xs.min()), int(ys.max()) + 1, int(xs.max()) + 1


def box_image(boxes: Iterable[tuple[int, int, int, int]], h: int, w: int) -> np.ndarray:
    """Union of (y0, x0, y1, x1) boxes as an h x w bool mask."""
    out = np.zeros((h, w), bool)
    for y0, x0, y1, x1 in boxes:
        out[max(int(y0), 0) : int(y1), max(int(x0), 0) : int(x1)] = True
    return out


def box_overlap(pred: np.ndarray, gt: np.ndarray, gt_is_boxes: bool = False) -> tuple[int, int]:
    """(intersection, union) in pixels of the tight box around pred's foreground and the tight box
    around gt's (an empty mask has no box); with gt_is_boxes, gt is already a box image (a union of
    annotated boxes) and is used as it is."""
    h, w = pred.shape
    box = box_from_mask(pred)
    a = box_image([box] if box else [], h, w)
    if gt_is_boxes:
        b = np.asarray(gt, bool)
    else:
        gbox = box_from_mask(gt)
        b = box_image([gbox] if gbox else [], h, w)
    return int(np.count_nonzero(a & b)), int(np.count_nonzero(a | b))


def bbox_iou(pred_mask: np.ndarray, gt_boxes: Iterable[tuple[int, int, int, int]]) -> float:
    """IoU of the tight box around predicted foreground vs the union of GT boxes."""
    h, w = np.asarray(pred_mask).shape
    box = box_from_mask(pred_mask)
    pred_img = box_image([box] if box else [], h, w)
    gt_img = box_image(gt_boxes, h, w)
    union = np.count_nonzero(pred_img | gt_img)
    return _div(np.count_nonzero(pred_img & gt_img), union)
