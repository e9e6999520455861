"""Stage (e), synthesis with concept guidance (docs/method.md §2.5): a short DDIM loop of our own.

The fine-tuned model m' knows essentially two prompts, y_f and y_b, and guidance runs from the
background toward the foreground:

    ε̂ = ε(z_t, y_b) + s · (ε(z_t, y_f) − ε(z_t, y_b))

s = 1 is plain y_f sampling, s = 0 plain y_b sampling, negative s gives object-free backgrounds and
large s stronger objects (Fig. 8 sweeps s from −2 to 7.5). diffusers' StableDiffusionPipeline turns
guidance off for s ≤ 1, hence this loop. It follows the pipeline step for step (DDIM, η = 0,
`scale_model_input`, `scheduler.step`, decode `latents / scaling_factor`, image = (x + 1) / 2 clamped
to [0, 1]); a test checks that s = 1 reproduces the pipeline.

ε- and v-prediction (SD 2.x 768): the UNet output is combined as is. For a fixed z_t both
ε and v = α_t·ε − σ_t·x̂₀ = (ε − σ_t·z_t)/α_t are affine in ε with the same coefficients, and the
guidance weights (1 − s) + s sum to 1, so combining v-outputs equals combining ε-outputs and then
converting. The DDIM scheduler is built from the model's scheduler config, so `scheduler.step`
reads the combined output as ε or v according to `prediction_type` (tested against
StableDiffusionPipeline on a tiny v-prediction model).

Seeds: every image gets its own torch.Generator, so its initial noise depends only on its seed,
never on the batch. The result can still differ in the last bits with the batch composition (CPU
kernels choose algorithms by batch size); stage 05 therefore resumes whole batches.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from fgbg_utils.core import families
from fgbg_utils.core.models import LDM


def _expand(emb: torch.Tensor, n: int) -> torch.Tensor:
    """(1, S, D) or (n, S, D) prompt embeddings -> (n, S, D)."""
    if emb.dim() == 2:
        emb = emb[None]
    if emb.shape[0] == n:
        return emb
    if emb.shape[0] != 1:
        raise ValueError(f"prompt embeddings have batch {emb.shape[0]}; expected 1 or {n}")
    return emb.expand(n, *emb.shape[1:])


@torch.no_grad()
def guided_eps(unet, z_t: torch.Tensor, t, emb_f: torch.Tensor, emb_b: torch.Tensor,
               s: float | Sequence[float] | torch.Tensor, added_f: dict | None = None,
               added_b: dict | None = None) -> torch.Tensor:
    """Concept-guided model output ε̂ = ε(y_b) + s·(ε(y_f) − ε(y_b)) (ε or v, as the UNet predicts:
    see the module docstring).

    z_t: (B, C, L, L) model input (already passed through `scale_model_input`); t: the timestep;
    emb_f / emb_b: text embeddings of y_f / y_b with batch 1 or B. s: one float, or one scale per row
    (a sequence or tensor of length B; used by `guidance_sweep`).

    One batched UNet call over [y_b rows; y_f rows]. Shortcuts, for a scalar s only: s == 1 exactly
    runs the y_f half alone and returns ε(y_f); s == 0 exactly runs the y_b half alone and returns
    ε(y_b) (the guidance formula gives these values anyway; the shortcut halves the cost). The output
    has z_t's dtype. added_f / added_b: SDXL's added conditions of y_f / y_b (batch 1 or B).
    """
    n = z_t.shape[0]
    dtype = unet.dtype
    x = z_t.to(dtype)
    emb_f = _expand(emb_f.to(x.device, dtype), n)
    emb_b = _expand(emb_b.to(x.device, dtype), n)
    scalar = s.dim() == 0 if isinstance(s, torch.Tensor) else np.ndim(s) == 0
    if scalar:
        s = float(s)
        if s == 1.0:
            kw = families.unet_kwargs(added_f, n, x.device, dtype)
            return unet(x, t, encoder_hidden_states=emb_f, **kw).sample.to(z_t.dtype)
        if s == 0.0:
            kw = families.unet_kwargs(added_b, n, x.device, dtype)
            return unet(x, t, encoder_hidden_states=emb_b, **kw).sample.to(z_t.dtype)
        scale = torch.tensor(s, dtype=torch.float32, device=x.device)
    else:
        scale = torch.as_tensor(s if isinstance(s, torch.Tensor) else np.asarray(s, np.float32),
                                dtype=torch.float32, device=x.device).reshape(-1)
        if scale.numel() != n:
            raise ValueError(f"{scale.numel()} guidance scales for a batch of {n}")
        scale = scale.view(n, *([1] * (z_t.dim() - 1)))
    kw = {}
    if added_f is not None:
        kb, kf = (families.unet_kwargs(a, n, x.device, dtype)["added_cond_kwargs"] for a in (added_b, added_f))
        kw = {"added_cond_kwargs": {k: torch.cat([kb[k], kf[k]]) for k in kf}}
    out = unet(torch.cat([x, x]), t, encoder_hidden_states=torch.cat([emb_b, emb_f]), **kw).sample
    eps_b, eps_f = out.float().chunk(2)
    return (eps_b + scale * (eps_f - eps_b)).to(z_t.dtype)


def initial_latents(ldm: LDM, seed_list: Sequence[int]) -> torch.Tensor:
    """One generator per image: torch.randn((C, L, L), generator=Generator().manual_seed(seed)),
    stacked on the CPU, float32, *not* yet multiplied by the scheduler's init_noise_sigma."""
    c, size = int(ldm.unet.config.in_channels), ldm.latent_size
    return torch.stack([torch.randn((c, size, size), generator=torch.Generator().manual_seed(int(sd)))
                        for sd in seed_list]) if len(seed_list) else torch.zeros((0, c, size, size))


@torch.no_grad()
def decode_latents(ldm: LDM, latents: torch.Tensor) -> np.ndarray:
    """VAE decode of final latents -> (n, R, R, 3) float32 in [0, 1]."""
    if ldm.family in families.FLOW:  # x = D(z / scaling + shift)
        from fgbg_utils.core import flow
        return flow.decode(ldm, latents)
    vae = ldm.vae
    x = vae.decode(latents.to(vae.device, vae.dtype) / vae.config.scaling_factor).sample
    return (x.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy().astype(np.float32)


@torch.no_grad()
def _denoise(ldm: LDM, latents: torch.Tensor, emb_f, emb_b, s, steps: int,
             progress: bool = False, added: tuple = (None, None)) -> torch.Tensor:
    """DDIM (η = 0) from initial noise (already times init_noise_sigma) to final latents, float32."""
    from diffusers import DDIMScheduler

    sched = DDIMScheduler.from_config(ldm.scheduler.config)
    sched.set_timesteps(steps, device=ldm.device)
    z = latents.to(ldm.device, torch.float32)
    it = sched.timesteps
    if progress:
        from tqdm.auto import tqdm
        it = tqdm(it, desc="DDIM", leave=False)
    for t in it:
        eps = guided_eps(ldm.unet, sched.scale_model_input(z, t), t, emb_f, emb_b, s, *added)
        z = sched.step(eps.float(), t, z, eta=0.0).prev_sample
    return z


def _conditions(ldm: LDM, prompt_f: str, prompt_b: str):
    """(emb_f, emb_b, (added_f, added_b)): the sequence embeddings of y_f and y_b, and SDXL's added
    conditions of each (None, None for SD 1.x/2.x)."""
    cf, cb = families.encode_condition(ldm, prompt_f), families.encode_condition(ldm, prompt_b)
    return cf.emb, cb.emb, (families.added_conditions(cf), families.added_conditions(cb))


@torch.no_grad()
def sample_guided(ldm: LDM, prompt_f: str, prompt_b: str, s: float, seed_list: Sequence[int],
                  steps: int = 50, batch_size: int = 16, progress: bool = False
                  ) -> tuple[np.ndarray, torch.Tensor]:
    """Concept-guided DDIM samples, one per seed.

    Returns images (n, R, R, 3) float32 in [0, 1] and the final latents (n, C, L, L) as a CPU
    float32 torch tensor (the clean latents z_0 in the UNet's scaled latent space, before the
    division by the VAE scaling factor). Image i depends only on seed_list[i] (and s, steps), not on
    the batch. s = 1 equals StableDiffusionPipeline(prompt_f, guidance_scale=1) with a DDIM
    scheduler; s = 0 is plain y_b sampling.
    """
    if ldm.family in families.FLOW:  # SD3: Euler steps of the guided velocity (core/flow.py)
        from fgbg_utils.core import flow
        return flow.sample_guided(ldm, prompt_f, prompt_b, s, seed_list, steps, batch_size)
    emb_f, emb_b, added = _conditions(ldm, prompt_f, prompt_b)
    from diffusers import DDIMScheduler
    sigma = DDIMScheduler.from_config(ldm.scheduler.config).init_noise_sigma
    images, lats = [], []
    starts = range(0, len(seed_list), batch_size)
    if progress:
        from tqdm.auto import tqdm
        starts = tqdm(starts, desc="sampling")
    for start in starts:
        chunk = list(seed_list[start:start + batch_size])
        z = _denoise(ldm, initial_latents(ldm, chunk) * sigma, emb_f, emb_b, s, steps, added=added)
        images.append(decode_latents(ldm, z))
        lats.append(z.float().cpu())
    R, c, size = ldm.resolution, int(ldm.unet.config.in_channels), ldm.latent_size
    if not images:
        return np.zeros((0, R, R, 3), np.float32), torch.zeros((0, c, size, size))
    return np.concatenate(images), torch.cat(lats)


@torch.no_grad()
def guidance_sweep(ldm: LDM, prompt_f: str, prompt_b: str, scales: Sequence[float], seed: int,
                   steps: int = 50, batch_size: int = 16) -> np.ndarray:
    """The paper's Fig. 8: the same seed (the same initial noise) sampled at every scale s.
    Scales run as rows of one batch (per-row s). Returns (len(scales), R, R, 3) float32 in [0, 1]."""
    scales = [float(v) for v in scales]
    if ldm.family in families.FLOW:
        from fgbg_utils.core import flow
        return flow.guidance_sweep(ldm, prompt_f, prompt_b, scales, seed, steps, batch_size)
    emb_f, emb_b, added = _conditions(ldm, prompt_f, prompt_b)
    from diffusers import DDIMScheduler
    sigma = DDIMScheduler.from_config(ldm.scheduler.config).init_noise_sigma
    noise = initial_latents(ldm, [seed]) * sigma
    out = []
    for start in range(0, len(scales), batch_size):
        chunk = scales[start:start + batch_size]
        z = _denoise(ldm, noise.expand(len(chunk), -1, -1, -1).clone(), emb_f, emb_b,
                     torch.tensor(chunk), steps, added=added)
        out.append(decode_latents(ldm, z))
    R = ldm.resolution
    return np.concatenate(out) if out else np.zeros((0, R, R, 3), np.float32)
