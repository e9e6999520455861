"""The headless runner with its job graph against the notebooks computing in order: wall time of
`python -m fgbg_utils run params/toy.yaml --jobs 2` over `--jobs 1`, one thread per process, each
into a fresh run folder; every output file that holds results must be byte-identical.

    python benchmarks/runner.py [--set key=value ...] [--work /tmp/fgbg-runner] [--json OUT]
                                [--target 0.75] [--full]

By default a reduced toy run (48 + 32 images, 500 fine-tuning steps, 150 U-Net steps; the toy
world is written first and not timed); --full times the default run itself (about 15 minutes for both). Reported:
wall seconds of both runs, the ratio jobs2/jobs1 (target <= --target), each job's own seconds, and
the files that differ (none expected: maps, masks, images, networks, metrics rows).
"""
from __future__ import annotations

import argparse
import filecmp
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE",
       "PYTHONHASHSEED": "0", "HF_HUB_OFFLINE": "1", "FGBG_RUN_LOCK": ""}
REDUCED = ["dataset.n_train=48", "dataset.n_test=32", "finetune.max_train_steps=500",
           "finetune.eval_samples=8", "synthesis.n_images=32", "synthesis.sweep_seeds=1",
           "segmentation.steps=150"]
RESULTS = ("*.npz", "*.png", "*.safetensors")


def run(out: Path, jobs: int, sets: list[str]) -> float:
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "fgbg_utils", "run", "params/toy.yaml", "--out", str(out),
           "--jobs", str(jobs), *sum((["--set", s] for s in sets), [])]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if r.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{(r.stdout + r.stderr)[-3000:]}")
    return seconds


def differing(a: Path, b: Path) -> list[str]:
    files = sorted({p.relative_to(a) for pattern in RESULTS for p in a.rglob(pattern)
                    if "notebooks" not in p.parts})
    out = [str(f) for f in files if not (b / f).exists() or not filecmp.cmp(a / f, b / f, shallow=False)]
    rows = [json.loads((d / "metrics" / "06_evaluation.json").read_text())["rows"] for d in (a, b)]
    return out + (["metrics/06_evaluation.json rows"] if rows[0] != rows[1] else [])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--set", dest="sets", action="append", default=[])
    ap.add_argument("--work", default="/tmp/fgbg-runner")
    ap.add_argument("--json")
    ap.add_argument("--target", type=float, default=0.75)
    ap.add_argument("--full", action="store_true", help="the default run (no reduction)")
    args = ap.parse_args()
    sets = ([] if args.full else REDUCED) + args.sets
    work = Path(args.work)
    warm = subprocess.run([sys.executable, "-c", "import sys; from fgbg_utils.runs.params import load_params; "
                           "from fgbg_utils.data.loader import load_dataset; "
                           "load_dataset(load_params('params/toy.yaml', sys.argv[2:], run_dir=sys.argv[1]), "
                           "check=False)",
                           str(work / "warm"), *sets], cwd=ROOT, env=ENV)  # writes the toy world once
    if warm.returncode:
        sys.exit("could not write the toy world")
    one = run(work / "jobs1", 1, sets)
    two = run(work / "jobs2", 2, sets)
    manifest = json.loads((work / "jobs2" / "manifest.json").read_text())
    diff = differing(work / "jobs1", work / "jobs2")
    result = {"sets": sets, "cpus": os.cpu_count(), "jobs1_seconds": round(one, 1),
              "jobs2_seconds": round(two, 1), "ratio": round(two / one, 3), "target": args.target,
              "job_seconds": manifest["jobs"]["seconds"], "differing_files": diff}
    print(json.dumps(result, indent=1))
    print(f"jobs 2 / jobs 1 = {two:.0f} s / {one:.0f} s = {two / one:.2f} (target <= {args.target}); "
          f"{'identical outputs' if not diff else f'{len(diff)} files differ'}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    sys.exit(1 if diff else 0)


if __name__ == "__main__":
    main()
