"""ipywidgets explorer over the stage-01 maps: noise level, layer and token. Headless (papermill,
nbval, a static render) it shows the same views as static figures."""
from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np

from fgbg_utils.views.gallery import summary01
from fgbg_utils.stages.attention_maps import load_map


def _views(cfg: dict, image_id: str) -> dict:
    m = load_map(cfg, image_id)
    s = summary01(cfg)
    out = {"M̂ (mean of all)": [m["mhat"]]}
    if "per_timestep" in m:
        out["noise level t"] = [(f"t={t}", a) for t, a in zip(s["timesteps"], m["per_timestep"])]
    if "per_layer" in m:
        out["layer"] = [(name.split(".attentions")[0], a) for name, a in zip(s["layers"], m["per_layer"])]
        toks = [f"{w}@{p}" for w, pos in s["token_positions"].items() for p in pos]
        out["token"] = list(zip(toks, m["per_token"]))
    return out


def static_views(cfg: dict, image_id: str):
    """One figure per view kind (what the explorer shows, for headless runs)."""
    from fgbg_utils.views.plots import maps_strip

    figs = []
    for kind, items in _views(cfg, image_id).items():
        if kind.startswith("M̂"):
            continue
        labels, maps = zip(*items)
        step = max(1, len(maps) // 10)
        figs.append(maps_strip(np.stack(maps[::step]), list(labels[::step]), f"{image_id}: by {kind}"))
    return figs


def attention_explorer(cfg: dict, image_ids: list[str], interactive: bool = True):
    """Sliders/dropdowns over image, noise level, layer and token when interactive; else figures."""
    if not interactive:
        return static_views(cfg, image_ids[0])
    import ipywidgets as W
    from IPython.display import display

    image = W.Dropdown(options=image_ids, description="image")
    kind = W.ToggleButtons(options=["noise level t", "layer", "token"], description="view")
    index = W.IntSlider(min=0, max=0, description="index")
    out = W.Output()

    def redraw(*_):
        views = _views(cfg, image.value)
        items = views.get(kind.value, [])
        index.max = max(0, len(items) - 1)
        with out:
            out.clear_output(wait=True)
            fig, axes = plt.subplots(1, 2, figsize=(6, 3))
            axes[0].imshow(views["M̂ (mean of all)"][0], vmin=0, vmax=1)
            axes[0].set_title("M̂")
            if items:
                label, arr = items[min(index.value, len(items) - 1)]
                axes[1].imshow(arr.astype(np.float32))
                axes[1].set_title(label, fontsize=8)
            for ax in axes:
                ax.axis("off")
            plt.show()

    for w in (image, kind, index):
        w.observe(redraw, names="value")
    redraw()
    display(W.VBox([W.HBox([image, kind]), index, out]))
    return None
