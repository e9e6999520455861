"""Fréchet distance between image sets (FID; docs/method.md §2.6, the paper's Table 3 and Fig. 8):
torchmetrics' `FrechetInceptionDistance` with the feature network passed in (no torch-fidelity,
no torchvision, nothing downloaded).

    FID = ‖μ_r − μ_g‖² + Tr(Σ_r + Σ_g − 2 (Σ_r Σ_g)^½)

Feature networks (`load_features(path)`), each taking uint8 RGB batches (N, 3, H, W):
* a TorchScript Inception-v3 file, NVIDIA's `inception-2015-12-05.pt` (the TF-FID network that
  StyleGAN2-ADA and clean-fid use): called as `net(x, return_features=True)` on [0, 255] floats,
  resized to 299 px inside the network (StyleGAN2-ADA's protocol), 2048-d pool features;
* a folder holding a project feature network (`models/toy-features`, see
  training/feature_net.py), for the toy world.

Protocol [I]: every image (real or generated) is brought to one square size, short side resized
(bicubic) and centre-cropped, before the network; sets are compared as wholes in fixed batches."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

INCEPTION_FILE = "inception-2015-12-05.pt"
INCEPTION_URL = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt"


class FeatureNetworkError(ValueError):
    """The FID feature network is missing or unreadable; the message names the parameter and the fix."""


class TorchScriptInception(nn.Module):
    """NVIDIA's TorchScript Inception-v3 as an FID feature module (uint8 in, 2048-d out)."""

    num_features = 2048

    def __init__(self, path: str | Path):
        super().__init__()
        self.base = torch.jit.load(str(path), map_location="cpu").eval()

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.base(images.float(), return_features=True).reshape(len(images), -1)


def load_features(path: str | Path | None, param: str = "synthesis.fid_features") -> nn.Module:
    """The feature module of `path` (a TorchScript Inception file or a project feature-net folder),
    in eval mode; a missing or unreadable file raises FeatureNetworkError naming `param`."""
    how = (f"Download NVIDIA's TorchScript Inception-v3 ({INCEPTION_URL}, the file clean-fid and "
           f"StyleGAN use) and set {param}=/path/to/{INCEPTION_FILE}; for the toy world use "
           f"{param}=models/toy-features (`python -m fgbg_utils train-toy --model features` remakes "
           f"it); {param}=null skips the FID. Nothing is downloaded at run time.")
    if path is None:
        raise FeatureNetworkError(f"no FID feature network: `{param}` is null. {how}")
    p = Path(path)
    if p.is_dir():
        if not (p / "config.json").exists() or not (p / "model.safetensors").exists():
            raise FeatureNetworkError(f"`{param}`={path}: the folder has no config.json and "
                                      f"model.safetensors of a feature network. {how}")
        from fgbg_utils.training.feature_net import load_feature_net
        return load_feature_net(p)
    if not p.is_file():
        raise FeatureNetworkError(f"`{param}`={path}: the file does not exist. {how}")
    try:
        return TorchScriptInception(p).eval()
    except (RuntimeError, ValueError) as e:
        raise FeatureNetworkError(f"`{param}`={path} is not a TorchScript feature network "
                                  f"({type(e).__name__}: {str(e)[:200]}). {how}") from None


def square_uint8(image: np.ndarray, size: int) -> np.ndarray:
    """An RGB image (H, W, 3; uint8, or float in [0, 1]) as uint8 (size, size, 3): short side
    resized to `size` (bicubic), centre crop."""
    from PIL import Image

    if image.dtype != np.uint8:
        image = (np.clip(image, 0, 1) * 255).round().astype(np.uint8)
    h, w = image.shape[:2]
    if (h, w) == (size, size):
        return image
    k = size / min(h, w)
    nh, nw = max(size, round(h * k)), max(size, round(w * k))
    im = Image.fromarray(image).resize((nw, nh), Image.BICUBIC)
    top, left = (nh - size) // 2, (nw - size) // 2
    return np.asarray(im)[top:top + size, left:left + size]


def _batches(images: Sequence[np.ndarray], size: int, batch_size: int):
    for s in range(0, len(images), batch_size):
        chunk = np.stack([square_uint8(np.asarray(im), size) for im in images[s:s + batch_size]])
        yield torch.from_numpy(chunk).permute(0, 3, 1, 2).contiguous()


@torch.no_grad()
def frechet_distance(real: Sequence[np.ndarray], generated: Sequence[np.ndarray], features: nn.Module,
                     size: int, batch_size: int = 64) -> float:
    """FID between two image sets (sequences of RGB arrays) in the feature space of `features`
    (a module mapping uint8 (N, 3, H, W) to (N, F)); each set needs at least 2 images."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    if len(real) < 2 or len(generated) < 2:
        raise ValueError(f"FID needs at least 2 images per set, got {len(real)} real and "
                         f"{len(generated)} generated")
    metric = FrechetInceptionDistance(feature=features.eval(), normalize=False,
                                      input_img_size=(3, size, size))
    for batch in _batches(real, size, batch_size):
        metric.update(batch, real=True)
    for batch in _batches(generated, size, batch_size):
        metric.update(batch, real=False)
    return float(metric.compute())
