"""Files by content: a fast hash of a file's bytes (BLAKE2b), computed once and cached by path,
size and mtime; the record of a stage's outputs (size, mtime and hash of every file it wrote) and
its check, cheap (size and mtime, hashing only what looks touched) or full (every hash)."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

from fgbg_utils.storage.atomic import atomic_write_json, read_json

CHUNK = 1 << 20
_CACHE: dict[tuple[str, int, int], str] = {}  # (path, size, mtime_ns) -> hash, in this process


def file_hash(path: str | Path) -> str:
    """BLAKE2b-128 of the file's bytes (hex)."""
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _key(path: Path, st: os.stat_result) -> tuple[str, int, int]:
    return (str(path), st.st_size, st.st_mtime_ns)


def cached_hashes(paths: list[Path], cache_file: Path | None = None) -> dict[Path, str]:
    """{path: hash}; a file whose path, size and mtime are unchanged is not read again (in this
    process, and across processes through `cache_file`, a JSON file written when it grew)."""
    disk: dict = {}
    if cache_file is not None and cache_file.exists():
        try:
            disk = read_json(cache_file)
        except (OSError, ValueError):
            disk = {}
    out, grew = {}, False
    for p in paths:
        st = p.stat()
        key = _key(p, st)
        entry = disk.get(key[0])
        if key in _CACHE:
            out[p] = _CACHE[key]
        elif entry and entry[:2] == [st.st_size, st.st_mtime_ns]:
            out[p] = _CACHE[key] = entry[2]
        else:
            out[p] = _CACHE[key] = file_hash(p)
            grew = True
        disk[key[0]] = [st.st_size, st.st_mtime_ns, out[p]]
    if grew and cache_file is not None:
        try:
            atomic_write_json(cache_file, disk)
        except Exception:  # a read-only cache is only slower  # noqa: BLE001
            pass
    return out


# ----------------------------------------------------------------------------- outputs
def _is_output(path: Path) -> bool:
    name = path.name
    return not (name == "stage.json" or (name.startswith(".") and name.endswith(".tmp"))
                or name.startswith(".fgbg"))


def record_outputs(run_dir: str | Path, files: list[Path], old: dict | None = None) -> dict:
    """{path relative to the run folder: [size, mtime_ns, hash]} of `files`; a file whose size and
    mtime match `old` keeps its recorded hash (it is not read again)."""
    run_dir, old = Path(run_dir), old or {}
    out = {}
    for p in sorted(files):
        rel = p.relative_to(run_dir).as_posix()
        st = p.stat()
        prev = old.get(rel)
        same = prev and prev[:2] == [st.st_size, st.st_mtime_ns]
        out[rel] = [st.st_size, st.st_mtime_ns, prev[2] if same else file_hash(p)]
    return out


def stage_files(folder: Path) -> list[Path]:
    """Every output file under a stage folder (not its stage.json or temporary files)."""
    return [p for p in folder.rglob("*") if p.is_file() and _is_output(p)]


def check_outputs(run_dir: str | Path, record: dict, full: bool = False) -> list[str]:
    """The recorded outputs that are missing, truncated or altered ('path (why)'); [] when all
    match. Cheap by default: a file of the recorded size and mtime is trusted; `full` hashes all."""
    run_dir = Path(run_dir)
    bad = []
    for rel, (size, mtime, digest) in record.items():
        p = run_dir / rel
        try:
            st = p.stat()
        except OSError:
            bad.append(f"{rel} (missing)")
            continue
        if st.st_size != size:
            why = "truncated or altered" if st.st_size < size else "altered"
            bad.append(f"{rel} ({why}: {st.st_size} bytes, recorded {size})")
        elif (full or st.st_mtime_ns != mtime) and file_hash(p) != digest:
            bad.append(f"{rel} (altered: its content differs from the recorded hash)")
    return bad
