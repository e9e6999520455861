"""The diffusion primer's helpers (notebook 00b): what each guidance parameter means in the one
concept-scale convention ε̂ = ε(y_b) + s·(ε(y_f) − ε(y_b)), and the inputs of a cross-attention layer."""
from __future__ import annotations

import torch


def concept_scale(w: float, negative_prompt_is_y_f: bool = True) -> float:
    """s of a diffusers call with prompt y_b, negative prompt y_f and guidance_scale w:
    ε(y_f) + w·(ε(y_b) − ε(y_f)) = ε(y_b) + (1 − w)·(ε(y_f) − ε(y_b)), so s = 1 − w
    (w = 1 turns guidance off: plain y_b, s = 0, the same formula)."""
    if not negative_prompt_is_y_f and w != 1:
        raise ValueError("only guidance between y_b and y_f has a concept scale")
    return 1.0 - float(w)


def guidance_convention(cfg) -> list[dict]:
    """Every guidance parameter of a run's config with its value, how the code uses it, and its
    concept scale s."""
    direct = "ε(y_b) + s(ε(y_f) − ε(y_b)) itself"
    cfg_call = "diffusers CFG: prompt y_b, negative y_f, w; s = 1 − w"
    return [
        {"parameter": "finetune.eval_guidance", "value": cfg.finetune.eval_guidance, "how": cfg_call,
         "s": concept_scale(cfg.finetune.eval_guidance), "notebook": "03"},
        {"parameter": "refinement.guidance_scale", "value": cfg.refinement.guidance_scale,
         "how": cfg_call, "s": concept_scale(cfg.refinement.guidance_scale), "notebook": "04"},
        {"parameter": "synthesis.guidance", "value": cfg.synthesis.guidance, "how": direct,
         "s": float(cfg.synthesis.guidance), "notebook": "05"},
        {"parameter": "synthesis.background_guidance", "value": cfg.synthesis.background_guidance,
         "how": direct, "s": float(cfg.synthesis.background_guidance), "notebook": "05"},
    ]


@torch.no_grad()
def attention_inputs(unet, z_t: torch.Tensor, t: int, text_emb: torch.Tensor, index: int = 0):
    """(the `index`-th cross-attention module, its pixel features φ(z_t), its text input τ_θ(y)) as
    the module receives them in one UNet call (a forward pre-hook; the call is otherwise unchanged)."""
    layer = [m for name, m in unet.named_modules() if name.endswith("attn2")][index]
    seen = {}

    def grab(module, args, kwargs):
        seen["phi"] = kwargs.get("hidden_states", args[0] if args else None)
        seen["ctx"] = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)

    handle = layer.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        unet(z_t, torch.tensor([t]), encoder_hidden_states=text_emb)
    finally:
        handle.remove()
    return layer, seen["phi"], seen["ctx"]
