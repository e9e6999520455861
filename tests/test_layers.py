"""The layout shows the layers: the method core imports no config loader, run folder, stage or view;
training and data import no view. Checked on the imports of every module (also inside functions)."""
import ast

import pytest

from fgbg_utils.runs.params import PROJECT_ROOT

PACKAGE = PROJECT_ROOT / "fgbg_utils"
FORBIDDEN = {
    "core": ("fgbg_utils.runs", "fgbg_utils.stages", "fgbg_utils.views", "fgbg_utils.data.loader"),
    "training": ("fgbg_utils.runs", "fgbg_utils.views"),
    "data": ("fgbg_utils.stages", "fgbg_utils.views"),
    # the stages use the storage layer below them, never the runner, CLI or notebook glue above
    "stages": ("fgbg_utils.views", "fgbg_utils.runs.runner", "fgbg_utils.runs.cli",
               "fgbg_utils.runs.schedule", "fgbg_utils.runs.notebook", "fgbg_utils.runs.report",
               "fgbg_utils.runs.run_folder"),
}
# the storage layer (lock, fingerprints, hashes, atomic writes, manifest) reads the stage table,
# the typed config and the dataset's identity, nothing above
STORAGE_MAY_IMPORT = ("fgbg_utils.storage", "fgbg_utils.stages.registry", "fgbg_utils.runs.params",
                      "fgbg_utils.data.loader")


def imports(path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            yield node.module
            yield from (f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            yield from (a.name for a in node.names)


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_layer_imports(layer):
    bad = [(p.name, m) for p in sorted((PACKAGE / layer).glob("*.py")) for m in imports(p)
           if m.startswith(FORBIDDEN[layer])]
    assert not bad, f"{layer} imports a higher layer: {bad}"


def test_storage_sits_below_the_stages():
    mods = sorted((PACKAGE / "storage").glob("*.py"))
    assert mods, "fgbg_utils/storage/ is missing"
    bad = [(p.name, m) for p in mods for m in imports(p)
           if m.startswith("fgbg_utils") and not m.startswith(STORAGE_MAY_IMPORT)]
    assert not bad, f"storage imports a higher layer: {bad}"
    # the runner's package keeps no storage code of its own: the old module only re-exports
    shim = (PACKAGE / "runs" / "run_folder.py").read_text()
    assert "def " not in shim and "class " not in shim


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def test_no_module_uses_another_modules_private_names():
    bad = []
    for p in PACKAGE.rglob("*.py"):
        tree = ast.parse(p.read_text())
        modules = set()  # names bound to fgbg_utils modules in this file
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("fgbg_utils"):
                bad += [(str(p.relative_to(PACKAGE)), a.name) for a in node.names if _private(a.name)]
                modules |= {a.asname or a.name for a in node.names}
            elif isinstance(node, ast.Import):
                modules |= {a.asname for a in node.names if a.name.startswith("fgbg_utils") and a.asname}
        bad += [(str(p.relative_to(PACKAGE)), f"{n.value.id}.{n.attr}") for n in ast.walk(tree)
                if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name)
                and n.value.id in modules and _private(n.attr)]
    assert not bad, bad
