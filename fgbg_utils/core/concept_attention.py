"""ConceptAttention maps for MMDiT transformers (SD3, Flux; Helbling et al., ICML 2025):
`attention.aggregation: concept`.

Concept tokens (the object word, as in the prompt, and the words of `attention.concepts`, e.g.
"background") form a third stream that goes through the text-stream weights of every joint block
(norm1_context, the added q/k/v projections and norms, to_add_out, norm2_context, ff_context) with
the block's own time embedding, beside generation but never read by it. In each block the concept
queries attend to [image, concept] keys; the image tokens' attention outputs (the block's own, over
[image, text], before the output projection) are compared with the concepts' outputs by dot
product; the softmax over concepts (a concept with several tokens: the mean of its dot products)
gives the object concept's map, on the latent patch grid like the cross-attention capture.

Capture, as in `core.joint_attention`: a processor wrapping the layer's stock processor (its output
is returned unchanged, so generation is bit-identical) plus forward pre-hooks that read the
transformer's batch size and each block's `temb`; all are removed in `finally`. Flux: double-stream
blocks only (single-stream blocks have no separate text weights); concept tokens get no RoPE (Flux's
text positions are 0, whose rotation is the identity).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fgbg_utils.core.attention import AttentionStore, install_capture, select_layers


@dataclass
class Concepts:
    """Concept tokens: rows of the family's sequence embedding (before `context_embedder`)."""

    emb: torch.Tensor          # (n_tokens, D)
    group: torch.Tensor        # (n_tokens,) long: 0 = the object concept, 1.. the others
    names: list[str]           # concept names, index = group


def concept_layers(transformer) -> list[str]:
    """Joint-attention layers whose block has text-stream weights (SD3 blocks, Flux double-stream)."""
    from fgbg_utils.core.joint_attention import joint_layers
    return [n for n in joint_layers(transformer)
            if hasattr(transformer.get_submodule(n.rsplit(".", 1)[0]), "norm1_context")]


def _heads(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    return x.unflatten(-1, (-1, head_dim))  # (B, S, H, d)


def _attend(q, k, v) -> torch.Tensor:
    """SDPA over (B, S, H, d) tensors; returns (B, Sq, H * d)."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2).flatten(2)


class ConceptStream:
    """The concept tokens' hidden states through one transformer call, and their maps."""

    def __init__(self, transformer, concepts: Concepts, store: AttentionStore, family: str):
        self.model, self.concepts, self.store, self.family = transformer, concepts, store, family
        self.hidden: torch.Tensor | None = None
        self.temb: torch.Tensor | None = None

    def start(self, batch: int) -> None:
        dev, dt = self.model.device, self.model.dtype
        c = self.model.context_embedder(self.concepts.emb.to(dev, dt))
        self.hidden = c.unsqueeze(0).expand(batch, -1, -1)

    def image_attention(self, attn, x, txt, rope=None):
        """(image outputs before to_out (B, N, H*d), image k, image v) of the block's attention."""
        d = attn.to_q.out_features // attn.heads
        q, k, v = (_heads(p(x), d) for p in (attn.to_q, attn.to_k, attn.to_v))
        kt, vt = _heads(attn.add_k_proj(txt), d), _heads(attn.add_v_proj(txt), d)
        if attn.norm_q is not None:
            q, k = attn.norm_q(q), attn.norm_k(k)
        if attn.norm_added_k is not None:
            kt = attn.norm_added_k(kt)
        if rope is not None:  # Flux: RoPE over [text, image]
            from diffusers.models.embeddings import apply_rotary_emb
            n_txt = txt.shape[1]
            img_rope = (rope[0][n_txt:], rope[1][n_txt:])
            q = apply_rotary_emb(q, img_rope, sequence_dim=1)
            kk = apply_rotary_emb(torch.cat([kt, k], 1), rope, sequence_dim=1)
            kt, k_rot = kk[:, :n_txt], kk[:, n_txt:]
            return _attend(q, torch.cat([kt, k_rot], 1), torch.cat([vt, v], 1)), k_rot, v
        return _attend(q, torch.cat([k, kt], 1), torch.cat([v, vt], 1)), k, v

    def step(self, layer: int | None, attn, block, x, txt, rope=None) -> None:
        """One block: the map of `layer` (None: not recorded) and the concept stream's update."""
        c = self.hidden.to(x.dtype)
        pre_only = getattr(block, "context_pre_only", False)
        if pre_only:
            norm_c, gates = block.norm1_context(c, self.temb), None
        else:
            norm_c, *gates = block.norm1_context(c, emb=self.temb)
        o_x, k_x, v_x = self.image_attention(attn, x, txt, rope)
        d = k_x.shape[-1]
        qc, kc, vc = (_heads(p(norm_c), d) for p in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
        if attn.norm_added_q is not None:
            qc, kc = attn.norm_added_q(qc), attn.norm_added_k(kc)
        o_c = _attend(qc, torch.cat([k_x, kc], 1), torch.cat([v_x, vc], 1))
        if layer is not None:
            self.store.add(layer, self.object_map(o_x, o_c))
        if not pre_only:
            self.hidden = self.update(c, o_c, attn, block, gates)

    def object_map(self, o_x: torch.Tensor, o_c: torch.Tensor) -> torch.Tensor:
        """softmax over concepts of <o_x, o_c> (mean over a concept's tokens): the object concept's
        probability (B, N), returned as (B, N, k) spread evenly over the k object token columns."""
        scores = o_x.float() @ o_c.float().transpose(1, 2)           # (B, N, n_tokens)
        g = self.concepts.group.to(scores.device)
        n_groups = int(g.max()) + 1
        onehot = F.one_hot(g, n_groups).float()
        per_concept = scores @ (onehot / onehot.sum(0))               # (B, N, n_concepts)
        p = per_concept.softmax(-1)[..., 0]
        k = len(self.store.tokens)
        return (p / k).unsqueeze(-1).expand(-1, -1, k)

    @staticmethod
    def update(c, o_c, attn, block, gates):
        """The text stream's residual update of the block (SD3 JointTransformerBlock, Flux double)."""
        gate_msa, shift_mlp, scale_mlp, gate_mlp = gates
        c = c + gate_msa.unsqueeze(1) * attn.to_add_out(o_c)
        n = block.norm2_context(c) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
        return c + gate_mlp.unsqueeze(1) * block.ff_context(n)


class ConceptCapture:
    """Wraps a joint layer's stock processor; runs the concept stream's step on the side."""

    def __init__(self, original, stream: ConceptStream, block, layer: int | None):
        self.original, self.stream, self.block, self.layer = original, stream, block, layer

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        out = self.original(attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs)
        rope = kwargs.get("image_rotary_emb", args[0] if args else None) if self.stream.family == "flux" else None
        with torch.no_grad():
            self.stream.step(self.layer, attn, self.block, hidden_states, encoder_hidden_states, rope)
        return out


@contextlib.contextmanager
def capture_concept_attention(transformer, store: AttentionStore, family: str, concepts: Concepts,
                              layers=None):
    """Install the concept capture on every layer with text-stream weights (the stream needs them
    all); maps are recorded for those matching `layers` (fnmatch patterns; None: all)."""
    names = concept_layers(transformer)
    if not names:
        raise RuntimeError("this transformer has no joint blocks with text-stream weights "
                           "(`attention.aggregation`='concept' needs SD3 or Flux double-stream blocks)")
    wanted = select_layers(names, layers)
    stream = ConceptStream(transformer, concepts, store, family)
    blocks = {n: transformer.get_submodule(n.rsplit(".", 1)[0]) for n in names}

    def make(proc, i):
        n = names[i]
        return ConceptCapture(proc, stream, blocks[n], wanted.index(n) if n in wanted else None)

    def on_model(_m, args, kwargs):
        x = kwargs.get("hidden_states", args[0] if args else None)
        stream.start(x.shape[0])

    def on_block(_m, args, kwargs):
        stream.temb = kwargs.get("temb", args[2] if len(args) > 2 else None)

    hooks = [transformer.register_forward_pre_hook(on_model, with_kwargs=True)]
    try:
        hooks += [b.register_forward_pre_hook(on_block, with_kwargs=True) for b in blocks.values()]
        with install_capture(transformer, store, names, make):
            store.layers = list(wanted)
            yield store
    finally:
        for h in hooks:
            h.remove()


def concept_tokens(ldm, prompt: str, object_words: list[str], concepts: list[str]) -> Concepts:
    """The object's tokens in `prompt` (the words of `object_words`) and, for each other concept
    word w, its tokens in the prompt with the object replaced by w (`prompt` is the template with
    {object})."""
    from fgbg_utils.core import families

    if not concepts:
        raise ValueError("`attention.concepts` is empty; `attention.aggregation`='concept' needs at "
                         "least one other concept (e.g. ['background']) to softmax against.")
    clash = sorted(set(concepts) & set(object_words))
    if clash:
        raise ValueError(f"`attention.concepts`={concepts} repeats the object word(s) {clash}; list "
                         f"only the other concepts.")
    rows, groups = [], []
    for g, (text, words) in enumerate([(prompt.replace("{object}", object_words[0]), object_words),
                                       *[(prompt.replace("{object}", w), [w]) for w in concepts]]):
        emb = families.encode_condition(ldm, text).emb[0]
        pos = [p for p in families.prompt_positions(ldm, text, words).values() for p in p]
        if not pos:
            raise ValueError(f"concept {words[0]!r} has no tokens in {text!r} (`attention.concepts`)")
        rows.append(emb[pos])
        groups += [g] * len(pos)
    return Concepts(torch.cat(rows), torch.tensor(groups), [object_words[0], *concepts])
