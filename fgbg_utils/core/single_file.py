"""Loading a Stable Diffusion single-file checkpoint (`.safetensors`, or a `.ckpt` that holds
tensors only) in the original LDM layout, offline, into the same `LDM` that `load_ldm` returns.

Parameters: `model.path` = the checkpoint file; `model.config` = a LOCAL diffusers folder of the
same architecture (model_index.json, */config.json, tokenizer files, scheduler_config.json; its
weights are not read), e.g. a `save_pretrained` copy of the matching base model. Loading goes
through `StableDiffusionPipeline.from_single_file(path, config=..., local_files_only=True)`; the
scheduler is a DDIMScheduler built from the config folder's scheduler config.

A `.ckpt` is a pickle: it is refused unless `torch.load(weights_only=True)` can read it (plain
tensors and containers only), so no code from the file is ever run.
"""
from __future__ import annotations

import pickle
from pathlib import Path

import torch

from fgbg_utils.core.models import LDM, ModelError, assemble

SUFFIXES = (".safetensors", ".ckpt")


def is_single_file(path) -> bool:
    return str(path).lower().endswith(SUFFIXES)


def check_ckpt(path: Path) -> None:
    """ModelError unless the .ckpt loads with torch.load(weights_only=True)."""
    try:
        try:
            torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:  # mmap needs the zip format; old files are read whole
            if "mmap" not in str(e):
                raise
            torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as e:
        raise ModelError(f"`model.path`={str(path)!r}: this .ckpt cannot be read as plain tensors "
                         f"(torch.load(weights_only=True) refused it: {str(e).splitlines()[0]}). "
                         f"Pickled code is never run; convert the file to .safetensors with a tool "
                         f"you trust, or use a diffusers folder.") from None


def _config_folder(path: Path, config) -> Path:
    if config is None:
        if (path.parent / "model_index.json").is_file():
            return path.parent
        raise ModelError(f"`model.path`={str(path)!r} is a single-file checkpoint: set `model.config` "
                         f"to a local diffusers folder of the same architecture (model_index.json, "
                         f"unet/, vae/, text_encoder/, tokenizer/, scheduler/ configs) - nothing is "
                         f"downloaded.")
    folder = Path(config)
    if not (folder / "model_index.json").is_file():
        raise ModelError(f"`model.config`={str(folder)!r} is not a diffusers folder (no "
                         f"model_index.json); point it at a local copy of the base model's "
                         f"diffusers folder (configs and tokenizer are enough).")
    return folder


def load_single_file(path, config=None, device: str = "auto", dtype: str = "float32") -> LDM:
    """VAE, UNet, text encoder, tokenizer and a DDIM scheduler from one original-format file.
    `config`: the local diffusers folder (default: the file's folder if it has model_index.json)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    path = Path(path)
    if not path.is_file():
        raise ModelError(f"`model.path`={str(path)!r} does not exist; point it at a .safetensors "
                         f"or .ckpt file, or at a diffusers folder.")
    if not is_single_file(path):
        raise ModelError(f"`model.path`={str(path)!r}: a single-file checkpoint must end in "
                         f"{' or '.join(SUFFIXES)}.")
    folder = _config_folder(path, config)
    if path.suffix.lower() == ".ckpt":
        check_ckpt(path)
    try:
        pipe = StableDiffusionPipeline.from_single_file(
            str(path), config=str(folder), local_files_only=True, safety_checker=None,
            feature_extractor=None, requires_safety_checker=False)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise ModelError(f"`model.path`={str(path)!r} could not be loaded as an SD checkpoint with "
                         f"`model.config`={str(folder)!r} ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''}). Check that the file is an "
                         f"original-format Stable Diffusion checkpoint and that the config folder "
                         f"is of the same architecture.") from None
    return assemble(pipe.vae, pipe.unet, pipe.text_encoder, pipe.tokenizer,
                    DDIMScheduler.from_config(pipe.scheduler.config), path, device, dtype)
