"""JupyterLab keeps what a teacher does (`make lab`): saving a notebook writes its paired .py
(notebooks/jupytext.toml, found from Lab's root notebooks/), and an explorer's figure survives
Save, close and reopen (tools/lab_overrides.json makes Lab save widget state). Checked in headless
Chromium with the pinned JupyterLab when both are installed; skipped otherwise."""
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import tomllib
import urllib.request

import nbformat
import pytest

from fgbg_utils.runs.params import PROJECT_ROOT

NOTEBOOKS = PROJECT_ROOT / "notebooks"
OVERRIDES = PROJECT_ROOT / "tools" / "lab_overrides.json"


def test_jupytext_config_in_labs_root_pairs_like_pyproject():
    """Lab's server root is notebooks/ and jupytext looks for its config only up to the root, so
    the pairing lives in notebooks/jupytext.toml, with the settings of [tool.jupytext]."""
    from jupytext.config import find_jupytext_configuration_file

    found = find_jupytext_configuration_file(str(NOTEBOOKS))
    assert found and os.path.samefile(found, NOTEBOOKS / "jupytext.toml")
    ours = tomllib.loads((NOTEBOOKS / "jupytext.toml").read_text())
    project = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())["tool"]["jupytext"]
    assert ours == project and ours["formats"] == "ipynb,py:percent"


def test_make_lab_installs_the_overrides():
    makefile = (PROJECT_ROOT / "Makefile").read_text()
    lab = makefile[makefile.index("\nlab:"):]
    assert "tools/lab_overrides.json" in lab and "share/jupyter/lab/settings/overrides.json" in lab
    assert json.loads(OVERRIDES.read_text())["@jupyter-widgets/jupyterlab-manager:plugin"]["saveState"] is True


PROBE = [
    "# %matplotlib inline\nimport numpy as np\nfrom fgbg_utils.views import explorers",
    "soft = np.linspace(0, 1, 64).reshape(8, 8)\n"
    "explorers.threshold_explorer(soft, np.ones((8, 8), bool), {'threshold': 0.5}, None, interactive=True)",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def lab(tmp_path):
    """A JupyterLab server on a copy of notebooks/' pairing config and a probe notebook (an
    explorer with a widget), with the settings `make lab` installs; yields (url, token, folder)."""
    if shutil.which("jupyter-lab", path=os.path.dirname(sys.executable)) is None:
        pytest.skip("JupyterLab is not installed (pip install -r requirements-lab.txt)")
    root = tmp_path / "notebooks"
    root.mkdir()
    shutil.copy(NOTEBOOKS / "jupytext.toml", root / "jupytext.toml")
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in PROBE])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"}
    nbformat.write(nb, root / "probe.ipynb")
    settings = tmp_path / "settings"
    settings.mkdir()
    shutil.copy(OVERRIDES, settings / "overrides.json")
    port, token = _free_port(), "fgbg-test"
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT), "OMP_NUM_THREADS": "1",
           "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime"), "JUPYTERLAB_WORKSPACES_DIR": str(tmp_path / "ws"),
           "JUPYTERLAB_SETTINGS_DIR": str(tmp_path / "user-settings")}
    server = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser", f"--port={port}", "--ServerApp.ip=127.0.0.1",
         f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}",
         f"--LabApp.app_settings_dir={settings}", "--LabApp.expose_app_in_browser=True", "--allow-root"],
        cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(120):
            try:
                urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=2)
                break
            except OSError:
                time.sleep(0.5)
        else:
            pytest.fail("JupyterLab did not start")
        yield url, token, root
    finally:
        server.terminate()
        server.wait(timeout=30)


def _wait(browser, script: str, timeout: float = 120, what: str = ""):
    end = time.time() + timeout
    while time.time() < end:
        value = browser.execute_script(script)
        if value:
            return value
        time.sleep(0.5)
    pytest.fail(f"timed out waiting for {what or script}")


APP_READY = "return !!(window.jupyterapp && document.querySelector('.jp-NotebookPanel .jp-Cell'))"
KERNEL_IDLE = ("const p = window.jupyterapp.shell.currentWidget;"
               "return !!(p && p.sessionContext && p.sessionContext.session && p.sessionContext.session.kernel"
               " && p.sessionContext.session.kernel.status === 'idle')")
WIDGET_ERRORS = ("return [...document.querySelectorAll('.jp-OutputArea-output')]"
                 ".filter(e => e.textContent.includes('Error displaying widget')).length")
WIDGET_FIGURES = "return document.querySelectorAll('.widget-output img, .jupyter-widgets-output-area img').length"


def _shut_down_kernels(url, token):
    with urllib.request.urlopen(f"{url}/api/kernels?token={token}") as r:
        kernels = json.load(r)
    for k in kernels:
        req = urllib.request.Request(f"{url}/api/kernels/{k['id']}?token={token}", method="DELETE")
        urllib.request.urlopen(req).close()


def _open(browser, url, token):
    browser.get(f"{url}/lab/tree/probe.ipynb?token={token}&reset")
    _wait(browser, APP_READY, what="the notebook to open")


def _console_errors(browser) -> list:
    return [e for e in browser.get_log("browser") if e["level"] == "SEVERE" and "favicon" not in e["message"]]


def test_lab_save_pairs_and_reopen_shows_the_explorer(lab):
    """Open, Run All, Save, close, reopen in headless Chromium: the .py is written by the save, the
    explorer's figure is back after reopening (no 'model not found'), no console errors."""
    from tests.test_report import _browser

    url, token, root = lab
    browser = _browser()
    try:
        _open(browser, url, token)
        _wait(browser, KERNEL_IDLE, what="the kernel")
        browser.execute_script("window.jupyterapp.commands.execute('notebook:run-all-cells')")
        _wait(browser, WIDGET_FIGURES, what="the explorer's figure")
        _wait(browser, KERNEL_IDLE, what="Run All to finish")
        assert not (root / "probe.py").exists()
        browser.execute_script("window.jupyterapp.commands.execute('docmanager:save')")
        _wait(browser, "return !document.querySelector('.jp-mod-dirty')", 30, "the save")
        for _ in range(60):
            if (root / "probe.py").exists():
                break
            time.sleep(0.5)
        py = (root / "probe.py").read_text()
        assert "# %%" in py and "threshold_explorer" in py  # the save wrote the paired source
        saved = nbformat.read(root / "probe.ipynb", as_version=4)
        assert saved.metadata.get("widgets"), "widget state was not saved with the notebook"
        assert not _console_errors(browser)
        browser.execute_script("window.jupyterapp.commands.execute('application:close')")
        _shut_down_kernels(url, token)
        _open(browser, url, token)  # a new page and kernel: the widget models come only from the saved state
        _wait(browser, WIDGET_FIGURES, 60, "the stored figure after reopening")
        time.sleep(2)
        assert browser.execute_script(WIDGET_ERRORS) == 0
        assert not _console_errors(browser)
    finally:
        browser.quit()
