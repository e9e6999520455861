"""Figures and tables of stages 05 (synthesis) and 06 (evaluation)."""
from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
from PIL import Image

from fgbg_utils.io import read_json
from fgbg_utils.views.gallery import not_computed
from fgbg_utils.views.walkthrough import show_mask


def _grid(rows: list[list[np.ndarray]], row_labels: list[str], col_labels: list[str] | None = None,
          size: float = 1.2):
    n_r, n_c = len(rows), max(len(r) for r in rows)
    fig, axes = plt.subplots(n_r, n_c, figsize=(size * n_c, size * n_r + 0.3), squeeze=False)
    for r, row in enumerate(rows):
        for c in range(n_c):
            ax = axes[r, c]
            ax.set_xticks([]), ax.set_yticks([])
            if c < len(row):
                img = row[c]
                ax.imshow(img) if img.ndim == 3 else show_mask(ax, img)
            else:
                ax.axis("off")
            if r == 0 and col_labels:
                ax.set_title(col_labels[c], fontsize=8)
        axes[r, 0].set_ylabel(row_labels[r], fontsize=8)
    fig.tight_layout()
    return fig


def guidance_sweep(cfg):
    """The paper's Fig. 8: one row per seed, s from background (left) to strong objects (right);
    None, said, when the run drew no sweep (synthesis.sweep_seeds: 0 or no sweep_scales)."""
    if not cfg.synthesis.sweep_seeds or not cfg.synthesis.sweep_scales:
        return not_computed("the guidance sweep", "synthesis.sweep_seeds: 0 or synthesis.sweep_scales: []")
    with np.load(Path(cfg.run_dir) / "05_synthesis" / "guidance_sweep.npz") as z:
        images, scales = z["images"], z["scales"]
    return _grid([list(row) for row in images], [f"seed {k}" for k in range(len(images))],
                 [f"s = {s:g}" for s in scales])


def _checker(h: int, w: int, cell: int = 8) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    return np.where(((yy // cell + xx // cell) % 2)[..., None] == 0, 0.85, 0.65) * np.ones(3)


def synthetic_ids(cfg) -> list[str]:
    """Ids of the synthetic pairs of stage 05 (sorted)."""
    return sorted(p.stem for p in (Path(cfg.run_dir) / "05_synthesis" / "dataset" / "masks").glob("*.png"))


def synthetic_pair(cfg, image_id: str) -> list[np.ndarray]:
    """D', D'_m, D'_f (over a checkerboard) and D'_b of one synthetic image, floats in [0, 1]."""
    root = Path(cfg.run_dir) / "05_synthesis"
    img = np.asarray(Image.open(root / "dataset" / "images" / f"{image_id}.png").convert("RGB")) / 255
    mask = np.asarray(Image.open(root / "dataset" / "masks" / f"{image_id}.png")) > 127
    rgba = np.asarray(Image.open(root / "foregrounds" / f"{image_id}.png")) / 255
    cut = rgba[..., :3] * rgba[..., 3:] + _checker(*mask.shape) * (1 - rgba[..., 3:])
    back = np.asarray(Image.open(root / "backgrounds" / f"{image_id}.png").convert("RGB")) / 255
    return [img, mask.astype(float), cut, back]


def synthetic_rows(cfg, n: int = 6, ids: list[str] | None = None, size: float = 1.2):
    """Columns: D', D'_m, D'_f (over a checkerboard) and D'_b, for the first n synthetic images
    (or the given ids)."""
    ids = synthetic_ids(cfg)[:n] if ids is None else ids
    return _grid([synthetic_pair(cfg, i) for i in ids], ids, ["D'", "D'_m", "D'_f", "D'_b"], size)


def pure_backgrounds(cfg, n: int = 8):
    """The object-free scenes sampled with y_b (the paper's "backgrounds only"); None, said, when
    the run sampled none (synthesis.background_images: 0)."""
    if cfg.synthesis.background_images == 0:
        return not_computed("the pure backgrounds", "synthesis.background_images: 0")
    folder = Path(cfg.run_dir) / "05_synthesis" / "pure_backgrounds"
    files = sorted(folder.glob("*.png"))[:n]
    images = [np.asarray(Image.open(f).convert("RGB")) for f in files]
    s = cfg.synthesis.background_guidance
    return _grid([images], [f"y_b, s = {s:g}"]) if images else None


def table(cfg) -> str:
    """Stage 06's rows beside the paper's CUB IoU (Table 2), as text."""
    from fgbg_utils.stages.evaluation import ROW_LABELS, ROWS

    m = read_json(Path(cfg.run_dir) / "metrics" / "06_evaluation.json")
    if not m["rows"]:
        from fgbg_utils.views.gallery import NO_GROUND_TRUTH
        return f"{NO_GROUND_TRUTH}no row of Table 2 could be scored"
    cols = ("acc", "iou", "miou", "iou_per_image", "dice_per_image", "box_iou")
    lines = [f"{'row':<20}" + "".join(f"{c:>15}" for c in cols) + f"{'paper CUB IoU':>15}"]
    for key in ROWS:
        row = m["rows"].get(key)
        if row is None:
            continue
        paper = m["paper_cub_iou"].get(key)
        lines.append(f"{ROW_LABELS[key]:<20}" + "".join(f"{row[c]:>15.3f}" for c in cols)
                     + (f"{paper:>15.1f}" if paper is not None else ""))
    return "\n".join(lines)


def table2_figure(cfg):
    """Stage 06's foreground IoU per row (this run) beside the paper's CUB IoU (Table 2), as
    horizontal bars; None (with a message) when no row was scored."""
    fig = table2_bars(read_json(Path(cfg.run_dir) / "metrics" / "06_evaluation.json"))
    if fig is None:
        from fgbg_utils.views.gallery import no_ground_truth
        no_ground_truth("no row of Table 2 could be scored, so there is no chart")
    return fig


def table2_bars(metrics: dict):
    """The Table 2 bar chart from stage 06's metrics dict (the notebook and the report draw it);
    None when no row was scored."""
    from fgbg_utils.stages.evaluation import ROW_LABELS, ROWS

    keys = [k for k in ROWS if k in metrics.get("rows", {})]
    if not keys:
        return None
    ours = [100 * metrics["rows"][k]["iou"] for k in keys]
    paper = [metrics.get("paper_cub_iou", {}).get(k) for k in keys]
    y = np.arange(len(keys))
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(keys) + 1.4))
    ax.barh(y - 0.2, ours, 0.4, label="this run (IoU %)", color="tab:blue")
    ax.barh(y + 0.2, [p or 0 for p in paper], 0.4, label="paper, CUB (IoU %)", color="0.7")
    for yi, v, p in zip(y, ours, paper):
        ax.text(v + 0.5, yi - 0.2, f"{v:.1f}", va="center", fontsize=7)
        if p is not None:
            ax.text(p + 0.5, yi + 0.2, f"{p:.1f}", va="center", fontsize=7, color="0.4")
    ax.set_yticks(y, [ROW_LABELS[k] for k in keys])
    ax.invert_yaxis()
    ax.set_xlim(0, 105), ax.set_xlabel("foreground IoU (%)")
    ax.set_title("Table 2: this run beside the paper's CUB numbers", fontsize=10)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=2, frameon=False)
    fig.tight_layout()
    return fig


def training_curves(cfg):
    m = read_json(Path(cfg.run_dir) / "metrics" / "06_evaluation.json")
    fig, ax = plt.subplots(figsize=(6, 3))
    for key, info in m["training"].items():
        curve = np.asarray(info["loss_curve"])
        k = max(1, len(curve) // 50)
        smooth = np.convolve(curve, np.ones(k) / k, mode="valid")
        ax.plot(np.arange(k, len(curve) + 1), smooth, label=key)
    ax.set_xlabel("step"), ax.set_ylabel("BCE (running mean)"), ax.set_yscale("log")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def best_worst(cfg, row: str, best: int = 3, worst: int = 3):
    """Image, ground truth and the row's prediction for its best and worst test images."""
    from fgbg_utils.data.loader import load_dataset
    from fgbg_utils.data.datasets import load_image, load_mask

    m = read_json(Path(cfg.run_dir) / "metrics" / "06_evaluation.json")
    ious = m["rows"][row]["per_image_iou"]
    order = sorted(ious, key=ious.get)
    pick = order[::-1][:best] + order[:worst]
    records = {r.id: r for r in load_dataset(cfg)[0]}
    pred_dir = Path(cfg.run_dir) / "06_evaluation" / "predictions" / row
    rows = []
    for i in pick:
        img = load_image(records[i].image)
        pred = np.asarray(Image.open(pred_dir / f"{i}.png")) > 127 if (pred_dir / f"{i}.png").exists() else None
        gt = load_mask(records[i].mask, img.shape[:2])
        rows.append([img, gt.astype(float)] + ([pred.astype(float)] if pred is not None else []))
    return _grid(rows, [f"{i} IoU {ious[i]:.2f}" for i in pick], ["image", "ground truth", row])


def _row_masks(cfg, image_id: str) -> dict:
    """Every scored row's mask of one test image, at the image's size (U-Net rows from
    06_evaluation/predictions, the direct rows from stages 02 and 04)."""
    from fgbg_utils.stages import evaluation as se

    frame = se.frames_of(cfg, [image_id])[image_id]
    out = {"M_pre": se.mpre_original(cfg, image_id, frame),
           "M_crop": se.stage04_original(cfg, image_id, frame, "m_crop"),
           "M": se.stage04_original(cfg, image_id, frame, "refined")}
    pred_root = Path(cfg.run_dir) / "06_evaluation" / "predictions"
    for row in se.ROWS:
        f = pred_root / row / f"{image_id}.png"
        if f.exists():
            out[row] = np.asarray(Image.open(f)) > 127
    return out


def prediction_explorer(cfg, interactive: bool = True):
    """A dropdown over the scored test images (worst first by U-Net(D_s) IoU) showing the image,
    its ground truth and every row's mask with its IoU. Headless it draws nothing (the best/worst
    gallery above is the static view)."""
    if not interactive:
        return None
    import ipywidgets as W
    from IPython.display import display

    from fgbg_utils.data.loader import load_dataset
    from fgbg_utils.data.datasets import load_image, load_mask
    from fgbg_utils.stages.evaluation import ROW_LABELS
    from fgbg_utils.views import explorers

    m = read_json(Path(cfg.run_dir) / "metrics" / "06_evaluation.json")
    if not m["rows"]:
        from fgbg_utils.views.gallery import no_ground_truth
        no_ground_truth("no row could be scored, so there is nothing to explore")
        return None
    key = "unet_D_s" if "unet_D_s" in m["rows"] else next(iter(m["rows"]))
    ious = m["rows"][key]["per_image_iou"]
    records = {r.id: r for r in load_dataset(cfg)[0]}
    image = W.Dropdown(options=sorted(ious, key=ious.get), description="image")
    out = W.Output()

    def redraw(*_):
        i = image.value
        img = load_image(records[i].image)
        masks = _row_masks(cfg, i)
        with explorers.REDRAW_LOCK, plt.ioff(), out:
            out.clear_output(wait=True)
            panels = [("image", img), ("ground truth", load_mask(records[i].mask, img.shape[:2]))]
            panels += [(f"{ROW_LABELS[k]} {m['rows'][k]['per_image_iou'].get(i, float('nan')):.2f}", v)
                       for k, v in masks.items() if k in m["rows"]]
            fig, axes = plt.subplots(1, len(panels), figsize=(1.6 * len(panels), 2))
            for ax, (title, arr) in zip(axes, panels):
                ax.imshow(arr) if arr.ndim == 3 else show_mask(ax, arr)
                ax.set_title(title, fontsize=7)
                ax.axis("off")
            explorers.show_figure(fig)

    image.observe(redraw, names="value")
    redraw()
    display(W.VBox([image, out]))
    return None


def table2_report(metrics: dict) -> str:
    """Markdown: each Table 2 row's foreground IoU in percent beside the paper's CUB number, then
    the paper's ordering step by step, each step 'held' or 'did not hold' on these numbers."""
    from fgbg_utils.stages.evaluation import ROW_LABELS

    rows, paper = metrics.get("rows", {}), metrics.get("paper_cub_iou", {})
    if not rows:
        return "No row was scored (no ground truth), so Table 2 and its ordering cannot be checked."
    lines = ["| row | this run, IoU (%) | paper, CUB (%) |", "|---|---|---|"]
    lines += [f"| {ROW_LABELS.get(k, k)} | {100 * m['iou']:.1f} | {paper[k]:.1f} |" if k in paper
              else f"| {ROW_LABELS.get(k, k)} | {100 * m['iou']:.1f} | – |" for k, m in rows.items()]
    steps, failed = [], []
    for step, ok in metrics.get("ordering", {}).items():
        if step == "holds":
            continue
        a, op, b = step.split()
        x, y = 100 * rows[a]["iou"], 100 * rows[b]["iou"]
        text = f"{ROW_LABELS[a]} {'≤' if op == '<=' else '<'} {ROW_LABELS[b]} ({x:.1f} vs {y:.1f})"
        steps.append(f"* {text}: **{'held' if ok else 'did not hold'}**")
        if not ok:
            failed.append(text)
    if not steps:
        return "\n".join(lines)
    from fgbg_utils.stages.evaluation import ordering

    on_paper = ordering({k: {"iou": v} for k, v in paper.items()}).get("holds")
    verdict = ("The paper's ordering **held** at every step on this run." if not failed else
               f"The paper's ordering **did not hold** at {len(failed)} of {len(steps)} steps: "
               + "; ".join(failed) + ".")
    verdict += {True: " On the paper's CUB numbers every step holds.",
                False: " On the paper's CUB numbers it does not hold either."}.get(on_paper, "")
    return "\n".join(lines + ["", "The paper's ordering, step by step:", *steps, "", verdict])


def object_free_report(check: dict, contrast_guidance: float | None = None) -> str:
    """Markdown: notebook 03's samples and 05's pure backgrounds, checked with the supervised U-Net
    as the object detector, in percent, with the two claims' verdicts (views.finetune_views)."""
    from fgbg_utils.views.finetune_views import object_free_report as report

    if not check:
        return "No detector check in this run (it needs ground truth and the supervised U-Net)."
    head = (f"The detector finds the object in {100 * check.get('real_test_detected', float('nan')):.1f} % of the "
            f"real test images (all of which contain it); a sample is object-free below "
            f"{100 * check['area_threshold']:g} % of the image marked.\n\n")
    tail = ""
    if "object_free_pure_backgrounds" in check:
        v = check["object_free_pure_backgrounds"]
        tail = (f"\n\nPure backgrounds of notebook 05: {100 * v:.1f} % object-free "
                f"({check.get('n_pure_backgrounds', '?')} samples).")
    return head + report(check, "object_free_", contrast_guidance, who="the detector") + tail


PAPER_KEYS = {"M_pre (stage 02)": "M_pre", "M_crop (stage 04 baseline)": "M_crop", "M (stage 04)": "M"}


def percent_table(run_dir, stages=("02", "04")) -> str:
    """Markdown: the run's metrics rows (runner.metrics_rows) in percent, beside the paper's CUB IoU."""
    from fgbg_utils.runs.runner import metrics_rows
    from fgbg_utils.stages.evaluation import PAPER_CUB_IOU

    rows = metrics_rows(run_dir, stages=stages)
    if not rows:
        return "no metrics (no ground truth, or the stages have not run)"
    pct = lambda v: f"{100 * v:.1f}" if isinstance(v, (int, float)) else "–"
    lines = ["| row | ACC (%) | IoU (%) | mIoU (%) | paper, CUB IoU (%) |", "|---|---|---|---|---|"]
    for name, m in rows:
        paper = m.get("paper_cub_iou", PAPER_CUB_IOU.get(PAPER_KEYS.get(name, "")))
        lines.append(f"| {name} | {pct(m.get('acc'))} | {pct(m.get('iou'))} | {pct(m.get('miou'))} | "
                     f"{'' if paper is None else f'{paper:.1f}'} |")
    return "\n".join(lines)


def refinement_verdicts(run_dir) -> str:
    """Markdown: whether refinement's two claims held on this run (M beats M_pre; M beats the
    M_crop baseline), with the IoUs in percent beside the paper's."""
    from fgbg_utils.stages.evaluation import PAPER_CUB_IOU
    from fgbg_utils.stages.registry import STAGE_NAMES

    mdir = Path(run_dir) / "metrics"
    m02, m04 = (mdir / f"{STAGE_NAMES[k]}.json" for k in ("02", "04"))
    if not (m02.exists() and m04.exists()):
        return ""
    pre, m04 = read_json(m02).get("iou"), read_json(m04)
    refined, crop = m04.get("refined", {}).get("iou"), m04.get("m_crop", {}).get("iou")
    if None in (pre, refined, crop):
        return "No ground truth: the refinement claims cannot be checked on this run."
    p = PAPER_CUB_IOU
    say = lambda ok: "**held**" if ok else "**did not hold**"
    return (f"*Refinement improves $M_{{pre}}$*: {say(refined > pre)}, IoU {100 * pre:.1f} → {100 * refined:.1f} % "
            f"(paper, CUB: {p['M_pre']:.1f} → {p['M']:.1f} %).\n\n"
            f"*Painting with $m'$ beats the mirrored-strip baseline $M_{{crop}}$*: {say(refined > crop)}, "
            f"{100 * refined:.1f} vs {100 * crop:.1f} % (paper: {p['M']:.1f} vs {p['M_crop']:.1f} %).")
