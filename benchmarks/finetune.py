"""Stage-03 fine-tuning cost: our masked concept-distillation step against a bare diffusers
text-to-image training step on the same batch.

    python benchmarks/finetune.py [--model PATH] [--steps N] [--warmup N] [--batch B]
                                  [--mode full|lora] [--threads 1] [--json OUT]

Both steps are ENCODE-FREE: z0 (VAE posterior mean × scaling factor) and the two prompt
embeddings are precomputed once and are not timed, in both. Per optimizer step s:

  ours   `Finetuner.train_step(s)` (fgbg_utils.training.finetune) on a single-process `Accelerator`:
         deterministic batch sampling (epoch order, flips), per-sample prompt choice and
         background-rectangle sampling (`rectangles.training_mask`), t/ε from the (seed, step)
         generator, noising, UNet forward, masked ε-loss, `accelerator.backward`, AdamW step,
         EMA update, loss gather/bookkeeping;
  bare   `bare_diffusers_step` (below) on a separate copy of the same UNet: the inner body of
         diffusers' examples/text_to_image (torch.randn_like / randint noise and t, noising,
         forward, unmasked MSE, backward, AdamW step), on the same latents and embeddings
         (taken from the batch `ours` drew for step s), no accelerate, no EMA.

The two are interleaved step by step; the median over --steps after --warmup is reported, plus
the median of the batch-sampling part alone. Model: --model, default models/toy-ldm if present,
else a freshly built random toy LDM. Data: toy shapes with their ground-truth masks (dilated by one
latent cell) as M_pre.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fgbg_utils.io import atomic_write_json
from fgbg_utils.training import finetune as ft
from fgbg_utils.core import models
from fgbg_utils.data import toy
from fgbg_utils.training.objective import prediction_target


def bare_diffusers_step(unet, optimizer, noise_scheduler, z0, noise, t, emb) -> torch.Tensor:
    """One plain diffusers text-to-image training step (examples/text_to_image, no masks, no
    EMA, no accelerate): noise, predict, unmasked MSE, backward, optimizer step. Returns the
    (pre-update) loss."""
    zt = noise_scheduler.add_noise(z0, noise, t)
    pred = unet(zt, t, encoder_hidden_states=emb).sample
    target = prediction_target(noise_scheduler, z0, noise, t)
    loss = F.mse_loss(pred.float(), target.float(), reduction="mean")
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def load_model(path: str | None):
    path = path or (str(ROOT / "models" / "toy-ldm") if (ROOT / "models" / "toy-ldm").is_dir() else None)
    if path:
        return models.load_ldm(path, device="cpu"), path
    vae, unet, te, tok, sched = toy.build_models()
    return models.LDM(vae, unet, te, tok, sched, path="toy-random"), "toy-random (random weights)"


def make_data(ldm, n: int = 16, seed: int = 7):
    r, f = ldm.resolution, ldm.vae_factor
    images, masks, _, _ = toy.generate_arrays(n, seed, size=r)
    items = []
    for img, m in zip(images, masks):
        canvas = img.astype(np.float32).transpose(2, 0, 1) / 127.5 - 1.0
        m_lat = m.reshape(r // f, f, r // f, f).any((1, 3))
        pad = np.pad(m_lat, 1)
        dil = np.zeros_like(m_lat)
        for dy in (0, 1, 2):
            for dx in (0, 1, 2):
                dil |= pad[dy:dy + m_lat.shape[0], dx:dx + m_lat.shape[1]]
        items.append((canvas, dil, np.ones_like(dil)))
    return items


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="model folder (default models/toy-ldm, else a random toy)")
    ap.add_argument("--steps", type=int, default=20, help="timed steps (median)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--mode", choices=ft.MODES, default="full")
    ap.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    ap.add_argument("--json", help="write the numbers to this JSON file")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    from accelerate import Accelerator
    from diffusers import DDPMScheduler

    ldm, name = load_model(args.model)
    data = make_data(ldm)
    total = args.warmup + args.steps
    cfg = ft.FinetuneConfig(max_train_steps=total, batch_size=args.batch, mode=args.mode)
    with tempfile.TemporaryDirectory() as tmp:
        acc = Accelerator(project_dir=tmp)
        run = ft.Finetuner(ldm, data, cfg, acc)
        unet = copy.deepcopy(ldm.unet).requires_grad_(True).train()
        if args.mode == "lora":  # same trainable set for the bare step
            unet = copy.deepcopy(run.unwrapped())
        params = [p for p in unet.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=cfg.learning_rate)
        sched = DDPMScheduler.from_config(ldm.scheduler.config)
        ours, bare, sampling = [], [], []
        for s in range(1, total + 1):
            t0 = time.perf_counter()
            run.train_step(s)
            ours.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            batch = run.dataset.batch_for_step(s, with_images=False)
            sampling.append(time.perf_counter() - t0)
            z0 = batch["latents"]  # the same batch, precomputed latents (encode-free)
            emb = torch.cat([run.emb[p] for p in batch["prompts"]])
            t0 = time.perf_counter()
            noise = torch.randn_like(z0)
            t = torch.randint(0, sched.config.num_train_timesteps, (z0.shape[0],))
            bare_diffusers_step(unet, opt, sched, z0, noise, t, emb)
            bare.append(time.perf_counter() - t0)
    med = {k: statistics.median(v[args.warmup:]) for k, v in
           (("ours", ours), ("bare", bare), ("sampling", sampling))}
    res = {
        "model": name, "mode": args.mode, "batch": args.batch, "latent": ldm.latent_size,
        "threads": torch.get_num_threads(), "steps": args.steps, "warmup": args.warmup,
        "median_s": med, "ours_over_bare": med["ours"] / med["bare"],
        "kinds": run.kind_counts(), "torch": torch.__version__, "device": "cpu",
        "note": "both encode-free: latents and prompt embeddings precomputed, not timed",
    }
    print(f"\n{res['threads']} thread(s), torch {torch.__version__}, CPU; model {name}; "
          f"mode {args.mode}; batch {args.batch}; latent {ldm.latent_size}²; median of "
          f"{args.steps} steps after {args.warmup} warm-up; encode-free (precomputed latents)\n")
    print("| ours (s/step) | bare diffusers (s/step) | ours/bare | batch+rectangle sampling (s) |")
    print("|---|---|---|---|")
    print(f"| {med['ours']:.4f} | {med['bare']:.4f} | {res['ours_over_bare']:.2f} "
          f"| {med['sampling']:.5f} |")
    print(f"sample kinds in ours: {res['kinds']}")
    if args.json:
        atomic_write_json(args.json, res)
    return res


if __name__ == "__main__":
    main()
