"""Loading the pretrained text-to-image model: one code path (`from_pretrained`) for a hub id
and a local folder, the toy model and real Stable Diffusion alike."""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np
import torch


class ModelError(ValueError):
    """The model folder or id cannot be used; the message names `model.path` and the fix."""


@dataclass
class LDM:
    vae: object
    unet: object
    text_encoder: object
    tokenizer: object
    scheduler: object
    path: str
    family: str = "sd"          # sd (1.x/2.x), sdxl, sd3 or flux (core/families.py)
    extras: dict = field(default_factory=dict)  # the other text encoders/tokenizers of sdxl/sd3/flux

    @property
    def vae_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def latent_size(self) -> int:
        if self.family == "flux":  # no sample_size in Flux's transformer config: the VAE's
            return int(self.vae.config.sample_size) // self.vae_factor
        return int(self.unet.config.sample_size)

    @property
    def resolution(self) -> int:
        """Native resolution R of the canonical frame."""
        return self.latent_size * self.vae_factor

    @property
    def device(self):
        return self.unet.device


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ModelError("`device` is cuda but no GPU is visible; set device: auto or cpu.")
    return torch.device(name)


DTYPES = ("float32", "float16", "bfloat16")
PREDICTION_TYPES = ("epsilon", "v_prediction")


def resolve_dtypes(dtype: str, device: torch.device) -> tuple[torch.dtype, torch.dtype]:
    """(UNet dtype, VAE + text-encoder dtype) for a requested `dtype` on `device`.

    One dtype for all three (diffusers' pipelines take the latent dtype from the text encoder and
    feed it to the UNet and the VAE, so mixing fails). float16 on the CPU is slow or unsupported:
    everything stays float32 (warned). bfloat16 works on both devices. Captured attention
    probabilities are float32 in every case."""
    if dtype not in DTYPES:
        raise ModelError(f"`dtype`={dtype!r}; choose one of {DTYPES}.")
    if device.type == "cpu" and dtype == "float16":
        warnings.warn("`dtype` float16 on the CPU is slow or unsupported (UNet and VAE); using float32.")
        dtype = "float32"
    return getattr(torch, dtype), getattr(torch, dtype)


def load_ldm(path: str, revision: str | None = None, device: str = "auto",
             dtype: str = "float32", config: str | None = None,
             max_sequence_length: int | None = None) -> LDM:
    """Load VAE, UNet, text encoder, tokenizer and a DDIM scheduler with `from_pretrained`.

    The scheduler is ``DDIMScheduler`` built from the model's own scheduler config, so
    ``prediction_type`` (epsilon for SD 1.x, v_prediction for SD 2.x 768) carries through to every
    scheduler core derives from it. `dtype`: see :func:`resolve_dtypes`. A `.safetensors`/`.ckpt`
    path is a single-file checkpoint: see `core.single_file` (`config` = `model.config`, the local
    diffusers folder with its configs). `max_sequence_length`: SD3 / Flux T5 tokens (None: the
    pipeline's default)."""
    from fgbg_utils.core import families, single_file
    if single_file.is_single_file(path):
        return single_file.load_single_file(path, config, device, dtype)
    family = families.detect_family(path, revision)
    if family != "sd":
        return families.load_family(family, path, revision, device, dtype, max_sequence_length)
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextModel

    kw = {"revision": revision} if revision else {}
    dev = pick_device(device)
    unet_dtype, vae_dtype = resolve_dtypes(dtype, dev)
    try:  # diffusers casts at load time (keeping any _keep_in_fp32_modules in float32)
        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", torch_dtype=unet_dtype, **kw)
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae", torch_dtype=vae_dtype, **kw)
        text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", **kw)
        tokenizer = AutoTokenizer.from_pretrained(path, subfolder="tokenizer", **kw)
        scheduler = DDIMScheduler.from_pretrained(path, subfolder="scheduler", **kw)
    except (OSError, ValueError) as e:
        raise ModelError(f"`model.path`={path!r} could not be loaded as a diffusers text-to-image "
                         f"model ({type(e).__name__}: {str(e).splitlines()[0]}). Point it at a local "
                         f"folder saved with save_pretrained (unet/, vae/, text_encoder/, tokenizer/, "
                         f"scheduler/) or a reachable hub id.") from None
    return assemble(vae, unet, text_encoder, tokenizer, scheduler, path, device, dtype)


def assemble(vae, unet, text_encoder, tokenizer, scheduler, path, device: str = "auto",
             dtype: str = "float32") -> LDM:
    """Checks (4-channel UNet, ε or v prediction), device, one dtype, eval mode, no gradients."""
    if unet.config.in_channels != 4:
        raise ModelError(f"`model.path`={str(path)!r} has a {unet.config.in_channels}-channel UNet; this "
                         f"method needs the standard 4-channel text-to-image UNet, not an inpainting one.")
    kind = scheduler.config.prediction_type
    if kind not in PREDICTION_TYPES:
        raise ModelError(f"`model.path`={str(path)!r}: scheduler prediction_type {kind!r} is not "
                         f"supported; this code handles {PREDICTION_TYPES} (SD 1.x: epsilon, SD 2.x "
                         f"768: v_prediction). Fix scheduler/scheduler_config.json.")
    dev = pick_device(device)
    _, vae_dtype = resolve_dtypes(dtype, dev)
    for module in (unet, vae, text_encoder):
        module.to(dev)
        if module.dtype != vae_dtype:
            module.to(vae_dtype)
        module.eval().requires_grad_(False)
    return LDM(vae, unet, text_encoder, tokenizer, scheduler, str(path))


def load_tokenizer(path: str, revision: str | None = None):
    from transformers import AutoTokenizer
    kw = {"revision": revision} if revision else {}
    return AutoTokenizer.from_pretrained(path, subfolder="tokenizer", **kw)


def load_scheduler(path: str, revision: str | None = None):
    from diffusers import DDIMScheduler
    kw = {"revision": revision} if revision else {}
    return DDIMScheduler.from_pretrained(path, subfolder="scheduler", **kw)


def noise_grid(scheduler, grid_steps: int = 50) -> np.ndarray:
    """The DDIM timestep grid, descending (981, 961, ..., 1 for SD v1 at 50 steps); asserted."""
    from diffusers import DDIMScheduler

    sched = DDIMScheduler.from_config(scheduler.config)
    sched.set_timesteps(grid_steps)
    grid = sched.timesteps.cpu().numpy()
    n_train = sched.config.num_train_timesteps
    expected = (np.arange(grid_steps) * (n_train // grid_steps) + sched.config.steps_offset)[::-1]
    if sched.config.timestep_spacing != "leading" or not np.array_equal(grid, expected):
        raise ModelError(f"the scheduler's DDIM grid is {grid[:3].tolist()}... but the method expects "
                         f"'leading' spacing with steps_offset=1 ({expected[:3].tolist()}...). Set "
                         f"timestep_spacing='leading' and steps_offset=1 in scheduler_config.json.")
    return grid


def lowest_timesteps(scheduler, T0: int, grid_steps: int = 50) -> np.ndarray:
    """The T0 lowest entries of the grid, ascending (1, 21, 41, ... for SD v1)."""
    grid = noise_grid(scheduler, grid_steps)
    if not 1 <= T0 <= len(grid):
        raise ModelError(f"`T0`={T0} must be between 1 and {len(grid)}.")
    return np.sort(grid)[:T0]


@torch.no_grad()
def encode_prompt(ldm: LDM, prompt: str) -> torch.Tensor:
    tok = ldm.tokenizer
    ids = tok([prompt], padding="max_length", max_length=tok.model_max_length, truncation=True,
              return_tensors="pt").input_ids.to(ldm.text_encoder.device)
    return ldm.text_encoder(ids)[0]


@torch.no_grad()
def encode_images(ldm: LDM, canvases: torch.Tensor, mode: str = "mode",
                  generator: torch.Generator | None = None, batch_size: int = 8) -> torch.Tensor:
    """z0 = scaling_factor * E(x); posterior mean (`mode`) or a seeded sample.

    Encodes `batch_size` canvases at a time (VAE activations at full resolution dominate memory);
    returns the latents in the VAE's dtype on its device."""
    if mode not in ("mode", "sample"):
        raise ValueError(f"mode={mode!r}; choose 'mode' (posterior mean) or 'sample'")
    out = []
    for s in range(0, len(canvases), max(1, int(batch_size))):
        x = canvases[s:s + batch_size].to(ldm.vae.device, ldm.vae.dtype)
        dist = ldm.vae.encode(x).latent_dist
        out.append(dist.mode() if mode == "mode" else dist.sample(generator))
    if not out:
        raise ValueError("encode_images got no canvases")
    z = torch.cat(out)
    shift = getattr(ldm.vae.config, "shift_factor", None)  # SD3 / Flux VAEs: (z - shift) * scale
    if shift is not None:
        z = z - shift
    return z * ldm.vae.config.scaling_factor
