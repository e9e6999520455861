"""Training data of the fine-tuning: canvases with M_pre and their valid box, and the
deterministic per-step batch sampler (docs/method.md §2.3; see `fgbg_utils.training.finetune`).

For optimizer step s (1-based) and accumulation micro-batch j the global batch is a pure function
of (seed, s, j): image indices come from epoch permutations (every image once per epoch), each
slot's flip and mask choice from `numpy.random.default_rng([seed', s, j, slot])`. The flip mirrors
the VALID BOX only, so padding stays bottom/right.
"""
from __future__ import annotations

import numpy as np
import torch

from fgbg_utils.core import rectangles
from fgbg_utils.core.seeds import derive_seed
from fgbg_utils.training.config import FinetuneConfig


def _as_tensor(x, dtype):
    if isinstance(x, torch.Tensor):
        return x.detach().to("cpu", dtype)
    return torch.as_tensor(np.asarray(x), dtype=dtype)


class MaskedImageDataset(torch.utils.data.Dataset):
    """Canvases with their M_pre and valid box, plus the deterministic per-step batch sampler.

    ``items``: list of (image float32 3×R×R in [-1, 1], m_pre bool L×L, valid bool L×L), all in
    the canonical frame (valid = top-left box, padding bottom/right). ``__getitem__`` returns the
    raw item; training draws whole batches with `batch_for_step`.
    """

    def __init__(self, items, *, seed: int = 0, batch_size: int = 4, p_full: float = 0.5,
                 hflip: bool = True, prompt_full: str = "a photo of a shape",
                 prompt_background: str = "a photo of a background",
                 rules: rectangles.RectRules | None = None, num_processes: int = 1):
        items = list(items)
        if not items:
            raise ValueError("fine-tuning needs at least one image; the data list is empty")
        imgs, mpres, valids = [], [], []
        for i, it in enumerate(items):
            if len(it) != 3:
                raise ValueError(f"data[{i}] must be (image, m_pre, valid), got {len(it)} entries")
            img, m, v = _as_tensor(it[0], torch.float32), np.asarray(it[1], bool), np.asarray(it[2], bool)
            if img.ndim != 3 or img.shape[0] != 3 or img.shape[1] != img.shape[2]:
                raise ValueError(f"data[{i}] image must be 3×R×R (a canvas), got {tuple(img.shape)}")
            if m.ndim != 2 or m.shape[0] != m.shape[1] or v.shape != m.shape:
                raise ValueError(f"data[{i}] m_pre {m.shape} and valid {v.shape} must be equal L×L "
                                 "latent-grid masks")
            imgs.append(img), mpres.append(m), valids.append(v)
        shapes = {(tuple(a.shape), b.shape) for a, b in zip(imgs, mpres)}
        if len(shapes) != 1:
            raise ValueError(f"all canvases must share one frame; got (image, mask) shapes {sorted(shapes)}")
        self.images = torch.stack(imgs)
        self.m_pre = np.stack(mpres)
        self.valid = np.stack(valids)
        self.resolution = int(self.images.shape[-1])
        self.latent_size = int(self.m_pre.shape[-1])
        if self.resolution % self.latent_size:
            raise ValueError(f"image side {self.resolution} is not a multiple of the mask side "
                             f"{self.latent_size}")
        self.factor = self.resolution // self.latent_size
        self.valid_h = self.valid.any(2).sum(1)
        self.valid_w = self.valid.any(1).sum(1)
        for i in range(len(self)):
            box = np.zeros_like(self.valid[i])
            box[: self.valid_h[i], : self.valid_w[i]] = True
            if not self.valid[i].any() or not np.array_equal(box, self.valid[i]):
                raise ValueError(f"data[{i}] valid must be a non-empty top-left box (canonical frame)")
        self.seed = int(seed)
        self.batch_size = int(batch_size)
        self.p_full = float(p_full)
        self.hflip = bool(hflip)
        self.prompts = {"y_f": prompt_full, "y_b": prompt_background}
        self.rules = rules if rules is not None else rectangles.RectRules.for_grid(self.latent_size)
        self.num_processes = int(num_processes)
        self.latents: torch.Tensor | None = None   # (N, 2, C, L, L): [not flipped, flipped]
        self._sample_seed = derive_seed(self.seed, "finetune-sample")
        self._order_seed = derive_seed(self.seed, "finetune-order")
        self._perms: dict[int, np.ndarray] = {}

    @classmethod
    def from_config(cls, items, cfg: FinetuneConfig, num_processes: int = 1) -> "MaskedImageDataset":
        return cls(items, seed=cfg.seed, batch_size=cfg.batch_size, p_full=cfg.p_full,
                   hflip=cfg.hflip, prompt_full=cfg.prompt_full,
                   prompt_background=cfg.prompt_background, num_processes=num_processes)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, i: int) -> dict:
        return {"image": self.images[i], "m_pre": torch.from_numpy(self.m_pre[i]),
                "valid": torch.from_numpy(self.valid[i])}

    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.num_processes

    # -- flips -------------------------------------------------------------------------------
    def flip_image(self, i: int) -> torch.Tensor:
        """Image i mirrored within its valid box (padding stays right)."""
        img = self.images[i].clone()
        w = int(self.valid_w[i]) * self.factor
        img[..., :w] = img[..., :w].flip(-1)
        return img

    def flip_mask(self, i: int, m: np.ndarray) -> np.ndarray:
        """A latent-grid map of image i mirrored within its valid box."""
        m = m.copy()
        w = int(self.valid_w[i])
        m[:, :w] = m[:, :w][:, ::-1]
        return m

    def image(self, i: int, flip: bool) -> torch.Tensor:
        return self.flip_image(i) if flip else self.images[i]

    def set_latents(self, latents: torch.Tensor) -> None:
        if latents.ndim != 5 or latents.shape[0] != len(self) or latents.shape[1] != 2:
            raise ValueError(f"latents must be (N={len(self)}, 2, C, L, L), got {tuple(latents.shape)}")
        self.latents = latents

    # -- deterministic sampling ---------------------------------------------------------------
    def _index(self, n: int) -> int:
        """Image of global sample number n: epoch permutations, each image once per epoch."""
        epoch, k = divmod(int(n), len(self))
        perm = self._perms.get(epoch)
        if perm is None:
            if len(self._perms) > 8:
                self._perms.clear()
            perm = np.random.default_rng([self._order_seed, epoch]).permutation(len(self))
            self._perms[epoch] = perm
        return int(perm[k])

    def sample(self, step: int, micro: int, slot: int, index: int):
        """(flip, mask L×L bool, kind, prompt key) of one slot; a pure function of its inputs."""
        rng = np.random.default_rng([self._sample_seed, int(step), int(micro), int(slot)])
        flip = bool(self.hflip and rng.random() < 0.5)
        m_pre, valid = self.m_pre[index], self.valid[index]
        if flip:
            m_pre, valid = self.flip_mask(index, m_pre), valid  # valid box is flip-invariant
        # background = ¬M_pre ∧ valid: hand the sampler M_pre ∨ ¬valid as "foreground"
        mask, kind, key = rectangles.training_mask(m_pre | ~valid, rng, self.rules, self.p_full)
        return flip, mask & valid, kind, key

    def batch_for_step(self, step: int, micro: int = 0, with_images: bool = True,
                       accumulation_steps: int = 1) -> dict:
        """The whole global batch (batch_size × num_processes slots) of optimizer step ``step``
        (1-based) and accumulation micro-batch ``micro``.

        Returns dict(index (G,), flip (G,) bool, images (G, 3, R, R) [if with_images],
        masks (G, 1, L, L) float, prompts list[str], kinds list[str], latents (G, C, L, L) [if
        latents were set]).
        """
        g = self.global_batch_size
        first = ((int(step) - 1) * int(accumulation_steps) + int(micro)) * g
        rows = []
        for slot in range(g):
            i = self._index(first + slot)
            rows.append((i, *self.sample(step, micro, slot, i)))
        index = torch.tensor([r[0] for r in rows], dtype=torch.long)
        flip = torch.tensor([r[1] for r in rows], dtype=torch.bool)
        out = {
            "index": index,
            "flip": flip,
            "masks": torch.from_numpy(np.stack([r[2] for r in rows])[:, None].astype(np.float32)),
            "prompts": [self.prompts[r[4]] for r in rows],
            "kinds": [r[3] for r in rows],
        }
        if with_images:
            out["images"] = torch.stack([self.image(r[0], r[1]) for r in rows])
        if self.latents is not None:
            out["latents"] = self.latents[index, flip.long()]
        return out

