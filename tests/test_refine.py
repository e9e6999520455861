"""Tests for fgbg_utils.core.refine (docs/method.md §2.4): difference map, refinement, M_crop, post-processing."""
import numpy as np
import pytest

from fgbg_utils.core.refine import (
    crop_strip, difference_map, m_crop_fill, optional_postprocess, refine_mask, upsample_mask)


def test_difference_map_hand_case():
    x = np.zeros((2, 2, 3))
    x_hat = np.zeros((2, 2, 3))
    x[0, 0] = [0.3, 0.6, 0.9]
    x_hat[0, 1] = [1.0, 0.0, 0.5]
    x[1, 1] = [0.5, 0.5, 0.5]
    x_hat[1, 1] = [0.2, 0.8, 0.5]
    d = difference_map(x, x_hat)
    assert d.dtype == np.float32 and d.shape == (2, 2)
    np.testing.assert_allclose(d, [[0.6, 0.5], [0.0, 0.2]], atol=1e-6)


def test_upsample_mask():
    m = np.array([[1, 0], [0, 1]], bool)
    up = upsample_mask(m, 3)
    assert up.shape == (6, 6) and up.dtype == bool
    assert up[:3, :3].all() and not up[:3, 3:].any() and up[3:, 3:].all()


def test_refine_is_subset_of_m_pre_up():
    for s in range(6):
        rng = np.random.default_rng(s)
        m_pre = rng.random((8, 8)) < 0.3
        up = upsample_mask(m_pre, 4)
        diff = rng.random((32, 32)).astype(np.float32)
        valid = np.zeros((32, 32), bool)
        valid[:, : 16 + 4 * s] = True
        m, info = refine_mask(up, diff, valid, seed=s, orphan=bool(s % 2))
        assert m.dtype == bool and not (m & ~up).any()
        assert 0.0 <= info["m_pre_fraction"] <= 1.0


def test_refine_recovers_square():
    rng = np.random.default_rng(0)
    H = 64
    bgc = np.array([0.2, 0.5, 0.3])
    x = np.broadcast_to(bgc, (H, H, 3)).copy()
    x += rng.normal(0, 0.01, x.shape)  # texture / VAE-like noise
    truth = np.zeros((H, H), bool)
    truth[20:40, 24:44] = True
    x[truth] = [0.9, 0.1, 0.8]
    x_hat = np.broadcast_to(bgc, (H, H, 3)) + rng.normal(0, 0.01, x.shape)
    x, x_hat = np.clip(x, 0, 1), np.clip(x_hat, 0, 1)
    m_pre = np.zeros((8, 8), bool)
    m_pre[2:6, 2:6] = True  # 16..47 in pixels: a dilated square
    up = upsample_mask(m_pre, 8)
    assert (truth <= up).all()
    m, info = refine_mask(up, difference_map(x, x_hat), np.ones((H, H), bool), seed=0)
    iou = (m & truth).sum() / (m | truth).sum()
    assert iou > 0.95 and not (m & ~up).any()


def test_m_crop_left_strip_mirrored():
    H, W = 6, 10
    x = np.arange(H * W * 3, dtype=np.float32).reshape(H, W, 3)
    m = np.zeros((H, W), bool)
    m[1:4, 5:8] = True  # box rows 1..3, cols 5..7; left strip 5 wide, right 2, above 1, below 2
    m[3, 7] = False  # non-box pixel inside the box stays x
    assert crop_strip(m) == "left"
    out = m_crop_fill(x, m)
    want = x.copy()
    for r in range(1, 4):
        for k, c in enumerate(range(5, 8)):
            if m[r, c]:
                want[r, c] = x[r, 4 - k]  # column 5 <- 4, 6 <- 3, 7 <- 2
    np.testing.assert_array_equal(out, want)
    assert out[3, 7, 0] == x[3, 7, 0]
    np.testing.assert_array_equal(out[~m], x[~m])


def test_m_crop_reflect_tile_and_valid():
    # Box wider than the largest strip: the strip is reflect-tiled; strips stop at the valid box.
    x = np.arange(8 * 12, dtype=np.float32).reshape(8, 12, 1).repeat(3, 2)
    valid = np.zeros((8, 12), bool)
    valid[:, :10] = True  # cols 10, 11 are padding
    m = np.zeros((8, 12), bool)
    m[:, 2:9] = True  # full height; left strip 2 wide (cols 0,1), right strip 1 (col 9)
    assert crop_strip(m, valid) == "left"
    out = m_crop_fill(x, m, valid)
    # cols 2..8 <- strip offsets 0,1,1,0,0,1,1 -> cols 1,0,0,1,1,0,0
    np.testing.assert_array_equal(out[:, 2:9, 0], x[:, [1, 0, 0, 1, 1, 0, 0], 0])
    np.testing.assert_array_equal(out[:, 9:], x[:, 9:])


def test_m_crop_right_and_below():
    x = np.random.default_rng(0).random((10, 10, 3))
    m = np.zeros((10, 10), bool)
    m[0:3, 0:3] = True  # right strip 3x7=21 = below strip 3x7=21 -> tie: right first
    assert crop_strip(m) == "right"
    out = m_crop_fill(x, m)
    np.testing.assert_array_equal(out[0:3, 0:3], x[0:3, [5, 4, 3]])
    m = np.zeros((10, 10), bool)
    m[0:3, 0:8] = True  # below 7x8 = 56 largest
    assert crop_strip(m) == "below"
    out = m_crop_fill(x, m)
    np.testing.assert_array_equal(out[0:3, 0:8], x[[5, 4, 3], 0:8])


@pytest.mark.parametrize("case", ["empty", "everything"])
def test_m_crop_degenerate_unchanged(case):
    x = np.random.default_rng(1).random((8, 8, 3))
    m = np.zeros((8, 8), bool)
    if case == "everything":
        m[0, 0] = m[7, 7] = True  # box spans the whole valid region
    assert crop_strip(m) is None
    out = m_crop_fill(x, m)
    np.testing.assert_array_equal(out, x)
    assert out is not x


def test_optional_postprocess():
    m = np.zeros((14, 14), bool)
    m[2:9, 2:9] = True
    m[4:7, 4:7] = False  # 3x3 hole
    m[12:14, 12:14] = True  # touches the border: must not be eroded
    np.testing.assert_array_equal(optional_postprocess(m), m)  # off by default
    want = m.copy()
    want[4:7, 4:7] = True
    np.testing.assert_array_equal(optional_postprocess(m, enabled=True), want)
