"""Stage 03: concept-distillation fine-tuning m -> m' (docs/method.md §2.3) on the training split, with
the background rectangles chosen from M_pre of stage 02."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from fgbg_utils.core import models
from fgbg_utils.stages.common import Shards, open_sharded, processed_records
from fgbg_utils.data.datasets import load_image
from fgbg_utils.training.config import FinetuneSettings
from fgbg_utils.training.finetune import FinetuneConfig, train
from fgbg_utils.core.frame import image_to_canvas
from fgbg_utils.runs.params import resolved_prompt
from fgbg_utils.core import seeds
from fgbg_utils.io import atomic_save_npz, atomic_write_json, read_json
from fgbg_utils.storage import locked_stage, metrics_path, update_stage
from fgbg_utils.stages.binarization import load_mpre

STAGE = "03_finetuning"


def finetune_config(cfg) -> FinetuneConfig:
    """The trainer's config: the `finetune` section's settings, the seed and the two prompts."""
    return FinetuneConfig(**cfg.finetune.model_dump(include=set(FinetuneSettings.model_fields)),
                          seed=cfg.seed, prompt_full=resolved_prompt(cfg),
                          prompt_background=cfg.background_prompt)


def training_items(cfg, ldm) -> list:
    """(canvas, M_pre, valid latent grid) for every training image."""
    records = processed_records(cfg)
    items = []
    for r in records:
        if r.split != "train":
            continue
        canvas, frame = image_to_canvas(load_image(r.image), ldm.resolution, ldm.vae_factor)
        items.append((canvas, load_mpre(cfg, r.id), frame.valid(ldm.vae_factor)))
    if not items:
        raise ValueError("stage 03 found no images in the train split; add `train` to "
                         "`dataset.splits` (fine-tuning uses the training images).")
    return items


@locked_stage("03")
def run(cfg, force: bool = False, progress: bool = True, evaluate: bool = True) -> dict:
    """Fine-tune (finished training is reused), then the object-absence check of the samples
    (`evaluate`; reused when done). Stages 04 and 05 need only the training, so the runner
    marks the stage done after it and evaluates in parallel with them."""
    fcfg = finetune_config(cfg)  # validates max_train_steps & co. before any work
    shards = Shards()
    out, force = open_sharded(cfg, "03", force, shards)
    if force and shards.is_main:
        for sub in ("checkpoints", "unet", "lora"):
            shutil.rmtree(out / sub, ignore_errors=True)
        for name in ("fgbg_finetune.json", "samples.npz", "presence_scores.json"):
            (out / name).unlink(missing_ok=True)
        metrics_path(cfg, "03").unlink(missing_ok=True)
    shards.wait()
    ldm = models.load_ldm(cfg.model.path, cfg.model.revision, cfg.device, "float32", config=cfg.model.config,
                          max_sequence_length=cfg.model.max_sequence_length)
    items = training_items(cfg, ldm)
    summary = finished_training(out, fcfg) or train(ldm, items, fcfg, out, resume=True, progress=progress)
    from accelerate import PartialState
    if not PartialState().is_main_process:  # under `accelerate launch`: rank 0 evaluates
        return {"training": summary}
    result = {"training": {k: summary.get(k) for k in ("mode", "steps_done", "max_train_steps",
                                                       "kinds", "empty_fraction", "seconds",
                                                       "loss_norm", "loss_curve")}}
    before = read_json(metrics_path(cfg, "03")) if metrics_path(cfg, "03").exists() else {}
    if cfg.finetune.eval_samples > 0 and "object_absent" in before and (out / "samples.npz").exists():
        result["object_absent"] = before["object_absent"]
    elif cfg.finetune.eval_samples > 0 and evaluate:
        result["object_absent"] = evaluate_samples(cfg, ldm, items, out)
    atomic_write_json(metrics_path(cfg, "03"), result)
    update_stage(cfg, "03", complete=True)
    return result


def finished_training(out: Path, fcfg: FinetuneConfig) -> dict | None:
    """The summary of a training already run to its last step and exported, else None (the run
    folder's fingerprint guarantees it was made with these parameters and code)."""
    meta = out / "fgbg_finetune.json"
    if not meta.exists() or not (out / ("unet" if fcfg.mode == "full" else "lora")).is_dir():
        return None
    summary = read_json(meta)
    return summary if summary.get("steps_done") == fcfg.max_train_steps else None


def evaluate_samples(cfg, base, items, out: Path) -> dict:
    """y_f and y_b samples of m and m' (same seeds), and the share of y_b samples with no object.

    Object presence is label-free: the peak of the pretrained model's raw attention to the object
    word (stage 01's M̂ before normalisation). The threshold is the 5th percentile of that score
    on the real training images, which all contain the object; a sample scoring below it counts
    as object-free."""
    from fgbg_utils.training.finetune import load_finetuned
    from fgbg_utils.core.sampling import presence_scores, sample_images

    fc = cfg.finetune
    tuned = load_finetuned(base, out)
    seed_list = [seeds.derive_seed(cfg.seed, "03-samples", str(i)) for i in range(fc.eval_samples)]
    y_f, y_b = resolved_prompt(cfg), cfg.background_prompt
    words = [cfg.object, *cfg.parts]
    # y_f and y_b plainly (s = 1), and y_b contrasted against y_f (negative prompt, s > 1), the
    # paper's way of sampling object-free backgrounds
    settings = {"y_f": (y_f, None, 1.0), "y_b": (y_b, None, 1.0),
                "y_b_vs_y_f": (y_b, y_f, fc.eval_guidance)}
    samples = {f"{who}_{name}": sample_images(model, p, seed_list, fc.eval_steps, s, neg)
               for who, model in (("base", base), ("tuned", tuned))
               for name, (p, neg, s) in settings.items()}
    atomic_save_npz(out / "samples.npz", **{k: (v * 255).round().astype(np.uint8) for k, v in samples.items()})
    real = np.stack([(c.transpose(1, 2, 0) + 1) / 2 for c, _, _ in items]).astype(np.float32)
    score = lambda x: presence_scores(base, x, y_f, words, cfg.T0, cfg.seed,
                                      cfg.attention.grid_steps, cfg.attention.batch_rows)
    real_scores = score(real)
    tau = float(np.percentile(real_scores, 5))
    scores = {k: score(v) for k, v in samples.items()}
    atomic_write_json(out / "presence_scores.json", {"real": real_scores.tolist(), "threshold": tau,
                                                     **{k: v.tolist() for k, v in scores.items()}})
    return {"threshold": tau, "n_samples": len(seed_list), "n_real": len(real_scores),
            "contrast_guidance": fc.eval_guidance,
            "calibration": "5th percentile of the presence score on the real training images",
            **{f"share_object_free_{k}": float((v < tau).mean()) for k, v in scores.items()},
            **{f"auc_real_vs_{k}": _auc(real_scores, v) for k, v in scores.items()}}


def _auc(pos: np.ndarray, neg: np.ndarray) -> float:
    """P(score of a real object image > score of a sample), ties half (Mann-Whitney)."""
    diff = pos[:, None] - neg[None, :]
    return float((diff > 0).mean() + 0.5 * (diff == 0).mean())
