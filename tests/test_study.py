"""The study (runs/study.py): intervals and verdicts on constructed cases whose answer is known, and a
killed study that resumes with the same numbers."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from scipy.stats import t

from fgbg_utils.runs.study import interval, parse_ints, summarize, verdict
from tests.fixtures.tiny import TINY, TOY


def _values(base, shift, noise, worlds=(0, 1, 2), seeds=(0, 1, 2), seed=0):
    rng = np.random.default_rng(seed)
    return {w: {k: base[w] + shift + noise * rng.standard_normal() for k in seeds} for w in worlds}


def test_interval_is_the_t_interval_over_world_means():
    by_world = [[0.50, 0.52, 0.48], [0.60, 0.61, 0.59], [0.70, 0.72, 0.68]]
    mean, ci = interval(by_world)
    se = np.std([0.5, 0.6, 0.7], ddof=1) / np.sqrt(3)
    assert mean == pytest.approx(0.6)
    assert ci == pytest.approx([0.6 - t.ppf(0.975, 2) * se, 0.6 + t.ppf(0.975, 2) * se])
    # one world: the seeds replicate; a value that is the same for every seed has no interval
    m1, ci1 = interval([[0.5, 0.6, 0.7]])
    assert m1 == pytest.approx(0.6) and ci1 == pytest.approx([0.6 - t.ppf(0.975, 2) * 0.1 / np.sqrt(3),
                                                              0.6 + t.ppf(0.975, 2) * 0.1 / np.sqrt(3)])
    assert interval([[0.4, 0.4, 0.4]]) == (pytest.approx(0.4), None)
    assert [verdict(c) for c in ([0.01, 0.2], [-0.2, -0.01], [-0.1, 0.1], None)] == \
        ["holds", "fails", "unresolved", "unresolved"]


def test_verdicts_on_constructed_studies():
    """Worlds differ a lot (0.5 / 0.7 / 0.9), seeds a little: a paired step of +0.05 holds, one of
    -0.05 fails, and one of 0 ± large seed noise is unresolved, though the rows' own intervals overlap."""
    base = {0: 0.5, 1: 0.7, 2: 0.9}
    values = {"M_pre": _values(base, 0.0, 0.005, seed=1), "M": _values(base, 0.05, 0.005, seed=2),
              "unet_D_s": _values(base, 0.0, 0.005, seed=3),
              "unet_D_s_plus_synth": _values(base, 0.0, 0.05, seed=4)}
    study = summarize(values)
    rows, steps = study["rows"], study["steps"]
    assert rows["M"]["n"] == 9 and len(rows["M"]["values"]) == 9
    lo, hi = rows["M_pre"]["ci"]
    assert lo < rows["M"]["mean"] < hi  # the rows alone cannot tell them apart
    assert steps["M_pre < M"]["verdict"] == "holds"
    assert steps["M_pre < M"]["diff_mean"] == pytest.approx(0.05, abs=0.01)
    assert steps["M < unet_D_s"]["verdict"] == "fails"
    assert steps["unet_D_s < unet_D_s_plus_synth"]["verdict"] == "unresolved"
    assert "grabcut < unet_D_s" not in steps  # rows the study did not measure have no step


def test_parse_ints_names_the_option():
    assert parse_ints("0, 1,2", "--worlds") == [0, 1, 2]
    for bad in ("", "a,b", "1,1", "-1"):
        with pytest.raises(ValueError, match="--worlds"):
            parse_ints(bad, "--worlds")


def _study_cmd(out):
    sets = [a for k, v in TINY.items() for a in ("--set", f"{k}={json.dumps(v) if isinstance(v, list) else v}")]
    return [sys.executable, "-m", "fgbg_utils", "study", str(TOY), "--worlds", "0", "--unet-seeds", "0,1",
            "--out", str(out), "--jobs", "1", *sets]


def test_a_killed_study_resumes(tmp_path):
    """SIGKILL while the U-Nets of the second seed train; the rerun reuses the world's stages, ends,
    and its numbers equal those of a seed trained afresh in another folder."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
    out = tmp_path / "study"
    proc = subprocess.Popen(_study_cmd(out), env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seed1, deadline = out / "world-0" / "unet-seeds" / "seed-1", time.time() + 300
    while not seed1.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "study.json").exists(), "the study finished before it was killed"
    stage_json = (out / "world-0" / "06_evaluation" / "stage.json").read_text()
    res = subprocess.run(_study_cmd(out), env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "jobs on" not in res.stdout  # no stage of the world was recomputed
    assert (out / "world-0" / "06_evaluation" / "stage.json").read_text() == stage_json
    study = json.loads((out / "study.json").read_text())
    assert study["unet_seeds"] == [0, 1] and (out / "study.md").read_text().startswith("# Study")

    import torch
    from fgbg_utils import load_params
    from fgbg_utils.stages.evaluation import unet_rows_with_seed
    cfg = load_params(TOY, {**TINY, "dataset.seed": 0}, run_dir=str(out / "world-0"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the study's process (OMP_NUM_THREADS=1)
    try:
        fresh = unet_rows_with_seed(cfg, 1, tmp_path / "fresh-seed-1", log=lambda *_: None, processes=0)
    finally:
        torch.set_num_threads(threads)
    for row, res_row in fresh.items():
        assert study["per_world"][row]["0"]["1"] == pytest.approx(res_row["iou"], abs=1e-12)
