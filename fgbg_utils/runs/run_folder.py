"""The run folder: one directory per stage (`DIR/<NN_stage>/`), metrics in `DIR/metrics/`, and a
fingerprint per stage in `DIR/<NN_stage>/stage.json`.

A stage's fingerprint covers its parameters and those of every upstream stage, the dataset's
identity, and the version of the method code it ran (a hash of the sources it imports). Paths in it
are relative to the project, so a copied or moved run folder stays valid. Rules:
- same fingerprint: finished outputs are reused (a rerun skips them, an interrupted run resumes);
- other parameters or dataset: refused unless forced (nothing is overwritten silently);
- other code, same parameters: the stage recomputes its outputs;
- an upstream stage that is missing, unfinished, or made with other parameters, data or code:
  refused, naming every stage to rerun with its notebook and CLI command.
"""
from __future__ import annotations

import hashlib
import json
import os
import socket
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from fgbg_utils.io import atomic_write_json, read_json
from fgbg_utils.stages.registry import STAGES, ancestors, code_version, stage as get_stage

LOCK_NAME = ".fgbg.lock"
LOCK_ENV = "FGBG_RUN_LOCK"


class StageError(RuntimeError):
    """A stage cannot run: missing or mismatched inputs from an earlier stage, outputs of other
    parameters, or another run writing into the folder. `missing` lists the stages to (re)run;
    `needs_force` says that --force (force = True in a notebook) would override."""

    def __init__(self, message: str, missing: list[str] | None = None, needs_force: bool = False):
        super().__init__(message)
        self.missing = missing or []
        self.needs_force = needs_force


def fingerprint(subset) -> str:
    return hashlib.sha256(json.dumps(subset, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _get(cfg, dotted: str):
    node = cfg
    for part in dotted.split("."):
        node = getattr(node, part)
    return node.model_dump() if hasattr(node, "model_dump") else node


def _portable(value):
    """Paths inside the project become project-relative (fingerprints survive a moved checkout)."""
    from fgbg_utils.runs.params import relative_to_project

    if isinstance(value, dict):
        return {k: _portable(v) for k, v in value.items()}
    if isinstance(value, str) and value.startswith("/") and Path(value).exists():
        return relative_to_project(value)
    return value


# Parameters added after run folders existed, left out of the fingerprints while at their default
# (the behaviour before they existed), so those folders resume: {section: {name: default}}.
LATE_DEFAULTS = {"attention": {"layers": None}}


def _without_late_defaults(key: str, value):
    late = LATE_DEFAULTS.get(key)
    if not late or not isinstance(value, dict):
        return value
    return {k: v for k, v in value.items() if not (k in late and v == late[k])}


def stage_params(cfg, number: str, inputs: tuple[str, ...] | None = None) -> dict:
    """The parameters a stage's outputs depend on: its own and every upstream stage's."""
    chain = _chain(number, inputs)
    return {key: _portable(_without_late_defaults(key, _get(cfg, key)))
            for n in chain for key in STAGES[n].params}


def _chain(number: str, inputs: tuple[str, ...] | None = None) -> list[str]:
    ups = set()
    for n in (STAGES[number].inputs if inputs is None else inputs):
        ups |= {n, *ancestors(n)}
    return sorted(ups) + [number]


@dataclass
class Expected:
    params: dict
    dataset: dict
    code: dict

    @property
    def params_fingerprint(self) -> str:
        return fingerprint({"params": self.params, "dataset": self.dataset})

    @property
    def code_fingerprint(self) -> str:
        return fingerprint(self.code)


def expected(cfg, number: str, inputs: tuple[str, ...] | None = None) -> Expected:
    """What a stage's stage.json must hold for outputs made from this config and code."""
    from fgbg_utils.data.loader import dataset_identity

    params = stage_params(cfg, number, inputs)
    code = {}
    for n in _chain(number, inputs):
        code.update(code_version(n))
    return Expected(params, dataset_identity(cfg), code)


def stage_dir(cfg, stage: str) -> Path:
    d = Path(cfg.run_dir) / get_stage(stage).name
    d.mkdir(parents=True, exist_ok=True)
    return d


def metrics_path(cfg, stage: str) -> Path:
    return Path(cfg.run_dir) / get_stage(stage).metrics_file


def _diff(old: dict, new: dict, prefix: str = "") -> list[str]:
    keys = sorted(set(old) | set(new))
    out = []
    for k in keys:
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _diff(a, b, f"{prefix}{k}.")
        elif json.dumps(a, sort_keys=True, default=str) != json.dumps(b, sort_keys=True, default=str):
            out.append(f"{prefix}{k}")
    return out


def rerun_hint(cfg, numbers: list[str], force: bool = False) -> str:
    nbs = ", ".join(get_stage(n).notebook for n in numbers)
    cli = (f"python -m fgbg_utils run PARAMS.yaml --stages {','.join(numbers)} --out {cfg.run_dir}"
           + (" --force" if force else ""))
    nb = f"run notebook(s) {nbs}" + (" with force = True in the parameters cell" if force else "")
    return f"In JupyterLab: {nb}. From the shell: {cli}"


def open_stage(cfg, stage: str, force: bool = False, inputs: tuple[str, ...] | None = None,
               log=print) -> tuple[Path, bool]:
    """Create or check DIR/<stage>/stage.json; returns (the stage folder, recompute) where
    recompute is True when finished outputs must not be reused (forced, or made by other code)."""
    st = get_stage(stage)
    check_inputs(cfg, st.inputs if inputs is None else inputs, f"stage {st.number} ({st.module})")
    d = stage_dir(cfg, st.number)
    info_path = d / "stage.json"
    exp = expected(cfg, st.number, inputs)
    recompute = force
    if info_path.exists() and not force:
        old = refuse_other_params(cfg, st.number, inputs)
        if old.get("code_fingerprint") != exp.code_fingerprint:
            changed = _diff(old.get("code", {}), exp.code)
            log(f"[fgbg] stage {st.name}: the method code changed since these outputs were made "
                f"({', '.join(changed)}); recomputing them.")
            recompute = True
    if recompute or not info_path.exists():
        atomic_write_json(info_path, {
            "stage": st.name, "fingerprint": fingerprint([exp.params_fingerprint, exp.code_fingerprint]),
            "params_fingerprint": exp.params_fingerprint, "code_fingerprint": exp.code_fingerprint,
            "params": exp.params, "dataset": exp.dataset, "code": exp.code, "complete": False})
    return d, recompute


def refuse_other_params(cfg, stage: str, inputs: tuple[str, ...] | None = None) -> dict:
    """The stage's stage.json ({} when none); a StageError if it holds outputs made with other
    parameters or data (recomputing them needs force)."""
    st = get_stage(stage)
    d = Path(cfg.run_dir) / st.name
    if not (d / "stage.json").exists():
        return {}
    old, exp = read_json(d / "stage.json"), expected(cfg, st.number, inputs)
    if old.get("params_fingerprint") != exp.params_fingerprint:
        changed = _diff(old.get("params", {}), exp.params) + (
            ["dataset"] if old.get("dataset") != exp.dataset else [])
        raise StageError(f"{d} holds outputs made with other parameters or data (changed: "
                         f"{changed}). To recompute them: {rerun_hint(cfg, [st.number], True)}. "
                         f"Or use another run folder.", missing=[st.number], needs_force=True)
    return old


def stage_problem(cfg, stage: str) -> str | None:
    """Why a stage's outputs are not finished for this config and code; None when they are."""
    return _problem(cfg, get_stage(stage).number, Path(cfg.run_dir))


def update_stage(cfg, stage: str, **fields) -> None:
    path = Path(cfg.run_dir) / get_stage(stage).name / "stage.json"
    info = read_json(path)
    info.update(fields)
    atomic_write_json(path, info)


def _problem(cfg, number: str, run_dir: Path, inputs=None) -> str | None:
    path = run_dir / STAGES[number].name / "stage.json"
    if not path.exists():
        return "missing"
    info = read_json(path)
    if not info.get("complete"):
        return "unfinished"
    exp = expected(cfg, number, inputs)
    if info.get("params_fingerprint") != exp.params_fingerprint:
        changed = _diff(info.get("params", {}), exp.params)
        if info.get("dataset") != exp.dataset:
            changed.append("dataset")
        return f"made with other parameters or data (changed: {changed})"
    if info.get("code_fingerprint") != exp.code_fingerprint:
        return f"made by other code (changed: {_diff(info.get('code', {}), exp.code)})"
    return None


def require_stage(cfg, stage: str, needed_by: str, run_dir: str | Path | None = None) -> dict:
    """The stage.json of a finished upstream stage made for these parameters, data and code; else
    a StageError naming every stage to rerun, its notebook and its CLI command."""
    st = get_stage(stage)
    check_inputs(cfg, (st.number,), needed_by, run_dir)
    return read_json(Path(run_dir or cfg.run_dir) / st.name / "stage.json")


def check_inputs(cfg, inputs, needed_by: str, run_dir: str | Path | None = None) -> None:
    """Refuse, in one message, every upstream stage that is missing, unfinished, or was made with
    other parameters, data or code; name the stages to rerun with their notebooks and CLI."""
    where = Path(run_dir or cfg.run_dir)
    chain = sorted({n for i in inputs for n in (*ancestors(i), i)})
    problems = {n: p for n in chain if (p := _problem(cfg, n, where))}
    if not problems:
        return
    first = min(problems)
    todo = [n for n in chain if n >= first]  # everything downstream of a bad stage is stale too
    what = "; ".join(f"{STAGES[n].name} is {p}" for n, p in problems.items())
    forced = any(p not in ("missing", "unfinished") for p in problems.values())
    names = ", ".join(STAGES[n].name for n in todo)
    raise StageError(f"{needed_by} needs the outputs of stage {names} in {where}: {what}. "
                     f"Rerun first: {rerun_hint(cfg, todo, forced)}", missing=todo, needs_force=forced)


# ----------------------------------------------------------------------------- lock
def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _is_main_process() -> bool:
    return os.environ.get("RANK", "0") == "0" and os.environ.get("LOCAL_RANK", "0") == "0"


@contextmanager
def run_lock(run_dir: str | Path):
    """One run at a time per run folder. Re-entrant for the processes a run starts (notebook
    kernels inherit the token); a stale lock of a dead process on this host is taken over.
    Under `accelerate launch`, the main process holds it for the launch."""
    run_dir = Path(run_dir)
    token = os.environ.get(LOCK_ENV)
    path = run_dir / LOCK_NAME
    if not _is_main_process():
        yield
        return
    if token and path.exists():
        try:
            held = read_json(path).get("token") == token
        except (OSError, ValueError):
            held = False
        if held:  # a process of the run that holds the lock (e.g. its notebook kernel)
            yield
            return
    run_dir.mkdir(parents=True, exist_ok=True)
    mine = {"token": uuid.uuid4().hex, "pid": os.getpid(), "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                other = read_json(path)
            except (OSError, ValueError):
                other = {}
            if other.get("host") == mine["host"] and other.get("pid") and not _alive(int(other["pid"])):
                path.unlink(missing_ok=True)  # stale: its process is gone
                continue
            raise StageError(f"another run (pid {other.get('pid')}, host {other.get('host')}, "
                             f"started {other.get('started')}) is writing into {run_dir}. Wait for "
                             f"it to finish, or use another run folder (--out / run_dir). If no "
                             f"such run exists, delete {path}.") from None
        with os.fdopen(fd, "w") as f:
            json.dump(mine, f)
        break
    old = os.environ.get(LOCK_ENV)
    os.environ[LOCK_ENV] = mine["token"]
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(LOCK_ENV, None)
        else:
            os.environ[LOCK_ENV] = old
        path.unlink(missing_ok=True)


def locked_stage(number: str):
    """Decorator for a stage's `run(cfg, ...)`: holds the run folder's lock while it runs."""
    def wrap(fn):
        import functools

        @functools.wraps(fn)
        def run(cfg, *args, **kwargs):
            with run_lock(cfg.run_dir):
                return fn(cfg, *args, **kwargs)
        run.stage = get_stage(number)
        return run
    return wrap
