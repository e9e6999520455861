"""The guidance sweep (runs/guidance_sweep.py, Fig. 8): stages 01-04 once, 05-06 per s, FID and
the U-Net(D_s ∪ D'_s) IoU per s and seed."""
import json
import subprocess
import sys

import pytest

from fgbg_utils.runs.guidance_sweep import parse_scales, sweep_markdown
from tests.fixtures.tiny import TINY, TOY


def test_parse_scales_names_the_option():
    assert parse_scales("3, 1,1") == [1.0, 3.0]
    for bad in ("", "a", "0.5"):
        with pytest.raises(ValueError, match="--scales"):
            parse_scales(bad)


def test_sweep_runs_upstream_once_and_scores_each_scale(tmp_path):
    sets = [a for k, v in TINY.items() for a in ("--set", f"{k}={json.dumps(v) if isinstance(v, list) else v}")]
    out = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "fgbg_utils", "guidance-sweep", str(TOY), "--scales", "1,3",
           "--unet-seeds", "0,1", "--out", str(out), "--jobs", "1", *sets]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    sweep = json.loads((out / "sweep.json").read_text())
    assert list(sweep["rows"]) == ["1", "3"]
    for s in ("1", "3"):
        run = out / f"s-{s}"
        for stage in ("01_attention_maps", "04_refinement"):  # copied from base/, not recomputed
            assert (run / stage / "stage.json").read_text() == (out / "base" / stage / "stage.json").read_text()
        m05 = json.loads((run / "metrics" / "05_synthesis.json").read_text())
        m06 = json.loads((run / "metrics" / "06_evaluation.json").read_text())
        trained = {"unet_M_pre", "unet_D_s", "unet_D_s_plus_synth", "supervised"} & set(m06["rows"])
        assert m05["guidance"] == float(s) and trained == {"unet_D_s_plus_synth"}
        row = sweep["rows"][s]
        assert row["fid"] == pytest.approx(m05["fid"][next(k for k in m05["fid"] if float(k) == float(s))])
        assert row["iou_by_seed"]["0"] == pytest.approx(m06["rows"]["unet_D_s_plus_synth"]["iou"])
        assert row["iou"]["n"] == 2 and (run / "unet-seeds" / "seed-1" / "scores.json").exists()
    assert sweep["rows"]["1"]["fid"] != sweep["rows"]["3"]["fid"]  # D' differs with s
    assert "| 3 |" in sweep_markdown(sweep) and (out / "sweep.md").exists()
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "jobs on" not in again.stdout  # a rerun reuses everything
