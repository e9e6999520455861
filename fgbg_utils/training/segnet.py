"""Stage (f): the evaluation segmentation network (docs/method.md §2.6), plain torch, no torchvision.

* `UNet`: classic U-Net. DoubleConv = (3×3 conv → BN → ReLU) × 2; `depth` max-pool downs with
  widths base_width·2^i (paper: 64, 128, 256, 512, 1024), `depth` transposed-conv ups with skip
  concatenation, 1×1 head giving logits (the sigmoid is applied in `predict`). Any input size works:
  an up-sampled map is zero-padded to its skip's size when the size was odd.
* Augmentation, applied jointly to image and (soft) mask:
  train: short side → size (bilinear, antialiased, for both), RandomCrop size, random hflip;
  test: short side → size, CenterCrop size.
  The short-side resize is deterministic, so it runs once per image before training (images are
  kept as uint8 after it, as a PIL pipeline would; soft masks as float16). Crops and flips come from
  np.random.default_rng([seed, step]), the batch order from one seeded permutation per epoch, and
  the weights from a seeded init: training is deterministic for a given config.
* Inputs are scaled to [0, 1] (no mean/std normalization; the first BN layer absorbs it).
* Loss: BCE with logits on the soft label, Adam, a fixed number of steps, and the *last* weights
  are returned (no model selection), or with `average_last` > 0 the average of the weights over
  that last share of the steps (stochastic weight averaging, torch.optim.swa_utils), its BatchNorm
  statistics recomputed on one epoch of training crops.
* `ensemble` = K > 1: K such networks, member k trained with seed seed·K + k (so the K-member
  ensembles of seeds 0, 1, 2 … share no member), wrapped in `Ensemble`, whose output is the logit
  of the members' mean probability: a deep ensemble, which averages out the init-seed noise of
  one network (each member alone is what `ensemble` = 1 trains with its seed).

Prediction protocols:
* `predict` (full image): resize the whole image to size × size (bilinear; aspect ratio not kept),
  predict, resize the probability back to the original size (bilinear), threshold.
* `predict_center_crop`: the official protocol, short side → size and a size × size centre crop of
  image and ground truth (`center_crop_pair`); masks are scored on the crop.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fgbg_utils.training.config import SegSettings


# ----------------------------------------------------------------------------- the network
class DoubleConv(nn.Sequential):
    def __init__(self, cin: int, cout: int):
        super().__init__(
            nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
            nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class UNet(nn.Module):
    """Classic U-Net; `forward` returns logits (B, out_channels, H, W) for any H, W."""

    def __init__(self, in_channels: int = 3, out_channels: int = 1, base_width: int = 64,
                 depth: int = 4):
        super().__init__()
        if depth < 1 or base_width < 1:
            raise ValueError(f"depth={depth} and base_width={base_width} must be >= 1")
        widths = [base_width * 2 ** i for i in range(depth + 1)]
        self.widths = widths
        self.inc = DoubleConv(in_channels, widths[0])
        self.downs = nn.ModuleList(DoubleConv(widths[i], widths[i + 1]) for i in range(depth))
        self.ups = nn.ModuleList(nn.ConvTranspose2d(widths[i + 1], widths[i], 2, stride=2)
                                 for i in reversed(range(depth)))
        self.up_convs = nn.ModuleList(DoubleConv(2 * widths[i], widths[i])
                                      for i in reversed(range(depth)))
        self.head = nn.Conv2d(widths[0], out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.inc(x)
        skips = []
        for down in self.downs:
            skips.append(x)
            x = down(F.max_pool2d(x, 2))
        for up, conv, skip in zip(self.ups, self.up_convs, reversed(skips)):
            x = up(x)
            dy, dx = skip.shape[-2] - x.shape[-2], skip.shape[-1] - x.shape[-1]
            if dy or dx:
                x = F.pad(x, [dx // 2, dx - dx // 2, dy // 2, dy - dy // 2])
            x = conv(torch.cat([skip, x], dim=1))
        return self.head(x)


class Ensemble(nn.Module):
    """K networks whose sigmoid probabilities are averaged; `forward` returns the logit of the mean,
    so thresholding and `predict` treat it like one U-Net."""

    def __init__(self, members: Sequence[nn.Module]):
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = torch.stack([torch.sigmoid(m(x).float()) for m in self.members]).mean(0)
        return torch.logit(p, eps=1e-6)


class SegConfig(SegSettings):
    """What the U-Net trainer runs with: the settings plus device and logging."""
    device: str = "auto"       # auto | cpu | cuda
    log_every: int = 500

    def to_dict(self) -> dict:
        return self.model_dump()


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def native_bf16(dev: torch.device) -> bool:
    """Whether the device computes bf16 natively (CUDA with bf16; a CPU with AVX512-BF16 or AMX)."""
    if dev.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def uses_bf16(cfg: SegConfig, dev: torch.device) -> bool:
    """bf16 autocast of the training steps: `mixed_precision` bf16, or auto on native-bf16 hardware
    (emulated bf16 made a step 15x slower on an AVX2-only CPU)."""
    return cfg.mixed_precision == "bf16" or (cfg.mixed_precision == "auto" and native_bf16(dev))


def member_configs(cfg: SegConfig) -> list[SegConfig]:
    """The one-network configs of an ensemble's members: seeds seed·K + k, k < K."""
    k = cfg.ensemble
    if k == 1:
        return [cfg]
    return [cfg.model_copy(update={"ensemble": 1, "seed": cfg.seed * k + j}) for j in range(k)]


def build_model(cfg: SegConfig) -> nn.Module:
    """The U-Net (an `Ensemble` of them when cfg.ensemble > 1) with a seeded init that leaves the
    global torch RNG untouched."""
    if cfg.ensemble > 1:
        return Ensemble([build_model(c) for c in member_configs(cfg)])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        return UNet(3, 1, cfg.base_width, cfg.depth)


# ----------------------------------------------------------------------------- geometry
def _image_tensor(image: np.ndarray) -> torch.Tensor:
    """HxW, HxWx1, HxWx3 or HxWx4 uint8 (or float in [0, 1]) -> float32 (3, H, W) in [0, 255]."""
    a = np.asarray(image)
    if a.ndim == 2:
        a = a[..., None]
    if a.ndim != 3 or a.shape[2] not in (1, 3, 4):
        raise ValueError(f"image of shape {a.shape}; expected HxW or HxWxC with C in 1, 3, 4")
    a = a[..., :3]
    if a.shape[2] == 1:
        a = np.repeat(a, 3, axis=2)
    t = torch.from_numpy(np.ascontiguousarray(a)).permute(2, 0, 1).float()
    if not np.issubdtype(a.dtype, np.integer):
        t = t * 255.0
    return t


def _mask_tensor(mask: np.ndarray, hw: tuple[int, int]) -> torch.Tensor:
    m = np.asarray(mask)
    if m.ndim == 3 and m.shape[2] == 1:
        m = m[..., 0]
    if m.shape != tuple(hw):
        raise ValueError(f"mask shape {m.shape} != image size {tuple(hw)}")
    return torch.from_numpy(np.ascontiguousarray(m, dtype=np.float32))


def _resize(t: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """Bilinear (antialiased when shrinking) resize of (C, H, W) or (B, C, H, W) float."""
    if tuple(t.shape[-2:]) == tuple(hw):
        return t
    x = t[None] if t.dim() == 3 else t
    y = F.interpolate(x, size=tuple(hw), mode="bilinear", align_corners=False, antialias=True)
    return y[0] if t.dim() == 3 else y


def short_side_hw(h: int, w: int, size: int) -> tuple[int, int]:
    """Output (h, w) of 'short side -> size' (the long side truncated, as torchvision does)."""
    if h <= w:
        return size, max(size, int(size * w / h))
    return max(size, int(size * h / w)), size


def resize_short_side(image: np.ndarray, mask: np.ndarray | None, size: int
                      ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Short side -> size, bilinear for both. Returns the image as uint8 (3, h, w) (rounded, as a
    PIL pipeline stores it) and the mask as float32 (h, w), soft values kept."""
    img = _image_tensor(image)
    hw = short_side_hw(img.shape[1], img.shape[2], size)
    out = _resize(img, hw).round().clamp(0, 255).to(torch.uint8)
    if mask is None:
        return out, None
    m = _mask_tensor(mask, img.shape[1:])
    return out, _resize(m[None], hw)[0].clamp(0, 1)


def random_crop_flip(img: torch.Tensor, mask: torch.Tensor, size: int, rng: np.random.Generator,
                     hflip: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Joint RandomCrop(size) and random horizontal flip of (C, h, w) and (h, w) with h, w >= size.
    Draws exactly three numbers from rng (top, left, flip)."""
    h, w = img.shape[-2:]
    top = int(rng.integers(0, h - size + 1))
    left = int(rng.integers(0, w - size + 1))
    flip = bool(rng.random() < 0.5) and hflip
    img = img[..., top:top + size, left:left + size]
    mask = mask[..., top:top + size, left:left + size]
    if flip:
        img, mask = img.flip(-1), mask.flip(-1)
    return img, mask


def joint_train_transform(image: np.ndarray, mask: np.ndarray, size: int,
                          rng: np.random.Generator, hflip: bool = True
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Train transform of one pair: short side -> size, RandomCrop size, hflip (jointly).
    Returns image float32 (3, size, size) in [0, 1] and soft mask float32 (size, size)."""
    img, m = resize_short_side(image, mask, size)
    img, m = random_crop_flip(img, m, size, rng, hflip)
    return img.float() / 255.0, m.float()


def _center_box(h: int, w: int, size: int) -> tuple[int, int]:
    # torchvision CenterCrop: top = round((h - size) / 2)
    return int(round((h - size) / 2.0)), int(round((w - size) / 2.0))


def center_crop_pair(image: np.ndarray, mask: np.ndarray | None, size: int
                     ) -> tuple[np.ndarray, np.ndarray | None]:
    """Test geometry of the official protocol: short side -> size, CenterCrop size.

    Returns the uint8 (size, size, 3) image crop and the ground-truth crop as bool (size, size):
    the mask is resized bilinearly and binarized at >= 0.5 (docs/method.md §2.6; a bool or {0, 1} mask may
    be passed, as may a soft one)."""
    img, m = resize_short_side(image, mask, size)
    top, left = _center_box(img.shape[1], img.shape[2], size)
    crop = img[:, top:top + size, left:left + size].permute(1, 2, 0).numpy()
    if m is None:
        return crop, None
    return crop, (m[top:top + size, left:left + size] >= 0.5).numpy()


# ----------------------------------------------------------------------------- training
def _epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch, 1]).permutation(n)


def batch_indices(seed: int, step: int, batch_size: int, n: int) -> np.ndarray:
    """Sample indices of one step: consecutive slices of per-epoch seeded permutations."""
    pos = np.arange(step * batch_size, (step + 1) * batch_size)
    epochs, within = pos // n, pos % n
    cache: dict[int, np.ndarray] = {}
    out = np.empty(batch_size, np.int64)
    for k, (e, i) in enumerate(zip(epochs, within)):
        if e not in cache:
            cache[e] = _epoch_order(seed, int(e), n)
        out[k] = cache[e][i]
    return out


def make_batch(data: Sequence[tuple[torch.Tensor, torch.Tensor]], idx: np.ndarray, cfg: SegConfig,
               step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Crops and flips of one step, seeded by np.random.default_rng([cfg.seed, step])."""
    rng = np.random.default_rng([cfg.seed, step])
    xs, ys = [], []
    for i in idx:
        img, m = random_crop_flip(*data[int(i)], cfg.size, rng, cfg.hflip)
        xs.append(img)
        ys.append(m)
    return torch.stack(xs).float() / 255.0, torch.stack(ys).float()[:, None]


def prepare_training_data(images: Sequence[np.ndarray], masks: Sequence[np.ndarray], size: int
                          ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Short side -> size once per pair: (uint8 image, float16 soft mask)."""
    if len(images) != len(masks):
        raise ValueError(f"{len(images)} images but {len(masks)} masks")
    if not len(images):
        raise ValueError("no training images")
    out = []
    for img, m in zip(images, masks):
        a, b = resize_short_side(img, m, size)
        out.append((a, b.to(torch.float16)))
    return out


def train_segnet(images: Sequence[np.ndarray], masks: Sequence[np.ndarray], cfg: SegConfig,
                 log: Callable[[str], None] | None = None, progress: bool = False
                 ) -> tuple[nn.Module, list[float]]:
    """Train the U-Net (an ensemble of them when cfg.ensemble > 1) for cfg.steps steps on (image,
    soft mask) pairs; images may differ in size.

    Returns the last model (eval mode, on cfg.device) and the per-step training loss curve.
    `log`, if given, receives a one-line message every cfg.log_every steps and at the end."""
    return train_prepared(prepare_training_data(images, masks, cfg.size), cfg, log, progress)


def train_prepared(data: list[tuple[torch.Tensor, torch.Tensor]], cfg: SegConfig,
                   log: Callable[[str], None] | None = None, progress: bool = False
                   ) -> tuple[nn.Module, list[float]]:
    """`train_segnet` on pairs already resized by `prepare_training_data`. An ensemble's members
    train one after another; its curve is their mean."""
    if cfg.ensemble > 1:
        trained = [train_prepared(data, c, log, progress) for c in member_configs(cfg)]
        return _assemble(cfg, [t[0] for t in trained], [t[1] for t in trained])
    dev = resolve_device(cfg.device)
    model = build_model(cfg).to(dev).train()
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    if cfg.lr_schedule not in ("constant", "cosine"):
        raise ValueError(f"lr_schedule={cfg.lr_schedule!r}; use constant or cosine")
    factor = (lambda k: 0.5 * (1 + math.cos(math.pi * k / cfg.steps))) if cfg.lr_schedule == "cosine" \
        else (lambda k: 1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    curve: list[float] = []
    bf16 = uses_bf16(cfg, dev)
    averaged = torch.optim.swa_utils.AveragedModel(model) if cfg.average_last > 0 else None
    average_from = int(round(cfg.steps * (1 - cfg.average_last)))
    steps = range(cfg.steps)
    if progress:
        from tqdm.auto import tqdm
        steps = tqdm(steps, desc="segnet")
    for step in steps:
        idx = batch_indices(cfg.seed, step, cfg.batch_size, len(data))
        x, y = make_batch(data, idx, cfg, step)
        x, y = x.to(dev), y.to(dev)
        with torch.autocast(dev.type, torch.bfloat16, enabled=bf16):
            logits = model(x)
        loss = F.binary_cross_entropy_with_logits(logits.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if averaged is not None and step >= average_from:
            averaged.update_parameters(model)
        curve.append(float(loss.detach()))
        if not math.isfinite(curve[-1]):
            raise FloatingPointError(f"segmentation loss became {curve[-1]} at step {step}; "
                                     f"lower `lr` (now {cfg.lr})")
        if log is not None and ((step + 1) % max(1, cfg.log_every) == 0 or step + 1 == cfg.steps):
            recent = curve[-max(1, cfg.log_every):]
            log(f"segnet step {step + 1}/{cfg.steps}: loss {curve[-1]:.4f} "
                f"(mean of last {len(recent)}: {float(np.mean(recent)):.4f})")
    if averaged is not None:
        model = _with_bn_statistics(averaged.module, data, cfg, dev)
    return model.eval(), curve


def _assemble(cfg: SegConfig, members: list, curves: list[list[float]]) -> tuple[nn.Module, list[float]]:
    """An ensemble of trained members and the mean of their loss curves."""
    model = Ensemble(members).to(resolve_device(cfg.device)).eval()
    return model, [float(v) for v in np.mean(np.asarray(curves, dtype=np.float64), axis=0)]


def _with_bn_statistics(model: UNet, data, cfg: SegConfig, dev: torch.device) -> UNet:
    """BatchNorm running statistics of averaged weights, recomputed on one epoch of training crops
    (seeded as steps cfg.steps, cfg.steps + 1, ... would be)."""
    n_batches = max(1, math.ceil(len(data) / cfg.batch_size))
    batches = []
    for k in range(cfg.steps, cfg.steps + n_batches):
        x, _ = make_batch(data, batch_indices(cfg.seed, k, cfg.batch_size, len(data)), cfg, k)
        batches.append(x.to(dev))
    torch.optim.swa_utils.update_bn(batches, model)
    return model


# ----------------------------------------------------------------------------- prediction
@torch.no_grad()
def _probabilities(model: nn.Module, batch: torch.Tensor, cfg: SegConfig) -> torch.Tensor:
    """(B, 3, S, S) float in [0, 1] -> sigmoid probabilities (B, S, S) on the CPU."""
    dev = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        out = []
        for start in range(0, len(batch), max(1, cfg.batch_size)):
            out.append(torch.sigmoid(model(batch[start:start + cfg.batch_size].to(dev)))[:, 0]
                       .float().cpu())
        return torch.cat(out)
    finally:
        model.train(was_training)


@torch.no_grad()
def predict_proba(model: nn.Module, images: Sequence[np.ndarray], cfg: SegConfig) -> list[np.ndarray]:
    """Full-image protocol, soft: whole image -> size × size (bilinear), sigmoid, probability back to
    the original H × W (bilinear). float32 maps in [0, 1]."""
    out: list[np.ndarray] = []
    chunk = max(1, cfg.batch_size)
    for start in range(0, len(images), chunk):
        part = [_image_tensor(im) for im in images[start:start + chunk]]
        x = torch.stack([_resize(t, (cfg.size, cfg.size)) for t in part]) / 255.0
        probs = _probabilities(model, x, cfg)
        for t, p in zip(part, probs):
            out.append(_resize(p[None], tuple(t.shape[1:]))[0].clamp(0, 1).numpy())
    return out


def predict(model: nn.Module, images: Sequence[np.ndarray], cfg: SegConfig) -> list[np.ndarray]:
    """Full-image protocol: bool masks at each image's original size (probability > threshold)."""
    return [p > cfg.threshold for p in predict_proba(model, images, cfg)]


@torch.no_grad()
def predict_center_crop(model: nn.Module, images: Sequence[np.ndarray],
                        masks: Sequence[np.ndarray] | None, cfg: SegConfig
                        ) -> tuple[list[np.ndarray], list[np.ndarray] | None]:
    """The official centre-crop protocol: short side -> size, CenterCrop size, predict.

    Returns (predicted bool size × size masks, ground-truth bool crops from `center_crop_pair`, or
    None when masks is None)."""
    if masks is not None and len(masks) != len(images):
        raise ValueError(f"{len(images)} images but {len(masks)} masks")
    preds: list[np.ndarray] = []
    gts: list[np.ndarray] | None = [] if masks is not None else None
    chunk = max(1, cfg.batch_size)
    for start in range(0, len(images), chunk):
        crops = []
        for k in range(start, min(start + chunk, len(images))):
            crop, gt = center_crop_pair(images[k], None if masks is None else masks[k], cfg.size)
            crops.append(torch.from_numpy(crop).permute(2, 0, 1).float() / 255.0)
            if gts is not None:
                gts.append(gt)
        probs = _probabilities(model, torch.stack(crops), cfg)
        preds.extend(p.numpy() > cfg.threshold for p in probs)
    return preds, gts


def _train_in_worker(data, cfg_dict: dict):
    torch.set_num_threads(1)
    model, curve = train_prepared(data, SegConfig(**cfg_dict))
    return {k: v.cpu() for k, v in model.state_dict().items()}, curve


def train_many(jobs: dict, cfg: SegConfig | dict, workers: int, log: Callable[[str], None] | None = None
               ) -> dict:
    """{name: (images, masks)} -> {name: (model, curve)}, each network (each member of an
    ensemble) in its own single-thread process, `workers` at a time (the results do not depend on
    `workers`). `cfg` is one config for all, or {name: config}."""
    import multiprocessing as mp
    import os
    from concurrent.futures import ProcessPoolExecutor

    from fgbg_utils.storage.lifetime import pool_worker_init

    cfgs = cfg if isinstance(cfg, dict) else {name: cfg for name in jobs}
    prepared = {name: prepare_training_data(im, m, cfgs[name].size) for name, (im, m) in jobs.items()}
    out = {}
    with ProcessPoolExecutor(max(1, workers), mp_context=mp.get_context("spawn"),
                             initializer=pool_worker_init, initargs=(os.getpid(),)) as pool:
        futures = {name: [pool.submit(_train_in_worker, data, c.model_dump()) for c in member_configs(cfgs[name])]
                   for name, data in prepared.items()}
        for name, member_futures in futures.items():
            cfg = cfgs[name]
            members, curves = [], []
            for c, fut in zip(member_configs(cfg), member_futures):
                state, curve = fut.result()
                member = build_model(c)
                member.load_state_dict(state)
                members.append(member.to(resolve_device(cfg.device)).eval())
                curves.append(curve)
            out[name] = (members[0], curves[0]) if cfg.ensemble == 1 else _assemble(cfg, members, curves)
            if log is not None:  # an ensemble's loss is its members' mean
                log(f"segnet {name}: {cfg.steps} steps, final loss {out[name][1][-1]:.4f}")
    return out
