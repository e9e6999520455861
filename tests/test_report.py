"""report.html opens offline: no scripts, equations as MathML, no progress bars, the Table 2 chart
on top, no machine paths; checked in headless Chromium when it is installed."""
import json
import re
import shutil
from pathlib import Path

import nbformat
import pytest

from fgbg_utils.runs.params import PROJECT_ROOT
from fgbg_utils.runs.report import static_notebook, table2_chart, tex_to_mathml, write_report

# Stage 06's metrics file as the stage writes it (the keys the report reads), for a made-up run.
METRICS06 = {"rows": {k: {"acc": 0.9, "iou": v, "miou": 0.8, "iou_per_image": v, "dice_per_image": v,
                          "box_iou": v} for k, v in (("M_pre", 0.41), ("M", 0.62), ("unet_D_s", 0.8))},
             "paper_cub_iou": {"M_pre": 29.0, "M": 63.6, "unet_D_s": 75.1}}
BAR = " 40%|████      | 4/10 [00:01<00:02,  2.9img/s]"


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """A run folder holding the stored notebooks 01-06 as its executed notebooks, one of them with
    a progress bar (stderr and widget view), and stage 06's metrics."""
    run = tmp_path_factory.mktemp("run")
    (run / "notebooks").mkdir()
    (run / "metrics").mkdir()
    for path in sorted((PROJECT_ROOT / "notebooks").glob("0[1-6]_*.ipynb")):
        shutil.copy(path, run / "notebooks" / path.name)
    nb_path = run / "notebooks" / "01_attention_maps.ipynb"
    nb = nbformat.read(nb_path, as_version=4)
    cell = next(c for c in nb.cells if c.cell_type == "code" and "run_stage01(cfg" in c.source)
    cell.outputs = [nbformat.v4.new_output("stream", name="stderr", text=f"{BAR}\r{BAR}\nkept warning\n"),
                    nbformat.v4.new_output("display_data", data={
                        "application/vnd.jupyter.widget-view+json": {"model_id": "x", "version_major": 2,
                                                                     "version_minor": 0},
                        "text/plain": BAR}), *cell.outputs]
    nbformat.write(nb, nb_path)
    (run / "metrics" / "06_evaluation.json").write_text(json.dumps(METRICS06))
    return write_report(run)


def test_no_scripts_and_math_as_mathml(report):
    page = report.read_text()
    assert "<script" not in page.lower() and 'src="http' not in page and "src='http" not in page
    assert not any(host in page for host in ("cdnjs", "unpkg", "jsdelivr", "require.js", "MathJax.js"))
    assert page.count("<math") > 50
    assert "$$" not in page.split("<section", 1)[1].replace("\\$", "")  # display math all converted


HEADING_MATH = re.compile(r"<h[1-6][^>]*>(?:(?!</h[1-6]>).)*?<math\b", re.S)


def test_headings_hold_plain_mathml(report):
    """Math in headings is plain <math>: nbconvert's anchor filter had made it <ns0:math>, which a
    browser shows as flat text."""
    page = report.read_text()
    assert len(HEADING_MATH.findall(page)) >= 10  # the notebooks' headings hold M̂, M_pre, D'_s, ...
    assert not re.search(r"</?ns\d+:", page) and "xmlns:ns" not in page


def test_progress_bars_removed_warnings_kept(report):
    page = report.read_text()
    assert "4/10 [00:01" not in page and "kept warning" in page


def test_chart_on_top_and_no_machine_paths(report):
    page = report.read_text()
    chart = page.find("fgbg-chart")
    assert 0 < chart < page.find("<section")
    assert "<svg" in page[chart:page.find("<section")]
    assert str(report.parent) not in page  # the run folder is named, not its path


def test_table2_chart_rows():
    svg = table2_chart(METRICS06)
    assert svg.startswith("<svg") and svg.count("<path") > 6
    assert table2_chart({"rows": {}}) is None


def test_tex_to_mathml_falls_back_readably():
    assert "<mfrac>" in tex_to_mathml(r"\frac{a}{b}")
    assert tex_to_mathml(r"\frac{a}{b}", display=True).count('display="block"') == 1


def test_static_notebook_drops_scripts():
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("x", outputs=[nbformat.v4.new_output(
        "display_data", data={"application/javascript": "alert(1)", "text/plain": "x"})])]
    out = static_notebook(nb)
    assert out.cells[0].outputs[0]["data"] == {"text/plain": "x"}
    assert nb.cells[0].outputs[0]["data"]["application/javascript"]  # the input is not changed


# A real CLI run's injected parameters cell and its report: tests/test_runs.py::test_cli_run_writes_run_folder


def _browser():
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    binary = next((b for b in (shutil.which("chromium"), shutil.which("chromium-browser"),
                               shutil.which("google-chrome")) if b), None)
    driver = shutil.which("chromedriver")
    if not binary or not driver:
        pytest.skip("headless Chromium or chromedriver is not installed")
    opts = Options()
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        opts.add_argument(arg)
    opts.binary_location = binary
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(driver), options=opts)


def test_report_in_headless_chromium(report):
    browser = _browser()
    try:
        browser.get(Path(report).resolve().as_uri())
        errors = [e for e in browser.get_log("browser") if e["level"] in ("SEVERE", "ERROR")]
        assert not errors, errors
        n, ns, width = browser.execute_script(
            "const m = document.getElementsByTagName('math');"
            "return [m.length, m[0].namespaceURI, m[0].getBoundingClientRect().width];")
        assert n > 50 and ns == "http://www.w3.org/1998/Math/MathML" and width > 0
        heads = browser.execute_script(
            "return [...document.querySelectorAll('h1 math, h2 math, h3 math')].map("
            "m => [m.namespaceURI, m.getBoundingClientRect().width, m.getBoundingClientRect().height])")
        assert len(heads) >= 10, heads  # math in headings is laid out as MathML, not flat text
        assert all(ns == "http://www.w3.org/1998/Math/MathML" and w > 0 and h > 0 for ns, w, h in heads), heads
        assert browser.execute_script("return document.scripts.length") == 0
        broken = browser.execute_script(
            "return [...document.images].filter(i => !i.complete || i.naturalWidth === 0).length")
        assert broken == 0
        assert browser.execute_script("return document.querySelectorAll('.fgbg-chart svg').length") == 1
    finally:
        browser.quit()
