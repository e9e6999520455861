"""The parallel runner (runs/schedule.py): the job graph follows what each step really reads, and
two single-thread workers give bit for bit the outputs of the stages run one after another."""
import filecmp
import json
from pathlib import Path

import pytest

from fgbg_utils import load_params
from fgbg_utils.runs.run_folder import StageError
from fgbg_utils.runs.schedule import plan, precompute, priorities
from fgbg_utils.stages import evaluation as stage_evaluation
from fgbg_utils.stages.registry import stage_module
from tests.fixtures.tiny import TINY as SHARED, TOY

TINY = {**SHARED, "dataset.n_train": 4, "finetune.max_train_steps": 3, "synthesis.background_images": 1,
        "synthesis.sweep_scales": [1, 3], "segmentation.steps": 4}


def _cfg(tmp_path, name="run", **sets):
    return load_params(TOY, {**TINY, **sets}, run_dir=str(tmp_path / name))


def test_the_graph_follows_what_each_step_reads(tmp_path):
    jobs = {j.name: j for j in plan(_cfg(tmp_path), ["01", "02", "03", "04", "05", "06"])}
    assert jobs["01"].needs == ("01:part0", "01:part1")    # two halves of the image groups, then the summary
    assert [n for n, j in jobs.items() if not j.force] == ["01", "03-eval"]  # they finish forced work
    assert jobs["05"].needs == ("03",)                     # D' is refined in memory: not 04's outputs
    assert jobs["03-eval"].needs == ("03",)                # the sample check beside 04 and 05
    assert jobs["06:unet_M_pre"].needs == ("02",)          # trains while 03 fine-tunes
    assert jobs["06:supervised"].needs == ("01",)
    assert jobs["06:unet_D_s_plus_synth"].needs == ("04", "05")
    assert set(jobs["06"].needs) >= {"03-eval", "06:unet_D_s", "06:supervised"}
    prio = priorities(list(jobs.values()))
    assert prio["03"] > prio["06:unet_M_pre"] and prio["05"] > prio["04"]  # the critical path first
    only = {j.name: j.needs for j in plan(_cfg(tmp_path), ["04", "06"])}
    assert only["04"] == () and only["06:unet_D_s"] == ("04",) and "05" not in only


def test_row_fingerprints_cover_only_their_inputs(tmp_path):
    cfg = _cfg(tmp_path)
    other = _cfg(tmp_path, **{"binarization.orphan_filter": False})  # stage 02's parameter
    fp = stage_evaluation.row_fingerprint
    assert fp(cfg, "unet_M_pre") != fp(other, "unet_M_pre")
    assert fp(cfg, "supervised") == fp(other, "supervised")  # trained from ground truth only
    seg = _cfg(tmp_path, **{"segmentation.steps": 5})
    assert all(fp(cfg, r) != fp(seg, r) for r in stage_evaluation.ROW_INPUTS)


def _outputs(run_dir: Path) -> list[Path]:
    keep = ("02_binarization/masks", "04_refinement/refined", "04_refinement/m_crop",
            "05_synthesis/dataset", "06_evaluation/masks", "06_evaluation/predictions")
    files = [p for k in keep for p in sorted((run_dir / k).rglob("*.png"))]
    return files + sorted((run_dir / "06_evaluation" / "models").glob("*.safetensors"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("schedule")
    one, two = (load_params(TOY, TINY, run_dir=str(tmp / n)) for n in ("one", "two"))
    for n in ("01", "02", "03", "04", "05", "06"):
        stage_module(n).run(one, progress=False)
    seconds = precompute(two, ["01", "02", "03", "04", "05", "06"], workers=2, log=lambda m: None)
    return one, two, seconds


def test_two_workers_give_the_outputs_of_one_sequential_run(runs):
    one, two, seconds = runs
    assert set(seconds) == {j.name for j in plan(two, ["01", "02", "03", "04", "05", "06"])}
    a, b = _outputs(Path(one.run_dir)), _outputs(Path(two.run_dir))
    assert len(a) > 40 and [p.relative_to(one.run_dir) for p in a] == [p.relative_to(two.run_dir) for p in b]
    different = [str(p.relative_to(one.run_dir)) for p, q in zip(a, b) if not filecmp.cmp(p, q, shallow=False)]
    assert different == []
    rows = lambda cfg: json.loads((Path(cfg.run_dir) / "metrics" / "06_evaluation.json").read_text())["rows"]  # noqa: E731
    assert rows(one) == rows(two)
    s03 = json.loads((Path(two.run_dir) / "metrics" / "03_finetuning.json").read_text())
    assert "object_absent" in s03  # evaluated by its own job, after the stage was marked done


def test_a_finished_run_has_no_jobs_left(runs):
    _, two, _ = runs
    assert precompute(two, ["01", "02", "03", "04", "05", "06"], workers=2, log=lambda m: None) == {}


def test_a_job_whose_inputs_are_missing_stops_the_run(tmp_path):
    cfg = _cfg(tmp_path)
    with pytest.raises(StageError, match="needs the outputs of stage 01_attention_maps"):
        precompute(cfg, ["02"], workers=2, log=lambda m: None)
