"""The notebooks' views headless: the one-image walkthrough helpers on the shipped toy model, and
the explorers' figure functions on a tiny run folder (stages 01-06), with and without ground truth."""
import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from fgbg_utils import load_params  # noqa: E402
from fgbg_utils.views import evaluation_views, explorers, finetune_views, gallery  # noqa: E402
from fgbg_utils.views import walkthrough as wt  # noqa: E402

from tests.fixtures.tiny import TINY as SHARED, TOY

TINY = {**SHARED, "attention.sweep": True, "device": "cpu"}  # the T0-sweep figure needs the sweep


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny run folder with stages 01-04."""
    from fgbg_utils.stages import attention_maps, binarization, finetuning, refinement

    cfg = load_params(TOY, TINY, run_dir=str(tmp_path_factory.mktemp("views") / "run"))
    for stage in (attention_maps, binarization, finetuning, refinement):
        stage.run(cfg, progress=False)
    return cfg


@pytest.fixture(scope="module")
def run56(run):
    """The same run folder with stages 05 and 06."""
    from fgbg_utils.stages import evaluation, synthesis

    synthesis.run(run, progress=False)
    evaluation.run(run, progress=False, log=lambda m: None)
    return run


@pytest.fixture(scope="module")
def walk():
    cfg = load_params(TOY, {"device": "cpu", "T0": 10})
    image, gt, _ = wt.toy_example()
    pipe = wt.load_pipeline(cfg)
    maps = pipe.attention_maps(image, cfg.object, cfg.prompt, T0=cfg.T0, ids=["w"], per_timestep=True,
                               per_layer=True, per_token=True)
    return cfg, image, gt, pipe, maps


def test_toy_example_is_fixed_and_has_an_object():
    a, gt_a, cap = wt.toy_example()
    b, gt_b, _ = wt.toy_example()
    assert (a == b).all() and (gt_a == gt_b).all() and gt_a.sum() > 100 and "shape" in cap


def test_gmm_figure_draws_the_two_gaussians_of_binarize(walk):
    from fgbg_utils.core.binarize import gmm_threshold

    _, _, _, _, maps = walk
    values = maps.mhat[0][maps.valid(0)]
    tau, means = gmm_threshold(values)
    _, mu, sd = wt.gmm_components(values)
    assert np.allclose(mu, means) and (sd > 0).all()
    fig = wt.gmm_figure(values, tau)
    lines = fig.axes[0].lines
    assert any(np.allclose(line.get_xdata(), tau) for line in lines)  # the midpoint is marked
    assert sum(len(line.get_xdata()) == 300 for line in lines) == 2   # two Gaussian curves
    plt.close("all")


def test_attention_figure_sliders_are_independent(walk):
    _, image, _, pipe, maps = walk
    canvas = (pipe.canvases(image)[0][0].permute(1, 2, 0).numpy() + 1) * 127.5
    v = explorers.MapViews.from_pipeline(maps, canvas.astype(np.uint8))
    opts = v.options()
    assert opts["noise level t"][0] == "t = 1" and len(opts["noise level t"]) == 50
    assert opts["token"] == ["'shape' @ 5"] and len(opts["layer"]) == len(maps.layers)
    fig = explorers.attention_figure(v, t=3, layer=1, token=0)
    titles = [ax.get_title() for ax in fig.axes]
    assert "noise level t: t = 61" in titles and any(t.startswith("layer: ") for t in titles)
    # changing one index changes only its own panel
    a = explorers.attention_figure(v, t=3, layer=0).axes
    b = explorers.attention_figure(v, t=3, layer=1).axes
    assert a[1].get_title() == b[1].get_title() and a[2].get_title() != b[2].get_title()
    assert a[3].get_title() == b[3].get_title()
    assert len(explorers.attention_explorer(lambda _: v, ["w"], interactive=False)) == 3
    plt.close("all")


def test_threshold_figure_scores_the_chosen_threshold(walk):
    _, _, gt, pipe, maps = walk
    masks = pipe.preliminary_masks(maps)
    tau = masks.thresholds[0]
    fig, score = explorers.threshold_figure(maps.mhat[0], maps.valid(0), tau, {"threshold": tau},
                                            maps.frames[0], gt)
    assert score == pytest.approx(explorers.iou(masks.original()[0], gt))
    assert len(fig.axes) == 3
    _, high = explorers.threshold_figure(maps.mhat[0], maps.valid(0), 0.999, {"threshold": tau},
                                         maps.frames[0], gt)
    assert high < score
    fig, none = explorers.threshold_figure(maps.mhat[0], maps.valid(0), tau, {"threshold": tau},
                                           maps.frames[0], None)
    assert none is None and len(fig.axes) == 2
    plt.close("all")


def test_rectangles_figure_draws_every_box(walk):
    from fgbg_utils.core.rectangles import RectRules, sample_rectangle

    _, image, _, pipe, maps = walk
    m_pre = pipe.preliminary_masks(maps).masks[0]
    rng = np.random.default_rng(0)
    draws = [sample_rectangle(~m_pre, rng, RectRules.for_grid(16)) for _ in range(4)]
    fig = wt.rectangles_figure(image, m_pre, draws, 4)
    assert len(fig.axes[0].patches) == sum(box is not None for _, _, box in draws)
    plt.close("all")


def test_inpaint_trace_keeps_the_known_region(walk, run):
    cfg, image, _, pipe, maps = walk
    tuned = wt.load_pipeline(cfg, wt.finetuned_folder(run))
    m_pre = pipe.preliminary_masks(maps).masks[0]
    x, _ = pipe.canvases(image)
    x_hat, trace = wt.inpaint_trace(tuned.tuned, x[0], m_pre, cfg.background_prompt, seed=0, steps=4, show=2)
    assert sorted(trace) == [2, 4] and x_hat.shape == (64, 64, 3)
    assert np.allclose(trace[4], x_hat, atol=1e-5)  # the last kept step is x̂
    assert wt.finetuned_folder(cfg) is None or wt.finetuned_folder(cfg).exists()


def test_run_folder_explorers(run):
    ids = gallery.pick_ids(run, 10)
    v = explorers.MapViews.from_run(run, ids[0])
    assert v.canvas.shape == (64, 64, 3) and v.per_layer is not None
    assert len(explorers.attention_explorer(lambda i: explorers.MapViews.from_run(run, i), ids, False)) >= 2
    row = finetune_views.refinement_row(run, ids[0])
    assert {"M_pre", "M", "background", "difference", "ground truth"} <= set(row)
    assert not (row["M"] & ~row["M_pre"]).any()
    assert len(explorers.refinement_explorer(run, ids, interactive=False).axes) == 7
    plt.close("all")


def test_synthetic_pairs_and_table2(run56):
    run = run56
    assert len(evaluation_views.synthetic_ids(run)) == 3
    assert len(explorers.synthetic_explorer(run, interactive=False, n=2).axes) == 8
    fig = evaluation_views.table2_figure(run)
    labels = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    assert "M_pre" in labels and "supervised" in labels
    plt.close("all")


def test_no_ground_truth_says_so(run, tmp_path, capsys):
    import json
    from pathlib import Path

    other = load_params(TOY, {**TINY}, run_dir=str(tmp_path / "r"))
    metrics = Path(other.run_dir) / "metrics"
    metrics.mkdir(parents=True)
    (metrics / "06_evaluation.json").write_text(json.dumps({"rows": {}}))
    assert evaluation_views.table2_figure(other) is None
    assert "no ground-truth masks" in capsys.readouterr().out


def test_widgets_only_with_a_browser():
    assert not explorers.use_widgets(False)
    assert not explorers.use_widgets(True)  # no kernel here (as under papermill and nbval)


def _panel_pixels(ax) -> np.ndarray:
    """The RGB pixels an axes' first image shows, rendered through its colour map and scale."""
    art = ax.get_images()[0]
    return art.to_rgba(art.get_array(), bytes=True)[..., :3]


def test_masks_render_white_when_full_and_black_when_empty():
    """A full mask is white and an empty one black in every figure that draws masks (imshow's
    default scale would stretch a constant mask and draw both black)."""
    full, empty = np.ones((8, 8), bool), np.zeros((8, 8), bool)
    fig = wt.masks_figure({"full": full, "empty": empty})
    assert (_panel_pixels(fig.axes[0]) == 255).all() and (_panel_pixels(fig.axes[1]) == 0).all()
    fig = wt.image_and_maps(np.zeros((8, 8, 3), np.uint8), {}, ground_truth=full)
    assert (_panel_pixels(fig.axes[1]) == 255).all()
    fig, _ = explorers.threshold_figure(np.ones((8, 8)), full, 0.0, {}, None)
    assert (_panel_pixels(fig.axes[1]) == 255).all()
    fig = evaluation_views._grid([[full, empty]], ["row"])
    assert (_panel_pixels(fig.axes[0]) == 255).all() and (_panel_pixels(fig.axes[1]) == 0).all()
    plt.close("all")


def test_table2_report_verdicts_follow_the_numbers():
    """'held' / 'did not hold' and the percentages are computed from the metrics, never fixed."""
    from fgbg_utils.stages.evaluation import PAPER_CUB_IOU, ordering

    ious = {"M_pre": 0.5, "M": 0.7, "unet_D_s": 0.88, "unet_D_s_plus_synth": 0.84, "supervised": 0.95}
    rows = {k: {"iou": v} for k, v in ious.items()}
    m = {"rows": rows, "paper_cub_iou": PAPER_CUB_IOU, "ordering": ordering(rows)}
    text = evaluation_views.table2_report(m)
    assert "| U-Net(D_s) | 88.0 | 75.1 |" in text and "| M_pre | 50.0 | 29.0 |" in text
    assert "U-Net(D_s) ≤ U-Net(D_s ∪ D'_s) (88.0 vs 84.0): **did not hold**" in text
    assert "**did not hold** at 1 of 4 steps" in text and "M_pre < M (50.0 vs 70.0): **held**" in text
    rows["unet_D_s_plus_synth"]["iou"] = 0.9
    text = evaluation_views.table2_report({**m, "ordering": ordering(rows)})
    assert "**held** at every step" in text and "did not hold" not in text
    assert "cannot be checked" in evaluation_views.table2_report({"rows": {}})


def test_object_free_report_verdicts_follow_the_numbers():
    shares = {"share_object_free_base_y_f": 0.25, "share_object_free_base_y_b": 0.75,
              "share_object_free_base_y_b_vs_y_f": 1.0, "share_object_free_tuned_y_f": 0.1875,
              "share_object_free_tuned_y_b": 0.625, "share_object_free_tuned_y_b_vs_y_f": 0.8125}
    text = finetune_views.object_free_report(shares, contrast_guidance=3.0)
    assert "| $y_b$ plainly ($s = 0$) | 75.0 % | 62.5 % |" in text and "($s = -2$)" in text
    first, second = text.split("\n\n*Contrasting")
    assert "**did not hold**, 75.0 % before and 62.5 % after" in first and "**held**, 81.2 %" in second
    text = finetune_views.object_free_report({**shares, "share_object_free_tuned_y_b": 0.9})
    assert "**held**, 75.0 % before and 90.0 % after" in text and "**did not hold**, 81.2 %" in text
    check = {"area_threshold": 0.01, "real_test_detected": 1.0, "object_free_pure_backgrounds": 1.0,
             **{k.replace("share_", ""): v for k, v in shares.items()}}
    text = evaluation_views.object_free_report(check, 3.0)
    assert "100.0 % of the real test images" in text and "**did not hold**, 75.0 %" in text


def test_reuse_note_says_what_a_stage_computed_and_reused(tmp_path, capsys):
    cfg = load_params(TOY, {}, run_dir=str(tmp_path / "run"))
    folder = tmp_path / "run" / "04_refinement"
    folder.mkdir(parents=True)
    (folder / "a.png").write_text("a")
    with gallery.reuse_note(cfg, "04"):
        pass
    assert "its 1 output files were reused and are unchanged" in capsys.readouterr().out
    with gallery.reuse_note(cfg, "04"):
        (folder / "a.png").write_text("a")  # rewritten with the same bytes: unchanged
        (folder / "b.png").write_text("b")
        (folder / "stage.json").write_text("{}")  # the stage's record is not an output
    assert "stage 04_refinement: 1 output files new or changed now, 1 reused unchanged" in capsys.readouterr().out


def test_run_log_names_no_machine_paths(tmp_path, capsys):
    from fgbg_utils.runs.params import PROJECT_ROOT

    cfg = load_params(TOY, {}, run_dir=str(tmp_path / "run"))
    gallery.run_log(cfg)(f"masks in {tmp_path / 'run' / '06_evaluation' / 'masks'}; model {PROJECT_ROOT / 'models'}")
    out = capsys.readouterr().out
    assert out == "masks in RUN/06_evaluation/masks; model models\n"


def test_percent_tables_and_refinement_verdicts(tmp_path):
    import json

    from fgbg_utils.views.evaluation_views import percent_table, refinement_verdicts

    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics" / "02_binarization.json").write_text(json.dumps({"iou": 0.5, "acc": 0.9, "miou": 0.7}))
    (tmp_path / "metrics" / "04_refinement.json").write_text(json.dumps(
        {"refined": {"iou": 0.6, "acc": 0.95, "miou": 0.77}, "m_crop": {"iou": 0.65}}))
    table = percent_table(tmp_path)
    assert "| M_pre (stage 02) | 90.0 | 50.0 | 70.0 | 29.0 |" in table
    assert "| M (stage 04) | 95.0 | 60.0 | 77.0 | 63.6 |" in table
    text = refinement_verdicts(tmp_path)
    assert "improves $M_{pre}$*: **held**, IoU 50.0 → 60.0 %" in text
    assert "$M_{crop}$*: **did not hold**, 60.0 vs 65.0 %" in text
