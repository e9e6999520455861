"""The method's generative steps with a flow-matching model (SD3; issue 17):

* forward process z_σ = (1 − σ) z₀ + σ ε; the transformer predicts the velocity v = ε − z₀;
* fine-tuning (§2.3): the masked flow-matching loss ‖M ⊙ (v̂(z_σ, σ, y) − (ε − z₀))‖², σ drawn from
  the scheduler's training grid (index uniform over `num_train_timesteps`, as diffusers' SD3
  DreamBooth script with weighting "none");
* concept guidance (§2.5) on the velocity: v̂ = v(y_b) + s·(v(y_f) − v(y_b)), Euler steps of the
  scheduler's own σ grid (z ← z + (σ_{i+1} − σ_i) v̂, as `FlowMatchEulerDiscreteScheduler.step`);
* background inpainting (§2.4) with latent blending in the flow's interpolation: after every step
  the known region is set to (1 − σ_{i+1}) z₀ + σ_{i+1} ε with the same ε (σ = 0 at the end pastes
  z₀), the SD path's blending with the flow's forward process; y⁻ = y_f when s > 1.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from fgbg_utils.core import families
from fgbg_utils.core.families import Condition
from fgbg_utils.core.models import LDM, encode_images


def noised(z0: torch.Tensor, eps: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    s = sigma.float().view(-1, *([1] * (z0.dim() - 1))).to(z0.device)
    return (1 - s) * z0 + s * eps


def velocity_target(z0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    return eps - z0


def training_sigmas(scheduler) -> torch.Tensor:
    """σ of the scheduler's training grid (num_train_timesteps entries, shifted), float32."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    sig = FlowMatchEulerDiscreteScheduler.from_config(scheduler.config).sigmas.float().clone()
    return sig[:-1] if sig[-1] == 0 else sig  # a fresh scheduler holds the training grid, no final 0


def step_sigmas(ldm: LDM, steps: int) -> torch.Tensor:
    """The sampling grid σ_0 = max > … > σ_{N−1}, then 0 (the family's own schedule)."""
    return torch.cat([torch.as_tensor(families.flow_sigmas(ldm, steps), dtype=torch.float32),
                      torch.zeros(1)])


def _rows(cond: Condition, n: int) -> Condition:
    return Condition(cond.emb.expand(n, -1, -1), cond.pooled.expand(n, -1), text_ids=cond.text_ids)


def _cat(a: Condition, b: Condition, n: int) -> Condition:
    return Condition(torch.cat([a.emb.expand(n, -1, -1), b.emb.expand(n, -1, -1)]),
                     torch.cat([a.pooled.expand(n, -1), b.pooled.expand(n, -1)]), text_ids=a.text_ids)


def velocity(ldm: LDM, z: torch.Tensor, sigma: float, cond: Condition, model=None) -> torch.Tensor:
    """v̂(z, σ, y) of the transformer (`model` overrides ldm.unet, e.g. a model in training)."""
    sig = torch.full((len(z),), float(sigma))
    if model is not None:
        from dataclasses import replace
        ldm = replace(ldm, unet=model)
    return families.transformer_forward(ldm, z, sig, _rows(cond, len(z))).float().cpu()


def guided_velocity(ldm: LDM, z: torch.Tensor, sigma: float, cond_f: Condition, cond_b: Condition,
                    s) -> torch.Tensor:
    """v̂ = v(y_b) + s·(v(y_f) − v(y_b)); s a float or one per row; s == 1 / 0: one branch only."""
    n = len(z)
    if np.ndim(s) == 0 and float(s) in (0.0, 1.0):
        return velocity(ldm, z, sigma, cond_f if float(s) == 1.0 else cond_b)
    scale = torch.as_tensor(np.asarray(s, np.float32)).reshape(-1, *([1] * (z.dim() - 1)))
    sig = torch.full((2 * n,), float(sigma))
    out = families.transformer_forward(ldm, torch.cat([z, z]), sig, _cat(cond_b, cond_f, n)).float()
    v_b, v_f = out.cpu().chunk(2)
    return v_b + scale * (v_f - v_b)


@torch.no_grad()
def sample(ldm: LDM, cond_f: Condition, cond_b: Condition, s, noise: torch.Tensor, steps: int) -> torch.Tensor:
    """Euler integration of the guided velocity from z = ε at σ = 1 (or the grid's max) to σ = 0."""
    sig = step_sigmas(ldm, steps)
    z = noise.float().cpu()
    for i in range(steps):
        v = guided_velocity(ldm, z, sig[i], cond_f, cond_b, s)
        z = z + (sig[i + 1] - sig[i]) * v
    return z


@torch.no_grad()
def decode(ldm: LDM, z: torch.Tensor) -> np.ndarray:
    """x = D(z / scaling + shift) -> (n, R, R, 3) float32 in [0, 1]."""
    vae = ldm.vae
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    x = vae.decode(z.to(vae.device, vae.dtype) / vae.config.scaling_factor + shift).sample
    return (x.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy().astype(np.float32)


def initial_noise(ldm: LDM, seed_list: Sequence[int]) -> torch.Tensor:
    """One N(0, I) latent (C, L, L) per seed (C: the VAE's latent channels; Flux packs 2x2 later)."""
    c, size = int(ldm.vae.config.latent_channels), ldm.latent_size
    if not len(seed_list):
        return torch.zeros((0, c, size, size))
    return torch.stack([torch.randn((c, size, size), generator=torch.Generator().manual_seed(int(sd)))
                        for sd in seed_list])


@torch.no_grad()
def sample_guided(ldm: LDM, prompt_f: str, prompt_b: str, s, seed_list: Sequence[int], steps: int = 50,
                  batch_size: int = 16) -> tuple[np.ndarray, torch.Tensor]:
    """Concept-guided flow samples, one per seed (as `synthesis.sample_guided`)."""
    cf, cb = families.encode_condition(ldm, prompt_f), families.encode_condition(ldm, prompt_b)
    images, lats = [], []
    for start in range(0, len(seed_list), batch_size):
        chunk = list(seed_list[start:start + batch_size])
        z = sample(ldm, cf, cb, s, initial_noise(ldm, chunk), steps)
        images.append(decode(ldm, z))
        lats.append(z)
    R, c, L = ldm.resolution, int(ldm.vae.config.latent_channels), ldm.latent_size
    if not images:
        return np.zeros((0, R, R, 3), np.float32), torch.zeros((0, c, L, L))
    return np.concatenate(images), torch.cat(lats)


@torch.no_grad()
def guidance_sweep(ldm: LDM, prompt_f: str, prompt_b: str, scales: Sequence[float], seed: int,
                   steps: int = 50, batch_size: int = 16) -> np.ndarray:
    """One seed sampled at every scale (rows of one batch, one s per row)."""
    cf, cb = families.encode_condition(ldm, prompt_f), families.encode_condition(ldm, prompt_b)
    noise = initial_noise(ldm, [seed])
    out = []
    for start in range(0, len(scales), batch_size):
        chunk = [float(v) for v in scales[start:start + batch_size]]
        z = sample(ldm, cf, cb, np.asarray(chunk, np.float32), noise.expand(len(chunk), -1, -1, -1).clone(), steps)
        out.append(decode(ldm, z))
    return np.concatenate(out) if out else np.zeros((0, ldm.resolution, ldm.resolution, 3), np.float32)


@torch.no_grad()
def inpaint_background(ldm: LDM, canvases: torch.Tensor, m_pre: np.ndarray, prompt: str,
                       negative_prompt: str | None = None, guidance_scale: float = 1.0, steps: int = 50,
                       seeds: list[int] | None = None, batch_size: int = 8, on_step=None) -> np.ndarray:
    """x̂ = m'(z̃₀, y_b) with a flow model: M_pre (B, L, L) repainted with `prompt`, ¬M_pre kept by
    latent blending in the flow's interpolation; guidance_scale > 1: v = v(y⁻) + s (v(y) − v(y⁻))
    with y⁻ = `negative_prompt`. z₀ is the VAE posterior mean; one ε per image from its seed.
    `on_step(i, z)`: called with the latents after step i (1-based), e.g. to show the trajectory."""
    B = canvases.shape[0]
    seeds = list(range(B)) if seeds is None else [int(v) for v in seeds]
    cond = families.encode_condition(ldm, prompt)
    neg = families.encode_condition(ldm, negative_prompt or "") if guidance_scale > 1 else None
    sig = step_sigmas(ldm, steps)
    out = []
    for start in range(0, B, batch_size):
        x = canvases[start:start + batch_size].float()
        n = len(x)
        z0 = encode_images(ldm, x, "mode").float().cpu()
        eps = initial_noise(ldm, seeds[start:start + n])
        m = torch.from_numpy(np.asarray(m_pre[start:start + n], np.float32))[:, None]
        z = eps.clone()
        for i in range(steps):
            v = (guided_velocity(ldm, z, sig[i], cond, neg, guidance_scale) if neg is not None
                 else velocity(ldm, z, sig[i], cond))
            z = z + (sig[i + 1] - sig[i]) * v
            known = (1 - sig[i + 1]) * z0 + sig[i + 1] * eps
            z = (1 - m) * known + m * z
            if on_step is not None:
                on_step(i + 1, z)
        out.append(decode(ldm, z))
    R = canvases.shape[-1]
    return np.concatenate(out) if out else np.zeros((0, R, R, 3), np.float32)


def masked_flow_loss(ldm: LDM, model, z0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor,
                     cond: Condition, mask: torch.Tensor, loss_norm: str = "latent") -> torch.Tensor:
    """The masked flow-matching loss of one batch: z_σ from the whole latent, v̂ − (ε − z₀) on the
    mask only (rectangles.masked_eps_loss, the same normalisation as the ε/v loss)."""
    from dataclasses import replace

    from fgbg_utils.core import rectangles
    zt = noised(z0, noise, sigma)
    pred = families.transformer_forward(replace(ldm, unet=model), zt, sigma, cond)
    return rectangles.masked_eps_loss(pred.float(), velocity_target(z0, noise).float(), mask, loss_norm)
