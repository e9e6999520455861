"""The evaluation segmentation U-Net (docs/method.md §2.6): shapes, joint augmentation, determinism, and
that it can fit a tiny fixed set."""
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
import pytest
import torch

from fgbg_utils.training import segnet
from fgbg_utils.data import toy
from fgbg_utils.core.metrics import SegmentationMeter

torch.set_num_threads(1)


@pytest.mark.parametrize("hw", [(37, 45), (32, 32), (17, 50)])
def test_output_shape_any_size(hw):
    model = segnet.UNet(base_width=4, depth=3).eval()
    with torch.no_grad():
        out = model(torch.rand(2, 3, *hw))
    assert out.shape == (2, 1, *hw)


def test_paper_widths():
    assert segnet.UNet(base_width=64, depth=4).widths == [64, 128, 256, 512, 1024]
    cfg = segnet.SegConfig()
    assert (cfg.size, cfg.steps, cfg.batch_size, cfg.lr, cfg.threshold) == (128, 12000, 32, 2e-3, 0.5)


def test_joint_transform_keeps_image_and_mask_aligned():
    rng0 = np.random.default_rng(0)
    image = rng0.integers(0, 256, (45, 70, 3), dtype=np.uint8)
    mask = image[..., 0].astype(np.float32) / 255  # a soft mask made from the red channel
    seen_flip = seen_noflip = False
    for step in range(12):
        img, m = segnet.joint_train_transform(image, mask, 32, np.random.default_rng([0, step]))
        assert img.shape == (3, 32, 32) and m.shape == (32, 32)
        np.testing.assert_allclose(m.numpy(), img[0].numpy(), atol=0.51 / 255)
        assert 0 < m.min() and m.max() < 1  # labels stay soft
        # flipped or not, the crop is a window of the resized image
        ref, _ = segnet.resize_short_side(image, None, 32)
        ref = ref.float() / 255
        window = [(top, left) for top in range(ref.shape[1] - 31) for left in range(ref.shape[2] - 31)
                  if torch.equal(ref[:, top:top + 32, left:left + 32], img)]
        if window:
            seen_noflip = True
        else:
            flipped = img.flip(-1)
            assert any(torch.equal(ref[:, t:t + 32, l:l + 32], flipped)
                       for t in range(ref.shape[1] - 31) for l in range(ref.shape[2] - 31))
            seen_flip = True
    assert seen_flip and seen_noflip
    # training batches use the same path
    data = segnet.prepare_training_data([image], [mask], 32)
    cfg = segnet.SegConfig(size=32, batch_size=3, seed=1)
    x, y = segnet.make_batch(data, np.zeros(3, int), cfg, step=5)
    assert x.shape == (3, 3, 32, 32) and y.shape == (3, 1, 32, 32)
    np.testing.assert_allclose(y[:, 0].numpy(), x[:, 0].numpy(), atol=0.6 / 255)


def test_center_crop_pair():
    image = np.zeros((40, 80, 3), np.uint8)
    image[:, 40:] = 255
    mask = np.zeros((40, 80), bool)
    mask[:, 40:] = True
    crop, gt = segnet.center_crop_pair(image, mask, 20)  # 40x80 -> 20x40 -> centre 20x20
    assert crop.shape == (20, 20, 3) and crop.dtype == np.uint8 and gt.shape == (20, 20)
    assert gt.dtype == bool and gt[:, 10:].all() and not gt[:, :10].any()
    np.testing.assert_array_equal(crop[..., 0] > 127, gt)


def _tiny_cfg(**kw):
    base = dict(size=32, base_width=8, depth=2, steps=150, batch_size=4, lr=1e-2, seed=0,
                device="cpu")
    base.update(kw)
    return segnet.SegConfig(**base)


def test_training_is_deterministic():
    images, masks, _, _ = toy.generate_arrays(3, seed=2, size=32)
    cfg = _tiny_cfg(steps=4)
    m1, c1 = segnet.train_segnet(list(images), list(masks), cfg)
    m2, c2 = segnet.train_segnet(list(images), list(masks), cfg)
    assert c1 == c2
    for a, b in zip(m1.state_dict().values(), m2.state_dict().values()):
        assert torch.equal(a, b)
    _, c3 = segnet.train_segnet(list(images), list(masks), _tiny_cfg(steps=4, seed=1))
    assert c3 != c1


def test_overfits_tiny_set():
    images, masks, _, _ = toy.generate_arrays(4, seed=0, size=32, background_fraction=0.0)
    cfg = _tiny_cfg()
    logs = []
    model, curve = segnet.train_segnet(list(images), list(masks), cfg, log=logs.append)
    assert len(curve) == cfg.steps and logs
    assert np.mean(curve[-10:]) < np.mean(curve[:10])
    preds = segnet.predict(model, list(images), cfg)
    meter = SegmentationMeter()
    for p, g in zip(preds, masks):
        assert p.shape == g.shape and p.dtype == bool
        meter.update(p, g)
    assert meter.result()["iou"] > 0.8, meter.result()
    # the centre-crop protocol at the training size is the identity geometry here
    cpreds, gts = segnet.predict_center_crop(model, list(images), list(masks), cfg)
    for p, q, g, m in zip(cpreds, preds, gts, masks):
        np.testing.assert_array_equal(g, m)
        assert (p == q).mean() > 0.99


def test_predict_returns_original_sizes():
    model = segnet.build_model(_tiny_cfg()).eval()
    imgs = [np.zeros((21, 47, 3), np.uint8), np.full((64, 30), 128, np.uint8)]
    out = segnet.predict(model, imgs, _tiny_cfg())
    assert [o.shape for o in out] == [(21, 47), (64, 30)] and all(o.dtype == bool for o in out)


def test_cosine_schedule_differs_from_constant_and_bad_names_fail():
    images, masks, _, _ = toy.generate_arrays(3, seed=2, size=32)
    _, const = segnet.train_segnet(list(images), list(masks), _tiny_cfg(steps=4))
    _, cos = segnet.train_segnet(list(images), list(masks), _tiny_cfg(steps=4, lr_schedule="cosine"))
    assert const[0] == cos[0] and const[1:] != cos[1:]  # same first step (factor 1), then decays
    with pytest.raises(ValueError, match="lr_schedule(.|\n)*'linear'"):
        segnet.train_segnet(list(images), list(masks), _tiny_cfg(steps=2, lr_schedule="linear"))


def test_bf16_autocast_is_deterministic_close_to_float32_and_still_learns():
    images, masks, _, _ = toy.generate_arrays(4, seed=0, size=32, background_fraction=0.0)
    fp32 = _tiny_cfg()
    bf16 = _tiny_cfg(mixed_precision="bf16")
    _, c32 = segnet.train_segnet(list(images), list(masks), fp32)
    m1, c1 = segnet.train_segnet(list(images), list(masks), bf16)
    m2, c2 = segnet.train_segnet(list(images), list(masks), bf16)
    assert c1 == c2 and c1 != c32  # autocast is on, and repeatable
    assert all(p.dtype == torch.float32 for p in m1.parameters())  # weights stay float32
    assert abs(c1[0] - c32[0]) < 0.02 and np.mean(c1[-10:]) < 0.5 * np.mean(c1[:10])
    with pytest.raises(ValueError):
        _tiny_cfg(mixed_precision="fp8")


def test_auto_precision_takes_bf16_only_where_the_hardware_has_it(monkeypatch):
    """auto = bf16 on native-bf16 hardware, float32 elsewhere (emulated bf16 was 15x slower)."""
    images, masks, _, _ = toy.generate_arrays(3, seed=0, size=32, background_fraction=0.0)
    cpu = torch.device("cpu")
    _, c32 = segnet.train_segnet(list(images), list(masks), _tiny_cfg(steps=3))
    _, c16 = segnet.train_segnet(list(images), list(masks), _tiny_cfg(steps=3, mixed_precision="bf16"))
    for native, expected in ((False, c32), (True, c16)):
        monkeypatch.setattr(segnet, "native_bf16", lambda dev, n=native: n)
        assert segnet.uses_bf16(_tiny_cfg(mixed_precision="auto"), cpu) is native
        _, curve = segnet.train_segnet(list(images), list(masks), _tiny_cfg(steps=3, mixed_precision="auto"))
        assert curve == expected


def test_weight_averaging_averages_the_last_steps_and_recomputes_bn():
    """average_last: the returned weights are the mean of the last steps' weights (not the last
    ones), with BatchNorm statistics recomputed for them; deterministic."""
    images, masks, _, _ = toy.generate_arrays(4, seed=1, size=32, background_fraction=0.0)
    last, c_last = segnet.train_segnet(list(images), list(masks), _tiny_cfg(steps=6))
    avg, c_avg = segnet.train_segnet(list(images), list(masks), _tiny_cfg(steps=6, average_last=0.5))
    again, _ = segnet.train_segnet(list(images), list(masks), _tiny_cfg(steps=6, average_last=0.5))
    assert c_last == c_avg  # the same training trajectory
    w_last, w_avg = last.state_dict(), avg.state_dict()
    conv = "inc.0.weight"
    assert not torch.equal(w_last[conv], w_avg[conv])
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in w_avg.items())
    # the mean of the weights after steps 3, 4, 5 (0-based) equals the averaged model's weights
    snaps = []
    for steps in (4, 5, 6):
        cfg = _tiny_cfg(steps=6)
        model = segnet.build_model(cfg).train()
        opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
        data = segnet.prepare_training_data(list(images), list(masks), cfg.size)
        for step in range(steps):
            x, y = segnet.make_batch(data, segnet.batch_indices(cfg.seed, step, cfg.batch_size, len(data)), cfg, step)
            loss = torch.nn.functional.binary_cross_entropy_with_logits(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        snaps.append(model.state_dict()[conv].clone())
    assert torch.allclose(torch.stack(snaps).mean(0), w_avg[conv], atol=1e-6)
    bn = "inc.1.running_mean"
    assert not torch.equal(w_avg[bn], w_last[bn])  # recomputed, not the last model's


def test_ensemble_averages_members_trained_with_disjoint_seeds():
    """ensemble = K: member k is the one-network training with seed seed·K + k; the ensemble's
    probability is the members' mean (so seeds 0 and 1 share no member); workers do not change it,
    and the saved weights load back into `build_model`."""
    images, masks, _, _ = toy.generate_arrays(3, seed=4, size=32, background_fraction=0.0)
    cfg = _tiny_cfg(steps=3, seed=1, ensemble=2)
    assert [c.seed for c in segnet.member_configs(cfg)] == [2, 3]
    assert [c.seed for c in segnet.member_configs(_tiny_cfg(seed=0, ensemble=2))] == [0, 1]
    model, curve = segnet.train_segnet(list(images), list(masks), cfg)
    singles = [segnet.train_segnet(list(images), list(masks), _tiny_cfg(steps=3, seed=s)) for s in (2, 3)]
    np.testing.assert_allclose(curve, np.mean([c for _, c in singles], axis=0), rtol=1e-6)
    for member, (single, _) in zip(model.members, singles):
        assert all(torch.equal(v, single.state_dict()[k]) for k, v in member.state_dict().items())
    probs = segnet.predict_proba(model, list(images), cfg)
    member_probs = [segnet.predict_proba(m, list(images), cfg) for m, _ in singles]
    for p, a, b in zip(probs, *member_probs):
        np.testing.assert_allclose(p, (a + b) / 2, atol=1e-5)
        assert not np.allclose(a, b, atol=1e-3)  # the members differ
    again = segnet.build_model(cfg)
    again.load_state_dict(model.state_dict())
    np.testing.assert_allclose(segnet.predict_proba(again, list(images), cfg)[0], probs[0], atol=1e-6)
    pooled = segnet.train_many({"row": (list(images), list(masks))}, cfg, workers=2)["row"][0]
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in pooled.state_dict().items())
