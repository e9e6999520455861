"""The study: the paper's Table 2 over several toy worlds (dataset seeds) and U-Net init seeds, with
95 % intervals for every row and a paired verdict for every step of the paper's ordering.

Each world is a full run folder `DIR/world-<w>/` made (or resumed, or reused by fingerprint) by the
job graph of `--jobs`; the U-Net rows with the other init seeds train into
`DIR/world-<w>/unet-seeds/seed-<k>/` from that world's finished stages. Every piece is written
atomically and reused when its fingerprint matches, so a killed study resumes where it stopped.

Intervals: a world is the unit of replication (its images, masks and networks all change with it),
so each value is first averaged over the U-Net seeds of its world, and the 95 % interval is the
Student-t interval over the world means (df = worlds − 1), the standard error of a balanced nested
design. With one world the seeds are the replicates. A step "A < B" is judged on the paired
differences B − A (same world, same seed): `holds` if its interval lies above 0, `fails` if below,
`unresolved` if it spans 0."""
from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np

from fgbg_utils.io import atomic_write_json, atomic_write_text, read_json

# the paper's claims, as steps "A < B" between rows (Table 2, Table 1's GrabCut, the ablations)
STEPS = (("M_pre", "M", "refinement improves the preliminary masks"),
         ("M_crop", "M", "inpainting with m' beats the crop baseline"),
         ("M_with_m", "M", "refinement needs the fine-tuned m' (ablation: painted by m)"),
         ("object_free_m", "object_free_m_prime", "fine-tuning teaches y_b object-free scenes (share under y_b)"),
         ("M_pre", "unet_M_pre", "a U-Net on (D, M_pre) beats M_pre"),
         ("M", "unet_D_s", "a U-Net on D_s beats its training masks M"),
         ("unet_M_pre", "unet_D_s", "refined masks train a better U-Net"),
         ("unet_D_s", "unet_D_s_plus_synth", "the synthetic pairs D'_s help"),
         ("unet_D_s_plus_synth", "supervised", "label-free stays below supervised"),
         ("grabcut", "unet_D_s", "the method beats GrabCut (Table 1)"))
LABELS = {"M_pre": "M_pre", "M_crop": "M_crop", "M_with_m": "M (painted by m)", "M": "M",
          "unet_M_pre": "U-Net(D, M_pre)", "unet_D_s": "U-Net(D_s)",
          "unet_D_s_plus_synth": "U-Net(D_s ∪ D'_s)", "supervised": "supervised", "grabcut": "GrabCut",
          "object_free_m": "y_b object-free share, m", "object_free_m_prime": "y_b object-free share, m'"}
UNET_ROWS = ("unet_M_pre", "unet_D_s", "unet_D_s_plus_synth", "supervised")


def parse_ints(text: str, name: str) -> list[int]:
    """"0,1,2" -> [0, 1, 2]; a clear error naming the option otherwise."""
    try:
        values = [int(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        values = []
    if not values or len(set(values)) != len(values) or min(values) < 0:
        from fgbg_utils.runs.params import ParamsError
        raise ParamsError(f"{name} is {text!r}; give distinct non-negative integers, e.g. {name} 0,1,2")
    return values


# ----------------------------------------------------------------------------- statistics
def interval(by_world: list[list[float]], level: float = 0.95) -> tuple[float, list[float] | None]:
    """(mean, [lo, hi]): the Student-t interval over the world means (each the mean over its
    seeds); with one world, over its seeds. None without replicates: a single value, or one world
    whose value is the same for every seed (a direct row: the seeds do not replicate it)."""
    from scipy.stats import t

    means = [float(np.mean(v)) for v in by_world]
    reps = means if len(means) > 1 else [float(x) for x in by_world[0]]
    mean = float(np.mean(means))
    if len(reps) < 2 or (len(means) == 1 and np.ptp(reps) == 0):
        return mean, None  # one value, or one world whose value does not depend on the seed
    half = float(t.ppf((1 + level) / 2, len(reps) - 1) * np.std(reps, ddof=1) / math.sqrt(len(reps)))
    return mean, [mean - half, mean + half]


def verdict(ci: list[float] | None) -> str:
    """holds (interval above 0), fails (below 0) or unresolved (spans 0, or no interval)."""
    if ci is None:
        return "unresolved"
    return "holds" if ci[0] > 0 else "fails" if ci[1] < 0 else "unresolved"


def summarize(values: dict[str, dict[int, dict[int, float]]], level: float = 0.95) -> dict:
    """values[row][world][seed] -> {"rows": {row: {mean, ci, n, values}}, "steps": {"A < B": ...}}."""
    rows = {}
    for row, by_world in values.items():
        lists = [list(by_world[w].values()) for w in sorted(by_world)]
        mean, ci = interval(lists, level)
        rows[row] = {"mean": mean, "ci": ci, "n": sum(map(len, lists)),
                     "values": [x for v in lists for x in v]}
    steps = {}
    for a, b, claim in STEPS:
        if a not in values or b not in values:
            continue
        worlds = sorted(set(values[a]) & set(values[b]))
        diffs = [[values[b][w][k] - values[a][w][k] for k in sorted(set(values[a][w]) & set(values[b][w]))]
                 for w in worlds]
        diffs = [d for d in diffs if d]
        if not diffs:
            continue
        mean, ci = interval(diffs, level)
        steps[f"{a} < {b}"] = {"diff_mean": mean, "ci": ci, "verdict": verdict(ci), "claim": claim,
                               "n": sum(map(len, diffs))}
    return {"rows": rows, "steps": steps}


# ----------------------------------------------------------------------------- the runs
def world_values(cfg, seeds: list[int], out: Path, jobs: int, log=print) -> dict[str, dict[int, float]]:
    """{row: {seed: IoU}} of one world: its run (the job graph), then the U-Net rows per seed."""
    from fgbg_utils.runs.schedule import precompute

    precompute(cfg, ["01", "02", "03", "04", "05", "06"], jobs, log=log)
    run = Path(cfg.run_dir)
    m06, m04 = read_json(run / "metrics" / "06_evaluation.json"), read_json(run / "metrics" / "04_refinement.json")
    m03 = read_json(run / "metrics" / "03_finetuning.json").get("object_absent", {})
    direct = {row: res["iou"] for row, res in m06["rows"].items() if row not in UNET_ROWS}
    if "refined_with_m" in m04:
        direct["M_with_m"] = m04["refined_with_m"]["iou"]
    if "share_object_free_base_y_b" in m03:
        direct["object_free_m"] = m03["share_object_free_base_y_b"]
        direct["object_free_m_prime"] = m03["share_object_free_tuned_y_b"]
    out_rows: dict[str, dict[int, float]] = {row: {k: v for k in seeds} for row, v in direct.items()}
    for k in seeds:
        if k == cfg.segmentation.seed:  # the run's own stage 06
            unet = {row: res["iou"] for row, res in m06["rows"].items() if row in UNET_ROWS}
        else:
            unet = seed_scores(cfg, k, run / "unet-seeds" / f"seed-{k}", jobs, log)
        for row, v in unet.items():
            out_rows.setdefault(row, {})[k] = v
    return out_rows


def seed_scores(cfg, seed: int, folder: Path, jobs: int, log=print) -> dict[str, float]:
    """IoU of each U-Net row with init seed `seed`; cached in folder/scores.json by the rows'
    fingerprints (a finished seed is not rescored, a changed input retrains)."""
    from fgbg_utils.stages.evaluation import row_fingerprint, unet_rows_with_seed

    seeded = cfg.model_copy(deep=True)
    seeded.segmentation.seed = int(seed)
    prints = {row: row_fingerprint(seeded, row) for row in seeded.segmentation.rows}
    cache = folder / "scores.json"
    if cache.exists() and read_json(cache).get("fingerprints") == prints:
        return read_json(cache)["iou"]
    log(f"[study] {Path(cfg.run_dir).name}: U-Nets with init seed {seed}")
    folder.mkdir(parents=True, exist_ok=True)
    res = unet_rows_with_seed(cfg, seed, folder, log=log, processes=jobs if jobs > 1 else 0)
    iou = {row: r["iou"] for row, r in res.items()}
    atomic_write_json(cache, {"fingerprints": prints, "iou": iou, "metrics": res})
    return iou


def run_study(params_file: str, worlds: list[int], seeds: list[int], out: str | Path, sets=(),
              jobs: int | str = "auto", log=print) -> dict:
    """Run or reuse the pipeline on each world, train the U-Net rows with each seed, and write
    DIR/study.json and DIR/study.md. Returns the study."""
    from fgbg_utils.runs.params import load_params, save_params
    from fgbg_utils.runs.notebook import portable, relative
    from fgbg_utils.runs.runner import git_state, package_versions, resolve_jobs

    out = Path(out)
    t0 = time.time()
    cfgs = {w: load_params(params_file, [*sets, f"dataset.seed={w}"], run_dir=str(out / f"world-{w}"))
            for w in worlds}  # every world's parameters are validated before any work
    workers = resolve_jobs(cfgs[worlds[0]], jobs)
    out.mkdir(parents=True, exist_ok=True)
    save_params(portable(cfgs[worlds[0]]), out / "params.yaml")
    values: dict[str, dict[int, dict[int, float]]] = {}
    for w in worlds:
        log(f"[study] world {w} ({worlds.index(w) + 1}/{len(worlds)}): {cfgs[w].run_dir}")
        for row, by_seed in world_values(cfgs[w], seeds, out, workers, log).items():
            values.setdefault(row, {})[w] = by_seed
    study = {"params_file": relative(params_file), "overrides": list(sets), "worlds": worlds,
             "unet_seeds": seeds, "metric": "pooled foreground IoU on the test split",
             "interval": "95 % Student-t over the world means (each averaged over its U-Net seeds); "
                         "one world: over the seeds",
             **summarize(values), "per_world": values, "labels": LABELS,
             "paper_cub_iou": _paper(), "seconds": round(time.time() - t0, 1),
             "versions": package_versions(), "git": git_state()}
    atomic_write_json(out / "study.json", study)
    atomic_write_text(out / "study.md", study_markdown(study))
    return study


def _paper() -> dict:
    from fgbg_utils.stages.evaluation import PAPER_CUB_IOU
    return dict(PAPER_CUB_IOU)


# ----------------------------------------------------------------------------- the table
def _fmt_ci(ci) -> str:
    return "–" if ci is None else f"[{ci[0]:.3f}, {ci[1]:.3f}]"


def study_markdown(study: dict) -> str:
    """study.md: the rows with their intervals, then the steps with their verdicts."""
    paper = study.get("paper_cub_iou", {})
    lines = [f"# Study: {len(study['worlds'])} worlds × {len(study['unet_seeds'])} U-Net seeds",
             "", f"Worlds (dataset.seed) {study['worlds']}, U-Net init seeds {study['unet_seeds']}; "
             f"{study['metric']}; interval: {study['interval']}.", "",
             "| row | mean | 95 % interval | n | paper, CUB (%) |", "|---|---|---|---|---|"]
    for row, r in study["rows"].items():
        lines.append(f"| {LABELS.get(row, row)} | {r['mean']:.3f} | {_fmt_ci(r['ci'])} | {r['n']} | "
                     f"{paper.get(row, '–')} |")
    lines += ["", "| step | claim | mean difference | 95 % interval | verdict |", "|---|---|---|---|---|"]
    for step, s in study["steps"].items():
        a, b = step.split(" < ")
        lines.append(f"| {LABELS.get(a, a)} < {LABELS.get(b, b)} | {s['claim']} | {s['diff_mean']:+.3f} | "
                     f"{_fmt_ci(s['ci'])} | **{s['verdict']}** |")
    lines += ["", f"Wall time: {study['seconds'] / 60:.1f} min."]
    return "\n".join(lines) + "\n"
