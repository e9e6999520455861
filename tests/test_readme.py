"""The README's "From Python" block runs as-is from the project root with the shipped toy model."""
import os
import re
import subprocess
import sys

from fgbg_utils.runs.params import PROJECT_ROOT


def python_blocks(heading: str) -> list[str]:
    text = (PROJECT_ROOT / "README.md").read_text()
    section = text.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def test_from_python_block_runs_as_is():
    blocks = python_blocks("From Python")
    assert blocks, "README has no python block under '## From Python'"
    code = blocks[0]
    assert len([line for line in code.splitlines() if line.strip()]) <= 10
    r = subprocess.run([sys.executable, "-c", code], cwd=PROJECT_ROOT, capture_output=True, text=True,
                       timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    shape, tau, fraction = r.stdout.strip().splitlines()[-1].rsplit(" ", 2)
    assert shape.startswith("(1, 16, 16)") and 0 < float(fraction) < 0.5 and 0 < float(tau) < 1
