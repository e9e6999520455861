# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 04 · Refinement: paint the object away and keep what changed
#
# With the fine-tuned $m'$, the region of $M_{pre}$ is repainted as background (Eq. 6, latent
# blending: the known region $\neg M_{pre}$ is re-noised from $z_0$ at every step),
#
# $$\tilde z_0 = z_0\odot(1-M_{pre}) + z\odot M_{pre},\qquad \hat x = m'(\tilde z_0, y_b),$$
#
# and the refined mask keeps only what changed (Eq. 5):
#
# $$M = M_{pre,\uparrow}\ \wedge\ g\big(|x - \hat x|\big),$$
#
# with $g$ the same GMM + orphan filter as notebook 02, on the mean RGB difference. $x$ is the VAE
# round trip of the image, so reconstruction error does not leak into the difference. $M$ can only
# shrink $M_{pre}$. **Baseline $M_{crop}$**: instead of $m'$, mirror the largest background strip next
# to $M_{pre}$'s box over the object (the paper's "simple inpainting").
#
# Inpainting uses diffusers' `StableDiffusionInpaintPipeline` with the 4-channel fine-tuned UNet
# (DDIM, 50 steps, η = 0); it blends after each step rather than before each UNet call, a small
# documented deviation from the official loop.

# %% tags=["parameters"]
# Parameters: papermill injects values after this cell. Any top-level key of the params file can
# be passed too, with -p KEY VALUE or -f FILE.yaml (e.g. -p T0 30, -p dataset '{n_train: 8}');
# they are merged over params_file, like the CLI's --set.
params_file = "params/toy.yaml"  # the YAML that drives this notebook (relative: project root)
run_dir = "runs/toy"             # run folder (relative: project root; the CLI passes its --out)
force = False                    # recompute this stage's finished outputs
interactive = True               # widgets when a browser is attached

# %%
# %matplotlib inline
from fgbg_utils.runs.notebook import notebook_config
from fgbg_utils.views import explorers, gallery, plots
from fgbg_utils.views import walkthrough as wt
cfg = notebook_config(globals(), stage="04", missing="warn")  # the walkthrough needs no run

# %% [markdown]
# ## Walkthrough: one image, in memory
#
# The fixed toy image and its $M_{pre}$, and the fine-tuned $m'$ of this run folder
# (`RUN/03_finetuning`). Without it (a fresh clone), the walkthrough says so and skips.

# %%
import numpy as np
import torch
from fgbg_utils.core.pipeline import to_uint8
from fgbg_utils.runs.notebook import relative
image, gt, caption = wt.toy_example()
tuned_dir = wt.finetuned_folder(cfg)
ready = tuned_dir is not None
if ready:
    pipe = wt.load_pipeline(cfg, tuned_dir)
    maps = pipe.attention_maps(image, cfg.object, cfg.prompt, parts=cfg.parts, T0=cfg.T0, seed=cfg.seed,
                               ids=["walkthrough"])
    m_pre = pipe.preliminary_masks(maps).masks[0]
    x, frames = pipe.canvases(image)
else:
    print(f"no fine-tuned model m' in {relative(cfg.run_dir)}/03_finetuning: run notebook 03 first to see the "
          f"object painted away; the walkthrough cells are skipped.")

# %% [markdown]
# **What stage 04 runs on this image.** `refine_images` is the stage's own call: `FgBgPipeline.refine`
# with every `refinement.*` parameter of the params file. It paints $M_{pre}$ over with $y_b$ and, when
# `refinement.guidance_scale` $w > 1$, with $y_f$ as the negative prompt: in the one guidance
# convention of notebook 00b, $\hat\varepsilon = \varepsilon(y_b) + s\,(\varepsilon(y_f) - \varepsilon(y_b))$ with
# $s = 1 - w$ (a negative $s$ steers away from the object).

# %%
if ready:
    from fgbg_utils.stages.refinement import refine_images
    from fgbg_utils.views.primer import concept_scale
    w = cfg.refinement.guidance_scale
    s = concept_scale(w)
    negative = cfg.resolved_prompt if w > 1 else None
    print(f"refinement.guidance_scale w = {w:g}, negative prompt {negative!r}: "
          f"s = 1 − w = {s:g}; {cfg.refinement.steps} DDIM steps, η = 0")
    stage = refine_images(cfg, pipe, [image], ["walkthrough"], [m_pre])
    x_hat = stage.backgrounds[0]

# %% [markdown]
# **The loop inside it**, written out: DDIM from noise $z_T$ with the concept-guided $\hat\varepsilon$; after
# every step the known region is put back, $z \leftarrow z_0^{(t')}\odot(1-M_{pre}) + z\odot M_{pre}$
# ($z_0^{(t')}$: $z_0$ noised to the next level $t'$ with the one noise draw $z_T$; the clean $z_0$ after
# the last step), so only $M_{pre}$ is repainted. Checked against the stage's $\hat x$:

# %%
if ready:
    from diffusers import DDIMScheduler
    from fgbg_utils.core import models
    from fgbg_utils.core.seeds import derive_seed
    m_ = pipe.tuned                                                    # m'
    sched = DDIMScheduler.from_config(m_.scheduler.config)
    sched.set_timesteps(cfg.refinement.steps)
    ts = sched.timesteps
    z0 = models.encode_images(m_, x, "mode")                           # z_0 = κ·E(x)
    keep = torch.from_numpy(~m_pre).float()[None, None]                # 1 − M_pre on the latent grid
    noise = torch.randn(z0.shape, generator=torch.Generator().manual_seed(derive_seed(cfg.seed, "04-inpaint", "walkthrough")))
    c = torch.cat([models.encode_prompt(m_, cfg.background_prompt), models.encode_prompt(m_, cfg.resolved_prompt)])
    z, trace = noise * sched.init_noise_sigma, {}
    for i, t in enumerate(ts):
        e_b, e_f = m_.unet(torch.cat([z, z]), t, encoder_hidden_states=c).sample.chunk(2)
        z = sched.step(e_b + s * (e_f - e_b), t, z, eta=0.0).prev_sample   # ε̂ = ε(y_b) + s(ε(y_f) − ε(y_b))
        known = sched.add_noise(z0, noise, ts[i + 1:i + 2]) if i + 1 < len(ts) else z0
        z = keep * known + (1 - keep) * z                                  # keep ¬M_pre
        if (i + 1) % max(1, len(ts) // 4) == 0:
            trace[i + 1] = wt.decode(m_, z)
    ours = wt.decode(m_, z)
    assert np.abs(ours - x_hat).max() < 1e-4, np.abs(ours - x_hat).max()
    print(f"the loop gives the stage's x̂: max |Δ| = {np.abs(ours - x_hat).max():.1e} (of 1)")
    fig = wt.strip_figure([to_uint8(x[0]), *trace.values(), x_hat], ["x", *[f"after step {k}" for k in trace], "x̂"])

# %% [markdown]
# **The difference map** against the VAE round trip of $x$ (so reconstruction error does not count),
# $d = \frac13\sum_{c}|x_c - \hat x_c|$, and its GMM midpoint, as in notebook 02:

# %%
if ready:
    from fgbg_utils.core.binarize import binarize
    from fgbg_utils.core.inpaint import vae_roundtrip
    from fgbg_utils.core.refine import difference_map, refine_mask, upsample_mask
    valid = frames[0].valid(1)
    d = difference_map(vae_roundtrip(pipe.ldm, x)[0], x_hat) * valid   # d = mean_RGB |x − x̂|
    g, info = binarize(d, valid, cfg.refinement.gmm_seed, cfg.refinement.orphan_filter)
    fig = wt.gmm_figure(d[valid], info["threshold"], cfg.refinement.gmm_seed, title="d and its GMM")

# %% [markdown]
# **The AND** (Eq. 5): $M = M_{pre,\uparrow}\wedge g(d)$ — refinement can only shrink $M_{pre}$.

# %%
if ready:
    up = upsample_mask(m_pre, pipe.ldm.vae_factor) & valid
    m, _ = refine_mask(up, d, valid, cfg.refinement.gmm_seed, cfg.refinement.orphan_filter)
    assert (m == (up & g)).all() and (m == stage.masks[0]).all()   # the stage's M, step by step
    fig = wt.masks_figure({"M_pre,↑": up, "g(d)": g, "M = M_pre,↑ ∧ g(d)": m}, image=to_uint8(x[0]))
    iou = {k: explorers.iou(wt.back_to_image(v, frames[0]), gt) for k, v in (("M_pre", up), ("M", m))}
    print("IoU vs ground truth:", {k: round(v, 3) for k, v in iou.items()})

# %% [markdown]
# ## Run stage 04 over the dataset

# %%
# NBVAL_SKIP
from fgbg_utils.stages import refinement as stage_refinement
with gallery.reuse_note(cfg, "04"):
    result = stage_refinement.run(cfg, force=force)

# %% [markdown]
# ## Metrics on the evaluation split
#
# In percent, beside the paper's CUB numbers (Table 2, IoU: $M_{pre}$ 29.0 → $M$ 63.6; $M_{crop}$ 30.7);
# the sentences under the table are computed from its numbers.

# %%
# NBVAL_SKIP
from IPython.display import Markdown, display
from fgbg_utils.views.evaluation_views import percent_table, refinement_verdicts
display(Markdown(percent_table(cfg.run_dir, stages=("02", "04"))))
display(Markdown(refinement_verdicts(cfg.run_dir)))

# %% [markdown]
# ## Best and worst images: original, $M_{pre}$, inpainted background, difference, $M$

# %%
# NBVAL_SKIP
from fgbg_utils.views.finetune_views import refinement_rows
rows = refinement_rows(cfg, best=3, worst=3)
if not rows:
    gallery.no_ground_truth("images are ranked by the IoU of M")
else:
    fig = plots.image_rows(rows, ["image", "ground truth", "M_pre", "background", "difference", "M", "M_crop"])

# %% [markdown]
# ## Explore: before and after refinement, image by image

# %%
# NBVAL_SKIP
ids = gallery.pick_ids(cfg, 10**6, cfg.evaluation.split)
fig = explorers.refinement_explorer(cfg, ids, interactive)
