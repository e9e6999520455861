"""`python -m fgbg_utils predict` and `runs.predict.Segmenter` on a folder of real photos in odd
formats (tests/fixtures/make_photos.py: EXIF-rotated, CMYK, grey, 16-bit, RGBA, palette, a
non-ASCII name, one truncated file) with one tiny trained toy run: one mask per readable image at
its own upright size, the bad file named (skipped and listed, or stopping the run), overlays, a
rerun (also after an interruption) resumes, the Python API gives the same masks, stage 06's own
masks of the run's images are the same network's, and a run without stage 06 is refused clearly."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fgbg_utils import load_params
from fgbg_utils.data.datasets import load_image
from fgbg_utils.runs import predict as P
from fgbg_utils.runs.cli import main as cli
from fgbg_utils.runs.params import PROJECT_ROOT
from fgbg_utils.stages import attention_maps, binarization, evaluation, finetuning, refinement
from tests.fixtures.make_photos import make_photo_folder

TINY = {"dataset.n_train": 3, "dataset.n_test": 2, "T0": 5, "attention.sweep": False,
        "finetune.max_train_steps": 2, "finetune.batch_size": 2, "finetune.eval_samples": 2,
        "finetune.eval_steps": 2, "refinement.steps": 3, "segmentation.size": 32,
        "segmentation.base_width": 4, "segmentation.depth": 2, "segmentation.steps": 3,
        "segmentation.steps_for_images": 3,
        "segmentation.batch_size": 2, "segmentation.rows": ["unet_M_pre", "unet_D_s"]}
ENV = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT), "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny toy run with stage 06 (two label-free U-Nets; no stage 05 needed for them)."""
    cfg = load_params(PROJECT_ROOT / "params" / "toy.yaml", TINY,
                      run_dir=str(tmp_path_factory.mktemp("predict") / "run"))
    for stage in (attention_maps, binarization, finetuning, refinement, evaluation):
        stage.run(cfg, progress=False, **({"log": lambda m: None} if stage is evaluation else {}))
    return cfg


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    dst = tmp_path_factory.mktemp("photos")
    return dst / "images", make_photo_folder(dst)


def _mask(path) -> np.ndarray:
    a = np.asarray(Image.open(path))
    assert a.dtype == np.uint8 and set(np.unique(a)) <= {0, 255}
    return a > 0


def test_cli_writes_one_mask_per_readable_photo_at_its_size(run, photos, tmp_path):
    folder, info = photos
    out = tmp_path / "masks"
    r = subprocess.run([sys.executable, "-m", "fgbg_utils", "predict", "--run", run.run_dir,
                        "--images", str(folder), "--out", str(out), "--overlay"],
                       capture_output=True, text=True, env=ENV, cwd=PROJECT_ROOT, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "truncated.jpg" in r.stdout + r.stderr and "skipped 1 unreadable" in r.stdout
    readable = {i: d for i, d in info.items() if d["shape"] is not None}
    assert sorted(p.stem for p in out.glob("*.png")) == sorted(readable)
    for i, d in readable.items():
        assert _mask(out / f"{i}.png").shape == d["shape"], i  # own size, upright (EXIF applied)
        ov = np.asarray(Image.open(out / "overlays" / f"{i}.png"))
        assert ov.shape == (*d["shape"], 3), i
    assert info["exif_rotated"]["shape"][0] > info["exif_rotated"]["shape"][1]  # a portrait
    summary = json.loads((out / "predict.json").read_text())
    assert summary["network"]["row"] == "unet_D_s" and summary["complete"]  # best label-free row
    assert [s["file"] for s in summary["skipped"]] == ["truncated.jpg"]
    assert summary["n_written"] == len(readable)


def test_api_gives_the_same_masks(run, photos, tmp_path):
    folder, info = photos
    out = tmp_path / "masks"
    P.predict_folder(run.run_dir, folder, out, progress=False, log=lambda m: None)
    seg = P.Segmenter.from_run(run.run_dir)
    assert seg.row == "unet_D_s"
    ids = sorted(i for i, d in info.items() if d["shape"] is not None)
    files = [info[i]["file"] for i in ids]
    from_files = seg.predict(files)
    from_arrays = seg.predict([load_image(f) for f in files])
    for i, a, b in zip(ids, from_files, from_arrays):
        saved = _mask(out / f"{i}.png")
        assert a.dtype == bool and np.array_equal(a, saved) and np.array_equal(b, saved), i
    other = P.Segmenter.from_run(run.run_dir, row="unet_M_pre")
    assert other.row == "unet_M_pre" and other.predict(files[:1])[0].shape == info[ids[0]]["shape"]


def test_on_corrupt_error_names_the_file(run, photos, tmp_path, capsys):
    folder, _ = photos
    rc = cli(["predict", "--run", run.run_dir, "--images", str(folder), "--out", str(tmp_path / "o"),
              "--on-corrupt", "error"])
    err = capsys.readouterr().err
    assert rc == 2 and "truncated.jpg" in err and "--on-corrupt skip" in err


def test_rerun_resumes_also_after_an_interruption(run, photos, tmp_path, monkeypatch):
    folder, info = photos
    out = tmp_path / "masks"
    real_save = P.atomic_save_png
    calls = []

    def save_then_stop(path, array):
        if len(calls) == 3:
            raise KeyboardInterrupt  # as if ^C after three masks
        calls.append(path)
        return real_save(path, array)

    monkeypatch.setattr(P, "atomic_save_png", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        P.predict_folder(run.run_dir, folder, out, progress=False, log=lambda m: None)
    monkeypatch.setattr(P, "atomic_save_png", real_save)
    first = {p: p.stat().st_mtime_ns for p in calls}
    n_readable = sum(d["shape"] is not None for d in info.values())
    res = P.predict_folder(run.run_dir, folder, out, progress=False, log=lambda m: None)
    assert res["n_kept"] == 3 and res["n_written"] == n_readable - 3
    assert all(p.stat().st_mtime_ns == t for p, t in first.items())  # not recomputed
    # a finished folder: nothing to do but retry the unreadable file; a deleted mask comes back
    victim = out / "grey.png"
    before = _mask(victim)
    victim.unlink()
    again = P.predict_folder(run.run_dir, folder, out, progress=False, log=lambda m: None)
    assert again["n_written"] == 1 and again["n_kept"] == n_readable - 1
    assert np.array_equal(_mask(victim), before)
    # asking for overlays later writes them for the kept masks too
    with_ov = P.predict_folder(run.run_dir, folder, out, with_overlay=True, progress=False,
                               log=lambda m: None)
    assert with_ov["n_written"] == n_readable and len(list((out / "overlays").glob("*.png"))) == n_readable


def test_stage06_masks_of_the_runs_images_are_the_networks(run):
    metrics = json.loads((Path(run.run_dir) / "metrics" / "06_evaluation.json").read_text())
    listed = metrics["masks"]
    assert listed["row"] == "unet_D_s" and listed["n_images"] == 5  # train and test
    assert {e["split"] for e in listed["images"].values()} == {"train", "test"}
    seg = P.Segmenter.from_run(run.run_dir)
    ids = sorted(listed["images"])
    preds = seg.predict([listed["images"][i]["image"] for i in ids])
    for i, pred in zip(ids, preds):
        saved = _mask(Path(run.run_dir) / listed["images"][i]["mask"])
        assert np.array_equal(saved, pred), i


def test_run_without_stage06_is_refused(run, photos, tmp_path, capsys):
    folder, _ = photos
    partial = tmp_path / "partial"
    shutil.copytree(run.run_dir, partial, ignore=shutil.ignore_patterns("06_evaluation"))
    with pytest.raises(P.PredictError, match=r"no trained network[\s\S]*Run stage 06"):
        P.Segmenter.from_run(partial)
    rc = cli(["predict", "--run", str(partial), "--images", str(folder), "--out", str(tmp_path / "o")])
    assert rc == 2 and "Run stage 06" in capsys.readouterr().err
    with pytest.raises(P.PredictError, match="not a folder"):
        P.Segmenter.from_run(tmp_path / "nowhere")
    with pytest.raises(P.PredictError, match="trained: unet_D_s, unet_M_pre"):
        P.Segmenter.from_run(run.run_dir, row="unet_D_s_plus_synth")
    with pytest.raises(P.PredictError, match="is the images folder"):
        P.predict_folder(run.run_dir, folder, folder, progress=False)
