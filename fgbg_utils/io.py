"""Atomic writes: every stage output appears whole or not at all."""
from __future__ import annotations

import io
import json
import os
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image


_UMASK = os.umask(0)
os.umask(_UMASK)


def _atomic_bytes(path: str | Path, data: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; outputs get the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path, text: str) -> Path:
    return _atomic_bytes(path, text.encode())


def atomic_write_json(path, obj) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=1, default=_json_default) + "\n")


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "model_dump"):  # the typed config and its sections
        return o.model_dump()
    raise TypeError(f"not JSON serialisable: {type(o)}")


def atomic_save_npz(path, **arrays) -> Path:
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    return _atomic_bytes(path, buf.getvalue())


def atomic_save_png(path, array: np.ndarray) -> Path:
    """bool masks are written as 0/255 L-mode PNGs; uint8 HxW or HxWx3 as is."""
    if array.dtype == bool:
        array = array.astype(np.uint8) * 255
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return _atomic_bytes(path, buf.getvalue())


def atomic_save_safetensors(path, tensors: dict) -> Path:
    """A safetensors file written whole or not at all (never a pickle)."""
    from safetensors.torch import save

    return _atomic_bytes(path, save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}))


def read_json(path):
    return json.loads(Path(path).read_text())
