"""Workers die with their run (issue 15, finding 5): after `kill -9` of the main process only, as a
job scheduler or an OOM killer does, no process of the run is left one second later and no file
changes; Ctrl-C is one line, marks the manifest `interrupted`, and the folder resumes."""
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from fgbg_utils.runs.params import PROJECT_ROOT
from tests.fixtures.tiny import TINY, TOY

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc and prctl")


def start(out: Path, sets: dict, *args) -> tuple[subprocess.Popen, str]:
    """The CLI run in its own session, every process of it tagged by an environment variable."""
    tag = uuid.uuid4().hex
    env = {**os.environ, "FGBG_TEST_TAG": tag, "PYTHONPATH": str(PROJECT_ROOT)}
    cmd = [sys.executable, "-m", "fgbg_utils", "run", str(TOY), "--out", str(out), *args,
           *sum([["--set", f"{k}={v}"] for k, v in sets.items()], [])]
    # SIGINT as in a terminal's foreground job: a suite started in the background (`make test &`)
    # hands its children SIGINT ignored, and that run would never see the Ctrl-C
    proc = subprocess.Popen(cmd, env=env, cwd=PROJECT_ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    return proc, tag


def tagged(tag: str) -> list[str]:
    """The processes (pid and command) whose environment holds the tag."""
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            if f"FGBG_TEST_TAG={tag}".encode() in (d / "environ").read_bytes().split(b"\0"):
                cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ")[:120]
                found.append(f"{d.name} {cmd!r}")
        except OSError:
            continue
    return found


def files(folder: Path) -> dict:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in folder.rglob("*") if p.is_file()}


def wait_for(condition, proc, seconds: float) -> None:
    t0 = time.time()
    while not condition():
        assert proc.poll() is None, f"the run ended first: {proc.stderr.read()[-2000:]}"
        assert time.time() - t0 < seconds, "timed out"
        time.sleep(0.2)


def unfinished(stage_json: Path) -> bool:
    try:
        return not json.loads(stage_json.read_text()).get("complete")
    except (OSError, ValueError):
        return False


def test_kill_9_of_the_main_process_mid_stage_03_and_06_leaves_no_worker(tmp_path):
    out = tmp_path / "run"
    sets = {**TINY, "finetune.max_train_steps": 3000, "finetune.checkpoint_every": 1,
            "segmentation.steps": 3000, "segmentation.workers": 2}
    proc, tag = start(out, sets, "--jobs", "2")
    try:
        # stage 03 fine-tunes (checkpoints appear) while a stage-06 U-Net trains in its own pool
        wait_for(lambda: unfinished(out / "03_finetuning" / "stage.json")
                 and (out / "03_finetuning" / "checkpoints").is_dir()
                 and (out / "06_evaluation").is_dir(), proc, 300)
        time.sleep(2)
        running = tagged(tag)
        assert len(running) >= 4, running  # main, job workers, notebook workers, kernels, U-Net pool
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    after_kill = files(out)
    time.sleep(1.0)
    assert tagged(tag) == []
    time.sleep(1.0)
    assert files(out) == after_kill


def test_ctrl_c_is_one_line_marks_the_manifest_and_resumes(tmp_path):
    out = tmp_path / "run"
    # enough work that the interrupt lands mid-stage even when this process is starved (under a
    # loaded xdist worker the 4-image stage could finish, and the run exit 0, before the signal)
    sets = {**TINY, "dataset.n_train": 24, "T0": 25}
    proc, tag = start(out, sets, "--stages", "01", "--jobs", "1")
    wait_for(lambda: unfinished(out / "01_attention_maps" / "stage.json"), proc, 300)
    time.sleep(1)
    assert proc.poll() is None, "the run finished before the interrupt could be sent"
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("interrupted:")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stages"]["01_attention_maps"]["status"] == "interrupted"
    time.sleep(1.0)
    assert tagged(tag) == []
    proc, _ = start(out, sets, "--stages", "01", "--jobs", "1")
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-2000:]
    assert json.loads((out / "01_attention_maps" / "stage.json").read_text())["complete"]
