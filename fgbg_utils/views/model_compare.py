"""M̂ of the same image from several models side by side (notebook 01: the toy LDM's UNet and the
toy MMDiT, plain cross-attention and ConceptAttention), each with its AUC against the ground truth."""
from __future__ import annotations

import numpy as np

from fgbg_utils.core.metrics import BinnedAUC


def model_maps(image: np.ndarray, models: dict[str, tuple[str, str]], object_word: str, prompt: str,
               T0: int, seed: int = 0, device: str = "cpu") -> dict[str, np.ndarray]:
    """{label: M̂ at the image's size} for models = {label: (model path, aggregation)}."""
    from fgbg_utils import FgBgPipeline
    from fgbg_utils.runs.params import resolve_input
    from fgbg_utils.views.walkthrough import quiet_diffusers

    loaded, out = {}, {}
    for label, (path, aggregation) in models.items():
        if path not in loaded:
            with quiet_diffusers():
                loaded[path] = FgBgPipeline.from_pretrained(resolve_input(path), device=device)
        maps = loaded[path].attention_maps(image, object_word, prompt, T0=T0, seed=seed,
                                           ids=["compare"], aggregation=aggregation)
        out[label] = maps.original()[0]
    return out


def unet_vs_mmdit(image: np.ndarray, ground_truth: np.ndarray, object_word: str = "shape",
                  prompt: str = "a photo of a {object}", T0: int = 40, seed: int = 0,
                  unet: str = "models/toy-ldm", mmdit: str = "models/toy-dit"):
    """Figure: the image, its ground truth, the UNet's M̂ and the MMDiT's M̂ (cross-attention and
    concept aggregation), each titled with its AUC; returns (figure, {label: AUC})."""
    from fgbg_utils.views.walkthrough import image_and_maps

    maps = model_maps(image, {"UNet (toy LDM)": (unet, "cross"), "MMDiT (toy DiT)": (mmdit, "cross"),
                              "MMDiT, concept": (mmdit, "concept")}, object_word, prompt, T0, seed)
    aucs = {}
    for label, m in maps.items():
        meter = BinnedAUC()
        meter.update(m, ground_truth)
        aucs[label] = round(float(meter.result()), 3)
    titled = {f"{k} M̂\nAUC {aucs[k]:.3f}": v for k, v in maps.items()}
    return image_and_maps(image, titled, ground_truth), aucs
