"""Sampling with the (fine-tuned) model (through `synthesis.sample_guided`), and a label-free
object-presence score: the peak of the pretrained model's raw attention to the object word."""
from __future__ import annotations

import numpy as np
import torch

from fgbg_utils.core import attention, models, seeds
from fgbg_utils.core.models import LDM


@torch.no_grad()
def sample_images(ldm: LDM, prompt: str, seed_list: list[int], steps: int = 50,
                  guidance_scale: float = 1.0, negative_prompt: str | None = None,
                  batch_size: int = 16) -> np.ndarray:
    """DDIM (η = 0) samples, one generator per image; (n, R, R, 3) float32 in [0, 1].

    A thin wrapper over the one guided sampler `synthesis.sample_guided` (ε̂ = ε(y⁻) + s·(ε(y) −
    ε(y⁻)), y⁻ = `negative_prompt`, the empty prompt when None), with diffusers'
    StableDiffusionPipeline conventions: s ≤ 1 without a negative prompt is plain `prompt`
    sampling. Unlike that pipeline, s < 1 WITH a negative prompt is honoured (the pipeline silently
    ignores it)."""
    from fgbg_utils.core.synthesis import sample_guided

    s = float(guidance_scale)
    if negative_prompt is None:
        negative_prompt = ""
        if s <= 1:
            s = 1.0
    images, _ = sample_guided(ldm, prompt, negative_prompt, s, list(seed_list), steps, batch_size)
    return images


@torch.no_grad()
def presence_scores(ldm: LDM, images: np.ndarray, prompt: str, words: list[str], T0: int,
                    seed: int = 0, grid_steps: int = 50, batch_rows: int | str = 160) -> np.ndarray:
    """Peak of the raw (un-normalised) M̂ of the object word per image: high when the model finds
    the object. images: (n, R, R, 3) in [0, 1] at the model's resolution."""
    from fgbg_utils.core import families  # any model family (same calls as before for SD 1.x/2.x)

    pos = families.prompt_positions(ldm, prompt, words)
    flat = [p for w in words for p in pos[w]]
    ts = families.noise_levels(ldm, T0, grid_steps)
    cond = families.encode_condition(ldm, prompt)
    out = []
    batch_rows = attention.resolve_batch_rows(batch_rows, ldm.unet, ldm.latent_size)
    per = max(1, batch_rows // T0)
    for start in range(0, len(images), per):
        x = torch.from_numpy(images[start:start + per]).permute(0, 3, 1, 2).float() * 2 - 1
        z0 = models.encode_images(ldm, x, "mode")
        noise = torch.stack([attention.image_noise(seeds.generator(seed, "presence", str(start + i)),
                                                   grid_steps, z0.shape[1:])[:T0]
                             for i in range(len(x))])
        full = attention.capture_maps(families.denoiser(ldm, cond), z0, flat, ts, noise, batch_rows)
        out.append(attention.reduce_maps(full, T0)["mhat_raw"].flatten(1).amax(1).numpy())
    return np.concatenate(out)
