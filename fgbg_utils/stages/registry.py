"""The one stage registry: number, folder name, title, module, upstream stages and the parameters
each stage depends on. The runner, the CLI, the run folder, the report and the views read it."""
from __future__ import annotations

import ast
import hashlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1]
# orchestration, storage and views do not change what a stage computes
NOT_METHOD = ("runs", "views", "storage")


@dataclass(frozen=True)
class Stage:
    number: str
    name: str          # folder, notebook and metrics file name
    title: str
    module: str | None  # fgbg_utils.stages.<module>; None: notebook only
    inputs: tuple[str, ...]  # upstream stage numbers
    params: tuple[str, ...]  # config keys (dotted, or a whole section) this stage depends on

    @property
    def notebook(self) -> str:
        return f"notebooks/{self.name}.ipynb"

    @property
    def metrics_file(self) -> str:
        return f"metrics/{self.name}.json"


STAGES: dict[str, Stage] = {s.number: s for s in (
    Stage("00", "00_toy_world", "the offline toy world", None, (), ()),
    Stage("01", "01_attention_maps", "attention maps M̂", "attention_maps", (),
          ("seed", "object", "parts", "prompt", "T0", "dtype", "model", "attention",
           "dataset.kind", "dataset.seed", "dataset.n_train", "dataset.n_test", "dataset.image_size",
           "dataset.background_fraction", "dataset.test_fraction", "dataset.splits",
           "dataset.limit", "dataset.on_corrupt")),
    Stage("02", "02_binarization", "preliminary masks M_pre", "binarization", ("01",),
          ("binarization",)),
    Stage("03", "03_finetuning", "concept-distillation fine-tuning m'", "finetuning", ("02",),
          ("finetune", "background_prompt")),
    Stage("04", "04_refinement", "refined masks M", "refinement", ("02", "03"),
          ("refinement", "ablation.refine_with_m", "evaluation.split")),  # the m ablation's images
    # 05 runs the refinement on D' in memory: it needs m' and the refinement settings, not 04's outputs
    Stage("05", "05_synthesis", "synthetic set D'_s", "synthesis", ("03",), ("synthesis", "refinement")),
    Stage("06", "06_evaluation", "evaluation (Table 2)", "evaluation", ("02", "04", "05"),
          ("segmentation", "evaluation.split", "evaluation.ground_truth_kind", "dataset.ground_truth",
           "evaluation.grabcut", "evaluation.grabcut_margin", "evaluation.grabcut_iterations")),
)}
BY_NAME = {s.name: s for s in STAGES.values()}


def stage(key: str) -> Stage:
    """A stage by number ("1", "01") or folder name ("01_attention_maps")."""
    if key in BY_NAME:
        return BY_NAME[key]
    num = str(key).zfill(2)
    if num not in STAGES:
        raise KeyError(f"unknown stage {key!r}; stages: {', '.join(STAGES)}")
    return STAGES[num]


def ancestors(number: str) -> list[str]:
    """All upstream stages of a stage, in stage order."""
    seen: set[str] = set()
    todo = list(STAGES[number].inputs)
    while todo:
        n = todo.pop()
        if n not in seen:
            seen.add(n)
            todo.extend(STAGES[n].inputs)
    return sorted(seen)


def _imports(path: Path, lazy: bool) -> set[Path]:
    """The package modules a file imports (absolute `fgbg_utils.` imports; with `lazy`, also those
    inside functions)."""
    tree = ast.parse(path.read_text())
    nodes = ast.walk(tree) if lazy else tree.body
    out = set()
    for node in nodes:
        names = []
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("fgbg_utils"):
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names if a.name.startswith("fgbg_utils")]
        for name in names:
            rel = Path(*name.split(".")[1:])
            for cand in (PACKAGE / rel.with_suffix(".py"), PACKAGE / rel / "__init__.py"):
                if cand.is_file() and (not cand.relative_to(PACKAGE).parts
                                       or cand.relative_to(PACKAGE).parts[0] not in NOT_METHOD):
                    out.add(cand)
    return out


@lru_cache(maxsize=None)
def source_files(number: str) -> tuple[Path, ...]:
    """The method sources a stage's outputs depend on: everything its module imports (also inside
    its functions), then what those import at module level. Upstream stages add their own (the
    run folder fingerprints the chain), so a lazy import inside the pipeline (e.g. the trainer)
    counts only for the stages that call it."""
    start = PACKAGE / "stages" / f"{STAGES[number].module}.py"
    seen, todo = {start}, list(_imports(start, lazy=True))
    while todo:
        f = todo.pop()
        if f not in seen:
            seen.add(f)
            todo.extend(_imports(f, lazy=False) - seen)
    return tuple(sorted(seen))


def code_version(number: str) -> dict[str, str]:
    """{package-relative file: sha256[:12]} for the stage's sources (read afresh: edits count)."""
    return {str(f.relative_to(PACKAGE)): hashlib.sha256(f.read_bytes()).hexdigest()[:12]
            for f in source_files(number)}
STAGE_NAMES = {n: s.name for n, s in STAGES.items()}  # number -> folder name


def stage_module(key: str):
    """The module of a stage (its `run(cfg, force=...)`)."""
    import importlib

    st = stage(key)
    if st.module is None:
        raise KeyError(f"stage {st.name} is a notebook only")
    return importlib.import_module(f"fgbg_utils.stages.{st.module}")
