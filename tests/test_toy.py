"""The toy world: deterministic generator with exact masks, and the shipped model loads offline
through the same from_pretrained code as Stable Diffusion."""
import numpy as np
import pytest

from fgbg_utils.data import toy
from fgbg_utils.runs.params import PROJECT_ROOT

SHIPPED = PROJECT_ROOT / "models" / "toy-ldm"


def test_generator_is_deterministic_and_order_free():
    a = toy.generate_arrays(12, seed=5)
    b = toy.generate_arrays(12, seed=5)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]
    c = toy.generate_arrays(4, seed=5)  # sample i depends only on (seed, i)
    assert np.array_equal(a[0][:4], c[0])
    d = toy.generate_arrays(12, seed=6)
    assert not np.array_equal(a[0], d[0])


def test_masks_are_exact():
    rng = np.random.default_rng(0)
    img, mask, meta = toy.render_sample(rng, 64)
    colour = np.array(toy.COLOURS[meta["colour"]]) * 255
    inside = img[mask].astype(float)
    assert mask.sum() > 50
    assert np.abs(inside.mean(0) - colour).max() < 30  # object colour (+ jitter/noise) on the mask
    circle = toy.shape_mask(64, "circle", 32, 32, 10, 0)
    assert abs(circle.sum() - np.pi * 100) < 15


def test_background_only_and_captions():
    imgs, masks, caps, metas = toy.generate_arrays(200, seed=1, background_fraction=0.3)
    empty = [m.sum() == 0 for m in masks]
    assert 0.15 < np.mean(empty) < 0.45
    for e, c in zip(empty, caps):
        assert (c == toy.BACKGROUND_CAPTION) == e
    words = {w for c in caps for w in c.split()}
    assert words <= set(toy.VOCAB)
    assert toy.CONCEPT in words and "circle" in words  # generic and specific words both occur


def test_tokenizer_roundtrip():
    tok = toy.build_tokenizer()
    ids = tok("a photo of a red circle", padding="max_length", max_length=toy.MAX_LENGTH).input_ids
    assert ids[0] == tok.bos_token_id and len(ids) == toy.MAX_LENGTH
    assert tok.convert_ids_to_tokens(ids[5]) == "red"


@pytest.mark.skipif(not SHIPPED.exists(), reason="models/toy-ldm not built yet")
def test_shipped_model_loads_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from diffusers import StableDiffusionPipeline
    from fgbg_utils.core.models import load_ldm, noise_grid

    pipe = StableDiffusionPipeline.from_pretrained(SHIPPED)
    assert pipe.unet.config.in_channels == 4
    ldm = load_ldm(str(SHIPPED), device="cpu")
    assert ldm.resolution == 64 and ldm.latent_size == 16
    assert noise_grid(ldm.scheduler)[:3].tolist() == [981, 961, 941]
    size = sum(f.stat().st_size for f in SHIPPED.rglob("*") if f.is_file())
    assert size < 25 * 2**20
    assert not list(SHIPPED.rglob("*.bin")) and not list(SHIPPED.rglob("*.pt"))  # safetensors only
