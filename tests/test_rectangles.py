"""Tests for fgbg_utils.core.rectangles (docs/method.md §2.3): rectangle sampler and masked ε-loss."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fgbg_utils.core.rectangles import (RectRules, accept_boxes, masked_eps_loss, sample_rectangle, training_mask)


def _blobs(seed, L=64, n=4):
    """Random M_pre made of a few filled discs."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:L, :L]
    m = np.zeros((L, L), bool)
    for _ in range(n):
        cy, cx = rng.integers(0, L, 2)
        rad = rng.integers(max(L // 16, 1), L // 4)
        m |= (yy - cy) ** 2 + (xx - cx) ** 2 <= rad**2
    return m


def _check_box(box, mask, bg, rules):
    t, l, b, r = box
    h, w = b - t + 1, r - l + 1
    assert w > rules.min_side and h > rules.min_side
    assert w * h >= rules.min_area and w * h <= rules.max_area
    assert not (w > rules.max_both_side and h > rules.max_both_side)
    boxm = np.zeros_like(bg)
    boxm[t : b + 1, l : r + 1] = True
    assert bg[boxm].mean() >= rules.min_bg_fraction
    np.testing.assert_array_equal(mask, boxm & bg)


@pytest.mark.parametrize("L", [64, 16])
def test_accepted_boxes_obey_rules(L):
    rules = RectRules.for_grid(L)
    kinds = {}
    for s in range(6):
        m_pre = _blobs(s, L)
        bg = ~m_pre
        for d in range(50):  # 300 draws in all
            rng = np.random.default_rng(1000 * s + d)
            mask, kind, box = sample_rectangle(bg, rng, rules)
            kinds[kind] = kinds.get(kind, 0) + 1
            assert mask.dtype == bool and mask.shape == bg.shape
            assert not (mask & m_pre).any()  # never covers foreground
            if kind == "box":
                _check_box(box, mask, bg, rules)
            else:
                assert kind == "fallback" and box is None
                np.testing.assert_array_equal(mask, bg)
    assert kinds.get("box", 0) > 200


def test_corners_are_background_and_first_accepted_wins():
    # Reproduce the draw order: first accepted candidate in draw order is the one returned.
    bg = ~_blobs(3)
    rules = RectRules()
    rng = np.random.default_rng(7)
    mask, kind, box = sample_rectangle(bg, rng, rules)
    assert kind == "box"
    idx = np.flatnonzero(bg)
    pick = idx[np.random.default_rng(7).integers(0, idx.size, size=(rules.attempts, 2))]
    ys, xs = np.divmod(pick, 64)
    t, b, l, r = ys.min(1), ys.max(1), xs.min(1), xs.max(1)
    cnt = np.array([bg[t[i] : b[i] + 1, l[i] : r[i] + 1].sum() for i in range(rules.attempts)])
    first = int(np.flatnonzero(accept_boxes(t, l, b, r, cnt, rules))[0])
    assert box == (t[first], l[first], b[first], r[first])


def test_fallback_on_thin_border():
    bg = np.zeros((64, 64), bool)
    bg[:3] = bg[-3:] = True
    bg[:, :3] = bg[:, -3:] = True
    mask, kind, box = sample_rectangle(bg, np.random.default_rng(0))
    assert kind == "fallback" and box is None
    np.testing.assert_array_equal(mask, bg)


@pytest.mark.parametrize("n_bg", [0, 1])
def test_empty_when_all_foreground(n_bg):
    bg = np.zeros((64, 64), bool)
    bg.flat[:n_bg] = True
    mask, kind, box = sample_rectangle(bg, np.random.default_rng(0))
    assert kind == "empty" and box is None and not mask.any()


def test_inclusive_edge_convention():
    # Only two background pixels, at (0, 0) and (10, 10): the box rows/cols 0..10 inclusive,
    # h = w = 11 > 10. With min_bg_fraction 0 and area >= 121 the box is accepted.
    bg = np.zeros((16, 16), bool)
    bg[0, 0] = bg[10, 10] = True
    rules = RectRules(min_side=10, min_area=121, max_area=121, min_bg_fraction=0.0)
    for seed in range(20):
        mask, kind, box = sample_rectangle(bg, np.random.default_rng(seed), rules)
        if kind == "box":
            break
    assert box == (0, 0, 10, 10)
    np.testing.assert_array_equal(mask, bg)
    # area 121 = 11*11 exactly: min_area 122 must reject (so w, h are not |Δ| = 10).
    strict = RectRules(min_side=10, min_area=122, max_area=200, min_bg_fraction=0.0)
    for seed in range(20):
        _, kind, _ = sample_rectangle(bg, np.random.default_rng(seed), strict)
        assert kind == "fallback"
    # Hand check of the rule boundaries: w == min_side is rejected, w == min_side + 1 accepted.
    a = lambda t, l, b, r, c: bool(accept_boxes(*map(np.array, ([t], [l], [b], [r], [c])),
                                                RectRules())[0])
    assert not a(0, 0, 30, 9, 310)   # w = 10
    assert a(0, 0, 30, 10, 341)      # w = 11, h = 31, area 341
    assert not a(0, 0, 32, 32, 1089)  # both sides 33 > 32
    assert a(0, 0, 31, 31, 1024)     # 32x32 = 1024 ok
    assert a(0, 0, 30, 10, 228) and not a(0, 0, 30, 10, 227)  # 2/3 of 341 = 227.33


def test_deterministic_by_seed():
    bg = ~_blobs(1)
    a = sample_rectangle(bg, np.random.default_rng(42))
    b = sample_rectangle(bg, np.random.default_rng(42))
    np.testing.assert_array_equal(a[0], b[0])
    assert a[1:] == b[1:]
    ta = training_mask(~bg, np.random.default_rng(5))
    tb = training_mask(~bg, np.random.default_rng(5))
    np.testing.assert_array_equal(ta[0], tb[0])
    assert ta[1:] == tb[1:]


def test_for_grid_scaling():
    r = RectRules.for_grid(16)
    assert r.min_side == 2.5 and r.min_area == 16 and r.max_both_side == 8 and r.max_area == 64
    assert r.min_bg_fraction == pytest.approx(2 / 3) and r.attempts == 100
    assert RectRules.for_grid(64) == RectRules()


def test_training_mask_branches():
    m_pre = _blobs(2)
    full, kind, key = training_mask(m_pre, np.random.default_rng(0), p_full=1.0)
    assert full.all() and kind == "full" and key == "y_f"
    m, kind, key = training_mask(m_pre, np.random.default_rng(0), p_full=0.0)
    assert key == "y_b" and kind in ("box", "fallback") and not (m & m_pre).any()
    keys = [training_mask(m_pre, np.random.default_rng(s))[2] for s in range(200)]
    assert 60 < keys.count("y_f") < 140


@pytest.mark.parametrize("norm", ["latent", "mask"])
def test_loss_all_ones_is_mse(norm):
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    for mask in (torch.ones(2, 1, 8, 8), torch.ones(2, 4, 8, 8)):
        got = masked_eps_loss(pred, target, mask, norm=norm)
        assert torch.allclose(got, F.mse_loss(pred, target), atol=1e-6)


def test_loss_mask_norm_guard_and_half_mask():
    g = torch.Generator().manual_seed(1)
    pred, target = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    zero = torch.zeros(2, 1, 8, 8)
    for norm in ("latent", "mask"):
        z = masked_eps_loss(pred, target, zero, norm=norm)
        assert torch.isfinite(z) and z.item() == 0.0
    # one sample empty, one full: mask norm = (0 + mse of sample 1) / 2
    m = torch.zeros(2, 1, 8, 8)
    m[1] = 1
    got = masked_eps_loss(pred, target, m, norm="mask")
    assert torch.allclose(got, F.mse_loss(pred[1], target[1]) / 2, atol=1e-6)
    # half mask (left half of columns): latent norm = half-region sum / full size
    half = torch.zeros(2, 1, 8, 8)
    half[..., :4] = 1
    sq = (target - pred) ** 2
    want_latent = (sq[..., :4].flatten(1).sum(1) / (4 * 8 * 8)).mean()
    want_mask = (sq[..., :4].flatten(1).sum(1) / (4 * 8 * 4)).mean()
    assert torch.allclose(masked_eps_loss(pred, target, half, "latent"), want_latent, atol=1e-6)
    assert torch.allclose(masked_eps_loss(pred, target, half, "mask"), want_mask, atol=1e-6)
    # gradient flows and is finite with an empty sample under the mask norm
    p = pred.clone().requires_grad_(True)
    masked_eps_loss(p, target, m, "mask").backward()
    assert torch.isfinite(p.grad).all() and p.grad[0].abs().sum() == 0


def test_loss_norm_validation():
    x = torch.zeros(1, 4, 2, 2)
    with pytest.raises(ValueError, match="finetune.loss_norm"):
        masked_eps_loss(x, x, torch.ones(1, 1, 2, 2), norm="pixel")
