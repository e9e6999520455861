"""Model families (issue 17): Stable Diffusion 1.x/2.x ("sd"), SDXL, SD3 and Flux behind one
interface, so every stage asks the same questions of any model:

* `detect_family` / `load_family`: which family a folder or hub id is (its model_index.json), and
  loading it with the family's diffusers pipeline into the project's `LDM` (the denoiser, UNet or
  transformer, is `ldm.unet`; the other text encoders and tokenizers are in `ldm.extras`);
* `describe_words` / `prompt_positions`: the object word's positions in the text sequence the
  attention sees, from each family's own tokenizers (CLIP for sd/sdxl; CLIP's 77 tokens then T5's
  for SD3; T5 only for Flux), the pieces of every tokenizer reported;
* `encode_condition`: the prompt's conditioning (sequence embedding, SDXL's pooled `text_embeds`
  and `time_ids`, SD3/Flux's pooled projection and Flux's text ids);
* `noise_levels`: the T0 lowest noise levels of the model's own scheduler: DDIM timesteps for ε/v
  models, σ of the flow-matching grid for SD3/Flux (Flux: its resolution-dependent shift);
* `denoiser`: one batched model call and the forward process for the attention capture
  (z_t = add_noise(z0, ε, t) for DDPM families, z_t = (1 − σ) z0 + σ ε for flow matching).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fgbg_utils.core import attention, models, tokens
from fgbg_utils.core.models import LDM, ModelError

FAMILIES = ("sd", "sdxl", "sd3", "flux")
FLOW = ("sd3", "flux")
PIPELINES = {"StableDiffusionXLPipeline": "sdxl", "StableDiffusion3Pipeline": "sd3", "FluxPipeline": "flux"}
MAX_SEQUENCE_LENGTH = {"sd3": 256, "flux": 512}  # diffusers' pipeline defaults (T5 tokens)
FLUX_GUIDANCE = 3.5  # distilled guidance of guidance-embedded Flux (dev) in every call


# ----------------------------------------------------------------------------- loading
def detect_family(path: str, revision: str | None = None) -> str:
    """The family named by the pipeline class in model_index.json ("sd" when absent or other)."""
    index = Path(path) / "model_index.json"
    try:
        if index.is_file():
            cfg = json.loads(index.read_text())
        elif Path(path).exists():
            return "sd"
        else:
            from diffusers import DiffusionPipeline
            cfg = DiffusionPipeline.load_config(path, revision=revision)
    except Exception:  # unreachable hub id, no index: the SD loader gives its own message
        return "sd"
    return PIPELINES.get(cfg.get("_class_name"), "sd")


def absent_components(path: str) -> dict:
    """{name: None} for the components a local folder's model_index.json lists as [null, null]
    (e.g. an SD3 folder saved without T5): diffusers refuses to load it unless they are passed."""
    index = Path(path) / "model_index.json"
    if not index.is_file():
        return {}
    cfg = json.loads(index.read_text())
    return {k: None for k, v in cfg.items()
            if not k.startswith("_") and isinstance(v, list) and v and all(x is None for x in v)}


def pipeline_class(family: str):
    import diffusers
    name = {v: k for k, v in PIPELINES.items()}[family]
    return getattr(diffusers, name)


def load_family(family: str, path: str, revision: str | None = None, device: str = "auto",
                dtype: str = "float32", max_sequence_length: int | None = None) -> LDM:
    """SDXL / SD3 / Flux with the family's diffusers pipeline `from_pretrained`, as an `LDM`;
    `max_sequence_length`: T5 tokens in the joint sequence (None: the pipeline's default)."""
    dev = models.pick_device(device)
    torch_dtype, _ = models.resolve_dtypes(dtype, dev)
    kw = {"revision": revision} if revision else {}
    kw.update(absent_components(path))
    try:
        pipe = pipeline_class(family).from_pretrained(path, dtype=torch_dtype, **kw)
    except (OSError, ValueError, TypeError) as e:
        raise ModelError(f"`model.path`={path!r} names a {family} pipeline but could not be loaded "
                         f"({type(e).__name__}: {str(e).splitlines()[0]}). Point it at a complete "
                         f"folder saved with save_pretrained or a reachable hub id.") from None
    denoiser = pipe.unet if family == "sdxl" else pipe.transformer
    scheduler = pipe.scheduler
    if family == "sdxl":
        from diffusers import DDIMScheduler
        if denoiser.config.in_channels != 4:
            raise ModelError(f"`model.path`={path!r} has a {denoiser.config.in_channels}-channel UNet; "
                             f"the method needs the 4-channel text-to-image SDXL UNet, not an inpainting one.")
        scheduler = DDIMScheduler.from_config(scheduler.config)
    elif type(scheduler).__name__ != "FlowMatchEulerDiscreteScheduler":
        raise ModelError(f"`model.path`={path!r}: {family} needs its FlowMatchEulerDiscreteScheduler, "
                         f"found {type(scheduler).__name__}; fix scheduler/scheduler_config.json.")
    extra_names = {"sdxl": ("text_encoder_2", "tokenizer_2"), "flux": ("text_encoder_2", "tokenizer_2"),
                   "sd3": ("text_encoder_2", "tokenizer_2", "text_encoder_3", "tokenizer_3")}[family]
    extras = {n: getattr(pipe, n) for n in extra_names}
    if family in FLOW:
        extras["max_sequence_length"] = int(max_sequence_length or MAX_SEQUENCE_LENGTH[family])
    if family == "sd3" and extras["text_encoder_3"] is None:
        extras["max_sequence_length"] = 0  # no T5 encoder: no T5 tokens (not 256 zero rows), the toy DiT's layout
    for module in (denoiser, pipe.vae, pipe.text_encoder,
                   *(v for k, v in extras.items() if k.startswith("text_encoder") and v is not None)):
        module.to(dev).eval().requires_grad_(False)
    return LDM(pipe.vae, denoiser, pipe.text_encoder, pipe.tokenizer, scheduler, str(path), family, extras)


def as_diffusers_pipeline(ldm: LDM):
    """The family's diffusers pipeline over the LDM's components (for its prompt encoding)."""
    if ldm.family == "sd":
        raise ValueError("use core.models for the sd family")
    parts = {k: v for k, v in ldm.extras.items() if k.startswith(("text_encoder", "tokenizer"))}
    denoiser = {"unet": ldm.unet} if ldm.family == "sdxl" else {"transformer": ldm.unet}
    return pipeline_class(ldm.family)(vae=ldm.vae, text_encoder=ldm.text_encoder, tokenizer=ldm.tokenizer,
                                      scheduler=ldm.scheduler, **parts, **denoiser)


# ----------------------------------------------------------------------------- tokens
def text_segments(ldm: LDM) -> list[tuple[str, object, int, int]]:
    """(label, tokenizer, offset in the attention's text sequence, max tokens) per text segment."""
    clip = ("clip", ldm.tokenizer, 0, ldm.tokenizer.model_max_length)
    if ldm.family in ("sd", "sdxl"):
        return [clip]
    n = int(ldm.extras["max_sequence_length"])
    if ldm.family == "sd3":
        t5 = ldm.extras.get("tokenizer_3")
        return [clip] + ([("t5", t5, clip[3], n)] if t5 is not None and ldm.extras.get("text_encoder_3") else [])
    return [("t5", ldm.extras["tokenizer_2"], 0, n)]


def describe_words(ldm: LDM, prompt: str, words: list[str]) -> dict[str, dict]:
    """`tokens.describe_words` over the family's text segments: positions in the joint text
    sequence (all segments), pieces per segment (prefixed "t5:"/"clip:" when there are several)."""
    segments = text_segments(ldm)
    if ldm.family == "sd":
        return tokens.describe_words(ldm.tokenizer, prompt, words)
    out: dict[str, dict] = {}
    for label, tok, offset, limit in segments:
        info = tokens.describe_words(tok, prompt, words, max_length=limit)
        for w, d in info.items():
            e = out.setdefault(w, {"positions": [], "tokens": [], "split": False,
                                   "occurrences": d["occurrences"], "segments": {}})
            e["positions"] += [offset + p for p in d["positions"]]
            e["tokens"] += [f"{label}:{t}" for t in d["tokens"]] if len(segments) > 1 else d["tokens"]
            e["split"] = e["split"] or d["split"]
            e["segments"][label] = d["tokens"]
    return out


def prompt_positions(ldm: LDM, prompt: str, words: list[str]) -> dict[str, list[int]]:
    """{word: positions} as `tokens.prompt_positions` (sd: exactly it)."""
    if ldm.family == "sd":
        return tokens.prompt_positions(ldm.tokenizer, prompt, words)
    return {w: d["positions"] for w, d in describe_words(ldm, prompt, words).items()}


# ----------------------------------------------------------------------------- conditioning
@dataclass
class Condition:
    """A prompt's conditioning for one model call (batch 1; expanded to the rows)."""

    emb: torch.Tensor                        # (1, S, D) sequence embedding
    pooled: torch.Tensor | None = None       # SDXL text_embeds / SD3, Flux pooled projection
    time_ids: torch.Tensor | None = None     # SDXL micro-conditioning
    text_ids: torch.Tensor | None = None     # Flux text position ids (S, 3)


def added_conditions(cond: Condition, device=None, dtype=None) -> dict | None:
    """SDXL's `added_cond_kwargs` of a prompt (batch 1): {"text_embeds", "time_ids"}; None for
    families without added conditions (every UNet call passes them when not None)."""
    if cond.time_ids is None:
        return None
    return {"text_embeds": cond.pooled.to(device, dtype), "time_ids": cond.time_ids.to(device, dtype)}


def unet_kwargs(added: dict | None, n: int, device, dtype) -> dict:
    """`added_cond_kwargs` for a UNet call of n rows (rows of batch-1 entries expanded), or {}."""
    if added is None:
        return {}
    out = {}
    for k, v in added.items():
        v = v.to(device, dtype)
        out[k] = v if v.shape[0] == n else v.expand(n, *v.shape[1:])
    return {"added_cond_kwargs": out}


@torch.no_grad()
def encode_condition(ldm: LDM, prompt: str) -> Condition:
    if ldm.family == "sd":
        return Condition(models.encode_prompt(ldm, prompt))
    pipe = as_diffusers_pipeline(ldm)
    dev = ldm.text_encoder.device
    if ldm.family == "sdxl":
        emb, _, pooled, _ = pipe.encode_prompt(prompt, device=dev, num_images_per_prompt=1,
                                               do_classifier_free_guidance=False)
        r = ldm.resolution
        te2 = ldm.extras["text_encoder_2"]
        time_ids = pipe._get_add_time_ids((r, r), (0, 0), (r, r), dtype=emb.dtype,
                                          text_encoder_projection_dim=int(te2.config.projection_dim))
        return Condition(emb, pooled, time_ids)
    n = int(ldm.extras["max_sequence_length"])
    if ldm.family == "sd3":
        emb, _, pooled, _ = pipe.encode_prompt(prompt, None, None, device=dev, num_images_per_prompt=1,
                                               do_classifier_free_guidance=False, max_sequence_length=n)
        return Condition(emb, pooled)
    emb, pooled, text_ids = pipe.encode_prompt(prompt, None, device=dev, num_images_per_prompt=1,
                                               max_sequence_length=n)
    return Condition(emb, pooled, text_ids=text_ids)


# ----------------------------------------------------------------------------- noise levels
def flow_sigmas(ldm: LDM, grid_steps: int = 50) -> np.ndarray:
    """The flow-matching σ grid of `grid_steps` inference steps, descending, without the final 0,
    as the family's diffusers pipeline sets it (SD3: the scheduler's shifted grid; Flux: σ =
    linspace(1, 1/N, N) with the shift μ of its image sequence length)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler.from_config(ldm.scheduler.config)
    kw = {}
    if ldm.family == "flux":
        kw["sigmas"] = np.linspace(1.0, 1 / grid_steps, grid_steps)
    if sched.config.use_dynamic_shifting:
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift
        c = sched.config
        kw["mu"] = calculate_shift((ldm.latent_size // 2) ** 2, c.base_image_seq_len, c.max_image_seq_len,
                                   c.base_shift, c.max_shift)
    sched.set_timesteps(grid_steps, **kw)
    return sched.sigmas[:-1].double().numpy()


def noise_levels(ldm: LDM, T0: int, grid_steps: int = 50) -> np.ndarray:
    """The T0 lowest noise levels, ascending: DDIM timesteps (sd, sdxl) or σ (sd3, flux)."""
    if ldm.family not in FLOW:
        return models.lowest_timesteps(ldm.scheduler, T0, grid_steps)
    grid = flow_sigmas(ldm, grid_steps)
    if not 1 <= T0 <= len(grid):
        raise ModelError(f"`T0`={T0} must be between 1 and {len(grid)}.")
    return np.sort(grid)[:T0]


# ----------------------------------------------------------------------------- denoisers
AGGREGATIONS = ("cross", "concept")


def check_aggregation(ldm: LDM, aggregation: str) -> None:
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"`attention.aggregation`={aggregation!r}; choose one of {AGGREGATIONS}.")
    if aggregation == "concept" and ldm.family not in FLOW:
        raise ValueError(f"`attention.aggregation`='concept' needs an MMDiT (sd3 or flux); "
                         f"{ldm.path!r} is a {ldm.family} model: use 'cross'.")


def layer_names(ldm: LDM, layers=None, aggregation: str = "cross") -> list[str]:
    """The attention layers the capture reads (all, or those matching the `layers` patterns);
    concept aggregation: the joint layers with text-stream weights (Flux: double-stream only)."""
    from fgbg_utils.core.concept_attention import concept_layers
    from fgbg_utils.core.joint_attention import joint_layers
    check_aggregation(ldm, aggregation)
    if aggregation == "concept":
        names = concept_layers(ldm.unet)
    else:
        names = (attention.cross_attention_layers(ldm.unet) if ldm.family in ("sd", "sdxl")
                 else joint_layers(ldm.unet))
    return attention.select_layers(names, layers)


def denoiser(ldm: LDM, cond: Condition, layers=None, concepts=None):
    """The batched model call of `attention.capture_maps` for this family; `concepts`
    (`concept_attention.Concepts`, SD3/Flux): capture ConceptAttention maps instead."""
    if concepts is not None:
        check_aggregation(ldm, "concept")
        return FlowDenoiser(ldm, cond, layers, concepts)
    if ldm.family == "sd":
        return attention.UNetDenoiser(ldm.unet, ldm.scheduler, cond.emb, layers=layers)
    if ldm.family == "sdxl":
        return attention.UNetDenoiser(ldm.unet, ldm.scheduler, cond.emb, layers=layers,
                                      added={"text_embeds": cond.pooled, "time_ids": cond.time_ids})
    return FlowDenoiser(ldm, cond, layers)


class FlowDenoiser:
    """SD3 / Flux: z_t = (1 − σ) z0 + σ ε; the transformer called as the family's pipeline does
    (SD3: timestep 1000 σ; Flux: latents packed 2x2, timestep σ, RoPE ids, distilled guidance)."""

    def __init__(self, ldm: LDM, cond: Condition, layers=None, concepts=None):
        self.ldm, self.model, self.cond, self.layers = ldm, ldm.unet, cond, layers
        self.concepts = concepts

    def levels(self, sigmas) -> torch.Tensor:
        return torch.as_tensor(np.asarray(sigmas), dtype=torch.float32)

    def noised(self, z0: torch.Tensor, eps: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        s = sigma.float().view(-1, 1, 1, 1)
        return (1 - s) * z0 + s * eps

    def __call__(self, zt: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return transformer_forward(self.ldm, zt, sigma, self.cond)

    def capture(self, store):
        from fgbg_utils.core.joint_attention import capture_joint_attention
        if self.concepts is not None:
            from fgbg_utils.core.concept_attention import capture_concept_attention
            return capture_concept_attention(self.model, store, self.ldm.family, self.concepts, self.layers)
        return capture_joint_attention(self.model, store, self.ldm.family, self.layers,
                                       n_text=self.cond.emb.shape[1])


def transformer_forward(ldm: LDM, zt: torch.Tensor, sigma: torch.Tensor, cond: Condition) -> torch.Tensor:
    """The velocity prediction of an SD3/Flux transformer for latents zt (B, C, L, L) at σ (B,),
    returned as (B, C, L, L) (Flux's packed output un-packed)."""
    model, n = ldm.unet, len(zt)
    dev, dt = model.device, model.dtype
    emb = cond.emb.to(dev, dt).expand(n, -1, -1)
    pooled = cond.pooled.to(dev, dt).expand(n, -1)
    sigma = sigma.float().to(dev)
    if ldm.family == "sd3":
        return model(hidden_states=zt.to(dev, dt), timestep=(sigma * ldm.scheduler.config.num_train_timesteps).to(dt),
                     encoder_hidden_states=emb, pooled_projections=pooled, return_dict=False)[0]
    from diffusers import FluxPipeline
    b, c, h, w = zt.shape
    packed = FluxPipeline._pack_latents(zt.to(dev, dt), b, c, h, w)
    img_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, dev, dt)
    guidance = (torch.full((n,), FLUX_GUIDANCE, device=dev, dtype=torch.float32)
                if model.config.guidance_embeds else None)
    out = model(hidden_states=packed, timestep=sigma.to(dt), guidance=guidance, pooled_projections=pooled,
                encoder_hidden_states=emb, txt_ids=cond.text_ids.to(dev, dt), img_ids=img_ids,
                return_dict=False)[0]
    return FluxPipeline._unpack_latents(out, h * ldm.vae_factor, w * ldm.vae_factor, ldm.vae_factor)
