"""What the stages share: the pipeline built from the config, fixed image groups, and sharding over
the processes of `accelerate launch` (each process takes whole groups, so every image is computed
in the same batch as in a single-process run: the same bits)."""
from __future__ import annotations

from functools import cached_property
from pathlib import Path

from fgbg_utils.core.pipeline import FgBgPipeline


def load_pipeline(cfg, finetuned: bool = False) -> FgBgPipeline:
    """m from `model.*` (and m' from this run's stage 03 when asked)."""
    from fgbg_utils.stages.registry import stage

    tuned = Path(cfg.run_dir) / stage("03").name if finetuned else None
    return FgBgPipeline.from_pretrained(cfg.model.path, cfg.model.revision, cfg.device, cfg.dtype,
                                        finetuned=tuned, config=cfg.model.config)


def groups(ids: list, size: int) -> list[list]:
    """Fixed slices of the full id list: a resumed or sharded run batches images as the first did."""
    size = max(1, int(size))
    return [ids[k:k + size] for k in range(0, len(ids), size)]


class Shards:
    """The processes of one launch (one process without accelerate)."""

    @cached_property
    def state(self):
        from accelerate import PartialState
        return PartialState()

    @property
    def count(self) -> int:
        return self.state.num_processes

    @property
    def index(self) -> int:
        return self.state.process_index

    @property
    def is_main(self) -> bool:
        return self.state.is_main_process

    def mine(self, items: list) -> list:
        return items[self.index::self.count]

    def wait(self) -> None:
        if self.count > 1:
            self.state.wait_for_everyone()

    def share(self, value):
        """The main process's value, on every process."""
        if self.count == 1:
            return value
        from accelerate.utils import broadcast_object_list
        return broadcast_object_list([value])[0]


def open_sharded(cfg, number: str, force: bool, shards: Shards, **kw):
    """`open_stage` on the main process, its answer (or its refusal) on every process."""
    from fgbg_utils.runs.run_folder import StageError, open_stage

    answer = None
    if shards.is_main:
        try:
            d, recompute = open_stage(cfg, number, force, **kw)
            answer = ("ok", str(d), recompute, None)
        except StageError as e:
            answer = ("error", str(e), e.missing, e.needs_force)
    answer = shards.share(answer)
    if answer[0] == "error":
        raise StageError(answer[1], answer[2], answer[3])
    return Path(answer[1]), answer[2]


def processed_records(cfg) -> list:
    """The dataset records stage 01 processed (unreadable images it skipped are left out)."""
    from fgbg_utils.data.loader import load_dataset
    from fgbg_utils.io import read_json
    from fgbg_utils.stages.registry import stage

    done = set(read_json(Path(cfg.run_dir) / stage("01").name / "summary.json")["images"])
    return [r for r in load_dataset(cfg, check=False)[0] if r.id in done]
