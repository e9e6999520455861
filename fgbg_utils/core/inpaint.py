"""Inpainting m'(z̃₀, y_b) for the refinement step (docs/method.md §2.4, Eq. 5–6; §6 "Inpainting").

We use diffusers' ``StableDiffusionInpaintPipeline`` built from the fine-tuned **4-channel**
text-to-image UNet. With a 4-channel UNet the pipeline does *latent blending* of the known
region; it never concatenates mask and masked-image latents (that is the 9-channel path).

What the pinned pipeline (diffusers 0.42.1, ``pipeline_stable_diffusion_inpaint.py``) does with
``strength=1.0``, DDIM, ``eta=0``, a list of per-image generators and our binary mask:

0. Set-up.
   * ``mask_processor.preprocess``: the mask (white = 1 = repaint) is binarized at 0.5. It is then
     resized to the latent grid by ``F.interpolate(mask, size=(H/f, W/f))`` (mode ``nearest``,
     i.e. the top-left pixel of each f×f block). Our mask is M_pre upsampled by nearest ×f, so the
     derived latent mask is exactly M_pre (:func:`derived_latent_mask`; tested).
   * z₀ = ``image_latents``. Given a pixel image the pipeline encodes it with
     ``latent_dist.sample(generator[i])`` (a posterior *sample*, as in the official code). Given a
     4-channel tensor it uses it as z₀ unchanged; we pass the posterior mean by default (see
     ``posterior`` in :func:`inpaint_background`).
   * One noise tensor ε ~ N(0, I) per image, drawn from that image's generator. Because
     strength = 1 the start latent is ε·init_noise_sigma *everywhere*, the known region included.
1. For each DDIM timestep t_i (descending):
   a. ε̂ = UNet(z_{t_i}, t_i, y). With ``guidance_scale`` s > 1:
      ε̂ = ε_θ(z, y⁻) + s·(ε_θ(z, y) − ε_θ(z, y⁻)), y⁻ = ``negative_prompt`` (METHOD: y⁻ = y_f).
      diffusers turns CFG off for s ≤ 1.
   b. DDIM step (η = 0) → z_{t_{i+1}}.
   c. Blend *after* the step: z ← (1 − M_pre)·add_noise(z₀, ε, t_{i+1}) + M_pre·z, with the
      *same* ε at every step; after the last step the clean z₀ is pasted (no re-noising).
2. Decode the final latents with the VAE, map to [0, 1] (clamped), return (B, R, R, 3).

Against the official order (blend *before* every UNet call, with z₀ re-noised to the current t):
since the blend after step i uses t_{i+1} = the timestep of the next UNet call, the two orders are
the same except that (i) the first UNet call sees pure noise in the known region instead of
q(z_T | z₀) (√ᾱ_T ≈ 0.07 for SD v1, a small difference), (ii) one noise tensor is reused for
the known region instead of fresh noise per step, and (iii) the clean z₀ is pasted after the last
step, so the known region of the decoded image is D(z₀) up to the decoder's spatial mixing
(convolutions and the mid-block attention let the repainted region leak a little). A short
custom loop would reproduce the official order exactly; we accept these deviations.
"""
from __future__ import annotations

import numpy as np
import torch

from fgbg_utils.core.models import LDM, encode_images

POSTERIORS = ("mode", "sample")


def _pipeline_kwargs(ldm: LDM) -> dict:
    from diffusers import DDIMScheduler

    if ldm.family == "sdxl":  # its second text encoder and tokenizer; no aesthetic-score conditioning
        return dict(vae=ldm.vae, unet=ldm.unet, text_encoder=ldm.text_encoder, tokenizer=ldm.tokenizer,
                    text_encoder_2=ldm.extras["text_encoder_2"], tokenizer_2=ldm.extras["tokenizer_2"],
                    scheduler=DDIMScheduler.from_config(ldm.scheduler.config),
                    requires_aesthetics_score=False, force_zeros_for_empty_prompt=True)
    return dict(vae=ldm.vae, unet=ldm.unet, text_encoder=ldm.text_encoder, tokenizer=ldm.tokenizer,
                scheduler=DDIMScheduler.from_config(ldm.scheduler.config), safety_checker=None,
                feature_extractor=None, requires_safety_checker=False)


def make_inpaint_pipeline(ldm: LDM):
    """``StableDiffusionInpaintPipeline`` (SDXL: ``StableDiffusionXLInpaintPipeline``, which adds
    its pooled text embedding and size conditions to every UNet call and does the same latent
    blending with a 4-channel UNet) sharing the LDM's components, with a fresh DDIM scheduler."""
    from diffusers import StableDiffusionInpaintPipeline, StableDiffusionXLInpaintPipeline

    if ldm.family in ("sd3", "flux"):
        return None  # flow models inpaint with core/flow.py's own loop (no diffusers pipeline)

    if ldm.unet.config.in_channels != 4:
        raise ValueError(f"the UNet of {ldm.path!r} has {ldm.unet.config.in_channels} input channels; "
                         f"refinement needs the 4-channel text-to-image UNet (latent blending).")
    cls = StableDiffusionXLInpaintPipeline if ldm.family == "sdxl" else StableDiffusionInpaintPipeline
    pipe = cls(**_pipeline_kwargs(ldm))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def mask_image_from(m_pre: np.ndarray, factor: int) -> torch.Tensor:
    """M_pre (B, L, L) bool → mask image (B, 1, L·f, L·f) float32 0/1 (1 = white = repaint)."""
    m = np.asarray(m_pre, bool)
    if m.ndim != 3:
        raise ValueError(f"m_pre must be (B, L, L) bool, got shape {m.shape}")
    up = np.repeat(np.repeat(m, factor, axis=1), factor, axis=2)  # = upsample_mask per image
    return torch.from_numpy(up.astype(np.float32))[:, None]


def derived_latent_mask(pipe, mask_image, R: int) -> torch.Tensor:
    """The latent mask the pipeline itself derives from ``mask_image`` (B, 1, R/f, R/f) float.

    Same calls as ``__call__`` without ``padding_mask_crop``: ``mask_processor.preprocess`` then
    the nearest ``F.interpolate`` of ``prepare_mask_latents``.
    """
    cond = pipe.mask_processor.preprocess(mask_image, height=R, width=R, resize_mode="default",
                                          crops_coords=None)
    f = pipe.vae_scale_factor
    return torch.nn.functional.interpolate(cond, size=(R // f, R // f))


def to_unit(canvases: torch.Tensor) -> np.ndarray:
    """(B, 3, R, R) in [-1, 1] → float32 (B, R, R, 3) in [0, 1]."""
    x = (canvases.detach().float().cpu() / 2 + 0.5).clamp(0, 1)
    return x.permute(0, 2, 3, 1).numpy().astype(np.float32)


@torch.no_grad()
def vae_roundtrip(ldm: LDM, canvases: torch.Tensor, batch_size: int = 8) -> np.ndarray:
    """D(E(x)) with the posterior mean, mapped like the pipeline's output: float32 (B, R, R, 3) [0, 1]."""
    out = []
    for s in range(0, len(canvases), batch_size):
        z = encode_images(ldm, canvases[s:s + batch_size], mode="mode")
        shift = getattr(ldm.vae.config, "shift_factor", None)  # SD3 / Flux VAEs
        z = z / ldm.vae.config.scaling_factor
        img = ldm.vae.decode(z if shift is None else z + shift, return_dict=False)[0]
        out.append(to_unit(img))
    R = canvases.shape[-1]
    return np.concatenate(out) if out else np.zeros((0, R, R, 3), np.float32)


def _check(ldm: LDM, canvases: torch.Tensor, m_pre: np.ndarray, seeds, guidance_scale, posterior):
    if canvases.ndim != 4 or canvases.shape[1] != 3 or canvases.shape[2] != canvases.shape[3]:
        raise ValueError(f"canvases must be (B, 3, R, R), got {tuple(canvases.shape)}")
    B, R, f = canvases.shape[0], canvases.shape[-1], ldm.vae_factor
    if R % f:
        raise ValueError(f"canvas size {R} is not a multiple of the VAE factor {f}")
    m_pre = np.asarray(m_pre, bool)
    if m_pre.shape != (B, R // f, R // f):
        raise ValueError(f"m_pre must be (B, L, L) = {(B, R // f, R // f)} on the latent grid, "
                         f"got {m_pre.shape}")
    seeds = list(range(B)) if seeds is None else [int(s) for s in seeds]
    if len(seeds) != B:
        raise ValueError(f"{len(seeds)} seeds for {B} canvases; give one seed per image")
    if guidance_scale < 1:
        raise ValueError(f"guidance_scale={guidance_scale} < 1: diffusers silently disables "
                         f"guidance for s <= 1; use 1 (off) or s > 1 with negative_prompt.")
    if posterior not in POSTERIORS:
        raise ValueError(f"posterior={posterior!r}; choose one of {POSTERIORS}")
    return m_pre, seeds


@torch.no_grad()
def _inpaint(ldm: LDM, canvases: torch.Tensor, m_pre: np.ndarray, prompt: str,
             negative_prompt: str | None = None, guidance_scale: float = 1.0, steps: int = 50,
             seeds: list[int] | None = None, batch_size: int = 8, posterior: str = "mode",
             output_type: str = "np", pipe=None):
    """Shared body of :func:`inpaint_background`; ``output_type="latent"`` returns the final
    latents (B, 4, L, L) as a torch tensor (used by the tests)."""
    m_pre, seeds = _check(ldm, canvases, m_pre, seeds, guidance_scale, posterior)
    pipe = make_inpaint_pipeline(ldm) if pipe is None else pipe
    B, R, f = canvases.shape[0], canvases.shape[-1], ldm.vae_factor
    out = []
    for s in range(0, B, batch_size):
        x = canvases[s:s + batch_size].detach().float()
        n = len(x)
        mask = mask_image_from(m_pre[s:s + n], f)
        gens = [torch.Generator(device="cpu").manual_seed(sd) for sd in seeds[s:s + n]]
        kw = {}
        if posterior == "mode":
            # z0 = posterior mean, passed as 4-channel "image" latents (used unchanged as z0);
            # masked_image_latents only avoids a pixel-space product the 4-channel path ignores.
            z0 = encode_images(ldm, x, mode="mode").float()
            m_lat = torch.from_numpy(m_pre[s:s + n].astype(np.float32))[:, None].to(z0.device)
            image, kw["masked_image_latents"] = z0, z0 * (1 - m_lat)
        else:
            # The pipeline encodes with latent_dist.sample(generator[i]). A [0, 1] tensor takes the
            # documented path (normalize to [-1, 1]); a [-1, 1] tensor relies on a `min() < 0`
            # heuristic that misfires for an all-bright batch.
            image = (x / 2 + 0.5).clamp(0, 1)
        res = pipe(
            prompt=[prompt] * n,
            negative_prompt=None if negative_prompt is None else [negative_prompt] * n,
            image=image, mask_image=mask, height=R, width=R, strength=1.0,
            num_inference_steps=steps, guidance_scale=guidance_scale, eta=0.0, generator=gens,
            output_type=output_type, return_dict=False, **kw)[0]
        out.append(res.float().cpu() if output_type == "latent" else np.asarray(res, np.float32))
    if output_type == "latent":
        return torch.cat(out)
    return np.concatenate(out) if out else np.zeros((0, R, R, 3), np.float32)


def inpaint_background(ldm: LDM, canvases: torch.Tensor, m_pre: np.ndarray, prompt: str,
                       negative_prompt: str | None = None, guidance_scale: float = 1.0,
                       steps: int = 50, seeds: list[int] | None = None, batch_size: int = 8,
                       posterior: str = "mode", pipe=None) -> np.ndarray:
    """x̂ = m'(z̃₀, y_b): repaint M_pre with ``prompt`` (y_b), keep ¬M_pre. (B, R, R, 3) float32 [0, 1].

    canvases: (B, 3, R, R) in [-1, 1], canonical frame. m_pre: (B, R/f, R/f) bool on the latent
    grid (True = repaint). DDIM, ``steps`` steps, η = 0, strength 1. ``guidance_scale`` > 1 turns
    on CFG with ``negative_prompt`` as the unconditional branch (METHOD: y⁻ = y_f; None means the
    empty prompt); < 1 is refused because diffusers would silently ignore it.
    seeds: one per image (default 0..B−1); each image has its own ``torch.Generator`` so results
    do not depend on the batch size or order.
    posterior: z₀ from the VAE posterior mean (``"mode"``, default [I], deterministic and equal to
    the z₀ of :func:`vae_roundtrip`) or a seeded posterior sample drawn by the pipeline
    (``"sample"``, as in the official code [C]).
    pipe: an existing :func:`make_inpaint_pipeline` result to reuse (optional).
    """
    if ldm.family in ("sd3", "flux"):  # latent blending in the flow's interpolation
        from fgbg_utils.core import flow
        m_pre, seeds = _check(ldm, canvases, m_pre, seeds, guidance_scale, posterior)
        return flow.inpaint_background(ldm, canvases, m_pre, prompt, negative_prompt, guidance_scale,
                                       steps, seeds, batch_size)
    return _inpaint(ldm, canvases, m_pre, prompt, negative_prompt, guidance_scale, steps, seeds,
                    batch_size, posterior, "np", pipe)
