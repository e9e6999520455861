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
# $$\tau = \tfrac12(\mu_1 + \mu_2),\qquad M = [\hat M > \tau],$$
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
from fgbg_utils.views import gallery, plots
cfg = notebook_config(globals(), stage="02")

# %%
# NBVAL_IGNORE_OUTPUT
from fgbg_utils.stages import binarization as stage_binarization
result = stage_binarization.run(cfg, force=force)

# %% [markdown]
# ## The GMM on one image

# %%
from fgbg_utils.stages.attention_maps import load_map
from fgbg_utils.io import read_json
ids = gallery.pick_ids(cfg, cfg["evaluation"]["figure_images"], cfg["evaluation"]["split"])
m = load_map(cfg, ids[0])
gmm = read_json(f"{cfg['run_dir']}/02_binarization/gmm.json")
factor = gallery.summary01(cfg)["vae_factor"]
fig = plots.gmm_histogram(m["mhat"][m["frame"].valid(factor)], gmm[ids[0]], f"M̂ of {ids[0]}")

# %% [markdown]
# ## Image, ground truth, $\hat M$ and $M_{pre}$

# %%
records = gallery.records_by_id(cfg)
rows = [gallery.binarization_row(cfg, i, records) for i in ids]
fig = plots.image_rows(rows, ["image", "ground truth", "M̂", "M_pre"])

# %% [markdown]
# ## Metrics on the evaluation split
#
# Rows: $M_{pre}$ and the two baselines. Paper, CUB (Table 2): $M_{pre}$ ACC 83.5, IoU 29.0,
# mIoU 55.7; AUC-ROC of $\hat M$ 97.1.

# %%
# NBVAL_CHECK_OUTPUT
from fgbg_utils.runs.runner import metrics_table
print("images scored:", result.get("n_images"), "split:", result["split"])
print(metrics_table(cfg["run_dir"], stages=("02",)))

# %% [markdown]
# ## The $T_0$ sweep (the paper's Fig. 3)
#
# Cumulative means of the per-level maps give $\hat M$ for every $T_0$ from one run: the AUC-ROC when
# averaging the $T_0$ lowest levels. In the paper it rises up to $T_0 \approx 40$, then falls.

# %%
if "t0_sweep" in result:
    fig = plots.t0_sweep(result["t0_sweep"]["T0"], result["t0_sweep"]["auc_roc"], cfg["T0"])
elif not gallery.ground_truth_ids(cfg, records, cfg["evaluation"]["split"]):
    gallery.no_ground_truth("the T0 sweep scores M̂ against them")
else:
    print("per-timestep maps were not kept (attention.sweep: false)")

# %% [markdown]
# ## Best and worst images
#
# Sorted by the foreground IoU of $M_{pre}$; the failures show where the GMM or the maps go wrong
# (textured backgrounds that pull attention, objects at the border).

# %%
ious = gallery.per_image_iou(cfg, gallery.pick_ids(cfg, 10**6, cfg["evaluation"]["split"]), records)
order = sorted(ious, key=ious.get)
pick = order[-3:][::-1] + order[:3]
rows = [{**gallery.binarization_row(cfg, i, records), "label": f"{i} IoU {ious[i]:.2f}"} for i in pick]
if rows:
    fig = plots.image_rows(rows, ["image", "ground truth", "M̂", "M_pre"])
else:
    gallery.no_ground_truth("images are ranked by the IoU of M_pre")
