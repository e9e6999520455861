"""Re-execute stored notebooks in place with their default parameters and keep small outputs
(`make notebooks`). Edit the paired notebooks/NN_*.py (or the .ipynb in JupyterLab), not this file.

    python tools/execute_notebooks.py notebooks/01_attention_maps.ipynb ...
"""
from __future__ import annotations

import sys
from pathlib import Path

import nbformat
from nbclient import NotebookClient


def tidy(nb) -> None:
    """Drop what makes diffs noisy or cannot render offline: timestamps, stderr (progress bars),
    widget views; join the stream chunks of a cell into one output per run of prints."""
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        cell.metadata.pop("execution", None)
        kept = [o for o in cell.outputs
                if not (o.output_type == "stream" and o.name == "stderr")
                and "application/vnd.jupyter.widget-view+json" not in o.get("data", {})]
        cell.outputs = []
        for o in kept:
            last = cell.outputs[-1] if cell.outputs else None
            if last is not None and o.output_type == last.output_type == "stream" and o.name == last.name:
                last.text += o.text
            else:
                cell.outputs.append(o)
    nb.metadata.pop("widgets", None)
    relative_paths(nb)


ROOT = str(Path(__file__).resolve().parents[1]) + "/"


def relative_paths(nb) -> None:
    """Outputs name files relative to the project root: no machine paths in stored notebooks."""
    for cell in nb.cells:
        for o in cell.get("outputs", []):
            if "text" in o:
                o.text = o.text.replace(ROOT, "")
            for key, value in o.get("data", {}).items():
                if isinstance(value, str) and key.startswith("text/"):
                    o.data[key] = value.replace(ROOT, "")


def execute(path: Path, timeout: int = 3600) -> None:
    """Run the notebook on a kernel that talks over IPC sockets in a private temporary folder (no
    "Kernel is running over TCP without encryption" warning, nothing left in notebooks/)."""
    from fgbg_utils.runs.runner import ipc_kernel

    nb = nbformat.read(path, as_version=4)
    with ipc_kernel() as km:
        NotebookClient(nb, km=km, timeout=timeout, kernel_name="python3",
                       resources={"metadata": {"path": str(path.parent)}}).execute()
    tidy(nb)
    nbformat.write(nb, path)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--paths-only"]:  # tidy paths of stored notebooks without running them
        for name in sys.argv[2:]:
            nb = nbformat.read(name, as_version=4)
            relative_paths(nb)
            nbformat.write(nb, name)
        raise SystemExit(0)
    for name in sys.argv[1:]:
        print(f"executing {name} ...", flush=True)
        execute(Path(name))
