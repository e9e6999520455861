"""Cross-attention capture (docs/method.md §2.1, §6): a diffusers attention processor on the `attn2`
(cross-attention) layers only, keeping the head-mean softmax probabilities of the object token
columns; self-attention keeps its stock SDPA processor. All noise levels of an image go through one
batched UNet call (chunked to `batch_rows`)."""
from __future__ import annotations

import contextlib
import fnmatch
import math
import numbers
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


class AttentionStore:
    """Collects, for one UNet call, per-layer maps of the selected token columns on the latent grid."""

    def __init__(self, token_positions: list[int], latent_size: int):
        self.tokens = torch.as_tensor(token_positions, dtype=torch.long)
        self.latent_size = latent_size
        self.layers: list[str] = []
        self.maps: dict[int, torch.Tensor] = {}

    def reset(self) -> None:
        self.maps = {}

    def add(self, layer: int, probs: torch.Tensor) -> None:
        """probs: (rows, pixels, n_tokens), already head-averaged."""
        rows, n, k = probs.shape
        r = math.isqrt(n)
        if r * r != n or self.latent_size % r:
            raise RuntimeError(f"layer {self.layers[layer]} has {n} query positions; a square map "
                               f"dividing the {self.latent_size}-grid is expected (padded canvas).")
        m = probs.permute(0, 2, 1).reshape(rows, k, r, r)
        f = self.latent_size // r
        self.maps[layer] = m.repeat_interleave(f, -2).repeat_interleave(f, -1)

    def stacked(self) -> torch.Tensor:
        """(rows, n_layers, n_tokens, L, L) for the last call."""
        missing = [self.layers[i] for i in range(len(self.layers)) if i not in self.maps]
        if missing:
            raise RuntimeError(f"no attention captured from {missing}")
        return torch.stack([self.maps[i] for i in range(len(self.layers))], 1)


class CrossAttentionCapture:
    """Computes the layer output exactly as diffusers' AttnProcessor2_0 (SDPA) and, on the side, the
    softmax probabilities of the selected key columns in fp32, averaged over heads."""

    def __init__(self, store: AttentionStore, layer: int):
        self.store, self.layer = store, layer

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 temb=None, *args, **kwargs):
        if attn.spatial_norm is not None or attn.group_norm is not None or attn.residual_connection:
            raise NotImplementedError("capture supports SD-style attn2 layers (no spatial/group norm, "
                                      "no residual connection inside the attention)")
        if encoder_hidden_states is None:
            raise RuntimeError("capture processor installed on a self-attention layer")
        if hidden_states.ndim == 4:
            raise NotImplementedError("4-D hidden states are not used by SD transformer blocks")
        batch, _, _ = hidden_states.shape
        ctx = attn.norm_encoder_hidden_states(encoder_hidden_states) if attn.norm_cross else encoder_hidden_states
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, ctx.shape[1], batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
        query, key, value = attn.to_q(hidden_states), attn.to_k(ctx), attn.to_v(ctx)
        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask,
                                             dropout_p=0.0, is_causal=False)
        self._capture(query, key, attention_mask, head_dim)
        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        return out / attn.rescale_output_factor

    def _capture(self, query, key, attention_mask, head_dim):
        logits = query.float() @ key.float().transpose(-1, -2) / math.sqrt(head_dim)
        if attention_mask is not None:
            logits = logits + attention_mask.float()
        lse = logits.logsumexp(-1, keepdim=True)
        tokens = self.store.tokens.to(logits.device)
        probs = (logits.index_select(-1, tokens) - lse).exp().mean(1)  # head mean
        self.store.add(self.layer, probs)


def select_layers(names: list[str], patterns=None) -> list[str]:
    """The layer names matching any fnmatch pattern of `patterns` (None: all, as in the paper)."""
    if patterns is None:
        return list(names)
    patterns = [patterns] if isinstance(patterns, str) else list(patterns)
    chosen = [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns)]
    if not chosen:
        raise ValueError(f"`attention.layers`={patterns} matches none of the model's attention "
                         f"layers {names}; give fnmatch patterns of those names or null (all).")
    return chosen


@contextlib.contextmanager
def install_capture(model, store: AttentionStore, wanted: list[str], make):
    """Replace the processors `wanted` (names without ".processor") by `make(original, index)`;
    restore all originals in `finally`."""
    original = dict(model.attn_processors)
    store.layers = list(wanted)
    keys = [f"{name}.processor" for name in wanted]
    procs = {name: (make(proc, keys.index(name)) if name in keys else proc)
             for name, proc in original.items()}
    model.set_attn_processor(procs)  # set_attn_processor pops from the dict it gets
    try:
        yield store
    finally:
        model.set_attn_processor(dict(original))


def cross_attention_layers(unet) -> list[str]:
    """The UNet's `attn2` (cross-attention) layer names."""
    return [n.removesuffix(".processor") for n in unet.attn_processors if n.endswith("attn2.processor")]


@contextlib.contextmanager
def capture_cross_attention(unet, store: AttentionStore, layers=None):
    """Install capture processors on every `attn2` layer (or those matching `layers`); restore the
    originals afterwards."""
    cross = cross_attention_layers(unet)
    if not cross:
        raise RuntimeError("this UNet has no cross-attention (attn2) layers to capture")
    wanted = select_layers(cross, layers)
    with install_capture(unet, store, wanted, lambda _proc, i: CrossAttentionCapture(store, i)):
        n = sum(isinstance(p, CrossAttentionCapture) for p in unet.attn_processors.values())
        assert n == len(wanted), f"{n} capture processors installed, {len(wanted)} expected"
        yield store


class UNetDenoiser:
    """One batched UNet call of the capture: SD 1.x/2.x (and SDXL with `added`: its pooled
    `text_embeds` and `time_ids`). Noise levels are DDIM timesteps; z_t = add_noise(z0, eps, t)."""

    def __init__(self, unet, scheduler, text_emb: torch.Tensor, added: dict | None = None, layers=None):
        self.model, self.scheduler, self.text_emb, self.added, self.layers = unet, scheduler, text_emb, added, layers

    def levels(self, timesteps) -> torch.Tensor:
        return torch.as_tensor(np.asarray(timesteps), dtype=torch.long)

    def noised(self, z0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.scheduler.add_noise(z0, eps, t)

    def __call__(self, zt: torch.Tensor, t: torch.Tensor):
        dev, dtype = self.model.device, self.model.dtype
        emb = self.text_emb.to(dev, dtype).expand(len(zt), -1, -1)
        kw = {}
        if self.added is not None:
            kw["added_cond_kwargs"] = {k: v.to(dev, dtype).expand(len(zt), -1) for k, v in self.added.items()}
        return self.model(zt.to(dev, dtype), t.to(dev), encoder_hidden_states=emb, **kw)

    def capture(self, store: AttentionStore):
        return capture_cross_attention(self.model, store, self.layers)


def image_noise(generator: torch.Generator, n_levels: int, latent_shape) -> torch.Tensor:
    """Fresh noise per noise level, drawn in one fixed-size block so T0 does not change it."""
    return torch.randn((n_levels, *latent_shape), generator=generator)


CPU_BATCH_ROWS = 160  # `batch_rows="auto"` on the CPU (memory is rarely the limit there)
MAX_AUTO_ROWS = 1024


def row_bytes(unet, latent_size: int) -> int:
    """A generous estimate of the peak activation memory of one UNet row (inference, SDPA self-
    attention) plus the float32 capture of one row: 192 x L^2 x C0 elements of the UNet dtype
    (SD 1.5 at 64x64 latent in bf16: ~300 MB), plus the fp32 logits of the widest attn2 layer."""
    elem = torch.finfo(unet.dtype).bits // 8
    if not hasattr(unet.config, "block_out_channels"):  # SD3 / Flux transformer: ~24 activations of
        cfg = unet.config                                 # (tokens x width) per block, + fp32 chunks
        width = int(cfg.num_attention_heads) * int(cfg.attention_head_dim)
        tokens = latent_size ** 2 // 4 + 333
        return 24 * tokens * width * elem + 4 * cfg.num_attention_heads * 1024 * tokens * 4
    c0 = int(unet.config.block_out_channels[0])
    ctx = 77
    return 64 * latent_size ** 2 * c0 * elem + 4 * 8 * latent_size ** 2 * ctx * 4


def auto_batch_rows(unet, latent_size: int, free_bytes: int | None = None,
                    fraction: float = 0.7) -> int:
    """Rows per UNet call from free accelerator memory (`torch.cuda.mem_get_info`); on the CPU
    `CPU_BATCH_ROWS`. `free_bytes` overrides the query (tests)."""
    dev = unet.device
    if free_bytes is None:
        if dev.type != "cuda":
            return CPU_BATCH_ROWS
        free_bytes = torch.cuda.mem_get_info(dev)[0]
    rows = int(fraction * free_bytes // row_bytes(unet, latent_size))
    return int(min(max(rows, 1), MAX_AUTO_ROWS))


def resolve_batch_rows(batch_rows, unet, latent_size: int) -> int:
    """`batch_rows` as an int: a positive int, or "auto" (:func:`auto_batch_rows`)."""
    if batch_rows == "auto":
        return auto_batch_rows(unet, latent_size)
    if isinstance(batch_rows, bool) or not isinstance(batch_rows, numbers.Integral) or batch_rows < 1:
        raise ValueError(f"`batch_rows`={batch_rows!r}; give a positive int or 'auto'.")
    return int(batch_rows)


OOM_ERRORS = (torch.OutOfMemoryError,)  # torch.cuda.OutOfMemoryError is the same class


def _free_cache(device) -> None:
    if getattr(device, "type", None) == "cuda":
        torch.cuda.empty_cache()


@torch.no_grad()
def attention_maps(unet, scheduler, z0: torch.Tensor, text_emb: torch.Tensor,
                   token_positions: list[int], timesteps, noise: torch.Tensor,
                   batch_rows: int | str = 160, progress: bool = False, layers=None) -> torch.Tensor:
    """Per-(image, noise level, layer, token) maps on the latent grid of a UNet (SD 1.x/2.x).

    z0: (B, C, L, L) clean latents; text_emb: (1, S, D); timesteps: (T,) ints; noise: (B, T, C, L, L).
    See :func:`capture_maps`; `layers`: fnmatch patterns of the attn2 layers (None: all)."""
    return capture_maps(UNetDenoiser(unet, scheduler, text_emb, layers=layers), z0, token_positions,
                        timesteps, noise, batch_rows, progress)


@torch.no_grad()
def capture_maps(denoiser, z0: torch.Tensor, token_positions: list[int], timesteps, noise: torch.Tensor,
                 batch_rows: int | str = 160, progress: bool = False) -> torch.Tensor:
    """Per-(image, noise level, layer, token) maps on the latent grid, for any family's `denoiser`
    (:class:`UNetDenoiser`, or `core.families`' transformer denoisers).

    Every (image, level) pair is one row: z_t = denoiser.noised(z0, eps, level) from the clean
    latent (no trajectory), and rows go through the model in chunks of `batch_rows` ("auto": from
    free GPU memory), without CFG. An out-of-memory error inside a model call halves the rows and
    retries that chunk (down to 1 row). Returns (B, T, n_layers, n_tokens, L, L) float32 on the CPU.
    """
    B, T = z0.shape[0], len(timesteps)
    L = z0.shape[-1]
    model = denoiser.model
    rows_per_call = resolve_batch_rows(batch_rows, model, L)
    ts = denoiser.levels(timesteps)
    rows = [(b, k) for b in range(B) for k in range(T)]
    store = AttentionStore(token_positions, L)
    out = None
    dev = model.device
    bar = tqdm(total=len(rows), desc="UNet rows", disable=not progress, leave=False)
    with denoiser.capture(store):
        start = 0
        while start < len(rows):
            chunk = rows[start:start + rows_per_call]
            bi = torch.tensor([b for b, _ in chunk])
            ki = torch.tensor([k for _, k in chunk])
            t = ts[ki]
            zt = denoiser.noised(z0[bi].float().cpu(), noise[bi, ki].float(), t)
            store.reset()
            try:
                denoiser(zt, t)
            except OOM_ERRORS:
                if len(chunk) == 1:
                    raise
                store.reset()
                _free_cache(dev)
                rows_per_call = max(1, len(chunk) // 2)
                warnings.warn(f"out of memory with {len(chunk)} rows per model call; retrying "
                              f"with {rows_per_call} (set batch_rows to at most that).")
                continue
            maps = store.stacked().float().cpu()
            if out is None:
                out = torch.zeros((B, T, *maps.shape[1:]))
            out[bi, ki] = maps
            start += len(chunk)
            bar.update(len(chunk))
    bar.close()
    return out


def reduce_maps(full: torch.Tensor, T0: int) -> dict[str, torch.Tensor]:
    """M̂ (raw) = mean over the T0 lowest levels and all layers, summed over tokens; plus the
    per-timestep, per-layer and per-token views for exploration and the T0 sweep."""
    low = full[:, :T0]
    return {
        "mhat_raw": low.mean((1, 2)).sum(1),               # (B, L, L)
        "per_timestep": full.mean(2).sum(2),                # (B, T, L, L)
        "per_layer": low.mean(1).sum(2),                   # (B, n_layers, L, L)
        "per_token": low.mean((1, 2)),                      # (B, n_tokens, L, L)
    }


def minmax(m: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
    """Per-image min-max to [0, 1] over the valid region (padding set to 0)."""
    v = m[valid] if valid is not None else m.ravel()
    lo, hi = float(v.min()), float(v.max())
    out = (m - lo) / (hi - lo) if hi > lo else np.zeros_like(m)
    out = np.clip(out, 0, 1).astype(np.float32)
    if valid is not None:
        out[~valid] = 0
    return out
