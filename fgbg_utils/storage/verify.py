"""`python -m fgbg_utils verify DIR`: every output a stage recorded, hashed again and compared;
executed notebooks read as notebooks. Lists what is missing, truncated or altered, with the
command that recomputes it."""
from __future__ import annotations

import json
from pathlib import Path

from fgbg_utils.stages.registry import STAGES
from fgbg_utils.storage.atomic import read_json
from fgbg_utils.storage.errors import StageError
from fgbg_utils.storage.hashes import check_outputs


def rerun_command(run_dir: Path, numbers: list[str]) -> str:
    """The run command of the manifest (its parameter file and overrides) for `numbers`."""
    try:
        m = read_json(run_dir / "manifest.json")
    except (OSError, ValueError):
        m = {}
    sets = "".join(f" --set {s}" for s in m.get("overrides", []))
    return (f"python -m fgbg_utils run {m.get('params_file', 'PARAMS.yaml')}{sets} "
            f"--stages {','.join(numbers)} --out {run_dir}")


def damaged_notebooks(run_dir: Path) -> list[str]:
    """Executed notebooks of the run that are not valid notebooks (e.g. cut short by a full disk)."""
    bad = []
    for path in sorted((run_dir / "notebooks").glob("[0-9]*.ipynb")):
        try:
            nb = json.loads(path.read_text())
            if not isinstance(nb, dict) or "cells" not in nb:
                raise ValueError("no cells")
        except (OSError, ValueError) as e:
            bad.append(f"notebooks/{path.name} (damaged: {str(e)[:80]})")
    return bad


def verify_run(run_dir: str | Path, log=print) -> list[str]:
    """Check a run folder fully; returns the problems (also logged), [] when all outputs match."""
    run_dir = Path(run_dir)
    problems, stale = [], []
    for number, st in STAGES.items():
        path = run_dir / st.name / "stage.json"
        if not path.exists():
            continue
        try:
            info = read_json(path)
        except StageError as e:
            problems.append(str(e))
            log(f"{st.name}: {e}")
            stale.append(number)
            continue
        record = info.get("outputs")
        if not info.get("complete"):
            log(f"{st.name}: unfinished (nothing recorded to check)")
            continue
        if record is None:
            log(f"{st.name}: finished before output hashes were recorded (not checked; rerunning "
                f"the stage records them)")
            continue
        bad = check_outputs(run_dir, record, full=True)
        log(f"{st.name}: {len(record)} file(s), " + (f"{len(bad)} mismatch(es):" if bad else "all match"))
        for b in bad:
            log(f"  {b}")
        if bad:
            stale.append(number)
        problems += bad
    nbs = damaged_notebooks(run_dir)
    for b in nbs:
        log(f"  {b}")
    problems += nbs
    if stale:
        log(f"recompute: {rerun_command(run_dir, stale)}")
    if nbs:
        log("the damaged notebooks are rewritten by the same run command (they show the stage)")
    log(f"verify {run_dir}: " + (f"{len(problems)} problem(s)" if problems else "every recorded output matches"))
    return problems
