"""`python -m fgbg_utils report DIR`: one HTML file with the run's metrics table on top and the
executed notebooks of DIR/notebooks below (nbconvert's HTML exporter, inputs and outputs)."""
from __future__ import annotations

import html
import json
from pathlib import Path

from fgbg_utils.io import atomic_write_text
from fgbg_utils.runs.run_folder import StageError
from fgbg_utils.stages.registry import STAGE_NAMES as STAGES


def _table_html(run_dir: Path) -> str:
    from fgbg_utils.runs.runner import METRIC_COLUMNS, metrics_rows

    rows = metrics_rows(run_dir, stages=("02", "04", "06"))
    if not rows:
        return "<p>(no metrics with ground truth in this run)</p>"
    head = "".join(f"<th>{html.escape(c)}</th>" for c in ("row", *METRIC_COLUMNS, "paper CUB IoU"))
    body = []
    for name, m in rows:
        cells = [f"{m[c]:.3f}" if isinstance(m.get(c), (int, float)) else "–" for c in METRIC_COLUMNS]
        paper = m.get("paper_cub_iou")
        cells.append(f"{paper:.1f}" if paper is not None else "")
        body.append("<tr>" + "".join(f"<td>{html.escape(x)}</td>" for x in (name, *cells)) + "</tr>")
    return f"<table class='fgbg'><tr>{head}</tr>{''.join(body)}</table>"


def _manifest_html(run_dir: Path) -> str:
    path = run_dir / "manifest.json"
    if not path.exists():
        return ""
    m = json.loads(path.read_text())
    stages = ", ".join(f"{k} {v.get('status')} ({v.get('seconds', '?')} s)"
                       for k, v in m.get("stages", {}).items())
    seeds = ", ".join(f"{k}={v}" for k, v in m.get("seeds", {}).items())
    git = m.get("git", {})
    return (f"<p><b>params</b>: {html.escape(str(m.get('params_file')))} "
            f"{html.escape(' '.join('--set ' + s for s in m.get('overrides', [])))}<br>"
            f"<b>seeds</b>: {html.escape(seeds)}<br><b>stages</b>: {html.escape(stages)}<br>"
            f"<b>git</b>: {html.escape(str(git.get('commit')))}{' (dirty)' if git.get('dirty') else ''}</p>")


def notebook_body(path: Path) -> str:
    """The HTML body of one executed notebook (the exporter's full page, reduced to <body>)."""
    import nbformat
    from nbconvert import HTMLExporter

    exporter = HTMLExporter(template_name="classic")
    page, _ = exporter.from_notebook_node(nbformat.read(str(path), as_version=4))
    start, end = page.find("<body"), page.rfind("</body>")
    head_end = page.find("</head>")
    style = page[page.find("<head>") + 6:head_end] if head_end > 0 else ""
    body = page[page.find(">", start) + 1:end] if start >= 0 and end > 0 else page
    return style, body


def write_report(run_dir: str | Path) -> Path:
    """Write DIR/report.html; refuses a folder without executed notebooks."""
    run_dir = Path(run_dir)
    nb_dir = run_dir / "notebooks"
    notebooks = [nb_dir / f"{name}.ipynb" for name in STAGES.values() if (nb_dir / f"{name}.ipynb").exists()]
    if not notebooks:
        raise StageError(f"{run_dir} has no executed notebooks in notebooks/; run "
                         f"`python -m fgbg_utils run PARAMS.yaml --out {run_dir}` first.")
    parts, style = [], ""
    for path in notebooks:
        style, body = notebook_body(path)
        parts.append(f"<section id='{path.stem}'><h1 class='fgbg-nb'>{html.escape(path.stem)}</h1>"
                     f"{body}</section>")
    toc = " · ".join(f"<a href='#{p.stem}'>{html.escape(p.stem)}</a>" for p in notebooks)
    page = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>fgbg run {html.escape(run_dir.name)}"
            f"</title>{style}<style>table.fgbg td,table.fgbg th{{padding:2px 8px;border:1px solid #ccc}}"
            f"h1.fgbg-nb{{border-top:3px solid #444;padding-top:8px}}</style></head><body>"
            f"<div style='margin:1em'><h1>fgbg run: {html.escape(str(run_dir))}</h1>"
            f"{_manifest_html(run_dir)}<h2>Metrics (evaluation split, pooled)</h2>{_table_html(run_dir)}"
            f"<p>{toc}</p></div>{''.join(parts)}</body></html>")
    out = run_dir / "report.html"
    atomic_write_text(out, page)
    return out
