"""Concept-distillation fine-tuning (fgbg_utils.training.finetune): tiny random toy LDM on the CPU."""
from __future__ import annotations

import copy
import json
import shutil
import warnings

import numpy as np
import pytest
import torch

from fgbg_utils.training import finetune as ft
from fgbg_utils.data import toy
from fgbg_utils.core.models import LDM, encode_images, encode_prompt
from benchmarks.finetune import bare_diffusers_step

torch.set_num_threads(1)
L, R = 16, 64


def make_ldm(**arch) -> LDM:
    vae, unet, te, tok, sched = toy.build_models(arch=arch or None)
    return LDM(vae, unet, te, tok, sched, path="toy-random")


def make_data(n=6, all_foreground=False, padded=False, seed=0):
    """Canvases with one square object each; M_pre = the object's cells (slightly dilated)."""
    rng = np.random.default_rng(seed)
    items = []
    for i in range(n):
        img = np.empty((3, R, R), np.float32)
        img[:] = rng.uniform(-0.8, 0.2, (3, 1, 1))
        img += rng.normal(0, 0.05, img.shape).astype(np.float32)
        s = int(rng.integers(16, 28))
        y, x = rng.integers(0, R - s, 2)
        img[:, y:y + s, x:x + s] = rng.uniform(0.3, 1.0, (3, 1, 1))
        m = np.zeros((L, L), bool)
        m[max(y // 4 - 1, 0):(y + s) // 4 + 1, max(x // 4 - 1, 0):(x + s) // 4 + 1] = True
        if all_foreground:
            m[:] = True
        valid = np.ones((L, L), bool)
        if padded and i == 0:  # a landscape-padded canvas: valid width 48 px = 12 cells
            img[:, :, 48:] = -1.0
            valid[:, 12:] = False
            m &= valid
        items.append((img, m, valid))
    return items


def cfg(**kw) -> ft.FinetuneConfig:
    base = dict(max_train_steps=4, batch_size=2, checkpoint_every=100, seed=3)
    base.update(kw)
    return ft.FinetuneConfig(**base)


def quiet(ldm, data, c, out, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ft.train(ldm, data, c, out, log=lambda s: None, progress=False, **kw)


@pytest.fixture(scope="module")
def ldm():
    return make_ldm()


@pytest.fixture(scope="module")
def data():
    return make_data()


def eval_loss(unet, ldm, data) -> float:
    """Unmasked ε-loss on a fixed eval batch (all images, 4 noise draws each, y_f)."""
    from diffusers import DDPMScheduler
    sched = DDPMScheduler.from_config(ldm.scheduler.config)
    z0 = encode_images(ldm, torch.stack([torch.as_tensor(d[0]) for d in data])).repeat(4, 1, 1, 1)
    g = torch.Generator().manual_seed(123)
    t = torch.linspace(50, 950, z0.shape[0]).long()
    noise = torch.randn(z0.shape, generator=g)
    emb = encode_prompt(ldm, "a photo of a shape").expand(z0.shape[0], -1, -1)
    with torch.no_grad():
        return float(ft.masked_step_loss(unet, sched, z0, noise, t, emb,
                                         torch.ones(z0.shape[0], 1, L, L)))


def _train_fixed(ldm, data, tmp_path_factory, mode):
    """8 steps at a high lr (LoRA on the toy's few attention layers needs more), always the
    same 2 images with y_f (p_full=1, no flips), no EMA."""
    out = tmp_path_factory.mktemp(f"ft_{mode}")
    c = cfg(mode=mode, max_train_steps=8, learning_rate=1e-3 if mode == "full" else 3e-2,
            p_full=1.0, hflip=False, use_ema=False)
    summary = quiet(ldm, data[:2], c, out)
    return out, summary


@pytest.fixture(scope="module")
def trained_full(ldm, data, tmp_path_factory):
    return _train_fixed(ldm, data, tmp_path_factory, "full")


@pytest.fixture(scope="module")
def trained_lora(ldm, data, tmp_path_factory):
    return _train_fixed(ldm, data, tmp_path_factory, "lora")


# ----------------------------------------------------------------------------- config / data
def test_max_train_steps_required():
    for bad in (None, 0):
        with pytest.raises(ValueError, match="finetune.max_train_steps"):
            ft.FinetuneConfig(max_train_steps=bad)
    with pytest.raises(TypeError):
        ft.FinetuneConfig()  # no default
    with pytest.raises(ValueError, match="finetune.mode"):
        ft.FinetuneConfig(max_train_steps=1, mode="half")


def test_batch_for_step_is_a_pure_function_of_seed_and_step():
    items = make_data(padded=True)
    ds = ft.MaskedImageDataset.from_config(items, cfg(batch_size=4, p_full=0.3))
    again = ft.MaskedImageDataset.from_config(items, cfg(batch_size=4, p_full=0.3))
    a, b = ds.batch_for_step(5), again.batch_for_step(5)
    assert a["kinds"] == b["kinds"] and torch.equal(a["masks"], b["masks"])
    assert torch.equal(a["index"], b["index"]) and torch.equal(a["images"], b["images"])
    assert a["masks"].shape == (4, 1, L, L) and a["images"].shape == (4, 3, R, R)
    assert set(a["kinds"]) <= set(ft.KINDS)
    # every image once per epoch (6 images, batch 4: steps 1-3 = two epochs)
    seen = torch.cat([ds.batch_for_step(s)["index"] for s in (1, 2, 3)]).tolist()
    assert sorted(seen[:6]) == list(range(6)) and sorted(seen[6:]) == list(range(6))
    # flips mirror the valid box only; masks stay inside background ∧ valid
    n_flip = 0
    for s in range(1, 12):
        bt = ds.batch_for_step(s)
        for k in range(4):
            i, f = int(bt["index"][k]), bool(bt["flip"][k])
            img, m_pre, valid = items[i]
            want = torch.as_tensor(img).clone()
            if f:
                n_flip += 1
                w = int(valid.any(0).sum()) * 4
                want[..., :w] = want[..., :w].flip(-1)
                m_pre = m_pre.copy()
                m_pre[:, :w // 4] = m_pre[:, :w // 4][:, ::-1]
            assert torch.equal(bt["images"][k], want)
            mask = bt["masks"][k, 0].numpy() > 0
            if bt["kinds"][k] == "full":
                assert bt["prompts"][k] == "a photo of a shape" and np.array_equal(mask, valid)
            else:
                assert bt["prompts"][k] == "a photo of a background"
                assert not (mask & (m_pre | ~valid)).any()
    assert n_flip > 0
    assert torch.equal(ds.flip_image(0)[..., 48:], torch.full((3, R, 16), -1.0))  # padding stays


# ----------------------------------------------------------------------------- training
def test_full_image_step_loss_equals_unmasked_diffusers_loss(ldm, data, tmp_path):
    from diffusers import DDPMScheduler
    c = cfg(max_train_steps=1, p_full=1.0, use_ema=False)
    summary = quiet(ldm, data, c, tmp_path / "run")
    assert summary["kinds"]["full"] == 2 and summary["loss_curve"][0] > 0
    ds = ft.MaskedImageDataset.from_config(data, c)
    bt = ds.batch_for_step(1)
    assert (bt["masks"] == 1).all()
    z0 = encode_images(ldm, bt["images"])
    t, noise = ft.step_noise(c.seed, 1, 0, 2, (4, L, L), 1000)
    emb = encode_prompt(ldm, c.prompt_full).expand(2, -1, -1)
    unet = copy.deepcopy(ldm.unet).requires_grad_(True)
    opt = torch.optim.AdamW(unet.parameters(), lr=c.learning_rate)
    bare = bare_diffusers_step(unet, opt, DDPMScheduler.from_config(ldm.scheduler.config),
                               z0, noise, t, emb)
    assert summary["loss_curve"][0] == pytest.approx(float(bare), rel=1e-5)


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_training_lowers_the_loss(mode, ldm, data, request):
    out, summary = request.getfixturevalue(f"trained_{mode}")
    curve = summary["loss_curve"]
    assert len(curve) == 8 and summary["steps_done"] == 8
    tuned = ft.load_finetuned(ldm, out)
    before, after = eval_loss(ldm.unet, ldm, data[:2]), eval_loss(tuned.unet, ldm, data[:2])
    assert after < 0.95 * before, (before, after)
    assert not tuned.unet.training and not any(p.requires_grad for p in tuned.unet.parameters())
    meta = json.loads((out / "fgbg_finetune.json").read_text())
    assert meta["mode"] == mode and meta["max_train_steps"] == 8 and meta["base_model"] == "toy-random"
    assert meta["base_unet_config_hash"] == ft.unet_config_hash(ldm.unet)
    assert meta["loss_norm"] == "latent" and meta["learning_rate"] == (1e-3 if mode == "full" else 3e-2)


def test_lora_trains_only_lora_params(ldm, trained_lora):
    from safetensors.torch import load_file
    out, _ = trained_lora
    assert (out / "lora" / "adapter_config.json").exists() and not (out / "unet").exists()
    sd = load_file(out / "lora" / ft.LORA_WEIGHTS)
    assert sd and all("lora_" in k for k in sd)
    assert any(k.endswith("lora_B.weight") and v.abs().max() > 0 for k, v in sd.items())
    tuned = ft.load_finetuned(ldm, out).unet
    base = dict(ldm.unet.named_parameters())
    n_base = 0
    for name, p in tuned.named_parameters():
        if "lora_" in name:
            continue
        key = name.replace(".base_layer", "")
        assert torch.equal(p, base[key]), name
        n_base += 1
    assert n_base == len(base)
    # the caller's model is untouched and carries no adapter
    assert not any("lora_" in n for n, _ in ldm.unet.named_parameters())


@pytest.mark.parametrize("mode,accum", [("full", 1), ("lora", 1), ("full", 2)])
def test_resume_continues_identically(mode, accum, data, tmp_path):
    from safetensors.torch import load_file
    kw = dict(mode=mode, batch_size=2, checkpoint_every=2, ema_decay=0.9, learning_rate=5e-4,
              gradient_accumulation_steps=accum)
    straight = quiet(make_ldm(), data, cfg(max_train_steps=6, **kw), tmp_path / "a")
    quiet(make_ldm(), data, cfg(max_train_steps=3, **kw), tmp_path / "b")
    lines = []
    resumed = ft.train(make_ldm(), data, cfg(max_train_steps=6, **kw), tmp_path / "b",
                       log=lines.append, progress=False)  # new Accelerator, new model: a new "process"
    assert any("resumed from" in s and "step_000003" in s for s in lines)
    assert len(resumed["loss_curve"]) == 6
    np.testing.assert_allclose(resumed["loss_curve"], straight["loss_curve"], rtol=1e-5, atol=1e-7)
    assert resumed["kinds"] == straight["kinds"] and sum(straight["kinds"].values()) == 12 * accum
    f = "unet/diffusion_pytorch_model.safetensors" if mode == "full" else f"lora/{ft.LORA_WEIGHTS}"
    wa, wb = load_file(tmp_path / "a" / f), load_file(tmp_path / "b" / f)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-5, atol=1e-6)
    # the last 2 checkpoints are kept, saved atomically (no tmp folders left)
    assert [p.name for _, p in ft.list_checkpoints(tmp_path / "b")] == ["step_000004", "step_000006"]
    assert not list((tmp_path / "b" / "checkpoints").glob(".tmp*"))
    # resuming with other settings is refused
    with pytest.raises(ValueError, match="finetune.p_full"):
        quiet(make_ldm(), data, cfg(max_train_steps=8, p_full=0.2, **kw), tmp_path / "b")


def test_load_finetuned_refuses_other_base_and_mixed_outputs(ldm, data, trained_full,
                                                             trained_lora, tmp_path):
    out, _ = trained_full
    other = make_ldm(unet_channels=(32, 32, 64))
    with pytest.raises(ValueError, match="was fine-tuned from base 'toy-random'"):
        ft.load_finetuned(other, out)
    mixed = tmp_path / "mixed"
    shutil.copytree(out, mixed)
    shutil.copytree(trained_lora[0] / "lora", mixed / "lora")
    with pytest.raises(ValueError, match="never mixed"):
        ft.load_finetuned(ldm, mixed)
    shutil.rmtree(mixed / "unet")  # lora files but the json says full
    with pytest.raises(ValueError, match="never mixed"):
        ft.load_finetuned(ldm, mixed)
    with pytest.raises(ValueError, match="never mixed"):  # train() refuses too
        quiet(ldm, data, cfg(max_train_steps=1, mode="full"), mixed)
    with pytest.raises(ValueError, match="fgbg_finetune.json"):
        ft.load_finetuned(ldm, tmp_path)


def test_empty_mask_fraction_is_reported(ldm, tmp_path):
    items = make_data(all_foreground=True)
    lines = []
    c = cfg(max_train_steps=3, batch_size=4, p_full=0.5, use_ema=False)
    with pytest.warns(UserWarning, match="empty mask"):
        summary = ft.train(ldm, items, c, tmp_path, log=lines.append, progress=False)
    k = summary["kinds"]
    assert k["box"] == 0 and k["fallback"] == 0 and k["full"] + k["empty"] == 12
    assert k["empty"] > 0 and k["full"] > 0
    assert summary["empty_fraction"] == pytest.approx(k["empty"] / 12)
    meta = json.loads((tmp_path / "fgbg_finetune.json").read_text())
    assert meta["kinds"] == k and meta["empty_fraction"] == summary["empty_fraction"]
    assert any(f"empty-mask samples {k['empty']}/12" in s for s in lines)
