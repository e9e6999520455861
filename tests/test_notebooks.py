"""The notebooks as sources: jupytext pairs in sync, ruff-clean, equations that render, one
papermill-native parameters cell; the notebook helper (parameters, messages for notebook users);
the README's papermill commands on a tiny toy world."""
import ast
import json
import os
import re
import subprocess
import sys

import nbformat
import pytest

from fgbg_utils.runs.notebook import (NotebookError, explain, namespace_overrides, notebook_config,
                                      notebook_parameters)
from fgbg_utils.runs.params import PROJECT_ROOT, SCHEMA, ParamsError
from fgbg_utils.runs.run_folder import StageError

NB_DIR = PROJECT_ROOT / "notebooks"
NOTEBOOKS = sorted(NB_DIR.glob("0*_*.ipynb"))
STAGE_NOTEBOOKS = [p for p in NOTEBOOKS if not p.name.startswith("00")]
TOY = "params/toy.yaml"


def test_every_notebook_is_paired():
    assert len(NOTEBOOKS) == 8  # 00, the primer 00b, the stages 01-06
    for nb in NOTEBOOKS:
        assert nb.with_suffix(".py").exists(), f"{nb.name} has no paired .py (jupytext --sync it)"
    assert not (PROJECT_ROOT / "tools" / "build_notebooks.py").exists()


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_pair_in_sync(path):
    """`jupytext --to py:percent` of the .ipynb is the committed .py (inputs only)."""
    r = subprocess.run([sys.executable, "-m", "jupytext", "--to", "py:percent", "--output", "-", str(path)],
                       capture_output=True, text=True, cwd=PROJECT_ROOT, check=True)
    assert r.stdout == path.with_suffix(".py").read_text(), \
        f"{path.name} and its .py differ: run `jupytext --sync {path.relative_to(PROJECT_ROOT)}`"


def test_ruff_on_notebook_sources():
    pytest.importorskip("ruff")
    files = [str(p.with_suffix(".py")) for p in NOTEBOOKS]
    r = subprocess.run([sys.executable, "-m", "ruff", "check", "--output-format", "concise", *files],
                       capture_output=True, text=True, cwd=PROJECT_ROOT)
    assert r.returncode == 0, r.stdout + r.stderr


MATH = re.compile(r"(?<!\\)\$\$(.+?)(?<!\\)\$\$|(?<![$\\])\$(.+?)(?<![$\\])\$", re.S)


def markdown_cells():
    for path in NOTEBOOKS:
        for k, cell in enumerate(nbformat.read(path, as_version=4).cells):
            if cell.cell_type == "markdown":
                yield f"{path.stem} cell {k}", cell.source


def test_markdown_equations_render():
    from fgbg_utils.runs.report import tex_to_mathml

    n = 0
    for where, text in markdown_cells():
        bad = sorted({hex(ord(c)) for c in text if ord(c) < 32 and c not in "\n\t"})
        assert not bad, f"{where}: control characters {bad} (a `\\v` or `\\b` lost its backslash?)"
        code_free = re.sub(r"`[^`]*`", "", text.replace("\\$", ""))
        assert code_free.count("$$") % 2 == 0, f"{where}: unbalanced $$"
        assert code_free.replace("$$", "").count("$") % 2 == 0, f"{where}: unbalanced $"
        for m in MATH.finditer(code_free):
            n += 1
            assert "<math" in tex_to_mathml(m.group(1) or m.group(2)), f"{where}: {m.group(0)!r}"
    assert n > 50  # the notebooks explain the method with equations


def code_cells(path):
    return [c for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code"]


@pytest.mark.parametrize("path", STAGE_NOTEBOOKS, ids=lambda p: p.stem)
def test_one_parameters_cell_then_notebook_config(path):
    cells = code_cells(path)
    tagged = [k for k, c in enumerate(cells) if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1
    k = tagged[0]
    names = {t.id for node in ast.parse(cells[k].source).body if isinstance(node, ast.Assign)
             for t in node.targets}
    assert names == {"params_file", "run_dir", "force", "interactive"}
    assert 'params_file = "params/toy.yaml"' in cells[k].source and 'run_dir = "runs/toy"' in cells[k].source
    assert "-p" in cells[k].source and "-f" in cells[k].source
    assert f'notebook_config(globals(), stage="{path.name[:2]}"' in cells[k + 1].source
    # later cells must not shadow a parameter name: notebook_config reads them from the namespace
    for cell in cells[k + 1:]:
        source = "\n".join(line for line in cell.source.splitlines() if not line.startswith("%"))
        assigned = {t.id for node in ast.walk(ast.parse(source)) if isinstance(node, (ast.Assign, ast.For))
                    for t in ast.walk(node.targets[0] if isinstance(node, ast.Assign) else node.target)
                    if isinstance(t, ast.Name)}
        assert not assigned & set(SCHEMA), f"{path.name} assigns {assigned & set(SCHEMA)}"


def test_stored_kernelspec_is_the_one_make_lab_registers():
    makefile = (PROJECT_ROOT / "Makefile").read_text()
    assert '--name python3 --display-name "Python 3 (ipykernel)"' in makefile
    for path in NOTEBOOKS:
        spec = nbformat.read(path, as_version=4).metadata["kernelspec"]
        assert spec == {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"}


# --- the helper ---------------------------------------------------------------------------------

def test_notebook_config_merges_namespace_over_params_file(tmp_path):
    ns = {"params_file": TOY, "run_dir": str(tmp_path / "r"), "force": False, "interactive": False,
          "T0": 30, "dataset": "{n_train: 8}", "finetune": {"batch_size": 2}}
    cfg = notebook_config(ns)
    assert cfg.T0 == 30 and cfg.run_dir == str(tmp_path / "r")
    assert cfg.dataset.n_train == 8 and cfg.dataset.n_test == 64  # merged over toy.yaml
    assert cfg.finetune.batch_size == 2 and cfg.finetune.max_train_steps == 1500
    with pytest.raises(ParamsError, match="(?s)T0.*Fix the parameters cell"):
        notebook_config({**ns, "T0": 99})
    with pytest.raises(ParamsError, match="dataset"):
        namespace_overrides({"dataset": "{n_train: [8"})


def test_cli_parameters_are_relative_and_reproduce_the_config(tmp_path):
    from fgbg_utils import load_params

    run_dir = PROJECT_ROOT / "runs" / "pytest-params"
    cfg = load_params(TOY, {"T0": 12}, run_dir=str(run_dir))
    params = notebook_parameters(cfg, PROJECT_ROOT / TOY)
    assert str(PROJECT_ROOT) not in json.dumps(params)
    assert params["params_file"] == TOY and params["run_dir"] == "runs/pytest-params"
    assert params["model"]["path"] == "models/toy-ldm" and "overrides" not in params
    assert notebook_config(params) == cfg


def test_missing_stages_named_with_notebooks(tmp_path):
    ns = {"params_file": TOY, "run_dir": str(tmp_path), "force": False}
    with pytest.raises(NotebookError) as e:
        notebook_config(ns, stage="06")
    msg = str(e.value)
    for name in ("01_attention_maps", "02_binarization", "03_finetuning", "04_refinement", "05_synthesis"):
        assert name in msg
    assert "Run notebooks" in msg and "--stages 01,02,03,04,05" in msg
    assert e.value.missing == ["01_attention_maps", "02_binarization", "03_finetuning", "04_refinement",
                               "05_synthesis"]
    # the stage code's CLI hint becomes a notebook hint
    cfg = notebook_config(ns)
    err = StageError("x holds outputs made with other parameters or data (changed: ['T0']). To "
                     "recompute them: In JupyterLab: ... From the shell: python -m fgbg_utils run "
                     "PARAMS.yaml --stages 01 --out x --force. Or use another run folder.",
                     missing=["01"], needs_force=True)
    assert "Set force = True in the parameters cell" in explain(err, cfg, "01")
    assert "--force" not in explain(err, cfg, "01")
    assert "Rerun notebook 01_attention_maps first with force = True" in explain(err, cfg, "02")
    err = StageError("stage 06 (evaluation) needs the outputs of stage 04_refinement, which are missing")
    assert "04_refinement" in explain(err, cfg, "06") and "01_attention_maps" in explain(err, cfg, "06")


# --- papermill, the README way (a tiny toy world) ---------------------------------------------

def papermill(tmp_path, notebook, *args):
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT), "OMP_NUM_THREADS": "1"}
    out = tmp_path / f"out-{notebook}"
    r = subprocess.run([sys.executable, "-m", "papermill", str(NB_DIR / notebook), str(out), *args,
                        "--cwd", str(NB_DIR), "--log-level", "ERROR"],
                       capture_output=True, text=True, env=env, cwd=PROJECT_ROOT, timeout=600)
    return r, nbformat.read(out, as_version=4) if out.exists() else None


def test_readme_papermill_commands(tmp_path):
    run = tmp_path / "pm"
    tiny = ["-p", "dataset", "{n_train: 2, n_test: 2}", "-p", "interactive", "False"]
    # stage 02 first: the message names the notebook to run
    r, nb = papermill(tmp_path, "02_binarization.ipynb", "-p", "run_dir", str(run), *tiny)
    assert r.returncode != 0
    errors = [o for c in nb.cells for o in c.get("outputs", []) if o.output_type == "error"]
    assert "Run notebook 01_attention_maps first" in "\n".join(errors[0].traceback)

    r, nb = papermill(tmp_path, "01_attention_maps.ipynb", "-f", str(PROJECT_ROOT / TOY),
                      "-p", "run_dir", str(run), "-p", "T0", "30", *tiny)
    assert r.returncode == 0, r.stderr[-3000:]
    stage = json.loads((run / "01_attention_maps" / "stage.json").read_text())
    assert stage["complete"] and stage["params"]["T0"] == 30
    assert stage["params"]["dataset.n_train"] == 2 and stage["params"]["dataset.kind"] == "toy"
    stderr = "".join(o.text for c in nb.cells for o in c.get("outputs", [])
                     if o.output_type == "stream" and o.name == "stderr")
    assert "torchvision" not in stderr and "ImageProcessor" not in stderr
