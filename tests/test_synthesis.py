"""Concept-guided DDIM sampling (docs/method.md §2.5) on a random toy LDM."""
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
import pytest
import torch

from fgbg_utils.core import models, synthesis
from fgbg_utils.data import toy
from fgbg_utils.core.models import LDM

torch.set_num_threads(1)

PF, PB = "a photo of a shape", toy.BACKGROUND_CAPTION
STEPS = 4


@pytest.fixture(scope="module")
def ldm():
    vae, unet, te, tok, sch = toy.build_models()
    for m in (vae, unet, te):
        m.eval().requires_grad_(False)
    return LDM(vae, unet, te, tok, sch, "toy-random")


@pytest.fixture(scope="module")
def embs(ldm):
    return models.encode_prompt(ldm, PF), models.encode_prompt(ldm, PB)


@torch.no_grad()
def _direct(ldm, z, t, emb):
    return ldm.unet(z, t, encoder_hidden_states=emb.expand(len(z), -1, -1)).sample


def test_guided_eps_matches_direct_predictions(ldm, embs):
    emb_f, emb_b = embs
    z = torch.randn((2, 4, 16, 16), generator=torch.Generator().manual_seed(0))
    t = torch.tensor(501)
    eps_f, eps_b = _direct(ldm, z, t, emb_f), _direct(ldm, z, t, emb_b)
    assert not torch.allclose(eps_f, eps_b, atol=1e-4)  # the prompts matter at all
    torch.testing.assert_close(synthesis.guided_eps(ldm.unet, z, t, emb_f, emb_b, 1.0), eps_f,
                               atol=1e-5, rtol=0)
    torch.testing.assert_close(synthesis.guided_eps(ldm.unet, z, t, emb_f, emb_b, 0), eps_b,
                               atol=1e-5, rtol=0)
    torch.testing.assert_close(synthesis.guided_eps(ldm.unet, z, t, emb_f, emb_b, 2.0),
                               2 * eps_f - eps_b, atol=1e-5, rtol=0)
    torch.testing.assert_close(synthesis.guided_eps(ldm.unet, z, t, emb_f, emb_b, -1.5),
                               eps_b - 1.5 * (eps_f - eps_b), atol=1e-5, rtol=0)
    # per-row scales (the batched sweep path)
    per_row = synthesis.guided_eps(ldm.unet, z, t, emb_f, emb_b, [1.0, 0.0])
    torch.testing.assert_close(per_row[0], eps_f[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(per_row[1], eps_b[1], atol=1e-5, rtol=0)


def test_sample_guided_deterministic_and_batch_independent(ldm):
    imgs, lats = synthesis.sample_guided(ldm, PF, PB, 3.0, [7, 8, 9], steps=STEPS, batch_size=3)
    assert imgs.shape == (3, 64, 64, 3) and imgs.dtype == np.float32
    assert lats.shape == (3, 4, 16, 16)
    assert imgs.min() >= 0 and imgs.max() <= 1
    again, _ = synthesis.sample_guided(ldm, PF, PB, 3.0, [7, 8, 9], steps=STEPS, batch_size=2)
    np.testing.assert_allclose(again, imgs, atol=1e-4)
    alone, lat1 = synthesis.sample_guided(ldm, PF, PB, 3.0, [8], steps=STEPS)
    np.testing.assert_allclose(alone[0], imgs[1], atol=1e-4)
    torch.testing.assert_close(lat1[0], lats[1], atol=1e-4, rtol=0)
    assert not np.allclose(imgs[0], imgs[1], atol=1e-3)  # different seeds, different images


def test_guidance_sweep_shapes_and_consistency(ldm):
    scales = [-2.0, 0.0, 1.0, 7.5]
    sweep = synthesis.guidance_sweep(ldm, PF, PB, scales, seed=3, steps=STEPS)
    assert sweep.shape == (4, 64, 64, 3) and sweep.dtype == np.float32
    one, _ = synthesis.sample_guided(ldm, PF, PB, 7.5, [3], steps=STEPS)
    np.testing.assert_allclose(sweep[3], one[0], atol=1e-4)  # same seed -> same initial noise
    assert not np.allclose(sweep[0], sweep[3], atol=1e-3)


def test_s1_equals_diffusers_pipeline(ldm):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    seeds = [11, 12]
    ours, _ = synthesis.sample_guided(ldm, PF, PB, 1.0, seeds, steps=STEPS)
    pipe = StableDiffusionPipeline(
        vae=ldm.vae, unet=ldm.unet, text_encoder=ldm.text_encoder, tokenizer=ldm.tokenizer,
        scheduler=DDIMScheduler.from_config(ldm.scheduler.config), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    lat0 = synthesis.initial_latents(ldm, seeds)
    ref = pipe([PF] * 2, height=64, width=64, num_inference_steps=STEPS, guidance_scale=1.0,
               eta=0.0, latents=lat0, output_type="np").images
    np.testing.assert_allclose(ours, np.asarray(ref, np.float32), atol=1e-3)
