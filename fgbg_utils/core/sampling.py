"""Sampling with the (fine-tuned) model through diffusers' StableDiffusionPipeline, and a label-free
object-presence score: the peak of the pretrained model's raw attention to the object word."""
from __future__ import annotations

import numpy as np
import torch

from fgbg_utils.core import attention, models, seeds
from fgbg_utils.core.models import LDM


def make_pipeline(ldm: LDM):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline(vae=ldm.vae, unet=ldm.unet, text_encoder=ldm.text_encoder,
                                   tokenizer=ldm.tokenizer,
                                   scheduler=DDIMScheduler.from_config(ldm.scheduler.config),
                                   safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def sample_images(ldm: LDM, prompt: str, seed_list: list[int], steps: int = 50,
                  guidance_scale: float = 1.0, negative_prompt: str | None = None,
                  batch_size: int = 16) -> np.ndarray:
    """DDIM (η = 0) samples, one generator per image; (n, R, R, 3) float32 in [0, 1].
    With a negative prompt y⁻ and scale s: ε = ε(y⁻) + s·(ε(y) − ε(y⁻))."""
    pipe = make_pipeline(ldm)
    R, out = ldm.resolution, []
    for start in range(0, len(seed_list), batch_size):
        chunk = seed_list[start:start + batch_size]
        gens = [torch.Generator().manual_seed(int(s)) for s in chunk]
        kw = {"negative_prompt": [negative_prompt] * len(chunk)} if negative_prompt else {}
        res = pipe([prompt] * len(chunk), height=R, width=R, num_inference_steps=steps,
                   guidance_scale=guidance_scale, eta=0.0, generator=gens, output_type="np", **kw)
        out.append(np.asarray(res.images, np.float32))
    return np.concatenate(out)


@torch.no_grad()
def presence_scores(ldm: LDM, images: np.ndarray, prompt: str, words: list[str], T0: int,
                    seed: int = 0, grid_steps: int = 50, batch_rows: int = 160) -> np.ndarray:
    """Peak of the raw (un-normalised) M̂ of the object word per image: high when the model finds
    the object. images: (n, R, R, 3) in [0, 1] at the model's resolution."""
    from fgbg_utils.core.tokens import prompt_positions

    pos = prompt_positions(ldm.tokenizer, prompt, words)
    flat = [p for w in words for p in pos[w]]
    ts = models.lowest_timesteps(ldm.scheduler, T0, grid_steps)
    emb = models.encode_prompt(ldm, prompt)
    out = []
    per = max(1, batch_rows // T0)
    for start in range(0, len(images), per):
        x = torch.from_numpy(images[start:start + per]).permute(0, 3, 1, 2).float() * 2 - 1
        z0 = models.encode_images(ldm, x, "mode")
        noise = torch.stack([attention.image_noise(seeds.generator(seed, "presence", str(start + i)),
                                                   grid_steps, z0.shape[1:])[:T0]
                             for i in range(len(x))])
        full = attention.attention_maps(ldm.unet, ldm.scheduler, z0, emb, flat, ts, noise, batch_rows)
        out.append(attention.reduce_maps(full, T0)["mhat_raw"].flatten(1).amax(1).numpy())
    return np.concatenate(out)
