"""Parameter files: a typed schema with defaults, validation that names the key and the file, and
`--set key=value` overrides with dotted keys."""
from __future__ import annotations

import copy
import difflib
from pathlib import Path
from typing import Any

import yaml

PROJECT_ROOT = Path(__file__).resolve().parents[2]


class ParamsError(ValueError):
    """A parameter file or override is invalid; the message names the key, the file and the fix."""


# Each leaf: (allowed types, default, help). A nested dict is a section.
SCHEMA: dict[str, Any] = {
    "run_dir": ((str,), "runs/toy", "run folder for all stage outputs (relative paths: project root)"),
    "seed": ((int,), 0, "global seed; per-image draws use (seed, stage, image id)"),
    "object": ((str,), "shape", "the object word; must appear in `prompt`"),
    "parts": ((list,), [], "extra words in the prompt whose maps are summed with the object's"),
    "prompt": ((str,), "a photo of a {object}", "y_f; `{object}` is replaced by the object word"),
    "background_prompt": ((str,), "a photo of a background", "y_b"),
    "T0": ((int,), 40, "number of lowest DDIM noise levels averaged in stage 01 (1..50)"),
    "device": ((str,), "auto", "auto, cpu or cuda"),
    "dtype": ((str,), "float32", "float32, float16 or bfloat16 (UNet weights)"),
    "model": {
        "path": ((str,), "models/toy-ldm", "hub id or local diffusers folder of the pretrained model"),
        "revision": ((str, type(None)), None, "hub revision (pin it for real models)"),
    },
    "dataset": {
        "kind": ((str,), "toy", "toy, folder or cub"),
        "root": ((str, type(None)), None, "dataset folder; for toy, null = a cache keyed by parameters"),
        "seed": ((int,), 0, "toy generator seed / split seed for folders without split.csv"),
        "n_train": ((int,), 96, "toy: number of training images"),
        "n_test": ((int,), 64, "toy: number of test images"),
        "image_size": ((int,), 64, "toy: image size in pixels"),
        "background_fraction": ((float, int), 0.0, "toy: share of background-only images"),
        "test_fraction": ((float, int), 0.3, "folder without split.csv: share of test images"),
        "splits": ((list,), ["train", "test"], "which splits the stages process"),
        "limit": ((int, type(None)), None, "at most this many images per split"),
        "on_corrupt": ((str,), "skip", "skip (warn and list) or error"),
        "ground_truth": ((bool,), True, "read masks/ as ground truth (false: treat as unlabelled)"),
    },
    "attention": {
        "grid_steps": ((int,), 50, "DDIM grid size; T0 takes its lowest entries [P: 50]"),
        "batch_rows": ((int,), 160, "UNet rows per call (images x noise levels), the memory budget"),
        "latent": ((str,), "mode", "VAE posterior: mode (deterministic) or sample [C]"),
        "sweep": ((bool,), True, "also keep all grid_steps per-timestep maps for the T0 sweep"),
        "keep_per_layer": ((bool,), True, "keep per-layer maps for exploration"),
    },
    "binarization": {
        "orphan_filter": ((bool,), True, "3x3 majority filter after the GMM [P]"),
        "gmm_seed": ((int,), 0, "random_state of the GMM [I]"),
    },
    "finetune": {
        "max_train_steps": ((int, type(None)), None, "optimizer steps of stage 03 (required there)"),
        "batch_size": ((int,), 4, "images per step and device [C: 3-4]"),
        "learning_rate": ((float, int), 1e-4, "constant AdamW learning rate [C]"),
        "p_full": ((float, int), 0.5, "share of full-image samples with y_f [C]"),
        "loss_norm": ((str,), "latent", "latent (official) or mask [I]"),
        "mode": ((str,), "full", "full UNet or lora [I]"),
        "lora_rank": ((int,), 4, "LoRA rank when mode is lora"),
        "ema_decay": ((float, int), 0.9999, "EMA decay [C]"),
        "use_ema": ((bool,), True, "sample with EMA weights [C]"),
        "gradient_accumulation_steps": ((int,), 1, "micro-batches per optimizer step"),
        "mixed_precision": ((str,), "no", "no, bf16 or fp16"),
        "gradient_checkpointing": ((bool,), False, "trade compute for memory"),
        "checkpoint_every": ((int,), 200, "steps between resumable checkpoints"),
        "hflip": ((bool,), True, "random horizontal flip [C]"),
        "eval_samples": ((int,), 16, "y_f and y_b samples before/after fine-tuning (0: none)"),
        "eval_steps": ((int,), 50, "DDIM steps of those samples"),
        "eval_guidance": ((float, int), 3.0, "scale s of the y_b-vs-y_f contrast samples"),
    },
    "refinement": {
        "steps": ((int,), 50, "DDIM steps of the inpainting [P]"),
        "guidance_scale": ((float, int), 1.0, "> 1: CFG with y_f as the negative prompt"),
        "reference": ((str,), "roundtrip", "difference against the VAE round trip or the original"),
        "batch_size": ((int,), 8, "images per inpainting batch"),
        "orphan_filter": ((bool,), True, "orphan filter inside g [C]"),
        "postprocess": ((bool,), False, "binary closing + hole filling [C, off by default]"),
        "gmm_seed": ((int,), 0, "random_state of the GMM"),
    },
    "synthesis": {
        "n_images": ((int, type(None)), None, "synthetic images D' (null: as many as the train split) [I]"),
        "guidance": ((float, int), 1.0, "concept guidance s of D' (1: plain y_f) [I: paper's FID at 1]"),
        "steps": ((int,), 50, "DDIM steps [C]"),
        "batch_size": ((int,), 16, "images per sampling batch"),
        "background_images": ((int,), 16, "pure backgrounds sampled with y_b"),
        "background_guidance": ((float, int), -2.0, "s of the pure backgrounds (< 0: away from y_f)"),
        "sweep_scales": ((list,), [-2, -1, 0, 1, 2, 3, 5, 7.5], "scales of the guidance-sweep figure"),
        "sweep_seeds": ((int,), 3, "seeds (rows) of the guidance-sweep figure"),
        "disk_budget_gb": ((float, int), 50.0, "refuse n_images whose outputs could exceed this (raw upper bound; CUB: ~24 GB)"),
    },
    "segmentation": {
        "rows": ((list,), ["unet_M_pre", "unet_D_s", "unet_D_s_plus_synth", "supervised"],
                 "U-Net rows of Table 2 to train"),
        "size": ((int,), 128, "input size (short side, crop) [C: 128]"),
        "base_width": ((int,), 64, "width of the first level [C: 64]"),
        "depth": ((int,), 4, "max-pool downs [C: 4]"),
        "steps": ((int,), 12000, "Adam steps [C: 12,000]"),
        "batch_size": ((int,), 32, "images per step [C: 32]"),
        "lr": ((float, int), 2e-3, "Adam learning rate [C]"),
        "lr_schedule": ((str,), "constant", "constant [C] or cosine (decays to 0; steadier last weights)"),
        "threshold": ((float, int), 0.5, "decision threshold [C]"),
        "hflip": ((bool,), True, "random horizontal flips [C]"),
        "protocol": ((str,), "full", "full (original size) or center_crop (the official crop)"),
        "seed": ((int,), 0, "weights, crops and batch order"),
        "detector_area": ((float, int), 0.01, "object-free check: supervised U-Net area below this"),
    },
    "evaluation": {
        "split": ((str,), "test", "split the metrics are reported on"),
        "ground_truth_kind": ((str,), "masks", "masks, or boxes (masks/ hold box images: box IoU vs them)"),
        "auc_bins": ((int,), 10000, "bins of the streaming AUC-ROC"),
        "figure_images": ((int,), 8, "images in figure grids"),
    },
}

CHOICES = {
    "device": ("auto", "cpu", "cuda"),
    "dtype": ("float32", "float16", "bfloat16"),
    "dataset.kind": ("toy", "folder", "cub"),
    "dataset.on_corrupt": ("skip", "error"),
    "attention.latent": ("mode", "sample"),
    "finetune.loss_norm": ("latent", "mask"),
    "finetune.mode": ("full", "lora"),
    "finetune.mixed_precision": ("no", "bf16", "fp16"),
    "refinement.reference": ("roundtrip", "original"),
    "segmentation.protocol": ("full", "center_crop"),
    "segmentation.lr_schedule": ("constant", "cosine"),
    "evaluation.ground_truth_kind": ("masks", "boxes"),
}
SEG_ROWS = ("unet_M_pre", "unet_D_s", "unet_D_s_plus_synth", "supervised")
PATH_KEYS = ("run_dir", "dataset.root")


def defaults(schema: dict = SCHEMA) -> dict:
    return {k: defaults(v) if isinstance(v, dict) else copy.deepcopy(v[1]) for k, v in schema.items()}


def _closest(key: str, options) -> str:
    near = difflib.get_close_matches(key, list(options), n=1)
    return f" Did you mean `{near[0]}`?" if near else ""


def _merge(base: dict, new: dict, schema: dict, source: str, prefix: str = "") -> None:
    for key, value in new.items():
        dotted = f"{prefix}{key}"
        if key not in schema:
            raise ParamsError(f"{source}: unknown parameter `{dotted}`.{_closest(key, schema)} "
                              f"Known keys here: {', '.join(schema)}.")
        spec = schema[key]
        if isinstance(spec, dict):
            if not isinstance(value, dict):
                raise ParamsError(f"{source}: `{dotted}` must be a section (mapping), got {value!r}.")
            _merge(base[key], value, spec, source, dotted + ".")
            continue
        types = spec[0]
        ok = isinstance(value, types) and not (isinstance(value, bool) and bool not in types)
        if not ok:
            names = " or ".join("null" if t is type(None) else t.__name__ for t in types)
            raise ParamsError(f"{source}: `{dotted}` must be {names}, got {value!r} "
                              f"({type(value).__name__}). Fix the value; it means: {spec[2]}.")
        base[key] = float(value) if float in types and isinstance(value, int) and not isinstance(value, bool) else value


def _get(cfg: dict, dotted: str):
    for part in dotted.split("."):
        cfg = cfg[part]
    return cfg


def _check(cfg: dict, source: str) -> None:
    for key, options in CHOICES.items():
        if _get(cfg, key) not in options:
            raise ParamsError(f"{source}: `{key}` is {_get(cfg, key)!r}; choose one of {options}.")
    grid = cfg["attention"]["grid_steps"]
    if not 1 <= cfg["T0"] <= min(50, grid):
        raise ParamsError(f"{source}: `T0` is {cfg['T0']}; it must be between 1 and {min(50, grid)} "
                          f"(the lowest T0 of the {grid}-step DDIM grid; the paper uses 40).")
    if "{object}" not in cfg["prompt"] and not _has_word(cfg["prompt"], cfg["object"]):
        raise ParamsError(f"{source}: the object word `object`={cfg['object']!r} is not in `prompt`="
                          f"{cfg['prompt']!r}. Put the word (or `{{object}}`) into the prompt.")
    for word in cfg["parts"]:
        if not _has_word(resolved_prompt(cfg), word):
            raise ParamsError(f"{source}: `parts` word {word!r} is not in the prompt "
                              f"{resolved_prompt(cfg)!r}. Add it to `prompt` or remove it from `parts`.")
    for split in cfg["dataset"]["splits"]:
        if split not in ("train", "val", "test"):
            raise ParamsError(f"{source}: `dataset.splits` has {split!r}; use train, val or test.")
    for row in cfg["segmentation"]["rows"]:
        if row not in SEG_ROWS:
            raise ParamsError(f"{source}: `segmentation.rows` has {row!r}; choose from {SEG_ROWS}.")
    n_syn = cfg["synthesis"]["n_images"]
    if n_syn is not None and n_syn < 0:
        raise ParamsError(f"{source}: `synthesis.n_images` is {n_syn}; use >= 0 or null.")
    positive = [("dataset.n_train", 0), ("dataset.n_test", 0), ("dataset.image_size", 8),
                ("attention.batch_rows", 1), ("attention.grid_steps", 1), ("evaluation.auc_bins", 2),
                ("synthesis.steps", 1), ("synthesis.batch_size", 1), ("synthesis.background_images", 0),
                ("segmentation.size", 8), ("segmentation.base_width", 1), ("segmentation.depth", 1),
                ("segmentation.steps", 1), ("segmentation.batch_size", 1)]
    for key, low in positive:
        if _get(cfg, key) < low:
            raise ParamsError(f"{source}: `{key}` is {_get(cfg, key)}; it must be >= {low}.")


def _has_word(text: str, word: str) -> bool:
    import re
    return re.search(rf"(?<!\w){re.escape(word)}(?!\w)", text, flags=re.IGNORECASE) is not None


def resolved_prompt(cfg: dict, prompt: str | None = None) -> str:
    return (prompt or cfg["prompt"]).replace("{object}", cfg["object"])


def parse_override(item: str) -> tuple[str, Any]:
    """`a.b=value` -> ("a.b", yaml-parsed value)."""
    if "=" not in item:
        raise ParamsError(f"--set {item!r}: expected KEY=VALUE, e.g. --set dataset.seed=1")
    key, raw = item.split("=", 1)
    value = yaml.safe_load(raw) if raw.strip() else ""
    if isinstance(value, str):  # YAML 1.1 reads "3e-5" as a string; numbers are meant
        try:
            value = float(value) if any(c in value.lower() for c in ".e") else int(value)
        except ValueError:
            pass
    return key.strip(), value


def _nest(dotted: str, value) -> dict:
    out: dict = {}
    node = out
    parts = dotted.split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = value
    return out


def resolve_path(value: str | None, base: Path = PROJECT_ROOT) -> str | None:
    if value is None:
        return None
    p = Path(value).expanduser()
    return str(p if p.is_absolute() else (base / p).resolve())


def load_params(path: str | Path | None = None, overrides=(), run_dir: str | None = None) -> dict:
    """Defaults <- YAML file <- overrides (`key=value` strings or a {dotted: value} dict); validated.
    Relative paths are resolved against the project root."""
    cfg = defaults()
    if path is not None:
        path = Path(path)
        if not path.is_file() and not path.is_absolute() and (PROJECT_ROOT / path).is_file():
            path = PROJECT_ROOT / path  # relative paths: the working directory, then the project root
        if not path.is_file():
            raise ParamsError(f"parameter file {path} does not exist; pass one of params/*.yaml.")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ParamsError(f"{path}: not valid YAML ({e}). Fix the syntax.") from None
        if not isinstance(data, dict):
            raise ParamsError(f"{path}: the top level must be a mapping of parameters.")
        _merge(cfg, data, SCHEMA, str(path))
    items = overrides.items() if isinstance(overrides, dict) else (parse_override(o) for o in overrides)
    for key, value in items:
        _merge(cfg, _nest(key, value), SCHEMA, f"override {key}={value!r}")
    if run_dir is not None:
        cfg["run_dir"] = run_dir
    source = str(path) if path else "parameters"
    _check(cfg, source)
    cfg["run_dir"] = resolve_path(cfg["run_dir"])
    cfg["dataset"]["root"] = resolve_path(cfg["dataset"]["root"])
    local_model = Path(resolve_path(cfg["model"]["path"]))
    if local_model.exists():
        cfg["model"]["path"] = str(local_model)
    return cfg


def save_params(cfg: dict, path: str | Path) -> None:
    from fgbg_utils.io import atomic_write_text
    atomic_write_text(path, yaml.safe_dump(cfg, sort_keys=False))
