"""`python -m fgbg_utils report DIR`: one self-contained HTML file that opens offline: the run's
Table 2 as a bar chart beside the paper's CUB numbers, the metrics table, then the executed
notebooks of DIR/notebooks (nbconvert's HTML exporter); without ground truth, a gallery of stage
06's masks over their images instead of scores. No script is loaded or run: equations are
converted to MathML when the report is written (latex2mathml), figures are embedded, progress bars
and widget views (which need a browser-side widget manager) are dropped, paths are relative."""
from __future__ import annotations

import copy
import html
import io
import json
import re
from pathlib import Path

from jinja2 import pass_context
from nbconvert import HTMLExporter
from nbconvert.filters.markdown_mistune import IPythonRenderer, MarkdownWithMath

from fgbg_utils.io import atomic_write_text
from fgbg_utils.storage import StageError
from fgbg_utils.stages.registry import STAGE_NAMES as STAGES

PROGRESS = re.compile(r"\d+%\|.*\|")  # a tqdm bar: " 40%|████      | 4/10 [00:01<...]"
WIDGET = "application/vnd.jupyter.widget-view+json"
SCRIPT_MIMES = ("application/javascript", "text/javascript", WIDGET)


def tex_to_mathml(tex: str, display: bool = False) -> str:
    """MathML for a TeX formula; the escaped TeX in <code> when latex2mathml cannot read it."""
    from latex2mathml.converter import convert

    try:
        return convert(tex.strip(), display="block" if display else "inline")
    except Exception:  # latex2mathml raises several kinds; the text stays readable
        return f"<code class='tex'>{html.escape(tex)}</code>"


class MathMLRenderer(IPythonRenderer):
    """nbconvert's markdown renderer with `$…$`, `$$…$$` and LaTeX environments as MathML."""

    def block_math(self, body: str) -> str:
        return tex_to_mathml(body, display=True)

    def inline_math(self, body: str) -> str:
        return tex_to_mathml(body)

    def latex_environment(self, name: str, body: str) -> str:
        return tex_to_mathml(f"\\begin{{{name}}}{body}\\end{{{name}}}", display=True)


class OfflineHTMLExporter(HTMLExporter):
    """The classic HTML export with math rendered at export time."""

    @pass_context
    def markdown2html(self, context, source):
        cell = context.get("cell", {})
        renderer = MathMLRenderer(escape=False, attachments=cell.get("attachments", {}),
                                  embed_images=self.embed_images,
                                  path=context.get("resources", {}).get("metadata", {}).get("path", ""),
                                  anchor_link_text=self.anchor_link_text,
                                  exclude_anchor_links=self.exclude_anchor_links, **self.lexer_options)
        return MarkdownWithMath(renderer=renderer).render(source)


def _final_lines(text: str) -> list[str]:
    """Lines as a terminal shows them (`\\r` rewinds), without progress bars."""
    lines = [line.split("\r")[-1] for line in text.split("\n")]
    return [line for line in lines if not PROGRESS.search(line)]


def static_notebook(nb):
    """A copy of an executed notebook with only what renders without scripts."""
    nb = copy.deepcopy(nb)
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        outputs = []
        for out in cell.outputs:
            if out.output_type == "stream":
                text = "\n".join(_final_lines(out.text))
                if text.strip():
                    out.text = text
                    outputs.append(out)
                continue
            data = out.get("data")
            if data is not None:
                if WIDGET in data:
                    continue  # progress bars and explorers: interactive only
                for mime in SCRIPT_MIMES:
                    data.pop(mime, None)
                if not data:
                    continue
            outputs.append(out)
        cell.outputs = outputs
    nb.metadata.pop("widgets", None)
    return nb


STYLE = re.compile(r"<style[^>]*>.*?</style>", re.S | re.I)
NS_DECLARATION = re.compile(r'\s+xmlns:(ns\d+)="http://www\.w3\.org/1998/Math/MathML"')


def plain_mathml(body: str) -> str:
    """Undo the namespace prefix nbconvert's heading-anchor filter gives MathML in headings
    (ElementTree re-serialises `<math>` as `<ns0:math>` and declares `xmlns:ns0` on the heading):
    an HTML parser knows only the plain `<math>` tag, and showed the prefixed one as flat text."""
    for prefix in set(NS_DECLARATION.findall(body)):
        body = re.sub(rf"<(/?){prefix}:", r"<\1", body)
    return NS_DECLARATION.sub("", body)
SCRIPT = re.compile(r"<script\b[^>]*>.*?</script>", re.S | re.I)


def notebook_body(path: Path) -> tuple[str, str]:
    """(the exporter's <style> blocks, the <body> content) of one executed notebook, scripts removed."""
    import nbformat

    try:
        nb = nbformat.read(str(path), as_version=4)
    except Exception as e:  # noqa: BLE001  (truncated by a full disk, hand-edited...): flag, go on
        return "", (f"<p style='color:#a00'><b>{html.escape(path.name)} is damaged and is not "
                    f"shown</b> ({html.escape(type(e).__name__)}: {html.escape(str(e)[:200])}). "
                    f"Rerunning its stage rewrites it.</p>")
    exporter = OfflineHTMLExporter(template_name="classic")
    page, _ = exporter.from_notebook_node(static_notebook(nb))
    head = page[:page.find("</head>")] if "</head>" in page else ""
    start, end = page.find("<body"), page.rfind("</body>")
    body = page[page.find(">", start) + 1:end] if start >= 0 and end > 0 else page
    return "".join(STYLE.findall(head)), plain_mathml(SCRIPT.sub("", body))


def _table_html(run_dir: Path) -> str:
    from fgbg_utils.runs.runner import METRIC_COLUMNS, metrics_rows

    rows = metrics_rows(run_dir, stages=("02", "04", "06"))
    if not rows:
        return "<p>no ground-truth masks in this dataset: no metrics in this run</p>"
    head = "".join(f"<th>{html.escape(c)}</th>" for c in ("row", *METRIC_COLUMNS, "paper CUB IoU"))
    body = []
    for name, m in rows:
        cells = [f"{m[c]:.3f}" if isinstance(m.get(c), (int, float)) else "–" for c in METRIC_COLUMNS]
        paper = m.get("paper_cub_iou")
        cells.append(f"{paper:.1f}" if paper is not None else "")
        body.append("<tr>" + "".join(f"<td>{html.escape(x)}</td>" for x in (name, *cells)) + "</tr>")
    return f"<table class='fgbg'><tr>{head}</tr>{''.join(body)}</table>"


def table2_chart(metrics: dict) -> str | None:
    """Stage 06's foreground IoU per row beside the paper's CUB numbers (Table 2), as inline SVG;
    None when no row was scored."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    from fgbg_utils.views.evaluation_views import table2_bars

    fig = table2_bars(metrics)
    if fig is None:
        return None
    buf = io.StringIO()
    with plt.rc_context({"svg.fonttype": "path", "svg.hashsalt": "fgbg"}):
        fig.savefig(buf, format="svg", metadata={"Date": None})
    plt.close(fig)
    svg = buf.getvalue()
    return svg[svg.find("<svg"):]


def _chart_html(run_dir: Path) -> str:
    path = run_dir / "metrics" / f"{STAGES['06']}.json"
    if not path.exists():
        return ""
    svg = table2_chart(json.loads(path.read_text()))
    return f"<div class='fgbg-chart'>{svg}</div>" if svg else ""


GALLERY_SIZE = 8     # masks shown when the dataset has no ground truth
GALLERY_SIDE = 192   # px, long side of a gallery thumbnail


def _data_uri(rgb) -> str:
    import base64

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _thumbnail(rgb, side: int = GALLERY_SIDE):
    import numpy as np
    from PIL import Image

    im = Image.fromarray(rgb)
    im.thumbnail((side, side), Image.LANCZOS)
    return np.asarray(im)


def mask_gallery(run_dir: Path, metrics: dict, n: int = GALLERY_SIZE) -> str:
    """A few of stage 06's masks over their images (inline PNGs) with their ids; '' when stage 06
    wrote none. Images that cannot be read any more are named instead."""
    import numpy as np
    from PIL import Image

    from fgbg_utils.data.datasets import DatasetError, load_image
    from fgbg_utils.runs.predict import overlay
    from fgbg_utils.stages.evaluation import ROW_LABELS

    masks = metrics.get("masks") or {}
    items = sorted(masks.get("images", {}).items(), key=lambda kv: (kv[1].get("split") != "test", kv[0]))
    cells, missing = [], []
    for image_id, entry in items[:n]:
        try:
            image = load_image(entry["image"])
            with Image.open(run_dir / entry["mask"]) as m:
                mask = np.asarray(m.convert("L")) > 127
            if mask.shape != image.shape[:2]:
                raise DatasetError(f"mask {mask.shape} vs image {image.shape[:2]}")
        except (OSError, DatasetError) as e:
            missing.append(f"{image_id} ({type(e).__name__})")
            continue
        cells.append(f"<figure><img alt='{html.escape(image_id)}' src='{_data_uri(_thumbnail(image))}'>"
                     f"<img alt='mask of {html.escape(image_id)}' "
                     f"src='{_data_uri(_thumbnail(overlay(image, mask)))}'>"
                     f"<figcaption>{html.escape(image_id)} ({html.escape(str(entry.get('split')))}, "
                     f"{image.shape[1]}×{image.shape[0]} px)</figcaption></figure>")
    if not cells and not missing:
        return ""
    row = masks.get("row", "")
    note = (f"<p>not shown (image or mask unreadable): {html.escape(', '.join(missing))}</p>"
            if missing else "")
    bad = [Path(u["file"]).name for u in masks.get("unreadable", [])]
    if bad:
        note += f"<p>no mask (the file could not be decoded): {html.escape(', '.join(bad))}</p>"
    return (f"<h2>Masks of {html.escape(ROW_LABELS.get(row, row))}</h2><p>No ground truth in this "
            f"dataset, so nothing is scored: here are {len(cells)} of the {masks.get('n_images')} "
            f"masks stage 06 wrote to {html.escape(str(masks.get('folder')))}/ (foreground tinted "
            f"red, background darkened; every image at its own size).</p>"
            f"<div class='fgbg-gallery'>{''.join(cells)}</div>{note}")


def _table1_html(run_dir: Path) -> str:
    """Table 1's layout (ACC, IoU, mIoU) with the paper's CUB numbers beside (views/evidence.py)."""
    path = run_dir / "metrics" / f"{STAGES['06']}.json"
    if not path.exists():
        return ""
    from fgbg_utils.views.evidence import table1_html

    block = table1_html(json.loads(path.read_text()))
    return f"<h2>Table 1: against unsupervised baselines</h2>{block}" if block else ""


def _gallery_html(run_dir: Path) -> str:
    """The mask gallery when stage 06 scored nothing (the dataset has no ground truth)."""
    path = run_dir / "metrics" / f"{STAGES['06']}.json"
    if not path.exists():
        return ""
    metrics = json.loads(path.read_text())
    return "" if metrics.get("rows") else mask_gallery(run_dir, metrics)


def _manifest_html(run_dir: Path) -> str:
    from fgbg_utils.runs.notebook import relative

    path = run_dir / "manifest.json"
    if not path.exists():
        return ""
    m = json.loads(path.read_text())
    stages = ", ".join(f"{k} {v.get('status')} ({v.get('seconds', '?')} s)"
                       for k, v in m.get("stages", {}).items())
    seeds = ", ".join(f"{k}={v}" for k, v in m.get("seeds", {}).items())
    git = m.get("git", {})
    return (f"<p><b>params</b>: {html.escape(relative(str(m.get('params_file'))))} "
            f"{html.escape(' '.join('--set ' + s for s in m.get('overrides', [])))}<br>"
            f"<b>seeds</b>: {html.escape(seeds)}<br><b>stages</b>: {html.escape(stages)}<br>"
            f"<b>git</b>: {html.escape(str(git.get('commit')))}{' (dirty)' if git.get('dirty') else ''}</p>")


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
    name = html.escape(run_dir.resolve().name)
    page = (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>fgbg run {name}</title>"
            f"{style}<style>table.fgbg td,table.fgbg th{{padding:2px 8px;border:1px solid #ccc}}"
            f"h1.fgbg-nb{{border-top:3px solid #444;padding-top:8px}}"
            f".fgbg-chart svg{{max-width:100%;height:auto}}"
            f".fgbg-gallery figure{{display:inline-block;margin:4px;vertical-align:top}}"
            f".fgbg-gallery img{{margin-right:2px}}</style></head><body>"
            f"<div style='margin:1em'><h1>fgbg run: {name}</h1>"
            f"{_manifest_html(run_dir)}{_chart_html(run_dir)}"
            f"<h2>Metrics (evaluation split, pooled)</h2>{_table_html(run_dir)}{_table1_html(run_dir)}"
            f"{_gallery_html(run_dir)}"
            f"<p>{toc}</p></div>{''.join(parts)}</body></html>")
    out = run_dir / "report.html"
    atomic_write_text(out, page)
    return out
