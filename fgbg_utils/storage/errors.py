"""The errors of the storage layer: a stage that cannot run (StageError) and a disk that cannot
take a write (StorageError: full, read-only or not writable), each one message."""
from __future__ import annotations

import errno
import shutil
from pathlib import Path


class StageError(RuntimeError):
    """A stage cannot run: missing or mismatched inputs from an earlier stage, outputs of other
    parameters, or another run writing into the folder. `missing` lists the stages to (re)run;
    `needs_force` says that --force (force = True in a notebook) would override."""

    def __init__(self, message: str, missing: list[str] | None = None, needs_force: bool = False):
        super().__init__(message)
        self.missing = missing or []
        self.needs_force = needs_force


class StorageError(StageError):
    """A write failed for lack of space or permission; the message names the folder and the fix."""


class DamagedFileError(StageError, ValueError):
    """A file of the run folder cannot be read as what it should be (e.g. truncated JSON)."""


DISK_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM)


def _existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _size(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1e6 else f"{n / 1e3:.1f} KB"


def storage_error(error: OSError, path: str | Path | None = None, needed: int | None = None
                  ) -> StorageError | None:
    """The one-message StorageError for a full or read-only disk (None for other OSErrors)."""
    if error.errno not in DISK_ERRORS:
        return None
    target = Path(path or error.filename or ".")
    folder = target.parent if target.suffix else target
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        free = shutil.disk_usage(_existing(folder)).free
        need = f"; the file being written needs {_size(needed)}" if needed else ""
        return StorageError(f"no space left on the disk of {folder} ({_size(free)} free{need}). "
                            f"Free some space (a finished run folder resumes where it stopped), or "
                            f"use another run folder (--out DIR).")
    what = "read-only" if error.errno == errno.EROFS else "not writable"
    return StorageError(f"{folder} is {what} ({error.strerror}). Make it writable, or use another "
                        f"folder (--out DIR).")
