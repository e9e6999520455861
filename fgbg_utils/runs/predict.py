"""The method's product: the label-free segmentation U-Net of a run, applied to any images.

    seg = Segmenter.from_run("runs/toy")            # the U-Net trained on D_s ∪ D'_s (or D_s)
    masks = seg.predict([image1, image2])           # bool masks at each image's own size
    predict_folder("runs/toy", "my_photos", "out")  # out/<stem>.png, batched, with a progress bar
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from fgbg_utils.data.datasets import IMAGE_EXTS, DatasetError, load_image
from fgbg_utils.io import atomic_save_png, atomic_write_json, read_json
from fgbg_utils.stages.registry import stage as get_stage

# label-free rows, best first (the supervised row uses ground truth and is never the default)
PREFERRED_ROWS = ("unet_D_s_plus_synth", "unet_D_s", "unet_M_pre")


class PredictError(DatasetError):
    """predict cannot run: no trained network in the run folder, or no images; names the fix."""


def models_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / get_stage("06").name / "models"


def trained_rows(run_dir: str | Path) -> list[str]:
    d = models_dir(run_dir)
    return [r for r in (*PREFERRED_ROWS, "supervised")
            if (d / f"{r}.safetensors").exists() and (d / f"{r}.json").exists()]


@dataclass
class Segmenter:
    """A trained segmentation U-Net with its config; `predict` maps images to bool masks."""
    model: object
    config: object
    row: str

    @classmethod
    def from_run(cls, run_dir: str | Path, row: str | None = None, device: str = "auto",
                 batch_size: int | None = None) -> "Segmenter":
        """The U-Net of `row` (default: the best label-free row trained) of a run with stage 06."""
        from safetensors.torch import load_file

        from fgbg_utils.training.segnet import SegConfig, build_model, resolve_device

        if not Path(run_dir).is_dir():
            raise PredictError(f"--run {str(run_dir)!r} is not a folder; pass a run folder made by "
                               f"`python -m fgbg_utils run PARAMS --out DIR` (with stage 06).")
        rows = trained_rows(run_dir)
        if row is None:
            row = next((r for r in PREFERRED_ROWS if r in rows), None)
        if row is None or row not in rows:
            have = ", ".join(rows) or "none"
            raise PredictError(f"{models_dir(run_dir)} holds no trained network for row "
                               f"{row or 'any label-free row'} (trained: {have}). Run stage 06 "
                               f"first (notebook 06_evaluation or `python -m fgbg_utils run PARAMS "
                               f"--stages 06 --out {run_dir}`), or pass --row with one of: {have}.")
        info = read_json(models_dir(run_dir) / f"{row}.json")
        known = set(SegConfig.model_fields)
        cfg = SegConfig(**{k: v for k, v in info["config"].items() if k in known})
        cfg.device = device
        if batch_size:
            cfg.batch_size = batch_size
        model = build_model(cfg)
        model.load_state_dict(load_file(str(models_dir(run_dir) / f"{row}.safetensors")))
        return cls(model.to(resolve_device(device)).eval(), cfg, row)

    def predict(self, images: Sequence) -> list[np.ndarray]:
        """Bool masks at each image's own (upright) size, full-image protocol. Items are arrays
        (HxW, HxWx3, HxWx4) or image files (decoded like the datasets: EXIF, 16-bit, CMYK...)."""
        from fgbg_utils.training.segnet import predict

        arrays = [load_image(im) if isinstance(im, (str, Path)) else np.asarray(im) for im in images]
        return predict(self.model, arrays, self.config)


def list_images(folder: str | Path, exclude: Path | None = None) -> list[Path]:
    """Image files under `folder` (recursive; hidden files and anything under `exclude` left out).
    Two files that would share one output name are refused."""
    folder = Path(folder)
    if not folder.is_dir():
        raise PredictError(f"--images {str(folder)!r} is not a folder; pass a folder of images.")
    skip = exclude.resolve() if exclude is not None else None
    files = sorted(p for p in folder.rglob("*")
                   if p.is_file() and p.suffix.lower() in IMAGE_EXTS
                   and not any(part.startswith(".") for part in p.relative_to(folder).parts)
                   and not (skip is not None and p.resolve().is_relative_to(skip)))
    if not files:
        raise PredictError(f"no images ({', '.join(IMAGE_EXTS)}) in {str(folder)!r}.")
    seen: dict[Path, Path] = {}
    for f in files:
        key = f.relative_to(folder).with_suffix("")
        if key in seen:
            raise PredictError(f"{seen[key]} and {f} would both be written as {key}.png; rename "
                               f"or move one of them.")
        seen[key] = f
    return files


def overlay(image: np.ndarray, mask: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """The image with the foreground tinted red and the background darkened."""
    out = image.astype(np.float32) * np.where(mask[..., None], 1.0, 0.45)
    out[mask] = (1 - alpha) * out[mask] + alpha * np.array([255, 40, 40], np.float32)
    return np.clip(out, 0, 255).astype(np.uint8)


def predict_folder(run_dir: str | Path, images: str | Path, out: str | Path, row: str | None = None,
                   with_overlay: bool = False, on_corrupt: str = "skip", device: str = "auto",
                   batch_size: int | None = None, progress: bool = True, log=print) -> dict:
    """Write OUT/<relative path>.png (a binary mask at the image's upright size) for every readable
    image of a folder, and OUT/overlays/<relative path>.png with with_overlay; unreadable files are
    skipped and listed in OUT/predict.json (on_corrupt=skip) or stop the run (error). Outputs
    already written by the same network are kept: a rerun (also after an interruption) resumes."""
    from tqdm.auto import tqdm

    if on_corrupt not in ("skip", "error"):
        raise PredictError(f"on_corrupt must be skip or error, got {on_corrupt!r}")
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int)
                                   or batch_size < 1):
        raise PredictError(f"--batch-size {batch_size!r}: use a whole number >= 1 (or leave it out "
                           f"for the network's own batch size).")
    folder, out = Path(images), Path(out)
    if out.exists() and not out.is_dir():
        raise PredictError(f"--out {str(out)!r} is a file; pass a folder for the masks (new or "
                           f"existing).")
    if out.resolve() == folder.resolve():
        raise PredictError(f"--out {str(out)!r} is the images folder; masks would replace the "
                           f"images. Pass another output folder.")
    seg = Segmenter.from_run(run_dir, row, device, batch_size)
    files = list_images(folder, exclude=out)
    stamp = network_stamp(run_dir, seg.row)
    state = out / "predict.json"
    old = read_json(state) if state.exists() else {}
    fresh = old.get("network") != stamp
    atomic_write_json(state, {**old, "network": stamp, "complete": False})  # resumable from here
    todo = [f for f in files if fresh or not _done(out, folder, f, with_overlay)]
    skipped: list[tuple[str, str]] = []
    bs = max(1, seg.config.batch_size)
    bar = tqdm(total=len(todo), desc=f"predict ({seg.row})", unit="img", disable=not progress)
    for start in range(0, len(todo), bs):
        batch, arrays = [], []
        for f in todo[start:start + bs]:
            try:
                arrays.append(load_image(f))
                batch.append(f)
            except DatasetError as e:
                if on_corrupt == "error":
                    raise PredictError(f"{e} (or pass --on-corrupt skip to skip and list such "
                                       f"files)") from None
                skipped.append((str(f.relative_to(folder)), str(e)))
        for f, image, mask in zip(batch, arrays, seg.predict(arrays) if arrays else []):
            atomic_save_png(_out_path(out, folder, f), mask)
            if with_overlay:
                atomic_save_png(_out_path(out / "overlays", folder, f), overlay(image, mask))
        bar.update(len(todo[start:start + bs]))
    bar.close()
    summary = {"network": stamp, "complete": True, "n_images": len(files),
               "n_written": len(todo) - len(skipped), "n_kept": len(files) - len(todo),
               "skipped": [{"file": p, "reason": r} for p, r in skipped]}
    atomic_write_json(state, summary)
    if skipped:
        log(f"predict: skipped {len(skipped)} unreadable file(s): "
            + "; ".join(f"{p} ({r})" for p, r in skipped))
    return summary


def network_stamp(run_dir: str | Path, row: str) -> dict:
    """What identifies the weights that made a folder of masks."""
    weights = models_dir(run_dir) / f"{row}.safetensors"
    st = weights.stat()
    return {"run_dir": str(Path(run_dir).resolve()), "row": row, "weights_bytes": st.st_size,
            "weights_mtime_ns": st.st_mtime_ns}


def _done(out: Path, folder: Path, f: Path, with_overlay: bool) -> bool:
    return _out_path(out, folder, f).exists() and (
        not with_overlay or _out_path(out / "overlays", folder, f).exists())


def _out_path(out: Path, folder: Path, f: Path) -> Path:
    return (out / f.relative_to(folder)).with_suffix(".png")
