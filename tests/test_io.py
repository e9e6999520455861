"""Atomic writes: whole files with the usual permissions, no temporary files left behind."""
import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from fgbg_utils import io


def test_atomic_files_are_whole_and_readable_by_others(tmp_path):
    umask = os.umask(0o022)
    os.umask(umask)
    paths = [io.atomic_write_json(tmp_path / "a" / "x.json", {"k": np.float32(0.5)}),
             io.atomic_save_png(tmp_path / "m.png", np.ones((2, 2), bool)),
             io.atomic_save_safetensors(tmp_path / "w.safetensors", {"w": torch.arange(3.0)})]
    for p in paths:
        assert p.stat().st_mode & 0o777 == 0o666 & ~io._UMASK
    assert io.read_json(paths[0]) == {"k": 0.5}
    assert torch.equal(load_file(str(paths[2]))["w"], torch.arange(3.0))
    assert not list(tmp_path.rglob("*.tmp"))


def test_failed_write_leaves_nothing(tmp_path):
    with pytest.raises(TypeError):
        io.atomic_write_json(tmp_path / "bad.json", {"k": object()})
    assert not list(tmp_path.iterdir())
