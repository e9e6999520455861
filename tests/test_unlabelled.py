"""A user's unlabelled folder of photos (tests/fixtures/make_photos.py: EXIF-rotated, CMYK, grey,
16-bit, RGBA, palette, a non-ASCII name with spaces, one truncated file) through ALL SIX stages from
the command line (`python -m fgbg_utils run params/folder.yaml`, which executes the notebooks), with
the tiny SD-v1-shaped model: the run completes, the truncated file is skipped and named, stage 06
writes one mask per readable image at its own size, what needs ground truth says so instead of
failing, the report shows a mask gallery; with dataset.on_corrupt=error the run stops at stage 01
with a message naming the file."""
import json
import os
import subprocess
import sys
from pathlib import Path

import nbformat
import numpy as np
import pytest
from PIL import Image

from fgbg_utils.runs.params import PROJECT_ROOT
from fgbg_utils.runs.report import write_report
from tests.fixtures.make_photos import make_photo_folder

TINY = {"model.path": str(PROJECT_ROOT / "tests" / "fixtures" / "tiny-sd"), "device": "cpu",
        "dtype": "float32", "T0": 5, "attention.sweep": False, "finetune.max_train_steps": 2,
        "finetune.batch_size": 2, "finetune.eval_samples": 2, "finetune.eval_steps": 2,
        "refinement.steps": 3, "synthesis.n_images": 2, "synthesis.steps": 3,
        "synthesis.background_images": 1, "synthesis.sweep_seeds": 1, "synthesis.sweep_scales": "[0, 1]",
        "segmentation.size": 32, "segmentation.base_width": 4, "segmentation.depth": 2,
        "segmentation.steps": 3, "segmentation.batch_size": 2}
ENV = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
NO_GT = "no ground-truth masks in this dataset"


def _cli_run(photos: Path, out: Path, *extra: str) -> subprocess.Popen:
    sets = [a for k, v in TINY.items() for a in ("--set", f"{k}={v}")]
    return subprocess.Popen([sys.executable, "-m", "fgbg_utils", "run", "params/folder.yaml",
                             "--out", str(out), "--set", f"dataset.root={photos}", *sets, *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
                            cwd=PROJECT_ROOT)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The full run, and beside it (it stops early) the same run with dataset.on_corrupt=error."""
    tmp = tmp_path_factory.mktemp("unlabelled")
    info = make_photo_folder(tmp / "photos")
    full = _cli_run(tmp / "photos", tmp / "run")
    strict = _cli_run(tmp / "photos", tmp / "strict", "--set", "dataset.on_corrupt=error")
    out = {name: (p.wait(timeout=600), *p.communicate()) for name, p in (("full", full), ("strict", strict))}
    return tmp, info, out


def test_all_six_stages_complete(runs):
    tmp, _, out = runs
    rc, stdout, stderr = out["full"]
    assert rc == 0, stderr[-3000:]
    manifest = json.loads((tmp / "run" / "manifest.json").read_text())
    assert [(k[:2], v["status"]) for k, v in manifest["stages"].items()] == [
        (f"0{n}", "done") for n in range(1, 7)]
    assert NO_GT in stdout  # the metrics table says why it is empty


def test_truncated_file_is_skipped_and_named(runs):
    tmp, info, _ = runs
    summary = json.loads((tmp / "run" / "01_attention_maps" / "summary.json").read_text())
    assert [Path(p).name for p, _ in summary["skipped_images"]] == ["truncated.jpg"]
    assert "truncated" in summary["skipped_images"][0][1]
    assert sorted(summary["splits"]) == sorted(i for i, d in info.items() if d["shape"] is not None)
    nb = nbformat.read(tmp / "run" / "notebooks" / "01_attention_maps.ipynb", as_version=4)
    assert "truncated.jpg" in json.dumps([c.get("outputs", []) for c in nb.cells])


def test_stage06_writes_one_mask_per_readable_image(runs):
    tmp, info, _ = runs
    metrics = json.loads((tmp / "run" / "metrics" / "06_evaluation.json").read_text())
    masks = metrics["masks"]
    readable = {i: d for i, d in info.items() if d["shape"] is not None}
    assert masks["row"] == "unet_D_s_plus_synth" and masks["n_images"] == len(readable)
    assert sorted(masks["images"]) == sorted(readable)
    assert {e["split"] for e in masks["images"].values()} == {"train", "test"}
    folder = tmp / "run" / "06_evaluation" / "masks" / "unet_D_s_plus_synth"
    assert sorted(p.stem for p in folder.glob("*.png")) == sorted(readable)
    for i, d in readable.items():
        m = np.asarray(Image.open(tmp / "run" / masks["images"][i]["mask"]))
        assert m.shape == d["shape"] and set(np.unique(m)) <= {0, 255}, i  # own upright size
    assert [Path(u["file"]).name for u in masks["unreadable"]] == ["truncated.jpg"]
    assert metrics["rows"] == {} and "metrics skipped" in metrics["note"]
    assert metrics["skipped_rows"] == {"supervised": "no training image has a ground-truth mask"}


def test_figures_needing_ground_truth_say_so(runs):
    tmp, _, _ = runs
    said = []
    for name in ("02_binarization", "04_refinement", "06_evaluation"):
        nb = nbformat.read(tmp / "run" / "notebooks" / f"{name}.ipynb", as_version=4)
        outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
        assert not [o for o in outputs if o.output_type == "error"], name
        text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
        said.append(NO_GT in text)
    assert all(said)


def test_report_shows_a_mask_gallery(runs):
    tmp, info, _ = runs
    text = write_report(tmp / "run").read_text()
    gallery = text[text.index("class='fgbg-gallery'"):]
    gallery = gallery[:gallery.index("</div>")]
    assert gallery.count("<img") == 16 and gallery.count("src='data:image/png;base64,") == 16
    assert "café au lait 1" in gallery and "<script" not in text.lower()
    assert "no mask (the file could not be decoded): truncated.jpg" in text
    assert str(tmp) not in gallery  # ids and sizes, no machine paths


def test_on_corrupt_error_stops_the_run(runs):
    tmp, _, out = runs
    rc, _, stderr = out["strict"]
    assert rc != 0 and "error:" in stderr
    manifest = json.loads((tmp / "strict" / "manifest.json").read_text())
    assert {k: v["status"] for k, v in manifest["stages"].items()} == {"01_attention_maps": "failed"}


def test_on_corrupt_error_run_message_names_the_file(runs):
    _, _, out = runs
    stderr = out["strict"][2]
    assert "truncated.jpg" in stderr and "on_corrupt" in stderr


def test_on_corrupt_error_stage_cli_names_the_file(runs, capsys):
    from fgbg_utils.runs.cli import main

    tmp, _, _ = runs
    sets = [a for k, v in TINY.items() for a in ("--set", f"{k}={v}")]
    rc = main(["stage", "01", str(PROJECT_ROOT / "params" / "folder.yaml"), "--out", str(tmp / "strict-stage"),
               "--set", f"dataset.root={tmp / 'photos'}", *sets, "--set", "dataset.on_corrupt=error"])
    err = capsys.readouterr().err
    assert rc == 2 and "truncated.jpg" in err and "on_corrupt" in err
