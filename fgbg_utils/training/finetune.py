"""Concept-distillation fine-tuning m → m' (docs/method.md §2.3, §5.8-5.9, §6 "Fine-tuning").

This module is the public facade; the code lives by concern in
`config` (FinetuneConfig), `batches` (MaskedImageDataset, the per-step sampler), `objective` (noise,
targets incl. v-prediction, masked loss), `lora`, `checkpoints` (save/resume/export/load_finetuned)
and `trainer` (Finetuner, train).

ONE training loop built on `accelerate`: the same `train()` call runs in a notebook on one device
and, unchanged, in a script started with `accelerate launch` on several GPUs.

Per sample (docs/method.md §2.3): with probability ``p_full`` the full image with y_f and an all-ones mask
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
    GPU count (docs/method.md §2.3). ``loss_curve`` holds, per optimizer step, the loss averaged over
    micro-batches and processes.
  * EMA: `diffusers.training_utils.EMAModel` (its default warm-up min(decay, (1+n)/(10+n)), as
    the official LitEma) over the trainable parameters (LoRA: the LoRA parameters only); the
    exported weights are the EMA weights (docs/method.md §2.3 "EMA weights are used for every later
    sampling step").
  * The caller's ``ldm`` is never changed, except that its frozen VAE and text encoder are moved
    to the accelerator's device: the UNet is trained on a deep copy. Use `load_finetuned` to get
    m'.
  * LoRA mode (a cheaper deviation [I], report it as one): checkpoints store only the LoRA
    weights (plus optimizer/EMA state), not the frozen base UNet.

The output folder's layout is described in `training.checkpoints`.

`Accelerator` keeps process-wide state: inside one Python process (a notebook) every run must use
the same ``mixed_precision``; restart the kernel to change it.
"""
from __future__ import annotations

from fgbg_utils.training.batches import MaskedImageDataset
from fgbg_utils.training.checkpoints import (KEEP_CHECKPOINTS, META_NAME, STATE_NAME,
                                             list_checkpoints, load_finetuned, unet_config_hash,
                                             weights_fingerprint)
from fgbg_utils.training.config import KINDS, MIXED_PRECISIONS, MODES, RESUME_FREE, FinetuneConfig
from fgbg_utils.training.lora import LORA_TARGETS, LORA_WEIGHTS
from fgbg_utils.training.objective import masked_step_loss, prediction_target, step_noise
from fgbg_utils.training.trainer import Finetuner, make_accelerator, train

__all__ = [
    "FinetuneConfig", "MaskedImageDataset", "Finetuner", "train", "load_finetuned",
    "masked_step_loss", "prediction_target", "step_noise", "list_checkpoints", "unet_config_hash",
    "weights_fingerprint", "make_accelerator", "MODES", "MIXED_PRECISIONS", "KINDS", "RESUME_FREE",
    "LORA_TARGETS", "LORA_WEIGHTS", "META_NAME", "STATE_NAME", "KEEP_CHECKPOINTS",
]
