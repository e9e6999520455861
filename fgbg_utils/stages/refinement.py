"""Stage 04: refine M_pre by painting the object away with the fine-tuned model m' (METHOD §2.4):
x̂ = m'(z̃₀, y_b) with M_pre repainted, d = mean_RGB |x_ref − x̂|, M = M_pre,up ∧ GMM(d).
The M_crop baseline replaces m' by the largest background strip mirrored over the object. With
`ablation.refine_with_m`, the same refinement with the pretrained m instead of m' (`refined_with_m/`,
`background_with_m/`, for the evaluation split's images only: where it is scored) measures what the
concept-distillation fine-tuning is worth."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from fgbg_utils.core import metrics as M
from fgbg_utils.core.frame import canvas_to_original
from fgbg_utils.core.pipeline import PreliminaryMasks, Refinement
from fgbg_utils.data.datasets import load_image, load_mask
from fgbg_utils.io import atomic_save_png, atomic_write_json, read_json
from fgbg_utils.storage import locked_stage, metrics_path, update_stage
from fgbg_utils.stages.common import Shards, groups, load_pipeline, open_sharded, processed_records
from fgbg_utils.stages.attention_maps import STAGE as STAGE01
from fgbg_utils.stages.binarization import load_mpre

STAGE = "04_refinement"
STAGE03 = "03_finetuning"
OUTPUTS = ("background", "difference", "refined", "m_crop")


def out_path(cfg, kind: str, image_id: str) -> Path:
    return Path(cfg.run_dir) / STAGE / kind / f"{image_id}.png"


def load_refined(cfg, image_id: str, kind: str = "refined") -> np.ndarray:
    from PIL import Image
    return np.asarray(Image.open(out_path(cfg, kind, image_id))) > 127


@locked_stage("04")
def run(cfg, force: bool = False, progress: bool = True, pipe=None) -> dict:
    """Inpaint, difference, binarize and AND for every image of stage 01 (`FgBgPipeline.refine`
    with m'), in fixed groups of `refinement.batch_size` (sharded under accelerate); then score.
    `pipe`: an FgBgPipeline already holding m and this run's m'."""
    shards = Shards()
    out_dir, force = open_sharded(cfg, "04", force, shards)
    pipe = pipe or load_pipeline(cfg, finetuned=True)
    records = {r.id: r for r in processed_records(cfg)}
    batches = groups(list(records), cfg.refinement.batch_size)
    todo = shards.on_main(lambda: [g for g in batches if force or any(
        not out_path(cfg, "refined", i).exists() for i in g)])
    mine = shards.mine(todo)
    bar = shards.bar(sum(map(len, mine)), "04 refinement", "img", progress)
    for group in mine:
        images = [load_image(records[i].image, max_side=pipe.resolution) for i in group]
        m_pre = [load_mpre(cfg, i) for i in group]
        scored = [k for k, i in enumerate(group) if records[i].split == cfg.evaluation.split]
        if cfg.ablation.refine_with_m and scored:  # only where it is scored (evaluation split)
            pick = lambda xs: [xs[k] for k in scored]  # noqa: E731
            save_with_m(cfg, refine_images(cfg, pipe, pick(images), pick(group), pick(m_pre), model="pretrained"))
        save_refinement(cfg, refine_images(cfg, pipe, images, group, m_pre))
        bar.update(len(group))
    bar.close()
    shards.wait()
    if not shards.is_main:
        return {}
    gmm = {i: read_json(info_path(cfg, i)) for i in records}
    atomic_write_json(out_dir / "gmm.json", gmm)
    summary01 = read_json(Path(cfg.run_dir) / STAGE01 / "summary.json")
    result = evaluate(cfg, summary01, records)
    atomic_write_json(metrics_path(cfg, "04"), result)
    update_stage(cfg, "04", complete=True)
    return result


def refine_images(cfg, pipe, images, ids, m_pre, model: str = "finetuned") -> Refinement:
    """`FgBgPipeline.refine` with the run's settings on images whose M_pre is known (with m',
    or with the pretrained m for the ablation)."""
    _, frames = pipe.canvases(images)
    masks = PreliminaryMasks(masks=np.stack(m_pre), thresholds=[None] * len(ids),
                             means=[None] * len(ids), fg_fraction=[float(m.mean()) for m in m_pre],
                             degenerate=[False] * len(ids), frames=frames, ids=list(ids),
                             prompt=cfg.resolved_prompt, vae_factor=pipe.ldm.vae_factor)
    return pipe.refine(images, masks, seed=cfg.seed, prompt_b=cfg.background_prompt, model=model,
                       **cfg.refinement.model_dump())


def info_path(cfg, image_id: str) -> Path:
    return Path(cfg.run_dir) / STAGE / "gmm" / f"{image_id}.json"


def save_refinement(cfg, res: Refinement) -> None:
    """x̂, d, M_crop, the GMM info and M per image (M last: it marks the image done)."""
    for k, image_id in enumerate(res.ids):
        atomic_save_png(out_path(cfg, "background", image_id),
                        (res.backgrounds[k] * 255).round().astype(np.uint8))
        atomic_save_png(out_path(cfg, "difference", image_id),
                        (np.clip(res.differences[k], 0, 1) * 255).astype(np.uint8))
        atomic_save_png(out_path(cfg, "m_crop", image_id), res.m_crop[k])
        atomic_write_json(info_path(cfg, image_id), res.info[k])
        atomic_save_png(out_path(cfg, "refined", image_id), res.masks[k])


def save_with_m(cfg, res: Refinement) -> None:
    """The ablation's x̂ and M, painted by the pretrained m (written before M of m' marks the image done)."""
    for k, image_id in enumerate(res.ids):
        atomic_save_png(out_path(cfg, "background_with_m", image_id),
                        (res.backgrounds[k] * 255).round().astype(np.uint8))
        atomic_save_png(out_path(cfg, "refined_with_m", image_id), res.masks[k])


def evaluate(cfg, summary01: dict, records: dict) -> dict:
    """preliminary / refined / m_crop against ground truth on the evaluation split."""
    from fgbg_utils.stages.attention_maps import load_frame

    split = cfg.evaluation.split
    kinds = ("preliminary", "refined", "m_crop") + (("refined_with_m",) if cfg.ablation.refine_with_m else ())
    meters = {k: M.SegmentationMeter() for k in kinds}
    out = {"split": split, "n_images_total": len(summary01["images"]),
           "refinement": cfg.refinement, "seed": cfg.seed,
           "refined_with_m_note": "M painted by the pretrained m instead of m' (ablation.refine_with_m)"
           if cfg.ablation.refine_with_m else "ablation.refine_with_m is off"}
    for image_id in summary01["images"]:
        r = records.get(image_id)
        if r is None or r.mask is None or r.split != split:
            continue
        gt = load_mask(r.mask, image=r.image)
        frame = load_frame(cfg, image_id)
        meters["preliminary"].update(canvas_to_original(load_mpre(cfg, image_id), frame, "mask"), gt)
        meters["refined"].update(canvas_to_original(load_refined(cfg, image_id), frame, "mask"), gt)
        for kind in kinds[2:]:
            meters[kind].update(canvas_to_original(load_refined(cfg, image_id, kind), frame, "mask"), gt)
    try:
        out.update({k: m.result() for k, m in meters.items()})
    except ValueError:
        out["note"] = f"no images with ground truth in split {split!r}: metrics skipped"
    return out
