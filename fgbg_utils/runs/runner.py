"""Headless runs: execute the numbered notebooks in order with papermill into one run folder, and
record parameters, seeds, package versions and the git commit in DIR/manifest.json. Each notebook
gets every top-level parameter as a papermill parameter (paths relative to the project root), the
way `papermill NB.ipynb OUT.ipynb -f params/toy.yaml` passes them."""
from __future__ import annotations

import json
import platform
import subprocess
import time
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

from fgbg_utils.io import atomic_write_json, read_json
from fgbg_utils.runs.run_folder import run_lock
from fgbg_utils.runs.notebook import notebook_parameters, portable, relative
from fgbg_utils.runs.params import PROJECT_ROOT, ParamsError, load_params, save_params
from fgbg_utils.stages.registry import STAGE_NAMES as STAGES

NOTEBOOKS = PROJECT_ROOT / "notebooks"
PACKAGES = ("torch", "diffusers", "transformers", "accelerate", "peft", "scikit-learn", "numpy",
            "papermill", "safetensors", "tokenizers")


def parse_stages(text: str | None) -> list[str]:
    available = [k for k, v in STAGES.items() if (NOTEBOOKS / f"{v}.ipynb").exists() and k != "00"]
    if not text:
        return available
    wanted = [s.strip().zfill(2) for s in text.split(",") if s.strip()]
    bad = [s for s in wanted if s not in STAGES or not (NOTEBOOKS / f"{STAGES[s]}.ipynb").exists()]
    if bad:
        raise ParamsError(f"--stages: unknown stage(s) {bad}; available: {', '.join(['00', *available])}")
    return sorted(wanted)


def package_versions() -> dict:
    out = {"python": platform.python_version()}
    for p in PACKAGES:
        try:
            out[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            out[p] = None
    return out


def git_state() -> dict:
    def git(*args):
        r = subprocess.run(["git", *args], cwd=PROJECT_ROOT, capture_output=True, text=True)
        return r.stdout.strip() if r.returncode == 0 else None
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": git("rev-parse", "HEAD"), "dirty": bool(status) if status is not None else None}


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def preflight(cfg, stages=()) -> None:
    """Cheap checks before any notebook runs: dataset present, object word known to the model, an
    evaluation split with images when stage 06 is to run."""
    from fgbg_utils.data.loader import load_dataset
    from fgbg_utils.core.models import ModelError, load_tokenizer
    from fgbg_utils.runs.params import resolved_prompt
    from fgbg_utils.core.tokens import prompt_positions

    records, _ = load_dataset(cfg, check=False)  # lists files (stage 01 decodes them); makes the toy world
    try:
        from fgbg_utils.core.single_file import is_single_file
        source = cfg.model.config if is_single_file(cfg.model.path) and cfg.model.config else cfg.model.path
        tok = load_tokenizer(source, cfg.model.revision)
    except (OSError, ValueError) as e:
        raise ModelError(f"`model.path`={cfg.model.path!r}: no tokenizer could be loaded "
                         f"({str(e).splitlines()[0]}). Use a diffusers folder or hub id.") from None
    prompt_positions(tok, resolved_prompt(cfg), [cfg.object, *cfg.parts])
    split = cfg.evaluation.split
    if "06" in stages and not any(r.split == split for r in records):
        raise ParamsError(f"stage 06 evaluates on `evaluation.split`={split!r}, which has no images "
                          f"(dataset.splits={cfg.dataset.splits}). Add it to dataset.splits, "
                          f"give the dataset {split} images, or run --stages without 06.")


def run(params_file: str, sets=(), stages: str | None = None, out: str | None = None,
        force: bool = False, log=print) -> Path:
    """Validate the parameters (before any work), then execute the stages' notebooks in order."""
    import logging

    import papermill as pm

    from fgbg_utils.runs.notebook import drop

    # every parameter is passed; the notebooks name only four in their parameters cell
    drop(logging.getLogger("papermill"), "Passed unknown parameter")
    cfg = load_params(params_file, sets, run_dir=out)
    order = parse_stages(stages)
    if any(s != "00" for s in order):
        preflight(cfg, order)
    run_dir = Path(cfg.run_dir)
    (run_dir / "notebooks").mkdir(parents=True, exist_ok=True)
    save_params(portable(cfg), run_dir / "params.yaml")
    with run_lock(run_dir):  # kernels inherit the lock token: their stages re-enter it
        manifest_path = run_dir / "manifest.json"
        manifest = read_json(manifest_path) if manifest_path.exists() else {"stages": {}}
        manifest.update({
            "params_file": relative(params_file), "overrides": list(sets), "params": portable(cfg),
            "seeds": {"seed": cfg.seed, "dataset.seed": cfg.dataset.seed,
                      "binarization.gmm_seed": cfg.binarization.gmm_seed},
            "versions": package_versions(), "git": git_state(), "force": force, "started": _now()})
        atomic_write_json(manifest_path, manifest)
        for key in order:
            name = STAGES[key]
            log(f"[fgbg] stage {name} ...")
            t0 = time.time()
            manifest["stages"][name] = {"status": "running", "started": _now()}
            atomic_write_json(manifest_path, manifest)
            try:
                pm.execute_notebook(
                    str(NOTEBOOKS / f"{name}.ipynb"), str(run_dir / "notebooks" / f"{name}.ipynb"),
                    parameters=notebook_parameters(cfg, params_file, force=force) if key != "00" else {},
                    cwd=str(NOTEBOOKS), progress_bar=False, request_save_on_cell_execute=True)
            except Exception:
                manifest["stages"][name].update(status="failed", seconds=round(time.time() - t0, 1))
                atomic_write_json(manifest_path, manifest)
                log(f"[fgbg] stage {name} failed; see {run_dir / 'notebooks' / (name + '.ipynb')}")
                raise
            manifest["stages"][name].update(status="done", seconds=round(time.time() - t0, 1))
            manifest["finished"] = _now()
            atomic_write_json(manifest_path, manifest)
            log(f"[fgbg] stage {name} done in {time.time() - t0:.0f} s")
    return run_dir


METRIC_COLUMNS = ("auc_roc", "acc", "iou", "miou", "iou_per_image", "dice_per_image")


def metrics_rows(run_dir: str | Path, stages=("02", "04", "06")) -> list[tuple[str, dict]]:
    """(row name, metrics) for the metrics files of the run, in stage order. Stage 06's table holds
    the direct masks too, so when it is there stage 04's rows are not repeated."""
    rows = []
    mdir = Path(run_dir) / "metrics"
    s02, s04, s06 = (mdir / f"{STAGES[k]}.json" for k in ("02", "04", "06"))
    has06 = s06.exists() and "06" in stages
    if s02.exists() and "02" in stages:
        m = json.loads(s02.read_text())
        if "iou" in m:
            rows.append(("M_pre (stage 02)", m))
            for name, b in m.get("baselines", {}).items():
                rows.append((f"baseline: {name}", b))
    if s04.exists() and "04" in stages and not has06:
        m = json.loads(s04.read_text())
        for key, name in (("m_crop", "M_crop (stage 04 baseline)"), ("refined", "M (stage 04)")):
            if key in m:
                rows.append((name, m[key]))
    if has06:
        from fgbg_utils.stages.evaluation import ROW_LABELS, ROWS
        m = json.loads(s06.read_text())
        for key in ROWS:
            if key in m.get("rows", {}):
                rows.append((f"{ROW_LABELS[key]} (stage 06)",
                             {**m["rows"][key], "paper_cub_iou": m.get("paper_cub_iou", {}).get(key)}))
    return rows


def metrics_table(run_dir: str | Path, stages=("02", "04", "06")) -> str:
    rows = metrics_rows(run_dir, stages)
    if not rows:
        return "no ground-truth masks in this dataset: no metrics in this run"
    paper = any(m.get("paper_cub_iou") is not None for _, m in rows)
    cols = ["row", *METRIC_COLUMNS] + (["paper CUB IoU"] if paper else [])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for name, m in rows:
        cells = [f"{m[c]:.3f}" if isinstance(m.get(c), (int, float)) else "–" for c in METRIC_COLUMNS]
        if paper:
            cells.append(f"{m['paper_cub_iou']:.1f}" if m.get("paper_cub_iou") is not None else "")
        lines.append("| " + " | ".join([name, *cells]) + " |")
    return "\n".join(lines)
