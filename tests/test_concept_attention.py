"""`attention.aggregation: concept` (ConceptAttention, core/concept_attention.py) on the tiny random
SD3 and Flux pipelines: generation unchanged, maps on the latent grid, the stock attention
reproduced, processors and hooks removed; errors name the parameter."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from fgbg_utils.core import concept_attention as ca
from fgbg_utils.core import families
from fgbg_utils.core.attention import AttentionStore
from fgbg_utils.core.pipeline import FgBgPipeline
from tests.fixtures.make_tiny_families import tiny_family

TEMPLATE = "a photo of a {object}"


@pytest.fixture(scope="module", params=["sd3", "flux"])
def pipe(request):
    return FgBgPipeline.from_pretrained(str(tiny_family(request.param)), device="cpu", dtype="float32")


def _inputs(ldm):
    cond = families.encode_condition(ldm, TEMPLATE.replace("{object}", "bird"))
    g = torch.Generator().manual_seed(0)
    z0 = torch.randn((2, 4, ldm.latent_size, ldm.latent_size), generator=g)
    den = families.denoiser(ldm, cond)
    levels = den.levels(families.noise_levels(ldm, 2))
    return cond, den.noised(z0, torch.randn(z0.shape, generator=g), levels), levels


def _hooks(model):
    return sum(len(m._forward_pre_hooks) for m in model.modules())


@torch.no_grad()
def test_generation_unchanged_and_maps_on_the_grid(pipe):
    ldm = pipe.ldm
    cond, zt, levels = _inputs(ldm)
    concepts = ca.concept_tokens(ldm, TEMPLATE, ["bird"], ["background", "dog"])
    assert concepts.names == ["bird", "background", "dog"] and set(concepts.group.tolist()) == {0, 1, 2}
    toks = families.prompt_positions(ldm, TEMPLATE.replace("{object}", "bird"), ["bird"])["bird"]
    stock = families.denoiser(ldm, cond)(zt, levels)
    before, hooks = dict(ldm.unet.attn_processors), _hooks(ldm.unet)
    den = families.denoiser(ldm, cond, concepts=concepts)
    store = AttentionStore(toks, ldm.latent_size)
    with den.capture(store):
        got = den(zt, levels)
    assert torch.equal(got, stock)  # bit for bit: the concept stream is never read by generation
    assert all(ldm.unet.attn_processors[k] is before[k] for k in before) and _hooks(ldm.unet) == hooks
    names = families.layer_names(ldm, aggregation="concept")
    assert names == ca.concept_layers(ldm.unet) and len(store.maps) == len(names)
    assert not any(n.startswith("single_") for n in names)  # Flux: double-stream blocks only
    for m in store.maps.values():
        assert m.shape == (2, len(toks), ldm.latent_size, ldm.latent_size)
        p = m.sum(1)  # the object concept's softmax probability
        assert float(p.min()) >= 0 and float(p.max()) <= 1 and float(p.std()) > 0


@torch.no_grad()
def test_image_attention_is_the_blocks_own(pipe):
    """The image outputs compared with the concepts are the layer's: through to_out they give its output."""
    ldm = pipe.ldm
    cond, zt, levels = _inputs(ldm)
    name = ca.concept_layers(ldm.unet)[0]
    attn = ldm.unet.get_submodule(name)
    seen = {}
    h = attn.register_forward_hook(lambda m, a, k, o: seen.update(k=k, o=o), with_kwargs=True)
    try:
        families.denoiser(ldm, cond)(zt, levels)
    finally:
        h.remove()
    k = seen["k"]
    stream = ca.ConceptStream(ldm.unet, None, None, ldm.family)
    o_x, _, _ = stream.image_attention(attn, k["hidden_states"], k["encoder_hidden_states"],
                                       k.get("image_rotary_emb"))
    out = seen["o"][0] if isinstance(seen["o"], tuple) else seen["o"]
    torch.testing.assert_close(attn.to_out[0](o_x), out, atol=1e-5, rtol=1e-4)


@torch.no_grad()
def test_object_map_is_a_softmax_over_concepts():
    store = AttentionStore([3, 4], 2)
    c = ca.Concepts(torch.zeros(3, 1), torch.tensor([0, 0, 1]), ["obj", "bg"])
    stream = ca.ConceptStream(None, c, store, "sd3")
    o_x = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])          # two image tokens
    o_c = torch.tensor([[[2.0, 0.0], [0.0, 0.0], [0.0, 1.0]]])  # object pieces, then background
    p = stream.object_map(o_x, o_c)
    want = torch.softmax(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), -1)[:, 0] / 2
    torch.testing.assert_close(p[0], want[:, None].expand(2, 2))


def test_pipeline_maps_and_errors(pipe):
    img = np.random.default_rng(0).integers(0, 255, (16, 16, 3), dtype=np.uint8)
    maps = pipe.attention_maps(img, "bird", T0=2, aggregation="concept", concepts=["background"])
    assert maps.mhat.shape == (1, 8, 8) and maps.layers == ca.concept_layers(pipe.ldm.unet)
    cross = pipe.attention_maps(img, "bird", T0=2)
    assert not np.allclose(maps.mhat_raw, cross.mhat_raw)
    with pytest.raises(ValueError, match="attention.concepts"):
        pipe.attention_maps(img, "bird", T0=2, aggregation="concept", concepts=[])
    with pytest.raises(ValueError, match="attention.concepts"):
        pipe.attention_maps(img, "bird", T0=2, aggregation="concept", concepts=["bird"])


def test_concept_needs_an_mmdit():
    sd = FgBgPipeline.from_pretrained("tests/fixtures/tiny-sd", device="cpu")
    with pytest.raises(ValueError, match="attention.aggregation"):
        sd.layer_names(aggregation="concept")
