"""Stage 01 sharded over processes: wall time of one process against `accelerate launch --cpu
--num_processes N`, one thread each, on a toy run; the outputs must be byte-identical.

    python benchmarks/scaleout.py [--n-train 256] [--n-test 64] [--processes 2]
                                  [--work /tmp/fgbg-scaleout] [--json OUT] [--memory-images 64]
                                  [--no-masks] [--target 0.8]

Steps (each run into a fresh folder; the toy dataset is written first and not timed):
  one   `python -m fgbg_utils stage 01 params/toy.yaml --out WORK/one ...` (OMP_NUM_THREADS=1);
  many  `accelerate launch --cpu --num_processes N ... -m fgbg_utils stage 01 ... --out WORK/many`;
  check every map array equal; then stage 02 (one process, not timed) in both folders and every
        mask PNG equal (skipped with --no-masks);
  rss   the peak resident memory of one process (`wait4` rusage: the largest process of the tree)
        of stage 01 on --memory-images images against the n_train + n_test run: images are streamed
        group by group, so it should not grow with the dataset.
Reported: wall seconds, seconds to the first map written (start-up: imports, model load, for N
processes also the relaunch under torch.distributed.run), the ratio many/one (target <= --target),
the load average and CPU use of other processes before each run (the machine may be shared).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE",
       "PYTHONHASHSEED": "0", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
PARAMS = ROOT / "params" / "toy.yaml"


def sets(n_train: int, n_test: int) -> list[str]:
    return ["--set", f"dataset.n_train={n_train}", "--set", f"dataset.n_test={n_test}"]


def stage_cmd(stage: str, out: Path, n_train: int, n_test: int, processes: int = 1) -> list[str]:
    cli = ["-m", "fgbg_utils", "stage", stage, str(PARAMS), "--out", str(out), *sets(n_train, n_test)]
    if processes == 1:
        return [sys.executable, *cli]
    return [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes",
            str(processes), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            *cli]


def machine_load() -> dict:
    """Load average and the CPU share used by processes other than this one over one second."""
    import psutil

    me = os.getpid()
    procs = [p for p in psutil.process_iter() if p.pid != me]
    for p in procs:
        try:
            p.cpu_percent(None)
        except psutil.Error:
            pass
    time.sleep(1.0)
    busy = 0.0
    for p in procs:
        try:
            busy += p.cpu_percent(None)
        except psutil.Error:
            pass
    return {"loadavg_1m": round(os.getloadavg()[0], 2), "other_cpu_percent": round(busy, 1),
            "cpus": os.cpu_count()}


def timed(cmd: list[str], first_output: Path | None = None) -> dict:
    """Wall time, time to the first file in `first_output`, and the peak RSS (largest process)."""
    load = machine_load()
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=ENV, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    first, done = {}, threading.Event()

    def watch():  # never reaps the child: wait4 below must get its rusage
        while not done.is_set() and "s" not in first:
            if first_output is not None and first_output.is_dir() and any(first_output.glob("*.npz")):
                first["s"] = time.perf_counter() - t0
            time.sleep(0.05)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    done.set()
    proc.returncode = os.waitstatus_to_exitcode(status)
    watcher.join()
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{err.decode()[-3000:]}")
    return {"wall_s": round(wall, 2), "first_map_s": round(first["s"], 2) if "s" in first else None,
            "peak_rss_mb": round(usage.ru_maxrss / 1024, 1), "load_before": load}


def same_files(a: Path, b: Path, pattern: str) -> dict:
    """Compare every file matching `pattern` under a and b (npz: arrays; else bytes)."""
    fa = sorted(p.relative_to(a) for p in a.glob(pattern))
    fb = sorted(p.relative_to(b) for p in b.glob(pattern))
    differ = []
    for rel in fa:
        if rel.suffix == ".npz":
            with np.load(a / rel) as x, np.load(b / rel) as y:
                same = x.files == y.files and all(np.array_equal(x[k], y[k]) for k in x.files)
        else:
            same = (a / rel).read_bytes() == (b / rel).read_bytes()
        if not same:
            differ.append(str(rel))
    return {"n_files": len(fa), "same_listing": fa == fb, "n_differ": len(differ),
            "identical": fa == fb and not differ and len(fa) > 0, "differ_examples": differ[:5]}


def write_dataset(n_train: int, n_test: int) -> str:
    from fgbg_utils import load_params
    from fgbg_utils.data.loader import dataset_root

    cfg = load_params(PARAMS, {"dataset.n_train": n_train, "dataset.n_test": n_test})
    return str(dataset_root(cfg))


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-train", type=int, default=256)
    ap.add_argument("--n-test", type=int, default=64)
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--work", default="/tmp/fgbg-scaleout", help="run folders (emptied first)")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--memory-images", type=int, default=64,
                    help="images of the small run for the memory check (0: skip)")
    ap.add_argument("--no-masks", action="store_true", help="skip stage 02 and the mask comparison")
    ap.add_argument("--target", type=float, default=0.8, help="ratio many/one to meet")
    a = ap.parse_args(argv)

    import accelerate
    import torch

    work = Path(a.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    n = a.n_train + a.n_test
    res = {"images": n, "n_train": a.n_train, "n_test": a.n_test, "processes": a.processes,
           "threads_per_process": 1, "python": platform.python_version(), "torch": torch.__version__,
           "accelerate": accelerate.__version__, "host": platform.node()}
    t = time.perf_counter()
    res["dataset"] = write_dataset(a.n_train, a.n_test)
    res["dataset_write_s"] = round(time.perf_counter() - t, 2)
    maps = "01_attention_maps/maps"
    print(f"stage 01 on {n} images, 1 process x 1 thread ...", flush=True)
    res["one"] = timed(stage_cmd("01", work / "one", a.n_train, a.n_test), work / "one" / maps)
    print(f"  {res['one']}\nstage 01, {a.processes} processes x 1 thread ...", flush=True)
    res["many"] = timed(stage_cmd("01", work / "many", a.n_train, a.n_test, a.processes),
                        work / "many" / maps)
    print(f"  {res['many']}", flush=True)
    res["ratio"] = round(res["many"]["wall_s"] / res["one"]["wall_s"], 3)
    res["meets_target"] = res["ratio"] <= a.target
    res["target"] = a.target
    summary = json.loads((work / "many" / "01_attention_maps" / "summary.json").read_text())
    res["many"]["processes_seen"] = summary["processes"]
    res["maps"] = same_files(work / "one", work / "many", f"{maps}/*.npz")
    if not a.no_masks:
        for d in ("one", "many"):
            subprocess.run(stage_cmd("02", work / d, a.n_train, a.n_test), env=ENV, cwd=ROOT,
                           check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        res["masks"] = same_files(work / "one", work / "many", "02_binarization/masks/*.png")
    if a.memory_images:
        small_train = a.memory_images - a.memory_images // 4
        write_dataset(small_train, a.memory_images // 4)
        print(f"stage 01 on {a.memory_images} images (memory) ...", flush=True)
        small = timed(stage_cmd("01", work / "small", small_train, a.memory_images // 4))
        res["memory"] = {"images_small": a.memory_images, "peak_rss_mb_small": small["peak_rss_mb"],
                         "images_large": n, "peak_rss_mb_large": res["one"]["peak_rss_mb"],
                         "ratio": round(res["one"]["peak_rss_mb"] / small["peak_rss_mb"], 3)}
    res["load_after"] = machine_load()
    print(json.dumps(res, indent=1))
    if a.json:
        from fgbg_utils.io import atomic_write_json
        atomic_write_json(Path(a.json), res)
    return res


if __name__ == "__main__":
    main()
