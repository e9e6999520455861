"""Parallel headless runs: the stages' work as a small graph of jobs on N single-thread worker
processes, before the notebooks show it (they then find every output finished and reuse it).

The graph is finer than the stages where the method allows it: stage 01's image groups go in
two halves (then one job writes its summary), stage 03's sample check runs
beside stages 04 and 05 (which need only m'), stage 05 beside stage 04, and each stage-06 U-Net
as soon as the stages it trains from are done (ROW_INPUTS): U-Net(D, M_pre) and the supervised
one train while stage 03 fine-tunes. A job runs the stage's own function in a single-thread
process, so the outputs are bit for bit those of a sequential single-thread run (`--jobs 1`).
Jobs start by longest remaining path (the rough costs below only order them)."""
from __future__ import annotations

import multiprocessing as mp
import os
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass
from functools import lru_cache

from fgbg_utils.storage import run_lock
from fgbg_utils.storage.lifetime import pool_worker_init
from fgbg_utils.stages.registry import STAGES


@dataclass(frozen=True)
class Job:
    name: str                 # "03", "03-eval", "06:unet_D_s", ...
    stage: str
    needs: tuple[str, ...]    # jobs that must finish first
    cost: float               # rough seconds of the toy run, for the order only
    force: bool = True        # takes the run's --force (False: finishes what forced jobs made)


def plan(cfg, stages) -> list[Job]:
    """The jobs of `stages` (stage numbers); needs on stages outside the run are left to the
    stages' own input checks."""
    from fgbg_utils.stages.evaluation import ROW_INPUTS

    rows = [r for r in cfg.segmentation.rows if r in ROW_INPUTS]
    # stage 01's groups in two halves, then the summary (`part`)
    jobs = [Job("01:part0", "01", (), 14), Job("01:part1", "01", (), 14),
            Job("01", "01", ("01:part0", "01:part1"), 3, force=False), Job("02", "02", ("01",), 2),
            Job("03", "03", ("02",), 96), Job("03-eval", "03", ("03",), 44, force=False),
            Job("04", "04", ("02", "03"), 53), Job("05", "05", ("03",), 92)]
    # with the D'_s filter, U-Net(D_s ∪ D'_s) reads U-Net(D_s)'s predictions
    after = lambda r: ("06:unet_D_s",) if (r == "unet_D_s_plus_synth" and "unet_D_s" in rows  # noqa: E731
                                           and cfg.segmentation.synthetic_filter_iou) else ()
    jobs += [Job(f"06:{r}", "06", ROW_INPUTS[r] + after(r), 80) for r in rows]
    jobs.append(Job("06", "06", ("02", "03-eval", "04", "05", *(f"06:{r}" for r in rows)), 6))
    mine = {j.name for j in jobs if j.stage in stages}
    return [Job(j.name, j.stage, tuple(n for n in j.needs if n in mine), j.cost, j.force)
            for j in jobs if j.name in mine]


def priorities(jobs: list[Job]) -> dict[str, float]:
    """Longest path (by cost) from each job to the end of the graph."""
    by_name = {j.name: j for j in jobs}
    after = {j.name: [k.name for k in jobs if j.name in k.needs] for j in jobs}

    @lru_cache(maxsize=None)
    def longest(name: str) -> float:
        return by_name[name].cost + max((longest(n) for n in after[name]), default=0.0)
    return {j.name: longest(j.name) for j in jobs}


def run_job(name: str, cfg, force: bool) -> float:
    """Worker: one job in this single-thread process; returns its seconds."""
    import torch

    from fgbg_utils.runs.notebook import quiet_libraries
    from fgbg_utils.stages.registry import stage_module

    torch.set_num_threads(1)
    quiet_libraries()
    t0 = time.time()
    number, _, part = name.partition(":")
    module = stage_module(number.split("-")[0])
    if part.startswith("part"):
        module.run(cfg, force=force, progress=False, part=(int(part[4:]), 2))
    elif part:
        module.train_rows(cfg, [part], force=force)
    elif number == "03":
        module.run(cfg, force=force, progress=False, evaluate=False)
    elif number == "03-eval":
        module.run(cfg, progress=False)
    else:
        module.run(cfg, force=force, progress=False)
    return time.time() - t0


def pending_stages(cfg, stages, force: bool) -> list[str]:
    """The stages of `stages` whose outputs are not finished for this config and code."""
    from fgbg_utils.storage import stage_problem

    stale = [n for n in stages if force or stage_problem(cfg, n) is not None]
    return [n for n in stages if stale and n >= min(stale)]  # downstream of a stale stage: rerun


def precompute(cfg, stages, workers: int, force: bool = False, log=print,
               stage_done=None) -> dict[str, float]:
    """Run the jobs of the unfinished `stages` on `workers` processes; {job: seconds}.
    `stage_done(number)` is called for each stage of `stages` once all its jobs are done (at once
    for a stage that was finished already). A failed job stops the run (jobs already running
    finish) and its error is raised, with the job's name as `error.job`."""
    stages = [s for s in stages if s in STAGES]
    jobs = plan(cfg, pending_stages(cfg, stages, force))
    prio = priorities(jobs)
    todo = sorted(jobs, key=lambda j: -prio[j.name])
    running: dict = {}
    done: dict[str, float] = {}
    error = None
    announced: set[str] = set()

    def announce():
        for n in stages:
            if n not in announced and all(j.name in done for j in jobs if j.stage == n):
                announced.add(n)
                if stage_done is not None:
                    stage_done(n)
    announce()
    if not jobs:
        return {}
    log(f"[fgbg] {len(jobs)} jobs on {workers} single-thread workers: {', '.join(j.name for j in todo)}")
    # the workers inherit the lock's token: their stages re-enter it
    with run_lock(cfg.run_dir), ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"),
                                                    initializer=pool_worker_init,
                                                    initargs=(os.getpid(),)) as pool:
        while (todo and error is None) or running:
            for job in [j for j in todo if all(n in done for n in j.needs)] if error is None else []:
                if len(running) >= workers:
                    break
                fut = pool.submit(run_job, job.name, cfg, force and job.force)
                running[fut] = (job, time.time())
                todo.remove(job)
            if not running:
                break
            finished, _ = wait(list(running), return_when=FIRST_COMPLETED)
            for fut in finished:
                job, t0 = running.pop(fut)
                if fut.exception() is not None:
                    if error is None:
                        error = fut.exception()
                        error.job = job.name
                    log(f"[fgbg] job {job.name} failed: {str(fut.exception()).splitlines()[0][:300]}")
                    continue
                done[job.name] = round(time.time() - t0, 1)
                log(f"[fgbg] job {job.name} done in {done[job.name]:.0f} s")
            if error is None:
                announce()
    if error is not None:
        raise error
    if todo:
        raise RuntimeError(f"jobs {[j.name for j in todo]} could not start: their inputs never finished")
    return done
