"""The run folder knows what made its outputs: parameters, upstream stages, the dataset and the
method code. Reruns never silently reuse outputs of other code or data; copied folders resume; two
runs into one folder are stopped."""
import json
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from fgbg_utils import load_params
from fgbg_utils.runs.params import PROJECT_ROOT
from fgbg_utils.runs.run_folder import LOCK_NAME, StageError, run_lock
from fgbg_utils.stages import attention_maps as s01, binarization as s02, finetuning as s03

TOY = PROJECT_ROOT / "params" / "toy.yaml"
TINY = {"dataset.n_train": 3, "dataset.n_test": 2, "T0": 5, "attention.sweep": False,
        "attention.keep_per_layer": False}


def cfg_for(run_dir, **extra):
    return load_params(TOY, {**TINY, **extra}, run_dir=str(run_dir))


def masks(cfg):
    ids = json.loads((s01.Path(cfg.run_dir) / "01_attention_maps" / "summary.json").read_text())["images"]
    return {i: s02.load_mpre(cfg, i) for i in ids}


def test_stage03_refuses_a_stage02_made_for_another_dataset(tmp_path):
    small = cfg_for(tmp_path / "r")
    s01.run(small, progress=False)
    s02.run(small, progress=False)
    other = cfg_for(tmp_path / "r", **{"dataset.n_train": 4, "finetune.max_train_steps": 2})
    with pytest.raises(StageError) as e:
        s03.run(other, progress=False)
    msg = str(e.value)
    assert "02_binarization" in msg and "dataset" in msg
    assert "notebooks/02_binarization.ipynb" in msg and "force = True" in msg
    assert "--stages 01,02 " in msg and "--force" in msg
    assert e.value.missing == ["01", "02"] and e.value.needs_force


def test_copied_run_folder_resumes(tmp_path):
    a = cfg_for(tmp_path / "a")
    s01.run(a, progress=False)
    s02.run(a, progress=False)
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    b = cfg_for(tmp_path / "b")
    assert s01.run(b, progress=False)["n_computed"] == 0
    s02.run(b, progress=False)  # the copy's stage 01 is accepted as its input
    ma, mb = masks(a), masks(b)
    assert all(np.array_equal(ma[k], mb[k]) for k in ma)


def test_concurrent_run_is_stopped_and_stale_lock_taken_over(tmp_path):
    run_dir = tmp_path / "r"
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import time
        from fgbg_utils.runs.run_folder import run_lock
        with run_lock({str(run_dir)!r}):
            print("locked", flush=True)
            time.sleep(60)
        """)], cwd=PROJECT_ROOT, stdout=subprocess.PIPE, text=True,
        env={**os.environ, "FGBG_RUN_LOCK": ""})
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(StageError, match=f"another run \\(pid {holder.pid}"):
            s01.run(cfg_for(run_dir), progress=False)
    finally:
        holder.kill()
        holder.wait()
    # the killed holder left its lock behind: it is stale and taken over
    assert (run_dir / LOCK_NAME).exists()
    with run_lock(run_dir):
        assert json.loads((run_dir / LOCK_NAME).read_text())["pid"] == os.getpid()
    assert not (run_dir / LOCK_NAME).exists()


def _copy_project(dst):
    """A checkout of the package whose sources can be edited, sharing models/ and params/."""
    shutil.copytree(PROJECT_ROOT / "fgbg_utils", dst / "fgbg_utils",
                    ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("models", "params"):
        (dst / name).symlink_to(PROJECT_ROOT / name)
    return dst


def _stage(project, number, run_dir):
    sets = sum([["--set", f"{k}={v}"] for k, v in TINY.items()], [])
    env = {**os.environ, "PYTHONPATH": str(project), "FGBG_RUN_LOCK": ""}
    r = subprocess.run([sys.executable, "-m", "fgbg_utils", "stage", number, "params/toy.yaml",
                        *sets, "--out", str(run_dir)], cwd=project, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout + r.stderr


def test_changed_method_code_recomputes(tmp_path):
    project = _copy_project(tmp_path / "proj")
    run_dir = tmp_path / "run"
    _stage(project, "01", run_dir)
    _stage(project, "02", run_dir)
    before = {p.name: p.read_bytes() for p in (run_dir / "02_binarization" / "masks").glob("*.png")}
    # break the binarization: the threshold moves from the midpoint of the means to near the top
    src = project / "fgbg_utils" / "core" / "binarize.py"
    text = src.read_text()
    assert "return (lo + hi) / 2.0, (lo, hi)" in text
    src.write_text(text.replace("return (lo + hi) / 2.0, (lo, hi)", "return lo + 0.9 * (hi - lo), (lo, hi)"))
    # stage 01's code imports the pipeline, which imports the binarization: it recomputes too
    out = _stage(project, "01", run_dir) + _stage(project, "02", run_dir)
    assert "02_binarization: the method code changed" in out and "core/binarize.py" in out
    after = {p.name: p.read_bytes() for p in (run_dir / "02_binarization" / "masks").glob("*.png")}
    assert before.keys() == after.keys() and any(before[k] != after[k] for k in before)
    # and a downstream stage refuses the stage 01 outputs made before another code change
    src2 = project / "fgbg_utils" / "core" / "attention.py"
    src2.write_text(src2.read_text() + "\n# edited\n")
    env = {**os.environ, "PYTHONPATH": str(project), "FGBG_RUN_LOCK": ""}
    sets = sum([["--set", f"{k}={v}"] for k, v in TINY.items()], [])
    r = subprocess.run([sys.executable, "-m", "fgbg_utils", "stage", "02", "params/toy.yaml", *sets,
                        "--out", str(run_dir)], cwd=project, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 2 and "01_attention_maps is made by other code" in r.stderr
    assert "core/attention.py" in r.stderr and "Traceback" not in r.stderr
