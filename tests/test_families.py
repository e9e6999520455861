"""Model families (issue 17) on tiny random SDXL, SD3 and Flux pipelines (tests/fixtures/
make_tiny_families.py; real CLIP BPE, small T5 tokenizer; nothing downloaded): the capture equals a
manual softmax of each family's attention (SDXL attn2; SD3 joint [image, text]; Flux joint
[text, image] with RoPE, double- AND single-stream blocks), the layer outputs are the stock ones,
processors are restored, token positions come from each tokenizer, noise levels and noising follow
each family's scheduler, and the pipeline gives maps and masks on the canonical frame."""
import math

import numpy as np
import pytest
import torch

from fgbg_utils.core import attention, families, joint_attention, models
from fgbg_utils.core.attention import AttentionStore
from fgbg_utils.core.pipeline import FgBgPipeline
from fgbg_utils.runs.params import PROJECT_ROOT
from tests.fixtures.make_tiny_families import tiny_family

PROMPT = "a photo of a hummingbird"


@pytest.fixture(scope="module", params=["sdxl", "sd3", "flux"])
def pipe(request):
    return FgBgPipeline.from_pretrained(str(tiny_family(request.param)), device="cpu", dtype="float32")


def _record(model, names):
    """Forward hooks on the named attention modules: their inputs (kwargs) and outputs."""
    seen, handles = {}, []
    modules = dict(model.named_modules())
    for n in names:
        def hook(mod, args, kwargs, out, n=n):
            seen[n] = (args, kwargs, out)
        handles.append(modules[n].register_forward_hook(hook, with_kwargs=True))
    return seen, handles


def _heads(x, heads):  # (B, S, H*d) -> (B, H, S, d)
    b, s, _ = x.shape
    return x.view(b, s, heads, -1).transpose(1, 2)


def _reference(family, attn, args, kwargs, n_text):
    """Full softmax P (B, H, S_q, S_k) of the layer, the image-query rows, the offset of the text
    keys, and P @ V (for the check that P IS the layer's attention)."""
    hs = kwargs.get("hidden_states", args[0] if args else None)
    enc = kwargs.get("encoder_hidden_states")
    if family == "sdxl":
        q, k, v = (_heads(f(x), attn.heads) for f, x in ((attn.to_q, hs), (attn.to_k, enc), (attn.to_v, enc)))
        rows, text_at = slice(None), 0
    elif family == "sd3":
        assert attn.norm_q is not None  # the fixture uses SD3.5's qk rms-norm
        q = attn.norm_q(_heads(attn.to_q(hs), attn.heads))
        k = torch.cat([attn.norm_k(_heads(attn.to_k(hs), attn.heads)),
                       attn.norm_added_k(_heads(attn.add_k_proj(enc), attn.heads))], 2)
        v = torch.cat([_heads(attn.to_v(hs), attn.heads), _heads(attn.add_v_proj(enc), attn.heads)], 2)
        q = torch.cat([q, attn.norm_added_q(_heads(attn.add_q_proj(enc), attn.heads))], 2)
        rows, text_at = slice(0, hs.shape[1]), hs.shape[1]
    else:
        from diffusers.models.embeddings import apply_rotary_emb
        rope = kwargs["image_rotary_emb"]
        split = lambda x: x.unflatten(-1, (-1, attn.head_dim))
        q, k, v = attn.norm_q(split(attn.to_q(hs))), attn.norm_k(split(attn.to_k(hs))), split(attn.to_v(hs))
        if enc is not None:
            q = torch.cat([attn.norm_added_q(split(attn.add_q_proj(enc))), q], 1)
            k = torch.cat([attn.norm_added_k(split(attn.add_k_proj(enc))), k], 1)
            v = torch.cat([split(attn.add_v_proj(enc)), v], 1)
        q, k = apply_rotary_emb(q, rope, sequence_dim=1), apply_rotary_emb(k, rope, sequence_dim=1)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        rows, text_at = slice(n_text, None), 0
    p = torch.softmax(q.double() @ k.double().transpose(-1, -2) / math.sqrt(q.shape[-1]), -1)
    return p, rows, text_at, (p @ v.double())


@torch.no_grad()
def test_capture_equals_manual_softmax_and_outputs_unchanged(pipe):
    ldm = pipe.ldm
    fam = ldm.family
    cond = families.encode_condition(ldm, PROMPT)
    toks = families.prompt_positions(ldm, PROMPT, ["hummingbird"])["hummingbird"]
    L = ldm.latent_size
    g = torch.Generator().manual_seed(0)
    z0 = torch.randn((2, ldm.unet.config.in_channels if fam != "flux" else 4, L, L), generator=g)
    eps = torch.randn(z0.shape, generator=g)
    den = families.denoiser(ldm, cond)
    levels = den.levels(families.noise_levels(ldm, 2))
    zt = den.noised(z0, eps, levels)
    names = families.layer_names(ldm)
    before = dict(ldm.unet.attn_processors)
    stock = den(zt, levels)
    stock = stock[0] if isinstance(stock, tuple) else getattr(stock, "sample", stock)
    store = AttentionStore(toks, L)
    seen, handles = _record(ldm.unet, names)
    try:
        with den.capture(store):
            got = den(zt, levels)
    finally:
        for h in handles:
            h.remove()
    got = got[0] if isinstance(got, tuple) else getattr(got, "sample", got)
    assert torch.equal(got, stock)  # the stock processors' output, bit for bit
    after = ldm.unet.attn_processors
    assert all(after[k] is before[k] for k in before)  # restored, the very same objects
    assert fam != "flux" or any(n.startswith("single_transformer_blocks") for n in names)
    n_text = cond.emb.shape[1]
    modules = dict(ldm.unet.named_modules())
    for i, name in enumerate(names):
        args, kwargs, out = seen[name]
        attn = modules[name]
        p, rows, text_at, pv = _reference(fam, attn, args, kwargs, n_text)
        # P is the layer's attention: P @ V through the layer's output projection is its output
        o = pv.float().transpose(1, 2).flatten(2)
        if fam == "flux" and kwargs.get("encoder_hidden_states") is None:
            torch.testing.assert_close(o, out, atol=1e-5, rtol=1e-4)
        else:
            img_out = out[0] if isinstance(out, tuple) else out
            n_img = img_out.shape[1]
            o_img = o[:, -n_img:] if fam == "flux" else o[:, :n_img]
            torch.testing.assert_close(attn.to_out[0](o_img), img_out, atol=1e-5, rtol=1e-4)
        want = p[:, :, rows][..., [text_at + t for t in toks]].mean(1).float()  # (B, N_img, k)
        r = math.isqrt(want.shape[1])
        want = want.permute(0, 2, 1).reshape(2, len(toks), r, r)
        want = want.repeat_interleave(L // r, -2).repeat_interleave(L // r, -1)
        assert store.maps[i].shape == (2, len(toks), L, L)  # only the object columns are kept
        torch.testing.assert_close(store.maps[i], want, atol=1e-6, rtol=1e-5)


@torch.no_grad()
def test_processors_restored_when_the_model_raises(pipe):
    ldm = pipe.ldm
    cond = families.encode_condition(ldm, PROMPT)
    bad = families.Condition(cond.emb[..., :-1], cond.pooled, cond.time_ids, cond.text_ids)
    den = families.denoiser(ldm, bad)
    before = dict(ldm.unet.attn_processors)
    z = torch.zeros((1, 4, ldm.latent_size, ldm.latent_size))
    with pytest.raises((RuntimeError, ValueError)):
        with den.capture(AttentionStore([1], ldm.latent_size)):
            den(z, den.levels(families.noise_levels(ldm, 1)))
    assert all(ldm.unet.attn_processors[k] is before[k] for k in before)


def test_token_positions_from_each_tokenizer(pipe):
    info = pipe.describe_words(PROMPT, ["hummingbird", "photo"])
    fam = pipe.ldm.family
    clip = pipe.ldm.tokenizer
    if fam in ("sdxl", "sd3"):  # CLIP: <sot> a photo of a hummingbird -> position 5, one piece
        assert info["hummingbird"]["segments"]["clip"] == ["hummingbird</w>"]
        assert clip.convert_ids_to_tokens(clip(PROMPT).input_ids)[5] == "hummingbird</w>"
    if fam == "sd3":  # then T5 after CLIP's 77: ▁humming + bird at 77 + 4, 77 + 5
        assert info["hummingbird"]["positions"] == [5, 81, 82]
        assert info["hummingbird"]["segments"]["t5"] == ["▁humming", "bird"] and info["hummingbird"]["split"]
        assert info["photo"]["positions"] == [2, 78]
    if fam == "flux":  # T5 only (CLIP gives the pooled vector)
        assert info["hummingbird"]["positions"] == [4, 5] and info["hummingbird"]["split"]
        assert info["photo"]["positions"] == [1]
    if fam == "sdxl":
        assert info["hummingbird"]["positions"] == [5] and not info["hummingbird"]["split"]


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_max_sequence_length_sets_the_t5_tokens(family, tmp_path):
    """`model.max_sequence_length`: the joint sequence holds that many T5 tokens, the object's
    positions stay inside it, and the maps still come out; through the params like a run loads m."""
    from fgbg_utils import load_params
    from fgbg_utils.stages.common import load_pipeline

    folder = str(tiny_family(family))
    cfg = load_params(PROJECT_ROOT / "params" / f"{family}.yaml",
                      {"model.path": folder, "model.max_sequence_length": 8, "device": "cpu",
                       "dtype": "float32"}, run_dir=str(tmp_path))
    pipe = load_pipeline(cfg)
    cond = families.encode_condition(pipe.ldm, PROMPT)
    assert cond.emb.shape[1] == (77 + 8 if family == "sd3" else 8)
    assert families.encode_condition(FgBgPipeline.from_pretrained(folder, device="cpu").ldm,
                                     PROMPT).emb.shape[1] == (77 + 256 if family == "sd3" else 512)
    positions = pipe.describe_words(PROMPT, ["hummingbird"])["hummingbird"]["positions"]
    assert positions == ([5, 81, 82] if family == "sd3" else [4, 5])
    maps = pipe.attention_maps(np.zeros((16, 16, 3), np.uint8), "hummingbird", T0=2, grid_steps=4)
    assert np.isfinite(maps.mhat_raw).all() and maps.token_positions["hummingbird"] == positions
    with pytest.raises(Exception, match="max_sequence_length"):
        load_params(PROJECT_ROOT / "params" / f"{family}.yaml", {"model.max_sequence_length": 0})


def test_noise_levels_follow_the_scheduler(pipe):
    ldm = pipe.ldm
    levels = families.noise_levels(ldm, 5)
    if ldm.family == "sdxl":
        assert levels.tolist() == [1, 21, 41, 61, 81]  # the DDIM 'leading' grid
        return
    from diffusers import FlowMatchEulerDiscreteScheduler
    sched = FlowMatchEulerDiscreteScheduler.from_config(ldm.scheduler.config)
    if ldm.family == "sd3":
        sched.set_timesteps(50)
    else:  # as FluxPipeline: sigmas linspace(1, 1/N), mu from the packed sequence length
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift
        c = sched.config
        sched.set_timesteps(sigmas=np.linspace(1, 1 / 50, 50), mu=calculate_shift(
            (ldm.latent_size // 2) ** 2, c.base_image_seq_len, c.max_image_seq_len, c.base_shift, c.max_shift))
    lowest = np.sort((sched.timesteps / sched.config.num_train_timesteps).numpy())[:5]
    np.testing.assert_allclose(levels, lowest, rtol=1e-6)
    assert np.all(np.diff(levels) > 0) and 0 < levels[0] < levels[-1] < 1
    # the forward process is the flow's interpolation, as the scheduler's scale_noise
    den = families.denoiser(ldm, families.encode_condition(ldm, PROMPT))
    z0, eps = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    s = den.levels(levels[:3])
    ref = torch.cat([sched.scale_noise(z0[i:i + 1], (s[i:i + 1] * 1000), eps[i:i + 1]) for i in range(3)])
    torch.testing.assert_close(den.noised(z0, eps, s), ref, atol=1e-6, rtol=0)


def test_layer_selection(pipe):
    ldm = pipe.ldm
    all_layers = pipe.layer_names()
    pattern = "single_transformer_blocks.*" if ldm.family == "flux" else all_layers[0]
    chosen = pipe.layer_names([pattern])
    assert 0 < len(chosen) < len(all_layers) and set(chosen) <= set(all_layers)
    img = np.random.default_rng(0).integers(0, 255, (24, 16, 3), dtype=np.uint8)
    full = pipe.attention_maps(img, "hummingbird", T0=2, per_layer=True)
    sub = pipe.attention_maps(img, "hummingbird", T0=2, per_layer=True, layers=[pattern])
    assert sub.layers == chosen and full.layers == all_layers
    k = [all_layers.index(n) for n in chosen]
    np.testing.assert_allclose(sub.mhat_raw, full.per_layer[:, k].mean(1), rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="attention.layers"):
        pipe.attention_maps(img, "hummingbird", T0=2, layers=["nothing.*"])


def test_maps_and_masks_on_the_canonical_frame(pipe):
    ldm = pipe.ldm
    assert pipe.resolution == 16 and ldm.latent_size == 8  # native resolution from the config
    img = np.random.default_rng(1).integers(0, 255, (20, 40, 3), dtype=np.uint8)  # landscape
    maps = pipe.attention_maps([img, img[:, ::-1]], "hummingbird", T0=3, ids=["a", "b"], per_timestep=True)
    assert maps.mhat.shape == (2, 8, 8) and maps.per_timestep.shape == (2, 50, 8, 8)
    valid = maps.valid(0)
    assert valid[:4].all() and not valid[4:].any()  # 16x8 box of 16x16 on the 8x8 grid
    assert np.all(maps.mhat[:, ~valid] == 0) and maps.mhat[0][valid].max() == 1
    again = pipe.attention_maps([img], "hummingbird", T0=3, ids=["a"])  # id-seeded noise, batch of 1
    np.testing.assert_allclose(again.mhat_raw[0], maps.mhat_raw[0], rtol=1e-5)
    masks = pipe.preliminary_masks(maps)
    assert [m.shape for m in masks.original()] == [(20, 40), (20, 40)]
    assert not masks.masks[:, ~valid].any()


def test_components_build_the_family_pipeline(pipe):
    cls = families.pipeline_class(pipe.ldm.family)
    built = cls(**pipe.components)  # diffusers naming: the family's own pipeline accepts them
    assert built.vae is pipe.ldm.vae


def test_family_detection_and_errors(tmp_path):
    assert families.detect_family(str(tiny_family("sd3"))) == "sd3"
    assert families.detect_family("tests/fixtures/tiny-sd") == "sd"
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model_index.json").write_text('{"_class_name": "FluxPipeline"}')
    with pytest.raises(models.ModelError, match="model.path"):
        models.load_ldm(str(broken), device="cpu")


def test_row_bytes_for_a_transformer():
    """batch_rows="auto" sizes transformer rows too (no block_out_channels in their config)."""
    import types
    cfg = types.SimpleNamespace(num_attention_heads=24, attention_head_dim=64)  # SD3-medium-shaped
    fake = types.SimpleNamespace(device=torch.device("cuda"), dtype=torch.bfloat16, config=cfg)
    per_row = attention.row_bytes(fake, 128)  # 1024 px
    assert 0.5e9 < per_row < 10e9
    assert attention.row_bytes(fake, 64) < per_row
    assert attention.auto_batch_rows(fake, 128, free_bytes=int(10 * per_row / 0.7) + 1) == 10
    assert joint_attention.QUERY_CHUNK * 24 * 4429 * 4 < per_row  # one fp32 logits block fits


# ----------------------------------------------------------------------------- SD3: flow matching
@pytest.fixture(scope="module")
def sd3():
    return FgBgPipeline.from_pretrained(str(tiny_family("sd3")), device="cpu", dtype="float32").ldm


@torch.no_grad()
def test_flow_sampling_at_s1_equals_the_diffusers_pipeline(sd3):
    """s = 1 (y_f only) is StableDiffusion3Pipeline without CFG, from the same initial latents."""
    from fgbg_utils.core import flow
    pipe = families.as_diffusers_pipeline(sd3)
    noise = flow.initial_noise(sd3, [3, 4])
    ref = pipe("a photo of a bird", num_inference_steps=4, guidance_scale=1.0, latents=noise.clone(),
               height=16, width=16, output_type="latent", max_sequence_length=256).images
    cf = families.encode_condition(sd3, "a photo of a bird")
    cb = families.encode_condition(sd3, "a photo of a background")
    got = flow.sample(sd3, cf, cb, 1.0, noise, 4)
    torch.testing.assert_close(got, ref.float(), atol=1e-5, rtol=1e-5)
    # guidance on the velocity: one batched call = v_b + s (v_f - v_b) from separate calls
    z = noise
    v = flow.guided_velocity(sd3, z, 0.5, cf, cb, 2.5)
    v_f, v_b = flow.velocity(sd3, z, 0.5, cf), flow.velocity(sd3, z, 0.5, cb)
    torch.testing.assert_close(v, v_b + 2.5 * (v_f - v_b), atol=1e-5, rtol=1e-5)


def test_masked_flow_loss(sd3):
    from fgbg_utils.core import flow, rectangles
    g = torch.Generator().manual_seed(0)
    z0, eps = torch.randn((2, 4, 8, 8), generator=g), torch.randn((2, 4, 8, 8), generator=g)
    sigma = torch.tensor([0.2, 0.9])
    cond = families.encode_condition(sd3, "a photo of a bird")
    mask = torch.zeros((2, 1, 8, 8))
    mask[:, :, 2:6, 1:5] = 1
    loss = flow.masked_flow_loss(sd3, sd3.unet, z0, eps, sigma, cond, mask)
    zt = (1 - sigma.view(-1, 1, 1, 1)) * z0 + sigma.view(-1, 1, 1, 1) * eps
    pred = sd3.unet(hidden_states=zt, timestep=sigma * 1000, encoder_hidden_states=cond.emb.expand(2, -1, -1),
                    pooled_projections=cond.pooled.expand(2, -1), return_dict=False)[0]
    ref = rectangles.masked_eps_loss(pred, eps - z0, mask, "latent")  # velocity target ε − z0
    torch.testing.assert_close(loss, ref)
    assert flow.masked_flow_loss(sd3, sd3.unet, z0, eps, sigma, cond, torch.zeros_like(mask)) == 0
    sig = flow.training_sigmas(sd3.scheduler)
    assert len(sig) == 1000 and sig[0] == 1 and torch.all(sig[1:] < sig[:-1]) and sig[-1] > 0


@torch.no_grad()
def test_flow_inpainting_keeps_the_background(sd3):
    from fgbg_utils.core import flow
    x = torch.rand((2, 3, 16, 16)) * 2 - 1
    z0 = models.encode_images(sd3, x, "mode").float()
    keep = flow.inpaint_background(sd3, x, np.zeros((2, 8, 8), bool), "a photo of a background", steps=3)
    np.testing.assert_allclose(keep, flow.decode(sd3, z0), atol=1e-6)  # nothing to repaint: D(z0)
    m = np.zeros((2, 8, 8), bool)
    m[:, 2:6, 2:6] = True
    a = flow.inpaint_background(sd3, x, m, "a photo of a background", "a photo of a bird", 3.0, steps=3, seeds=[1, 2])
    b = flow.inpaint_background(sd3, x, m, "a photo of a background", "a photo of a bird", 3.0, steps=3, seeds=[1, 2],
                                batch_size=1)
    np.testing.assert_allclose(a, b, atol=1e-5)  # per-image seeds: independent of the batch
    assert not np.allclose(a, keep, atol=1e-3)  # the mask was repainted


@torch.no_grad()
def test_flux_guidance_is_true_cfg_of_the_diffusers_pipeline():
    """Flux: v̂ = v(y_b) + s (v(y_f) − v(y_b)) is FluxPipeline's true CFG with y_f as the prompt and
    y_b as the negative prompt, from the same initial latents (packed 2x2 there)."""
    from diffusers import FluxPipeline

    from fgbg_utils.core import flow
    flux = FgBgPipeline.from_pretrained(str(tiny_family("flux")), device="cpu", dtype="float32").ldm
    pipe = families.as_diffusers_pipeline(flux)
    noise = flow.initial_noise(flux, [5])
    packed = FluxPipeline._pack_latents(noise.clone(), 1, 4, 8, 8)
    ref = pipe("a photo of a bird", negative_prompt="a photo of a background", true_cfg_scale=2.5,
               num_inference_steps=4, latents=packed, height=16, width=16, output_type="latent",
               max_sequence_length=512).images
    ref = FluxPipeline._unpack_latents(ref, 16, 16, flux.vae_factor)
    cf = families.encode_condition(flux, "a photo of a bird")
    cb = families.encode_condition(flux, "a photo of a background")
    torch.testing.assert_close(flow.sample(flux, cf, cb, 2.5, noise, 4), ref.float(), atol=1e-5, rtol=1e-5)


def test_layer_selection_in_the_fingerprint_only_when_set():
    """`attention.layers` at its default (all) leaves stage 01's fingerprint as before the
    parameter existed (existing run folders resume); a selection changes it."""
    from fgbg_utils import load_params
    from fgbg_utils.runs.params import PROJECT_ROOT
    from fgbg_utils.runs.run_folder import fingerprint, stage_params
    toy = PROJECT_ROOT / "params" / "toy.yaml"
    default = stage_params(load_params(toy), "01")
    assert "layers" not in default["attention"]
    chosen = stage_params(load_params(toy, {"attention.layers": ["up_blocks.*"]}), "01")
    assert chosen["attention"]["layers"] == ["up_blocks.*"] and fingerprint(chosen) != fingerprint(default)
    assert "max_sequence_length" not in default["model"]
    t5 = stage_params(load_params(toy, {"model.max_sequence_length": 77}), "01")
    assert t5["model"]["max_sequence_length"] == 77 and fingerprint(t5) != fingerprint(default)
