"""The notebooks' setup: parameters the papermill way, quiet libraries and messages for notebook users.

A stage notebook's `parameters` cell holds `params_file`, `run_dir`, `force` and `interactive`;
papermill (`-p KEY VALUE`, `-f FILE.yaml`) may inject any top-level key of the parameter schema
after it (nested sections come as dicts). The next cell calls `cfg = notebook_config(globals())`:

    defaults <- params_file <- top-level parameter keys in the namespace <- run_dir

validated by `load_params` like the CLI.
"""
from __future__ import annotations

import logging
import re
import warnings
from pathlib import Path

from fgbg_utils.runs.params import PROJECT_ROOT, SCHEMA, ParamsError, load_params
from fgbg_utils.storage import StageError
from fgbg_utils.stages.registry import STAGE_NAMES as STAGES



class NotebookError(StageError):
    """A message already written for a notebook user (`explain`'s output)."""

    explained = True

    def __init__(self, message: str, missing=()):
        super().__init__(message)
        self.missing = list(missing)
        self.needs_force = False


def needs(cfg, stage: str) -> list[str]:
    """The stages `stage` reads, directly or through its inputs (in order; stage 06 reads 05 only
    for the U-Net on D_s ∪ D'_s)."""
    from fgbg_utils.stages.registry import STAGES as REGISTRY, ancestors

    direct = list(REGISTRY[stage].inputs)
    if stage == "06" and cfg is not None and "unet_D_s_plus_synth" not in cfg.segmentation.rows:
        direct.remove("05")
    return sorted({n for d in direct for n in (d, *ancestors(d))})


def stage_complete(run_dir: str | Path, stage: str) -> bool:
    import json

    path = Path(run_dir) / STAGES[stage] / "stage.json"
    try:
        return bool(json.loads(path.read_text()).get("complete"))
    except (OSError, ValueError):
        return False


def missing_stages(cfg, stage: str) -> list[str]:
    """Stage names (e.g. `03_finetuning`) that `stage` needs and that are not complete in the run folder."""
    return [STAGES[s] for s in needs(cfg, stage) if not stage_complete(cfg.run_dir, s)]


def _stage_key(name: str) -> str:
    return name[:2] if name[:2] in STAGES else next(k for k, v in STAGES.items() if v == name)


def _named_stages(text: str) -> list[str]:
    """Stage names mentioned in an error message (`stage 03_finetuning`, `--stages 03`)."""
    found = re.findall(r"\b(0[1-6]_[a-z_]+)\b", text)
    found += [STAGES[k] for k in re.findall(r"--stages (0[1-6])\b", text)]
    return [s for s in found if s in STAGES.values()]


def relative(path: str | Path) -> str:
    """`path` relative to the project root when it lies inside it (as given otherwise)."""
    try:
        return str(Path(path).resolve().relative_to(PROJECT_ROOT.resolve()))
    except (ValueError, OSError):
        return str(path)


def portable(cfg) -> dict:
    """The resolved parameters as a dict, with the paths inside the project relative to its root
    (what `load_params` resolves back to the same paths): no machine paths in injected cells or files."""
    out = cfg.model_dump() if hasattr(cfg, "model_dump") else dict(cfg)
    out["run_dir"] = relative(out["run_dir"])
    for section, key in (("dataset", "root"), ("model", "path")):
        value = out[section][key]
        if value and Path(value).is_absolute():
            out[section][key] = relative(value)
    return out


def notebook_parameters(cfg, params_file: str | Path, force: bool = False,
                        interactive: bool = False) -> dict:
    """What the CLI injects into a stage notebook: every top-level parameter (paths relative to the
    project root), the params file it came from, force and interactive."""
    return {"params_file": relative(params_file), **portable(cfg), "force": force,
            "interactive": interactive}


def explain(error: BaseException, cfg, stage: str | None = None) -> str:
    """The message for a notebook user: which notebooks to run first, or what to set in the
    parameters cell (where the CLI message says `--force`)."""
    text = str(error)
    if getattr(error, "explained", False):
        return text
    if isinstance(error, ParamsError):
        return (f"{text}\nFix the parameters cell (or the file given as params_file) and run this "
                f"cell again.")
    missing = list(getattr(error, "missing", None) or [])
    missing = [STAGES[_stage_key(m)] for m in missing] or _named_stages(text)
    if isinstance(error, FileNotFoundError) and cfg is not None and error.filename:
        try:
            part = Path(error.filename).resolve().relative_to(Path(cfg.run_dir).resolve()).parts[0]
        except (ValueError, IndexError):
            part = None
        missing = [part] if part in STAGES.values() else []
        if not missing:
            return text
    needs_force = getattr(error, "needs_force", None)
    if needs_force is None:
        needs_force = "--force" in text
    if needs_force:
        run_dir = relative(cfg.run_dir) if cfg else "this run folder"
        others = [m for m in missing if stage is None or _stage_key(m) != stage]
        if others:
            return (f"{_first_sentence(text)}\nRerun notebook{'s' if len(others) > 1 else ''} "
                    f"{', '.join(others)} first with force = True in the parameters cell, or set "
                    f"run_dir to another folder than {run_dir}.")
        return (f"{_first_sentence(text)}\nSet force = True in the parameters cell to recompute "
                f"them, or set run_dir to another folder than {run_dir}.")
    if not missing:
        return text
    if cfg is not None:  # all of them: what the missing stages need, and what this one needs
        keys = {_stage_key(m) for m in missing}
        for k in list(keys) + ([stage] if stage else []):
            keys.update(needs(cfg, k))
        keys.discard(stage)
        missing = [STAGES[k] for k in sorted(keys) if not stage_complete(cfg.run_dir, k)] or missing
    return run_first(missing, cfg)


def run_first(missing: list[str], cfg) -> str:
    """`run notebooks 03_finetuning, 04_refinement first` with the shell equivalent."""
    where = relative(cfg.run_dir) if cfg else "the run folder"
    stages = ",".join(m[:2] for m in missing)
    return (f"the outputs of {', '.join(missing)} are missing or incomplete in {where}.\n"
            f"Run notebook{'s' if len(missing) > 1 else ''} {', '.join(missing)} first, with the "
            f"same params_file and run_dir (or from a shell: python -m fgbg_utils run PARAMS.yaml "
            f"--stages {stages} --out {where}).")


def _first_sentence(text: str) -> str:
    """The refusal without its CLI hint."""
    for marker in (" Rerun with --force", " To recompute them:", " Rerun first:"):
        text = text.split(marker)[0]
    return text


class DropMessages(logging.Filter):
    def __init__(self, *patterns: str):
        super().__init__()
        self.patterns = patterns

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not any(p in msg for p in self.patterns)


def drop(logger: logging.Logger, *patterns: str) -> None:
    """Drop the logger's messages that contain a pattern (once per logger)."""
    if not any(isinstance(f, DropMessages) for f in logger.filters):
        logger.addFilter(DropMessages(*patterns))


def quiet_libraries() -> None:
    """Silence the known harmless messages of the libraries (not our own warnings)."""
    drop(logging.getLogger("transformers.utils.import_utils"), "requires torchvision (not installed)")
    for pattern in (r".*torchvision.*", r".*ImageProcessor.*", r".*`resume_download` is deprecated.*",
                    r".*TypedStorage is deprecated.*", r".*upcast_vae.*"):
        warnings.filterwarnings("ignore", message=pattern)
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"(diffusers|transformers|accelerate)\b")
    warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"(diffusers|transformers|jupyter_client)\b")
    try:
        import diffusers.utils.logging as dlog
        import transformers.utils.logging as tlog
    except ImportError:
        return
    tlog.disable_progress_bar()  # "Loading weights" bars
    dlog.disable_progress_bar()


def _install_handler(cfg, stage: str | None) -> None:
    """In IPython: show `explain`'s message instead of a traceback for the errors it knows."""
    try:
        from IPython import get_ipython
    except ImportError:
        return
    ip = get_ipython()
    if ip is None:
        return

    def handler(shell, etype, value, tb, tb_offset=None):
        message = explain(value, cfg, stage)
        if message == str(value) and not isinstance(value, (StageError, ParamsError)):
            stb = shell.InteractiveTB.structured_traceback(etype, value, tb, tb_offset=tb_offset)
        else:
            stb = [f"{etype.__name__}: {message}"]
        shell._showtraceback(etype, value, stb)  # IPython ignores what a handler returns
        return stb

    ip.set_custom_exc((StageError, ParamsError, FileNotFoundError), handler)


def namespace_overrides(namespace: dict) -> dict:
    """The top-level parameter keys present in a notebook's namespace (papermill's injections or
    the parameters cell), except run_dir. A section or list given as text (`-p dataset
    '{n_train: 8}'`: papermill passes it as a string) is read as YAML."""
    import yaml

    base = load_params(None).model_dump()
    out = {}
    for key in SCHEMA:
        if key not in namespace or key == "run_dir":
            continue
        value = namespace[key]
        if isinstance(value, str) and isinstance(base.get(key), (dict, list)):
            try:
                value = yaml.safe_load(value)
            except yaml.YAMLError as e:
                raise ParamsError(f"notebook parameter `{key}`={value!r} is not valid YAML ({e}); "
                                  f"pass it like -p {key} '{{key: value}}' or -y.") from None
        out[key] = value
    return out


def notebook_config(namespace: dict, stage: str | None = None, quiet: bool = True,
                    missing: str = "raise"):
    """The validated parameters of a stage notebook (see the module doc), with its setup done:
    library messages quietened, figures small, clear messages for missing inputs. `stage`
    ("01".."06") also checks that the stages it reads are complete, before any work: missing=
    "raise" stops with the notebooks to run first, "warn" prints them and goes on."""
    die_with_run()
    if quiet:
        quiet_libraries()
    _set_figures()
    params_file = namespace.get("params_file")
    cfg = None
    _install_handler(cfg, stage)
    try:
        overrides = namespace_overrides(namespace)
        cfg = load_params(params_file, overrides, run_dir=namespace.get("run_dir"))
    except ParamsError as e:
        err = ParamsError(explain(e, None))
        err.explained = True
        raise err from None
    _install_handler(cfg, stage)
    if overrides:
        print(f"parameters: {params_file} with {', '.join(sorted(overrides))} from the notebook")
    if stage is not None:
        absent = missing_stages(cfg, stage)
        if absent and missing == "warn":  # the notebook's one-image walkthrough needs no run folder
            print(f"{run_first(absent, cfg)}\nThe walkthrough runs now; the dataset cells need "
                  f"those stages.")
        elif absent:
            raise NotebookError(run_first(absent, cfg), absent)
    return cfg


def die_with_run() -> None:
    """A kernel started by a headless run (it inherits the run's lock token) dies the moment the
    process that started it dies: no notebook writes after its run is gone."""
    import os

    from fgbg_utils.storage import LOCK_ENV
    from fgbg_utils.storage.lifetime import die_with_parent

    parent = os.environ.get("JPY_PARENT_PID")
    if os.environ.get(LOCK_ENV) and parent and parent.isdigit() and int(parent) == os.getppid():
        die_with_parent(parent=int(parent))
        # a Ctrl-C of the run stops this kernel mid-cell: the run says so in one line, the
        # kernel's own log (its console is the run's) would add a traceback
        logging.getLogger("IPKernelApp").setLevel(logging.CRITICAL)


def _set_figures() -> None:
    try:
        import matplotlib.pyplot as plt
    except ImportError:
        return
    plt.rcParams["figure.dpi"] = 72  # small stored figures
