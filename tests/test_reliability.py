"""Nothing lost, nothing stale (issue 15): a refused run changes nothing, inputs and outputs are
known by content, a full or read-only disk and every bad input end in one message (exit 2)."""
import errno
import hashlib
import json
import os
import shutil
import socket
import subprocess
from contextlib import contextmanager

import numpy as np
import pytest
from PIL import Image

from fgbg_utils import load_params
from fgbg_utils.runs.cli import main
from fgbg_utils.stages import attention_maps as s01, binarization as s02
from fgbg_utils.storage import LOCK_NAME, StageError
from tests.fixtures.tiny import TOY

TINY = {"dataset.n_train": 3, "dataset.n_test": 2, "T0": 5, "attention.sweep": False,
        "attention.keep_per_layer": False}
SETS = sum([["--set", f"{k}={v}"] for k, v in TINY.items()], [])


def snapshot(folder) -> dict:
    """{relative path: (sha256, mtime_ns)} of every file under a folder."""
    return {str(p.relative_to(folder)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished stage-01 run made by the CLI (executed notebook included)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    assert main(["run", str(TOY), *SETS, "--stages", "01", "--jobs", "1", "--out", str(out)]) == 0
    return out


@pytest.fixture
def run_copy(finished, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    return out


# ----------------------------------------------------------------------------- finding 1
def test_a_refused_rerun_changes_nothing(run_copy, capsys):
    before = snapshot(run_copy)
    rc = main(["run", str(TOY), *SETS, "--set", "T0=4", "--stages", "01", "--jobs", "1",
               "--out", str(run_copy)])
    err = capsys.readouterr().err
    assert rc == 2 and "T0" in err and "other parameters" in err
    assert snapshot(run_copy) == before  # params.yaml, manifest.json and the notebook untouched


def test_a_failed_stage_keeps_the_finished_notebook(run_copy):
    from fgbg_utils.runs.runner import _keep_failed  # noqa: PLC2701 (the rule under test)

    final = run_copy / "notebooks" / "01_attention_maps.ipynb"
    kept = final.read_bytes()
    failed = json.loads(kept)
    failed["metadata"]["papermill"]["exception"] = True
    partial = final.with_name(".01_attention_maps.partial.ipynb")
    partial.write_text(json.dumps(failed))
    _keep_failed(partial, final)
    assert final.read_bytes() == kept and not partial.exists()
    failed_copy = json.loads(final.with_name("01_attention_maps.failed.ipynb").read_text())
    assert failed_copy["metadata"]["papermill"]["exception"]
    partial.write_text('{"cells": [')  # cut short by a full disk: dropped, never shown as a notebook
    _keep_failed(partial, final)
    assert final.read_bytes() == kept and not partial.exists()


# ----------------------------------------------------------------------------- finding 2
def test_a_run_refused_by_the_lock_writes_nothing(run_copy, capsys, monkeypatch):
    from fgbg_utils.storage import LOCK_ENV

    monkeypatch.delenv(LOCK_ENV, raising=False)
    (run_copy / LOCK_NAME).write_text(json.dumps({"token": "other", "pid": os.getpid(),
                                                  "host": socket.gethostname(), "started": "now"}))
    before = snapshot(run_copy)
    rc = main(["run", str(TOY), *SETS, "--set", "seed=3", "--stages", "01", "--jobs", "1",
               "--out", str(run_copy)])
    assert rc == 2 and "another run" in capsys.readouterr().err
    assert snapshot(run_copy) == before


# ----------------------------------------------------------------------------- finding 3
def bmp_dataset(root, n=4):
    from fgbg_utils.data import toy

    images, _, _, _ = toy.generate_arrays(n, seed=5)
    (root / "images").mkdir(parents=True)
    for i, im in enumerate(images):
        Image.fromarray(im).save(root / "images" / f"im{i}.bmp")
    (root / "split.csv").write_text("id,split\n" + "".join(f"im{i},{'train' if i < n - 1 else 'test'}\n"
                                                           for i in range(n)))
    return root


def test_an_image_replaced_by_another_of_the_same_size_is_noticed(tmp_path):
    root = bmp_dataset(tmp_path / "data")
    cfg = load_params(TOY, {**TINY, "dataset.kind": "folder", "dataset.root": str(root)},
                      run_dir=str(tmp_path / "run"))
    s01.run(cfg, progress=False)
    s02.run(cfg, progress=False)
    a, b = root / "images" / "im0.bmp", root / "images" / "im1.bmp"
    assert a.stat().st_size == b.stat().st_size
    shutil.copyfile(a, b)
    for stage in (s01, s02):
        with pytest.raises(StageError) as e:
            stage.run(cfg, progress=False)
        assert "images/im1.bmp" in str(e.value) and "im0" not in str(e.value)


# ----------------------------------------------------------------------------- finding 4
@pytest.fixture(scope="module")
def two_stages(tmp_path_factory):
    cfg = load_params(TOY, TINY, run_dir=str(tmp_path_factory.mktemp("two") / "run"))
    s01.run(cfg, progress=False)
    s02.run(cfg, progress=False)
    return cfg


def test_an_altered_output_is_named_and_recomputed(two_stages, tmp_path, capsys):
    from fgbg_utils.runs.schedule import pending_stages

    run = tmp_path / "run"
    shutil.copytree(two_stages.run_dir, run)
    cfg = load_params(TOY, TINY, run_dir=str(run))
    victim = sorted((run / "02_binarization" / "masks").glob("*.png"))[0]
    good = victim.read_bytes()
    iou = json.loads((run / "metrics" / "02_binarization.json").read_text())["iou"]
    Image.fromarray(np.full((64, 64), 255, np.uint8)).save(victim)  # a valid, all-white mask
    assert pending_stages(cfg, ["01", "02", "03"], force=False) == ["02", "03"]
    with pytest.raises(StageError, match=f"02_binarization/masks/{victim.name} \\((truncated or )?altered"):
        from fgbg_utils.storage import check_inputs
        check_inputs(cfg, ["02"], "stage 03")
    capsys.readouterr()
    s02.run(cfg, progress=False)
    assert f"masks/{victim.name}" in capsys.readouterr().out
    assert victim.read_bytes() == good
    assert json.loads((run / "metrics" / "02_binarization.json").read_text())["iou"] == iou


def test_verify_lists_missing_truncated_and_altered_outputs(two_stages, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(two_stages.run_dir, run)
    assert main(["verify", str(run)]) == 0
    assert "every recorded output matches" in capsys.readouterr().out
    maps = sorted((run / "01_attention_maps" / "maps").glob("*.npz"))
    maps[0].unlink()
    maps[1].write_bytes(maps[1].read_bytes()[:100])
    mask = sorted((run / "02_binarization" / "masks").glob("*.png"))[0]
    data = bytearray(mask.read_bytes())
    data[-20] ^= 1  # same size, same mtime: only the full check sees it
    st = mask.stat()
    mask.write_bytes(bytes(data))
    os.utime(mask, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert main(["verify", str(run)]) == 1
    out = capsys.readouterr().out
    assert f"01_attention_maps/maps/{maps[0].name} (missing)" in out
    assert f"01_attention_maps/maps/{maps[1].name} (truncated" in out
    assert f"02_binarization/masks/{mask.name} (altered" in out
    assert "--stages 01,02" in out


def test_model_weights_are_known_by_content(two_stages, tmp_path):
    from fgbg_utils.storage import expected

    model = tmp_path / "model"
    shutil.copytree(two_stages.model.path, model)
    cfg = load_params(TOY, {**TINY, "model.path": str(model)}, run_dir=two_stages.run_dir)
    before = expected(cfg, "01").code_fingerprint
    weights = model / "unet" / "diffusion_pytorch_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    exp = expected(cfg, "01")
    assert exp.code_fingerprint != before and "model:unet/diffusion_pytorch_model.safetensors" in exp.code


# ----------------------------------------------------------------------------- full and read-only disks
def test_a_full_disk_is_one_message_and_leaves_nothing_half_written(two_stages, tmp_path, capsys, monkeypatch):
    from fgbg_utils.storage import atomic

    run = tmp_path / "run"
    shutil.copytree(two_stages.run_dir, run)
    shutil.rmtree(run / "02_binarization")
    def full(*a, dir=None, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(dir))
    monkeypatch.setattr(atomic.tempfile, "mkstemp", full)
    assert main(["stage", "02", str(TOY), *SETS, "--out", str(run)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no space left on the disk of ") and str(run) in err
    assert "MB free" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not [p for p in run.rglob("*") if p.name.endswith(".tmp")]


def test_a_read_only_run_folder_is_one_message(two_stages, tmp_path, capsys, monkeypatch):
    from fgbg_utils.storage import atomic

    run = tmp_path / "run"
    shutil.copytree(two_stages.run_dir, run)

    def read_only(*a, **k):
        raise OSError(errno.EROFS, "Read-only file system", str(run / "x"))
    monkeypatch.setattr(atomic.tempfile, "mkstemp", read_only)
    assert main(["stage", "02", str(TOY), *SETS, "--out", str(run), "--force"]) == 2
    err = capsys.readouterr().err
    assert f"{run}/02_binarization is read-only" in err and "Traceback" not in err


@contextmanager
def tmpfs(path, size: str):
    """A small tmpfs at `path` where root may mount one (else the test is skipped: the injected
    OSError tests above cover the same paths)."""
    path.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                       capture_output=True)
    if r.returncode:
        pytest.skip("mounting a tmpfs is not allowed here")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def test_a_real_full_disk_then_a_read_only_one(tmp_path, capsys):
    with tmpfs(tmp_path / "disk", "16k") as disk:
        run = disk / "run"
        assert main(["stage", "01", str(TOY), *SETS, "--out", str(run)]) == 2
        err = capsys.readouterr().err  # (after the model's loading bars)
        assert "error: no space left on the disk of " in err.strip().splitlines()[-1]
        assert str(disk) in err and "Traceback" not in err and err.count("error:") == 1
        for p in run.rglob("*"):  # nothing a later command would read as valid is cut short
            assert not p.name.endswith(".tmp")
            if p.suffix == ".json":
                json.loads(p.read_text())
            elif p.suffix == ".npz":
                np.load(p)["mhat"]
        subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
        assert main(["stage", "01", str(TOY), *SETS, "--out", str(run)]) == 2
        err = capsys.readouterr().err
        assert "is read-only" in err and str(run) in err and "Traceback" not in err


def test_report_flags_a_damaged_notebook(run_copy, capsys):
    nb = run_copy / "notebooks" / "01_attention_maps.ipynb"
    nb.write_bytes(nb.read_bytes()[:1000])  # truncated, as a full disk used to leave it
    assert main(["report", str(run_copy)]) == 0
    page = (run_copy / "report.html").read_text()
    assert "01_attention_maps.ipynb is damaged" in page
    assert main(["verify", str(run_copy)]) == 1
    assert "notebooks/01_attention_maps.ipynb (damaged" in capsys.readouterr().out


# ----------------------------------------------------------------------------- one message each
@pytest.mark.parametrize("sets, words", [
    (["dataset.splits=[]"], "`dataset.splits` is empty"),
    (["finetune.max_train_steps=0"], "`finetune.max_train_steps` is 0"),
    (["dataset.kind=folder", "dataset.root=null"], "`dataset.root` is not set"),
    (["dataset.n_train=0", "dataset.n_test=0"], "both 0"),
])
def test_impossible_parameters_are_refused_before_work(tmp_path, capsys, sets, words):
    out = tmp_path / "run"
    rc = main(["run", str(TOY), *sum([["--set", s] for s in sets], []), "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and words in err and "Traceback" not in err
    assert not out.exists()


def test_no_training_images_is_refused_before_work(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", str(TOY), *SETS, "--set", "dataset.n_train=0", "--out", str(out)]) == 2
    assert "train on the `train` split, which has no images" in capsys.readouterr().err
    assert not out.exists()


def test_a_folder_of_only_corrupt_images_is_refused_by_stage01(tmp_path):
    root = bmp_dataset(tmp_path / "data", n=2)
    for p in (root / "images").iterdir():
        p.write_bytes(b"BM not an image")
    cfg = load_params(TOY, {**TINY, "dataset.kind": "folder", "dataset.root": str(root)},
                      run_dir=str(tmp_path / "run"))
    with pytest.raises(Exception, match="no image of the dataset could be read") as e:
        s01.run(cfg, progress=False)
    assert "im0.bmp" in str(e.value)
    assert not json.loads((tmp_path / "run" / "01_attention_maps" / "stage.json").read_text())["complete"]


def test_damaged_records_and_wrong_paths_are_messages(run_copy, tmp_path, capsys):
    (run_copy / "01_attention_maps" / "stage.json").write_text('{"stage": ')
    assert main(["stage", "02", str(TOY), *SETS, "--out", str(run_copy)]) == 2
    err = capsys.readouterr().err
    assert "01_attention_maps/stage.json is damaged" in err and "Traceback" not in err
    afile = tmp_path / "a_file"
    afile.write_text("x")
    assert main(["run", str(TOY), *SETS, "--stages", "01", "--out", str(afile)]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    assert main(["metrics", str(tmp_path / "nonexistent")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_predict_options_are_checked(tmp_path, capsys):
    afile = tmp_path / "a_file"
    afile.write_text("x")
    (tmp_path / "imgs").mkdir()
    assert main(["predict", "--run", str(tmp_path), "--images", str(tmp_path / "imgs"),
                 "--out", str(tmp_path / "o"), "--batch-size", "-3"]) == 2
    assert "--batch-size -3" in capsys.readouterr().err
    assert main(["predict", "--run", str(tmp_path), "--images", str(tmp_path / "imgs"),
                 "--out", str(afile)]) == 2
    assert "is a file" in capsys.readouterr().err


def test_relative_run_folders_are_read_where_run_writes_them(two_stages, capsys, monkeypatch, tmp_path):
    from fgbg_utils.runs.params import PROJECT_ROOT

    rel = os.path.relpath(two_stages.run_dir, PROJECT_ROOT)
    monkeypatch.chdir(tmp_path)
    assert main(["metrics", rel]) == 0
    assert f"run folder: {two_stages.run_dir}" in capsys.readouterr().out


def test_the_console_names_skipped_images(tmp_path):
    from fgbg_utils.runs.runner import log_skipped

    (tmp_path / "01_attention_maps").mkdir()
    (tmp_path / "01_attention_maps" / "summary.json").write_text(json.dumps(
        {"skipped_images": [["/data/images/bad.jpg", "cannot decode 'bad.jpg' (truncated)"]]}))
    lines = []
    log_skipped(tmp_path, lines.append)
    assert lines and "bad.jpg" in lines[0] and "skipped 1 unreadable image" in lines[0]


def test_a_model_folder_without_a_component_names_it(tmp_path):
    from fgbg_utils.core.models import ModelError
    from fgbg_utils.runs.params import PROJECT_ROOT
    from fgbg_utils.runs.runner import check_model_folder

    model = tmp_path / "model"
    shutil.copytree(PROJECT_ROOT / "models" / "toy-ldm", model)
    check_model_folder(str(model))
    shutil.rmtree(model / "vae")
    with pytest.raises(ModelError, match="has no vae/ folder"):
        check_model_folder(str(model))
