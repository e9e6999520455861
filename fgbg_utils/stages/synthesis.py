"""Stage 05: synthetic image/mask pairs D'_s from the fine-tuned model m' (METHOD §2.5).

1. Sample D' with concept guidance ε̂ = ε(y_b) + s·(ε(y_f) − ε(y_b)) (`synthesis.sample_guided`).
2. Repeat the pipeline on D': stage 01 with the *pretrained* m, stage 02, stage 04 with m'. It runs
   in the sub-run folder `DIR/05_synthesis/pipeline/` with the same code as the real images.
3. Export D'_s in the folder-dataset layout of real data (`dataset/images/<id>.png`,
   `dataset/masks/<id>.png`, `dataset/split.csv`), plus D'_f (RGBA cut-outs, `foregrounds/`) and
   D'_b (the object-removed inpaintings, `backgrounds/`).
4. Pure backgrounds with y_b (`pure_backgrounds/`) and the guidance sweep of Fig. 8.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from fgbg_utils.core import models, seeds
from fgbg_utils.io import (atomic_save_npz, atomic_save_png, atomic_write_json, atomic_write_text, read_json)
from fgbg_utils.runs.params import resolved_prompt
from fgbg_utils.runs.run_folder import StageError, locked_stage, metrics_path, open_stage, update_stage

STAGE = "05_synthesis"
STAGE02, STAGE03, STAGE04 = "02_binarization", "03_finetuning", "04_refinement"


def stage_root(cfg: dict) -> Path:
    return Path(cfg.run_dir) / STAGE


def synthetic_ids(n: int) -> list[str]:
    return [f"syn-{i:05d}" for i in range(n)]


def n_images(cfg: dict) -> int:
    """synthesis.n_images, or the size of the training split when it is null [METHOD §2.5, I]."""
    n = cfg.synthesis.n_images
    if n is not None:
        return n
    from fgbg_utils.data.loader import load_dataset
    return sum(r.split == "train" for r in load_dataset(cfg)[0])


def bytes_per_image(resolution: int, latent: int) -> int:
    """Upper bound of the outputs kept per synthetic image (raw, before PNG/npz compression): the
    image, D'_b, the RGBA cut-out, five masks/maps at image size and stage 01's M̂ arrays."""
    r2 = resolution * resolution
    return r2 * (3 + 3 + 4 + 5) + latent * latent * 4 * 4


def check_disk_budget(cfg: dict, n: int, resolution: int, latent: int) -> dict:
    """Refuse up front when n synthetic images would exceed synthesis.disk_budget_gb or the free
    space of the run folder's disk."""
    need = n * bytes_per_image(resolution, latent) + cfg.synthesis.background_images * resolution ** 2 * 3
    budget = cfg.synthesis.disk_budget_gb * 1024 ** 3
    root = Path(cfg.run_dir)
    root.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(root).free
    gb = lambda b: f"{b / 1024 ** 3:.2f} GB"
    if need > budget:
        raise StageError(f"synthesis.n_images={n} needs up to {gb(need)} at {resolution} px "
                         f"({bytes_per_image(resolution, latent) / 1024 ** 2:.1f} MB per image), over "
                         f"synthesis.disk_budget_gb={cfg.synthesis.disk_budget_gb}. Lower "
                         f"synthesis.n_images or raise synthesis.disk_budget_gb.")
    if need > free:
        raise StageError(f"synthesis.n_images={n} needs up to {gb(need)} but only {gb(free)} are free "
                         f"on the disk of {root}. Free space, lower synthesis.n_images, or use "
                         f"another --out run folder.")
    return {"estimated_bytes": need, "budget_bytes": budget, "free_bytes": free}


def pipeline_cfg(cfg: dict) -> dict:
    """The parameters of the pipeline rerun on D': same method settings, D' as an unlabelled
    folder dataset (train split only), outputs in DIR/05_synthesis/pipeline."""
    c = cfg.model_copy(deep=True)
    c.run_dir = str(stage_root(cfg) / "pipeline")
    c.dataset = c.dataset.model_copy(update=dict(kind="folder", root=str(stage_root(cfg) / "dataset"), splits=["train"],
                        limit=None, ground_truth=False, on_corrupt="error"))
    c.attention = c.attention.model_copy(update=dict(sweep=False, keep_per_layer=False))  # only M̂ is needed
    return c


@locked_stage("05")
def run(cfg, force: bool = False, progress: bool = True) -> dict:
    """Sample D', run stages 01/02/04 on it, export D'_s, D'_f, D'_b; backgrounds and the sweep."""
    from fgbg_utils.training.finetune import load_finetuned

    scfg = cfg.synthesis
    n = n_images(cfg)
    base = models.load_ldm(cfg.model.path, cfg.model.revision, cfg.device, cfg.dtype, config=cfg.model.config)
    disk = check_disk_budget(cfg, n, base.resolution, base.latent_size)
    root, force = open_stage(cfg, "05", force, extra={"n_images": n})
    if force:
        for sub in ("dataset", "pipeline", "foregrounds", "backgrounds", "pure_backgrounds"):
            shutil.rmtree(root / sub, ignore_errors=True)
    tuned = load_finetuned(base, Path(cfg.run_dir) / STAGE03)
    y_f, y_b = resolved_prompt(cfg), cfg.background_prompt
    ids = synthetic_ids(n)
    _sample_missing(cfg, tuned, root / "dataset" / "images", ids, y_f, y_b, scfg.guidance,
                    "05-synthesis", progress, "05 D'")
    _write_split(root / "dataset", ids)
    bg_ids = [f"bg-{i:05d}" for i in range(scfg.background_images)]
    _sample_missing(cfg, tuned, root / "pure_backgrounds", bg_ids, y_f, y_b,
                    scfg.background_guidance, "05-background", progress, "05 backgrounds")
    sweep_path = root / "guidance_sweep.npz"
    if not sweep_path.exists():
        _write_sweep(cfg, tuned, sweep_path, y_f, y_b)
    summary = {}
    if ids:
        summary = _run_pipeline(cfg, progress, base, tuned)
        _export(cfg, ids, progress)
    result = {"n_images": n, "guidance": scfg.guidance, "steps": scfg.steps,
              "n_pure_backgrounds": len(bg_ids), "background_guidance": scfg.background_guidance,
              "seed": cfg.seed, "disk": disk, **summary}
    atomic_write_json(metrics_path(cfg, "05"), result)
    update_stage(cfg, "05", complete=True)
    return result


def _sample_missing(cfg, ldm, folder: Path, ids, y_f, y_b, s, stream: str, progress, desc) -> None:
    """Sample the images of `ids` not yet in `folder` (one PNG each, written atomically). Batches
    are fixed slices of `ids`, and a batch with any missing image is sampled whole, so a resumed
    run computes every image in the same batch as the first run: the same images, bit for bit."""
    from tqdm.auto import tqdm

    from fgbg_utils.core.synthesis import sample_guided

    bs = cfg.synthesis.batch_size
    chunks = [ids[k:k + bs] for k in range(0, len(ids), bs)]
    chunks = [c for c in chunks if any(not (folder / f"{i}.png").exists() for i in c)]
    bar = tqdm(total=sum(map(len, chunks)), desc=desc, unit="img", disable=not progress or not chunks)
    for chunk in chunks:
        images, _ = sample_guided(ldm, y_f, y_b, s, [seeds.derive_seed(cfg.seed, stream, i) for i in chunk],
                                  steps=cfg.synthesis.steps, batch_size=bs)
        for i, img in zip(chunk, images):
            if not (folder / f"{i}.png").exists():
                atomic_save_png(folder / f"{i}.png", (img * 255).round().astype(np.uint8))
        bar.update(len(chunk))
    bar.close()


def _write_split(root: Path, ids) -> None:
    atomic_write_text(root / "split.csv", "id,split\n" + "".join(f"{i},train\n" for i in ids))


def _write_sweep(cfg, ldm, path: Path, y_f, y_b) -> None:
    from fgbg_utils.core.synthesis import guidance_sweep

    scfg = cfg.synthesis
    scales = [float(v) for v in scfg.sweep_scales]
    rows = [guidance_sweep(ldm, y_f, y_b, scales, seeds.derive_seed(cfg.seed, "05-sweep", str(k)),
                           steps=scfg.steps, batch_size=scfg.batch_size)
            for k in range(scfg.sweep_seeds)]
    images = (np.stack(rows) * 255).round().astype(np.uint8) if rows else np.zeros((0, 0), np.uint8)
    atomic_save_npz(path, images=images, scales=np.asarray(scales, np.float32))


def _run_pipeline(cfg: dict, progress: bool, base, tuned) -> dict:
    """Stages 01, 02, 04 on D' with the models already loaded (each stage resumes by itself; a
    finished one is not rerun)."""
    from fgbg_utils.stages import attention_maps as stage_attention, binarization as stage_binarization, refinement as stage_refinement

    pcfg = pipeline_cfg(cfg)
    if not _complete(pcfg, stage_attention.STAGE):
        stage_attention.run(pcfg, progress=progress, ldm=base)
    if not _complete(pcfg, stage_binarization.STAGE):
        stage_binarization.run(pcfg, progress=progress)
    if not _complete(pcfg, STAGE04):
        stage_refinement.run(pcfg, progress=progress, finetune_run=cfg.run_dir,
                             models_loaded=(base, tuned))
    gmm = read_json(Path(pcfg["run_dir"]) / STAGE02 / "gmm.json")
    return {"degenerate_m_pre": sorted(k for k, v in gmm.items() if v.get("degenerate"))}


def _complete(cfg: dict, stage: str) -> bool:
    path = Path(cfg.run_dir) / stage / "stage.json"
    return path.exists() and bool(read_json(path).get("complete"))


def _export(cfg: dict, ids, progress: bool) -> None:
    """D'_m = M' in the real layout (masks/<id>.png, image size), D'_f = RGBA cut-outs, D'_b."""
    from PIL import Image
    from tqdm.auto import tqdm

    from fgbg_utils.stages.attention_maps import load_frame
    from fgbg_utils.core.frame import canvas_to_original
    from fgbg_utils.stages.refinement import load_refined, out_path

    pcfg = pipeline_cfg(cfg)
    root = stage_root(cfg)
    for i in tqdm(ids, desc="05 export", unit="img", disable=not progress):
        if (root / "backgrounds" / f"{i}.png").exists():
            continue
        image = np.asarray(Image.open(root / "dataset" / "images" / f"{i}.png").convert("RGB"))
        frame = load_frame(pcfg, i)
        mask = canvas_to_original(load_refined(pcfg, i), frame, "mask")
        rgba = np.concatenate([image, (mask * 255).astype(np.uint8)[..., None]], axis=2)
        background = np.asarray(Image.open(out_path(pcfg, "background", i)).convert("RGB"))
        atomic_save_png(root / "dataset" / "masks" / f"{i}.png", mask)
        atomic_save_png(root / "foregrounds" / f"{i}.png", rgba)
        atomic_save_png(root / "backgrounds" / f"{i}.png", background)  # last: marks the id done


def load_pairs(cfg: dict):
    """D'_s as (images, bool masks) at image size, read back through the folder-dataset loader;
    lazy sequences (each item is read when accessed)."""
    from fgbg_utils.data.datasets import load_image, load_mask, load_records
    from fgbg_utils.data.lazy import LazySequence

    records = load_records("folder", stage_root(cfg) / "dataset")
    missing = [r.id for r in records if r.mask is None]
    if missing:
        raise StageError(f"{len(missing)} synthetic image(s) have no mask yet, e.g. {missing[:3]}; "
                         f"rerun stage 05 to finish them.")
    return (LazySequence(records, lambda r: load_image(r.image)),
            LazySequence(records, lambda r: load_mask(r.mask)))
