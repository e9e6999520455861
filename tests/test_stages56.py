"""Stages 05-06 on a tiny toy run: synthetic pairs in the real dataset layout, a resumed stage 05
gives the same images, Table 2 rows consistent with stages 02/04, missing ground truth skipped and
listed, empty test split and disk budget refused up front, the HTML report."""
import json
import shutil
from pathlib import Path

import nbformat
import numpy as np
import pytest
from PIL import Image

from fgbg_utils import load_params
from fgbg_utils.stages import (
    attention_maps as stage_attention, binarization as stage_binarization, evaluation as stage_evaluation,
    finetuning as stage_finetune, refinement as stage_refinement, synthesis as stage_synthesis)
from fgbg_utils.data.datasets import load_mask, load_records
from fgbg_utils.core.metrics import SegmentationMeter, box_overlap
from fgbg_utils.runs.report import write_report
from fgbg_utils.runs.run_folder import StageError

from tests.fixtures.tiny import TINY, TOY


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    cfg = load_params(TOY, TINY, run_dir=str(tmp_path_factory.mktemp("r56") / "run"))
    for stage in (stage_attention, stage_binarization, stage_finetune, stage_refinement):
        stage.run(cfg, progress=False)
    s05 = stage_synthesis.run(cfg, progress=False)
    s06 = stage_evaluation.run(cfg, progress=False, log=lambda m: None)
    return cfg, s05, s06


def test_synthetic_pairs_use_the_real_dataset_layout(run):
    cfg, s05, _ = run
    root = Path(cfg.run_dir) / "05_synthesis"
    records = load_records("folder", root / "dataset")
    assert [r.id for r in records] == ["syn-00000", "syn-00001", "syn-00002"]
    for r in records:
        assert r.split == "train" and r.mask is not None
        image = np.asarray(Image.open(r.image))
        raw = np.asarray(Image.open(r.mask))
        assert raw.shape == image.shape[:2] and set(np.unique(raw)) <= {0, 255}
        rgba = np.asarray(Image.open(root / "foregrounds" / f"{r.id}.png"))
        assert rgba.shape == (*image.shape[:2], 4)
        assert (rgba[..., 3] == raw).all() and (rgba[..., :3] == image).all()
        assert (root / "backgrounds" / f"{r.id}.png").exists()
    # D' masks come from the same steps as the real images, in memory: M̂ with the pretrained m,
    # the GMM, the refinement with m' (recomputed here on the same batch)
    from fgbg_utils.data.datasets import load_image
    from fgbg_utils.stages.common import load_pipeline
    pipe = load_pipeline(cfg, finetuned=True)
    ids = [r.id for r in records]
    images = [load_image(r.image) for r in records]
    maps = pipe.attention_maps(images, cfg.object, cfg.prompt, cfg.parts, cfg.T0, cfg.seed, ids,
                               batch_rows=cfg.attention.batch_rows)
    m_pre = pipe.preliminary_masks(maps, **cfg.binarization.model_dump())
    res = stage_refinement.refine_images(cfg, pipe, images, ids, list(m_pre.masks))
    for k, r in enumerate(records):
        assert (res.masks_original[k] == load_mask(r.mask)).all()
    assert not (root / "pipeline").exists()  # no sub-run folder
    assert len(list((root / "pure_backgrounds").glob("*.png"))) == 2
    with np.load(root / "guidance_sweep.npz") as z:
        assert z["images"].shape[:2] == (1, 3) and z["scales"].tolist() == [-2, 1, 3]
    assert s05["n_images"] == 3


def test_resumed_synthesis_gives_the_same_images(run):
    cfg, _, _ = run
    root = Path(cfg.run_dir) / "05_synthesis"
    before = np.asarray(Image.open(root / "dataset" / "images" / "syn-00002.png")).copy()
    (root / "dataset" / "images" / "syn-00002.png").unlink()  # as if interrupted before it
    stage_synthesis.run(cfg, progress=False)
    after = np.asarray(Image.open(root / "dataset" / "images" / "syn-00002.png"))
    assert (before == after).all()


def test_table_rows_match_the_earlier_stages(run):
    cfg, _, s06 = run
    rows = s06["rows"]
    assert set(rows) == set(stage_evaluation.ROWS)
    for row in rows.values():
        for k in ("acc", "iou", "miou", "iou_per_image", "dice_per_image", "box_iou"):
            assert 0 <= row[k] <= 1
    s02 = json.loads((Path(cfg.run_dir) / "metrics" / "02_binarization.json").read_text())
    s04 = json.loads((Path(cfg.run_dir) / "metrics" / "04_refinement.json").read_text())
    assert rows["M_pre"]["iou"] == pytest.approx(s02["iou"])
    assert rows["M"]["iou"] == pytest.approx(s04["refined"]["iou"])
    assert rows["M_crop"]["iou"] == pytest.approx(s04["m_crop"]["iou"])
    assert s06["training"]["unet_D_s_plus_synth"]["n_images"] == 3 + 3
    assert s06["n_test_scored"] == 2 and s06["test_without_ground_truth"] == []
    saved = json.loads((Path(cfg.run_dir) / "metrics" / "06_evaluation.json").read_text())
    assert set(saved["rows"]) == set(rows) and "object_free_check" in saved
    preds = list((Path(cfg.run_dir) / "06_evaluation" / "predictions" / "unet_D_s").glob("*.png"))
    assert len(preds) == 2


def test_rerun_loads_trained_networks(run):
    cfg, _, s06 = run
    again = stage_evaluation.run(cfg, progress=False, log=lambda m: None)
    for row in ("unet_M_pre", "unet_D_s", "supervised"):
        assert again["rows"][row]["iou"] == s06["rows"][row]["iou"]
        assert again["training"][row]["seconds"] == s06["training"][row]["seconds"]


@pytest.fixture(scope="module")
def folder_run(run, tmp_path_factory):
    """The toy images as a user's folder, one test and one train mask missing; stages 01-05."""
    cfg = run[0]
    tmp = tmp_path_factory.mktemp("folder")
    data = tmp / "data"
    src = load_records("folder", _toy_root(cfg))
    shutil.copytree(_toy_root(cfg), data)
    test_ids = [r.id for r in src if r.split == "test"]
    train_ids = [r.id for r in src if r.split == "train"]
    (data / "masks" / f"{test_ids[0]}.png").unlink()
    (data / "masks" / f"{train_ids[0]}.png").unlink()
    other = load_params(TOY, {**TINY, "dataset.kind": "folder", "dataset.root": str(data)},
                        run_dir=str(tmp / "run"))
    for stage in (stage_attention, stage_binarization, stage_finetune, stage_refinement, stage_synthesis):
        stage.run(other, progress=False)
    return other, test_ids, train_ids


def test_missing_ground_truth_is_skipped_and_listed(folder_run):
    other, test_ids, train_ids = folder_run
    res = stage_evaluation.run(other, force=True, progress=False, log=lambda m: None)
    assert res["test_without_ground_truth"] == [{"id": test_ids[0], "reason": "no ground-truth mask"}]
    assert res["n_test_scored"] == 1 and res["rows"]["M"]["n_images"] == 1
    assert res["supervised_train_without_ground_truth"] == [train_ids[0]]
    assert res["training"]["supervised"]["n_images"] == len(train_ids) - 1
    assert res["training"]["unet_D_s"]["n_images"] == len(train_ids)  # unlabelled data still trains


def test_no_ground_truth_at_all_still_trains(folder_run):
    other = folder_run[0].model_copy(deep=True)
    other.dataset.ground_truth = False  # stage 06's own parameter: stages 01-05 stay valid
    res = stage_evaluation.run(other, force=True, progress=False, log=lambda m: None)
    assert res["rows"] == {} and "metrics skipped" in res["note"] and len(res["test_without_ground_truth"]) == 2
    assert res["skipped_rows"] == {"supervised": "no training image has a ground-truth mask"}
    run_dir = Path(other.run_dir)
    assert (run_dir / "06_evaluation" / "models" / "unet_D_s_plus_synth.safetensors").exists()


def _toy_root(cfg):
    from fgbg_utils.data.loader import dataset_root
    return dataset_root(cfg)


def test_empty_test_split_is_refused(run):
    cfg, _, _ = run
    bad = load_params(TOY, {**TINY, "dataset.splits": ["train"]}, run_dir=cfg.run_dir)
    with pytest.raises(StageError, match="evaluation.split.*'test' has no images"):
        stage_evaluation.run(bad, progress=False)


def test_disk_budget_is_checked_before_sampling(run, tmp_path):
    cfg, _, _ = run
    run_dir = tmp_path / "run"
    shutil.copytree(cfg.run_dir, run_dir, ignore=shutil.ignore_patterns("05_synthesis"))
    big = load_params(TOY, {**TINY, "synthesis.n_images": 10**6, "synthesis.disk_budget_gb": 1},
                      run_dir=str(run_dir))
    with pytest.raises(StageError, match="synthesis.n_images=1000000 needs up to .*disk_budget_gb=1"):
        stage_synthesis.run(big, progress=False)
    assert not (run_dir / "05_synthesis").exists()


def test_ordering_and_box_metrics():
    rows = {k: {"iou": v} for k, v in
            {"M_pre": 0.3, "M": 0.6, "unet_D_s": 0.7, "unet_D_s_plus_synth": 0.7, "supervised": 0.9}.items()}
    assert stage_evaluation.ordering(rows)["holds"] is True
    rows["unet_D_s_plus_synth"]["iou"] = 0.65
    out = stage_evaluation.ordering(rows)
    assert out["holds"] is False and out["unet_D_s <= unet_D_s_plus_synth"] is False
    pred, gt = np.zeros((8, 8), bool), np.zeros((8, 8), bool)
    pred[1, 1] = pred[2, 4] = True      # box rows 1-2, cols 1-4: 8 px
    gt[2:4, 3:5] = True                 # box rows 2-3, cols 3-4: 4 px; overlap row 2 cols 3-4
    assert box_overlap(pred, gt) == (2, 10)
    m = SegmentationMeter()
    m.update(pred, gt)
    m.update(np.zeros((8, 8), bool), np.zeros((8, 8), bool))  # both empty: box IoU 1
    r = m.result()
    assert r["box_iou"] == pytest.approx(2 / 10) and r["box_iou_per_image"] == pytest.approx((0.2 + 1) / 2)
    # box-annotated ground truth (a union of two boxes) is used as it is, not boxed again
    gt_boxes = np.zeros((8, 8), bool)
    gt_boxes[0:2, 0:2] = gt_boxes[4:6, 4:6] = True
    assert box_overlap(pred, gt_boxes, gt_is_boxes=True) == (1, 15)
    assert box_overlap(pred, gt_boxes) == (8, 36)


def test_report_holds_table_and_notebooks(run):
    cfg, _, _ = run
    nb_dir = Path(cfg.run_dir) / "notebooks"
    with pytest.raises(StageError, match="no executed notebooks"):
        write_report(cfg.run_dir)
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_markdown_cell("# Evaluation story"),
                nbformat.v4.new_code_cell("print(42)", outputs=[
                    nbformat.v4.new_output("stream", name="stdout", text="42\n")])]
    nb_dir.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, nb_dir / "06_evaluation.ipynb")
    path = write_report(cfg.run_dir)
    text = path.read_text()
    assert "U-Net(D_s ∪ D&#x27;_s) (stage 06)" in text or "U-Net(D_s ∪ D'_s) (stage 06)" in text
    assert "Evaluation story" in text and "88.3" in text


def test_views_of_stages_05_06(run):
    import matplotlib
    matplotlib.use("Agg")
    from fgbg_utils.views import evaluation_views as views

    cfg, _, s06 = run
    image_id = next(iter(s06["rows"]["M"]["per_image_iou"]))
    masks = views._row_masks(cfg, image_id)
    assert set(masks) == set(stage_evaluation.ROWS)
    assert all(m.shape == (64, 64) and m.dtype == bool for m in masks.values())
    text = views.table(cfg)
    assert all(label in text for label in stage_evaluation.ROW_LABELS.values())
    for fig in (views.guidance_sweep(cfg), views.synthetic_rows(cfg, 2), views.best_worst(cfg, "unet_D_s", 1, 1)):
        assert len(fig.axes) > 1
    assert len(views.training_curves(cfg).axes[0].lines) == 4
    assert views.prediction_explorer(cfg, interactive=False) is None


def test_synthetic_filter_keeps_the_pairs_that_agree_with_unet_d_s(run, tmp_path):
    """segmentation.synthetic_filter_iou keeps exactly the D'_s pairs whose mask reaches the
    threshold IoU with U-Net(D_s)'s prediction; 0 keeps all."""
    from fgbg_utils.core.metrics import segmentation_metrics
    from fgbg_utils.training.segnet import predict

    cfg, _, _ = run
    train, _ = stage_evaluation._splits(cfg)
    d_s = stage_evaluation._training_sets(cfg, ["unet_D_s"], train, {"skipped_rows": {}})["unet_D_s"]
    everything = stage_evaluation.synthetic_pairs(cfg, d_s, None, {})
    assert len(everything[0]) == 3
    out = tmp_path / "filter"
    model, _ = stage_evaluation.train_or_load(cfg, out, {"unet_D_s": d_s}, lambda *_: None, False, 0)["unet_D_s"]
    ious = [segmentation_metrics([p], [m])["iou"] for p, m in
            zip(predict(model, everything[0], stage_evaluation.seg_config(cfg)), everything[1])]
    threshold = sorted(ious)[1]  # keeps the two best-agreeing pairs (or more on ties)
    filtered = cfg.model_copy(deep=True)
    filtered.segmentation.synthetic_filter_iou = max(threshold, 1e-6)
    record = {}
    images, masks = stage_evaluation.synthetic_pairs(filtered, d_s, out, record)
    keep = [k for k, v in enumerate(ious) if v >= filtered.segmentation.synthetic_filter_iou]
    assert record["synthetic_filter"]["kept"] == len(keep) == len(images)
    assert record["synthetic_filter"]["iou_with_unet_D_s"] == pytest.approx(ious, abs=1e-4)
    for got, k in zip(masks, keep):
        assert np.array_equal(got, everything[1][k])


def test_an_ensemble_row_is_its_one_network_members_saved_and_reloaded(run, tmp_path):
    """segmentation.ensemble = 2 with seed 1: the row's saved weights are exactly the one-network
    trainings with seeds 2 and 3, recorded as such, and a rerun loads them instead of training; the
    supervised row takes its own steps and ensemble size."""
    from safetensors.torch import load_file

    cfg = run[0].model_copy(deep=True)
    cfg.segmentation.rows = ["unet_D_s", "supervised"]
    cfg.segmentation.ensemble = 2
    cfg.segmentation.supervised_ensemble = 1  # the supervised row's own size and steps
    cfg.segmentation.supervised_step_factor = 2
    quiet = lambda *_: None  # noqa: E731
    first = stage_evaluation.unet_rows_with_seed(cfg, 1, tmp_path / "ens", log=quiet, processes=2)
    info = json.loads((tmp_path / "ens" / "models" / "unet_D_s.json").read_text())
    assert info["member_seeds"] == [2, 3] and info["config"]["ensemble"] == 2
    sup = json.loads((tmp_path / "ens" / "models" / "supervised.json").read_text())
    assert sup["member_seeds"] == [1] and sup["steps"] == len(sup["loss_curve"]) == 2 * cfg.segmentation.steps
    again = stage_evaluation.unet_rows_with_seed(cfg, 1, tmp_path / "ens", log=quiet)
    assert again == first
    assert json.loads((tmp_path / "ens" / "models" / "unet_D_s.json").read_text())["seconds"] == info["seconds"]
    weights = load_file(str(tmp_path / "ens" / "models" / "unet_D_s.safetensors"))
    single = cfg.model_copy(deep=True)
    single.segmentation.ensemble = 1
    single.segmentation.rows = ["unet_D_s"]
    for k, seed in enumerate((2, 3)):
        stage_evaluation.unet_rows_with_seed(single, seed, tmp_path / f"one-{seed}", log=quiet, processes=0)
        one = load_file(str(tmp_path / f"one-{seed}" / "models" / "unet_D_s.safetensors"))
        assert all(np.array_equal(v.numpy(), weights[f"members.{k}.{name}"].numpy()) for name, v in one.items())


def test_unet_steps_scale_with_the_training_images(run, tmp_path):
    """segmentation.steps_for_images: `steps` is the budget for that many training images, so the
    run's n images train round(steps · n / that) steps (the supervised row × its factor), as the
    trained network's record and loss curve show; null keeps `steps`; `min_steps` floors the scaled
    steps (never above `steps`). params/toy.yaml: 100 steps at 96 images (300 supervised), 60 at 32."""
    cfg = run[0].model_copy(deep=True)
    n = len(stage_evaluation._splits(cfg)[0])
    s = cfg.segmentation
    s.steps, s.steps_for_images, s.min_steps, s.supervised_step_factor = 8, 2 * n, 1, 3  # half the images
    assert stage_evaluation.seg_config(cfg, "unet_D_s", n).steps == 4
    assert stage_evaluation.seg_config(cfg, "supervised", n).steps == 12
    assert stage_evaluation.seg_config(cfg).steps == 8  # no n: as given (prediction)
    s.rows, s.ensemble = ["unet_M_pre"], 1
    stage_evaluation.unet_rows_with_seed(cfg, 0, tmp_path / "scaled", log=lambda *_: None, processes=0)
    info = json.loads((tmp_path / "scaled" / "models" / "unet_M_pre.json").read_text())
    assert info["steps"] == len(info["loss_curve"]) == 4
    s.steps_for_images = None
    assert stage_evaluation.seg_config(cfg, "unet_D_s", n).steps == 8
    s.steps_for_images, s.min_steps = 4 * n, 6  # a quarter of the budget (2 steps), floored at 6
    assert stage_evaluation.seg_config(cfg, "unet_D_s", n).steps == 6
    assert stage_evaluation.seg_config(cfg, "supervised", n).steps == 18
    s.min_steps = 50  # the floor never exceeds `steps`
    assert stage_evaluation.seg_config(cfg, "unet_D_s", n).steps == 8
    toy = load_params(TOY, {})
    rows = ("unet_D_s", "supervised")
    assert [stage_evaluation.seg_config(toy, r, k).steps for k in (96, 32, 192) for r in rows
            ] == [100, 300, 60, 180, 200, 600]


def test_step_scaling_at_its_defaults_leaves_older_run_folders_valid(run):
    """steps_for_images / min_steps came after run folders existed: at their defaults (off) they stay
    out of stage 06's parameter fingerprint, so those folders resume; set, they count."""
    from fgbg_utils.storage.folder import stage_params

    cfg = run[0].model_copy(deep=True)
    cfg.segmentation.steps_for_images, cfg.segmentation.min_steps = None, 60
    seg = stage_params(cfg, "06")["segmentation"]
    assert "steps_for_images" not in seg and "min_steps" not in seg and seg["steps"] == cfg.segmentation.steps
    cfg.segmentation.steps_for_images = 96
    assert stage_params(cfg, "06")["segmentation"]["steps_for_images"] == 96
