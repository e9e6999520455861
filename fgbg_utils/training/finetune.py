"""Concept-distillation fine-tuning m → m' (METHOD §2.3, §5.8-5.9, §6 "Fine-tuning").

ONE training loop built on `accelerate`: the same `train()` call runs in a notebook on one device
and, unchanged, in a script started with `accelerate launch` on several GPUs.

Per sample (METHOD §2.3): with probability ``p_full`` the full image with y_f and an all-ones mask
(restricted to the valid box of a padded canvas); otherwise a background rectangle from
`rectangles.training_mask` on ¬M_pre ∧ valid with y_b; masked ε-loss
`rectangles.masked_eps_loss` (``loss_norm`` "latent" | "mask").

Choices (ours, [I]):
  * Data are canvases already in the canonical frame (images padded bottom/right to R×R, M_pre
    and the valid box on the L×L latent grid). The only augmentation is the random horizontal
    flip; the official RandomCrop is not needed because every canvas is already R×R. The flip
    mirrors the VALID BOX only (columns [0, w) of the image, [0, w/f) of M_pre and the valid
    grid), so the padding stays bottom/right; for a square valid box this is a flip of the whole
    canvas. The pixel width mirrored is (latent valid width) × VAE factor, exact when the
    frame's short side is a multiple of the VAE factor (`frame.make_frame(..., multiple=f)`).
  * The "full" mask is all ones on the valid box (= all ones for an unpadded canvas): padding is
    never supervised.
  * The VAE is frozen, so z0 = scaling_factor × posterior mean is computed ONCE at the start for
    both flip states of every image (kept on the CPU) and steps only index it.
  * Determinism / exact resume: nothing depends on DataLoader or global RNG state. For optimizer
    step s (1-based) and accumulation micro-batch j the global batch (batch_size × processes
    slots) is a pure function of (seed, s, j): image indices come from epoch permutations
    (every image once per epoch), each slot's flip and mask choice from
    `numpy.random.default_rng([seed', s, j, slot])`, t and ε from a `torch.Generator` seeded by
    (seed, s, j). Process k trains slots [k·B, (k+1)·B). Resuming from a checkpoint therefore
    continues the uninterrupted run exactly (tested).
  * `batch_size` is per device; the learning rate is constant and NOT scaled with batch size or
    GPU count (METHOD §2.3). ``loss_curve`` holds, per optimizer step, the loss averaged over
    micro-batches and processes.
  * EMA: `diffusers.training_utils.EMAModel` (its default warm-up min(decay, (1+n)/(10+n)), as
    the official LitEma) over the trainable parameters (LoRA: the LoRA parameters only); the
    exported weights are the EMA weights (METHOD §2.3 "EMA weights are used for every later
    sampling step").
  * The caller's ``ldm`` is never changed, except that its frozen VAE and text encoder are moved
    to the accelerator's device: the UNet is trained on a deep copy. Use `load_finetuned` to get
    m'.
  * LoRA mode (a cheaper deviation [I], report it as one): checkpoints store only the LoRA
    weights (plus optimizer/EMA state), not the frozen base UNet.

Output folder ``out_dir``::

    checkpoints/step_000200/   accelerate.save_state (model/LoRA, optimizer, EMA, RNG) +
                               fgbg_state.json; written to .tmp_step_* then renamed; last 2 kept
    unet/                      full mode: EMA UNet (save_pretrained, safetensors)
    lora/                      LoRA mode: adapter_model.safetensors + adapter_config.json
    fgbg_finetune.json         written last: its presence marks a finished export

`Accelerator` keeps process-wide state: inside one Python process (a notebook) every run must use
the same ``mixed_precision``; restart the kernel to change it.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import re
import shutil
import time
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from fgbg_utils.core import rectangles
from fgbg_utils.io import atomic_write_json, read_json
from fgbg_utils.core.models import LDM, encode_images, encode_prompt
from fgbg_utils.core.seeds import derive_seed

MODES = ("full", "lora")
MIXED_PRECISIONS = ("no", "bf16", "fp16")
KINDS = ("full", "box", "fallback", "empty")
LORA_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]
META_NAME = "fgbg_finetune.json"
STATE_NAME = "fgbg_state.json"
LORA_WEIGHTS = "adapter_model.safetensors"
KEEP_CHECKPOINTS = 2
# config fields that may change between a checkpoint and the run resuming from it
RESUME_FREE = ("max_train_steps", "checkpoint_every", "gradient_checkpointing", "mixed_precision")


# ----------------------------------------------------------------------------- configuration
@dataclass
class FinetuneConfig:
    """Fine-tuning settings (METHOD §2.3). ``max_train_steps`` is required (§5.8)."""

    max_train_steps: int | None
    batch_size: int = 4                      # per device
    learning_rate: float = 1e-4              # constant, AdamW torch defaults (weight decay 0.01)
    p_full: float = 0.5
    loss_norm: str = "latent"                # "latent" (official) | "mask" [I]
    mode: str = "full"                       # "full" | "lora" [I]
    lora_rank: int = 4
    ema_decay: float = 0.9999
    use_ema: bool = True
    gradient_accumulation_steps: int = 1
    mixed_precision: str = "no"              # "no" | "bf16" | "fp16"
    gradient_checkpointing: bool = False
    checkpoint_every: int = 200
    seed: int = 0
    prompt_full: str = "a photo of a shape"
    prompt_background: str = "a photo of a background"
    hflip: bool = True

    def __post_init__(self):
        if self.max_train_steps is None or int(self.max_train_steps) < 1:
            raise ValueError(f"finetune.max_train_steps must be set to a positive number of optimizer "
                             f"steps (got {self.max_train_steps!r}); training is always bounded "
                             f"and the value is stored with the checkpoint (METHOD §5.8).")
        self.max_train_steps = int(self.max_train_steps)
        checks = [
            (self.batch_size >= 1, "finetune.batch_size must be >= 1"),
            (self.learning_rate > 0, "finetune.learning_rate must be > 0"),
            (0.0 <= self.p_full <= 1.0, "finetune.p_full must be in [0, 1]"),
            (self.loss_norm in rectangles.LOSS_NORMS,
             f"finetune.loss_norm must be one of {rectangles.LOSS_NORMS}"),
            (self.mode in MODES, f"finetune.mode must be one of {MODES}"),
            (self.lora_rank >= 1, "finetune.lora_rank must be >= 1"),
            (0.0 <= self.ema_decay <= 1.0, "finetune.ema_decay must be in [0, 1]"),
            (self.gradient_accumulation_steps >= 1, "finetune.gradient_accumulation_steps must be >= 1"),
            (self.mixed_precision in MIXED_PRECISIONS,
             f"finetune.mixed_precision must be one of {MIXED_PRECISIONS}"),
            (self.checkpoint_every >= 1, "finetune.checkpoint_every must be >= 1"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(f"{msg} (got {self})")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------- fingerprints
def unet_config_hash(unet) -> str:
    """sha256 of the UNet config as sorted JSON, keys starting with "_" excluded."""
    cfg = {k: v for k, v in dict(unet.config).items() if not k.startswith("_")}
    return hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode()).hexdigest()


def _weights_fingerprint(unet) -> str:
    """Cheap identity check of the base weights (conv_in / conv_out, rounded to fp16)."""
    h = hashlib.sha256()
    for name in ("conv_in", "conv_out"):
        mod = getattr(unet, name, None)
        if mod is not None:
            h.update(mod.weight.detach().to("cpu", torch.float16).numpy().tobytes())
    return h.hexdigest()


# ----------------------------------------------------------------------------- data
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


def step_noise(seed: int, step: int, micro: int, n: int, shape: tuple, num_train_timesteps: int):
    """(t (n,) long, ε (n, *shape)) for one micro-batch of the global batch; CPU, seeded by
    (seed, step, micro) only."""
    gen = torch.Generator().manual_seed(derive_seed(int(seed), "finetune-noise", f"{int(step)}:{int(micro)}"))
    t = torch.randint(0, int(num_train_timesteps), (n,), generator=gen, dtype=torch.long)
    noise = torch.randn((n, *shape), generator=gen)
    return t, noise


# ----------------------------------------------------------------------------- losses / steps
def _target(noise_scheduler, z0, noise, t):
    kind = noise_scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return noise_scheduler.get_velocity(z0, noise, t)
    raise ValueError(f"unsupported prediction_type {kind!r} (epsilon or v_prediction)")


def masked_step_loss(unet, noise_scheduler, z0, noise, t, emb, mask, loss_norm: str = "latent"):
    """Forward + masked ε-loss of one batch (METHOD §2.3): the whole latent is noised, only the
    mask is supervised."""
    zt = noise_scheduler.add_noise(z0, noise, t)
    pred = unet(zt, t, encoder_hidden_states=emb).sample
    target = _target(noise_scheduler, z0, noise, t)
    return rectangles.masked_eps_loss(pred.float(), target.float(), mask, loss_norm)


def bare_diffusers_step(unet, optimizer, noise_scheduler, z0, noise, t, emb) -> torch.Tensor:
    """One plain diffusers text-to-image training step (examples/text_to_image, no masks, no
    EMA, no accelerate): noise, predict, unmasked MSE, backward, optimizer step. Returns the
    (pre-update) loss."""
    zt = noise_scheduler.add_noise(z0, noise, t)
    pred = unet(zt, t, encoder_hidden_states=emb).sample
    loss = F.mse_loss(pred.float(), _target(noise_scheduler, z0, noise, t).float(), reduction="mean")
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


# ----------------------------------------------------------------------------- the trainer
def _lora_config(rank: int):
    from peft import LoraConfig
    return LoraConfig(r=int(rank), lora_alpha=int(rank), init_lora_weights="gaussian",
                      target_modules=list(LORA_TARGETS))


def _add_lora(unet, config, seed: int) -> None:
    """Add the adapter with a seeded init without touching the caller's global RNG."""
    dev = next(unet.parameters()).device
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
        torch.manual_seed(derive_seed(seed, "finetune-lora-init"))
        unet.add_adapter(config)


class Finetuner:
    """State of one fine-tuning run on an `accelerate.Accelerator` (used by `train`; exposed for
    benchmarks). `train_step(s)` performs optimizer step s (1-based)."""

    def __init__(self, ldm: LDM, data, cfg: FinetuneConfig, accelerator):
        from diffusers import DDPMScheduler
        from diffusers.training_utils import EMAModel

        self.cfg, self.acc = cfg, accelerator
        dev = accelerator.device
        self.dataset = data if isinstance(data, MaskedImageDataset) else \
            MaskedImageDataset.from_config(data, cfg)
        self.dataset.num_processes = accelerator.num_processes
        if (self.dataset.latent_size, self.dataset.resolution) != (ldm.latent_size, ldm.resolution):
            raise ValueError(f"the data are {self.dataset.resolution}px canvases with "
                             f"{self.dataset.latent_size}² masks but {ldm.path!r} works at "
                             f"{ldm.resolution}px / {ldm.latent_size}² latents")
        self.base_config_hash = unet_config_hash(ldm.unet)
        self.base_fingerprint = _weights_fingerprint(ldm.unet)

        # frozen parts: used once, here
        for m in (ldm.vae, ldm.text_encoder):
            m.requires_grad_(False).eval().to(dev)
        self.emb = {p: encode_prompt(ldm, p).to(dev, torch.float32)
                    for p in dict.fromkeys(self.dataset.prompts.values())}
        self.dataset.set_latents(self._encode_all(ldm))

        unet = copy.deepcopy(ldm.unet).to(dev)
        if unet.dtype != torch.float32:  # trainable weights stay fp32 (autocast does the rest)
            unet.to(torch.float32)
        unet.requires_grad_(False)
        if cfg.mode == "lora":
            _add_lora(unet, _lora_config(cfg.lora_rank), cfg.seed)
            for n, p in unet.named_parameters():
                p.requires_grad_("lora_" in n)
        else:
            unet.requires_grad_(True)
        if cfg.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        unet.train()
        self.param_names = [n for n, p in unet.named_parameters() if p.requires_grad]
        self.params = [p for p in unet.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("no trainable parameters (LoRA found no target modules?)")
        optimizer = torch.optim.AdamW(self.params, lr=cfg.learning_rate)  # torch defaults, wd 0.01
        if cfg.mode == "lora":
            accelerator.register_save_state_pre_hook(self._save_hook)
            accelerator.register_load_state_pre_hook(self._load_hook)
        self.unet, self.optimizer = accelerator.prepare(unet, optimizer)
        self.ema = None
        if cfg.use_ema:
            self.ema = EMAModel(self.params, decay=cfg.ema_decay)
            self.ema.to(dev)
            accelerator.register_for_checkpointing(self.ema)
        self.noise_scheduler = DDPMScheduler.from_config(ldm.scheduler.config)
        self.latent_shape = tuple(self.dataset.latents.shape[2:])
        self.kinds: Counter = Counter({k: 0 for k in KINDS})
        self.loss_curve: list[float] = []

    @torch.no_grad()
    def _encode_all(self, ldm, chunk: int = 8) -> torch.Tensor:
        ds, out = self.dataset, []
        for lo in range(0, len(ds), chunk):
            idx = range(lo, min(lo + chunk, len(ds)))
            pair = [encode_images(ldm, torch.stack([ds.image(i, f) for i in idx])).float().cpu()
                    for f in (False, True)]
            out.append(torch.stack(pair, 1))
        return torch.cat(out)

    # accelerate hooks (LoRA): checkpoints hold only the adapter weights
    def _save_hook(self, models, weights, output_dir):
        from peft.utils import get_peft_model_state_dict
        from safetensors.torch import save_file
        if self.acc.is_main_process:
            sd = get_peft_model_state_dict(self.acc.unwrap_model(models[0]))
            save_file({k: v.detach().contiguous().cpu() for k, v in sd.items()},
                      os.path.join(output_dir, LORA_WEIGHTS))
        if weights:
            weights.pop(0)

    def _load_hook(self, models, input_dir):
        from peft.utils import set_peft_model_state_dict
        from safetensors.torch import load_file
        model = self.acc.unwrap_model(models.pop(0))
        _load_lora_into(model, load_file(os.path.join(input_dir, LORA_WEIGHTS)), input_dir,
                        set_peft_model_state_dict)

    def unwrapped(self):
        return self.acc.unwrap_model(self.unet)

    def train_step(self, step: int) -> float:
        cfg, acc, ds = self.cfg, self.acc, self.dataset
        dev, b, r = acc.device, cfg.batch_size, acc.process_index
        mine = slice(r * b, (r + 1) * b)
        total = 0.0
        for micro in range(cfg.gradient_accumulation_steps):
            batch = ds.batch_for_step(step, micro, with_images=False,
                                      accumulation_steps=cfg.gradient_accumulation_steps)
            self.kinds.update(batch["kinds"])
            t, noise = step_noise(cfg.seed, step, micro, ds.global_batch_size, self.latent_shape,
                                  self.noise_scheduler.config.num_train_timesteps)
            z0 = batch["latents"][mine].to(dev)
            mask = batch["masks"][mine].to(dev)
            emb = torch.cat([self.emb[p] for p in batch["prompts"][mine]])
            with acc.accumulate(self.unet):
                loss = masked_step_loss(self.unet, self.noise_scheduler, z0, noise[mine].to(dev),
                                        t[mine].to(dev), emb, mask, cfg.loss_norm)
                acc.backward(loss)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
            total += acc.gather(loss.detach().float().reshape(1)).mean().item()
        if self.ema is not None and acc.sync_gradients:
            self.ema.step(self.params)
        value = total / cfg.gradient_accumulation_steps
        self.loss_curve.append(value)
        return value

    def kind_counts(self) -> dict:
        return {k: int(self.kinds.get(k, 0)) for k in KINDS}


def _load_lora_into(unet, state_dict, where, set_peft_model_state_dict=None):
    if set_peft_model_state_dict is None:
        from peft.utils import set_peft_model_state_dict
    res = set_peft_model_state_dict(unet, state_dict)
    missing = [k for k in getattr(res, "missing_keys", []) if "lora_" in k]
    unexpected = list(getattr(res, "unexpected_keys", []))
    if missing or unexpected:
        raise ValueError(f"LoRA weights in {where} do not match the adapter "
                         f"(missing {missing[:3]}, unexpected {unexpected[:3]})")


# ----------------------------------------------------------------------------- checkpoints
_CKPT = re.compile(r"^step_(\d{6,})$")


def list_checkpoints(out_dir) -> list[tuple[int, Path]]:
    """Finished checkpoints (step, folder), oldest first."""
    ck = Path(out_dir) / "checkpoints"
    if not ck.is_dir():
        return []
    found = []
    for p in ck.iterdir():
        m = _CKPT.match(p.name)
        if m and p.is_dir() and (p / STATE_NAME).exists():
            found.append((int(m.group(1)), p))
    return sorted(found)


def _counts_summary(kinds: dict) -> tuple[int, float]:
    n = sum(kinds.values())
    return n, (kinds.get("empty", 0) / n if n else 0.0)


def _check_resumable(state: dict, cfg: FinetuneConfig, base_hash: str, where: Path) -> None:
    if state.get("base_unet_config_hash") != base_hash:
        raise ValueError(f"checkpoint {where} was trained from base {state.get('base_model')!r} "
                         "with a different UNet config; resume with that base model or use a new "
                         "out_dir.")
    old, new = state.get("config", {}), cfg.to_dict()
    diff = {k: (old.get(k), v) for k, v in new.items() if k not in RESUME_FREE and old.get(k) != v}
    if diff:
        raise ValueError(f"cannot resume from {where}: settings differ from the checkpoint "
                         f"({', '.join(f'finetune.{k}: {a!r} -> {b!r}' for k, (a, b) in diff.items())}). "
                         "Restore them, or train into a new out_dir (or pass resume=False on an "
                         "empty one).")
    if state["step"] > cfg.max_train_steps:
        raise ValueError(f"checkpoint {where} is at step {state['step']}, beyond "
                         f"finetune.max_train_steps={cfg.max_train_steps}; raise max_train_steps "
                         "or use a new out_dir.")


def _save_checkpoint(run: Finetuner, out: Path, step: int, state: dict) -> Path:
    acc = run.acc
    ck = out / "checkpoints"
    final, tmp = ck / f"step_{step:06d}", ck / f".tmp_step_{step:06d}"
    if acc.is_main_process:
        ck.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    acc.wait_for_everyone()
    if not final.exists():
        acc.save_state(str(tmp))
        acc.wait_for_everyone()
        if acc.is_main_process:
            atomic_write_json(tmp / STATE_NAME, state)
            os.replace(tmp, final)
            for _, old in list_checkpoints(out)[:-KEEP_CHECKPOINTS]:
                shutil.rmtree(old, ignore_errors=True)
    acc.wait_for_everyone()
    return final


def _replace_dir(tmp: Path, final: Path) -> None:
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)


def _export(run: Finetuner, out: Path) -> None:
    """Main process: EMA weights into the trained copy, then unet/ (full) or lora/ (LoRA)."""
    unet = run.unwrapped()
    if run.ema is not None:
        run.ema.copy_to(run.params)
    if run.cfg.mode == "full":
        tmp = out / ".tmp_unet"
        shutil.rmtree(tmp, ignore_errors=True)
        unet.save_pretrained(tmp, safe_serialization=True)
        _replace_dir(tmp, out / "unet")
    else:
        from peft.utils import get_peft_model_state_dict
        from safetensors.torch import save_file
        tmp = out / ".tmp_lora"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        sd = get_peft_model_state_dict(unet)
        save_file({k: v.detach().contiguous().cpu() for k, v in sd.items()}, str(tmp / LORA_WEIGHTS))
        unet.peft_config["default"].save_pretrained(str(tmp))
        _replace_dir(tmp, out / "lora")


def _check_out_dir_mode(out: Path, mode: str) -> None:
    other = out / ("lora" if mode == "full" else "unet")
    if other.exists():
        raise ValueError(f"{out} already holds {other.name}/ from a "
                         f"{'LoRA' if mode == 'full' else 'full'} fine-tuning run; LoRA and full "
                         "fine-tuning outputs are never mixed. Use a new out_dir.")


def _make_accelerator(cfg: FinetuneConfig, out: Path):
    from accelerate import Accelerator
    try:
        return Accelerator(gradient_accumulation_steps=cfg.gradient_accumulation_steps,
                           mixed_precision=cfg.mixed_precision, project_dir=str(out))
    except ValueError as e:
        if "already been initialized" in str(e):
            raise ValueError(f"finetune.mixed_precision={cfg.mixed_precision!r} differs from an "
                             "earlier run in this Python process; accelerate fixes it per process. "
                             "Restart the kernel to change it.") from e
        raise


# ----------------------------------------------------------------------------- train
def train(ldm: LDM, data: list, cfg: FinetuneConfig, out_dir, resume: bool = True,
          log: Callable[[str], None] | None = None, progress: bool = True,
          accelerator=None) -> dict:
    """Fine-tune ``ldm``'s UNet on ``data`` (list of (canvas, m_pre, valid)); returns the
    summary also written to ``out_dir/fgbg_finetune.json``. See the module docstring."""
    from tqdm.auto import tqdm

    t_start = time.perf_counter()
    out = Path(out_dir)
    acc = accelerator if accelerator is not None else _make_accelerator(cfg, out)
    main = acc.is_main_process

    def say(msg: str) -> None:
        if main:
            (log or print)(msg)

    _check_out_dir_mode(out, cfg.mode)
    if main:
        out.mkdir(parents=True, exist_ok=True)
        for p in (out / "checkpoints").glob(".tmp_step_*"):  # interrupted saves
            shutil.rmtree(p, ignore_errors=True)
    acc.wait_for_everyone()

    run = Finetuner(ldm, data, cfg, acc)
    seconds_before, start = 0.0, 1
    ckpts = list_checkpoints(out)
    if ckpts and not resume:
        raise ValueError(f"{out} already holds checkpoints (latest {ckpts[-1][1].name}); pass "
                         "resume=True to continue, or use a new out_dir.")
    if ckpts:
        step0, where = ckpts[-1]
        state = read_json(where / STATE_NAME)
        _check_resumable(state, cfg, run.base_config_hash, where)
        if state.get("num_processes") != acc.num_processes:
            warnings.warn(f"resuming a run made with {state.get('num_processes')} process(es) on "
                          f"{acc.num_processes}: the global batch and sample stream change.")
        acc.load_state(str(where))
        if run.ema is not None:
            run.ema.to(acc.device)
        run.loss_curve = [float(x) for x in state["loss_curve"]]
        run.kinds = Counter({k: int(state["kinds"].get(k, 0)) for k in KINDS})
        seconds_before = float(state.get("seconds", 0.0))
        start = step0 + 1
        say(f"resumed from {where} (step {step0}/{cfg.max_train_steps})")

    def snapshot(step: int) -> dict:
        kinds = run.kind_counts()
        n, frac = _counts_summary(kinds)
        return {
            "mode": cfg.mode, "base_model": ldm.path,
            "base_unet_config_hash": run.base_config_hash,
            "base_unet_weights_fingerprint": run.base_fingerprint,
            "max_train_steps": cfg.max_train_steps, "steps_done": step, "step": step,
            **cfg.to_dict(), "config": cfg.to_dict(),
            "num_processes": acc.num_processes,
            "global_batch_size": run.dataset.global_batch_size,
            "n_images": len(run.dataset),
            "kinds": kinds, "samples": n, "empty_fraction": frac,
            "loss_curve": list(run.loss_curve),
            "seconds": seconds_before + time.perf_counter() - t_start,
        }

    def report_empty(step: int) -> None:
        kinds = run.kind_counts()
        n, frac = _counts_summary(kinds)
        say(f"step {step}: loss {np.mean(run.loss_curve[-cfg.checkpoint_every:]):.5f}; samples "
            f"{kinds} → empty-mask samples {kinds['empty']}/{n} ({frac:.1%}; zero loss, METHOD §5.9)")

    bar = tqdm(total=cfg.max_train_steps, initial=start - 1, desc=f"fine-tune ({cfg.mode})",
               disable=not (progress and main))
    step = start - 1
    try:
        for step in range(start, cfg.max_train_steps + 1):
            loss = run.train_step(step)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}")
            if step % cfg.checkpoint_every == 0:
                _save_checkpoint(run, out, step, snapshot(step))
                report_empty(step)
    finally:
        bar.close()
    _save_checkpoint(run, out, step, snapshot(step))  # the final state (no-op if just saved)
    summary = snapshot(step)
    summary.pop("config"), summary.pop("step")
    n, frac = summary["samples"], summary["empty_fraction"]
    if n and frac > 0.5:
        warnings.warn(f"{frac:.0%} of the fine-tuning samples had an empty mask (zero loss): "
                      "M_pre leaves (almost) no background (METHOD §5.9).")
    acc.wait_for_everyone()
    if main:
        _export(run, out)
        summary["seconds"] = seconds_before + time.perf_counter() - t_start
        atomic_write_json(out / META_NAME, summary)
    acc.wait_for_everyone()
    if step % cfg.checkpoint_every or step < start:  # not just reported at a checkpoint
        report_empty(step)
    say(f"fine-tuned UNet ({cfg.mode}, loss_norm={cfg.loss_norm}) written to {out}")
    return summary


# ----------------------------------------------------------------------------- load
def load_finetuned(ldm: LDM, out_dir) -> LDM:
    """m': ``ldm`` with the fine-tuned UNet from ``out_dir`` (eval, no grad); other parts shared."""
    out = Path(out_dir)
    meta_path = out / META_NAME
    if not meta_path.exists():
        raise ValueError(f"{out} has no {META_NAME}: not a finished fine-tuning folder (train() "
                         "writes it last, after the export).")
    meta = read_json(meta_path)
    has_full, has_lora = (out / "unet").is_dir(), (out / "lora").is_dir()
    present = "full" if has_full and not has_lora else "lora" if has_lora and not has_full else None
    if present is None or meta.get("mode") != present:
        found = [n for n, ok in (("unet/", has_full), ("lora/", has_lora)) if ok] or ["neither"]
        raise ValueError(f"{out} holds {' and '.join(found)} but {META_NAME} says mode="
                         f"{meta.get('mode')!r}; LoRA and full fine-tuning outputs are never mixed. "
                         "Re-export into a clean folder.")
    h = unet_config_hash(ldm.unet)
    if h != meta.get("base_unet_config_hash"):
        raise ValueError(f"checkpoint folder {out} was fine-tuned from base "
                         f"{meta.get('base_model')!r}; model.path is {ldm.path!r}, whose UNet config "
                         f"differs (hash {h[:12]} vs {str(meta.get('base_unet_config_hash'))[:12]}). "
                         "Load the base model it was trained from, or fine-tune this one.")
    fp = meta.get("base_unet_weights_fingerprint")
    if fp and fp != _weights_fingerprint(ldm.unet):
        warnings.warn(f"{out} was fine-tuned from {meta.get('base_model')!r}; the UNet weights of "
                      f"{ldm.path!r} differ (same architecture). "
                      + ("The LoRA is applied to different base weights." if present == "lora"
                         else "The full fine-tuned UNet does not depend on them."))
    dev, dtype = ldm.unet.device, ldm.unet.dtype
    if present == "full":
        from diffusers import UNet2DConditionModel
        unet = UNet2DConditionModel.from_pretrained(str(out / "unet"))
    else:
        from peft import LoraConfig
        from safetensors.torch import load_file
        unet = copy.deepcopy(ldm.unet)
        _add_lora(unet, LoraConfig.from_pretrained(str(out / "lora")), 0)
        _load_lora_into(unet, load_file(str(out / "lora" / LORA_WEIGHTS)), out / "lora")
    unet.to(dev)
    if unet.dtype != dtype:
        unet.to(dtype)
    unet.eval().requires_grad_(False)
    tuned = LDM(ldm.vae, unet, ldm.text_encoder, ldm.tokenizer, ldm.scheduler, ldm.path)
    tuned.finetune_dir = str(out)  # provenance: path stays the base model's (tokenizer etc.)
    return tuned
