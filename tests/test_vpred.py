"""SD 2.x / v-prediction through core, on a tiny SD-2-shaped v-prediction model built into a temporary
folder (tests/fixtures/make_tiny_sd2.py), next to the tiny SD-1-shaped ε fixture: the scheduler's
prediction_type reaches every scheduler core builds, guided sampling equals diffusers'
StableDiffusionPipeline (s = 1 and CFG with a negative prompt), and the v output is not read as ε."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fgbg_utils.core import inpaint, models, sampling, synthesis
from fgbg_utils.core.pipeline import FgBgPipeline

torch.set_num_threads(1)
FIXTURES = Path(__file__).resolve().parent / "fixtures"
TINY_SD = FIXTURES / "tiny-sd"
PF, PB = "a photo of a bird", "a photo of a background"
STEPS = 4


@pytest.fixture(scope="module")
def vpred_path(tmp_path_factory):
    sys.path.insert(0, str(FIXTURES))
    import make_tiny_sd2

    return make_tiny_sd2.main(["--out", str(tmp_path_factory.mktemp("tiny-sd2") / "model")])


@pytest.fixture(scope="module")
def vldm(vpred_path):
    return models.load_ldm(str(vpred_path), device="cpu")


@pytest.fixture(scope="module")
def eldm():
    return models.load_ldm(str(TINY_SD), device="cpu")


def _sd_pipe(ldm, prediction_type=None):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    kw = {} if prediction_type is None else {"prediction_type": prediction_type}
    pipe = StableDiffusionPipeline(
        vae=ldm.vae, unet=ldm.unet, text_encoder=ldm.text_encoder, tokenizer=ldm.tokenizer,
        scheduler=DDIMScheduler.from_config(ldm.scheduler.config, **kw), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _reference(ldm, seeds, s=1.0, negative=None, prediction_type=None):
    lat = synthesis.initial_latents(ldm, seeds)
    kw = {"negative_prompt": [negative] * len(seeds)} if negative is not None else {}
    out = _sd_pipe(ldm, prediction_type)([PF] * len(seeds), height=ldm.resolution, width=ldm.resolution,
                                        num_inference_steps=STEPS, guidance_scale=s, eta=0.0,
                                        latents=lat, output_type="np", **kw).images
    return np.asarray(out, np.float32)


def test_prediction_type_carries_through(vldm, eldm):
    assert vldm.scheduler.config.prediction_type == "v_prediction"
    assert eldm.scheduler.config.prediction_type == "epsilon"
    assert inpaint.make_inpaint_pipeline(vldm).scheduler.config.prediction_type == "v_prediction"
    assert vldm.unet.config.use_linear_projection and vldm.unet.config.upcast_attention


def test_unsupported_prediction_type_is_refused(vpred_path, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(vpred_path, bad)
    cfg_path = bad / "scheduler" / "scheduler_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["prediction_type"] = "sample"
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(models.ModelError, match="prediction_type"):
        models.load_ldm(str(bad), device="cpu")


def test_v_combination_equals_eps_combination():
    """Guidance on v outputs == guidance on the ε they stand for, through one DDIM step."""
    from diffusers import DDIMScheduler

    base = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
                "beta_schedule": "scaled_linear", "steps_offset": 1, "clip_sample": False,
                "set_alpha_to_one": False}
    sv, se = DDIMScheduler(prediction_type="v_prediction", **base), DDIMScheduler(**base)
    for s_ in (sv, se):
        s_.set_timesteps(10)
    g = torch.Generator().manual_seed(0)
    z, v_f, v_b = (torch.randn((2, 4, 8, 8), generator=g, dtype=torch.float64) for _ in range(3))
    t = sv.timesteps[3]
    a = sv.alphas_cumprod[t].double()
    alpha, sigma = a.sqrt(), (1 - a).sqrt()
    to_eps = lambda v: sigma * z + alpha * v
    for s in (1.0, 0.0, 3.0, -2.0):
        v_hat = v_b + s * (v_f - v_b)
        e_hat = to_eps(v_b) + s * (to_eps(v_f) - to_eps(v_b))
        torch.testing.assert_close(sv.step(v_hat, t, z, eta=0.0).prev_sample,
                                   se.step(e_hat, t, z, eta=0.0).prev_sample, atol=1e-5, rtol=0)  # float32 alphas


@pytest.mark.parametrize("which", ["v", "eps"])
def test_s1_sampling_equals_diffusers(which, vldm, eldm):
    ldm = vldm if which == "v" else eldm
    seeds = [3, 4]
    ours, _ = synthesis.sample_guided(ldm, PF, PB, 1.0, seeds, steps=STEPS)
    np.testing.assert_allclose(ours, _reference(ldm, seeds), atol=1e-4)


def test_v_output_is_not_read_as_eps(vldm):
    """The same v-UNet sampled with an ε-configured scheduler gives clearly different images: the
    match above is not a coincidence of an insensitive model."""
    seeds = [3, 4]
    ours, _ = synthesis.sample_guided(vldm, PF, PB, 1.0, seeds, steps=STEPS)
    as_eps = _reference(vldm, seeds, prediction_type="epsilon")
    assert np.abs(ours - as_eps).max() > 1e-2


@pytest.mark.parametrize("which", ["v", "eps"])
def test_sample_images_cfg_equals_diffusers(which, vldm, eldm):
    """sample_images (now a wrapper over sample_guided) keeps the numerics of the diffusers
    pipeline it replaced: s > 1 with a negative prompt, s > 1 without (empty prompt), and s = 1."""
    ldm = vldm if which == "v" else eldm
    seeds = [5, 6]
    for s, neg in ((3.0, PB), (2.0, None), (1.0, PB)):
        got = sampling.sample_images(ldm, PF, seeds, STEPS, s, neg)
        np.testing.assert_allclose(got, _reference(ldm, seeds, s, neg), atol=1e-4)


def test_pipeline_maps_masks_and_inpainting_on_vpred(vldm):
    pipe = FgBgPipeline(vldm, tuned=vldm)  # the base UNet stands in for m'
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (16, 12, 3), dtype=np.uint8), rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)]
    maps = pipe.attention_maps(images, "bird", T0=3)
    assert maps.mhat.shape == (2, 8, 8) and np.isfinite(maps.mhat_raw).all()
    assert maps.mhat[0][maps.valid(0)].max() == 1.0 and (maps.mhat[0][~maps.valid(0)] == 0).all()
    masks = pipe.preliminary_masks(maps)
    assert masks.masks.shape == (2, 8, 8) and masks.masks.dtype == bool
    ref = pipe.refine(images, masks, steps=3)
    assert ref.backgrounds.shape == (2, 16, 16, 3) and np.isfinite(ref.backgrounds).all()
    assert [m.shape for m in ref.masks_original] == [(16, 12), (16, 16)]


def test_inpainting_uses_v_prediction(vldm):
    """Inpainting with the v scheduler differs from the same UNet read as ε (the config is used)."""
    x = torch.from_numpy(np.random.default_rng(1).uniform(-1, 1, (1, 3, 16, 16)).astype(np.float32))
    m = np.zeros((1, 8, 8), bool)
    m[0, 2:6, 2:6] = True
    lat_v = inpaint._inpaint(vldm, x, m, PB, steps=3, seeds=[0], output_type="latent")
    as_eps = inpaint.make_inpaint_pipeline(vldm)
    from diffusers import DDIMScheduler
    as_eps.scheduler = DDIMScheduler.from_config(vldm.scheduler.config, prediction_type="epsilon")
    lat_e = inpaint._inpaint(vldm, x, m, PB, steps=3, seeds=[0], output_type="latent", pipe=as_eps)
    inside = torch.from_numpy(m)[:, None].expand_as(lat_v)
    assert (lat_v - lat_e)[inside].abs().max() > 1e-2
    torch.testing.assert_close(lat_v[~inside], lat_e[~inside])  # the known region is pasted z0
