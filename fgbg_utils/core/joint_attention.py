"""Attention capture in the joint attention of MMDiT transformers (SD3, Flux): the image-query ->
text-key block of the softmax over [image, text] (SD3, `JointAttnProcessor2_0`) or [text, image]
(Flux, `FluxAttnProcessor`, with RoPE; double-stream blocks and single-stream blocks, whose
attention runs on the concatenated sequence).

The capture is a processor that wraps the layer's own processor: the layer's output IS the stock
processor's (bit for bit); on the side it recomputes the layer's queries and keys with the layer's
own projections and norms, and keeps, in float32 and averaged over heads, the probabilities of the
image queries on the object tokens' key columns only (the softmax normaliser runs over all keys,
image and text, in query chunks, so the full attention matrix is never held). The original
processors are restored in `finally` (`attention.install_capture`)."""
from __future__ import annotations

import contextlib
import math

import torch

from fgbg_utils.core.attention import AttentionStore, install_capture, select_layers

QUERY_CHUNK = 1024  # image queries per logits block (memory: heads x chunk x keys x 4 bytes)


def joint_layers(transformer) -> list[str]:
    """Joint-attention layers of an SD3 or Flux transformer (SD3.5's image-only `attn2` is not one)."""
    return [n.removesuffix(".processor") for n in transformer.attn_processors
            if n.endswith(".attn.processor")]


def token_probs(query: torch.Tensor, keys: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """query (B, H, N, d), keys (B, H, S, d) -> (B, N, k) float32 softmax probabilities over all S
    keys of the `tokens` columns, averaged over heads; computed in query chunks."""
    scale = 1.0 / math.sqrt(query.shape[-1])
    k = keys.float()
    out = []
    for s in range(0, query.shape[2], QUERY_CHUNK):
        logits = query[:, :, s:s + QUERY_CHUNK].float() @ k.transpose(-1, -2) * scale
        lse = logits.logsumexp(-1, keepdim=True)
        out.append((logits.index_select(-1, tokens) - lse).exp().mean(1))
    return torch.cat(out, 1)


class SD3Capture:
    """Wraps `JointAttnProcessor2_0`: keys are [image, text]; the object tokens sit after the image."""

    def __init__(self, original, store: AttentionStore, layer: int):
        self.original, self.store, self.layer = original, store, layer

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        out = self.original(attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs)
        if encoder_hidden_states is None:
            raise RuntimeError("SD3 capture on an attention layer without text (joint attention expected)")
        b, heads = hidden_states.shape[0], attn.heads
        split = lambda x: x.view(b, -1, heads, x.shape[-1] // heads).transpose(1, 2)
        q, k = split(attn.to_q(hidden_states)), split(attn.to_k(hidden_states))
        k_txt = split(attn.add_k_proj(encoder_hidden_states))
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        if attn.norm_added_k is not None:
            k_txt = attn.norm_added_k(k_txt)
        n_img = hidden_states.shape[1]
        cols = self.store.tokens.to(q.device) + n_img
        self.store.add(self.layer, token_probs(q, torch.cat([k, k_txt], 2), cols))
        return out


class FluxCapture:
    """Wraps `FluxAttnProcessor`: keys are [text, image] with RoPE. Double-stream blocks get text as
    `encoder_hidden_states`; single-stream blocks get the concatenated [text, image] sequence, whose
    first `store.n_text` positions are text."""

    def __init__(self, original, store: AttentionStore, layer: int):
        self.original, self.store, self.layer = original, store, layer

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 image_rotary_emb=None):
        from diffusers.models.embeddings import apply_rotary_emb
        from diffusers.models.transformers.transformer_flux import _get_qkv_projections

        out = self.original(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        q, k, _, _, k_txt, _ = _get_qkv_projections(attn, hidden_states, encoder_hidden_states)
        q = attn.norm_q(q.unflatten(-1, (-1, attn.head_dim)))
        k = attn.norm_k(k.unflatten(-1, (-1, attn.head_dim)))
        if encoder_hidden_states is not None:  # double-stream: [text, image]
            k_txt = attn.norm_added_k(k_txt.unflatten(-1, (-1, attn.head_dim)))
            k = torch.cat([k_txt, k], 1)
            n_text = encoder_hidden_states.shape[1]
            q_rope = (image_rotary_emb[0][n_text:], image_rotary_emb[1][n_text:]) if image_rotary_emb else None
        else:  # single-stream: the sequence is already [text, image]
            n_text = self.store.n_text
            q = q[:, n_text:]
            q_rope = (image_rotary_emb[0][n_text:], image_rotary_emb[1][n_text:]) if image_rotary_emb else None
        if image_rotary_emb is not None:
            q = apply_rotary_emb(q, q_rope, sequence_dim=1)
            k = apply_rotary_emb(k, image_rotary_emb, sequence_dim=1)
        cols = self.store.tokens.to(q.device)
        self.store.add(self.layer, token_probs(q.transpose(1, 2), k.transpose(1, 2), cols))
        return out


CAPTURES = {"sd3": SD3Capture, "flux": FluxCapture}


@contextlib.contextmanager
def capture_joint_attention(transformer, store: AttentionStore, family: str, layers=None,
                            n_text: int | None = None):
    """Install the family's capture on every joint-attention layer (or those matching `layers`,
    fnmatch patterns); `n_text`: text tokens in the joint sequence (Flux single-stream blocks)."""
    names = joint_layers(transformer)
    if not names:
        raise RuntimeError("this transformer has no joint-attention layers to capture")
    wanted = select_layers(names, layers)
    store.n_text = n_text
    cls = CAPTURES[family]
    with install_capture(transformer, store, wanted, lambda proc, i: cls(proc, store, i)):
        yield store
