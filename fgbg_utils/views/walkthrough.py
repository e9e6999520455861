"""One image through the method, in memory: the helpers and figures of the notebooks' walkthrough
cells (a fixed toy image, the shipped toy model, no run folder)."""
from __future__ import annotations

import contextlib
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.patches import Rectangle

from fgbg_utils.core.frame import canvas_to_original

WALKTHROUGH_SEED = 1  # toy.generate_arrays(…, seed=1)[0]: a magenta square on a textured background


def toy_example(index: int = 0, seed: int = WALKTHROUGH_SEED, size: int = 64):
    """(image HxWx3 uint8, ground truth HxW bool, caption) of a fixed toy image made in memory."""
    from fgbg_utils.data import toy

    images, masks, captions, _ = toy.generate_arrays(index + 1, seed=seed, size=size)
    return images[index], masks[index], captions[index]


@contextlib.contextmanager
def quiet_diffusers():
    """Hide diffusers' load-time notices (e.g. the float32 casting note) while loading."""
    import diffusers.utils.logging as dlog

    level = dlog.get_verbosity()
    dlog.set_verbosity_error()
    try:
        yield
    finally:
        dlog.set_verbosity(level)


def load_pipeline(cfg, finetuned: str | Path | None = None):
    """FgBgPipeline of the run's pretrained model (cfg.model) on the CPU unless cfg.device says
    otherwise; `finetuned`: a stage-03 folder holding m'."""
    from fgbg_utils import FgBgPipeline

    with quiet_diffusers():
        return FgBgPipeline.from_pretrained(cfg.model.path, cfg.model.revision, device=cfg.device,
                                           dtype=cfg.dtype, finetuned=finetuned, config=cfg.model.config,
                                           max_sequence_length=cfg.model.max_sequence_length)


def finetuned_folder(cfg) -> Path | None:
    """The run's stage-03 folder when it holds a finished m' (else None)."""
    from fgbg_utils.runs.notebook import stage_complete

    folder = Path(cfg.run_dir) / "03_finetuning"
    return folder if stage_complete(cfg.run_dir, "03") else None


# ----------------------------------------------------------------------------- figures
def show_mask(ax, mask: np.ndarray):
    """A mask on `ax` in gray with a fixed scale, 0 black and 1 white: an all-True mask is white,
    an empty one black (imshow's default scale would draw both black)."""
    return ax.imshow(np.asarray(mask, np.float32), cmap="gray", vmin=0, vmax=1, interpolation="nearest")


def _to_image_size(soft: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Nearest upsampling of a latent-grid map to an image of `shape` (square canvas assumed)."""
    f = shape[0] // soft.shape[0]
    return np.repeat(np.repeat(soft, f, 0), f, 1) if f > 1 else soft


def overlay(ax, image: np.ndarray, soft: np.ndarray, title: str = "", alpha: float = 0.6,
            vmin: float | None = 0, vmax: float | None = 1):
    """The image with a soft map over it (viridis) on `ax`; returns the map's artist (colour bar)."""
    ax.imshow(image, interpolation="nearest")
    art = ax.imshow(_to_image_size(np.asarray(soft, np.float32), image.shape[:2]), cmap="viridis",
                    alpha=alpha, vmin=vmin, vmax=vmax, interpolation="nearest")
    ax.set_xticks([]), ax.set_yticks([])
    ax.set_title(title, fontsize=8)
    return art


def image_and_maps(image: np.ndarray, maps: dict[str, np.ndarray], ground_truth=None,
                   scaled: bool = False, size: float = 2.2):
    """The image (and ground truth), then each map overlaid on it with its own colour bar.
    `scaled`: colour range from each map's own min/max (raw attention) instead of [0, 1]."""
    panels = 1 + (ground_truth is not None) + len(maps)
    fig, axes = plt.subplots(1, panels, figsize=(size * panels + 0.4 * len(maps), size))
    axes = np.atleast_1d(axes)
    axes[0].imshow(image), axes[0].set_title("image", fontsize=8), axes[0].axis("off")
    k = 1
    if ground_truth is not None:
        show_mask(axes[1], ground_truth), axes[1].set_title("ground truth", fontsize=8)
        axes[1].axis("off")
        k = 2
    for ax, (title, m) in zip(axes[k:], maps.items()):
        lo, hi = (float(m.min()), float(m.max())) if scaled else (0, 1)
        art = overlay(ax, image, m, title, vmin=lo, vmax=hi)
        fig.colorbar(art, ax=ax, fraction=0.046, pad=0.04).ax.tick_params(labelsize=6)
    fig.tight_layout()
    return fig


def gmm_components(values: np.ndarray, seed: int = 0):
    """The 2-component GMM of core.binarize (same data, same seed) as (weights, means, stds),
    sorted by mean: what the histogram figure draws."""
    from sklearn.mixture import GaussianMixture

    x = np.asarray(values, np.float64).reshape(-1, 1)
    g = GaussianMixture(n_components=2, random_state=seed).fit(x)
    order = np.argsort(g.means_.ravel())
    return (g.weights_[order], g.means_.ravel()[order], np.sqrt(g.covariances_.ravel()[order]))


def gmm_figure(values: np.ndarray, threshold: float | None, seed: int = 0, chosen: float | None = None,
               title: str = "values, the two fitted Gaussians and the midpoint τ", ax=None):
    """Histogram (density) of the values with the two weighted Gaussians of the GMM, their means
    and the midpoint threshold τ; `chosen`: another threshold to mark (the explorer's slider)."""
    fig = None
    if ax is None:
        fig, ax = plt.subplots(figsize=(5.5, 2.8))
    v = np.asarray(values, np.float64).ravel()
    ax.hist(v, bins=40, density=True, color="0.75")
    if threshold is not None:
        w, mu, sd = gmm_components(v, seed)
        xs = np.linspace(v.min(), v.max(), 300)
        for k, c in zip(range(2), ("tab:blue", "tab:orange")):
            pdf = w[k] * np.exp(-0.5 * ((xs - mu[k]) / sd[k]) ** 2) / (sd[k] * np.sqrt(2 * np.pi))
            ax.plot(xs, pdf, color=c, lw=1.5, label=f"μ{k + 1} = {mu[k]:.3f}")
            ax.axvline(mu[k], color=c, ls=":", lw=1)
        ax.axvline(threshold, color="tab:red", lw=2, label=f"midpoint τ = {threshold:.3f}")
    if chosen is not None:
        ax.axvline(chosen, color="k", ls="--", lw=1.5, label=f"chosen τ = {chosen:.3f}")
    ax.set_xlabel("value"), ax.set_ylabel("density"), ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    if fig is not None:
        fig.tight_layout()
    return fig if fig is not None else ax.figure


def masks_figure(masks: dict[str, np.ndarray], image: np.ndarray | None = None, size: float = 2.0):
    """Bool masks side by side (optionally after the image), titled with their pixel counts."""
    panels = [("image", image)] if image is not None else []
    panels += [(f"{k} ({int(np.sum(m))} px)", m) for k, m in masks.items()]
    fig, axes = plt.subplots(1, len(panels), figsize=(size * len(panels), size))
    for ax, (title, a) in zip(np.atleast_1d(axes), panels):
        ax.imshow(a, interpolation="nearest") if a.ndim == 3 else show_mask(ax, a)
        ax.set_title(title, fontsize=8), ax.axis("off")
    fig.tight_layout()
    return fig


def rectangles_figure(image: np.ndarray, m_pre: np.ndarray, draws: list[tuple], factor: int):
    """The canvas with M_pre (red tint) and the sampler's accepted boxes (green, latent-grid boxes
    scaled by the VAE factor). `draws`: (mask, kind, box) as core.rectangles.sample_rectangle returns."""
    fig, axes = plt.subplots(1, 2, figsize=(6, 3))
    up = np.repeat(np.repeat(m_pre, factor, 0), factor, 1)
    tinted = image.astype(np.float32) / 255 if image.dtype == np.uint8 else image.copy()
    tinted[up] = 0.6 * tinted[up] + 0.4 * np.array([1.0, 0, 0])
    axes[0].imshow(tinted), axes[0].set_title("M_pre (red) and sampled boxes", fontsize=8)
    kinds = {}
    for k, (_, kind, box) in enumerate(draws):
        kinds[kind] = kinds.get(kind, 0) + 1
        if box is None:
            continue
        top, left, bottom, right = box
        axes[0].add_patch(Rectangle((left * factor - 0.5, top * factor - 0.5), (right - left + 1) * factor,
                                    (bottom - top + 1) * factor, fill=False, ec=plt.cm.tab10(k % 10), lw=1.2))
    show_mask(axes[1], draws[0][0])
    axes[1].set_title(f"first training mask ({draws[0][1]}): box ∧ ¬M_pre", fontsize=8)
    for ax in axes:
        ax.axis("off")
    fig.suptitle(", ".join(f"{n} × {k}" for k, n in kinds.items()), fontsize=8)
    fig.tight_layout()
    return fig


def strip_figure(images, labels: list[str], title: str = "", size: float = 1.6):
    """One row of images (RGB or maps) with a label under each."""
    fig, axes = plt.subplots(1, len(images), figsize=(size * len(images), size + 0.4))
    for ax, im, lab in zip(np.atleast_1d(axes), images, labels):
        ax.imshow(im, cmap=None if np.ndim(im) == 3 else "viridis", interpolation="nearest")
        ax.set_xticks([]), ax.set_yticks([]), ax.set_xlabel(lab, fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


# ----------------------------------------------------------------------------- stage 04
class _StepRecorder:
    """Wraps a diffusers inpainting pipeline so that each call also keeps the latents after the
    DDIM steps in `keep` (via `callback_on_step_end`); everything else is passed through."""

    def __init__(self, pipe, keep):
        self.pipe, self.keep, self.latents = pipe, set(keep), {}

    def __call__(self, **kwargs):
        def grab(pipe, i, t, kw):
            if i + 1 in self.keep:
                self.latents[i + 1] = kw["latents"].detach().float().cpu().clone()
            return kw

        return self.pipe(**kwargs, callback_on_step_end=grab, callback_on_step_end_tensor_inputs=["latents"])


@torch.no_grad()
def inpaint_trace(tuned, canvas: torch.Tensor, m_pre: np.ndarray, prompt_b: str, seed: int,
                  steps: int = 50, show: int = 4):
    """x̂ = m'(z̃₀, y_b) with core.inpaint.inpaint_background, keeping the decoded latents after
    `show` evenly spaced DDIM steps. Returns (x̂ (R, R, 3) in [0, 1], {step: decoded (R, R, 3)})."""
    from fgbg_utils.core.inpaint import inpaint_background, make_inpaint_pipeline
    from fgbg_utils.core.synthesis import decode_latents

    keep = sorted({max(1, round(steps * k / show)) for k in range(1, show + 1)})
    if getattr(tuned, "family", "sd") in ("sd3", "flux"):  # the flow loop of core/flow.py
        from fgbg_utils.core import flow
        kept = {}
        grab = lambda i, z: kept.__setitem__(i, z.clone()) if i in keep else None  # noqa: E731
        x_hat = flow.inpaint_background(tuned, canvas[None], m_pre[None], prompt_b, steps=steps,
                                        seeds=[seed], on_step=grab)[0]
        return x_hat, {k: decode_latents(tuned, z)[0] for k, z in sorted(kept.items())}
    rec = _StepRecorder(make_inpaint_pipeline(tuned), keep)
    x_hat = inpaint_background(tuned, canvas[None], m_pre[None], prompt_b, steps=steps, seeds=[seed],
                               batch_size=1, pipe=rec)[0]
    return x_hat, {k: decode_latents(tuned, z.to(tuned.device))[0] for k, z in sorted(rec.latents.items())}


def decode(ldm, z: torch.Tensor) -> np.ndarray:
    """D(z/κ) of one latent (1, C, h, h) as an (R, R, 3) image in [0, 1]."""
    from fgbg_utils.core.synthesis import decode_latents

    return decode_latents(ldm, z)[0]


def back_to_image(arr: np.ndarray, frame, kind: str = "mask") -> np.ndarray:
    """A canvas (or latent-grid) array at the image's original size."""
    return canvas_to_original(arr, frame, kind)
