"""The shipped toy LDM's whole recipe in one call (`python -m fgbg_utils train-toy`, notebook 00).

  phase 1  corpus seed 1000, toy generator v1 (objects fully inside): VAE, then UNet + text encoder
  phase 2  corpus seed 1001, generator v2 (objects may cross the border): the UNet and text encoder
           continue from phase 1 (``init_from``), the VAE is kept; EMA snapshots every 10 minutes
  select   each phase-2 snapshot (and the final weights) runs stages 01-02 on a validation toy
           world (dataset.seed=100, never used for reporting); the best pooled M_pre IoU ships

The defaults are the shipped model's (models/toy-ldm/training_info.json): 20,000 images per
phase, 10 + 20 + 50 minutes of one CPU thread. Minutes plan the step counts from the measured step
time; ``*_steps`` fix them instead (``SHIPPED_STEPS`` are the shipped counts, so the cosine
schedules span the same steps on any machine). See docs/method.md §8.
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from fgbg_utils.io import atomic_write_json
from fgbg_utils.training.toy_training import train_toy_model

VALIDATION = {"dataset.kind": "toy", "dataset.seed": 100, "dataset.n_train": 96, "dataset.n_test": 64,
              "dataset.image_size": 64, "dataset.background_fraction": 0.0, "T0": 40, "seed": 0,
              "evaluation.split": "test"}
# step counts of the shipped model: VAE, phase-1 UNet, phase-2 UNet (planned), phase-2 snapshots
SHIPPED_STEPS = {"vae_steps": 2323, "phase1_steps": 4270, "phase2_steps": 10499,
                 "snapshot_steps": (2153, 4320, 6497, 8693)}
OBJECTS = {1: "fully inside the image", 2: "may cross the border"}
SELECTION_RULE = ("EMA snapshot with the best pooled M_pre IoU (stages 01-02, T0=40) on a "
                  "validation toy world (dataset.seed=100, never used for reporting)")


def validation_iou(model_dir: str | Path, work_dir: str | Path, overrides: dict | None = None) -> dict:
    """Stages 01-02 of ``model_dir`` on the validation world (VALIDATION, test split) in
    ``work_dir``; returns the stage-02 metrics (pooled ``iou``, ``auc_roc`` ...)."""
    from fgbg_utils import load_params
    from fgbg_utils.stages import attention_maps, binarization

    sets = {**VALIDATION, "dataset.splits": ["test"], "attention.sweep": False,
            "attention.keep_per_layer": False, "model.path": str(Path(model_dir).resolve()),
            **(overrides or {})}
    cfg = load_params(None, sets, run_dir=str(work_dir))
    attention_maps.run(cfg, progress=False)
    return binarization.run(cfg, progress=False)


def _candidates(snapshot_dir: Path, final_dir: Path, final_step: int) -> dict[int, Path]:
    found = {int(p.name.split("_")[1]): p for p in sorted(snapshot_dir.glob("step_*")) if p.is_dir()}
    found[final_step] = final_dir
    return dict(sorted(found.items()))


def _install(src: Path, out: Path) -> None:
    """Copy the chosen pipeline folder to ``out`` (atomic rename of a sibling temp folder)."""
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)


def _phase_summary(info: dict, seed: int, generator: int, objects: str) -> dict:
    out = {"corpus_seed": seed, "generator_version": generator, "objects": objects,
           "unet_steps": info["unet"]["steps"], "unet_minutes": round(info["unet"]["seconds"] / 60, 1)}
    if info["vae"]["steps"]:
        out.update(vae_steps=info["vae"]["steps"], vae_minutes=round(info["vae"]["seconds"] / 60, 1))
    return out


def train_toy_recipe(out_dir: str | Path = "models/toy-ldm", work_dir: str | Path = "work_toy", *,
                     n_images: int = 20_000, image_size: int = 64, threads: int = 1,
                     phase1_seed: int = 1000, phase2_seed: int = 1001,
                     vae_minutes: float = 10, phase1_minutes: float = 20, phase2_minutes: float = 50,
                     vae_steps: int | None = None, phase1_steps: int | None = None,
                     phase2_steps: int | None = None, snapshot_minutes: float | None = 10,
                     snapshot_steps=(), init_from: str | Path | None = None,
                     select_on_validation: bool = True, validation: dict | None = None,
                     heldout_images: int = 256, background_fraction: float = 0.15,
                     vae_from: str | Path | None = None, log=print) -> dict:
    """Train phase 1 (unless ``init_from`` names a phase-1 model), phase 2 with snapshots, select
    a snapshot on the validation world (or take the last weights), and write the pipeline and its
    training_info.json to ``out_dir``. ``work_dir`` keeps phase1/, phase2_snapshots/,
    phase2_final/ and validation/. ``validation``: extra parameter overrides of the validation
    run (e.g. fewer images in tests); ``heldout_images``: images of the VAE's PSNR check;
    ``background_fraction`` and ``vae_from``: see ``train_toy_model`` (phase 1 takes ``vae_from``).
    Returns the training_info written."""
    started = time.time()
    out, work = Path(out_dir), Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    common = dict(n_images=n_images, image_size=image_size, threads=threads,
                  heldout_images=heldout_images, background_fraction=background_fraction, log=log)
    if init_from is None:
        log("phase 1: generator v1 (objects fully inside)")
        init_from = work / "phase1"
        train_toy_model(init_from, seed=phase1_seed, vae_minutes=vae_minutes,
                        unet_minutes=phase1_minutes, generator=1, vae_steps=vae_steps,
                        unet_steps=phase1_steps, snapshot_every_s=None, vae_from=vae_from, **common)
    log(f"phase 2: generator v2 (objects may cross the border), continued from {init_from}")
    snaps, final = work / "phase2_snapshots", work / "phase2_final"
    shutil.rmtree(snaps, ignore_errors=True)
    info2 = train_toy_model(final, seed=phase2_seed, vae_minutes=0, unet_minutes=phase2_minutes,
                            init_from=init_from, generator=2, unet_steps=phase2_steps,
                            snapshot_dir=snaps, snapshot_steps=snapshot_steps,
                            snapshot_every_s=None if snapshot_minutes is None else snapshot_minutes * 60,
                            **common)
    candidates = _candidates(snaps, final, info2["unet"]["steps"])
    scores = {}
    if select_on_validation:
        for step, folder in candidates.items():
            res = validation_iou(folder, work / "validation" / f"step_{step:06d}", validation)
            scores[step] = round(float(res["iou"]), 4)
            log(f"validation: step {step} pooled M_pre IoU {scores[step]:.3f}")
        chosen = max(scores, key=lambda s: (scores[s], -s))  # ties: the earlier snapshot
    else:
        chosen = info2["unet"]["steps"]
    chosen_dir = candidates[chosen]
    info = json.loads((chosen_dir / "training_info.json").read_text())
    phase1 = info.get("continued_from") or {}
    info["selection"] = {
        "rule": SELECTION_RULE if select_on_validation else "the last phase-2 EMA weights (no selection)",
        "selected_step": chosen, "phase2_total_steps": info2["unet"]["steps"],
        "phase2_minutes": round(info2["unet"]["seconds"] / 60, 1),
        "phase2_full_curve": info2["unet"]["curve"],
        "validation": {**VALIDATION, **(validation or {})} if select_on_validation else None,
        "validation_iou_by_step_generator_v2": {str(k): v for k, v in scores.items()},
    }
    phases = {}
    if phase1.get("unet"):
        gen = phase1.get("generator_version")  # absent in models trained before it was recorded
        phases["1"] = _phase_summary(phase1, phase1.get("seed"), gen, OBJECTS.get(gen, "unknown"))
    phases["2"] = {**_phase_summary(info, phase2_seed, 2, OBJECTS[2]),
                   "planned_steps": info2["unet"]["steps"]}
    info["phases"] = phases
    minutes = [p.get("vae_minutes", 0) + p["unet_minutes"] for p in phases.values()]
    info["total_minutes"] = round(sum(minutes), 1)  # training time up to the shipped weights
    info["recipe"] = {
        "n_images": n_images, "image_size": image_size, "threads": threads,
        "heldout_images": heldout_images, "background_fraction": background_fraction,
        "vae_from": None if vae_from is None else str(vae_from),
        "phase1": {"seed": phase1_seed, "generator": 1, "vae_minutes": vae_minutes,
                   "unet_minutes": phase1_minutes, "vae_steps": vae_steps, "unet_steps": phase1_steps},
        "phase2": {"seed": phase2_seed, "generator": 2, "unet_minutes": phase2_minutes,
                   "unet_steps": phase2_steps, "snapshot_minutes": snapshot_minutes,
                   "snapshot_steps": sorted(snapshot_steps)},
        "init_from": str(init_from), "select_on_validation": select_on_validation,
        "command": "python -m fgbg_utils train-toy",
    }
    info["wall_minutes"] = round((time.time() - started) / 60, 1)  # the whole recipe, selection too
    _install(chosen_dir, out)
    atomic_write_json(out / "training_info.json", info)
    log(f"shipped step {chosen} of phase 2 to {out} ({info['wall_minutes']} min wall time)")
    return info
