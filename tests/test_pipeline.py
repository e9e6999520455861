"""FgBgPipeline: the in-memory method API gives exactly what the stages write for the same images,
ids and parameters (stages 01-04 on a tiny toy run with the shipped toy model), and its README
example (the class docstring) runs from the project root."""
import doctest
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import fgbg_utils
from fgbg_utils import FgBgPipeline, load_params
from fgbg_utils.core import pipeline as P
from fgbg_utils.core import synthesis
from fgbg_utils.data.datasets import load_image
from fgbg_utils.data.loader import load_dataset
from fgbg_utils.io import read_json
from fgbg_utils.runs.params import PROJECT_ROOT
from fgbg_utils.stages import attention_maps as s01
from fgbg_utils.stages import binarization as s02
from fgbg_utils.stages import finetuning as s03
from fgbg_utils.stages import refinement as s04

torch.set_num_threads(1)
TOY = PROJECT_ROOT / "params" / "toy.yaml"
TINY = {"dataset.n_train": 3, "dataset.n_test": 2, "T0": 5, "attention.sweep": True,
        "attention.keep_per_layer": True, "attention.batch_rows": 100,
        "finetune.max_train_steps": 3, "finetune.checkpoint_every": 2, "finetune.batch_size": 2,
        "finetune.eval_samples": 0, "refinement.steps": 3, "refinement.batch_size": 2,
        "device": "cpu"}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    cfg = load_params(TOY, TINY, run_dir=str(tmp_path_factory.mktemp("pipe") / "run"))
    for stage in (s01, s02, s03, s04):
        stage.run(cfg, progress=False)
    records = load_dataset(cfg)[0]
    return cfg, records, [load_image(r.image) for r in records]


@pytest.fixture(scope="module")
def pipe():
    return FgBgPipeline.from_pretrained(str(PROJECT_ROOT / "models" / "toy-ldm"), device="cpu")


@pytest.fixture(scope="module")
def maps(run, pipe):
    cfg, records, images = run
    return pipe.attention_maps(images, cfg.object, T0=cfg.T0, seed=cfg.seed,
                               ids=[r.id for r in records], batch_rows=100, per_timestep=True,
                               per_layer=True, per_token=True)


def test_exports():
    assert {"FgBgPipeline", "AttentionMaps", "PreliminaryMasks", "Refinement", "Samples"} <= set(fgbg_utils.__all__)
    assert fgbg_utils.FgBgPipeline is P.FgBgPipeline and fgbg_utils.load_params is load_params


def test_readme_example_runs_from_project_root(monkeypatch):
    monkeypatch.chdir(PROJECT_ROOT)
    tests = doctest.DocTestFinder().find(P.FgBgPipeline, "FgBgPipeline", globs={})
    assert tests and tests[0].examples and len(tests[0].examples) <= 10
    runner = doctest.DocTestRunner(optionflags=doctest.NORMALIZE_WHITESPACE)
    for t in tests:
        runner.run(t)
    assert runner.failures == 0 and runner.tries >= 7


def test_attention_maps_equal_stage01(run, maps):
    cfg, records, _ = run
    summary = read_json(Path(cfg.run_dir) / s01.STAGE / "summary.json")
    assert maps.ids == summary["images"] and maps.prompt == summary["prompt"]
    assert maps.token_positions == summary["token_positions"] and maps.layers == summary["layers"]
    assert maps.timesteps.tolist() == summary["timesteps"]
    for i, r in enumerate(records):
        ref = s01.load_map(cfg, r.id)
        np.testing.assert_array_equal(maps.mhat[i], ref["mhat"])          # bit-identical
        np.testing.assert_array_equal(maps.mhat_raw[i], ref["mhat_raw"])
        assert maps.frames[i] == ref["frame"]
        for k in ("per_timestep", "per_layer", "per_token"):              # the stage keeps float16
            np.testing.assert_array_equal(getattr(maps, k)[i].astype(np.float16), ref[k])


def test_preliminary_masks_equal_stage02(run, pipe, maps):
    cfg, records, _ = run
    masks = pipe.preliminary_masks(maps, **cfg.binarization.model_dump())
    gmm = read_json(Path(cfg.run_dir) / s02.STAGE / "gmm.json")
    for i, r in enumerate(records):
        np.testing.assert_array_equal(masks.masks[i], s02.load_mpre(cfg, r.id))
        assert masks.thresholds[i] == gmm[r.id]["threshold"]
        assert masks.fg_fraction[i] == gmm[r.id]["fg_fraction"]
    orig = masks.original()
    assert [m.shape for m in orig] == [im.shape[:2] for im in run[2]]


def test_finetune_equals_stage03(run, pipe, maps, tmp_path):
    cfg, records, images = run
    train = [i for i, r in enumerate(records) if r.split == "train"]
    masks = pipe.preliminary_masks(maps).select(train)
    fc = s03.finetune_config(cfg).model_dump(exclude={"seed", "prompt_full", "prompt_background"})
    tuned = pipe.finetune([images[i] for i in train], masks, tmp_path / "ft", progress=False,
                          seed=cfg.seed, **fc)
    assert tuned.ldm is pipe.ldm and tuned.tuned is not None
    ref = pipe.with_finetuned(Path(cfg.run_dir) / s03.STAGE)
    for (n, a), (_, b) in zip(tuned.tuned.unet.state_dict().items(), ref.tuned.unet.state_dict().items()):
        torch.testing.assert_close(a, b, atol=0, rtol=0, msg=n)


def test_refine_equals_stage04(run, pipe, maps):
    cfg, records, images = run
    rc = cfg.refinement
    full = pipe.with_finetuned(Path(cfg.run_dir) / s03.STAGE)
    masks = full.preliminary_masks(maps)
    ref = full.refine(images, masks, seed=cfg.seed, **rc.model_dump())
    for i, r in enumerate(records):
        np.testing.assert_array_equal(ref.masks[i], s04.load_refined(cfg, r.id))
        np.testing.assert_array_equal(ref.m_crop[i], s04.load_refined(cfg, r.id, "m_crop"))
        bg = np.asarray(Image.open(s04.out_path(cfg, "background", r.id)))
        np.testing.assert_array_equal((ref.backgrounds[i] * 255).round().astype(np.uint8), bg)
        assert not (ref.masks[i] & ~np.repeat(np.repeat(masks.masks[i], 4, 0), 4, 1)).any()
        assert ref.masks_original[i].shape == images[i].shape[:2]
    assert pipe.remove_objects is not None and FgBgPipeline.remove_objects is FgBgPipeline.refine


def test_input_kinds_agree(pipe):
    """PIL, uint8, float [0, 1] and a [-1, 1] canvas tensor give the same map."""
    rng = np.random.default_rng(3)
    img = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    kinds = [img, Image.fromarray(img), img.astype(np.float32) / 255,
             torch.from_numpy(img).permute(2, 0, 1).float() / 127.5 - 1]
    got = [pipe.attention_maps(k, "shape", T0=2, ids=["a"]).mhat for k in kinds]
    for g in got[1:]:
        np.testing.assert_array_equal(g, got[0])
    batch = pipe.attention_maps(np.stack([img, img[::-1]]), "shape", T0=2, ids=["a", "b"])
    assert batch.mhat.shape == (2, 16, 16)


def test_non_square_images_and_errors(pipe):
    rng = np.random.default_rng(4)
    imgs = [rng.integers(0, 256, (40, 64, 3), dtype=np.uint8), rng.integers(0, 256, (64, 30, 3), dtype=np.uint8)]
    maps = pipe.attention_maps(imgs, "shape", T0=2)
    assert maps.ids == ["0", "1"]
    assert [(f.h, f.w) for f in maps.frames] == [(40, 64), (64, 32)]
    assert [m.shape for m in maps.original()] == [(40, 64), (64, 30)]
    masks = pipe.preliminary_masks(maps)
    for i in range(2):
        assert not masks.masks[i][~maps.valid(i)].any()
    with pytest.raises(ValueError, match="fine-tuned model m'"):
        pipe.refine(imgs, masks)
    with pytest.raises(ValueError, match="one id per image"):
        pipe.attention_maps(imgs, "shape", T0=2, ids=["x"])
    with pytest.raises(ValueError, match="same images"):
        pipe.with_finetuned(pipe.ldm).refine(imgs[:1], masks)


def test_sample_is_sample_guided(pipe):
    got = pipe.sample("a photo of a shape", seeds=[1, 2], guidance_scale=2.0, steps=3)
    ref, lat = synthesis.sample_guided(pipe.ldm, "a photo of a shape", P.BACKGROUND_PROMPT, 2.0, [1, 2], 3)
    np.testing.assert_array_equal(got.images, ref)
    torch.testing.assert_close(got.latents, lat, atol=0, rtol=0)
    assert len(pipe.sample("a photo of a shape", n=2, steps=2).seeds) == 2
    with pytest.raises(ValueError, match="either n"):
        pipe.sample("a photo of a shape")


def test_segment_wraps_segnet_predict(pipe):
    from fgbg_utils.training import segnet

    cfg = segnet.SegConfig(size=32, base_width=4, depth=2, device="cpu")
    model = segnet.build_model(cfg)
    rng = np.random.default_rng(5)
    imgs = [rng.integers(0, 256, (40, 50, 3), dtype=np.uint8), rng.integers(0, 256, (30, 30, 3), dtype=np.uint8)]
    got = pipe.segment(imgs, model, cfg)
    ref = segnet.predict(model, imgs, cfg)
    assert [g.shape for g in got] == [(40, 50), (30, 30)]
    for g, r in zip(got, ref):
        np.testing.assert_array_equal(g, r)
