"""Command line: `python -m fgbg_utils run|stage|study|guidance-sweep|predict|metrics|report|verify|train-toy ...`.
Relative folders (run folders, --images, --out) are resolved against the project root, as
`run_dir` in a parameter file is, and each command says which folder it uses."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _repeated_runs(parser, out_help: str) -> None:
    """The options shared by `study` and `guidance-sweep`."""
    parser.add_argument("params")
    parser.add_argument("--unet-seeds", default="0,1,2", help="segmentation.seed values, e.g. 0,1,2")
    parser.add_argument("--out", required=True, help=out_help)
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--jobs", default="auto", help="worker processes of the job graph (auto: 2 on a CPU)")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fgbg_utils", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="execute the stage notebooks headless into a run folder")
    r.add_argument("params", help="parameter file, e.g. params/toy.yaml")
    r.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override a parameter (dotted keys reach nested ones); repeatable")
    r.add_argument("--stages", help="comma-separated stage numbers, e.g. 01,02 (default: all)")
    r.add_argument("--out", help="run folder (default: run_dir of the params file)")
    r.add_argument("--force", action="store_true", help="recompute finished outputs")
    r.add_argument("--jobs", default="auto", help="worker processes: the stages' work runs as a graph "
                   "of jobs on them, then the notebooks show it (auto: 2 on a CPU, 1 on a GPU; 1: "
                   "the notebooks compute, in order)")
    st = sub.add_parser("stage", help="run one stage's function directly (no notebook); e.g. "
                        "`accelerate launch -m fgbg_utils stage 03 params/cub.yaml --out runs/cub` "
                        "fine-tunes on several GPUs")
    st.add_argument("number", choices=["01", "02", "03", "04", "05", "06"])
    st.add_argument("params")
    st.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    st.add_argument("--out")
    st.add_argument("--force", action="store_true")
    pr = sub.add_parser("predict", help="apply a run's label-free segmentation U-Net to a folder of images")
    pr.add_argument("--run", required=True, help="run folder with a finished stage 06")
    pr.add_argument("--images", required=True, help="folder of images (searched recursively)")
    pr.add_argument("--out", required=True, help="output folder: OUT/<image stem>.png masks")
    pr.add_argument("--row", default=None, help="network: unet_D_s_plus_synth (default when trained), "
                    "unet_D_s, unet_M_pre or supervised")
    pr.add_argument("--overlay", action="store_true", help="also write OUT/overlays/<stem>.png")
    pr.add_argument("--on-corrupt", default="skip", choices=["skip", "error"],
                    help="unreadable images: skip and list them (default) or stop")
    pr.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    pr.add_argument("--batch-size", type=int, default=None)
    sd = sub.add_parser("study", help="Table 2 over toy worlds x U-Net init seeds: 95 %% intervals "
                        "and a paired verdict per step (DIR/study.json, DIR/study.md)")
    sd.add_argument("--worlds", default="0,1,2", help="dataset seeds, e.g. 0,1,2 (never 100: the validation world)")
    _repeated_runs(sd, "study folder: DIR/world-<w>/ run folders, study.json, study.md")
    gs = sub.add_parser("guidance-sweep", help="Fig. 8: FID of D' and IoU of U-Net(D_s ∪ D'_s) against "
                        "the guidance scale s (DIR/sweep.json, DIR/sweep.md)")
    gs.add_argument("--scales", default="1,2,3,7.5", help="guidance scales s, e.g. 1,2,3,7.5")
    _repeated_runs(gs, "sweep folder: DIR/base/, DIR/s-<s>/, sweep.json, sweep.md")
    m = sub.add_parser("metrics", help="print the metrics table of a run folder")
    m.add_argument("run_dir")
    rep = sub.add_parser("report", help="write DIR/report.html: the metrics table and the executed notebooks")
    rep.add_argument("run_dir")
    ver = sub.add_parser("verify", help="check every output of a run folder against the hashes its "
                         "stages recorded; exits 1 and lists the files that are missing or altered")
    ver.add_argument("run_dir")
    t = sub.add_parser("train-toy", help="remake the shipped toy LDM: phase 1, phase 2 with EMA "
                       "snapshots, selection on the validation world (what notebook 00 runs)")
    t.add_argument("--model", choices=["ldm", "dit", "features"], default="ldm", help="ldm: the toy LDM; "
                   "dit: the toy MMDiT (training/toy_dit.py); "
                   "features: the toy world's FID feature network (training/feature_net.py)")
    t.add_argument("--out", default=None, help="default: models/toy-ldm, models/toy-dit or models/toy-features")
    t.add_argument("--work", default=None, help="phase-1 model, phase-2 snapshots, validation runs "
                   "(default work_toy; dit: work_toy_dit, resumed when a training state is there)")
    t.add_argument("--dit-minutes", type=float, default=40, help="dit: training budget")
    t.add_argument("--dit-steps", type=int, help="dit: fixed training steps (instead of --dit-minutes)")
    t.add_argument("--dit-patch-size", type=int, default=2, help="dit: patch size on the 16x16 latent")
    t.add_argument("--dit-token-std", type=float, default=1.0, help="dit: std of the word embeddings "
                   "at init (CLIP's: 0.02, which lets the image stream wash the words into one vector)")
    t.add_argument("--dit-sigma", choices=["uniform", "logit_normal"], default="logit_normal",
                   help="dit: how training draws σ (logit_normal: SD3's, mean --dit-logit-mean, std 1)")
    t.add_argument("--dit-logit-mean", type=float, default=0.0, help="dit: mean of the logit-normal σ")
    t.add_argument("--n-images", type=int, default=20000, help="training images per phase")
    t.add_argument("--threads", type=int, default=1)
    t.add_argument("--vae-minutes", type=float, default=10)
    t.add_argument("--phase1-minutes", type=float, default=20, help="phase-1 UNet budget")
    t.add_argument("--phase2-minutes", type=float, default=50, help="phase-2 UNet budget")
    t.add_argument("--vae-steps", type=int, help="fixed VAE steps (instead of --vae-minutes)")
    t.add_argument("--phase1-steps", type=int, help="fixed phase-1 UNet steps")
    t.add_argument("--phase2-steps", type=int, help="fixed phase-2 UNet steps")
    t.add_argument("--snapshot-minutes", type=float, default=10, help="EMA snapshot period of phase 2")
    t.add_argument("--snapshot-steps", default="", help="comma-separated phase-2 (ldm) or "
                   "training (dit) snapshot steps (then no timed snapshots)")
    t.add_argument("--steps-as-shipped", action="store_true", help="the shipped step counts: VAE "
                   "2323, phase 1 4270, phase 2 10499, snapshots 2153,4320,6497,8693")
    t.add_argument("--background-fraction", type=float, default=0.15, help="ldm: share of object-free "
                   "corpus images captioned 'a photo of a background' (0: the model never sees y_b)")
    t.add_argument("--vae-from", help="ldm: keep this toy model's VAE, train phase 1's UNet and text "
                   "encoder from scratch")
    t.add_argument("--init-from", help="skip phase 1 and continue from this toy model folder")
    t.add_argument("--select-on-validation", action=argparse.BooleanOptionalAction, default=True,
                   help="pick the phase-2 snapshot with the best M_pre IoU on the validation world "
                   "(dataset.seed=100); --no-select-on-validation ships the last weights")
    args = ap.parse_args(argv)
    if args.cmd == "verify":  # reads files only: no torch, no model
        return verify(args.run_dir)

    from fgbg_utils.data.datasets import DatasetError
    from fgbg_utils.core.models import ModelError
    from fgbg_utils.runs.params import ParamsError, resolve_input, resolve_path
    from fgbg_utils.storage import StageError
    from fgbg_utils.storage.errors import storage_error
    from fgbg_utils.core.tokens import TokenError
    for key in ("run_dir", "run", "out"):  # folders a run writes: under the project root
        if getattr(args, key, None) and args.cmd in ("metrics", "report", "verify", "predict"):
            setattr(args, key, resolve_path(getattr(args, key)))
    if args.cmd == "predict":  # an input folder: the working directory, then the project root
        args.images = resolve_input(args.images)
    try:
        if args.cmd == "run":
            from fgbg_utils.runs.runner import metrics_table, run
            run_dir = run(args.params, args.sets, args.stages, args.out, args.force, jobs=args.jobs)
            print(f"\nRun folder: {run_dir}\n")
            print(metrics_table(run_dir))
        elif args.cmd == "stage":
            from fgbg_utils.runs.params import load_params
            from fgbg_utils.stages.common import ensure_workers
            ensure_workers()  # accelerate's launcher on a machine without GPUs starts one process
            from fgbg_utils.stages.registry import stage_module
            from fgbg_utils.runs.runner import check_model_folder
            cfg = load_params(args.params, args.sets, run_dir=args.out)
            check_model_folder(cfg.model.path)
            stage_module(args.number).run(cfg, force=args.force)
            from accelerate import PartialState
            if PartialState().is_main_process:
                from fgbg_utils.runs.runner import metrics_table
                print(f"stage {args.number} done in {cfg.run_dir}\n")
                print(metrics_table(cfg.run_dir))
        elif args.cmd == "predict":
            from fgbg_utils.runs.predict import predict_folder
            print(f"run folder: {args.run}; images: {args.images}; masks to: {args.out}")
            res = predict_folder(args.run, args.images, args.out, args.row, args.overlay,
                                 args.on_corrupt, args.device, args.batch_size)
            print(f"wrote {res['n_written']} mask(s) to {args.out}"
                  + (f"; skipped {len(res['skipped'])} unreadable file(s)" if res["skipped"] else ""))
        elif args.cmd == "study":
            from fgbg_utils.runs.study import parse_ints, run_study
            study = run_study(args.params, parse_ints(args.worlds, "--worlds"),
                              parse_ints(args.unet_seeds, "--unet-seeds"), args.out, args.sets, args.jobs)
            print(f"\nwrote {args.out}/study.json and study.md ({study['seconds'] / 60:.1f} min)\n")
            print((Path(args.out) / "study.md").read_text())
        elif args.cmd == "guidance-sweep":
            from fgbg_utils.runs.guidance_sweep import parse_scales, run_guidance_sweep
            from fgbg_utils.runs.study import parse_ints
            sweep = run_guidance_sweep(args.params, parse_scales(args.scales),
                                       parse_ints(args.unet_seeds, "--unet-seeds"), args.out, args.sets, args.jobs)
            print(f"\nwrote {args.out}/sweep.json and sweep.md ({sweep['seconds'] / 60:.1f} min)\n")
            print((Path(args.out) / "sweep.md").read_text())
        elif args.cmd == "metrics":
            from fgbg_utils.runs.runner import metrics_table
            print(f"run folder: {existing_run_dir(args.run_dir)}\n")
            print(metrics_table(args.run_dir))
        elif args.cmd == "report":
            from fgbg_utils.runs.report import write_report
            existing_run_dir(args.run_dir)
            print(f"wrote {write_report(args.run_dir)}")
        elif args.cmd == "train-toy" and args.model == "features":
            from fgbg_utils.training.feature_net import train_feature_net
            train_feature_net(args.out or "models/toy-features", {"threads": args.threads})
        elif args.cmd == "train-toy" and args.model == "dit":
            from fgbg_utils.training.toy_dit import train_toy_dit
            train_toy_dit(args.out or "models/toy-dit", args.work or "work_toy_dit", n_images=args.n_images,
                          minutes=args.dit_minutes, steps=args.dit_steps, threads=args.threads,
                          snapshot_minutes=args.snapshot_minutes,
                          select_on_validation=args.select_on_validation,
                          arch={"patch_size": args.dit_patch_size, "token_std": args.dit_token_std},
                          sigma_sampling={"weighting_scheme": args.dit_sigma,
                                          "logit_mean": args.dit_logit_mean, "logit_std": 1.0},
                          snapshot_steps=[int(x) for x in args.snapshot_steps.split(",") if x.strip()])
        elif args.cmd == "train-toy":
            from fgbg_utils.training.toy_recipe import SHIPPED_STEPS, train_toy_recipe
            steps = {"vae_steps": args.vae_steps, "phase1_steps": args.phase1_steps,
                     "phase2_steps": args.phase2_steps,
                     "snapshot_steps": [int(x) for x in args.snapshot_steps.split(",") if x.strip()]}
            if args.steps_as_shipped:
                steps = {**SHIPPED_STEPS, "snapshot_steps": list(SHIPPED_STEPS["snapshot_steps"])}
            timed = None if steps["snapshot_steps"] else args.snapshot_minutes
            if args.vae_from and not (Path(args.vae_from) / "vae").is_dir():
                raise ModelError(f"--vae-from {args.vae_from}: no vae/ folder there; give a toy model "
                                 f"folder such as models/toy-ldm")
            train_toy_recipe(args.out or "models/toy-ldm", args.work or "work_toy", n_images=args.n_images,
                             threads=args.threads,
                             vae_minutes=args.vae_minutes, phase1_minutes=args.phase1_minutes,
                             phase2_minutes=args.phase2_minutes, snapshot_minutes=timed,
                             init_from=args.init_from, select_on_validation=args.select_on_validation,
                             background_fraction=args.background_fraction, vae_from=args.vae_from,
                             **steps)
    except (ParamsError, DatasetError, ModelError, StageError, TokenError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: the run folder keeps every finished output; run the same command "
              "again to resume.", file=sys.stderr)
        return 130
    except OSError as e:
        err = storage_error(e)
        if err is None:
            raise
        print(f"error: {err}", file=sys.stderr)
        return 2
    except Exception as e:
        if type(e).__name__ != "PapermillExecutionError":
            raise
        print(f"error: a notebook cell failed: {e.ename}: {e.evalue}\n(the executed notebook in "
              f"the run folder's notebooks/ shows the cell and the full traceback)", file=sys.stderr)
        return 1
    return 0


def verify(run_dir: str) -> int:
    """`verify DIR`: 0 when every recorded output matches, 1 when some do not, 2 without a run folder."""
    from fgbg_utils.runs.params import resolve_path
    from fgbg_utils.storage import StageError
    from fgbg_utils.storage.verify import verify_run

    try:
        return 1 if verify_run(existing_run_dir(resolve_path(run_dir))) else 0
    except StageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def existing_run_dir(path: str):
    """A run folder that must exist (metrics, report, verify)."""
    from pathlib import Path

    from fgbg_utils.storage import StageError

    if not Path(path).is_dir():
        raise StageError(f"run folder {path} does not exist; pass a folder made by `python -m "
                         f"fgbg_utils run PARAMS.yaml --out DIR` (relative paths are read from the "
                         f"project root).")
    return Path(path)
