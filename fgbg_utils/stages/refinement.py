"""Stage 04: refine M_pre by painting the object away with the fine-tuned model m' (METHOD §2.4):
x̂ = m'(z̃₀, y_b) with M_pre repainted, d = mean_RGB |x_ref − x̂|, M = M_pre,up ∧ GMM(d).
The M_crop baseline replaces m' by the largest background strip mirrored over the object."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from fgbg_utils.core import metrics as M
from fgbg_utils.core import models, seeds
from fgbg_utils.data.loader import load_dataset
from fgbg_utils.data.datasets import load_image, load_mask
from fgbg_utils.core.frame import canvas_to_original, image_to_canvas
from fgbg_utils.core.inpaint import inpaint_background, make_inpaint_pipeline, vae_roundtrip
from fgbg_utils.io import atomic_save_png, atomic_write_json, read_json
from fgbg_utils.core.refine import (difference_map, m_crop_fill, optional_postprocess, refine_mask, upsample_mask)
from fgbg_utils.runs.run_folder import locked_stage, metrics_path, open_stage, require_stage, update_stage
from fgbg_utils.stages.attention_maps import STAGE as STAGE01
from fgbg_utils.stages.binarization import load_mpre

STAGE = "04_refinement"
STAGE03 = "03_finetuning"
OUTPUTS = ("background", "difference", "refined", "m_crop")


def out_path(cfg: dict, kind: str, image_id: str) -> Path:
    return Path(cfg.run_dir) / STAGE / kind / f"{image_id}.png"


def load_refined(cfg: dict, image_id: str, kind: str = "refined") -> np.ndarray:
    from PIL import Image
    return np.asarray(Image.open(out_path(cfg, kind, image_id))) > 127


@locked_stage("04")
def run(cfg, force: bool = False, progress: bool = True, finetune_run: str | Path | None = None,
        models_loaded=None) -> dict:
    """Inpaint, difference, binarize and AND for every image of stage 01; then score.
    `finetune_run`: the run folder holding stage 03 (default: cfg's run folder; stage 05 passes
    the real run when it refines the synthetic images, with `models_loaded` = (m, m') it already
    holds, loaded from that run)."""
    finetune_run = Path(finetune_run or cfg.run_dir)
    if finetune_run != Path(cfg.run_dir):
        require_stage(cfg, "03", "stage 04 (refinement)", run_dir=finetune_run)
    rcfg = cfg.refinement
    out_dir, force = open_stage(cfg, "04", force, inputs=("02", "03") if finetune_run == Path(cfg.run_dir) else ("02",))
    from fgbg_utils.training.finetune import load_finetuned

    if models_loaded is None:
        base = models.load_ldm(cfg.model.path, cfg.model.revision, cfg.device, cfg.dtype, config=cfg.model.config)
        models_loaded = (base, load_finetuned(base, finetune_run / STAGE03))
    base, tuned = models_loaded
    pipe = make_inpaint_pipeline(tuned)
    summary01 = read_json(Path(cfg.run_dir) / STAGE01 / "summary.json")
    records = {r.id: r for r in load_dataset(cfg)[0]}
    ids = [i for i in summary01["images"] if force or not out_path(cfg, "refined", i).exists()]
    info_path = out_dir / "gmm.json"
    gmm = read_json(info_path) if info_path.exists() and not force else {}
    bar = tqdm(total=len(ids), desc="04 refinement", unit="img", disable=not progress or not ids)
    for start in range(0, len(ids), rcfg.batch_size):
        group = ids[start:start + rcfg.batch_size]
        gmm.update(_refine_group(cfg, base, tuned, pipe, [records[i] for i in group]))
        atomic_write_json(info_path, gmm)
        bar.update(len(group))
    bar.close()
    result = evaluate(cfg, summary01, records)
    atomic_write_json(metrics_path(cfg, "04"), result)
    update_stage(cfg, "04", complete=True)
    return result


def _refine_group(cfg, base, tuned, pipe, group) -> dict:
    rcfg = cfg.refinement
    R, f = base.resolution, base.vae_factor
    canv, frames = zip(*(image_to_canvas(load_image(r.image), R, f) for r in group))
    x = torch.from_numpy(np.stack(canv))
    m_pre = np.stack([load_mpre(cfg, r.id) for r in group])
    guided = rcfg.guidance_scale > 1
    x_hat = inpaint_background(
        tuned, x, m_pre, cfg.background_prompt,
        negative_prompt=(cfg.prompt.replace("{object}", cfg.object) if guided else None),
        guidance_scale=rcfg.guidance_scale, steps=rcfg.steps,
        seeds=[seeds.derive_seed(cfg.seed, "04-inpaint", r.id) for r in group],
        batch_size=len(group), pipe=pipe)
    x_ref = vae_roundtrip(base, x) if rcfg.reference == "roundtrip" else (x.permute(0, 2, 3, 1).numpy() + 1) / 2
    info = {}
    for i, (r, frame) in enumerate(zip(group, frames)):
        valid = frame.valid(1)
        up = upsample_mask(m_pre[i], f) & valid
        diff = difference_map(x_ref[i], x_hat[i]) * valid
        refined, inf = refine_mask(up, diff, valid, rcfg.gmm_seed, rcfg.orphan_filter)
        refined = optional_postprocess(refined, rcfg.postprocess) & up
        crop = m_crop_fill(x_ref[i], up, valid)
        m_crop, _ = refine_mask(up, difference_map(x_ref[i], crop) * valid, valid, rcfg.gmm_seed,
                                rcfg.orphan_filter)
        atomic_save_png(out_path(cfg, "background", r.id), (x_hat[i] * 255).round().astype(np.uint8))
        atomic_save_png(out_path(cfg, "difference", r.id), (np.clip(diff, 0, 1) * 255).astype(np.uint8))
        atomic_save_png(out_path(cfg, "m_crop", r.id), m_crop)
        atomic_save_png(out_path(cfg, "refined", r.id), refined)  # last: marks the image done
        info[r.id] = inf
    return info


def evaluate(cfg: dict, summary01: dict, records: dict) -> dict:
    """preliminary / refined / m_crop against ground truth on the evaluation split."""
    from fgbg_utils.stages.attention_maps import load_frame

    split = cfg.evaluation.split
    meters = {k: M.SegmentationMeter() for k in ("preliminary", "refined", "m_crop")}
    out = {"split": split, "n_images_total": len(summary01["images"]),
           "refinement": cfg.refinement, "seed": cfg.seed}
    for image_id in summary01["images"]:
        r = records.get(image_id)
        if r is None or r.mask is None or r.split != split:
            continue
        gt = load_mask(r.mask, image=r.image)
        frame = load_frame(cfg, image_id)
        meters["preliminary"].update(canvas_to_original(load_mpre(cfg, image_id), frame, "mask"), gt)
        meters["refined"].update(canvas_to_original(load_refined(cfg, image_id), frame, "mask"), gt)
        meters["m_crop"].update(canvas_to_original(load_refined(cfg, image_id, "m_crop"), frame, "mask"), gt)
    try:
        out.update({k: m.result() for k, m in meters.items()})
    except ValueError:
        out["note"] = f"no images with ground truth in split {split!r}: metrics skipped"
    return out
