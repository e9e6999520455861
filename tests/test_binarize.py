"""Tests for fgbg_utils.core.binarize (docs/method.md §2.2)."""
import numpy as np
import pytest
from sklearn.mixture import GaussianMixture

from fgbg_utils.core.binarize import binarize, gmm_threshold, orphan_filter


def _bimodal(seed=0, h=32, w=32):
    """Left half N(0.2, 0.05), right half N(0.8, 0.05); returns (soft, truth)."""
    rng = np.random.default_rng(seed)
    truth = np.zeros((h, w), bool)
    truth[:, w // 2 :] = True
    soft = np.where(truth, rng.normal(0.8, 0.05, (h, w)), rng.normal(0.2, 0.05, (h, w)))
    return soft, truth


def test_gmm_recovers_bimodal_split():
    soft, truth = _bimodal()
    mask, info = binarize(soft)
    assert abs(info["threshold"] - 0.5) < 0.02
    lo, hi = info["means"]
    assert abs(lo - 0.2) < 0.02 and abs(hi - 0.8) < 0.02
    assert not info["degenerate"]
    assert np.count_nonzero(mask != truth) <= 3
    assert mask.dtype == bool and mask.shape == truth.shape
    assert info["fg_fraction"] == pytest.approx(mask.mean())


def test_threshold_is_midpoint_not_predict():
    # Heavy narrow cluster at 0 and light wide cluster at 1: predict()'s boundary sits
    # close to 0, far from the midpoint of the means.
    rng = np.random.default_rng(1)
    x = np.concatenate([rng.normal(0.0, 0.02, 1800), rng.normal(1.0, 0.4, 200)])
    rng.shuffle(x)
    soft = x.reshape(40, 50)
    tau, (lo, hi) = gmm_threshold(soft.ravel(), seed=0)
    assert tau == pytest.approx((lo + hi) / 2)
    mask, info = binarize(soft, orphan=False)
    assert info["threshold"] == pytest.approx(tau)
    np.testing.assert_array_equal(mask, soft > tau)

    gmm = GaussianMixture(n_components=2, random_state=0).fit(x.reshape(-1, 1))
    high = int(np.argmax(gmm.means_.ravel()))
    by_predict = (gmm.predict(soft.reshape(-1, 1)) == high).reshape(soft.shape)
    assert np.count_nonzero(by_predict != mask) > 10  # the two rules really differ here


def test_orphan_isolated_pixel_removed_and_hole_filled():
    m = np.zeros((7, 7), bool)
    m[3, 3] = True
    assert not orphan_filter(m).any()
    h = ~m
    assert orphan_filter(h).all()


def test_orphan_two_pixel_line_removed():
    m = np.zeros((7, 7), bool)
    m[3, 2:4] = True
    assert not orphan_filter(m).any()


def test_orphan_solid_block_survives():
    m = np.zeros((7, 7), bool)
    m[2:5, 2:5] = True
    out = orphan_filter(m)
    # centre and edge-middles (>= 6 of 9) survive; corners have only 4 of 9 and go
    expected = np.zeros((7, 7), bool)
    expected[3, 2:5] = expected[2:5, 3] = True
    np.testing.assert_array_equal(out, expected)
    big = np.zeros((9, 9), bool)
    big[2:7, 2:7] = True  # a 5x5 block keeps everything but its 4 corners
    out = orphan_filter(big)
    assert out[2:7, 2:7].sum() == 21 and out.sum() == 21


def test_orphan_border_keeps_label():
    m = np.zeros((6, 6), bool)
    m[0, 3] = True  # isolated pixel on the border stays
    m[5, 0] = True
    out = orphan_filter(m)
    assert out[0, 3] and out[5, 0]
    hole = np.ones((6, 6), bool)
    hole[0, 2] = False  # border hole stays a hole
    out = orphan_filter(hole)
    assert not out[0, 2] and out[1:-1, 1:-1].all()
    assert out.dtype == bool


def test_fit_only_on_valid_pixels():
    soft, truth = _bimodal(seed=2)
    padded = np.full((40, 40), 0.95)  # padding would shift the GMM if it were used
    padded[4:36, 4:36] = soft
    valid = np.zeros((40, 40), bool)
    valid[4:36, 4:36] = True
    mask, info = binarize(padded, valid=valid)
    tau, means = gmm_threshold(soft.ravel(), seed=0)
    assert info["threshold"] == pytest.approx(tau)
    assert info["means"] == pytest.approx(list(means))
    assert not mask[~valid].any()
    # pixels outside `valid` count as background for the orphan filter
    np.testing.assert_array_equal(mask, orphan_filter((padded > tau) & valid) & valid)
    assert np.count_nonzero(mask[valid].reshape(32, 32) != truth) <= 6


def test_constant_map_warns_and_returns_empty():
    with pytest.warns(UserWarning, match="constant"):
        mask, info = binarize(np.full((8, 8), 0.3), name="bird_001")
    assert mask.dtype == bool and not mask.any()
    assert info["degenerate"] and info["threshold"] is None and info["means"] is None
    assert info["fg_fraction"] == 0.0 and not np.isnan(info["fg_fraction"])
    assert gmm_threshold(np.array([1.0])) is None
    assert gmm_threshold(np.full(10, 5.0) + 1e-12) is None


def test_deterministic_with_seed():
    rng = np.random.default_rng(3)
    soft = rng.random((24, 24)) ** 2
    m1, i1 = binarize(soft, seed=7)
    m2, i2 = binarize(soft, seed=7)
    np.testing.assert_array_equal(m1, m2)
    assert i1 == i2
