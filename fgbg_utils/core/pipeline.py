"""`FgBgPipeline`: the method in memory, diffusers-style (no paths, no config dicts, no run folder).

Images in (PIL images, HxWx3 uint8 / float [0, 1] arrays, or a (B, 3, H, W) tensor in [-1, 1]),
small dataclasses out. Each method is one paper step and a thin composition of the core
functions, with the same call sequence (and numerics) as the corresponding stage:

    attention_maps    M̂ (§2.1, stage 01)          preliminary_masks  M_pre (§2.2, stage 02)
    finetune          m -> m' (§2.3, stage 03)     refine             M and M_crop (§2.4, stage 04)
    sample            concept-guided DDIM (§2.5)   segment            a trained segmentation U-Net

Example (from the project root, with the shipped toy model)::

    from fgbg_utils import FgBgPipeline
    from fgbg_utils.data import toy

    pipe = FgBgPipeline.from_pretrained("models/toy-ldm", device="cpu")
    images, gt, _, _ = toy.generate_arrays(1, seed=1)           # one 64x64 toy image
    maps = pipe.attention_maps(images[0], "shape")               # M̂: maps.mhat (1, 16, 16)
    masks = pipe.preliminary_masks(maps)                         # M_pre: masks.masks (1, 16, 16)
    m_pre = masks.original()[0]                                  # (64, 64) bool, the image's size
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from fgbg_utils.core import attention, families, models
from fgbg_utils.core import seeds as seeds_mod
from fgbg_utils.core.binarize import binarize
from fgbg_utils.core.frame import Frame, canvas_to_original, image_to_canvas, make_frame
from fgbg_utils.core.inpaint import inpaint_background, make_inpaint_pipeline, vae_roundtrip
from fgbg_utils.core.models import LDM
from fgbg_utils.core.refine import (difference_map, m_crop_fill, optional_postprocess, refine_mask,
                                    upsample_mask)
from fgbg_utils.core.synthesis import sample_guided

BACKGROUND_PROMPT = "a photo of a background"


# ----------------------------------------------------------------------------- results
PER_IMAGE = ("mhat", "mhat_raw", "frames", "ids", "per_timestep", "per_layer", "per_token", "masks",
             "thresholds", "means", "fg_fraction", "degenerate")


class _Select:
    def select(self, indices: Sequence[int]):
        """The same result for the images at `indices` only (e.g. the training split)."""
        idx = [int(i) for i in indices]
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.name in PER_IMAGE and v is not None:
                v = v[idx] if isinstance(v, np.ndarray) else [v[i] for i in idx]
            out[f.name] = v
        return type(self)(**out)


@dataclass
class AttentionMaps(_Select):
    """M̂ per image on the L×L latent grid of the canonical frame (stage 01's arrays)."""

    mhat: np.ndarray                      # (B, L, L) float32, min-max over the valid region
    mhat_raw: np.ndarray                  # (B, L, L) float32, before normalisation
    frames: list[Frame]
    ids: list[str]
    timesteps: np.ndarray                 # ascending noise levels used (T0 or the full grid)
    layers: list[str]                     # attn2 layer names
    token_positions: dict[str, list[int]]
    prompt: str
    T0: int
    vae_factor: int
    per_timestep: np.ndarray | None = None  # (B, T, L, L) float32
    per_layer: np.ndarray | None = None     # (B, n_layers, L, L) float32
    per_token: np.ndarray | None = None     # (B, n_tokens, L, L) float32

    def valid(self, i: int) -> np.ndarray:
        """Valid (non-padding) region of image i on the latent grid."""
        return self.frames[i].valid(self.vae_factor)

    def original(self) -> list[np.ndarray]:
        """M̂ of each image at its original size (bilinear), float32 in [0, 1]."""
        return [canvas_to_original(m, f, "soft") for m, f in zip(self.mhat, self.frames)]


@dataclass
class PreliminaryMasks(_Select):
    """M_pre per image on the latent grid (stage 02)."""

    masks: np.ndarray                     # (B, L, L) bool
    thresholds: list[float | None]        # GMM midpoint τ (None: degenerate map)
    means: list[list[float] | None]
    fg_fraction: list[float]
    degenerate: list[bool]
    frames: list[Frame]
    ids: list[str]
    prompt: str
    vae_factor: int

    def original(self) -> list[np.ndarray]:
        """M_pre of each image at its original size (nearest), bool."""
        return [canvas_to_original(m, f, "mask") for m, f in zip(self.masks, self.frames)]


@dataclass
class Refinement:
    """Stage 04's outputs per image, on the R×R canonical frame unless said otherwise."""

    backgrounds: np.ndarray               # x̂ = m'(z̃₀, y_b), (B, R, R, 3) float32 in [0, 1]
    differences: np.ndarray               # d = mean_RGB |x_ref − x̂| on the valid box, (B, R, R)
    masks: np.ndarray                     # M, (B, R, R) bool
    m_crop: np.ndarray                    # the M_crop baseline, (B, R, R) bool
    masks_original: list[np.ndarray]      # M at each image's original size
    m_crop_original: list[np.ndarray]
    info: list[dict]                      # GMM info of g(d) per image
    frames: list[Frame]
    ids: list[str]


@dataclass
class Samples:
    images: np.ndarray                    # (n, R, R, 3) float32 in [0, 1]
    latents: torch.Tensor                 # (n, C, L, L) final latents, CPU float32
    seeds: list[int]
    guidance_scale: float
    prompts: tuple[str, str] = field(default=("", ""))  # (y_f, y_b)


# ----------------------------------------------------------------------------- images
def _as_list(images) -> list:
    """One image or a batch -> a list of single images (arrays, PIL images or (3, H, W) tensors)."""
    if isinstance(images, torch.Tensor):
        if images.ndim == 3:
            return [images]
        if images.ndim == 4:
            return list(images)
        raise ValueError(f"image tensor of shape {tuple(images.shape)}; expected (3, H, W) or "
                         f"(B, 3, H, W) in [-1, 1]")
    if isinstance(images, np.ndarray):
        if images.ndim == 3:
            return [images]
        if images.ndim == 4:
            return list(images)
        raise ValueError(f"image array of shape {images.shape}; expected HxWx3 or BxHxWx3")
    if hasattr(images, "convert"):  # one PIL image
        return [images]
    return list(images)


def to_uint8(image) -> np.ndarray:
    """PIL / HxWx3 uint8 / HxWx3 float in [0, 1] / (3, H, W) tensor in [-1, 1] -> HxWx3 uint8."""
    if isinstance(image, torch.Tensor):
        x = image.detach().float().cpu()
        if x.ndim != 3 or x.shape[0] != 3:
            raise ValueError(f"image tensor of shape {tuple(x.shape)}; expected (3, H, W) in [-1, 1]")
        return ((x.permute(1, 2, 0) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
    if hasattr(image, "convert"):
        return np.asarray(image.convert("RGB"))
    a = np.asarray(image)
    if a.ndim != 3 or a.shape[2] != 3:
        raise ValueError(f"image of shape {a.shape}; expected HxWx3 (uint8, or float in [0, 1])")
    if a.dtype == np.uint8:
        return a
    if np.issubdtype(a.dtype, np.floating):
        return (np.clip(a, 0, 1) * 255).round().astype(np.uint8)
    raise ValueError(f"image dtype {a.dtype}; give uint8 or float in [0, 1]")


def to_canvases(images, size: int, multiple: int) -> tuple[torch.Tensor, list[Frame]]:
    """Images -> ((B, 3, R, R) float32 canvases in [-1, 1], frames), as stage 01 builds them.

    A tensor image that is already R×R is used unchanged (full frame); everything else goes
    through `frame.image_to_canvas` (long edge -> R, padding bottom/right)."""
    canvases, frames = [], []
    for im in _as_list(images):
        if isinstance(im, torch.Tensor) and tuple(im.shape) == (3, size, size):
            canvases.append(im.detach().float().cpu())
            frames.append(make_frame(size, size, size, multiple))
            continue
        canvas, frame = image_to_canvas(to_uint8(im), size, multiple)
        canvases.append(torch.from_numpy(canvas))
        frames.append(frame)
    if not canvases:
        raise ValueError("no images given")
    return torch.stack(canvases), frames


def _ids(ids, n: int) -> list[str]:
    ids = [str(i) for i in range(n)] if ids is None else [str(i) for i in ids]
    if len(ids) != n:
        raise ValueError(f"{len(ids)} ids for {n} images; give one id per image")
    if len(set(ids)) != n:
        raise ValueError("ids must be unique (they seed each image's noise)")
    return ids


# ----------------------------------------------------------------------------- pipeline
class FgBgPipeline:
    """The pretrained model m (and optionally the fine-tuned m') with one method per paper step.

    Example (from the project root, with the shipped toy model)::

        >>> from fgbg_utils import FgBgPipeline
        >>> from fgbg_utils.data import toy
        >>> pipe = FgBgPipeline.from_pretrained("models/toy-ldm", device="cpu")
        >>> images, gt, _, _ = toy.generate_arrays(1, seed=1)
        >>> maps = pipe.attention_maps(images[0], "shape")
        >>> masks = pipe.preliminary_masks(maps)
        >>> maps.mhat.shape, masks.masks.shape, masks.original()[0].shape
        ((1, 16, 16), (1, 16, 16), (64, 64))
    """

    def __init__(self, ldm: LDM, tuned: LDM | None = None):
        self.ldm, self.tuned = ldm, tuned

    # -- construction
    @classmethod
    def from_pretrained(cls, path_or_hub_id: str, revision: str | None = None, device: str = "auto",
                        dtype: str = "float32", finetuned: str | Path | None = None,
                        config: str | None = None, max_sequence_length: int | None = None) -> FgBgPipeline:
        """Load m with `models.load_ldm` (a diffusers folder, hub id, or single .safetensors/.ckpt
        file with `config` = its local diffusers config folder); `finetuned`: a stage-03 output
        folder holding m'; `max_sequence_length`: SD3 / Flux T5 tokens (None: the pipeline's
        default, 256 / 512)."""
        pipe = cls(models.load_ldm(str(path_or_hub_id), revision, device, dtype, config=config,
                                   max_sequence_length=max_sequence_length))
        return pipe.with_finetuned(finetuned) if finetuned is not None else pipe

    def with_finetuned(self, tuned: LDM | str | Path) -> FgBgPipeline:
        """A pipeline sharing m with the fine-tuned m' (an LDM, or a stage-03 output folder)."""
        if not isinstance(tuned, LDM):
            from fgbg_utils.training.finetune import load_finetuned
            tuned = load_finetuned(self.ldm, tuned)
        return type(self)(self.ldm, tuned)

    @property
    def components(self) -> dict:
        """m's vae, unet, text_encoder, tokenizer and scheduler (diffusers naming; SDXL, SD3, Flux:
        also their other text encoders and tokenizers, and `transformer` instead of `unet`)."""
        m = self.ldm
        out = {"vae": m.vae, "unet": m.unet, "text_encoder": m.text_encoder,
               "tokenizer": m.tokenizer, "scheduler": m.scheduler}
        out.update({k: v for k, v in m.extras.items() if k.startswith(("text_encoder", "tokenizer"))})
        if m.family in families.FLOW:
            out["transformer"] = out.pop("unet")
        return out

    @property
    def resolution(self) -> int:
        return self.ldm.resolution

    def canvases(self, images) -> tuple[torch.Tensor, list[Frame]]:
        """Images in the canonical frame of this model: ((B, 3, R, R) in [-1, 1], frames)."""
        return to_canvases(images, self.ldm.resolution, self.ldm.vae_factor)

    def _need_tuned(self, what: str) -> LDM:
        if self.tuned is None:
            raise ValueError(f"{what} needs the fine-tuned model m': use finetune(...), "
                             f"with_finetuned(stage-03 folder) or from_pretrained(..., finetuned=...)")
        return self.tuned

    # -- §2.1 attention maps (stage 01)
    @torch.no_grad()
    def attention_maps(self, images, object_word: str, prompt: str = "a photo of a {object}",
                       parts: Sequence[str] = (), T0: int = 40, seed: int = 0, ids=None,
                       grid_steps: int = 50, latent: str = "mode", batch_rows: int | str = 160,
                       per_timestep: bool = False, per_layer: bool = False,
                       per_token: bool = False, progress: bool = False, layers=None,
                       aggregation: str = "cross", concepts: Sequence[str] = ("background",)) -> AttentionMaps:
        """M̂ of `object_word` (+ `parts`) with the pretrained m: the mean cross-attention over the
        T0 lowest DDIM levels and all attn2 layers. Image i's noise is seeded by (seed, ids[i])
        exactly as in stage 01, so a map equals stage 01's for the same id and parameters.
        `per_timestep` computes all grid levels (stage 01's `sweep`), which also groups images as
        the stage does with the sweep on. `batch_rows`: UNet rows per call, or "auto". `layers`:
        fnmatch patterns of the attention layers to average (None: all, as in the paper). Any
        family (core/families.py): SDXL's attn2, SD3's and Flux's joint attention, T0 lowest
        DDIM timesteps or flow-matching σ. `aggregation`="concept" (SD3, Flux): ConceptAttention's
        map of the object against `concepts` (core/concept_attention.py) instead."""
        ldm = self.ldm
        if latent not in ("mode", "sample"):
            raise ValueError(f"latent={latent!r}; choose 'mode' or 'sample'")
        x, frames = self.canvases(images)
        ids = _ids(ids, len(frames))
        template, prompt = prompt, prompt.replace("{object}", object_word)
        words = [object_word, *parts]
        positions = families.prompt_positions(ldm, prompt, words)
        flat = [p for w in words for p in positions[w]]
        n_levels = max(min(50, grid_steps) if per_timestep else T0, T0)
        timesteps = families.noise_levels(ldm, n_levels, grid_steps)
        layer_list = families.layer_names(ldm, layers, aggregation)
        emb = families.encode_condition(ldm, prompt)
        concept_set = None
        if aggregation == "concept":
            from fgbg_utils.core.concept_attention import concept_tokens
            concept_set = concept_tokens(ldm, template, words, list(concepts))
        rows = attention.resolve_batch_rows(batch_rows, ldm.unet, ldm.latent_size)
        per_group = max(1, rows // n_levels)
        parts_out: dict[str, list] = {k: [] for k in ("mhat_raw", "per_timestep", "per_layer", "per_token")}
        for start in range(0, len(ids), per_group):
            sl = slice(start, start + per_group)
            full = self._full_maps(x[sl], ids[sl], emb, flat, timesteps, grid_steps, seed, latent, rows,
                                   progress, layers, concept_set)
            for k, v in attention.reduce_maps(full, T0).items():
                parts_out[k].append(v.numpy())
        red = {k: np.concatenate(v) for k, v in parts_out.items()}
        f = ldm.vae_factor
        mhat = np.stack([attention.minmax(red["mhat_raw"][i], fr.valid(f)) for i, fr in enumerate(frames)])
        f32 = lambda a: a.astype(np.float32)
        return AttentionMaps(
            mhat=mhat, mhat_raw=f32(red["mhat_raw"]), frames=frames, ids=ids,
            timesteps=np.asarray(timesteps), layers=layer_list,
            token_positions=positions, prompt=prompt, T0=T0, vae_factor=f,
            per_timestep=f32(red["per_timestep"]) if per_timestep else None,
            per_layer=f32(red["per_layer"]) if per_layer else None,
            per_token=f32(red["per_token"]) if per_token else None)

    def _full_maps(self, x, ids, emb, flat, timesteps, grid_steps, seed, latent, rows, progress,
                   layers=None, concepts=None):
        """Stage 01's `_process_group`: z0, per-image noise, the batched capture."""
        ldm = self.ldm
        if latent == "mode":
            z0 = models.encode_images(ldm, x, "mode")
        else:
            z0 = torch.cat([models.encode_images(ldm, x[i:i + 1], "sample",
                                                 seeds_mod.generator(seed, "01-latent", im_id))
                            for i, im_id in enumerate(ids)])
        noise = torch.stack([attention.image_noise(seeds_mod.generator(seed, "01-noise", im_id),
                                                   grid_steps, z0.shape[1:])[:len(timesteps)]
                             for im_id in ids])
        return attention.capture_maps(families.denoiser(ldm, emb, layers, concepts), z0, flat, timesteps, noise,
                                      rows, progress)

    # -- §2.2 preliminary masks (stage 02)
    def preliminary_masks(self, maps: AttentionMaps, gmm_seed: int = 0,
                          orphan_filter: bool = True) -> PreliminaryMasks:
        """M_pre = 2-component GMM midpoint on the valid region of M̂, then the orphan filter."""
        out, infos = [], []
        for i, image_id in enumerate(maps.ids):
            mask, info = binarize(maps.mhat[i], maps.valid(i), seed=gmm_seed, orphan=orphan_filter,
                                  name=f"M̂ of {image_id}")
            out.append(mask)
            infos.append(info)
        return PreliminaryMasks(
            masks=np.stack(out), thresholds=[d["threshold"] for d in infos],
            means=[d["means"] for d in infos], fg_fraction=[d["fg_fraction"] for d in infos],
            degenerate=[d["degenerate"] for d in infos], frames=list(maps.frames),
            ids=list(maps.ids), prompt=maps.prompt, vae_factor=maps.vae_factor)

    # -- §2.3 fine-tuning (stage 03)
    def finetune(self, images, preliminary_masks: PreliminaryMasks, out_dir: str | Path,
                 progress: bool = True, **config) -> FgBgPipeline:
        """m -> m' on these images and their M_pre (training.finetune.train, as stage 03).

        `config`: FinetuneConfig fields (max_train_steps is required); prompt_full defaults to the
        masks' prompt, prompt_background to "a photo of a background". `out_dir` holds only the
        trainer's checkpoints and export. Returns a new pipeline with m and m'."""
        from fgbg_utils.training.finetune import FinetuneConfig, train

        if self.ldm.unet.dtype != torch.float32:
            raise ValueError(f"fine-tuning needs m in float32 (the UNet is {self.ldm.unet.dtype}); load "
                             f"it with dtype='float32' and set mixed_precision='bf16' for speed.")
        config.setdefault("prompt_full", preliminary_masks.prompt)
        config.setdefault("prompt_background", BACKGROUND_PROMPT)
        cfg = FinetuneConfig(**config)
        items = self._training_items(images, preliminary_masks)
        train(self.ldm, items, cfg, Path(out_dir), resume=True, progress=progress)
        return self.with_finetuned(Path(out_dir))

    def _training_items(self, images, masks: PreliminaryMasks) -> list:
        x, frames = self.canvases(images)
        self._check_frames(frames, masks.frames, "preliminary_masks")
        f = self.ldm.vae_factor
        return [(x[i].numpy(), masks.masks[i], fr.valid(f)) for i, fr in enumerate(frames)]

    @staticmethod
    def _check_frames(frames, expected, name: str) -> None:
        if list(frames) != list(expected):
            raise ValueError(f"the images do not match `{name}` ({len(frames)} images vs "
                             f"{len(expected)} masks, or other sizes): pass the same images, in "
                             f"the same order, as to attention_maps")

    # -- §2.4 refinement (stage 04)
    @torch.no_grad()
    def refine(self, images, preliminary_masks: PreliminaryMasks, ids=None, seed: int = 0,
               steps: int = 50, guidance_scale: float = 1.0, reference: str = "roundtrip",
               gmm_seed: int = 0, orphan_filter: bool = True, postprocess: bool = False,
               prompt_b: str = BACKGROUND_PROMPT, prompt_f: str | None = None,
               batch_size: int = 8, model: str = "finetuned") -> Refinement:
        """Paint the object away with m' (x̂ = m'(z̃₀, y_b) on M_pre), d = |x_ref − x̂|,
        M = M_pre,up ∧ GMM(d); plus the M_crop baseline. guidance_scale > 1 contrasts y_b against
        y_f (`prompt_f`, default the masks' prompt) as stage 04 does. Seeds per image from
        (seed, ids[i]) as in stage 04 (ids default to the masks' ids). `model="pretrained"`
        paints with m instead of m' (the ablation: does refinement need the fine-tuning?)."""
        if model not in ("finetuned", "pretrained"):
            raise ValueError(f"model={model!r}; choose 'finetuned' (m') or 'pretrained' (m)")
        tuned = self.ldm if model == "pretrained" else self._need_tuned("refine")
        if reference not in ("roundtrip", "original"):
            raise ValueError(f"reference={reference!r}; choose 'roundtrip' or 'original'")
        x, frames = self.canvases(images)
        self._check_frames(frames, preliminary_masks.frames, "preliminary_masks")
        ids = _ids(preliminary_masks.ids if ids is None else ids, len(frames))
        prompt_f = preliminary_masks.prompt if prompt_f is None else prompt_f
        pipe = make_inpaint_pipeline(tuned)
        guided = guidance_scale > 1
        f = self.ldm.vae_factor
        res: dict[str, list] = {k: [] for k in ("bg", "diff", "m", "crop", "info")}
        for start in range(0, len(ids), batch_size):
            sl = slice(start, start + batch_size)
            xs, group = x[sl], ids[sl]
            m_pre = np.asarray(preliminary_masks.masks[sl], bool)
            x_hat = inpaint_background(
                tuned, xs, m_pre, prompt_b, negative_prompt=prompt_f if guided else None,
                guidance_scale=guidance_scale, steps=steps,
                seeds=[seeds_mod.derive_seed(seed, "04-inpaint", i) for i in group],
                batch_size=len(group), pipe=pipe)
            x_ref = (vae_roundtrip(self.ldm, xs) if reference == "roundtrip"
                     else (xs.permute(0, 2, 3, 1).numpy() + 1) / 2)
            for k in range(len(group)):
                valid = frames[start + k].valid(1)
                up = upsample_mask(m_pre[k], f) & valid
                diff = difference_map(x_ref[k], x_hat[k]) * valid
                refined, info = refine_mask(up, diff, valid, gmm_seed, orphan_filter)
                refined = optional_postprocess(refined, postprocess) & up
                crop = m_crop_fill(x_ref[k], up, valid)
                m_crop, _ = refine_mask(up, difference_map(x_ref[k], crop) * valid, valid, gmm_seed,
                                        orphan_filter)
                for key, v in zip(("bg", "diff", "m", "crop", "info"), (x_hat[k], diff, refined, m_crop, info)):
                    res[key].append(v)
        masks, crops = np.stack(res["m"]), np.stack(res["crop"])
        return Refinement(
            backgrounds=np.stack(res["bg"]).astype(np.float32), differences=np.stack(res["diff"]),
            masks=masks, m_crop=crops,
            masks_original=[canvas_to_original(m, fr, "mask") for m, fr in zip(masks, frames)],
            m_crop_original=[canvas_to_original(m, fr, "mask") for m, fr in zip(crops, frames)],
            info=res["info"], frames=frames, ids=ids)

    remove_objects = refine

    # -- what a model family reads (stage 01's summary)
    def describe_words(self, prompt: str, words: Sequence[str]) -> dict[str, dict]:
        """Positions and pieces of each word in the text sequence the attention sees."""
        return families.describe_words(self.ldm, prompt, list(words))

    def noise_levels(self, n: int, grid_steps: int = 50) -> np.ndarray:
        """The n lowest noise levels (DDIM timesteps or flow-matching σ), ascending."""
        return families.noise_levels(self.ldm, n, grid_steps)

    def layer_names(self, layers=None, aggregation: str = "cross") -> list[str]:
        return families.layer_names(self.ldm, layers, aggregation)

    # -- §2.5 concept-guided sampling
    @torch.no_grad()
    def sample(self, prompt_f: str, n: int | None = None, seeds: Sequence[int] | None = None,
               guidance_scale: float = 1.0, steps: int = 50, prompt_b: str = BACKGROUND_PROMPT,
               batch_size: int = 16, seed: int = 0, finetuned: bool | None = None,
               progress: bool = False) -> Samples:
        """ε̂ = ε(y_b) + s·(ε(y_f) − ε(y_b)) DDIM samples (synthesis.sample_guided). Give `n`
        (seeds derived from `seed`) or explicit `seeds`. Uses m' when loaded (`finetuned=None`),
        else m; `finetuned=True/False` forces one."""

        if (n is None) == (seeds is None):
            raise ValueError("give either n (number of samples) or seeds (one per sample)")
        seed_list = ([seeds_mod.derive_seed(seed, "pipeline-sample", str(i)) for i in range(n)]
                     if seeds is None else [int(s) for s in seeds])
        use_tuned = self.tuned is not None if finetuned is None else finetuned
        model = self._need_tuned("sample(finetuned=True)") if use_tuned else self.ldm
        images, latents = sample_guided(model, prompt_f, prompt_b, guidance_scale, seed_list, steps,
                                        batch_size, progress)
        return Samples(images, latents, seed_list, float(guidance_scale), (prompt_f, prompt_b))

    # -- segmentation with a trained U-Net
    def segment(self, images, model, seg_config) -> list[np.ndarray]:
        """Bool masks at each image's own size from a trained segmentation U-Net
        (`training.segnet.predict`, full-image protocol)."""
        from fgbg_utils.training.segnet import predict

        return predict(model, [to_uint8(im) for im in _as_list(images)], seg_config)

