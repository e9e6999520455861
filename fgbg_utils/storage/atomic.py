"""Atomic writes: every stage output appears whole or not at all (a temporary file in the same
folder, then a rename). A full or read-only disk ends in one StorageError naming the folder."""
from __future__ import annotations

import io
import json
import os
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from fgbg_utils.storage.errors import DamagedFileError, storage_error


UMASK = os.umask(0)
os.umask(UMASK)
__all__ = ["UMASK", "atomic_bytes", "atomic_write_text", "atomic_write_json", "atomic_save_npz",
           "atomic_save_png", "atomic_save_safetensors", "atomic_copy", "read_json"]


def atomic_bytes(path: str | Path, data: bytes) -> Path:
    """Write `data` to `path` whole or not at all."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o666 & ~UMASK)  # mkstemp makes 0600; outputs get the usual permissions
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError) and (err := storage_error(e, path, len(data))) is not None:
            raise err from None
        raise
    return path


def atomic_copy(src: str | Path, path: str | Path) -> Path:
    """Copy a file (e.g. a notebook written elsewhere) into place whole or not at all."""
    return atomic_bytes(path, Path(src).read_bytes())


def atomic_write_text(path, text: str) -> Path:
    return atomic_bytes(path, text.encode())


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
    return atomic_bytes(path, buf.getvalue())


def atomic_save_png(path, array: np.ndarray) -> Path:
    """bool masks are written as 0/255 L-mode PNGs; uint8 HxW or HxWx3 as is."""
    if array.dtype == bool:
        array = array.astype(np.uint8) * 255
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return atomic_bytes(path, buf.getvalue())


def atomic_save_safetensors(path, tensors: dict) -> Path:
    """A safetensors file written whole or not at all (never a pickle)."""
    from safetensors.torch import save

    return atomic_bytes(path, save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}))


def read_json(path):
    """A JSON file; a damaged one (truncated, edited) is a DamagedFileError naming it."""
    text = Path(path).read_text()
    try:
        return json.loads(text)
    except ValueError as e:
        raise DamagedFileError(f"{path} is damaged: not valid JSON ({e}). Restore it, or delete it "
                               f"and rerun the stage that writes it (--force).") from None
