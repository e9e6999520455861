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


# ----------------------------------------------------------------------------- the training recipe
def test_generator_v1_keeps_objects_inside_and_draws_like_v2():
    from fgbg_utils.training.toy_training import generate_corpus

    v1 = generate_corpus(60, seed=3, generator=1)
    v2 = generate_corpus(60, seed=3, generator=2)
    assert v1[2] == v2[2]  # same random stream: same captions, kinds, colours, radii
    assert [m["r"] for m in v1[3] if m["kind"]] == [m["r"] for m in v2[3] if m["kind"]]
    border = lambda m: m[0].any() or m[-1].any() or m[:, 0].any() or m[:, -1].any()  # noqa: E731
    assert not any(border(m) for m in v1[1])
    assert any(border(m) for m in v2[1])  # v2 objects may cross the border
    with pytest.raises(ValueError, match="toy generator 3"):
        generate_corpus(2, seed=0, generator=3)


def test_recipe_end_to_end_with_tiny_budgets(tmp_path):
    """Both phases, step-based snapshots, selection on a (tiny) validation world, one call."""
    import json

    import torch
    from safetensors.torch import load_file

    from fgbg_utils.core.models import load_ldm
    from fgbg_utils.training.toy_recipe import train_toy_recipe

    torch.set_num_threads(1)
    out, work = tmp_path / "toy-ldm", tmp_path / "work"
    info = train_toy_recipe(
        out, work, n_images=40, vae_steps=3, phase1_steps=4, phase2_steps=6, snapshot_minutes=None,
        snapshot_steps=(2, 4), heldout_images=8, log=lambda s: None,
        validation={"dataset.n_train": 0, "dataset.n_test": 3, "T0": 5,
                    "dataset.root": str(tmp_path / "val_world")})
    assert info == json.loads((out / "training_info.json").read_text())
    assert info["phases"]["1"]["generator_version"] == 1 and info["phases"]["2"]["generator_version"] == 2
    assert info["phases"]["1"]["vae_steps"] == 3 and info["phases"]["1"]["unet_steps"] == 4
    sel = info["selection"]
    scores = {int(k): v for k, v in sel["validation_iou_by_step_generator_v2"].items()}
    assert sorted(scores) == [2, 4, 6] and sel["phase2_total_steps"] == 6
    assert scores[sel["selected_step"]] == max(scores.values())
    assert info["unet"]["steps"] == sel["selected_step"] == info["phases"]["2"]["unet_steps"]
    assert info["continued_from"]["generator_version"] == 1 and info["generator_version"] == 2
    assert info["wall_minutes"] >= 0 and info["recipe"]["phase2"]["snapshot_steps"] == [2, 4]
    # the shipped folder is the selected snapshot; phase 2 kept phase 1's VAE
    chosen = work / "phase2_final" if sel["selected_step"] == 6 else \
        work / "phase2_snapshots" / f"step_{sel['selected_step']:06d}"
    f = "unet/diffusion_pytorch_model.safetensors"
    a, b = load_file(out / f), load_file(chosen / f)
    assert all(torch.equal(a[k], b[k]) for k in a)
    v = "vae/diffusion_pytorch_model.safetensors"
    a, b = load_file(out / v), load_file(work / "phase1" / v)
    assert all(torch.equal(a[k], b[k]) for k in a)
    ldm = load_ldm(str(out), device="cpu")
    assert ldm.latent_size == 16


def test_cli_train_toy_passes_the_recipe_options(monkeypatch):
    from fgbg_utils.runs import cli
    from fgbg_utils.training import toy_recipe

    seen = {}
    monkeypatch.setattr(toy_recipe, "train_toy_recipe", lambda *a, **k: seen.update(args=a, **k))
    assert cli.main(["train-toy", "--out", "o", "--work", "w", "--steps-as-shipped",
                     "--init-from", "p1", "--no-select-on-validation"]) == 0
    assert seen["args"] == ("o", "w") and seen["init_from"] == "p1"
    assert seen["phase2_steps"] == 10499 and seen["snapshot_steps"] == [2153, 4320, 6497, 8693]
    assert seen["snapshot_minutes"] is None and seen["select_on_validation"] is False
    cli.main(["train-toy", "--phase2-minutes", "5"])
    assert seen["phase2_minutes"] == 5 and seen["snapshot_minutes"] == 10 and seen["select_on_validation"]


def test_shipped_training_info_records_the_generators():
    import json
    info = json.loads((SHIPPED / "training_info.json").read_text())
    assert info["phases"]["1"]["generator_version"] == 1  # objects fully inside (git 740eed4)
    assert info["phases"]["2"]["generator_version"] == 2  # border-crossing objects
    assert info["selection"]["selected_step"] == 4320


def test_novel_backgrounds_are_kinds_the_toy_ldm_never_saw(tmp_path):
    """dataset.backgrounds=novel draws only NOVEL_BACKGROUNDS (never the corpus kinds of the toy
    LDM), keeps the objects and masks of the generator, and corpus worlds keep their cache key."""
    from fgbg_utils import load_params
    from fgbg_utils.data.loader import dataset_root, toy_generator_params

    assert not set(toy.NOVEL_BACKGROUNDS) & set(toy.BACKGROUNDS)
    im, masks, caps, metas = toy.generate_arrays(24, 3, 32, 0.0, "novel")
    assert {m["background"] for m in metas} == set(toy.NOVEL_BACKGROUNDS)
    assert all(m.any() for m in masks) and all(toy.CONCEPT in c or m["kind"] in c for c, m in zip(caps, metas))
    corpus = toy.generate_arrays(24, 3, 32, 0.0)[3]
    assert {m["background"] for m in corpus} <= set(toy.BACKGROUNDS)
    with pytest.raises(ValueError, match="dataset.backgrounds"):
        toy.generate_arrays(2, 3, 32, 0.0, "unseen")
    base = {"dataset.n_train": 2, "dataset.n_test": 1, "dataset.image_size": 32}
    cfg = load_params(None, base, run_dir=str(tmp_path / "r"))
    novel = load_params(None, {**base, "dataset.backgrounds": "novel"}, run_dir=str(tmp_path / "r"))
    assert "backgrounds" not in toy_generator_params(cfg)
    assert toy_generator_params(novel)["backgrounds"] == "novel"
    cfg.dataset.root, novel.dataset.root = str(tmp_path / "a"), str(tmp_path / "b")
    a, b = dataset_root(cfg), dataset_root(novel)
    assert (a / "images" / "00000.png").read_bytes() != (b / "images" / "00000.png").read_bytes()


def test_a_toy_ldm_that_never_sees_the_background_caption(tmp_path):
    """train-toy --background-fraction 0 --vae-from: no corpus caption names the background, the
    VAE is the given model's bit for bit, only UNet and text encoder train, the options are recorded."""
    import torch
    from safetensors.torch import load_file

    from fgbg_utils.runs import cli
    from fgbg_utils.training import toy_recipe
    from fgbg_utils.training.toy_training import generate_corpus, train_toy_model

    for generator in (1, 2):
        with_bg = generate_corpus(200, 7, 32, 0.15, generator)[2]
        assert any("background" in c for c in with_bg)
        assert not any("background" in c for c in generate_corpus(200, 7, 32, 0.0, generator)[2])
    torch.set_num_threads(1)
    shipped = PROJECT_ROOT / "models" / "toy-ldm"
    info = train_toy_model(tmp_path / "m", n_images=16, unet_steps=2, heldout_images=4, background_fraction=0.0,
                           vae_from=shipped, snapshot_every_s=None, log=lambda s: None)
    assert info["background_fraction"] == 0.0 and info["vae"]["steps"] == 0
    v = "vae/diffusion_pytorch_model.safetensors"
    a, b = load_file(tmp_path / "m" / v), load_file(shipped / v)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    seen = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(toy_recipe, "train_toy_recipe", lambda *a, **k: seen.update(k))
        assert cli.main(["train-toy", "--vae-from", str(tmp_path / "nowhere")]) == 2 and not seen
        assert cli.main(["train-toy", "--background-fraction", "0", "--vae-from", str(shipped)]) == 0
    assert seen["background_fraction"] == 0.0 and seen["vae_from"] == str(shipped)
