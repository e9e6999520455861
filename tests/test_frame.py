import numpy as np
import pytest

from fgbg_utils.core.frame import (
    Frame, canvas_to_original, image_to_canvas, make_frame, mask_to_canvas, upsample_nearest)


def _disc(h, w):
    yy, xx = np.mgrid[0:h, 0:w]
    return (yy - h * 0.45) ** 2 + (xx - w * 0.55) ** 2 < (0.3 * min(h, w)) ** 2


def test_make_frame_rounding():
    assert make_frame(375, 500, 512, 8) == Frame(512, 384, 512, 375, 500)  # 384.0
    assert make_frame(500, 333, 512, 8).w == 344  # 341.0 -> 344
    assert make_frame(500, 2, 512, 8).w == 8  # at least one multiple
    assert make_frame(64, 64, 64, 4) == Frame(64, 64, 64, 64, 64)
    f = make_frame(40, 64, 64, 4)
    assert (f.h, f.w) == (40, 64)
    assert Frame.from_dict(f.to_dict()) == f
    with pytest.raises(ValueError):
        make_frame(10, 10, 64, 5)


def test_image_to_canvas_pads_black():
    img = np.random.default_rng(0).integers(0, 256, (40, 64, 3), dtype=np.uint8)
    canvas, f = image_to_canvas(img, 64, 4)
    assert (f.h, f.w) == (40, 64) and canvas.shape == (3, 64, 64) and canvas.dtype == np.float32
    assert np.all(canvas[:, 40:] == -1.0)
    # already at the target size: no resampling, exact values
    np.testing.assert_allclose(canvas[:, :40], img.transpose(2, 0, 1) / 127.5 - 1, atol=1e-6)
    assert canvas.min() >= -1 and canvas.max() <= 1


def test_image_to_canvas_resizes():
    img = np.full((50, 80, 3), 255, np.uint8)
    canvas, f = image_to_canvas(img, 64, 4)
    assert (f.h, f.w, f.orig_h, f.orig_w) == (40, 64, 50, 80)
    np.testing.assert_allclose(canvas[:, :40], 1.0, atol=1e-6)
    assert np.all(canvas[:, 40:] == -1.0)


def test_mask_roundtrip_identity():
    m = _disc(64, 64)
    f = make_frame(64, 64, 64, 4)
    assert np.array_equal(canvas_to_original(mask_to_canvas(m, f), f, "mask"), m)
    # landscape image already at frame size
    m2 = _disc(40, 64)
    f2 = make_frame(40, 64, 64, 4)
    c = mask_to_canvas(m2, f2)
    assert not c[40:].any()
    assert np.array_equal(canvas_to_original(c, f2, "mask"), m2)


def test_mask_roundtrip_non_square():
    m = _disc(50, 83)
    f = make_frame(50, 83, 64, 4)
    back = canvas_to_original(mask_to_canvas(m, f), f, "mask")
    assert back.shape == m.shape and back.dtype == bool
    assert (back == m).mean() > 0.98


def test_low_res_maps_back_to_original():
    f = make_frame(50, 83, 64, 4)  # h=40 (rounded from 38.6), w=64
    soft = np.zeros((16, 16), np.float32)
    soft[:10, :] = 0.5
    out = canvas_to_original(soft, f, "soft")
    assert out.shape == (50, 83) and out.dtype == np.float32
    assert np.allclose(out[:40], 0.5, atol=1e-5)
    lowmask = np.zeros((16, 16), bool)
    lowmask[:, :8] = True
    outm = canvas_to_original(lowmask, f, "mask")
    assert outm.shape == (50, 83) and outm[:, :40].all() and not outm[:, 43:].any()
    with pytest.raises(ValueError):
        canvas_to_original(np.zeros((10, 10)), f, "soft")


def test_valid_and_upsample():
    f = make_frame(37, 64, 64, 4)  # 37/4 = 9.25 -> 9 -> 36
    assert f.h == 36 and f.valid().sum() == 36 * 64
    v4 = f.valid(4)
    assert v4.shape == (16, 16) and v4[:9].all() and not v4[9:].any()
    f2 = Frame(64, 38, 64, 38, 64)  # 38/4 = 9.5 -> ceil 10 rows
    assert f2.valid(4)[:10].all() and not f2.valid(4)[10:].any()
    a = np.arange(4).reshape(2, 2)
    assert upsample_nearest(a, 3).shape == (6, 6) and upsample_nearest(a, 3)[5, 5] == 3
