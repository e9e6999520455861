"""Fig. 8 and Table 3: the synthetic data's guidance scale s against its FID and the IoU of the
U-Net trained on D_s ∪ D'_s (`python -m fgbg_utils guidance-sweep`, notebook 05).

Stages 01-04 run once (DIR/base/); each s gets its own run folder DIR/s-<s>/ that starts from a
copy of those four stages (their fingerprints do not depend on s, so they are reused, not rerun)
and runs stages 05-06 with `synthesis.guidance` = s and the row U-Net(D_s ∪ D'_s) only, with each
U-Net init seed (the study's `seed_scores`). DIR/sweep.json and DIR/sweep.md hold, per s, the FID
of D' against the real training images and the IoU's mean, standard deviation and values.
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np

from fgbg_utils.storage.atomic import atomic_write_json, atomic_write_text, read_json

UPSTREAM = ("01", "02", "03", "04")
ROW = "unet_D_s_plus_synth"
PAPER_CUB_FID = {1.0: 9.8, 3.0: 11.3, 7.5: 22.3}  # the paper's Fig. 8 (CUB)


def parse_scales(text: str) -> list[float]:
    try:
        scales = sorted({float(v) for v in text.split(",") if v.strip()})
    except ValueError:
        raise ValueError(f"--scales {text!r}: give comma-separated guidance scales, e.g. 1,2,3,7.5") from None
    if not scales or min(scales) < 1:
        raise ValueError(f"--scales {text!r}: give at least one guidance scale s >= 1, e.g. 1,2,3,7.5")
    return scales


def _copy_upstream(base: Path, folder: Path) -> None:
    """The finished stages 01-04 of `base` (folders and metrics) into a new run folder."""
    from fgbg_utils.stages.registry import STAGE_NAMES

    if (folder / "metrics").exists():
        return
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "metrics").mkdir(parents=True)
    for n in UPSTREAM:
        name = STAGE_NAMES[n]
        shutil.copytree(base / name, tmp / name)
        if (base / "metrics" / f"{name}.json").exists():
            shutil.copy2(base / "metrics" / f"{name}.json", tmp / "metrics" / f"{name}.json")
    tmp.rename(folder)


def scale_values(cfg, seeds: list[int], workers: int, log=print) -> dict:
    """FID and {seed: IoU} of U-Net(D_s ∪ D'_s) of one s (its run folder is cfg.run_dir)."""
    from fgbg_utils.runs.schedule import precompute
    from fgbg_utils.runs.study import seed_scores

    precompute(cfg, ["05", "06"], workers, log=log)
    run = Path(cfg.run_dir)
    m05, m06 = read_json(run / "metrics" / "05_synthesis.json"), read_json(run / "metrics" / "06_evaluation.json")
    iou = {}
    for k in seeds:
        if k == cfg.segmentation.seed:
            iou[k] = m06["rows"][ROW]["iou"]
        else:
            iou[k] = seed_scores(cfg, k, run / "unet-seeds" / f"seed-{k}", workers, log)[ROW]
    s = float(cfg.synthesis.guidance)
    fid = {float(k): v for k, v in (m05.get("fid") or {}).items()}
    return {"fid": fid.get(s), "fid_floor": m05.get("fid_floor"), "iou": iou}


def summary(values: list[float]) -> dict:
    return {"mean": float(np.mean(values)), "sd": float(np.std(values, ddof=1)) if len(values) > 1 else None,
            "n": len(values), "values": [float(v) for v in values]}


def run_guidance_sweep(params_file: str, scales: list[float], seeds: list[int], out: str | Path,
                       sets=(), jobs: int | str = "auto", log=print) -> dict:
    """Stages 01-04 once, then 05-06 per guidance scale; writes DIR/sweep.json and DIR/sweep.md."""
    from fgbg_utils.runs.notebook import relative
    from fgbg_utils.runs.params import load_params
    from fgbg_utils.runs.runner import git_state, resolve_jobs
    from fgbg_utils.runs.schedule import precompute

    out, t0 = Path(out), time.time()
    per_s = [*sets, f"segmentation.rows=[{ROW}]", "synthesis.fid_scales=[]"]
    cfgs = {s: load_params(params_file, [*per_s, f"synthesis.guidance={s:g}"], run_dir=str(out / f"s-{s:g}"))
            for s in scales}  # every scale's parameters are validated before any work
    base = load_params(params_file, list(sets), run_dir=str(out / "base"))
    if base.synthesis.fid_features is None:
        raise ValueError("`synthesis.fid_features` is null: the sweep's FID needs a feature network "
                         "(models/toy-features for the toy world, an Inception file for real data)")
    workers = resolve_jobs(base, jobs)
    log(f"[sweep] stages 01-04 once: {base.run_dir}")
    precompute(base, list(UPSTREAM), workers, log=log)
    rows = {}
    for s, cfg in cfgs.items():
        log(f"[sweep] s = {s:g}: {cfg.run_dir}")
        _copy_upstream(Path(base.run_dir), Path(cfg.run_dir))
        v = scale_values(cfg, seeds, workers, log)
        rows[f"{s:g}"] = {"fid": v["fid"], "fid_floor": v["fid_floor"],
                          "iou": summary([v["iou"][k] for k in seeds]), "iou_by_seed": v["iou"]}
    sweep = {"params_file": relative(params_file), "overrides": list(sets), "scales": scales,
             "unet_seeds": seeds, "row": ROW, "metric": "pooled foreground IoU on the test split",
             "rows": rows, "paper_cub_fid": {f"{k:g}": v for k, v in PAPER_CUB_FID.items()},
             "seconds": round(time.time() - t0, 1), "git": git_state()}
    atomic_write_json(out / "sweep.json", sweep)
    atomic_write_text(out / "sweep.md", sweep_markdown(sweep))
    return sweep


def sweep_markdown(sweep: dict) -> str:
    n = len(sweep["unet_seeds"])
    lines = [f"| s | FID of D' | paper's CUB FID | U-Net(D_s ∪ D'_s) IoU (mean ± sd over {n} seeds) |",
             "|---|---|---|---|"]
    for s, r in sweep["rows"].items():
        sd = "" if r["iou"]["sd"] is None else f" ± {r['iou']['sd']:.3f}"
        fid = "–" if r["fid"] is None else f"{r['fid']:.1f}"
        lines.append(f"| {s} | {fid} | {sweep['paper_cub_fid'].get(s, '–')} | {r['iou']['mean']:.3f}{sd} |")
    floor = next(iter(sweep["rows"].values()))["fid_floor"]
    if floor is not None:
        lines.append(f"\nFID floor (two halves of the real images): {floor:.1f}. "
                     f"{sweep['seconds'] / 60:.1f} min.")
    return "\n".join(lines) + "\n"
