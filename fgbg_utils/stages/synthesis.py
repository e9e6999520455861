"""Stage 05: synthetic image/mask pairs D'_s from the fine-tuned model m' (METHOD §2.5).

1. Sample D' with concept guidance ε̂ = ε(y_b) + s·(ε(y_f) − ε(y_b)) (`synthesis.sample_guided`).
2. Repeat the pipeline on D', in memory: attention maps with the *pretrained* m, the GMM, and the
   refinement with m' (`FgBgPipeline`, the same code and settings as stages 01, 02 and 04).
3. Export D'_s in the folder-dataset layout of real data (`dataset/images/<id>.png`,
   `dataset/masks/<id>.png`, `dataset/split.csv`), plus D'_f (RGBA cut-outs, `foregrounds/`) and
   D'_b (the object-removed inpaintings, `backgrounds/`).
4. Pure backgrounds with y_b (`pure_backgrounds/`) and the guidance sweep of Fig. 8.
5. FID of D' against the real training images (Table 3, Fig. 8): `synthesis.fid_images` samples
   at each s of `synthesis.fid_scales` (`fid/s_<s>/`, the same seeds at every s; the run's own s
   uses the first images of D', or its own `fid/s_<s>/` when D' has fewer), and the floor between
   two halves of the real images (core/fid.py; the feature network is `synthesis.fid_features`).
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np

from fgbg_utils.core import seeds
from fgbg_utils.io import atomic_save_npz, atomic_save_png, atomic_write_json, atomic_write_text
from fgbg_utils.runs.params import resolved_prompt
from fgbg_utils.storage import StageError, locked_stage, metrics_path, update_stage
from fgbg_utils.stages.common import Shards, groups, load_pipeline, open_sharded

STAGE = "05_synthesis"


def stage_root(cfg) -> Path:
    return Path(cfg.run_dir) / STAGE


def synthetic_ids(n: int) -> list[str]:
    return [f"syn-{i:05d}" for i in range(n)]


def n_images(cfg) -> int:
    """synthesis.n_images, or the size of the training split when it is null [METHOD §2.5, I]."""
    n = cfg.synthesis.n_images
    if n is not None:
        return n
    from fgbg_utils.data.loader import load_dataset
    return sum(r.split == "train" for r in load_dataset(cfg, check=False)[0])


def bytes_per_image(resolution: int, latent: int) -> int:
    """Upper bound of the outputs kept per synthetic image (raw, before PNG/npz compression): the
    image, D'_b, the RGBA cut-out, five masks/maps at image size and stage 01's M̂ arrays."""
    r2 = resolution * resolution
    return r2 * (3 + 3 + 4 + 5) + latent * latent * 4 * 4


def check_disk_budget(cfg, n: int, resolution: int, latent: int) -> dict:
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


@locked_stage("05")
def run(cfg, force: bool = False, progress: bool = True, pipe=None) -> dict:
    """Sample D', run the pipeline on it in memory, export D'_s, D'_f, D'_b; backgrounds and the
    sweep. Sampling and the pipeline go in fixed batches, sharded under accelerate.
    `pipe`: an FgBgPipeline already holding m and this run's m'."""
    shards = Shards()
    scfg = cfg.synthesis
    n = shards.on_main(lambda: n_images(cfg))
    pipe = pipe or load_pipeline(cfg)  # m first: the disk budget is checked before anything is written
    disk = shards.on_main(lambda: check_disk_budget(cfg, n, pipe.resolution, pipe.ldm.latent_size))
    shards.on_main(lambda: fid_features(cfg))  # a missing FID network is refused before any work
    root, force = open_sharded(cfg, "05", force, shards)
    if pipe.tuned is None:
        pipe = pipe.with_finetuned(Path(cfg.run_dir) / "03_finetuning")
    if force and shards.is_main:
        for sub in ("dataset", "foregrounds", "backgrounds", "pure_backgrounds", "fid"):
            shutil.rmtree(root / sub, ignore_errors=True)
    shards.wait()
    y_f, y_b = resolved_prompt(cfg), cfg.background_prompt
    ids = synthetic_ids(n)
    _sample_missing(cfg, pipe.tuned, root / "dataset" / "images", ids, y_f, y_b, scfg.guidance,
                    "05-synthesis", progress, "05 D'", shards)
    bg_ids = [f"bg-{i:05d}" for i in range(scfg.background_images)]
    _sample_missing(cfg, pipe.tuned, root / "pure_backgrounds", bg_ids, y_f, y_b,
                    scfg.background_guidance, "05-background", progress, "05 backgrounds", shards)
    shards.wait()
    degenerate = _masks_of_synthetic(cfg, pipe, ids, progress, shards)
    t_fid = time.time()
    for s, folder in fid_folders(cfg, n).items():
        _sample_missing(cfg, pipe.tuned, folder, fid_ids(cfg), y_f, y_b, s, "05-fid", progress,
                        f"05 FID s={s:g}", shards)
    shards.wait()
    if not shards.is_main:
        return {}
    _write_split(root / "dataset", ids)
    sweep_path = root / "guidance_sweep.npz"
    if not sweep_path.exists():
        _write_sweep(cfg, pipe.tuned, sweep_path, y_f, y_b)
    result = {"n_images": n, "guidance": scfg.guidance, "steps": scfg.steps,
              "n_pure_backgrounds": len(bg_ids), "background_guidance": scfg.background_guidance,
              "seed": cfg.seed, "disk": disk, "degenerate_m_pre": degenerate}
    if scfg.fid_features is not None:
        result.update(fid_metrics(cfg, ids, pipe.resolution))
        result["fid_seconds"] = round(time.time() - t_fid, 1)
    atomic_write_json(metrics_path(cfg, "05"), result)
    update_stage(cfg, "05", complete=True)
    return result


def _sample_missing(cfg, ldm, folder: Path, ids, y_f, y_b, s, stream: str, progress, desc,
                    shards) -> None:
    """Sample the images of `ids` not yet in `folder` (one PNG each, written atomically). Batches
    are fixed slices of `ids`, and a batch with any missing image is sampled whole, so a resumed
    or sharded run computes every image in the same batch as the first run: the same bits."""
    from fgbg_utils.core.synthesis import sample_guided

    bs = cfg.synthesis.batch_size
    chunks = shards.on_main(lambda: [c for c in groups(ids, bs)
                                     if any(not (folder / f"{i}.png").exists() for i in c)])
    chunks = shards.mine(chunks)
    bar = shards.bar(sum(map(len, chunks)), desc, "img", progress and bool(chunks))
    for chunk in chunks:
        images, _ = sample_guided(ldm, y_f, y_b, s, [seeds.derive_seed(cfg.seed, stream, i) for i in chunk],
                                  steps=cfg.synthesis.steps, batch_size=bs)
        for i, img in zip(chunk, images):
            if not (folder / f"{i}.png").exists():
                atomic_save_png(folder / f"{i}.png", (img * 255).round().astype(np.uint8))
        bar.update(len(chunk))
    bar.close()


def _masks_of_synthetic(cfg, pipe, ids, progress, shards) -> list[str]:
    """D'_m by the same steps as the real images (M̂ with m, the GMM, refinement with m'), in
    memory, in fixed groups of `refinement.batch_size`; exports D'_m, D'_f and D'_b per image."""
    from fgbg_utils.data.datasets import load_image
    from fgbg_utils.stages.refinement import refine_images

    root = stage_root(cfg)
    todo = shards.on_main(lambda: [g for g in groups(ids, cfg.refinement.batch_size)
                                   if any(not (root / "backgrounds" / f"{i}.png").exists() for i in g)])
    degenerate = []
    mine = shards.mine(todo)
    bar = shards.bar(len(mine), "05 D'_m", "batch", progress and bool(mine))
    for group in mine:
        images = [load_image(root / "dataset" / "images" / f"{i}.png") for i in group]
        maps = pipe.attention_maps(images, cfg.object, cfg.prompt, cfg.parts, cfg.T0, cfg.seed, group,
                                   cfg.attention.grid_steps, cfg.attention.latent,
                                   cfg.attention.batch_rows)
        m_pre = pipe.preliminary_masks(maps, cfg.binarization.gmm_seed, cfg.binarization.orphan_filter)
        degenerate += [i for i, d in zip(group, m_pre.degenerate) if d]
        res = refine_images(cfg, pipe, images, group, list(m_pre.masks))
        for k, i in enumerate(group):
            mask = res.masks_original[k]
            rgba = np.concatenate([images[k], (mask * 255).astype(np.uint8)[..., None]], axis=2)
            background = (res.backgrounds[k] * 255).round().astype(np.uint8)
            background = background[:images[k].shape[0], :images[k].shape[1]]
            atomic_save_png(root / "dataset" / "masks" / f"{i}.png", mask)
            atomic_save_png(root / "foregrounds" / f"{i}.png", rgba)
            atomic_save_png(root / "backgrounds" / f"{i}.png", background)  # last: marks the id done
        bar.update(1)
    bar.close()
    return shards.gather(degenerate)


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


# ----------------------------------------------------------------------------- FID (Table 3, Fig. 8)
def fid_features(cfg):
    """The FID feature module of `synthesis.fid_features` (None when null); a missing or
    unreadable network is a StageError naming the parameter and how to get the file."""
    from fgbg_utils.core.fid import FeatureNetworkError, load_features
    from fgbg_utils.runs.params import resolve_path

    if cfg.synthesis.fid_features is None:
        return None
    try:
        features = load_features(resolve_path(cfg.synthesis.fid_features))
    except FeatureNetworkError as e:
        raise StageError(str(e)) from None
    return features


def fid_warning(cfg, features) -> str | None:
    """Why the FID means little here: the toy world's feature network on other images."""
    from fgbg_utils.core.fid import INCEPTION_URL

    if getattr(features, "toy_world", False) and cfg.dataset.kind != "toy":
        return (f"`synthesis.fid_features`={cfg.synthesis.fid_features} is the toy world's feature "
                f"network; on {cfg.dataset.kind} images its FID means little. Set it to NVIDIA's "
                f"TorchScript Inception-v3 file ({INCEPTION_URL}), or to null to skip the FID.")
    return None


def fid_ids(cfg) -> list[str]:
    return [f"fid-{i:05d}" for i in range(cfg.synthesis.fid_images)]


def fid_scales(cfg) -> list[float]:
    """The guidance scales of the FID sweep: synthesis.fid_scales and the run's own s, sorted."""
    return sorted({float(v) for v in cfg.synthesis.fid_scales} | {float(cfg.synthesis.guidance)})


def fid_folders(cfg, n_dprime: int) -> dict[float, Path]:
    """{s: folder of its FID samples} for the scales that need sampling: not the run's own s when
    D' (n_dprime images) has the fid_images it needs; empty when the FID is off."""
    if cfg.synthesis.fid_features is None:
        return {}
    own = float(cfg.synthesis.guidance) if n_dprime >= cfg.synthesis.fid_images else None
    return {s: stage_root(cfg) / "fid" / f"s_{s:g}" for s in fid_scales(cfg) if s != own}


def fid_metrics(cfg, ids, resolution: int) -> dict:
    """`fid` (s -> FID of fid_images samples against the real training images), `fid_floor`
    (FID between the two halves of the real training images) and the protocol."""
    from fgbg_utils.core.fid import frechet_distance
    from fgbg_utils.data.datasets import load_image
    from fgbg_utils.data.lazy import LazySequence
    from fgbg_utils.runs.params import relative_to_project
    from fgbg_utils.stages.common import processed_records

    features = fid_features(cfg)
    real_records = [r for r in processed_records(cfg) if r.split == "train"]
    real = [load_image(r.image) for r in real_records]
    n, own = cfg.synthesis.fid_images, float(cfg.synthesis.guidance)
    folders = fid_folders(cfg, len(ids))
    fid = {}
    for s in fid_scales(cfg):
        files = ([folders[s] / f"{i}.png" for i in fid_ids(cfg)] if s in folders
                 else [stage_root(cfg) / "dataset" / "images" / f"{i}.png" for i in ids[:n]])
        fid[f"{s:g}"] = round(frechet_distance(real, LazySequence(files, load_image), features, resolution), 4)
    own_images = (f"fid/s_{own:g}/: D' has {len(ids)} images, fewer than fid_images" if own in folders
                  else f"the first {n} images of D'")
    half = len(real) // 2
    floor = frechet_distance(real[:half], real[half:2 * half], features, resolution) if half >= 2 else None
    return {"fid": fid, "fid_floor": None if floor is None else round(floor, 4),
            "fid_protocol": {
                "features": relative_to_project(str(cfg.synthesis.fid_features)),
                "feature_dim": int(features.num_features), "size": resolution,
                "n_real": len(real), "n_generated_per_scale": n,
                "own_scale": own, "own_scale_images": own_images,
                "other_scales_images": "fid/s_<s>/: seeds of stream 05-fid, the same at every s",
                "floor": f"real training images {half} vs {half} (first half vs second half)",
                "resize": "short side to the synthesis resolution (bicubic), centre crop",
                "warning": fid_warning(cfg, features)}}


def load_pairs(cfg):
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
