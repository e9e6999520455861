"""The paper's evidence beside this run's: Table 1 (the method against unsupervised baselines,
here GrabCut) and the FID of D' across the guidance scale s (Table 3, Fig. 8)."""
from __future__ import annotations

import html
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from fgbg_utils.io import read_json

# Table 1 of the paper (CUB, %; docs/method.md §3). * marks cells reconstructed from the extracted
# text (see there); None: no value. Rows the paper quotes from other work are not run here.
PAPER_TABLE1 = (
    ("supervised", "Fully supervised U-Net", 97.9, 88.3, 93.0, ""),
    ("grabcut", "GrabCut", 72.3, 36.0, 52.3, "mIoU*"),
    (None, "ReDO", 84.5, 42.6, None, ""),
    (None, "PerturbGAN", None, 38.0, None, "IoU*"),
    (None, "IEM + SegNet", 89.3, 55.1, 71.4, "mIoU*"),
    (None, "Melas-Kyriazi et al.", 92.1, 66.4, None, ""),
    (None, "Layered GAN", 94.3, 69.7, 81.7, "mIoU*"),
    ("unet_D_s", "Ours, U-Net on D_s", 95.2, 75.1, 84.8, ""),
    ("unet_D_s_plus_synth", "Ours, U-Net on D_s ∪ D'_s", 95.6, 77.2, 86.0, ""),
)
PAPER_FID_CUB = {1.0: 9.8, 3.0: 11.3, 7.5: 22.3}  # the paper's CUB FID against s (Fig. 8)
COLUMNS = ("acc", "iou", "miou")


def table1_rows(metrics06: dict) -> list[dict]:
    """Table 1's rows: the method, this run's ACC / IoU / mIoU (%, None where the row was not run)
    and the paper's CUB values (%)."""
    ours = metrics06.get("rows", {})
    out = []
    for key, name, acc, iou, miou, note in PAPER_TABLE1:
        row = ours.get(key) if key else None
        out.append({"key": key, "method": name, "note": note,
                    "ours": {c: 100 * row[c] for c in COLUMNS} if row else None,
                    "paper": dict(zip(COLUMNS, (acc, iou, miou)))})
    return out


def _cell(v) -> str:
    return "–" if v is None else f"{v:.1f}"


def table1(metrics06: dict | str | Path) -> str:
    """Table 1 as a markdown table: this run (toy world) beside the paper's CUB numbers. Accepts
    stage 06's metrics dict, its file, or a run folder."""
    m = _metrics(metrics06)
    lines = ["| method | ACC | IoU | mIoU | paper CUB ACC | IoU | mIoU |", "|---|---|---|---|---|---|---|"]
    for r in table1_rows(m):
        ours = [_cell(r["ours"][c]) if r["ours"] else "not run" for c in COLUMNS]
        paper = [_cell(r["paper"][c]) + ("*" if r["note"].lower() == f"{c}*" else "") for c in COLUMNS]
        lines.append(f"| {r['method']} | " + " | ".join(ours + paper) + " |")
    return "\n".join(lines)


def table1_html(metrics06: dict) -> str:
    """Table 1 as an HTML table for the report ('' when stage 06 scored no row)."""
    if not metrics06.get("rows"):
        return ""
    head = "".join(f"<th>{h}</th>" for h in ("method", "ACC", "IoU", "mIoU", "paper CUB ACC", "IoU", "mIoU"))
    body = []
    for r in table1_rows(metrics06):
        ours = [_cell(r["ours"][c]) if r["ours"] else "not run" for c in COLUMNS]
        paper = [_cell(r["paper"][c]) + ("*" if r["note"].lower() == f"{c}*" else "") for c in COLUMNS]
        body.append("<tr>" + "".join(f"<td>{html.escape(x)}</td>" for x in (r["method"], *ours, *paper))
                    + "</tr>")
    return (f"<table class='fgbg'><tr>{head}</tr>{''.join(body)}</table><p>This run's rows are pooled "
            f"over the evaluation split (%). The paper's baseline rows are quoted from Yang et al.; * "
            f"marks cells reconstructed from the paper's extracted text (docs/method.md §3). GrabCut "
            f"starts from a centred rectangle (margin {metrics06.get('grabcut', {}).get('margin')}, "
            f"{metrics06.get('grabcut', {}).get('iterations')} iterations).</p>")


def _metrics(source, stage: str = "06_evaluation") -> dict:
    if isinstance(source, dict):
        return source
    p = Path(source)
    return read_json(p / "metrics" / f"{stage}.json" if p.is_dir() else p)


def fid_table(metrics05: dict | str | Path) -> str:
    """FID per guidance scale s (this run) beside the paper's CUB values, with the floor."""
    m = _metrics(metrics05, "05_synthesis")
    if "fid" not in m:
        return "stage 05 computed no FID (synthesis.fid_features is null)"
    p = m["fid_protocol"]
    lines = ["| s | FID (this run) | paper CUB FID |", "|---|---|---|"]
    for s, v in sorted(m["fid"].items(), key=lambda kv: float(kv[0])):
        paper = PAPER_FID_CUB.get(float(s))
        lines.append(f"| {s}{' (D′)' if float(s) == p['own_scale'] else ''} | {v:.3f} | "
                     f"{'' if paper is None else paper} |")
    lines.append(f"| floor (real vs real) | {m['fid_floor']:.3f} | |" if m.get("fid_floor") is not None
                 else "| floor | – | |")
    return "\n".join(lines) + (f"\n\n{p['n_generated_per_scale']} generated images per s against "
                               f"{p['n_real']} real training images; features: {p['features']} "
                               f"({p['feature_dim']}-d); floor: {p['floor']}.")


def fid_curve(metrics05: dict | str | Path):
    """Fig. 8's numbers: FID of D' against s (this run, with the real-vs-real floor) beside the
    paper's CUB FID (9.8 / 11.3 / 22.3 at s = 1 / 3 / 7.5), on two axes: the feature spaces differ
    (toy network vs Inception), so only the shapes of the curves compare. None without an FID."""
    m = _metrics(metrics05, "05_synthesis")
    if "fid" not in m:
        return None
    s = np.array(sorted(float(k) for k in m["fid"]))
    ours = np.array([m["fid"][f"{v:g}"] for v in s])
    fig, ax = plt.subplots(figsize=(5.5, 3.2))
    ax.plot(s, ours, "o-", color="tab:blue", label="this run (toy features)")
    if m.get("fid_floor") is not None:
        ax.axhline(m["fid_floor"], color="tab:blue", ls=":", lw=1, label="floor: real vs real")
    own = m["fid_protocol"]["own_scale"]
    ax.plot([own], [m["fid"][f"{own:g}"]], "s", color="tab:blue", mfc="none", ms=10, label="D′ of this run")
    ax.set_xlabel("guidance scale s"), ax.set_ylabel("FID, this run", color="tab:blue")
    ax2 = ax.twinx()
    ps = sorted(PAPER_FID_CUB)
    ax2.plot(ps, [PAPER_FID_CUB[v] for v in ps], "^--", color="0.45", label="paper, CUB (Inception)")
    for v in ps:
        ax2.annotate(f"{PAPER_FID_CUB[v]:g}", (v, PAPER_FID_CUB[v]), textcoords="offset points",
                     xytext=(4, -10), fontsize=7, color="0.35")
    ax2.set_ylabel("FID, paper (CUB)", color="0.45")
    handles = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
    ax.set_ylim(bottom=0), ax2.set_ylim(bottom=0)
    ax.legend(handles, [h.get_label() for h in handles], fontsize=7, loc="upper center")
    ax.set_title("FID of D′ against the guidance scale (Fig. 8, Table 3)", fontsize=9)
    fig.tight_layout()
    return fig


def sweep_curve(sweep_dir: str | Path):
    """Fig. 8 from `python -m fgbg_utils guidance-sweep`: FID of D' and the IoU of U-Net(D_s ∪ D'_s)
    (mean ± sd over its init seeds) against s, with the paper's CUB FID. None (and the command
    printed) when the sweep has not been run."""
    path = Path(sweep_dir) / "sweep.json"
    if not path.exists():
        print(f"no guidance sweep at {sweep_dir}; run: python -m fgbg_utils guidance-sweep "
              f"params/toy.yaml --scales 1,2,3,7.5 --unet-seeds 0,1 --out {sweep_dir}")
        return None
    sweep = read_json(path)
    s = np.array([float(k) for k in sweep["rows"]])
    rows = list(sweep["rows"].values())
    fid = np.array([np.nan if r["fid"] is None else r["fid"] for r in rows])
    iou = np.array([r["iou"]["mean"] for r in rows])
    sd = np.array([r["iou"]["sd"] or 0.0 for r in rows])
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.2))
    a.plot(s, fid, "o-", color="tab:blue", label="D′, toy features")
    ps = sorted(PAPER_FID_CUB)
    a2 = a.twinx()
    a2.plot(ps, [PAPER_FID_CUB[v] for v in ps], "^--", color="0.45", label="paper, CUB (Inception)")
    a.set_xlabel("guidance scale s"), a.set_ylabel("FID (ours)", color="tab:blue")
    a2.set_ylabel("FID (paper)", color="0.45"), a.set_ylim(bottom=0), a2.set_ylim(bottom=0)
    a.set_title("FID of D′", fontsize=9)
    handles = a.get_legend_handles_labels()[0] + a2.get_legend_handles_labels()[0]
    a.legend(handles, [h.get_label() for h in handles], fontsize=7, loc="upper center")
    b.errorbar(s, iou, yerr=sd, fmt="o-", capsize=3, color="tab:green")
    b.set_xlabel("guidance scale s"), b.set_ylabel("IoU, U-Net(D_s ∪ D′_s)")
    n = len(sweep["unet_seeds"])
    b.set_title(f"U-Net IoU on the real test images ({'mean ± sd, ' if n > 1 else ''}"
                f"{n} init seed{'s' if n > 1 else ''})", fontsize=9)
    fig.tight_layout()
    return fig
