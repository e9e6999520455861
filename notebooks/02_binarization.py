# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 02 · Binarization: from $\hat M$ to preliminary masks $M_{pre}$
#
# $\hat M$ is soft. Per image, a **two-component Gaussian mixture** is fitted to its values (valid
# pixels only, a fixed `random_state`), and the threshold is the **midpoint of the two means**,
#
# $$\tau = \tfrac12(\mu_1 + \mu_2),\qquad M_\tau = [\hat M > \tau],$$
#
# not the GMM's `predict()`: weights and variances play no part. Then an **orphan filter** removes
# isolated pixels: the 3×3 box mean of the binary map, re-thresholded at 0.5 (a majority of ≥ 5 of 9),
# on interior pixels. The result $M_{pre}$ lives on the latent grid and, as the paper intends,
# over-estimates the object; a constant map (a degenerate GMM) gives an empty mask with a warning.
#
# With ground truth, the notebook scores $M_{pre}$ like the paper (pooled pixel accuracy, foreground
# IoU and mIoU), adds per-image mean IoU and Dice (a different protocol, not comparable to pooled
# numbers), the pixel AUC-ROC of $\hat M$, and two baselines that use no model at all: an
# all-foreground mask and a centred disc of the mean object area.

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
cfg = notebook_config(globals(), stage="02", missing="warn")  # the walkthrough needs no run

# %% [markdown]
# ## Walkthrough: one image, in memory
#
# The fixed toy image of notebook 01 and its $\hat M$ from `FgBgPipeline.attention_maps`.

# %%
image, gt, caption = wt.toy_example()
pipe = wt.load_pipeline(cfg)
maps = pipe.attention_maps(image, cfg.object, cfg.prompt, parts=cfg.parts, T0=cfg.T0, seed=cfg.seed,
                           ids=["walkthrough"])
valid = maps.valid(0)                         # the non-padding region of the latent grid
mhat = maps.mhat[0]

# %% [markdown]
# **The GMM and its midpoint.** A two-component mixture $p(v)=\sum_{k=1}^2 \pi_k\,\mathcal N(v;\mu_k,\sigma_k^2)$
# is fitted to the valid values of $\hat M$; the threshold is $\tau = \tfrac12(\mu_1+\mu_2)$.

# %%
# NBVAL_CHECK_OUTPUT
from fgbg_utils.core.binarize import gmm_threshold, orphan_filter
tau, (mu1, mu2) = gmm_threshold(mhat[valid], seed=cfg.binarization.gmm_seed)
print(f"μ1 = {mu1:.3f}, μ2 = {mu2:.3f}, τ = {tau:.3f}")
fig = wt.gmm_figure(mhat[valid], tau, cfg.binarization.gmm_seed)

# %% [markdown]
# **The orphan filter.** $M_\tau = [\hat M > \tau]$, then each interior pixel takes the majority of its
# 3×3 neighbourhood, $M_{pre}(p) = \big[\sum_{q\in N_3(p)} M_\tau(q) \ge 5\big]$.

# %%
# NBVAL_CHECK_OUTPUT
before = (mhat > tau) & valid
after = orphan_filter(before) & valid        # = pipe.preliminary_masks(maps).masks[0]
assert (after == pipe.preliminary_masks(maps).masks[0]).all()
print("pixels before / after the orphan filter:", int(before.sum()), "/", int(after.sum()))
fig = wt.masks_figure({"[M̂ > τ]": before, "M_pre (orphan filter)": after})

# %% [markdown]
# **Why the midpoint?** Drag the threshold: the mask, and its IoU against the toy image's ground
# truth, change; the GMM midpoint (red) needs no labels and sits near the best IoU.

# %%
fig = explorers.threshold_explorer(mhat, valid, {"threshold": tau}, maps.frames[0], gt, interactive,
                                   cfg.binarization.gmm_seed)

# %% [markdown]
# ## Run stage 02 over the dataset

# %%
# NBVAL_SKIP
from fgbg_utils.stages import binarization as stage_binarization
with gallery.reuse_note(cfg, "02"):
    result = stage_binarization.run(cfg, force=force)

# %% [markdown]
# ## The GMM on one image of the dataset, with a draggable threshold

# %%
# NBVAL_SKIP
from fgbg_utils.io import read_json
from fgbg_utils.stages.attention_maps import load_map
records = gallery.records_by_id(cfg)
ids = gallery.pick_ids(cfg, cfg.evaluation.figure_images, cfg.evaluation.split)
m = load_map(cfg, ids[0])
gmm = read_json(f"{cfg.run_dir}/02_binarization/gmm.json")
valid0 = m["frame"].valid(gallery.summary01(cfg)["vae_factor"])
gt0 = gallery.attention_row(cfg, ids[0], records).get("ground truth")
if gt0 is None:
    gallery.no_ground_truth("the threshold explorer shows no IoU")
fig = explorers.threshold_explorer(m["mhat"], valid0, gmm[ids[0]], m["frame"], gt0, interactive,
                                   cfg.binarization.gmm_seed)

# %% [markdown]
# ## Image, ground truth, $\hat M$ and $M_{pre}$

# %%
# NBVAL_SKIP
rows = [gallery.binarization_row(cfg, i, records) for i in ids]
fig = plots.image_rows(rows, ["image", "ground truth", "M̂", "M_pre"])

# %% [markdown]
# ## Metrics on the evaluation split
#
# Rows: $M_{pre}$ and the two baselines, in percent. Paper, CUB (Table 2): $M_{pre}$ ACC 83.5, IoU 29.0,
# mIoU 55.7; AUC-ROC of $\hat M$ 97.1.

# %%
# NBVAL_SKIP
from IPython.display import Markdown, display
from fgbg_utils.views.evaluation_views import percent_table
print("images scored:", result.get("n_images"), "split:", result["split"])
display(Markdown(percent_table(cfg.run_dir, stages=("02",))))
if result.get("auc_roc") is not None:
    print(f"AUC-ROC of M̂: {100 * result['auc_roc']:.1f} % (paper, CUB: 97.1 %)")

# %% [markdown]
# ## The $T_0$ sweep (the paper's Fig. 3)
#
# Cumulative means of the per-level maps give $\hat M$ for every $T_0$ from one run: the AUC-ROC when
# averaging the $T_0$ lowest levels. In the paper it rises up to $T_0 \approx 40$, then falls.

# %%
# NBVAL_SKIP
if "t0_sweep" in result:
    fig = plots.t0_sweep(result["t0_sweep"]["T0"], result["t0_sweep"]["auc_roc"], cfg.T0)
elif not gallery.ground_truth_ids(cfg, records, cfg.evaluation.split):
    gallery.no_ground_truth("the T0 sweep scores M̂ against them")
else:
    print("per-timestep maps were not kept (attention.sweep: false)")

# %% [markdown]
# ## Best and worst images
#
# Sorted by the foreground IoU of $M_{pre}$; the failures show where the GMM or the maps go wrong
# (textured backgrounds that pull attention, objects at the border).

# %%
# NBVAL_SKIP
ious = gallery.per_image_iou(cfg, gallery.pick_ids(cfg, 10**6, cfg.evaluation.split), records)
order = sorted(ious, key=ious.get)
pick = order[-3:][::-1] + order[:3]
rows = [{**gallery.binarization_row(cfg, i, records), "label": f"{i} IoU {ious[i]:.2f}"} for i in pick]
if rows:
    fig = plots.image_rows(rows, ["image", "ground truth", "M̂", "M_pre"])
else:
    gallery.no_ground_truth("images are ranked by the IoU of M_pre")
