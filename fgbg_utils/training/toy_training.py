"""Training of the toy LDM: one phase (`train_toy_model`); the shipped two-phase recipe with
snapshot selection is `fgbg_utils.training.toy_recipe` (`python -m fgbg_utils train-toy`).

The VAE is trained first on random crops, then frozen; the UNet and the (0-layer) text encoder are
trained jointly with epsilon-prediction on precomputed latents, with an EMA of the UNet. Each part
is time-boxed: the number of steps is planned from the measured step time, so a cosine schedule fits
the budget; a fixed number of steps (``vae_steps`` / ``unet_steps``) replaces the plan.
See docs/method.md §8 (the toy world).
"""
from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from fgbg_utils.data import toy


def _to_tensor(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1


def cosine_lr(step: int, total: int, warmup: int, peak: float, floor: float = 0.02) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    p = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * p)))


def clipped_step(opt, loss, params, ema, model) -> float:
    """One optimizer step with the gradient norm clipped to 1 and the EMA updated; the loss value."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    ema.step(model.parameters())
    return loss.item()


def plan_steps(step_time: float, budget_s: float, max_steps: int) -> int:
    """Steps that fit the budget (at least 100), never more than max_steps."""
    return int(min(max_steps, max(100, budget_s / max(step_time, 1e-3))))


def _render_sample_v1(rng: np.random.Generator, size: int = 64, background_only: bool = False,
                      radius: tuple[float, float] = (8, 20)):
    """Toy generator v1 (git 740eed4): as `toy.render_sample` but every object lies fully inside
    the image. Phase 1 of the shipped model was trained on it; it draws the same random numbers
    in the same order as v2, so sample i differs from v2 only in the object's centre."""
    bg_kind = toy.BACKGROUNDS[rng.integers(len(toy.BACKGROUNDS))]
    img = toy.render_background(rng, size, bg_kind)
    mask = np.zeros((size, size), bool)
    meta = {"background": bg_kind, "kind": None, "colour": None}
    if not background_only:
        kind = toy.KINDS[rng.integers(len(toy.KINDS))]
        colour = list(toy.COLOURS)[rng.integers(len(toy.COLOURS))]
        r = rng.uniform(*radius) * size / 64
        cx, cy = rng.uniform(r + 1, size - r - 1, 2)
        mask = toy.shape_mask(size, kind, cx, cy, r, rng.uniform(0, 2 * np.pi))
        rgb = np.clip(np.array(toy.COLOURS[colour]) + rng.normal(0, 0.04, 3), 0, 1)
        img[mask] = rgb
        meta.update(kind=kind, colour=colour, cx=float(cx), cy=float(cy), r=float(r))
    img = img + rng.normal(0, rng.uniform(0.01, 0.04), img.shape)
    return (np.clip(img, 0, 1) * 255).round().astype(np.uint8), mask, meta


GENERATORS = (1, 2)


def generate_corpus(n: int, seed: int, size: int = 64, background_fraction: float = 0.15,
                    generator: int = toy.GENERATOR_VERSION):
    """`toy.generate_arrays` of toy generator ``generator``: 2 = the current one (objects may
    cross the border), 1 = objects fully inside (phase 1 of the shipped model)."""
    if generator == toy.GENERATOR_VERSION:
        return toy.generate_arrays(n, seed, size, background_fraction)
    if generator != 1:
        raise ValueError(f"toy generator {generator!r} is unknown; choose one of {GENERATORS}")
    images = np.zeros((n, size, size, 3), np.uint8)
    masks = np.zeros((n, size, size), bool)
    captions, metas = [], []
    for i in range(n):  # the loop of toy.generate_arrays
        rng = np.random.default_rng([seed, i])
        bg_only = rng.random() < background_fraction
        images[i], masks[i], meta = _render_sample_v1(rng, size, bg_only)
        captions.append(toy.caption_for(meta, rng))
        metas.append(meta)
    return images, masks, captions, metas


def train_vae(vae, images: np.ndarray, budget_s: float, seed: int, batch: int = 32, crop: int = 32,
              lr: float = 2e-3, kl_weight: float = 1e-6, max_steps: int = 100_000, log=None):
    """Train the VAE on random crops (convolutions are translation-equivariant) within budget_s."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    x_all = torch.from_numpy(images)
    n, size = len(images), images.shape[1]
    total, step, t0, curve = max_steps, 0, time.time(), []
    bar = tqdm(desc="VAE", unit="step")
    while step < total:
        idx = torch.randint(n, (batch,), generator=g)
        oy, ox = torch.randint(size - crop + 1, (2,), generator=g).tolist()
        x = _to_tensor(x_all[idx, oy:oy + crop, ox:ox + crop].numpy())
        for grp in opt.param_groups:
            grp["lr"] = cosine_lr(step, total, 100, lr)
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample(generator=None)).sample
        rec_loss = F.l1_loss(rec, x) + F.mse_loss(rec, x)
        loss = rec_loss + kl_weight * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        step += 1
        bar.update()
        if step == 20:
            total = plan_steps((time.time() - t0) / 20, budget_s, max_steps)
        if step % 50 == 0:
            curve.append({"step": step, "loss": rec_loss.item(), "t": round(time.time() - t0, 1)})
            bar.set_postfix(loss=f"{rec_loss.item():.4f}", total=total)
            if log:
                log(f"vae step {step}/{total} loss {rec_loss.item():.4f}")
    bar.close()
    return {"steps": step, "seconds": round(time.time() - t0, 1), "curve": curve}


@torch.no_grad()
def encode_latents(vae, images: np.ndarray, batch: int = 128) -> torch.Tensor:
    """Posterior-mean latents (unscaled)."""
    out = [vae.encode(_to_tensor(images[i:i + batch])).latent_dist.mode()
           for i in range(0, len(images), batch)]
    return torch.cat(out)


@torch.no_grad()
def vae_psnr(vae, images: np.ndarray) -> float:
    x = _to_tensor(images)
    rec = vae.decode(vae.encode(x).latent_dist.mode()).sample.clamp(-1, 1)
    mse = F.mse_loss((rec + 1) / 2, (x + 1) / 2).item()
    return 10 * math.log10(1.0 / max(mse, 1e-12))


def train_unet(unet, text_encoder, tokenizer, scheduler, latents: torch.Tensor, captions: list[str],
               budget_s: float, seed: int, batch: int = 32, lr: float = 1e-3,
               caption_dropout: float = 0.1, ema_decay: float = 0.999, max_steps: int = 1_000_000,
               snapshot_every_s: float | None = 600, snapshot_steps=(), on_snapshot=None, log=None):
    """Joint UNet + text-encoder training with epsilon-prediction, uniform t; returns the EMA UNet.
    ``on_snapshot(step, ema, curve)`` runs every ``snapshot_every_s`` seconds (None: never) and
    after each step listed in ``snapshot_steps``."""
    from diffusers import DDPMScheduler
    from diffusers.training_utils import EMAModel

    noise_sched = DDPMScheduler.from_config(scheduler.config)
    g = torch.Generator().manual_seed(seed)
    ids_all = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length,
                        truncation=True, return_tensors="pt").input_ids
    empty_ids = tokenizer([""], padding="max_length", max_length=tokenizer.model_max_length,
                          return_tensors="pt").input_ids[0]
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    ema = EMAModel(unet.parameters(), decay=ema_decay)
    unet.train(), text_encoder.train()
    n, total, step, t0, last_snap = len(latents), max_steps, 0, time.time(), time.time()
    curve, running = [], []
    bar = tqdm(desc="UNet", unit="step")
    while step < total:
        idx = torch.randint(n, (batch,), generator=g)
        z0, ids = latents[idx], ids_all[idx].clone()
        drop = torch.rand(batch, generator=g) < caption_dropout
        ids[drop] = empty_ids
        noise = torch.randn(z0.shape, generator=g)
        t = torch.randint(0, noise_sched.config.num_train_timesteps, (batch,), generator=g)
        for grp in opt.param_groups:
            grp["lr"] = cosine_lr(step, total, 300, lr)
        pred = unet(noise_sched.add_noise(z0, noise, t), t,
                    encoder_hidden_states=text_encoder(ids)[0]).sample
        running.append(clipped_step(opt, F.mse_loss(pred, noise), params, ema, unet))
        step += 1
        bar.update()
        if step == 30:
            total = plan_steps((time.time() - t0) / 30, budget_s, max_steps)
        if step % 100 == 0:
            curve.append({"step": step, "loss": float(np.mean(running)), "t": round(time.time() - t0, 1)})
            running = []
            bar.set_postfix(loss=f"{curve[-1]['loss']:.4f}", total=total)
            if log:
                log(f"unet step {step}/{total} loss {curve[-1]['loss']:.4f}")
        timed = snapshot_every_s is not None and time.time() - last_snap > snapshot_every_s
        if on_snapshot and (timed or step in snapshot_steps) and step < total:
            on_snapshot(step, ema, curve)
            last_snap = time.time()
    bar.close()
    return ema, {"steps": step, "seconds": round(time.time() - t0, 1), "curve": curve}


def _save_pipeline(out: Path, vae, unet, text_encoder, tokenizer, scheduler, info: dict):
    """Atomic save_pretrained (safetensors) plus a training_info.json."""
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe = toy.make_pipeline(vae, unet, text_encoder, tokenizer, scheduler)
    pipe.save_pretrained(tmp, safe_serialization=True)
    (tmp / "training_info.json").write_text(json.dumps(info, indent=1))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)


def _load_init(folder: str | Path):
    """(vae, unet, text_encoder, training_info) of an earlier toy model to continue from."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    folder = Path(folder)
    info = json.loads((folder / "training_info.json").read_text())
    return (AutoencoderKL.from_pretrained(folder, subfolder="vae"),
            UNet2DConditionModel.from_pretrained(folder, subfolder="unet"),
            CLIPTextModel.from_pretrained(folder, subfolder="text_encoder"), info)


def train_toy_model(out_dir: str | Path, n_images: int = 20_000, seed: int = 1000,
                    vae_minutes: float = 10, unet_minutes: float = 60, image_size: int = 64,
                    threads: int = 1, snapshot_dir: str | Path | None = None, log=print,
                    init_from: str | Path | None = None, generator: int = toy.GENERATOR_VERSION,
                    vae_steps: int | None = None, unet_steps: int | None = None,
                    snapshot_every_s: float | None = 600, snapshot_steps=(),
                    heldout_images: int = 256, background_fraction: float = 0.15,
                    vae_from: str | Path | None = None) -> dict:
    """Make the toy corpus, train VAE then UNet+text encoder, save the pipeline to out_dir.
    ``background_fraction``: share of object-free images captioned "a photo of a background" (0:
    the model never sees that caption, as SD never saw a dataset's backgrounds). ``vae_from``: take
    the (trained) VAE of that toy model folder and train only the UNet and text encoder, from scratch.
    With `init_from`, continue from an earlier toy model (its VAE is kept when vae_minutes=0 and
    vae_steps is None). ``vae_steps`` / ``unet_steps`` fix the step counts (the cosine schedules
    span them) instead of planning them from the minutes. Periodic EMA snapshots (every
    ``snapshot_every_s`` seconds and at ``snapshot_steps``) go to ``snapshot_dir/step_NNNNNN``.
    The VAE's PSNR is measured on ``heldout_images`` images of corpus seed + 1."""
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    started = time.time()
    images, _, captions, _ = generate_corpus(n_images, seed, image_size, background_fraction, generator)
    vae, unet, text_encoder, tokenizer, scheduler = toy.build_models(image_size, seed)
    earlier = None
    if init_from:
        vae, unet, text_encoder, earlier = _load_init(init_from)
    elif vae_from:
        from diffusers import AutoencoderKL
        vae = AutoencoderKL.from_pretrained(vae_from, subfolder="vae")
    train_the_vae = not vae_from and (vae_steps is None and vae_minutes > 0 or bool(vae_steps))
    if train_the_vae:
        vae_info = (train_vae(vae, images, math.inf, seed, max_steps=vae_steps, log=log) if vae_steps
                    else train_vae(vae, images, vae_minutes * 60, seed, log=log))
    else:
        vae_info = {"steps": 0, "note": f"kept from {init_from or vae_from}"}
    vae.eval().requires_grad_(False)
    raw = encode_latents(vae, images)
    if train_the_vae:
        vae.register_to_config(scaling_factor=float(1.0 / raw.std()))
    latents = raw * vae.config.scaling_factor
    val_images, _, _, _ = toy.generate_arrays(heldout_images, seed + 1, image_size)
    vae_info["psnr_db_heldout"] = round(vae_psnr(vae, val_images), 2)
    log(f"VAE: {vae_info['steps']} steps, held-out PSNR {vae_info['psnr_db_heldout']} dB, "
        f"scaling_factor {vae.config.scaling_factor:.4f}")
    info = {"seed": seed, "n_images": n_images, "image_size": image_size, "threads": threads,
            "generator_version": generator, "background_fraction": background_fraction,
            "arch": toy.TOY_ARCH, "vae": vae_info,
            "continued_from": earlier}
    unet_started = time.time()

    def snapshot(step, ema, curve):
        if snapshot_dir is None:
            return
        import copy
        u = copy.deepcopy(unet)
        ema.copy_to(u.parameters())
        _save_pipeline(Path(snapshot_dir) / f"step_{step:06d}", vae, u, text_encoder, tokenizer,
                       scheduler, {**info, "unet": {"steps": step, "curve": list(curve),
                                                    "seconds": round(time.time() - unet_started, 1)}})
        log(f"snapshot at step {step}")

    budget = dict(budget_s=math.inf, max_steps=unet_steps) if unet_steps else \
        dict(budget_s=unet_minutes * 60)
    ema, unet_info = train_unet(unet, text_encoder, tokenizer, scheduler, latents, captions,
                                seed=seed, snapshot_every_s=snapshot_every_s,
                                snapshot_steps=set(snapshot_steps), on_snapshot=snapshot, log=log,
                                **budget)
    ema.copy_to(unet.parameters())
    unet.eval(), text_encoder.eval()
    info["unet"] = unet_info
    info["total_minutes"] = round((time.time() - started) / 60, 1)
    _save_pipeline(Path(out_dir), vae, unet, text_encoder, tokenizer, scheduler, info)
    log(f"saved {out_dir} after {info['total_minutes']} min")
    return info
