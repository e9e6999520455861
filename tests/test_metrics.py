"""Tests for fgbg_utils.core.metrics (docs/method.md §2.6)."""
import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from fgbg_utils.core.metrics import (
    BinnedAUC, SegmentationMeter, all_foreground, bbox_iou, box_from_mask, box_image, center_disc,
    segmentation_metrics)


def test_hand_computed_4x4():
    gt = np.zeros((4, 4), bool)
    gt[0:2, 0:2] = True  # 4 fg pixels
    pred = np.zeros((4, 4), bool)
    pred[0:2, 0:3] = True  # 6 predicted: tp=4, fp=2, fn=0, tn=10
    pred[0, 0] = False  # tp=3, fp=2, fn=1, tn=10
    r = segmentation_metrics([pred], [gt])
    assert r["n_images"] == 1
    assert r["acc"] == pytest.approx(13 / 16)
    assert r["iou"] == pytest.approx(3 / 6)
    assert r["iou_bg"] == pytest.approx(10 / 13)
    assert r["miou"] == pytest.approx((3 / 6 + 10 / 13) / 2)
    assert r["dice_per_image"] == pytest.approx(6 / 9)
    assert r["iou_per_image"] == pytest.approx(0.5)
    assert r["precision"] == pytest.approx(3 / 5)
    assert r["recall"] == pytest.approx(3 / 4)
    assert all(type(v) is float for k, v in r.items() if k != "n_images")


def test_pooled_vs_per_image_differ():
    # image 1: 2x2, gt all fg, pred all fg -> tp=4 (IoU 1, Dice 1)
    # image 2: 2x2, gt one pixel, pred the other three -> tp=0, fp=3, fn=1 (IoU 0, Dice 0)
    g1 = np.ones((2, 2), bool)
    p1 = np.ones((2, 2), bool)
    g2 = np.array([[1, 0], [0, 0]], bool)
    p2 = ~g2
    m = SegmentationMeter()
    m.update(p1, g1)
    m.update(p2, g2)
    r = m.result()
    assert r["iou"] == pytest.approx(4 / 8)  # pooled tp=4, fp=3, fn=1
    assert r["iou_per_image"] == pytest.approx(0.5)
    assert r["dice_per_image"] == pytest.approx(0.5)
    # and an unequal case: add a large perfect image -> pooled != per-image
    m.update(np.ones((4, 4), bool), np.ones((4, 4), bool))
    r = m.result()
    assert r["iou"] == pytest.approx(20 / 24)
    assert r["iou_per_image"] == pytest.approx(2 / 3)
    assert r["iou"] != pytest.approx(r["iou_per_image"])
    assert r["n_images"] == 3


def test_empty_cases():
    z = np.zeros((3, 3), bool)
    r = segmentation_metrics([z], [z])
    assert r["iou_per_image"] == 1.0 and r["dice_per_image"] == 1.0
    p = z.copy()
    p[1, 1] = True
    r = segmentation_metrics([p], [z])
    assert r["iou_per_image"] == 0.0 and r["dice_per_image"] == 0.0


def test_shape_mismatch_and_empty_meter_raise():
    with pytest.raises(ValueError, match=r"\(2, 2\).*\(3, 3\)"):
        SegmentationMeter().update(np.zeros((2, 2), bool), np.zeros((3, 3), bool))
    with pytest.raises(ValueError, match="no images were scored"):
        SegmentationMeter().result()


def test_auc_edge_cases():
    labels = np.array([0, 0, 1, 1], bool)
    a = BinnedAUC()
    a.update(np.array([0.1, 0.2, 0.8, 0.9]), labels)
    assert a.result() == 1.0
    a = BinnedAUC()
    a.update(np.array([0.9, 0.8, 0.2, 0.1]), labels)
    assert a.result() == 0.0
    a = BinnedAUC()
    a.update(np.full(4, 0.5), labels)
    assert a.result() == 0.5
    a = BinnedAUC()
    a.update(np.array([-1.0, 2.0]), np.array([0, 1], bool))  # clipped
    assert a.result() == 1.0
    a = BinnedAUC()
    a.update(np.array([0.1, 0.2]), np.array([1, 1], bool))
    with pytest.raises(ValueError):
        a.result()


def test_auc_matches_sklearn_streamed():
    rng = np.random.default_rng(0)
    labels = rng.random(3000) < 0.3
    scores = np.clip(rng.normal(0.4 + 0.2 * labels, 0.2), 0, 1)
    a = BinnedAUC(bins=10000)
    for s, l in zip(np.array_split(scores, 3), np.array_split(labels, 3)):
        a.update(s, l)
    assert a.result() == pytest.approx(roc_auc_score(labels, scores), abs=1e-3)


def test_bbox_helpers():
    m = np.zeros((10, 10), bool)
    m[2, 3] = m[5, 6] = True
    assert box_from_mask(m) == (2, 3, 6, 7)
    assert box_from_mask(np.zeros((4, 4), bool)) is None
    img = box_image([(0, 0, 2, 2), (1, 1, 3, 3)], 4, 4)
    assert img.sum() == 7
    # pred box 4x4 = 16 px at (2,3)-(6,7); gt box (4,5)-(8,9) 16 px; overlap rows 4-5, cols 5-6 = 4
    assert bbox_iou(m, [(4, 5, 8, 9)]) == pytest.approx(4 / 28)
    z = np.zeros((5, 5), bool)
    assert bbox_iou(z, []) == 1.0
    assert bbox_iou(z, [(0, 0, 1, 1)]) == 0.0


def test_center_disc_and_all_foreground():
    for h, w, f in [(64, 64, 0.3), (128, 96, 0.5)]:
        d = center_disc(h, w, f)
        assert d.shape == (h, w) and d.dtype == bool
        assert abs(d.mean() - f) / f < 0.05
        ys, xs = np.nonzero(d)
        assert abs(ys.mean() - (h - 1) / 2) < 0.5 and abs(xs.mean() - (w - 1) / 2) < 0.5
    assert all_foreground(3, 4).all() and all_foreground(3, 4).shape == (3, 4)
