"""The toy world's FID feature network (`python -m fgbg_utils train-toy --model features`).

FID needs an image embedding in which the data's own variation is meaningful. Inception-v3 (the
field's choice) knows ImageNet, not coloured shapes on synthetic backgrounds, and is not shipped
here; the toy world gets a small CNN of its own instead, trained to name what the toy generator
draws (`fgbg_utils.data.toy.render_sample`): the object's shape (or none), its colour (or none) and
the background kind. Its FID features are the 32-d linear embedding under the three heads.

Recipe: corpus seed 2000 (toy generator v2, 15 % background-only images), held-out world seed
2001; AdamW, cosine lr, batch 64, one CPU thread, torch seed 0. It ships in models/toy-features
as model.safetensors + config.json + training_info.json (recipe, steps, wall time, held-out
accuracy per head)."""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fgbg_utils.data import toy

HEADS = {"kind": ("none", *toy.KINDS), "colour": ("none", *toy.COLOURS), "background": toy.BACKGROUNDS}
RECIPE = {"train_seed": 2000, "heldout_seed": 2001, "n_train": 12000, "n_heldout": 1000,
          "background_fraction": 0.15, "image_size": 64, "steps": 2000, "batch_size": 64,
          "lr": 3e-3, "weight_decay": 1e-4, "torch_seed": 0, "threads": 1}
ARCH = {"widths": [16, 32, 64, 64], "features": 32}


class ToyFeatureNet(nn.Module):
    """uint8 RGB images (N, 3, H, W) -> features (N, `features`); `logits` gives the three heads.
    A stride-2 stem, then per width a 3x3 convolution and a stride-2 one, batch norm (eval mode:
    deterministic), global average pooling."""

    def __init__(self, widths=(16, 32, 64, 64), features: int = 32, heads: dict | None = None):
        super().__init__()
        heads = HEADS if heads is None else heads
        layers, c = [nn.Conv2d(3, widths[0], 3, stride=2, padding=1), nn.BatchNorm2d(widths[0]), nn.ReLU()], widths[0]
        for w in widths[1:]:
            layers += [nn.Conv2d(c, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(),
                       nn.Conv2d(w, w, 3, stride=2, padding=1), nn.BatchNorm2d(w), nn.ReLU()]
            c = w
        self.trunk = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.embed = nn.Linear(c, features)
        self.heads = nn.ModuleDict({k: nn.Linear(features, len(v)) for k, v in heads.items()})
        self.num_features = int(features)  # read by torchmetrics' FrechetInceptionDistance
        self.toy_world = True  # its features describe toy images only (stage 05 refuses other data)

    def _embedding(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float() / 127.5 - 1 if images.dtype == torch.uint8 else images.float()
        return self.embed(self.trunk(x))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self._embedding(images)

    def logits(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        e = torch.relu(self._embedding(images))
        return {k: head(e) for k, head in self.heads.items()}


def labels_of(metas: list[dict]) -> dict[str, np.ndarray]:
    """Class indices per head from `toy.generate_arrays` metadata (none for background-only)."""
    pick = lambda head, value: HEADS[head].index(value if value is not None else "none")  # noqa: E731
    return {"kind": np.array([pick("kind", m["kind"]) for m in metas]),
            "colour": np.array([pick("colour", m["colour"]) for m in metas]),
            "background": np.array([HEADS["background"].index(m["background"]) for m in metas])}


def _nchw(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).contiguous()


@torch.no_grad()
def accuracy(model: ToyFeatureNet, images: np.ndarray, labels: dict, batch_size: int = 250) -> dict:
    """Share of correct predictions per head on (N, H, W, 3) uint8 images."""
    model.eval()
    hits = {k: 0 for k in HEADS}
    for s in range(0, len(images), batch_size):
        out = model.logits(_nchw(images[s:s + batch_size]))
        for k in HEADS:
            hits[k] += int((out[k].argmax(1).numpy() == labels[k][s:s + batch_size]).sum())
    return {k: round(v / len(images), 4) for k, v in hits.items()}


def train_feature_net(out_dir: str | Path = "models/toy-features", recipe: dict | None = None,
                      log=print) -> dict:
    """Train ToyFeatureNet on the toy generator's labels and save it to `out_dir`; returns
    training_info (also written as training_info.json)."""
    r = {**RECIPE, **(recipe or {})}
    threads = torch.get_num_threads()
    torch.set_num_threads(int(r["threads"]))
    try:
        return _train(out_dir, r, log)
    finally:
        torch.set_num_threads(threads)


def _train(out_dir, r: dict, log) -> dict:
    from fgbg_utils.io import atomic_save_safetensors, atomic_write_json

    torch.manual_seed(int(r["torch_seed"]))
    t0 = time.time()
    images, _, _, metas = toy.generate_arrays(r["n_train"], r["train_seed"], r["image_size"], r["background_fraction"])
    held, _, _, held_metas = toy.generate_arrays(r["n_heldout"], r["heldout_seed"], r["image_size"],
                                                 r["background_fraction"])
    labels, held_labels = labels_of(metas), labels_of(held_metas)
    t_data = time.time() - t0
    model = ToyFeatureNet(ARCH["widths"], ARCH["features"])
    opt = torch.optim.AdamW(model.parameters(), lr=r["lr"], weight_decay=r["weight_decay"])
    order = np.random.default_rng(r["torch_seed"])
    steps, bs = int(r["steps"]), int(r["batch_size"])
    loss_fn, curve, perm, pos = nn.CrossEntropyLoss(), [], order.permutation(len(images)), 0
    model.train()
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = r["lr"] * 0.5 * (1 + math.cos(math.pi * step / steps))
        if pos + bs > len(perm):
            perm, pos = order.permutation(len(images)), 0
        idx = perm[pos:pos + bs]
        pos += bs
        out = model.logits(_nchw(images[idx]))
        loss = sum(loss_fn(out[k], torch.from_numpy(labels[k][idx])) for k in HEADS)
        opt.zero_grad()
        loss.backward()
        opt.step()
        curve.append(loss.item())
        if (step + 1) % max(1, steps // 10) == 0:
            log(f"feature net step {step + 1}/{steps}: loss {np.mean(curve[-50:]):.4f}")
    model.eval()
    info = {"recipe": r, "arch": ARCH, "heads": {k: list(v) for k, v in HEADS.items()},
            "generator_version": toy.GENERATOR_VERSION, "steps": steps,
            "seconds": round(time.time() - t0, 1), "seconds_data": round(t_data, 1),
            "final_loss": round(float(np.mean(curve[-50:])), 4),
            "heldout_accuracy": accuracy(model, held, held_labels),
            "command": "python -m fgbg_utils train-toy --model features",
            "features": "the 32-d linear embedding under the heads (FID features)"}
    out = Path(out_dir)
    atomic_save_safetensors(out / "model.safetensors", model.state_dict())
    atomic_write_json(out / "config.json", {"class": "ToyFeatureNet", **ARCH,
                                            "heads": info["heads"],
                                            "input": "uint8 RGB (N, 3, H, W); trained at 64 px"})
    atomic_write_json(out / "training_info.json", info)
    log(f"feature net saved to {out}: held-out accuracy {info['heldout_accuracy']} in {info['seconds']} s")
    return info


def load_feature_net(folder: str | Path) -> ToyFeatureNet:
    """The feature network saved by `train_feature_net` (config.json + model.safetensors), in
    eval mode."""
    from safetensors.torch import load_file

    folder = Path(folder)
    cfg = json.loads((folder / "config.json").read_text())
    model = ToyFeatureNet(cfg["widths"], cfg["features"], {k: tuple(v) for k, v in cfg["heads"].items()})
    model.load_state_dict(load_file(str(folder / "model.safetensors")))
    return model.eval()
