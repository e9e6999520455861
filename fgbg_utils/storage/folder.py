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
from dataclasses import dataclass
from pathlib import Path

from fgbg_utils.stages.registry import STAGES, ancestors, code_version, stage as get_stage
from fgbg_utils.storage.atomic import atomic_write_json, read_json
from fgbg_utils.storage.errors import StageError
from fgbg_utils.storage.hashes import check_outputs, record_outputs, stage_files
from fgbg_utils.storage.lock import run_lock


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
LATE_DEFAULTS = {"attention": {"layers": None, "aggregation": "cross", "concepts": ["background"]},
                 "model": {"max_sequence_length": None},
                 "segmentation": {"steps_for_images": None, "min_steps": 60}}


def _without_late_defaults(key: str, value):
    late = LATE_DEFAULTS.get(key)
    if not late or not isinstance(value, dict):
        return value
    return {k: v for k, v in value.items() if not (k in late and v == late[k])}


# Keys added to one stage's parameters later, left out of it while at this value: {(stage, key): value}.
# Stage 04 paints the m ablation only on the evaluation split since 369920c (before: every image).
LATE_STAGE_KEYS = {("04", "evaluation.split"): "test"}
_UNSET = object()


def stage_params(cfg, number: str, inputs: tuple[str, ...] | None = None) -> dict:
    """The parameters a stage's outputs depend on: its own and every upstream stage's."""
    out: dict = {}
    for n in _chain(number, inputs):
        for key in STAGES[n].params:
            value = _get(cfg, key)
            if key not in out and LATE_STAGE_KEYS.get((n, key), _UNSET) == value:
                continue  # a later stage of the chain that always had the key still counts it
            out[key] = _portable(_without_late_defaults(key, value))
    return out


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

    from fgbg_utils.data.loader import model_identity

    params = stage_params(cfg, number, inputs)
    code = {}
    for n in _chain(number, inputs):
        code.update(code_version(n))
    code.update(model_identity(cfg))  # the weights of m, by file hash: other weights recompute
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
    from fgbg_utils.data.loader import image_hashes

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
        elif old.get("complete") and (bad := damaged_outputs(cfg, st.number, old)):
            log(f"[fgbg] stage {st.name}: {len(bad)} finished output(s) are missing or were "
                f"altered on disk ({', '.join(bad[:5])}{' …' if len(bad) > 5 else ''}); "
                f"recomputing the stage.")
            recompute = True
    if recompute or not info_path.exists():
        atomic_write_json(info_path, {
            "stage": st.name, "fingerprint": fingerprint([exp.params_fingerprint, exp.code_fingerprint]),
            "params_fingerprint": exp.params_fingerprint, "code_fingerprint": exp.code_fingerprint,
            "params": exp.params, "dataset": exp.dataset, "code": exp.code, "complete": False,
            **({"input_files": image_hashes(cfg)} if st.number == "01" else {})})
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
        changed = _diff(old.get("params", {}), exp.params) + dataset_changes(cfg, old, exp)
        raise StageError(f"{d} holds outputs made with other parameters or data (changed: "
                         f"{changed}). To recompute them: {rerun_hint(cfg, [st.number], True)}. "
                         f"Or use another run folder.", missing=[st.number], needs_force=True)
    return old


def dataset_changes(cfg, info: dict, exp: Expected, run_dir: str | Path | None = None) -> list[str]:
    """['dataset', and the images whose content changed] when the data differ from `info`'s."""
    from fgbg_utils.data.loader import changed_images

    if info.get("dataset") == exp.dataset:
        return []
    first = Path(run_dir or cfg.run_dir) / STAGES["01"].name / "stage.json"
    try:
        recorded = read_json(first).get("input_files")
    except (OSError, ValueError):
        recorded = None
    if not recorded or (info.get("dataset") or {}).get("kind") != exp.dataset.get("kind"):
        return ["dataset"]
    images = changed_images(cfg, recorded)
    more = f" and {len(images) - 10} more" if len(images) > 10 else ""
    return ["dataset"] + ([f"images {', '.join(images[:10])}{more}"] if images else [])


def stage_problem(cfg, stage: str) -> str | None:
    """Why a stage's outputs are not finished for this config and code; None when they are."""
    return _problem(cfg, get_stage(stage).number, Path(cfg.run_dir))


def update_stage(cfg, stage: str, **fields) -> None:
    """Update a stage's stage.json; `complete=True` also records the size, mtime and hash of every
    output file of the stage (its folder and its metrics file)."""
    st = get_stage(stage)
    path = Path(cfg.run_dir) / st.name / "stage.json"
    info = read_json(path)
    info.update(fields)
    if fields.get("complete"):
        files = stage_files(path.parent)
        if (Path(cfg.run_dir) / st.metrics_file).exists():
            files.append(Path(cfg.run_dir) / st.metrics_file)
        info["outputs"] = record_outputs(cfg.run_dir, files, info.get("outputs"))
    atomic_write_json(path, info)


def damaged_outputs(cfg, stage: str, info: dict | None = None, full: bool = False,
                    run_dir: str | Path | None = None) -> list[str]:
    """The recorded outputs of a finished stage that are missing, truncated or altered."""
    where = Path(run_dir or cfg.run_dir)
    if info is None:
        info = read_json(where / get_stage(stage).name / "stage.json")
    return check_outputs(where, info.get("outputs") or {}, full=full)


def _problem(cfg, number: str, run_dir: Path, inputs=None) -> str | None:
    path = run_dir / STAGES[number].name / "stage.json"
    if not path.exists():
        return "missing"
    info = read_json(path)
    if not info.get("complete"):
        return "unfinished"
    exp = expected(cfg, number, inputs)
    if info.get("params_fingerprint") != exp.params_fingerprint:
        changed = _diff(info.get("params", {}), exp.params) + dataset_changes(cfg, info, exp, run_dir)
        return f"made with other parameters or data (changed: {changed})"
    if info.get("code_fingerprint") != exp.code_fingerprint:
        return f"made by other code (changed: {_diff(info.get('code', {}), exp.code)})"
    # the stage's files; its metrics file is checked by verify (stage 03's sample check rewrites
    # it while stages 04 and 05 read their inputs)
    files = {k: v for k, v in (info.get("outputs") or {}).items() if not k.startswith("metrics/")}
    bad = check_outputs(run_dir, files)
    if bad:
        return f"damaged: outputs missing or altered on disk ({', '.join(bad[:5])}{' …' if len(bad) > 5 else ''})"
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
    forced = any(p not in ("missing", "unfinished") and not p.startswith("damaged")
                 for p in problems.values())
    names = ", ".join(STAGES[n].name for n in todo)
    raise StageError(f"{needed_by} needs the outputs of stage {names} in {where}: {what}. "
                     f"Rerun first: {rerun_hint(cfg, todo, forced)}", missing=todo, needs_force=forced)


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
