"""Whole-run behaviour on a tiny toy world with the shipped toy model: the CLI writes the run folder
and manifest, outputs are deterministic, reruns skip finished work, interrupted runs resume."""
import json

import numpy as np
import pytest

from fgbg_utils import load_params
from fgbg_utils.stages import attention_maps as stage_attention, binarization as stage_binarization
from fgbg_utils.runs.params import PROJECT_ROOT
from fgbg_utils.runs.run_folder import StageError

TOY = PROJECT_ROOT / "params" / "toy.yaml"
TINY = {"dataset.n_train": 3, "dataset.n_test": 3, "T0": 10, "attention.sweep": False}


def cfg_for(tmp_path, name, **extra):
    return load_params(TOY, {**TINY, **extra}, run_dir=str(tmp_path / name))


def masks_of(cfg):
    s = json.loads((stage_attention.Path(cfg.run_dir) / "01_attention_maps" / "summary.json").read_text())
    return {i: stage_binarization.load_mpre(cfg, i) for i in s["images"]}


def test_deterministic_and_resumable(tmp_path):
    a, b = cfg_for(tmp_path, "a"), cfg_for(tmp_path, "b")
    for cfg in (a, b):
        stage_attention.run(cfg, progress=False)
        stage_binarization.run(cfg, progress=False)
    ma, mb = masks_of(a), masks_of(b)
    assert ma.keys() == mb.keys() and all(np.array_equal(ma[k], mb[k]) for k in ma)
    ra = json.loads((tmp_path / "a" / "metrics" / "02_binarization.json").read_text())
    rb = json.loads((tmp_path / "b" / "metrics" / "02_binarization.json").read_text())
    assert ra["iou"] == rb["iou"] and ra["auc_roc"] == rb["auc_roc"]

    # a rerun computes nothing; an interrupted run (one map missing) resumes with just that one
    assert stage_attention.run(a, progress=False)["n_computed"] == 0
    victim = sorted(ma)[0]
    stage_attention.map_path(a, victim).unlink()
    # its whole batch (a fixed slice of the image list) is recomputed: the same bits as before
    assert stage_attention.run(a, progress=False)["n_computed"] >= 1
    np.testing.assert_array_equal(stage_attention.load_map(a, victim)["mhat"],
                                  stage_attention.load_map(b, victim)["mhat"])


def test_changed_parameters_are_refused_unless_forced(tmp_path):
    cfg = cfg_for(tmp_path, "c")
    stage_attention.run(cfg, progress=False)
    other = load_params(TOY, {**TINY, "T0": 5}, run_dir=cfg.run_dir)
    with pytest.raises(StageError, match="other parameters"):
        stage_attention.run(other, progress=False)
    assert stage_attention.run(other, force=True, progress=False)["n_computed"] == 6


def test_stage02_needs_stage01(tmp_path):
    with pytest.raises(StageError, match="--stages 01"):
        stage_binarization.run(cfg_for(tmp_path, "d"), progress=False)


def test_cli_run_writes_run_folder(tmp_path):
    from fgbg_utils.runs.cli import main

    out = tmp_path / "run"
    sets = sum([["--set", f"{k}={v}"] for k, v in TINY.items()], [])
    # --jobs 1: the stages compute in the notebooks (the job workers are tested by test_end_to_end
    # and test_schedule; here they would only add their start-up)
    assert main(["run", str(TOY), *sets, "--stages", "01,02", "--out", str(out), "--jobs", "1"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["params"]["T0"] == 10 and manifest["seeds"]["seed"] == 0
    assert manifest["versions"]["diffusers"] and "commit" in manifest["git"]
    assert manifest["stages"]["02_binarization"]["status"] == "done"
    for nb in ("01_attention_maps", "02_binarization"):
        assert (out / "notebooks" / f"{nb}.ipynb").exists()
    metrics = json.loads((out / "metrics" / "02_binarization.json").read_text())
    for key in ("n_images", "auc_roc", "acc", "iou", "miou", "iou_per_image", "dice_per_image"):
        assert 0 <= metrics[key] <= 1 or key == "n_images"
    for base in ("all_foreground", "center_disc"):
        assert {"acc", "iou", "miou", "iou_per_image", "dice_per_image"} <= set(metrics["baselines"][base])
    assert len(list((out / "02_binarization" / "masks").glob("*.png"))) == 6
    # the notebooks' injected cell holds the parameters with project-relative paths; the report
    # of the folder opens offline (no scripts, equations as MathML)
    import nbformat

    from fgbg_utils.runs.report import write_report
    nb = nbformat.read(out / "notebooks" / "01_attention_maps.ipynb", as_version=4)
    injected = next(c for c in nb.cells if "injected-parameters" in c.metadata.get("tags", []))
    assert 'params_file = "params/toy.yaml"' in injected.source and "T0 = 10" in injected.source
    assert 'model = {"path": "models/toy-ldm"' in injected.source and "overrides" not in injected.source
    assert str(PROJECT_ROOT) not in injected.source
    page = write_report(out).read_text()
    assert "<script" not in page and "<math" in page
