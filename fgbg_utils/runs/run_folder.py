"""The run folder: one directory per stage (`DIR/<NN_stage>/`), metrics in `DIR/metrics/`, and a
fingerprint per stage so a rerun skips finished work but never mixes outputs of other parameters."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from fgbg_utils.io import atomic_write_json, read_json

STAGES = {
    "00": "00_toy_world", "01": "01_attention_maps", "02": "02_binarization",
    "03": "03_finetuning", "04": "04_refinement", "05": "05_synthesis", "06": "06_evaluation",
}


class StageError(RuntimeError):
    """A stage cannot run: missing inputs from an earlier stage, or outputs of other parameters."""


def stage_dir(cfg: dict, stage: str) -> Path:
    d = Path(cfg["run_dir"]) / stage
    d.mkdir(parents=True, exist_ok=True)
    return d


def metrics_path(cfg: dict, stage: str) -> Path:
    return Path(cfg["run_dir"]) / "metrics" / f"{stage}.json"


def fingerprint(subset: dict) -> str:
    return hashlib.sha256(json.dumps(subset, sort_keys=True, default=str).encode()).hexdigest()[:16]


def open_stage(cfg: dict, stage: str, subset: dict, force: bool = False) -> Path:
    """Create/check DIR/<stage>/stage.json. Same parameters: finished outputs are reused. Different
    parameters: refuse unless force (then the old outputs are ignored and overwritten)."""
    d = stage_dir(cfg, stage)
    info_path = d / "stage.json"
    fp = fingerprint(subset)
    if info_path.exists() and not force:
        old = read_json(info_path)
        if old.get("fingerprint") != fp:
            changed = sorted(k for k in set(old.get("params", {})) | set(subset)
                             if old.get("params", {}).get(k) != subset.get(k))
            raise StageError(f"{d} holds outputs made with other parameters (changed: {changed}). "
                             f"Rerun with --force to recompute them, or use another --out run folder.")
    if force or not info_path.exists():
        atomic_write_json(info_path, {"stage": stage, "fingerprint": fp, "params": subset,
                                      "complete": False})
    return d


def update_stage(cfg: dict, stage: str, **fields) -> None:
    path = Path(cfg["run_dir"]) / stage / "stage.json"
    info = read_json(path)
    info.update(fields)
    atomic_write_json(path, info)


def require_stage(cfg: dict, stage: str, needed_by: str, run_dir: str | Path | None = None) -> dict:
    path = Path(run_dir or cfg["run_dir"]) / stage / "stage.json"
    if not path.exists() or not read_json(path).get("complete"):
        num = stage[:2]
        raise StageError(f"{needed_by} needs the outputs of stage {stage}, which are missing or "
                         f"incomplete in {Path(cfg['run_dir'])}. Run it first: python -m fgbg_utils "
                         f"run PARAMS.yaml --stages {num} --out {cfg['run_dir']}")
    return read_json(path)
