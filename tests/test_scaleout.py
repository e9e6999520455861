"""Stages 01 and 04 under `accelerate launch --cpu --num_processes 2` (real subprocesses, gloo)
give byte-identical outputs to one process; a sharded stage-01 run killed after its first group
(launcher, relaunch and workers all stopped) resumes to identical outputs."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

from fgbg_utils import load_params
from fgbg_utils.io import read_json
from fgbg_utils.runs.params import PROJECT_ROOT
from fgbg_utils.stages import attention_maps as s01, binarization as s02, finetuning as s03, \
    refinement as s04

TOY = PROJECT_ROOT / "params" / "toy.yaml"
# 16 images; attention groups of 2 (batch_rows / T0) and refinement groups of 2: 8 groups each, so a
# kill after the first map lands mid-way even on a quiet machine
TINY = {"dataset.n_train": 14, "dataset.n_test": 2, "T0": 5, "attention.sweep": False,
        "attention.batch_rows": 10, "refinement.batch_size": 2, "refinement.steps": 3,
        "finetune.max_train_steps": 2, "finetune.batch_size": 2, "finetune.eval_samples": 0}
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONHASHSEED": "0",
       "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(PROJECT_ROOT)}


def launch_cmd(stage: str, out: Path) -> list[str]:
    sets = [a for k, v in TINY.items() for a in ("--set", f"{k}={v}")]
    return [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2",
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "-m", "fgbg_utils", "stage", stage, str(TOY), "--out", str(out), *sets]


def launch(stage: str, out: Path) -> subprocess.CompletedProcess:
    res = subprocess.run(launch_cmd(stage, out), env=ENV, cwd=PROJECT_ROOT, capture_output=True,
                         text=True, timeout=180)
    assert res.returncode == 0, res.stderr[-3000:]
    return res


def files(root: Path, sub: str) -> dict:
    """Every file under root/sub: npz as {array name: array}, others as bytes."""
    out = {}
    for p in sorted((root / sub).rglob("*")):
        if p.is_file() and ".tmp" not in p.name:
            if p.suffix == ".npz":
                with np.load(p) as z:
                    out[p.relative_to(root)] = {k: z[k] for k in z.files}
            elif p.name == "stage.json":  # its output record: sizes and hashes, not the mtimes
                info = json.loads(p.read_text())
                info["outputs"] = {k: [size, digest] for k, (size, _, digest) in info.get("outputs", {}).items()}
                out[p.relative_to(root)] = info
            else:
                out[p.relative_to(root)] = p.read_bytes()
    return out


def assert_same(a: Path, b: Path, sub: str, at_least: int) -> None:
    fa, fb = files(a, sub), files(b, sub)
    assert sorted(fa) == sorted(fb)
    assert len(fa) >= at_least
    for name, va in fa.items():
        vb = fb[name]
        if name.name == "stage.json":
            assert va == vb, f"{name} differs"
        elif isinstance(va, dict):
            assert va.keys() == vb.keys(), name
            assert all(np.array_equal(va[k], vb[k]) for k in va), f"{name} differs"
        else:
            assert va == vb, f"{name} differs"


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """Stages 01-04 in this process (one process)."""
    cfg = load_params(TOY, TINY, run_dir=str(tmp_path_factory.mktemp("one") / "run"))
    for stage in (s01, s02, s03):
        stage.run(cfg, progress=False)
    upto03 = tmp_path_factory.mktemp("upto03") / "run"
    shutil.copytree(cfg.run_dir, upto03)
    s04.run(cfg, progress=False)
    return Path(cfg.run_dir), upto03


def test_stage04_two_processes_same_bits(single, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(single[1], out)
    launch("04", out)
    assert_same(single[0], out, "04_refinement", 16 * 5)
    assert read_json(out / "metrics" / "04_refinement.json") == \
        read_json(single[0] / "metrics" / "04_refinement.json")


def _alive_with(marker: str) -> list[int]:
    pids = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if marker in " ".join(p.info["cmdline"] or []):
                pids.append(p.pid)
        except psutil.Error:
            pass
    return pids


def test_stage01_killed_sharded_run_resumes_to_same_bits(single, tmp_path):
    """Killed after its first group: no worker survives; the rerun computes only what is missing,
    in two processes, and every map equals the one-process map."""
    out = tmp_path / "killed"
    maps = out / "01_attention_maps" / "maps"
    proc = subprocess.Popen(launch_cmd("01", out), env=ENV, cwd=PROJECT_ROOT, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not list(maps.glob("*.npz")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the launcher, the relaunch and torchrun at once
    proc.wait()
    written = len(list(maps.glob("*.npz")))
    assert 0 < written < 16, f"{written} maps when killed: not mid-way"
    deadline = time.monotonic() + 20  # the workers (own sessions) follow their dead parent
    while _alive_with(str(out)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _alive_with(str(out)), "workers outlived the killed launch"
    assert not (out / "01_attention_maps" / "summary.json").exists()
    res = launch("01", out)
    summary = read_json(out / "01_attention_maps" / "summary.json")
    assert summary["processes"] == 2, "accelerate ran one process: the relaunch did not happen"
    # a sharded process's progress bar (a shard with nothing left to compute shows none)
    assert "[1/2]" in res.stderr or "[2/2]" in res.stderr
    assert summary["n_images"] == 16 and summary["n_computed"] < 16  # resumed, not recomputed
    assert_same(single[0], out, "01_attention_maps/maps", 16)
