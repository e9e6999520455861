"""Table 1's GrabCut baseline: cv2.grabCut from a centred rectangle segments an easy image, is
deterministic, and is scored in stage 06 like every other row (the row equals the core function
scored by hand on the test images)."""
from pathlib import Path

import numpy as np
import pytest

from fgbg_utils import load_params
from fgbg_utils.core.baselines import centred_rectangle, grabcut
from fgbg_utils.core.metrics import SegmentationMeter

from tests.fixtures.tiny import TINY, TOY


def _easy_image(seed: int = 0, size: int = 96):
    """A red disc and a darker square inside the centre, on a noisy blue-grey background."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    gt = (yy - 50) ** 2 + (xx - 45) ** 2 <= 22 ** 2
    img = np.empty((size, size, 3), np.float64)
    img[:] = (0.35, 0.45, 0.6)
    img[gt] = (0.9, 0.15, 0.1)
    img += rng.normal(0, 0.03, img.shape)
    return (np.clip(img, 0, 1) * 255).round().astype(np.uint8), gt


def load_mask_png(path):
    from PIL import Image
    return np.asarray(Image.open(path)) > 127


def _iou(pred, gt) -> float:
    return float((pred & gt).sum() / (pred | gt).sum())


def test_grabcut_segments_an_easy_image():
    image, gt = _easy_image()
    pred = grabcut(image, margin=0.1, iterations=5)
    assert pred.shape == gt.shape and pred.dtype == bool
    assert _iou(pred, gt) >= 0.9
    # the rectangle alone is far from it: GrabCut did the work
    x, y, w, h = centred_rectangle(*gt.shape, 0.1)
    rect = np.zeros_like(gt)
    rect[y:y + h, x:x + w] = True
    assert _iou(rect, gt) < 0.6


def test_grabcut_is_deterministic_and_marks_outside_as_background():
    image, _ = _easy_image(1)
    a, b = grabcut(image, 0.2, 3, seed=7), grabcut(image, 0.2, 3, seed=7)
    assert (a == b).all()
    x, y, w, h = centred_rectangle(96, 96, 0.2)
    outside = np.ones((96, 96), bool)
    outside[y:y + h, x:x + w] = False
    assert not a[outside].any()


def test_centred_rectangle():
    assert centred_rectangle(100, 200, 0.1) == (20, 10, 160, 80)
    assert centred_rectangle(64, 64, 0.0) == (1, 1, 62, 62)  # at least one pixel of sure background
    with pytest.raises(ValueError, match="margin"):
        centred_rectangle(64, 64, 0.5)


def test_grabcut_row_in_stage_06(tmp_path):
    from fgbg_utils.stages import attention_maps, binarization, evaluation, finetuning, refinement

    cfg = load_params(TOY, {**TINY, "segmentation.rows": ["unet_M_pre"]}, run_dir=str(tmp_path / "run"))
    for stage in (attention_maps, binarization, finetuning, refinement):
        stage.run(cfg, progress=False)
    s06 = evaluation.run(cfg, progress=False, log=lambda m: None)
    row = s06["rows"]["grabcut"]
    assert s06["grabcut"] == {"margin": 0.02, "iterations": 5, "seed": 0}
    # the row is the core function scored on the test images, like every other row
    from fgbg_utils.data.datasets import load_ground_truth, load_image
    from fgbg_utils.stages.common import processed_records
    test = [r for r in processed_records(cfg) if r.split == "test"]
    gt, _ = load_ground_truth(test)
    meter = SegmentationMeter()
    saved = tmp_path / "run" / "06_evaluation" / "predictions" / "grabcut"
    for r in test:
        pred = grabcut(load_image(r.image), 0.02, 5, seed=0)
        assert (pred == load_mask_png(saved / f"{r.id}.png")).all()
        meter.update(pred, gt[r.id])
    expected = meter.result()
    for key in ("acc", "iou", "miou"):
        assert row[key] == pytest.approx(expected[key])
    from fgbg_utils.runs.runner import metrics_table
    assert "GrabCut (stage 06)" in metrics_table(cfg.run_dir)
    # Table 1's layout with the paper's CUB numbers beside (views/evidence.py, the report's block)
    from fgbg_utils.runs.report import _table1_html
    from fgbg_utils.views.evidence import table1
    text = table1(cfg.run_dir)
    grab = next(line for line in text.splitlines() if line.startswith("| GrabCut |"))
    assert grab == (f"| GrabCut | {100 * row['acc']:.1f} | {100 * row['iou']:.1f} | {100 * row['miou']:.1f} "
                    f"| 72.3 | 36.0 | 52.3* |")
    assert "| ReDO | not run | not run | not run | 84.5 | 42.6 | – |" in text
    assert "| Ours, U-Net on D_s | not run" in text  # rows not trained in this run say so
    block = _table1_html(Path(cfg.run_dir))
    assert "Table 1" in block and "<td>GrabCut</td>" in block and "margin 0.02" in block
