"""What the stages share: the pipeline built from the config, fixed image groups, and sharding over
the processes of `accelerate launch` (each process takes whole groups, so every image is computed
in the same batch as in a single-process run: the same bits)."""
from __future__ import annotations

import os
import subprocess
import sys
from contextlib import contextmanager
from functools import cached_property
from pathlib import Path

from fgbg_utils.core.pipeline import FgBgPipeline

# Set by the launchers that start several processes (torchrun / `accelerate launch --multi_gpu`, MPI).
DISTRIBUTED_ENV = ("WORLD_SIZE", "LOCAL_RANK", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")


def load_pipeline(cfg, finetuned: bool = False) -> FgBgPipeline:
    """m from `model.*` (and m' from this run's stage 03 when asked)."""
    from fgbg_utils.stages.registry import stage

    tuned = Path(cfg.run_dir) / stage("03").name if finetuned else None
    return FgBgPipeline.from_pretrained(cfg.model.path, cfg.model.revision, cfg.device, cfg.dtype,
                                        finetuned=tuned, config=cfg.model.config,
                                        max_sequence_length=cfg.model.max_sequence_length)


def groups(ids: list, size: int) -> list[list]:
    """Fixed slices of the full id list: a resumed or sharded run batches images as the first did."""
    size = max(1, int(size))
    return [ids[k:k + size] for k in range(0, len(ids), size)]


# ----------------------------------------------------------------------------- launch
def requested_processes() -> int:
    """Processes asked of `accelerate launch` when its simple launcher started only this one: on a
    machine without GPUs, `accelerate launch --cpu --num_processes N` (or without --cpu) runs the
    command once, with MASTER_ADDR set and no WORLD_SIZE. 1 when not launched so."""
    env = os.environ
    if "MASTER_ADDR" not in env or "ACCELERATE_MIXED_PRECISION" not in env:
        return 1
    if any(k in env for k in DISTRIBUTED_ENV):
        return 1
    from fgbg_utils.storage import StageError

    args = _launcher_args()
    if args is None:
        raise StageError("this process was started by `accelerate launch` with several processes, "
                           "but accelerate ran it once and its --num_processes could not be read. "
                           "Start the workers with torchrun instead: `torchrun --standalone "
                           "--nproc-per-node N -m fgbg_utils stage ...`.")
    if (args.num_machines or 1) > 1:
        raise StageError("`accelerate launch --num_machines > 1` without a GPU launcher or "
                           "--mpirun_hostfile runs one process; start each machine with torchrun.")
    return max(1, int(args.num_processes or 1))


def _launcher_args():
    """The parsed arguments of the parent `accelerate launch` (Linux /proc), or None."""
    try:
        argv = Path(f"/proc/{os.getppid()}/cmdline").read_bytes().decode().split("\0")
    except OSError:
        return None
    names = ("launch", "accelerate-launch", "accelerate.commands.launch")
    at = next((k for k, a in enumerate(argv) if Path(a).name in names), None)
    if at is None:
        return None
    from accelerate.commands.launch import launch_command_parser
    try:
        return launch_command_parser().parse_args([a for a in argv[at + 1:] if a])
    except SystemExit:
        return None


def relaunch(n: int) -> int:
    """Run this very command line as n processes under torch's elastic launcher (which stops all of
    them when one fails); returns its exit status. The run lock's token is inherited; SIGINT and
    SIGTERM are passed on (the launcher then stops its workers)."""
    import signal

    import torch

    env = dict(os.environ)
    if not torch.cuda.is_available():
        env["ACCELERATE_USE_CPU"] = "true"  # accelerate then uses gloo (also for stage 03's Accelerator)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}",
           "--no-python", *sys.orig_argv]
    proc = subprocess.Popen(cmd, env=env, preexec_fn=die_with_parent)
    forward = lambda sig, _frame: proc.send_signal(sig)
    old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        return proc.wait()
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


def die_with_parent() -> None:
    """Linux: SIGTERM to this process when its parent dies (PR_SET_PDEATHSIG), so a killed launch
    leaves no worker writing into the run folder (torchrun starts workers in their own sessions)."""
    import signal

    from fgbg_utils.storage.lifetime import die_with_parent as pdeathsig
    pdeathsig(signal.SIGTERM)


def ensure_workers() -> None:
    """Under `accelerate launch --num_processes N` whose simple launcher started this process
    alone (no GPUs): run the command as N processes and exit with their status. Call it before
    any work (the CLI may call it first thing; `Shards` calls it too)."""
    n = requested_processes()
    if n > 1:
        raise SystemExit(relaunch(n))


class Shards:
    """The processes of one launch (one process without accelerate)."""

    @cached_property
    def state(self):
        ensure_workers()
        if "TORCHELASTIC_RUN_ID" in os.environ:  # a worker of torchrun: stop when it stops
            die_with_parent()
        import torch
        from accelerate import PartialState
        from accelerate.utils import parse_flag_from_env
        cpu = parse_flag_from_env("ACCELERATE_USE_CPU") or not torch.cuda.is_available()
        return PartialState(cpu=cpu)

    @property
    def count(self) -> int:
        return self.state.num_processes

    @property
    def index(self) -> int:
        return self.state.process_index

    @property
    def is_main(self) -> bool:
        return self.state.is_main_process

    @property
    def tag(self) -> str:
        """' [k/N]' for progress bars under several processes."""
        return f" [{self.index + 1}/{self.count}]" if self.count > 1 else ""

    def bar(self, total: int, desc: str, unit: str, progress: bool):
        """A progress bar per process (one line each)."""
        from tqdm.auto import tqdm
        return tqdm(total=total, desc=desc + self.tag, unit=unit, disable=not progress or total == 0,
                    position=self.index if self.count > 1 else None, leave=self.count == 1)

    def mine(self, items: list) -> list:
        return items[self.index::self.count]

    def wait(self) -> None:
        if self.count > 1:
            self.state.wait_for_everyone()

    @contextmanager
    def main_first(self):
        """The main process runs the block first (e.g. writing a cache), then the others."""
        if self.count == 1:
            yield
            return
        with self.state.main_process_first():
            yield

    def share(self, value):
        """The main process's value, on every process."""
        if self.count == 1:
            return value
        from accelerate.utils import broadcast_object_list
        return broadcast_object_list([value])[0]

    def gather(self, items: list) -> list:
        """The items of every process, concatenated in process order."""
        if self.count == 1:
            return list(items)
        from accelerate.utils import gather_object
        return gather_object(list(items))

    def on_main(self, fn):
        """fn() on the main process only; its value, or its failure, on every process (so that
        no process waits for an answer that never comes)."""
        from fgbg_utils.storage import StageError

        answer = None
        if self.is_main:
            try:
                answer = ("ok", fn())
            except StageError as e:
                answer = ("stage", (str(e), e.missing, e.needs_force))
            except Exception as e:
                if self.count > 1:
                    self.share(("failed", f"{type(e).__name__}: {e}"))
                raise
        answer = self.share(answer)
        if answer[0] == "stage":
            raise StageError(*answer[1])
        if answer[0] == "failed":
            raise StageError(f"the main process failed: {answer[1]}")
        return answer[1]


def open_sharded(cfg, number: str, force: bool, shards: Shards, **kw):
    """`open_stage` on the main process, its answer (or its refusal) on every process."""
    from fgbg_utils.storage import open_stage

    d, recompute = shards.on_main(lambda: open_stage(cfg, number, force, **kw))
    return Path(d), recompute


def processed_records(cfg) -> list:
    """The dataset records stage 01 processed (unreadable images it skipped are left out)."""
    from fgbg_utils.data.loader import load_dataset
    from fgbg_utils.io import read_json
    from fgbg_utils.stages.registry import stage

    done = set(read_json(Path(cfg.run_dir) / stage("01").name / "summary.json")["images"])
    return [r for r in load_dataset(cfg, check=False)[0] if r.id in done]
