"""The run's manifest (DIR/manifest.json): parameters, seeds, versions and git state, written by
the runner once the run is accepted, and each stage's status as the run goes."""
from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

from fgbg_utils.storage.atomic import atomic_write_json, read_json


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def read_manifest(run_dir: Path) -> dict:
    """The manifest of a run folder ({"stages": {}} when there is none yet)."""
    path = Path(run_dir) / "manifest.json"
    return read_json(path) if path.exists() else {"stages": {}}


class Manifest:
    """DIR/manifest.json as a run goes: each stage notebook's status (running, done, failed,
    interrupted), start and seconds, written atomically at each change; and the log lines."""

    def __init__(self, run_dir: Path, manifest: dict, log):
        self.run_dir, self.manifest, self.log = run_dir, manifest, log

    def save(self) -> None:
        self.manifest["stages"] = dict(sorted(self.manifest["stages"].items()))  # stage order
        atomic_write_json(self.run_dir / "manifest.json", self.manifest)

    def start(self, name: str) -> None:
        self.log(f"[fgbg] stage {name} ...")
        self.manifest["stages"][name] = {"status": "running", "started": now()}
        self.save()

    def interrupted(self) -> None:
        """Ctrl-C: the stages still running are marked `interrupted` (a rerun resumes them)."""
        for record in self.manifest["stages"].values():
            if record.get("status") == "running":
                record["status"] = "interrupted"
        self.manifest["interrupted"] = now()
        self.save()

    def finish(self, name: str, seconds: float, error: BaseException | None = None) -> None:
        self.manifest["stages"][name].update(status="failed" if error else "done", seconds=round(seconds, 1))
        if not error:
            self.manifest["finished"] = now()
        self.save()
        nb = self.run_dir / "notebooks" / f"{name}.failed.ipynb"
        nb = nb if nb.exists() else nb.with_name(f"{name}.ipynb")
        self.log(f"[fgbg] stage {name} failed; see {nb}" if error
                 else f"[fgbg] stage {name} done in {seconds:.0f} s")
