"""Stage 02: M̂ -> M_pre with a seeded 2-component GMM, midpoint threshold and orphan filter
(docs/method.md §2.2), and the metrics against ground truth when it exists."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from fgbg_utils.core import metrics as M
from fgbg_utils.core.binarize import binarize
from fgbg_utils.stages.common import processed_records
from fgbg_utils.data.datasets import load_mask
from fgbg_utils.core.frame import canvas_to_original
from fgbg_utils.io import atomic_save_png, atomic_write_json, read_json
from fgbg_utils.storage import locked_stage, metrics_path, open_stage, update_stage
from fgbg_utils.stages.attention_maps import STAGE as STAGE01, load_map

STAGE = "02_binarization"


def mask_path(cfg, image_id: str) -> Path:
    return Path(cfg.run_dir) / STAGE / "masks" / f"{image_id}.png"


def load_mpre(cfg, image_id: str) -> np.ndarray:
    """M_pre on the latent grid of the canonical frame (bool)."""
    from PIL import Image
    return np.asarray(Image.open(mask_path(cfg, image_id))) > 127


@locked_stage("02")
def run(cfg, force: bool = False, progress: bool = True) -> dict:
    """Binarize every M̂ of stage 01 into M_pre (PNG on the latent grid); then score."""
    out_dir, force = open_stage(cfg, "02", force)
    summary01 = read_json(Path(cfg.run_dir) / STAGE01 / "summary.json")
    gmm_path = out_dir / "gmm.json"
    gmm = read_json(gmm_path) if gmm_path.exists() and not force else {}
    factor = summary01["vae_factor"]
    for image_id in tqdm(summary01["images"], desc="02 binarization", unit="img", disable=not progress):
        if image_id in gmm and mask_path(cfg, image_id).exists():
            continue
        m = load_map(cfg, image_id)
        mask, info = binarize(m["mhat"], m["frame"].valid(factor), seed=cfg.binarization.gmm_seed,
                              orphan=cfg.binarization.orphan_filter, name=f"M̂ of {image_id}")
        atomic_save_png(mask_path(cfg, image_id), mask)
        gmm[image_id] = info
    atomic_write_json(gmm_path, gmm)
    result = evaluate(cfg, summary01, gmm)
    atomic_write_json(metrics_path(cfg, "02"), result)
    update_stage(cfg, "02", complete=True)
    return result


def _ground_truth(cfg, summary01: dict):
    """(record, gt mask) for the images of stage 01 that have ground truth, by split."""
    records = processed_records(cfg)
    wanted = set(summary01["images"])
    return [(r, load_mask(r.mask, image=r.image)) for r in records
            if r.id in wanted and r.mask is not None]


def evaluate(cfg, summary01: dict, gmm: dict) -> dict:
    """Pooled ACC / IoU / mIoU, per-image IoU and Dice, AUC-ROC of M̂, baselines and the T0 sweep."""
    pairs = _ground_truth(cfg, summary01)
    split = cfg.evaluation.split
    out = {"split": split, "n_images_total": len(summary01["images"]),
           "degenerate_maps": sorted(k for k, v in gmm.items() if v["degenerate"]),
           "gmm_seed": cfg.binarization.gmm_seed, "T0": cfg.T0, "seed": cfg.seed}
    if not pairs:
        out["note"] = "no ground-truth masks: metrics skipped"
        return out
    by_split = {}
    for name in sorted({r.split for r, _ in pairs}):
        by_split[name] = _score([(r, g) for r, g in pairs if r.split == name], cfg, summary01)
    if split not in by_split:
        raise ValueError(f"`evaluation.split`={split!r} has no images with ground truth; "
                         f"available: {sorted(by_split)}. Set evaluation.split or dataset.splits.")
    out.update(by_split[split])
    out["by_split"] = {k: {kk: vv for kk, vv in v.items() if kk != "t0_sweep"} for k, v in by_split.items()}
    return out


def _score(pairs, cfg, summary01: dict) -> dict:
    mpre, allfg, disc = M.SegmentationMeter(), M.SegmentationMeter(), M.SegmentationMeter()
    auc = M.BinnedAUC(cfg.evaluation.auc_bins)
    sweep = None
    area = float(np.mean([g.mean() for _, g in pairs]))
    for r, gt in pairs:
        m = load_map(cfg, r.id)
        frame = m["frame"]
        mpre.update(canvas_to_original(load_mpre(cfg, r.id), frame, "mask"), gt)
        auc.update(canvas_to_original(m["mhat"], frame, "soft"), gt)
        allfg.update(M.all_foreground(*gt.shape), gt)
        disc.update(M.center_disc(*gt.shape, area), gt)
        if "per_timestep" in m:
            sweep = _sweep_update(sweep, m, frame, gt, summary01["vae_factor"], cfg)
    result = {**mpre.result(), "auc_roc": auc.result(),
              "baselines": {"all_foreground": {**allfg.result(), "auc_roc": 0.5},
                            "center_disc": {**disc.result(), "area_fraction": area,
                                            "auc_roc": _disc_auc(pairs, cfg)}}}
    if sweep is not None:
        result["t0_sweep"] = {"T0": list(range(1, len(sweep) + 1)),
                              "auc_roc": [a.result() for a in sweep]}
    return result


def _sweep_update(sweep, m, frame, gt, factor, cfg):
    from fgbg_utils.core.attention import minmax

    per_t = m["per_timestep"].astype(np.float32)
    cum = np.cumsum(per_t, 0) / np.arange(1, len(per_t) + 1)[:, None, None]
    if sweep is None:
        sweep = [M.BinnedAUC(cfg.evaluation.auc_bins) for _ in range(len(per_t))]
    valid = frame.valid(factor)
    for k, meter in enumerate(sweep):
        meter.update(canvas_to_original(minmax(cum[k], valid), frame, "soft"), gt)
    return sweep


def _disc_auc(pairs, cfg) -> float:
    """AUC of a soft centred 'disc' score (1 - normalised distance to the centre)."""
    auc = M.BinnedAUC(cfg.evaluation.auc_bins)
    for _, gt in pairs:
        h, w = gt.shape
        yy, xx = np.mgrid[0:h, 0:w]
        d = np.hypot((yy + 0.5 - h / 2) / h, (xx + 0.5 - w / 2) / w)
        auc.update(1 - d / d.max(), gt)
    return auc.result()
