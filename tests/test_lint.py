"""The package, the tests and the tools are ruff-clean under pyproject's [tool.ruff] (the notebook
sources: tests/test_notebooks.py)."""
import subprocess
import sys

import pytest

from fgbg_utils.runs.params import PROJECT_ROOT


def test_ruff_on_package_tests_and_tools():
    pytest.importorskip("ruff")
    r = subprocess.run([sys.executable, "-m", "ruff", "check", "--output-format", "concise",
                        "fgbg_utils", "tests", "tools", "benchmarks"], capture_output=True, text=True, cwd=PROJECT_ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
