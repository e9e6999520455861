"""Collect per-image views from a run folder for figures and the explorer."""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

from fgbg_utils.data.loader import load_dataset
from fgbg_utils.data.datasets import load_image, load_mask
from fgbg_utils.core.frame import canvas_to_original
from fgbg_utils.io import read_json
from fgbg_utils.stages.attention_maps import STAGE as STAGE01, load_map


NO_GROUND_TRUTH = "no ground-truth masks in this dataset: "


def no_ground_truth(what: str) -> None:
    """Say, instead of failing, that a figure or metric needs ground truth the dataset lacks."""
    print(f"{NO_GROUND_TRUTH}{what}")


def not_computed(what: str, setting: str) -> None:
    """Say, instead of failing, that this run switched a figure's computation off; returns None."""
    print(f"not computed in this run ({setting}): {what}")


def ground_truth_ids(cfg, records: dict | None = None, split: str | None = None) -> list[str]:
    """Ids of the stage-01 images (of `split`) that have a ground-truth mask."""
    records = records or records_by_id(cfg)
    return [i for i in pick_ids(cfg, 10**9, split) if i in records and records[i].mask is not None]


def summary01(cfg) -> dict:
    return read_json(Path(cfg.run_dir) / STAGE01 / "summary.json")


def records_by_id(cfg) -> dict:
    records, _ = load_dataset(cfg)
    return {r.id: r for r in records}


def pick_ids(cfg, n: int, split: str | None = None) -> list[str]:
    """The first n images of a split (deterministic)."""
    s = summary01(cfg)
    ids = [i for i in s["images"] if split is None or s["splits"][i] == split]
    return ids[:n]


def attention_row(cfg, image_id: str, records=None) -> dict:
    """Image, ground truth and M̂ (mapped back to the original image) for one image."""
    rec = (records or records_by_id(cfg))[image_id]
    m = load_map(cfg, image_id)
    row = {"label": image_id, "image": load_image(rec.image),
           "M̂": canvas_to_original(m["mhat"], m["frame"], "soft")}
    if rec.mask is not None:
        row["ground truth"] = load_mask(rec.mask)
    return row


def binarization_row(cfg, image_id: str, records=None) -> dict:
    from fgbg_utils.stages.binarization import load_mpre

    row = attention_row(cfg, image_id, records)
    m = load_map(cfg, image_id)
    row["M_pre"] = canvas_to_original(load_mpre(cfg, image_id), m["frame"], "mask")
    return row


def per_image_iou(cfg, ids: list[str], records=None) -> dict[str, float]:
    """fg IoU of M_pre per image (images with ground truth only)."""
    from fgbg_utils.core.metrics import SegmentationMeter

    records = records or records_by_id(cfg)
    out = {}
    for i in ids:
        row = binarization_row(cfg, i, records)
        if "ground truth" in row:
            meter = SegmentationMeter()
            meter.update(row["M_pre"], row["ground truth"])
            out[i] = meter.result()["iou_per_image"]
    return out


def _stage_files(cfg, stage: str) -> dict[str, str]:
    """{file under the stage's folder: sha1 of its bytes}, without its stage.json record."""
    import hashlib

    from fgbg_utils.stages.registry import STAGE_NAMES

    folder = Path(cfg.run_dir) / STAGE_NAMES[stage]
    if not folder.is_dir():
        return {}
    return {str(p.relative_to(folder)): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in folder.rglob("*") if p.is_file() and p.name != "stage.json"}


def reuse_message(stage_name: str, before: dict, after: dict) -> str:
    """What a stage call changed in its folder: files new or changed, and files kept as they were
    (reused, or rewritten with the same bytes)."""
    changed = [f for f, v in after.items() if before.get(f) != v]
    kept = len(after) - len(changed)
    if not changed:
        return (f"stage {stage_name}: finished before with these parameters, data and code; its {kept} output "
                f"files were reused and are unchanged (force = True recomputes them).")
    return f"stage {stage_name}: {len(changed)} output files new or changed now, {kept} reused unchanged."


@contextmanager
def reuse_note(cfg, stage: str):
    """Around a stage's `run`: afterwards, print what it computed and what it reused."""
    from fgbg_utils.stages.registry import STAGE_NAMES

    before = _stage_files(cfg, stage)
    yield
    print(reuse_message(STAGE_NAMES[stage], before, _stage_files(cfg, stage)))


def run_log(cfg):
    """A `log` for a stage's `run` that names files inside the run folder as RUN/… and other project
    files relative to the project root: no machine paths in a notebook's output."""
    from fgbg_utils.runs.params import PROJECT_ROOT

    run = Path(cfg.run_dir)
    prefixes = [(f"{p}/", "RUN/") for p in {str(run), str(run.resolve())}]
    prefixes += [(f"{p}/", "") for p in {str(PROJECT_ROOT), str(PROJECT_ROOT.resolve())}]

    def log(message: str) -> None:
        for prefix, short in prefixes:
            message = str(message).replace(prefix, short)
        print(message)

    return log
