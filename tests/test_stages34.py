"""Stages 03-04 on a tiny toy run with the shipped toy model: M ⊆ M_pre, outputs and metrics
written, hand-offs checked (a missing stage names the one to run), max_train_steps required."""
import json

import pytest

from fgbg_utils import load_params
from fgbg_utils.stages import (
    attention_maps as stage_attention, binarization as stage_binarization, finetuning as stage_finetune, refinement
    as stage_refinement)
from fgbg_utils.runs.params import PROJECT_ROOT
from fgbg_utils.core.refine import upsample_mask
from fgbg_utils.runs.run_folder import StageError

TOY = PROJECT_ROOT / "params" / "toy.yaml"
TINY = {"dataset.n_train": 3, "dataset.n_test": 2, "T0": 5, "attention.sweep": False,
        "finetune.max_train_steps": 4, "finetune.checkpoint_every": 2, "finetune.batch_size": 2,
        "finetune.eval_samples": 2, "finetune.eval_steps": 3, "refinement.steps": 3}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    cfg = load_params(TOY, TINY, run_dir=str(tmp_path_factory.mktemp("r34") / "run"))
    stage_attention.run(cfg, progress=False)
    stage_binarization.run(cfg, progress=False)
    s03 = stage_finetune.run(cfg, progress=False)
    s04 = stage_refinement.run(cfg, progress=False)
    return cfg, s03, s04


def test_refined_is_subset_of_preliminary(run):
    cfg, _, _ = run
    f = json.loads((stage_attention.Path(cfg.run_dir) / "01_attention_maps" / "summary.json").read_text())
    for i in f["images"]:
        up = upsample_mask(stage_binarization.load_mpre(cfg, i), f["vae_factor"])
        for kind in ("refined", "m_crop"):
            m = stage_refinement.load_refined(cfg, i, kind)
            assert m.shape == up.shape and not (m & ~up).any()


def test_outputs_and_metrics(run):
    cfg, s03, s04 = run
    assert s03["training"]["steps_done"] == 4 and s03["training"]["max_train_steps"] == 4
    assert set(s03["object_absent"]) >= {"threshold", "share_object_free_tuned_y_b"}
    for key in ("preliminary", "refined", "m_crop"):
        for m in ("acc", "iou", "miou", "iou_per_image", "dice_per_image"):
            assert 0 <= s04[key][m] <= 1
    for kind in stage_refinement.OUTPUTS:
        assert len(list((stage_attention.Path(cfg.run_dir) / "04_refinement" / kind).glob("*.png"))) == 5
    saved = json.loads((stage_attention.Path(cfg.run_dir) / "03_finetuning" / "fgbg_finetune.json").read_text())
    assert saved["max_train_steps"] == 4 and saved["mode"] == "full"


def test_rerun_skips_and_resumes(run):
    cfg, _, _ = run
    assert stage_finetune.run(cfg, progress=False)["training"]["steps_done"] == 4  # from checkpoint


def test_missing_stages_are_named(tmp_path):
    cfg = load_params(TOY, TINY, run_dir=str(tmp_path / "empty"))
    with pytest.raises(StageError, match="01_attention_maps, 02_binarization.*--stages 01,02 "):
        stage_finetune.run(cfg, progress=False)
    with pytest.raises(StageError, match="--stages 01,02,03 "):
        stage_refinement.run(cfg, progress=False)


def test_max_train_steps_required(run, tmp_path):
    cfg, _, _ = run
    bad = load_params(TOY, {**TINY, "finetune.max_train_steps": None}, run_dir=cfg.run_dir)
    with pytest.raises(ValueError, match="finetune.max_train_steps"):
        stage_finetune.run(bad, progress=False)


def test_ablation_paints_with_the_pretrained_m(run):
    """refined_with_m is the same refinement painted by m instead of m': bit for bit a pipeline whose
    'fine-tuned' model is m itself, and not what m' paints."""
    import numpy as np
    from PIL import Image
    from fgbg_utils.core.pipeline import FgBgPipeline
    from fgbg_utils.data.datasets import load_image
    from fgbg_utils.stages.common import load_pipeline, processed_records

    cfg, _, s04 = run
    assert 0 <= s04["refined_with_m"]["iou"] <= 1 and "painted by the pretrained m" in s04["refined_with_m_note"]
    scored = [r for r in processed_records(cfg) if r.split == cfg.evaluation.split]
    unscored = [r for r in processed_records(cfg) if r.split != cfg.evaluation.split]
    assert scored and unscored
    # painted only where it is scored: the training images' M never needs m
    for r in unscored:
        assert not stage_refinement.out_path(cfg, "refined_with_m", r.id).exists()
        assert stage_refinement.out_path(cfg, "refined", r.id).exists()
    records = scored[:2]
    ids = [r.id for r in records]
    pipe = load_pipeline(cfg, finetuned=True)
    images = [load_image(r.image, max_side=pipe.resolution) for r in records]
    m_pre = [stage_binarization.load_mpre(cfg, i) for i in ids]
    with_m = stage_refinement.refine_images(cfg, pipe, images, ids, m_pre, model="pretrained")
    m_as_tuned = stage_refinement.refine_images(cfg, FgBgPipeline(pipe.ldm, tuned=pipe.ldm), images, ids, m_pre)
    with_m_prime = stage_refinement.refine_images(cfg, pipe, images, ids, m_pre)
    assert np.array_equal(with_m.backgrounds, m_as_tuned.backgrounds)
    assert not np.array_equal(with_m.backgrounds, with_m_prime.backgrounds)
    for k, i in enumerate(ids):
        saved = np.asarray(Image.open(stage_refinement.out_path(cfg, "background_with_m", i)))
        assert np.array_equal(saved, (with_m.backgrounds[k] * 255).round().astype(np.uint8))
        assert np.array_equal(stage_refinement.load_refined(cfg, i, "refined_with_m"), with_m.masks[k])


def test_the_ablation_split_counts_for_stage_04_once_changed(run):
    """evaluation.split (the images the m ablation paints) joined stage 04's parameters later: at its
    default it stays out of stage 04's fingerprint, so older run folders resume; another split refuses
    stage 04's outputs (they lack that split's ablation); stage 06 always counted it."""
    from fgbg_utils.storage import StageError
    from fgbg_utils.storage.folder import refuse_other_params, stage_params

    cfg = run[0]
    assert cfg.evaluation.split == "test" and "evaluation.split" not in stage_params(cfg, "04")
    assert stage_params(cfg, "06")["evaluation.split"] == "test"
    other = cfg.model_copy(deep=True)
    other.evaluation.split = "train"
    assert stage_params(other, "04")["evaluation.split"] == "train"
    with pytest.raises(StageError, match="evaluation.split"):
        refuse_other_params(other, "04")
