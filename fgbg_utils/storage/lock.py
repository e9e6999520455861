"""One run at a time per run folder: DIR/.fgbg.lock, re-entrant for the processes a run starts
(they inherit its token), taken over when its process is gone."""
from __future__ import annotations

import json
import os
import socket
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

from fgbg_utils.storage.atomic import read_json
from fgbg_utils.storage.errors import StageError, storage_error

LOCK_NAME = ".fgbg.lock"
LOCK_ENV = "FGBG_RUN_LOCK"


def make_folder(folder: str | Path) -> Path:
    """Create a run folder; a file in its place, a full or read-only disk: one StageError."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise StageError(f"{folder} is a file, not a folder; give --out (or run_dir) a folder "
                         f"path, new or existing.")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        if isinstance(e, (FileExistsError, NotADirectoryError)):
            raise StageError(f"{folder} cannot be created: a part of its path is a file "
                             f"({e.strerror}). Give --out (or run_dir) another folder.") from None
        raise storage_error(e, folder) or e
    return folder


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _is_main_process() -> bool:
    return os.environ.get("RANK", "0") == "0" and os.environ.get("LOCAL_RANK", "0") == "0"


@contextmanager
def run_lock(run_dir: str | Path):
    """One run at a time per run folder. Re-entrant for the processes a run starts (notebook
    kernels inherit the token); a stale lock of a dead process on this host is taken over.
    Under `accelerate launch`, the main process holds it for the launch."""
    run_dir = Path(run_dir)
    token = os.environ.get(LOCK_ENV)
    path = run_dir / LOCK_NAME
    if not _is_main_process():
        yield
        return
    if token and path.exists():
        try:
            held = read_json(path).get("token") == token
        except (OSError, ValueError):
            held = False
        if held:  # a process of the run that holds the lock (e.g. its notebook kernel)
            yield
            return
    make_folder(run_dir)
    mine = {"token": uuid.uuid4().hex, "pid": os.getpid(), "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            pass
        except OSError as e:
            raise storage_error(e, run_dir) or e
        else:
            try:
                with os.fdopen(fd, "w") as f:
                    json.dump(mine, f)
            except OSError as e:
                path.unlink(missing_ok=True)
                raise storage_error(e, run_dir) or e
            break
        try:
            other = read_json(path)
        except (OSError, ValueError):
            other = {}
        if other.get("host") == mine["host"] and other.get("pid") and not _alive(int(other["pid"])):
            path.unlink(missing_ok=True)  # stale: its process is gone
            continue
        raise StageError(f"another run (pid {other.get('pid')}, host {other.get('host')}, "
                         f"started {other.get('started')}) is writing into {run_dir}. Wait for "
                         f"it to finish, or use another run folder (--out / run_dir). If no "
                         f"such run exists, delete {path}.") from None
    old = os.environ.get(LOCK_ENV)
    os.environ[LOCK_ENV] = mine["token"]
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(LOCK_ENV, None)
        else:
            os.environ[LOCK_ENV] = old
        path.unlink(missing_ok=True)
