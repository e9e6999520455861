"""Headless runs: execute the numbered notebooks in order with papermill into one run folder, and
record parameters, seeds, package versions and the git commit in DIR/manifest.json. Each notebook
gets every top-level parameter as a papermill parameter (paths relative to the project root), the
way `papermill NB.ipynb OUT.ipynb -f params/toy.yaml` passes them."""
from __future__ import annotations

import contextlib
import json
import os
import platform
import subprocess
import time
from importlib import metadata
from pathlib import Path

from fgbg_utils.io import atomic_write_json, read_json
from fgbg_utils.storage import run_lock
from fgbg_utils.storage.errors import storage_error
from fgbg_utils.storage.lifetime import pool_worker_init
from fgbg_utils.storage.lock import make_folder
from fgbg_utils.storage.manifest import Manifest, now, read_manifest
from fgbg_utils.runs.notebook import notebook_parameters, portable, relative
from fgbg_utils.runs.params import PROJECT_ROOT, ParamsError, load_params, save_params
from fgbg_utils.stages.registry import STAGE_NAMES as STAGES

NOTEBOOKS = PROJECT_ROOT / "notebooks"
PACKAGES = ("torch", "diffusers", "transformers", "accelerate", "peft", "scikit-learn", "numpy",
            "papermill", "safetensors", "tokenizers")


def parse_stages(text: str | None) -> list[str]:
    available = [k for k, v in STAGES.items() if (NOTEBOOKS / f"{v}.ipynb").exists() and k != "00"]
    if not text:
        return available
    wanted = [s.strip().zfill(2) for s in text.split(",") if s.strip()]
    bad = [s for s in wanted if s not in STAGES or not (NOTEBOOKS / f"{STAGES[s]}.ipynb").exists()]
    if bad:
        raise ParamsError(f"--stages: unknown stage(s) {bad}; available: {', '.join(['00', *available])}")
    return sorted(wanted)


def package_versions() -> dict:
    out = {"python": platform.python_version()}
    for p in PACKAGES:
        try:
            out[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            out[p] = None
    return out


def git_state() -> dict:
    def git(*args):
        r = subprocess.run(["git", *args], cwd=PROJECT_ROOT, capture_output=True, text=True)
        return r.stdout.strip() if r.returncode == 0 else None
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": git("rev-parse", "HEAD"), "dirty": bool(status) if status is not None else None}


def preflight(cfg, stages=()) -> None:
    """Cheap checks before any notebook runs: dataset present, object word known to the model, an
    evaluation split with images when stage 06 is to run."""
    from fgbg_utils.data.loader import load_dataset
    from fgbg_utils.core.models import ModelError, load_tokenizer
    from fgbg_utils.runs.params import resolved_prompt
    from fgbg_utils.core.tokens import prompt_positions

    records, _ = load_dataset(cfg, check=False)  # lists files (stage 01 decodes them); makes the toy world
    check_model_folder(cfg.model.path)
    try:
        from fgbg_utils.core.single_file import is_single_file
        source = cfg.model.config if is_single_file(cfg.model.path) and cfg.model.config else cfg.model.path
        tok = load_tokenizer(source, cfg.model.revision)
    except (OSError, ValueError) as e:
        raise ModelError(f"`model.path`={cfg.model.path!r}: no tokenizer could be loaded "
                         f"({str(e).splitlines()[0]}). Use a diffusers folder or hub id.") from None
    prompt_positions(tok, resolved_prompt(cfg), [cfg.object, *cfg.parts])
    trains = [s for s in ("03", "06") if s in stages]
    if trains and not any(r.split == "train" for r in records):
        raise ParamsError(f"stage(s) {', '.join(trains)} train on the `train` split, which has no "
                          f"images (dataset.splits={cfg.dataset.splits}"
                          + (f", dataset.n_train={cfg.dataset.n_train}" if cfg.dataset.kind == "toy" else "")
                          + "). Give the dataset training images, or run --stages without them.")
    if "03" in stages:
        from fgbg_utils.stages.finetuning import finetune_config
        try:
            finetune_config(cfg)
        except (TypeError, ValueError) as e:
            raise ParamsError(f"the `finetune` section cannot run stage 03: {e}") from None
    split = cfg.evaluation.split
    if "06" in stages and not any(r.split == split for r in records):
        raise ParamsError(f"stage 06 evaluates on `evaluation.split`={split!r}, which has no images "
                          f"(dataset.splits={cfg.dataset.splits}). Add it to dataset.splits, "
                          f"give the dataset {split} images, or run --stages without 06.")


MODEL_COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


def model_components(folder: Path) -> tuple[str, ...]:
    """The component folders a local model folder needs: SD 1.x/2.x's, or for SDXL, SD3 and Flux
    those its model_index.json lists (components listed as [null, null] are absent by design)."""
    from fgbg_utils.core.families import PIPELINES

    index = folder / "model_index.json"
    if not index.is_file():
        return MODEL_COMPONENTS
    try:
        cfg = json.loads(index.read_text())
    except ValueError:
        return MODEL_COMPONENTS
    if cfg.get("_class_name") not in PIPELINES:
        return MODEL_COMPONENTS
    return tuple(k for k, v in cfg.items() if not k.startswith("_") and isinstance(v, list)
                 and len(v) == 2 and v[0] is not None)


def check_model_folder(path: str) -> None:
    """A local diffusers folder holds every component the method loads; name the missing one."""
    from fgbg_utils.core.models import ModelError

    folder = Path(path)
    if not folder.is_dir():
        return
    needed = model_components(folder)
    missing = [c for c in needed if not (folder / c).is_dir()]
    if missing:
        raise ModelError(f"`model.path`={path} has no {', '.join(m + '/' for m in missing)} "
                         f"folder: a diffusers model folder holds {', '.join(c + '/' for c in needed)}. "
                         f"Copy the missing component(s) from the same model, or save the whole "
                         f"pipeline with save_pretrained.")


def resolve_jobs(cfg, jobs: int | str | None) -> int:
    """Worker processes of a run: `auto` is 2 on a CPU with 2 or more cores, 1 on a GPU (its
    stages batch onto the device instead)."""

    from fgbg_utils.training.segnet import resolve_device

    if jobs in (None, "auto"):
        return 1 if resolve_device(cfg.device).type == "cuda" else min(2, os.cpu_count() or 1)
    try:
        n = int(jobs)
    except ValueError:
        n = 0
    if n < 1:
        raise ParamsError(f"--jobs {jobs!r}: use a number >= 1 or auto")
    return n


@contextlib.contextmanager
def ipc_kernel(kernel_name: str = "python3"):
    """A kernel manager whose kernel talks over IPC sockets in a private temporary folder, shut
    down on exit: no "Kernel is running over TCP without encryption" warning per notebook."""
    import tempfile

    from jupyter_client.manager import KernelManager

    with tempfile.TemporaryDirectory(prefix="fgbg-kernel-") as sockets:
        km = KernelManager(kernel_name=kernel_name, transport="ipc", ip=str(Path(sockets) / "kernel"))
        try:
            yield km
        finally:
            if km.has_kernel:
                km.shutdown_kernel()


def execute_notebook(name: str, parameters: dict, run_dir: str) -> float:
    """One stage notebook, executed with papermill into DIR/notebooks/; returns its seconds.
    Papermill writes a hidden partial copy (.NAME.partial.ipynb), renamed into place once whole: a
    failed execution never replaces a finished stage's notebook (it goes to NAME.failed.ipynb
    then), and a full disk leaves no truncated notebook."""
    import logging

    import papermill as pm

    from fgbg_utils.runs.notebook import drop

    # every parameter is passed; the notebooks name only four in their parameters cell
    drop(logging.getLogger("papermill"), "Passed unknown parameter")
    nb_dir = Path(run_dir) / "notebooks"
    final, partial = nb_dir / f"{name}.ipynb", nb_dir / f".{name}.partial.ipynb"
    t0 = time.time()
    try:
        with ipc_kernel() as km:
            pm.execute_notebook(str(NOTEBOOKS / f"{name}.ipynb"), str(partial), parameters=parameters,
                                cwd=str(NOTEBOOKS), progress_bar=False,
                                request_save_on_cell_execute=True, km=km)
    except BaseException as e:
        _keep_failed(partial, final)
        if isinstance(e, OSError) and (err := storage_error(e, nb_dir)) is not None:
            raise err from None
        raise
    os.replace(partial, final)
    (nb_dir / f"{name}.failed.ipynb").unlink(missing_ok=True)
    return time.time() - t0


def _finished_notebook(path: Path) -> bool:
    """An executed notebook that papermill finished without an error."""
    try:
        meta = json.loads(path.read_text()).get("metadata", {}).get("papermill", {})
    except (OSError, ValueError):
        return False
    return not meta.get("exception") and meta.get("end_time") is not None


def _keep_failed(partial: Path, final: Path) -> None:
    """Where a failed execution goes: in place of the notebook, unless that one is finished (then
    NAME.failed.ipynb beside it)."""
    if not partial.exists():
        return
    try:
        json.loads(partial.read_text())
    except (OSError, ValueError):  # cut short (e.g. a full disk): nothing to show
        partial.unlink(missing_ok=True)
        return
    os.replace(partial, final.with_suffix(".failed.ipynb") if _finished_notebook(final) else final)


def check_start(cfg, order: list[str], force: bool) -> None:
    """Everything that would refuse the run, before anything is written: a stage to run whose
    folder holds outputs of other parameters or data (unless forced), and the stages the run
    reads but does not run (missing, unfinished or stale)."""
    from fgbg_utils.runs.notebook import needs
    from fgbg_utils.stages.evaluation import stage_inputs
    from fgbg_utils.storage import check_inputs, refuse_other_params

    keys = [k for k in order if k != "00"]
    if not force:
        for k in keys:
            refuse_other_params(cfg, k, stage_inputs(cfg) if k == "06" else None)
    outside = sorted({n for k in keys for n in needs(cfg, k) if n not in keys})
    if outside:
        check_inputs(cfg, outside, f"run --stages {','.join(keys)}")


def run(params_file: str, sets=(), stages: str | None = None, out: str | None = None,
        force: bool = False, log=print, jobs: int | str | None = "auto") -> Path:
    """Validate the parameters (before any work), then execute the stages' notebooks. With
    several `jobs`, the stages' work runs as a graph of single-thread jobs (runs/schedule.py) and
    each notebook, executed once its stage is done, shows it; with one, the notebooks compute it
    in order. Both give the same bits."""
    cfg = load_params(params_file, sets, run_dir=out)
    workers = resolve_jobs(cfg, jobs)
    order = parse_stages(stages)
    if any(s != "00" for s in order):
        preflight(cfg, order)
    run_dir = Path(cfg.run_dir)
    log(f"[fgbg] run folder: {run_dir}")
    with run_lock(run_dir):  # kernels inherit the lock token: their stages re-enter it
        check_start(cfg, order, force)  # a refused run writes nothing
        make_folder(run_dir / "notebooks")
        save_params(portable(cfg), run_dir / "params.yaml")
        manifest_path = run_dir / "manifest.json"
        manifest = read_manifest(run_dir)
        manifest.update({
            "params_file": relative(params_file), "overrides": list(sets), "params": portable(cfg),
            "seeds": {"seed": cfg.seed, "dataset.seed": cfg.dataset.seed,
                      "binarization.gmm_seed": cfg.binarization.gmm_seed},
            "versions": package_versions(), "git": git_state(), "force": force, "started": now()})
        manifest.pop("interrupted", None)
        atomic_write_json(manifest_path, manifest)
        manifest.pop("jobs", None)
        book = Manifest(run_dir, manifest, log)
        try:
            if "00" in order:
                _execute_in_order(["00"], {}, book)
            stage_keys = [k for k in order if k != "00"]
            if workers > 1 and stage_keys:
                stage_keys = _execute_parallel(cfg, stage_keys, params_file, workers, force, book)
            _execute_in_order(stage_keys, notebook_parameters(cfg, params_file, force=force), book)
        except KeyboardInterrupt:
            book.interrupted()
            raise
    log_skipped(run_dir, log)
    return run_dir


def log_skipped(run_dir: Path, log=print) -> None:
    """Name the images stage 01 skipped as unreadable (the jobs' output does not show them)."""
    path = run_dir / STAGES["01"] / "summary.json"
    try:
        skipped = read_json(path).get("skipped_images", []) if path.exists() else []
    except ValueError:
        return
    if skipped:
        log(f"[fgbg] skipped {len(skipped)} unreadable image(s) (dataset.on_corrupt: skip): "
            + "; ".join(f"{p} ({why})" for p, why in skipped[:20])
            + (f"; … (all in {path})" if len(skipped) > 20 else ""))


def _execute_in_order(keys, parameters: dict, book: Manifest) -> None:
    """The notebooks of `keys`, one after the other; the first failure is raised."""
    for name in (STAGES[k] for k in keys):
        book.start(name)
        t0 = time.time()
        try:
            execute_notebook(name, parameters, str(book.run_dir))
        except KeyboardInterrupt:
            raise
        except Exception as e:
            book.finish(name, time.time() - t0, e)
            raise
        book.finish(name, time.time() - t0)


def _execute_parallel(cfg, keys, params_file, workers: int, force: bool, book: Manifest) -> list[str]:
    """The stages' work as jobs on `workers` processes (runs/schedule.py). Each stage's notebook
    is executed as soon as its work is done, at the lowest CPU priority: it fills cores the jobs
    leave idle and then only reads finished outputs. Returns the stages left for the notebooks to
    compute in order: none, or after a failed job those not shown yet (they resume the work and
    show the failure)."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    from fgbg_utils.runs.schedule import precompute

    params = notebook_parameters(cfg, params_file, force=False)
    shown: dict = {}
    left: list[str] = []
    t0 = time.time()
    with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"),
                             initializer=pool_worker_init, initargs=(os.getpid(), 19)) as pool:
        def show(number: str) -> None:
            book.start(STAGES[number])
            shown[STAGES[number]] = pool.submit(execute_notebook, STAGES[number], params, str(book.run_dir))
        try:
            book.manifest["jobs"] = {"workers": workers,
                                     "seconds": precompute(cfg, keys, workers, force, book.log, show)}
        except Exception as e:
            book.manifest["jobs"] = {"workers": workers, "failed": getattr(e, "job", None),
                                     "error": (str(e).splitlines() or [type(e).__name__])[0][:500]}
            book.log(f"[fgbg] job {getattr(e, 'job', '?')} failed; the notebooks of the stages left "
                     f"run in order and show where")
            left = [k for k in keys if STAGES[k] not in shown]
        book.manifest["jobs"]["wall_seconds"] = round(time.time() - t0, 1)
        errors = []
        for name, fut in shown.items():
            error = fut.exception()
            book.finish(name, 0.0 if error else fut.result(), error)
            if error:
                errors.append(error)
    if errors:
        raise errors[0]
    return left


METRIC_COLUMNS = ("auc_roc", "acc", "iou", "miou", "iou_per_image", "dice_per_image")


def metrics_rows(run_dir: str | Path, stages=("02", "04", "06")) -> list[tuple[str, dict]]:
    """(row name, metrics) for the metrics files of the run, in stage order. Stage 06's table holds
    the direct masks too, so when it is there stage 04's rows are not repeated."""
    rows = []
    mdir = Path(run_dir) / "metrics"
    s02, s04, s06 = (mdir / f"{STAGES[k]}.json" for k in ("02", "04", "06"))
    has06 = s06.exists() and "06" in stages
    if s02.exists() and "02" in stages:
        m = json.loads(s02.read_text())
        if "iou" in m:
            rows.append(("M_pre (stage 02)", m))
            for name, b in m.get("baselines", {}).items():
                rows.append((f"baseline: {name}", b))
    if s04.exists() and "04" in stages and not has06:
        m = json.loads(s04.read_text())
        for key, name in (("m_crop", "M_crop (stage 04 baseline)"), ("refined", "M (stage 04)")):
            if key in m:
                rows.append((name, m[key]))
    if has06:
        from fgbg_utils.stages.evaluation import ROW_LABELS, ROWS
        m = json.loads(s06.read_text())
        for key in ROWS:
            if key in m.get("rows", {}):
                rows.append((f"{ROW_LABELS[key]} (stage 06)",
                             {**m["rows"][key], "paper_cub_iou": m.get("paper_cub_iou", {}).get(key)}))
    return rows


def metrics_table(run_dir: str | Path, stages=("02", "04", "06")) -> str:
    rows = metrics_rows(run_dir, stages)
    if not rows:
        return "no ground-truth masks in this dataset: no metrics in this run"
    paper = any(m.get("paper_cub_iou") is not None for _, m in rows)
    cols = ["row", *METRIC_COLUMNS] + (["paper CUB IoU"] if paper else [])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for name, m in rows:
        cells = [f"{m[c]:.3f}" if isinstance(m.get(c), (int, float)) else "–" for c in METRIC_COLUMNS]
        if paper:
            cells.append(f"{m['paper_cub_iou']:.1f}" if m.get("paper_cub_iou") is not None else "")
        lines.append("| " + " | ".join([name, *cells]) + " |")
    return "\n".join(lines)
