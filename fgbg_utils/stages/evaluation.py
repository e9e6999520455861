"""Stage 06: the evaluation of the paper's Table 2 (docs/method.md §2.6). Segmentation U-Nets trained on
(D, M_pre), D_s = (D, M), D_s ∪ D'_s and, for reference, on ground truth; each is scored on the
held-out split beside the direct masks M_pre, M_crop and M, and beside GrabCut (Table 1's
unsupervised baseline, core/baselines.py; its masks go to predictions/grabcut/). The best label-free U-Net's masks of
every image (the method's product, with or without ground truth) go to masks/<row>/<id>.png."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from fgbg_utils.core import metrics as M
from fgbg_utils.data.loader import load_dataset
from fgbg_utils.stages.common import processed_records
from fgbg_utils.data.datasets import load_ground_truth, load_image
from fgbg_utils.core.frame import canvas_to_original
from fgbg_utils.data.lazy import LazySequence
from fgbg_utils.io import atomic_save_png, atomic_save_safetensors, atomic_write_json, read_json
from fgbg_utils.storage import (StageError, check_inputs, expected, fingerprint, locked_stage,
                                        metrics_path, open_stage, refuse_other_params, stage_dir,
                                        update_stage)
from fgbg_utils.training.config import SegSettings
from fgbg_utils.training.segnet import (SegConfig, build_model, center_crop_pair, member_configs, predict,
                                        predict_center_crop, resolve_device, train_many, train_segnet,
                                        uses_bf16)

STAGE = "06_evaluation"
STAGE02, STAGE04, STAGE05 = "02_binarization", "04_refinement", "05_synthesis"
ROWS = ("grabcut", "M_pre", "M_crop", "unet_M_pre", "M", "unet_D_s", "unet_D_s_plus_synth", "supervised")
PAPER_CUB_IOU = {"grabcut": 36.0, "M_pre": 29.0, "M_crop": 30.7, "unet_M_pre": 66.5, "M": 63.6, "unet_D_s": 75.1,
                 "unet_D_s_plus_synth": 77.2, "supervised": 88.3}
# the upstream stages each U-Net row trains from (its networks can train as soon as they are done)
ROW_INPUTS = {"unet_M_pre": ("02",), "unet_D_s": ("04",), "unet_D_s_plus_synth": ("04", "05"),
              "supervised": ("01",)}
ROW_LABELS = {"grabcut": "GrabCut", "M_pre": "M_pre", "M_crop": "M_crop", "unet_M_pre": "U-Net(D, M_pre)", "M": "M",
              "unet_D_s": "U-Net(D_s)", "unet_D_s_plus_synth": "U-Net(D_s ∪ D'_s)",
              "supervised": "supervised"}


def seg_config(cfg, row: str | None = None, n_train: int | None = None) -> SegConfig:
    """The U-Net config of stage 06 (of `row`: the supervised row may have its own steps and
    ensemble size, `segmentation.supervised_step_factor` / `supervised_ensemble`; with
    `segmentation.steps_for_images`, the steps scale with the n_train training images, down to
    `segmentation.min_steps`)."""
    s = cfg.segmentation
    steps = s.steps
    if s.steps_for_images and n_train:
        steps = max(round(s.steps * n_train / s.steps_for_images), min(s.steps, s.min_steps))
    own = {"steps": max(1, round(steps * (s.supervised_step_factor if row == "supervised" else 1)))}
    if row == "supervised" and s.supervised_ensemble is not None:
        own["ensemble"] = s.supervised_ensemble
    values = {**s.model_dump(include=set(SegSettings.model_fields)), **own}
    return SegConfig(**values, device=cfg.device, log_every=max(1, values["steps"] // 4))


def _splits(cfg, records=None):
    """(train, test) records; the evaluation split must have images."""
    records = processed_records(cfg) if records is None else records
    split = cfg.evaluation.split
    test = [r for r in records if r.split == split]
    train = [r for r in records if r.split == "train"]
    if not test:
        raise StageError(f"the evaluation split `evaluation.split`={split!r} has no images. Add it to "
                         f"`dataset.splits`, give the dataset {split} images (split.csv, or "
                         f"dataset.test_fraction > 0), or set evaluation.split.")
    if not train:
        raise StageError("stage 06 found no training images; add `train` to `dataset.splits`.")
    return train, test


def stage_inputs(cfg) -> tuple[str, ...]:
    """The stages stage 06 reads: 05 only for the U-Net on D_s ∪ D'_s."""
    return ("02", "04", "05") if "unet_D_s_plus_synth" in cfg.segmentation.rows else ("02", "04")


@locked_stage("06")
def run(cfg, force: bool = False, progress: bool = True, log=print) -> dict:
    """Train the requested U-Nets (a network trained from the same inputs, parameters and code is
    loaded, not retrained) and score all rows. `force` replaces outputs made with other parameters."""
    rows = list(cfg.segmentation.rows)
    _splits(cfg, load_dataset(cfg, check=False)[0])  # an empty split is refused before any work
    out, recompute = open_stage(cfg, "06", force, inputs=stage_inputs(cfg))
    train, test = _splits(cfg)
    if recompute:
        import shutil
        for sub in ("predictions", "masks"):
            shutil.rmtree(out / sub, ignore_errors=True)
    gt_test, skipped_test = load_ground_truth(test)
    frames = frames_of(cfg, [r.id for r in test])
    by_id = {r.id: r for r in train + test}
    image_of = lambda i: load_image(by_id[i].image)  # noqa: E731 (images are loaded when used)
    result = {"split": cfg.evaluation.split, "n_train": len(train), "n_test": len(test),
              "n_test_scored": len(gt_test), "protocol": cfg.segmentation.protocol,
              "test_without_ground_truth": [{"id": i, "reason": why} for i, why in skipped_test],
              "paper_cub_iou": PAPER_CUB_IOU, "segmentation": cfg.segmentation,
              "seed": cfg.seed, "rows": {}, "training": {}, "skipped_rows": {}}
    if skipped_test:
        log(f"stage 06: {len(skipped_test)} test image(s) have no usable ground truth and are not "
            f"scored: {', '.join(i for i, _ in skipped_test[:10])}{' …' if len(skipped_test) > 10 else ''}")
    scorer = _Scorer(cfg, gt_test, image_of)
    direct = {"M_pre": lambda i: mpre_original(cfg, i, frames[i]),
              "M_crop": lambda i: stage04_original(cfg, i, frames[i], "m_crop"),
              "M": lambda i: stage04_original(cfg, i, frames[i], "refined")}
    sets = _training_sets(cfg, rows, train, result, out)
    trained = train_or_load(cfg, out, sets, log, progress)
    models = {}
    if cfg.evaluation.grabcut:
        direct["grabcut"] = grabcut_masks(cfg, image_of, out / "predictions" / "grabcut")
        result["grabcut"] = {"margin": cfg.evaluation.grabcut_margin,
                             "iterations": cfg.evaluation.grabcut_iterations, "seed": cfg.seed}
    for row in ROWS:
        if row in direct:
            scorer.score_masks(row, direct[row])
        elif row in sets:
            model, info = trained[row]
            result["training"][row] = info
            models[row] = model
            scorer.score_model(row, model, out / "predictions" / row)
            if row == "supervised":
                result["object_free_check"] = object_free_check(cfg, model, image_of, gt_test)
    result["rows"] = scorer.results()
    result["masks"] = write_masks(cfg, out, models, train + test, progress, log)
    if not gt_test:
        result["note"] = (f"no test image has usable ground truth: the networks were trained and "
                          f"saved, metrics skipped ({len(skipped_test)} images listed)")
        log(f"stage 06: {result['note']}")
    result["ordering"] = ordering(result["rows"])
    atomic_write_json(metrics_path(cfg, "06"), result)
    update_stage(cfg, "06", complete=True)
    return result


@locked_stage("06")
def train_rows(cfg, rows, force: bool = False, log=print) -> list[str]:
    """Train the U-Nets of `rows` now, in this process, from their inputs alone (ROW_INPUTS): the
    runner starts each as soon as those stages are done, before stage 06 scores them. A network
    trained from the same inputs, parameters and code is kept unless `force`. Returns the rows
    with a network (a row that cannot train, e.g. supervised without ground truth, is left out)."""
    check_inputs(cfg, sorted({n for r in rows for n in ROW_INPUTS[r]}),
                 f"stage 06 ({', '.join(ROW_LABELS[r] for r in rows)})")
    if not force:
        refuse_other_params(cfg, "06", stage_inputs(cfg))
    train, _ = _splits(cfg)
    sets = _training_sets(cfg, rows, train, {"skipped_rows": {}}, stage_dir(cfg, "06"))
    train_or_load(cfg, stage_dir(cfg, "06"), sets, log, progress=False, processes=0,
                  retrain=set(sets) if force else ())
    return list(sets)


def unet_rows_with_seed(cfg, seed: int, out: Path, log=print, processes: int | None = None) -> dict:
    """The U-Net rows of stage 06 with another init seed (`segmentation.seed`), trained into `out`
    (not the run's 06_evaluation/) from the run's finished stages and scored like stage 06:
    {row: pooled metrics}. A network of the same fingerprint in `out` is loaded, not retrained."""
    seeded = cfg.model_copy(deep=True)
    seeded.segmentation.seed = int(seed)
    check_inputs(seeded, sorted({n for r in seeded.segmentation.rows for n in ROW_INPUTS[r]}),
                 f"the U-Nets with seed {seed}")
    train, test = _splits(seeded)
    gt_test, _ = load_ground_truth(test)
    by_id = {r.id: r for r in train + test}
    image_of = lambda i: load_image(by_id[i].image)  # noqa: E731
    sets = _training_sets(seeded, list(seeded.segmentation.rows), train, {"skipped_rows": {}}, Path(out))
    trained = train_or_load(seeded, Path(out), sets, log, progress=False, processes=processes)
    scorer = _Scorer(seeded, gt_test, image_of)
    for row in ROWS:
        if row in trained:
            scorer.score_model(row, trained[row][0], Path(out) / "predictions" / row)
    return {row: {k: v for k, v in res.items() if k != "per_image_iou"}
            for row, res in (scorer.results() if gt_test else {}).items()}


# ----------------------------------------------------------------------------- masks of the run
def frames_of(cfg, ids) -> dict:
    from fgbg_utils.stages.attention_maps import load_frame
    return {i: load_frame(cfg, i) for i in ids}


def mpre_original(cfg, image_id, frame) -> np.ndarray:
    from fgbg_utils.stages.binarization import load_mpre
    return canvas_to_original(load_mpre(cfg, image_id), frame, "mask")


def grabcut_masks(cfg, image_of, folder: Path):
    """image id -> GrabCut's mask (Table 1's baseline) at the image's size, from a centred
    rectangle (evaluation.grabcut_margin, grabcut_iterations; OpenCV's RNG seeded with `seed`).
    Each mask is saved to `folder`/<id>.png and read back on a rerun (the folder is cleared
    when the stage recomputes)."""
    from fgbg_utils.core.baselines import grabcut
    from fgbg_utils.data.datasets import load_mask

    def mask_of(image_id: str) -> np.ndarray:
        path = folder / f"{image_id}.png"
        if path.exists():
            return load_mask(path)
        mask = grabcut(image_of(image_id), cfg.evaluation.grabcut_margin,
                       cfg.evaluation.grabcut_iterations, cfg.seed)
        atomic_save_png(path, mask)
        return mask
    return mask_of


def stage04_original(cfg, image_id, frame, kind) -> np.ndarray:
    from fgbg_utils.stages.refinement import load_refined
    return canvas_to_original(load_refined(cfg, image_id, kind), frame, "mask")


def synthetic_pairs(cfg, d_s, out: Path | None, result: dict):
    """D'_s; with segmentation.synthetic_filter_iou > 0 only the pairs whose mask agrees with the
    prediction of U-Net(D_s) (same seed, trained or loaded first) on the synthetic image: a
    label-free check that drops masks which miss or add an object. Records what it kept."""
    from fgbg_utils.stages.synthesis import load_pairs
    images, masks = load_pairs(cfg)
    threshold = cfg.segmentation.synthetic_filter_iou
    if not threshold:
        return images, masks
    if out is None:
        raise StageError("segmentation.synthetic_filter_iou needs the folder of U-Net(D_s)")
    model, _ = train_or_load(cfg, out, {"unet_D_s": d_s}, log=lambda *_: None, progress=False,
                             processes=0)["unet_D_s"]
    ious = [M.segmentation_metrics([p], [masks[k]])["iou"]
            for k, p in enumerate(predict(model, images, seg_config(cfg)))]
    keep = [k for k, v in enumerate(ious) if v >= threshold]
    result["synthetic_filter"] = {"threshold": threshold, "kept": len(keep), "of": len(ious),
                                  "iou_with_unet_D_s": [round(v, 4) for v in ious]}
    pick = lambda seq: LazySequence(keep, lambda k: seq[k])  # noqa: E731
    return pick(images), pick(masks)


def _training_sets(cfg, rows, train, result, out: Path | None = None) -> dict:
    """{row: (images, masks)} of the requested U-Net rows, as lazy sequences (the U-Net resizes
    them in one pass); rows that cannot train are listed in `result`."""
    ids = [r.id for r in train]
    by_id = {r.id: r for r in train}
    imgs = LazySequence(ids, lambda i: load_image(by_id[i].image))
    frames = frames_of(cfg, ids) if set(rows) - {"supervised"} else {}
    sets = {}
    if "unet_M_pre" in rows:
        sets["unet_M_pre"] = (imgs, LazySequence(ids, lambda i: mpre_original(cfg, i, frames[i])))
    if {"unet_D_s", "unet_D_s_plus_synth"} & set(rows):
        d_s = LazySequence(ids, lambda i: stage04_original(cfg, i, frames[i], "refined"))
        if "unet_D_s" in rows:
            sets["unet_D_s"] = (imgs, d_s)
        if "unet_D_s_plus_synth" in rows:
            syn_images, syn_masks = synthetic_pairs(cfg, (imgs, d_s), out, result)
            sets["unet_D_s_plus_synth"] = (imgs + syn_images, d_s + syn_masks)
    if "supervised" in rows:
        gt_train, skipped_train = load_ground_truth(train)
        if gt_train:
            labelled = [i for i in ids if i in gt_train]
            sets["supervised"] = (LazySequence(labelled, lambda i: load_image(by_id[i].image)),
                                  [gt_train[i] for i in labelled])
            if skipped_train:
                result["supervised_train_without_ground_truth"] = [i for i, _ in skipped_train]
        else:
            result["skipped_rows"]["supervised"] = "no training image has a ground-truth mask"
    return sets


# ----------------------------------------------------------------------------- training
def workers(cfg) -> int:
    """segmentation.workers; auto: 2 single-thread processes on a CPU, in-process on a GPU."""
    w = cfg.segmentation.workers
    if w == "auto":
        return 0 if resolve_device(cfg.device).type == "cuda" else 2
    return int(w)


def row_fingerprint(cfg, row: str) -> str:
    """What a row's network depends on: stage 06's parameters, those of the stages it trains from
    (ROW_INPUTS) and their upstream, the dataset, and the code of that chain."""
    exp = expected(cfg, "06", inputs=ROW_INPUTS[row])
    return fingerprint([exp.params_fingerprint, exp.code_fingerprint])


def train_or_load(cfg, out: Path, sets: dict, log, progress, processes: int | None = None,
                  retrain=()) -> dict:
    """{row: (model, info)}: a saved network of the same row fingerprint is loaded (unless in
    `retrain`); the others are trained, in parallel single-thread processes when `processes`
    (default `segmentation.workers`) > 0."""
    import shutil
    import time

    from safetensors.torch import load_file

    n_train = len(_splits(cfg)[0]) if cfg.segmentation.steps_for_images else None
    scfgs = {row: seg_config(cfg, row, n_train) for row in sets}
    paths = {row: (out / "models" / f"{row}.safetensors", out / "models" / f"{row}.json") for row in sets}
    prints = {row: row_fingerprint(cfg, row) for row in sets}
    done, todo = {}, []
    for row, (weights, info_path) in paths.items():
        if (row not in retrain and weights.exists() and info_path.exists()
                and read_json(info_path).get("fingerprint") == prints[row]):
            model = build_model(scfgs[row])
            model.load_state_dict(load_file(str(weights)))
            done[row] = (model.to(resolve_device(scfgs[row].device)).eval(), read_json(info_path))
        else:
            todo.append(row)
            shutil.rmtree(out / "masks" / row, ignore_errors=True)  # masks of earlier weights
    if not todo:
        return done
    n = workers(cfg) if processes is None else processes
    for row in todo:
        scfg = scfgs[row]
        log(f"stage 06: training {ROW_LABELS[row]} on {len(sets[row][0])} images ({scfg.steps} steps"
            + (f", an ensemble of {scfg.ensemble} networks)" if scfg.ensemble > 1 else ")")
            + (f", {min(n, len(todo))} at a time in single-thread processes" if n else ""))
    t0 = time.time()
    if n:
        results = train_many({row: sets[row] for row in todo}, {row: scfgs[row] for row in todo}, n, log)
    else:
        results = {row: train_segnet(*sets[row], scfgs[row], log=log, progress=progress) for row in todo}
    for row, (model, curve) in results.items():
        scfg = scfgs[row]
        info = {"n_images": len(sets[row][0]), "steps": scfg.steps,
                "seconds": round(time.time() - t0, 1), "workers": n,
                "final_loss": float(np.mean(curve[-max(1, len(curve) // 20):])),
                "loss_curve": curve, "config": scfg.to_dict(), "seed": scfg.seed,
                "member_seeds": [c.seed for c in member_configs(scfg)],
                "bf16": uses_bf16(scfg, resolve_device(scfg.device)), "fingerprint": prints[row]}
        atomic_save_safetensors(paths[row][0], model.state_dict())
        atomic_write_json(paths[row][1], info)
        done[row] = (model, info)
    return done


# ----------------------------------------------------------------------------- the product
def write_masks(cfg, out: Path, models: dict, records, progress: bool = True, log=print) -> dict | None:
    """The method's product: the best label-free U-Net's mask of every image, train and test, at
    the image's own (upright) size: 06_evaluation/masks/<row>/<id>.png. A mask already written by
    the same weights is kept (the folder is cleared when its network is retrained)."""
    from tqdm.auto import tqdm

    from fgbg_utils.runs.predict import PREFERRED_ROWS, Segmenter
    from fgbg_utils.stages.common import groups

    row = next((r for r in PREFERRED_ROWS if r in models), None)
    if row is None:
        log("stage 06: no label-free U-Net row was trained (segmentation.rows); no masks written")
        return None
    seg = Segmenter(models[row], seg_config(cfg), row)
    folder = out / "masks" / row
    rel = lambda i: f"{STAGE}/masks/{row}/{i}.png"  # noqa: E731 (relative to the run folder)
    todo = [r for r in records if not (folder / f"{r.id}.png").exists()]
    bar = tqdm(total=len(todo), desc=f"06 masks ({row})", unit="img", disable=not progress or not todo)
    for group in groups(todo, max(1, seg.config.batch_size)):
        for r, mask in zip(group, seg.predict([load_image(r.image) for r in group])):
            atomic_save_png(folder / f"{r.id}.png", mask)
        bar.update(len(group))
    bar.close()
    unreadable = _unreadable(cfg)
    log(f"stage 06: masks of {ROW_LABELS[row]} for all {len(records)} readable images in {folder}"
        + (f"; no mask for {len(unreadable)} unreadable file(s): "
           + ", ".join(Path(u["file"]).name for u in unreadable) if unreadable else ""))
    return {"row": row, "folder": f"{STAGE}/masks/{row}", "n_images": len(records),
            "images": {r.id: {"mask": rel(r.id), "image": str(r.image), "split": r.split}
                       for r in records}, "unreadable": unreadable}


def _unreadable(cfg) -> list[dict]:
    """The files stage 01 could not decode (dataset.on_corrupt=skip), with the reason."""
    path = Path(cfg.run_dir) / "01_attention_maps" / "summary.json"
    skipped = read_json(path).get("skipped_images", []) if path.exists() else []
    return [{"file": f, "reason": why} for f, why in skipped]


# ----------------------------------------------------------------------------- scoring
class _Scorer:
    """Per-row SegmentationMeters under the configured protocol (full image or centre crop)."""

    def __init__(self, cfg, gt: dict, image_of):
        self.cfg, self.gt, self.image_of = cfg, gt, image_of
        self.crop = cfg.segmentation.protocol == "center_crop"
        self.size = cfg.segmentation.size
        self.meters: dict[str, M.SegmentationMeter] = {}
        self.per_image: dict[str, dict[str, float]] = {}

    def _update(self, row: str, image_id: str, pred: np.ndarray, gt: np.ndarray) -> None:
        boxes = self.cfg.evaluation.ground_truth_kind == "boxes"
        meter = self.meters.setdefault(row, M.SegmentationMeter(gt_is_boxes=boxes))
        meter.update(pred, gt)
        self.per_image.setdefault(row, {})[image_id] = meter.ious[-1]

    def score_masks(self, row: str, mask_of) -> None:
        for i, gt in self.gt.items():
            pred = mask_of(i)
            if self.crop:
                image = self.image_of(i)
                _, gt = center_crop_pair(image, gt, self.size)
                _, pred = center_crop_pair(image, pred, self.size)
            self._update(row, i, pred, gt)

    def score_model(self, row: str, model, pred_dir: Path) -> None:
        scfg = seg_config(self.cfg)
        ids = list(self.gt)
        imgs = LazySequence(ids, self.image_of)
        if self.crop:
            preds, gts = predict_center_crop(model, imgs, [self.gt[i] for i in ids], scfg)
        else:
            preds, gts = predict(model, imgs, scfg), [self.gt[i] for i in ids]
        for i, p, g in zip(ids, preds, gts):
            atomic_save_png(pred_dir / f"{i}.png", p)
            self._update(row, i, p, g)

    def results(self) -> dict:
        return {row: {**m.result(), "per_image_iou": self.per_image[row]}
                for row, m in self.meters.items()}


def ordering(rows: dict) -> dict:
    """The paper's ordering M_pre < M < U-Net(D_s) ≤ U-Net(D_s ∪ D'_s) < supervised, per step."""
    chain = [("M_pre", "<", "M"), ("M", "<", "unet_D_s"), ("unet_D_s", "<=", "unet_D_s_plus_synth"),
             ("unet_D_s_plus_synth", "<", "supervised")]
    out = {}
    for a, op, b in chain:
        if a in rows and b in rows:
            x, y = rows[a]["iou"], rows[b]["iou"]
            out[f"{a} {op} {b}"] = bool(x < y if op == "<" else x <= y)
    out["holds"] = all(out.values()) if out else None
    return out


def object_free_check(cfg, detector, image_of, gt_test: dict) -> dict:
    """Is the object absent from background samples? The supervised U-Net (trained on ground truth,
    an independent detector) predicts each sample's foreground area; a sample counts as
    object-free when that area is below segmentation.detector_area. Real test images give its
    detection rate (the share of object images it flags), the stage-03 samples and stage-05 pure
    backgrounds the shares of object-free samples."""
    scfg = seg_config(cfg)
    thr = float(cfg.segmentation.detector_area)
    area = lambda ims: np.array([p.mean() for p in predict(detector, ims, scfg)])
    out = {"detector": "supervised U-Net", "area_threshold": thr}
    real = LazySequence(list(gt_test), image_of)
    if real:
        out["real_test_detected"] = float((area(real) >= thr).mean())
    samples = Path(cfg.run_dir) / "03_finetuning" / "samples.npz"
    if samples.exists():
        with np.load(samples) as z:
            for key in z.files:
                out[f"object_free_{key}"] = float((area(z[key]) < thr).mean())
                out[f"n_{key}"] = int(len(z[key]))
    bg = Path(cfg.run_dir) / STAGE05 / "pure_backgrounds"
    if bg.is_dir():
        files = sorted(bg.glob("*.png"))
        if files:
            out["object_free_pure_backgrounds"] = float((area(LazySequence(files, load_image)) < thr).mean())
            out["n_pure_backgrounds"] = len(files)
    return out
