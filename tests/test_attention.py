"""Cross-attention capture (docs/method.md §2.1, §6 "Attention capture") on two UNet layouts: a fresh random
toy model (`toy.build_models()`) and the tiny SD-v1-shaped fixture (tests/fixtures/tiny-sd)."""
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from fgbg_utils.core import attention, models, seeds
from fgbg_utils.data import toy
from fgbg_utils.core.attention import (
    AttentionStore, CrossAttentionCapture, attention_maps, capture_cross_attention, image_noise, reduce_maps)

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "tiny-sd"


@pytest.fixture(scope="module")
def toy_setup():
    """Fresh random toy UNet at 64 px (latent 16x16; attn2 at 16x16 and 8x8)."""
    torch.manual_seed(0)
    vae, unet, text_encoder, tokenizer, scheduler = toy.build_models(image_size=64, seed=3)
    unet.eval().requires_grad_(False)
    text_encoder.eval()
    ids = tokenizer(["a photo of a shape"], padding="max_length", max_length=toy.MAX_LENGTH,
                    return_tensors="pt").input_ids
    with torch.no_grad():
        emb = text_encoder(ids)[0]
    return {"unet": unet, "scheduler": scheduler, "emb": emb, "latent": 16, "tokens": [5],
            "n_cross": 2}


@pytest.fixture(scope="module")
def sd_setup():
    """The tiny SD fixture through the project's own loader (latent 8x8; 4 attn2 layers at 4x4)."""
    ldm = models.load_ldm(str(FIXTURE), device="cpu")
    emb = models.encode_prompt(ldm, "a photo of a bird")
    return {"unet": ldm.unet, "scheduler": ldm.scheduler, "emb": emb, "latent": ldm.latent_size,
            "tokens": [5], "n_cross": 4}


@pytest.fixture(params=["toy", "sd"])
def setup(request):
    return request.getfixturevalue(f"{request.param}_setup")


def _inputs(s, rows=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn((rows, 4, s["latent"], s["latent"]), generator=g)
    t = torch.tensor([1, 401, 781][:rows] + [21] * max(0, rows - 3))
    return z, t, s["emb"].expand(rows, -1, -1)


def _cross_names(unet):
    return [n for n in unet.attn_processors if n.endswith("attn2.processor")]


# ----------------------------------------------------------------------------- install / restore
@torch.no_grad()
def test_output_unchanged_and_processors_restored(setup):
    unet = setup["unet"]
    z, t, emb = _inputs(setup)
    before = dict(unet.attn_processors)
    stock = unet(z, t, encoder_hidden_states=emb).sample
    store = AttentionStore(setup["tokens"], setup["latent"])
    with capture_cross_attention(unet, store):
        captured = unet(z, t, encoder_hidden_states=emb).sample
        assert len(store.maps) == len(_cross_names(unet))
    assert torch.allclose(captured, stock, rtol=0, atol=1e-6), (captured - stock).abs().max()
    after = unet.attn_processors
    assert after.keys() == before.keys()
    assert all(after[k] is before[k] for k in before)  # the very same processor objects
    assert torch.equal(unet(z, t, encoder_hidden_states=emb).sample, stock)


@torch.no_grad()
def test_processors_restored_when_unet_raises(setup):
    unet = setup["unet"]
    z, t, emb = _inputs(setup)
    before = dict(unet.attn_processors)
    bad = torch.randn(emb.shape[0], emb.shape[1], emb.shape[2] + 1)  # wrong context width
    with pytest.raises(RuntimeError):
        with capture_cross_attention(unet, AttentionStore(setup["tokens"], setup["latent"])):
            unet(z, t, encoder_hidden_states=bad)
    assert all(unet.attn_processors[k] is before[k] for k in before)
    # ... and through attention_maps as well
    noise = torch.randn((1, 2, *z.shape[1:]))
    with pytest.raises(RuntimeError):
        attention_maps(unet, setup["scheduler"], z[:1], bad[:1], setup["tokens"], [1, 21], noise)
    assert all(unet.attn_processors[k] is before[k] for k in before)


def test_capture_only_on_cross_attention(setup):
    unet = setup["unet"]
    cross = _cross_names(unet)
    assert len(cross) == setup["n_cross"]
    store = AttentionStore(setup["tokens"], setup["latent"])
    with capture_cross_attention(unet, store):
        procs = unet.attn_processors
        capture = [n for n, p in procs.items() if isinstance(p, CrossAttentionCapture)]
        assert sorted(capture) == sorted(cross)
        assert len(capture) == len(store.layers) == len(cross)
        attn1 = [p for n, p in procs.items() if n.endswith("attn1.processor")]
        assert attn1 and all(type(p) is AttnProcessor2_0 for p in attn1)
    assert store.layers == [n.removesuffix(".processor") for n in cross]


# ----------------------------------------------------------------------------- probabilities
def _manual_probs(attn, hidden, context, tokens):
    """Head-mean softmax(QK^T/sqrt(d)) over all keys, columns `tokens`: (rows, pixels, n_tokens)."""
    q, k = attn.to_q(hidden).double(), attn.to_k(context).double()
    b, n, inner = q.shape
    d = inner // attn.heads
    q = q.view(b, n, attn.heads, d).transpose(1, 2)
    k = k.view(b, -1, attn.heads, d).transpose(1, 2)
    p = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), dim=-1)  # (b, heads, n, keys)
    assert torch.allclose(p.sum(-1), torch.ones((), dtype=p.dtype))
    return p.mean(1)[..., tokens]


def _to_grid(probs, latent):
    b, n, k = probs.shape
    r = math.isqrt(n)
    m = probs.permute(0, 2, 1).reshape(b, k, r, r)
    f = latent // r
    return m.repeat_interleave(f, -2).repeat_interleave(f, -1)


@torch.no_grad()
def test_captured_probabilities_match_manual_softmax_in_unet(setup):
    """Hook one real attn2 layer's inputs and recompute its attention by hand."""
    unet = setup["unet"]
    names = [n.removesuffix(".processor") for n in _cross_names(unet)]
    layer = len(names) - 1
    module = unet.get_submodule(names[layer])
    seen = {}

    def hook(mod, args, kwargs):
        seen["hidden"] = args[0] if args else kwargs["hidden_states"]
        seen["context"] = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)

    tokens = [0, *setup["tokens"], 6]
    handle = module.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        z, t, emb = _inputs(setup)
        store = AttentionStore(tokens, setup["latent"])
        with capture_cross_attention(unet, store):
            unet(z, t, encoder_hidden_states=emb)
    finally:
        handle.remove()
    assert seen["context"] is not None and seen["context"].shape == emb.shape
    want = _to_grid(_manual_probs(module, seen["hidden"], seen["context"], tokens), setup["latent"])
    got = store.maps[layer]
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert torch.allclose(got.double(), want, atol=1e-6)


@torch.no_grad()
def test_processor_direct_call_on_attention_module():
    torch.manual_seed(0)
    attn = Attention(query_dim=16, cross_attention_dim=12, heads=4, dim_head=8).eval()
    hidden = torch.randn(2, 36, 16)  # a 6x6 layer
    context = torch.randn(2, 9, 12)
    all_keys = list(range(9))
    store = AttentionStore(all_keys, latent_size=12)
    store.layers = ["direct"]
    out = CrossAttentionCapture(store, 0)(attn, hidden, encoder_hidden_states=context)
    assert torch.allclose(out, AttnProcessor2_0()(attn, hidden, encoder_hidden_states=context),
                          atol=1e-6)
    want = _to_grid(_manual_probs(attn, hidden, context, all_keys), 12)
    got = store.maps[0]
    assert got.shape == (2, 9, 12, 12)
    assert torch.allclose(got.double(), want, atol=1e-6)
    assert torch.allclose(got.sum(1), torch.ones(()), atol=1e-5)  # not renormalised: all keys sum to 1
    with pytest.raises(RuntimeError, match="self-attention"):
        CrossAttentionCapture(store, 0)(attn, hidden)


# ----------------------------------------------------------------------------- batching
def _levels_and_noise(s, B=2, T=4, seed=0):
    ts = models.lowest_timesteps(s["scheduler"], T)
    noise = torch.stack([image_noise(seeds.generator(seed, "01-noise", f"img{b}"), 50,
                                     (4, s["latent"], s["latent"]))[:T] for b in range(B)])
    z0 = torch.randn((B, 4, s["latent"], s["latent"]), generator=torch.Generator().manual_seed(seed))
    return z0, ts, noise


def test_batched_equals_per_timestep_loop(setup):
    z0, ts, noise = _levels_and_noise(setup)
    args = (setup["unet"], setup["scheduler"], z0, setup["emb"], setup["tokens"])
    batched = attention_maps(*args, ts, noise, batch_rows=1000)
    B, T = z0.shape[0], len(ts)
    n_layers = len(_cross_names(setup["unet"]))
    assert batched.shape == (B, T, n_layers, 1, setup["latent"], setup["latent"])
    assert batched.dtype == torch.float32 and (batched >= 0).all() and (batched <= 1).all()
    one_row = attention_maps(*args, ts, noise, batch_rows=1)
    assert torch.allclose(batched, one_row, atol=1e-5)
    looped = torch.cat([attention_maps(*args, ts[k:k + 1], noise[:, k:k + 1], batch_rows=1)
                        for k in range(T)], dim=1)
    assert torch.allclose(batched, looped, atol=1e-5)
    odd = attention_maps(*args, ts, noise, batch_rows=3)  # chunks straddling images
    assert torch.allclose(batched, odd, atol=1e-5)
    # the levels really differ (each row got its own t and noise)
    assert not torch.allclose(batched[:, 0], batched[:, -1], atol=1e-6)


def test_reduce_maps_shapes_and_values():
    g = torch.Generator().manual_seed(0)
    full = torch.rand((2, 5, 3, 2, 8, 8), generator=g)
    red = reduce_maps(full, T0=3)
    assert red["mhat_raw"].shape == (2, 8, 8)
    assert red["per_timestep"].shape == (2, 5, 8, 8)
    assert red["per_layer"].shape == (2, 3, 8, 8)
    assert red["per_token"].shape == (2, 2, 8, 8)
    assert torch.allclose(red["mhat_raw"], full[:, :3].mean((1, 2)).sum(1))
    assert torch.allclose(red["per_token"].sum(1), red["mhat_raw"])
    assert torch.allclose(red["per_layer"].mean(1), red["mhat_raw"], atol=1e-6)
    assert torch.allclose(red["per_timestep"][:, :3].mean(1), red["mhat_raw"], atol=1e-6)


def test_two_tokens_sum_to_per_token_maps(sd_setup):
    s = sd_setup
    z0, ts, noise = _levels_and_noise(s, B=1, T=3)
    run = lambda toks: reduce_maps(attention_maps(s["unet"], s["scheduler"], z0, s["emb"], toks,
                                                  ts, noise), T0=3)
    both, a, b = run([2, 5]), run([2]), run([5])
    assert torch.allclose(both["mhat_raw"], a["mhat_raw"] + b["mhat_raw"], atol=1e-6)
    assert torch.allclose(both["per_token"][:, 0], a["mhat_raw"], atol=1e-6)
    assert torch.allclose(both["per_token"][:, 1], b["mhat_raw"], atol=1e-6)


def test_noise_of_first_levels_does_not_depend_on_T0(sd_setup):
    s = sd_setup
    shape = (4, s["latent"], s["latent"])
    block = lambda: image_noise(seeds.generator(7, "01-noise", "img"), 50, shape)
    n3, n10 = block()[:3], block()[:10]  # as stage 01 draws it: one 50-level block, then sliced
    assert torch.equal(n3, n10[:3])
    other = image_noise(seeds.generator(7, "01-noise", "other"), 50, shape)
    assert not torch.equal(other[:3], n3)
    # so the maps of the shared levels are the same whatever T0 is
    z0 = torch.randn((1, *shape), generator=torch.Generator().manual_seed(1))
    ts = models.lowest_timesteps(s["scheduler"], 5)
    args = (s["unet"], s["scheduler"], z0, s["emb"], s["tokens"])
    m3 = attention_maps(*args, ts[:3], n10[None, :3])
    m5 = attention_maps(*args, ts, n10[None, :5])
    assert torch.allclose(m3, m5[:, :3], atol=1e-6)


def test_store_rejects_non_dividing_layer():
    store = AttentionStore([1], latent_size=8)
    store.layers = ["odd"]
    with pytest.raises(RuntimeError, match="square map"):
        store.add(0, torch.rand(1, 9, 1))  # 3x3 does not divide 8
    empty = AttentionStore([1], latent_size=8)
    empty.layers = ["a"]
    with pytest.raises(RuntimeError, match="no attention captured"):
        empty.stacked()


def test_minmax_valid_region():
    m = np.arange(16, dtype=np.float32).reshape(4, 4)
    valid = np.zeros((4, 4), bool)
    valid[:2, :3] = True
    out = attention.minmax(m, valid)
    assert out[valid].min() == 0 and out[valid].max() == 1 and (out[~valid] == 0).all()
