"""Explorers a student uses: ipywidgets when `interactive` and a browser is attached, otherwise the
same views as static matplotlib figures. Every explorer is a plain figure function (tested headless)
plus a thin widget wrapper around it.

* attention: the image with an M̂ overlay and colour bar, and one map per noise level t, layer and
  token, each on its own labelled slider (no slider moves another);
* threshold: the GMM histogram with a draggable threshold, the mask it gives and, with ground truth,
  the IoU at every threshold (why the midpoint rule is used);
* refinement: before/after (M_pre, x̂, |x − x̂|, M) per image;
* synthetic pairs: D' image, D'_m, D'_f, D'_b.
"""
from __future__ import annotations

import io
import threading
from dataclasses import dataclass, field

import matplotlib.pyplot as plt
import numpy as np

from fgbg_utils.views.walkthrough import gmm_figure, overlay, show_mask


def use_widgets(interactive: bool) -> bool:
    """Widgets only when asked for, ipywidgets is installed and the kernel talks to a browser-like
    front end (it allows stdin; papermill, nbclient and nbval do not)."""
    if not interactive:
        return False
    try:
        import ipywidgets  # noqa: F401
        from IPython import get_ipython
    except ImportError:
        return False
    kernel = getattr(get_ipython(), "kernel", None)
    return bool(getattr(kernel, "_allow_stdin", False))


# Widget callbacks. JupyterLab >= 4.4 sends comm messages on a kernel subshell (its
# "commsOverSubshells" setting), so two threads handle widget messages, and ipykernel fires
# `post_execute` after each, where the inline backend's `flush_figures` shows (and closes) every
# pyplot figure queued while interactive: a figure still being built in the other thread came out
# blank or half drawn. So figures are built with pyplot non-interactive (never queued), rendered
# explicitly and closed, one redraw at a time.
REDRAW_LOCK = threading.RLock()


def show_figure(fig) -> None:
    """Display `fig` as a PNG and close it. Renders this one figure explicitly instead of
    `plt.show()`, which renders and closes every open pyplot figure (not thread-safe)."""
    from IPython.display import Image, display

    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight", facecolor="white")
    plt.close(fig)
    display(Image(data=buf.getvalue(), format="png"))


def _show_widget(controls, draw):
    """Lay out the controls above an Output that `draw()` (returning a figure) refills."""
    import ipywidgets as W
    from IPython.display import display

    out = W.Output()

    def redraw(*_):
        with REDRAW_LOCK, plt.ioff(), out:
            out.clear_output(wait=True)
            fig = draw()
            if fig is not None:
                show_figure(fig)

    for c in controls:
        c.observe(redraw, names="value")
    redraw()
    display(W.VBox([*controls, out]))


def _slider(options: list[str], description: str):
    import ipywidgets as W

    return W.SelectionSlider(options=[(o, k) for k, o in enumerate(options)], value=0,
                             description=description, continuous_update=False,
                             style={"description_width": "110px"}, layout=W.Layout(width="620px"),
                             disabled=len(options) < 2)  # one option: shown, but nothing to move


# ----------------------------------------------------------------------------- attention
@dataclass
class MapViews:
    """One image's M̂ and its exploration views on the latent grid, with the canonical canvas."""

    canvas: np.ndarray                     # (R, R, 3) uint8
    mhat: np.ndarray                       # (L, L)
    label: str = ""
    per_timestep: np.ndarray | None = None
    timesteps: list[int] = field(default_factory=list)
    per_layer: np.ndarray | None = None
    layers: list[str] = field(default_factory=list)
    per_token: np.ndarray | None = None
    tokens: list[str] = field(default_factory=list)

    def options(self) -> dict[str, list[str]]:
        """Slider labels per view kind (only the views that were kept)."""
        out = {}
        if self.per_timestep is not None:
            out["noise level t"] = [f"t = {t}" for t in self.timesteps]
        if self.per_layer is not None:
            out["layer"] = [_short_layer(n) for n in self.layers]
        if self.per_token is not None:
            out["token"] = list(self.tokens)
        return out

    @classmethod
    def from_pipeline(cls, maps, canvas: np.ndarray, i: int = 0) -> MapViews:
        """From `FgBgPipeline.attention_maps(...)` (per_* views when computed)."""
        tokens = [f"'{w}' @ {p}" for w, pos in maps.token_positions.items() for p in pos]
        pick = lambda a: None if a is None else a[i]
        return cls(canvas, maps.mhat[i], maps.ids[i], pick(maps.per_timestep),
                   [int(t) for t in maps.timesteps], pick(maps.per_layer), list(maps.layers),
                   pick(maps.per_token), tokens)

    @classmethod
    def from_run(cls, cfg, image_id: str, records=None) -> MapViews:
        """From the run folder's stage-01 map file of one image."""
        from fgbg_utils.core.frame import image_to_canvas
        from fgbg_utils.data.datasets import load_image
        from fgbg_utils.stages.attention_maps import load_map
        from fgbg_utils.views.gallery import records_by_id, summary01

        s = summary01(cfg)
        m = load_map(cfg, image_id)
        rec = (records or records_by_id(cfg))[image_id]
        canvas, _ = image_to_canvas(load_image(rec.image), s["resolution"], s["vae_factor"])
        canvas = ((canvas.transpose(1, 2, 0) + 1) * 127.5).round().clip(0, 255).astype(np.uint8)
        tokens = [f"'{w}' @ {p}" for w, pos in s["token_positions"].items() for p in pos]
        return cls(canvas, m["mhat"], image_id, m.get("per_timestep"), list(s["timesteps"]),
                   m.get("per_layer"), list(s["layers"]), m.get("per_token"), tokens)


def _short_layer(name: str) -> str:
    """`down_blocks.0.attentions.1.transformer_blocks.0.attn2` -> `down 0 · attn 1` (short enough
    for a slider's readout; `mid_block.attentions.0...` -> `mid · attn 0`)."""
    import re

    block = re.match(r"(down|up)_blocks\.(\d+)|mid_block", name)
    attn = re.search(r"attentions\.(\d+)", name)
    where = (f"{block.group(1)} {block.group(2)}" if block and block.group(1) else "mid") if block else name
    return f"{where} · attn {attn.group(1)}" if attn else where


def attention_figure(v: MapViews, t: int = 0, layer: int = 0, token: int = 0, size: float = 2.4):
    """M̂ over the image (colour bar in [0, 1]), then the map of noise level `t`, layer `layer` and
    token `token` (indices; raw attention, each with its own colour bar)."""
    views = [("M̂ (mean over levels, layers, tokens)", v.mhat, False)]
    for kind, arr, idx in (("noise level t", v.per_timestep, t), ("layer", v.per_layer, layer),
                           ("token", v.per_token, token)):
        if arr is not None:
            views.append((f"{kind}: {v.options()[kind][idx]}", arr[idx], True))
    fig, axes = plt.subplots(1, len(views), figsize=(size * len(views) + 0.5 * len(views), size + 0.3))
    for ax, (title, m, scaled) in zip(np.atleast_1d(axes), views):
        lo, hi = (float(m.min()), float(m.max())) if scaled else (0.0, 1.0)
        art = overlay(ax, v.canvas, m, title, vmin=lo, vmax=hi if hi > lo else lo + 1e-6)
        fig.colorbar(art, ax=ax, fraction=0.046, pad=0.04).ax.tick_params(labelsize=6)
    if v.label:
        fig.suptitle(v.label, fontsize=9)
    fig.tight_layout()
    return fig


def attention_explorer(get_views, image_ids: list[str], interactive: bool = True):
    """Image dropdown and one labelled slider each for noise level, layer and token.
    `get_views(image_id) -> MapViews`. Headless: the figure of the first image (t, layer and token
    at their first entries) and strips over every noise level and layer."""
    from fgbg_utils.views.plots import maps_strip

    first = get_views(image_ids[0])
    if not use_widgets(interactive):
        figs = [attention_figure(first)]
        for kind, arr in (("noise level t", first.per_timestep), ("layer", first.per_layer)):
            if arr is not None:
                step = max(1, len(arr) // 10)
                figs.append(maps_strip(arr[::step], first.options()[kind][::step], f"{first.label}: by {kind}"))
        return figs
    import ipywidgets as W

    image = W.Dropdown(options=image_ids, description="image")
    sliders = {kind: _slider(labels, kind) for kind, labels in first.options().items()}
    cache = {image_ids[0]: first}

    def draw():
        if image.value not in cache:
            cache[image.value] = get_views(image.value)
        idx = {k: s.value for k, s in sliders.items()}
        return attention_figure(cache[image.value], idx.get("noise level t", 0), idx.get("layer", 0),
                                idx.get("token", 0))

    _show_widget([image, *sliders.values()], draw)
    return None


# ----------------------------------------------------------------------------- threshold
def iou(mask: np.ndarray, gt: np.ndarray) -> float:
    """Foreground IoU of two bool masks (1.0 when both are empty)."""
    union = np.logical_or(mask, gt).sum()
    return float(np.logical_and(mask, gt).sum() / union) if union else 1.0


def threshold_mask(soft, valid, tau: float, orphan: bool = True) -> np.ndarray:
    """[M̂ > τ] on the valid region, then the orphan filter (core.binarize), as M_pre is made."""
    from fgbg_utils.core.binarize import orphan_filter

    m = (np.asarray(soft) > tau) & valid
    return orphan_filter(m) & valid if orphan else m


def threshold_figure(soft: np.ndarray, valid: np.ndarray, tau: float, info: dict, frame,
                     ground_truth: np.ndarray | None = None, seed: int = 0):
    """Histogram with the GMM and its midpoint, the chosen τ and the mask it gives; with ground
    truth also the IoU of the mask for every τ. Returns (figure, IoU at τ or None)."""
    from fgbg_utils.core.frame import canvas_to_original

    to_image = lambda m: canvas_to_original(m, frame, "mask")
    panels = 3 if ground_truth is not None else 2
    fig, axes = plt.subplots(1, panels, figsize=(4.2 * panels, 2.9),
                             gridspec_kw={"width_ratios": [1.6, 1, 1.6][:panels]})
    gmm_figure(soft[valid], info.get("threshold"), seed, chosen=tau, ax=axes[0], title="M̂ values")
    mask = threshold_mask(soft, valid, tau)
    score = iou(to_image(mask), ground_truth) if ground_truth is not None else None
    show_mask(axes[1], mask), axes[1].axis("off")
    axes[1].set_title(f"mask at τ = {tau:.3f}" + (f"\nIoU {score:.3f}" if score is not None else ""),
                      fontsize=8)
    if ground_truth is not None:
        taus = np.linspace(0.02, 0.98, 49)
        axes[2].plot(taus, [iou(to_image(threshold_mask(soft, valid, x)), ground_truth) for x in taus])
        if info.get("threshold") is not None:
            axes[2].axvline(info["threshold"], color="tab:red", lw=2, label="GMM midpoint")
        axes[2].axvline(tau, color="k", ls="--", lw=1.5, label="chosen")
        axes[2].set_xlabel("τ"), axes[2].set_ylabel("IoU vs ground truth"), axes[2].legend(fontsize=7)
        axes[2].grid(alpha=0.3)
    fig.tight_layout()
    return fig, score


def threshold_explorer(soft, valid, info: dict, frame, ground_truth=None, interactive: bool = True,
                       seed: int = 0):
    """A FloatSlider over τ (starting at the GMM midpoint) redrawing `threshold_figure`; headless
    the figure at the midpoint. Prints the IoU at the chosen τ when ground truth exists."""
    tau0 = info.get("threshold") or 0.5
    if not use_widgets(interactive):
        fig, score = threshold_figure(soft, valid, tau0, info, frame, ground_truth, seed)
        if score is not None:
            print(f"IoU vs ground truth at the GMM midpoint τ = {tau0:.3f}: {score:.3f}")
        return fig
    import ipywidgets as W

    tau = W.FloatSlider(value=round(tau0, 3), min=0.0, max=1.0, step=0.005, description="threshold τ",
                        continuous_update=False, readout_format=".3f",
                        style={"description_width": "110px"}, layout=W.Layout(width="520px"))

    def draw():
        fig, score = threshold_figure(soft, valid, tau.value, info, frame, ground_truth, seed)
        if score is not None:
            print(f"IoU at τ = {tau.value:.3f}: {score:.3f} (midpoint τ = {tau0:.3f})")
        return fig

    _show_widget([tau], draw)
    return None


# ----------------------------------------------------------------------------- refinement
REFINEMENT_COLUMNS = ["image", "ground truth", "M_pre", "background", "difference", "M", "M_crop"]


def refinement_figure(row: dict):
    """Before/after refinement of one image: image, ground truth, M_pre, x̂, |x − x̂|, M, M_crop."""
    from fgbg_utils.views.plots import image_rows

    fig = image_rows([row], [c for c in REFINEMENT_COLUMNS if c in row],
                     {"background": "x̂ (object removed)", "difference": "|x − x̂|"}, size=1.8)
    return fig


def refinement_explorer(cfg, image_ids: list[str], interactive: bool = True):
    """Image dropdown over stage 04's outputs; headless the first image."""
    from fgbg_utils.views.finetune_views import refinement_row

    if not use_widgets(interactive):
        return refinement_figure(refinement_row(cfg, image_ids[0]))
    import ipywidgets as W

    image = W.Dropdown(options=image_ids, description="image")
    _show_widget([image], lambda: refinement_figure(refinement_row(cfg, image.value)))
    return None


# ----------------------------------------------------------------------------- synthetic pairs
def synthetic_explorer(cfg, interactive: bool = True, n: int = 6):
    """A slider over the synthetic pairs (D', D'_m, D'_f, D'_b); headless the first n."""
    from fgbg_utils.views.evaluation_views import synthetic_ids, synthetic_rows

    ids = synthetic_ids(cfg)
    if not ids:
        print("no synthetic pairs in this run folder (run notebook 05)")
        return None
    if not use_widgets(interactive):
        return synthetic_rows(cfg, n)
    pair = _slider(ids, "synthetic pair")
    _show_widget([pair], lambda: synthetic_rows(cfg, ids=[ids[pair.value]], size=2.2))
    return None
