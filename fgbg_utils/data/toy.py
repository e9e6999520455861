"""Offline toy world: a deterministic shapes dataset and a small text-to-image LDM built from
real diffusers/transformers classes (AutoencoderKL, UNet2DConditionModel, CLIPTextModel)."""
from __future__ import annotations


import numpy as np
from PIL import Image

KINDS = ("circle", "square", "triangle")
COLOURS = {
    "red": (0.90, 0.10, 0.10), "green": (0.10, 0.75, 0.15), "blue": (0.10, 0.25, 0.95),
    "yellow": (0.95, 0.90, 0.10), "cyan": (0.10, 0.85, 0.90), "magenta": (0.90, 0.15, 0.85),
    "orange": (1.00, 0.55, 0.05), "white": (0.97, 0.97, 0.97),
}
BACKGROUNDS = ("solid", "gradient", "stripes", "noise", "checker")
# background kinds the toy LDM never saw (its corpus draws BACKGROUNDS only): a dataset world drawn
# with them is to m what CUB's habitats are to Stable Diffusion, a background style to distil
NOVEL_BACKGROUNDS = ("waves", "plaid", "rings")
BACKGROUND_SETS = {"corpus": BACKGROUNDS, "novel": NOVEL_BACKGROUNDS}
CONCEPT = "shape"
GENERATOR_VERSION = 2  # bump when rendering changes: cached datasets are keyed by it (2: border-crossing objects)
BACKGROUND_CAPTION = "a photo of a background"
VOCAB = ["<pad>", "<bos>", "<eos>", "<unk>", "a", "photo", "of", "background", CONCEPT,
         *KINDS, *COLOURS]
MAX_LENGTH = 12


# ----------------------------------------------------------------------------- rendering
def _muted_colour(rng: np.random.Generator) -> np.ndarray:
    c = rng.uniform(0, 1, 3)
    grey = c.mean()
    return grey + (c - grey) * rng.uniform(0.2, 0.7)


def render_background(rng: np.random.Generator, size: int, kind: str) -> np.ndarray:
    """One background of the given kind, float32 (size, size, 3) in [0, 1]."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    c1, c2 = _muted_colour(rng), _muted_colour(rng)
    if kind == "solid":
        w = np.zeros((size, size), np.float32)
    elif kind == "gradient":
        a = rng.uniform(0, 2 * np.pi)
        p = np.cos(a) * xx + np.sin(a) * yy
        w = (p - p.min()) / (p.max() - p.min() + 1e-8)
    elif kind == "stripes":
        a, period = rng.uniform(0, np.pi), rng.uniform(6, 16) / size
        s = np.sin(2 * np.pi * (np.cos(a) * xx + np.sin(a) * yy) / period)
        w = (s > 0).astype(np.float32) if rng.random() < 0.5 else (s + 1) / 2
    elif kind == "noise":
        g = rng.integers(3, 7)
        low = rng.uniform(0, 1, (g, g, 3)).astype(np.float32)
        img = Image.fromarray((low * 255).astype(np.uint8)).resize((size, size), Image.BICUBIC)
        base = np.asarray(img, np.float32) / 255
        return np.clip(0.5 * base + 0.5 * c1, 0, 1)
    elif kind == "waves":
        f, amp, ph = rng.uniform(2, 4), rng.uniform(0.05, 0.12), rng.uniform(0, 2 * np.pi, 2)
        w = (np.sin(2 * np.pi * f * (yy + amp * np.sin(2 * np.pi * 3 * xx + ph[0])) + ph[1]) + 1) / 2
    elif kind == "plaid":
        p1, p2 = rng.uniform(8, 16, 2) / size
        w = 0.5 * ((np.sin(2 * np.pi * xx / p1) > 0.3).astype(np.float32)
                   + (np.sin(2 * np.pi * yy / p2) > 0.3).astype(np.float32))
    elif kind == "rings":
        c, period = rng.uniform(0, 1, 2), rng.uniform(5, 10) / size
        d = np.sqrt((xx - c[0]) ** 2 + (yy - c[1]) ** 2)
        w = (np.sin(2 * np.pi * d / period) + 1) / 2
    elif kind == "checker":
        cell = int(rng.integers(4, 13))
        off = rng.integers(0, cell, 2)
        iy, ix = np.mgrid[0:size, 0:size]
        w = (((iy + off[0]) // cell + (ix + off[1]) // cell) % 2).astype(np.float32)
    else:
        raise ValueError(f"unknown background kind {kind!r}; choose one of "
                         f"{BACKGROUNDS + NOVEL_BACKGROUNDS}")
    return (c1 * (1 - w[..., None]) + c2 * w[..., None]).astype(np.float32)


def shape_mask(size: int, kind: str, cx: float, cy: float, r: float, angle: float) -> np.ndarray:
    """Exact boolean mask of a shape, tested at pixel centres."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    if kind == "circle":
        return (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r
    n, rad = (4, r * 0.95) if kind == "square" else (3, r * 1.1)
    angles = angle + 2 * np.pi * np.arange(n) / n
    vx, vy = cx + rad * np.cos(angles), cy + rad * np.sin(angles)
    inside = np.ones((size, size), bool)
    for i in range(n):  # convex polygon: inside every edge's half-plane (vertices go counter-clockwise)
        x0, y0, x1, y1 = vx[i], vy[i], vx[(i + 1) % n], vy[(i + 1) % n]
        inside &= (x1 - x0) * (yy - y0) - (y1 - y0) * (xx - x0) >= 0
    return inside


def render_sample(rng: np.random.Generator, size: int = 64, background_only: bool = False,
                  radius: tuple[float, float] = (8, 20), backgrounds: tuple[str, ...] = BACKGROUNDS):
    """Render one image. Returns (uint8 HxWx3 image, bool HxW mask, metadata dict)."""
    bg_kind = backgrounds[rng.integers(len(backgrounds))]
    img = render_background(rng, size, bg_kind)
    mask = np.zeros((size, size), bool)
    meta = {"background": bg_kind, "kind": None, "colour": None}
    if not background_only:
        kind = KINDS[rng.integers(len(KINDS))]
        colour = list(COLOURS)[rng.integers(len(COLOURS))]
        r = rng.uniform(*radius) * size / 64
        # centres may lie near the border, so objects can be cut off (as birds are in CUB): the
        # model must not learn "never at the border" (that put a dark ring into M̂ in trials)
        cx, cy = rng.uniform(0.3 * r, size - 0.3 * r, 2)
        mask = shape_mask(size, kind, cx, cy, r, rng.uniform(0, 2 * np.pi))
        rgb = np.clip(np.array(COLOURS[colour]) + rng.normal(0, 0.04, 3), 0, 1)
        img[mask] = rgb
        meta.update(kind=kind, colour=colour, cx=float(cx), cy=float(cy), r=float(r))
    img = img + rng.normal(0, rng.uniform(0.01, 0.04), img.shape)
    return (np.clip(img, 0, 1) * 255).round().astype(np.uint8), mask, meta


def caption_for(meta: dict, rng: np.random.Generator) -> str:
    """Training caption: specific words (colour, kind) or the generic concept word."""
    if meta["kind"] is None:
        return BACKGROUND_CAPTION
    u = rng.random()
    if u < 0.35:
        return f"a photo of a {meta['colour']} {meta['kind']}"
    if u < 0.50:
        return f"a photo of a {meta['kind']}"
    if u < 0.75:
        return f"a photo of a {meta['colour']} {CONCEPT}"
    return f"a photo of a {CONCEPT}"


def background_set(name: str) -> tuple[str, ...]:
    if name not in BACKGROUND_SETS:
        raise ValueError(f"`dataset.backgrounds`={name!r}; use one of {sorted(BACKGROUND_SETS)} "
                         f"(corpus: the toy LDM's own; novel: kinds it never saw)")
    return BACKGROUND_SETS[name]


def generate_arrays(n: int, seed: int, size: int = 64, background_fraction: float = 0.15,
                    backgrounds: str = "corpus"):
    """n samples in memory: images (n,H,W,3) uint8, masks (n,H,W) bool, captions, metadata.
    Sample i depends only on (seed, i); ``backgrounds`` names the background kinds drawn."""
    kinds = background_set(backgrounds)
    images = np.zeros((n, size, size, 3), np.uint8)
    masks = np.zeros((n, size, size), bool)
    captions, metas = [], []
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        bg_only = rng.random() < background_fraction
        images[i], masks[i], meta = render_sample(rng, size, bg_only, backgrounds=kinds)
        captions.append(caption_for(meta, rng))
        metas.append(meta)
    return images, masks, captions, metas


# ----------------------------------------------------------------------------- the toy LDM
def build_tokenizer():
    """A word-level tokenizer over the toy vocabulary, wrapped as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A <eos>", special_tokens=[("<bos>", vocab["<bos>"]), ("<eos>", vocab["<eos>"])])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
        unk_token="<unk>", model_max_length=MAX_LENGTH)


TOY_ARCH = {
    "vae_channels": (16, 32, 64),
    "unet_channels": (32, 64, 64),
    "text_hidden": 64,
    "heads": 4,
}


def build_models(image_size: int = 64, seed: int = 0, arch: dict | None = None):
    """Fresh (vae, unet, text_encoder, tokenizer, scheduler) for the toy world.

    Departures from SD v1 (said plainly in the notebooks): a 0-layer CLIP text encoder (token +
    position embeddings and the final norm only), cross-attention only in the encoder half of the
    UNet (decoder-side layers had unstable sign in trials), a 4x VAE with 3 levels.
    """
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    a = {**TOY_ARCH, **(arch or {})}
    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
        block_out_channels=a["vae_channels"], norm_num_groups=16,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        sample_size=image_size)
    with torch.no_grad():  # start with small posterior variance (trials stalled otherwise)
        vae.quant_conv.bias[4:].fill_(-6.0)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(VOCAB), hidden_size=a["text_hidden"], intermediate_size=2 * a["text_hidden"],
        num_hidden_layers=0, num_attention_heads=a["heads"], max_position_embeddings=MAX_LENGTH,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, projection_dim=a["text_hidden"]))
    ch = a["unet_channels"]
    unet = UNet2DConditionModel(
        sample_size=image_size // 4, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=ch, norm_num_groups=16, cross_attention_dim=a["text_hidden"],
        attention_head_dim=a["heads"],  # diffusers' naming quirk: this sets the number of heads
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        mid_block_type="UNetMidBlock2D",
        up_block_types=("UpBlock2D", "UpBlock2D", "UpBlock2D"))
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                              beta_schedule="scaled_linear", steps_offset=1, clip_sample=False,
                              set_alpha_to_one=False, prediction_type="epsilon")
    return vae, unet, text_encoder, tokenizer, scheduler


def make_pipeline(vae, unet, text_encoder, tokenizer, scheduler):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(vae=vae, unet=unet, text_encoder=text_encoder,
                                   tokenizer=tokenizer, scheduler=scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
