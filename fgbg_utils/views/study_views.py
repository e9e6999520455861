"""Figures and sentences of the study (notebook 07): Table 2 rows with 95 % intervals beside the
paper's CUB numbers, and the paired differences of the paper's steps with their verdicts."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from fgbg_utils.runs.params import PROJECT_ROOT
from fgbg_utils.runs.study import LABELS

VERDICT_COLOURS = {"holds": "tab:green", "fails": "tab:red", "unresolved": "tab:grey"}
IOU_ROWS = ("M_pre", "M_crop", "grabcut", "M_with_m", "M", "unet_M_pre", "unet_D_s",
            "unet_D_s_plus_synth", "supervised")


def load_study(study_dir: str | Path) -> dict | None:
    """DIR/study.json (relative paths: the project root), or None if the study was not run."""
    import json
    path = Path(study_dir)
    path = path if path.is_absolute() else PROJECT_ROOT / path
    return json.loads((path / "study.json").read_text()) if (path / "study.json").exists() else None


def _err(row: dict) -> tuple[float, float]:
    ci = row["ci"] or [row["mean"], row["mean"]]
    return row["mean"] - ci[0], ci[1] - row["mean"]


def rows_figure(study: dict):
    """Each row's mean IoU (%) with its 95 % interval and every (world, seed) value, beside the
    paper's CUB number."""
    import matplotlib.pyplot as plt

    rows = [r for r in IOU_ROWS if r in study["rows"]]
    paper = study.get("paper_cub_iou", {})
    fig, ax = plt.subplots(figsize=(7.5, 0.45 * len(rows) + 1.2))
    y = np.arange(len(rows))[::-1]
    for yi, row in zip(y, rows):
        r = study["rows"][row]
        lo, hi = _err(r)
        ax.scatter(np.array(r["values"]) * 100, np.full(len(r["values"]), yi + 0.18), s=8,
                   color="tab:blue", alpha=0.35, zorder=2)
        ax.errorbar(r["mean"] * 100, yi, xerr=[[lo * 100], [hi * 100]], fmt="o", color="tab:blue",
                    capsize=4, zorder=3, label="toy: mean, 95 % interval" if yi == y[0] else None)
        if row in paper:
            ax.scatter(paper[row], yi - 0.18, marker="s", color="tab:orange", zorder=3,
                       label="paper, CUB" if row == next(r for r in rows if r in paper) else None)
    ax.set_yticks(y, [LABELS.get(r, r) for r in rows])
    ax.set_xlabel("foreground IoU (%)")
    ax.set_xlim(0, 100)
    ax.grid(axis="x", alpha=0.3)
    ax.legend(loc="lower left", fontsize=8)
    ax.set_title(f"Table 2 over {len(study['worlds'])} worlds × {len(study['unet_seeds'])} U-Net seeds")
    fig.tight_layout()
    return fig


def steps_figure(study: dict):
    """The paired difference B − A of each step "A < B" with its 95 % interval, coloured by verdict."""
    import matplotlib.pyplot as plt

    steps = list(study["steps"].items())
    fig, ax = plt.subplots(figsize=(7.5, 0.45 * len(steps) + 1.2))
    y = np.arange(len(steps))[::-1]
    for yi, (name, s) in zip(y, steps):
        ci = s["ci"] or [s["diff_mean"], s["diff_mean"]]
        ax.errorbar(s["diff_mean"], yi, xerr=[[s["diff_mean"] - ci[0]], [ci[1] - s["diff_mean"]]],
                    fmt="o", capsize=4, color=VERDICT_COLOURS[s["verdict"]])
        ax.annotate(s["verdict"], (ci[1], yi), xytext=(6, -3), textcoords="offset points", fontsize=8,
                    color=VERDICT_COLOURS[s["verdict"]])
    ax.axvline(0, color="k", lw=0.8)
    ax.margins(x=0.2)
    ax.set_yticks(y, [step_label(n) for n, _ in steps])
    ax.set_xlabel("paired difference B − A (same world and seed), 95 % interval")
    ax.grid(axis="x", alpha=0.3)
    ax.set_title("Each step of the paper: A < B?")
    fig.tight_layout()
    return fig


def step_label(name: str) -> str:
    a, b = name.split(" < ")
    return f"{LABELS.get(a, a)} < {LABELS.get(b, b)}"


def verdict_sentences(study: dict) -> str:
    """One Markdown line per step: the claim, the measured difference and whether it held."""
    say = {"holds": "holds", "fails": "**fails** (the interval lies below 0)",
           "unresolved": "is **unresolved** (the interval spans 0)"}
    lines = []
    for name, s in study["steps"].items():
        ci = "no interval" if s["ci"] is None else f"95 % interval [{s['ci'][0]:+.3f}, {s['ci'][1]:+.3f}]"
        lines.append(f"* *{s['claim']}* ({step_label(name)}): {s['diff_mean']:+.3f}, {ci}: {say[s['verdict']]}.")
    return "\n".join(lines)
