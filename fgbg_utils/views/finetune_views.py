"""Figures of stages 03-04: sampled rectangles, before/after samples, refinement galleries."""
from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from fgbg_utils.views import gallery
from fgbg_utils.core import seeds
from fgbg_utils.data.datasets import load_image, load_mask
from fgbg_utils.core.frame import canvas_to_original, image_to_canvas
from fgbg_utils.core.rectangles import RectRules, training_mask
from fgbg_utils.core.refine import upsample_mask


def rectangle_examples(cfg, n: int = 6):
    """Training images with M_pre (red) and one sampled training mask each (green: supervised)."""
    from fgbg_utils.stages.binarization import load_mpre

    s = gallery.summary01(cfg)
    ids = [i for i in s["images"] if s["splits"][i] == "train"][:n]
    records = gallery.records_by_id(cfg)
    fig, axes = plt.subplots(1, len(ids), figsize=(1.8 * len(ids), 2.2), squeeze=False)
    L, f = s["latent_size"], s["vae_factor"]
    for ax, i in zip(axes[0], ids):
        m_pre = load_mpre(cfg, i)
        rng = np.random.default_rng(seeds.derive_seed(cfg.seed, "fig-rect", i))
        mask, kind, prompt = training_mask(m_pre, rng, RectRules.for_grid(L), p_full=0.0)
        canvas, _ = image_to_canvas(load_image(records[i].image), s["resolution"], f)
        img = (canvas.transpose(1, 2, 0) + 1) / 2
        over = img.copy()
        over[upsample_mask(m_pre, f)] = 0.6 * over[upsample_mask(m_pre, f)] + 0.4 * np.array([1, 0, 0])
        over[upsample_mask(mask, f)] = 0.5 * over[upsample_mask(mask, f)] + 0.5 * np.array([0, 1, 0])
        ax.imshow(np.clip(over, 0, 1), interpolation="nearest")
        ax.set_title(f"{i}: {kind}", fontsize=7)
        ax.axis("off")
    fig.suptitle("red: M_pre · green: background rectangle trained with y_b", fontsize=8)
    fig.tight_layout()
    return fig


def sample_grid(cfg, n: int = 8):
    """Rows: m and m' with y_f, with y_b, and with y_b contrasted against y_f (same seeds); None,
    said, when the run sampled none (finetune.eval_samples: 0)."""
    if cfg.finetune.eval_samples == 0:
        return gallery.not_computed("the samples of m and m'", "finetune.eval_samples: 0")
    path = Path(cfg.run_dir) / "03_finetuning" / "samples.npz"
    names = {"base_y_f": "m, y_f", "tuned_y_f": "m', y_f", "base_y_b": "m, y_b", "tuned_y_b": "m', y_b",
             "base_y_b_vs_y_f": "m, y_b−y_f", "tuned_y_b_vs_y_f": "m', y_b−y_f"}
    with np.load(path) as z:
        rows = {k: z[k][:n] for k in names if k in z.files}
    cols = len(next(iter(rows.values())))
    fig, axes = plt.subplots(len(rows), cols, figsize=(1.3 * cols, 1.4 * len(rows)), squeeze=False)
    for r, (k, imgs) in enumerate(rows.items()):
        for c in range(cols):
            axes[r, c].imshow(imgs[c]), axes[r, c].set_xticks([]), axes[r, c].set_yticks([])
        axes[r, 0].set_ylabel(names[k], fontsize=8)
    fig.tight_layout()
    return fig


def refinement_row(cfg, image_id: str, records=None) -> dict:
    """One image's stage-04 views at its original size: image, ground truth (when labelled), M_pre,
    the inpainted background x̂, the difference |x − x̂|, M and M_crop."""
    from PIL import Image

    from fgbg_utils.stages.attention_maps import load_frame
    from fgbg_utils.stages.binarization import load_mpre
    from fgbg_utils.stages.refinement import load_refined, out_path

    rec = (records or gallery.records_by_id(cfg))[image_id]
    frame = load_frame(cfg, image_id)
    back = lambda a: canvas_to_original(a, frame, "mask")
    row = {"label": image_id, "image": load_image(rec.image), "M_pre": back(load_mpre(cfg, image_id)),
           "M": back(load_refined(cfg, image_id)), "M_crop": back(load_refined(cfg, image_id, "m_crop")),
           "background": np.asarray(Image.open(out_path(cfg, "background", image_id))),
           "difference": np.asarray(Image.open(out_path(cfg, "difference", image_id)), np.float32) / 255}
    if rec.mask is not None:
        row["ground truth"] = load_mask(rec.mask)
    return row


def refinement_rows(cfg, best: int = 3, worst: int = 3) -> list[dict]:
    """Gallery rows for the best and worst refined masks (fg IoU) of the evaluation split."""
    from fgbg_utils.core.metrics import SegmentationMeter

    records = gallery.records_by_id(cfg)
    rows = {}
    for i in gallery.ground_truth_ids(cfg, records, cfg.evaluation.split):
        row = refinement_row(cfg, i, records)
        meter = SegmentationMeter()
        meter.update(row["M"], row["ground truth"])
        row["iou"] = meter.result()["iou_per_image"]
        rows[i] = row
    order = sorted(rows, key=lambda k: rows[k]["iou"])
    pick = order[::-1][:best] + order[:worst]
    return [{**rows[i], "label": f"{i} IoU {rows[i]['iou']:.2f}"} for i in pick]


# ----------------------------------------------------------------------------- interpretation
SAMPLE_SETTINGS = (("y_f", "$y_f$ plainly ($s = 1$)"), ("y_b", "$y_b$ plainly ($s = 0$)"),
                   ("y_b_vs_y_f", "$y_b$ against $y_f$"))


def _pct(v) -> str:
    return "–" if v is None else f"{100 * v:.1f} %"


def object_free_report(shares: dict, prefix: str = "share_object_free_", contrast_guidance=None,
                       who: str = "the presence score") -> str:
    """Markdown: the share of object-free samples of m and m' per prompt setting (percent), and
    whether the notebook's two claims held on these numbers, with the reason:
    (1) fine-tuning makes plain y_b more object-free; (2) contrasting y_b against y_f (s = 1 − w < 0)
    gives more object-free scenes than plain y_b with m'."""
    get = lambda model, k: shares.get(f"{prefix}{model}_{k}")
    s = None if contrast_guidance is None else 1 - float(contrast_guidance)
    label = lambda k, text: text + (f" ($s = {s:g}$)" if k == "y_b_vs_y_f" and s is not None else "")
    lines = ["| samples | $m$ | $m'$ |", "|---|---|---|"]
    lines += [f"| {label(k, text)} | {_pct(get('base', k))} | {_pct(get('tuned', k))} |"
              for k, text in SAMPLE_SETTINGS]
    before, after, contrast = get("base", "y_b"), get("tuned", "y_b"), get("tuned", "y_b_vs_y_f")
    out = ["\n".join(lines), ""]
    if None in (before, after, contrast):
        return "\n".join(out + [f"({who}: not all sample sets were scored)"])
    held = after > before
    out.append(f"*Fine-tuning makes plain $y_b$ object-free* (by {who}): **{'held' if held else 'did not hold'}**, "
               f"{_pct(before)} before and {_pct(after)} after fine-tuning. " +
               ("" if held else "The rectangles teach $y_b$ inside images that contain the object, so $y_b$ "
                "alone does not rule the object out; it describes background *next to* an object."))
    held2 = contrast > after
    out.append(f"\n*Contrasting $y_b$ against $y_f$ removes the object*: **{'held' if held2 else 'did not hold'}**, "
               f"{_pct(contrast)} object-free with the contrast against {_pct(after)} with plain $y_b$ ($m'$). " +
               ("The contrast steers each step away from $y_f$, which is why the method samples backgrounds "
                "this way (the paper's negative prompt)." if held2 else
                "Here the contrast did not help: look at the samples above."))
    return "\n".join(out)
