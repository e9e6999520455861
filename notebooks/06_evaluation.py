# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 06 · Evaluation: the paper's Table 2 on your data
#
# The purpose of the method is a segmentation model trained **without mask labels**. A from-scratch
# U-Net (METHOD §2.6: DoubleConv blocks, max-pool downs, transposed-conv ups with skips; BCE on the
# soft label, Adam, a fixed number of steps, the last weights; joint crop + flip augmentation) is
# trained on
#
# * $(D, M_{pre})$ — the preliminary masks,
# * $D_s = (D, M)$ — the refined masks,
# * $D_s \cup D'_s$ — plus the synthetic pairs of notebook 05,
# * and, for reference only, the ground truth (**supervised**, an upper bound).
#
# Each is scored on the held-out split beside the direct masks $M_{pre}$, $M_{crop}$ and $M$: pooled
# pixel ACC, foreground IoU and mIoU $=(IoU_{fg}+IoU_{bg})/2$ as in the paper, per-image mean IoU and
# Dice (another protocol, not comparable to the pooled numbers), and the IoU of the tight bounding boxes.
#
# The toy default is a small U-Net (width 16, depth 3, 64 px, 300 steps, cosine learning rate); the
# paper's setting (width 64, depth 4, 128 px, 12,000 steps, batch 32, constant lr) is the default of
# the real-data parameter files. The outputs stored in this notebook come from the cheap settings of
# its parameters cell (16 + 16 images, 150 steps of a width-8 U-Net); the README has the table of the
# full default run (`make demo`).

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
cfg = notebook_config(globals(), stage="06")
from fgbg_utils.views import evaluation_views as views
from fgbg_utils.stages import evaluation as stage_evaluation

# %%
# NBVAL_IGNORE_OUTPUT
result = stage_evaluation.run(cfg, force=force, progress=False)

# %% [markdown]
# ## Table 2
#
# Rows in the paper's order, with the paper's CUB IoU (%) beside ours (a fraction). The ordering the
# method should keep: $M_{pre} < M <$ U-Net$(D_s) \le$ U-Net$(D_s \cup D'_s) <$ supervised.

# %%
# NBVAL_IGNORE_OUTPUT
print(views.table(cfg))
print("\nordering:", result.get("ordering"))

# %%
# NBVAL_CHECK_OUTPUT
print(sorted(result["rows"]), result["n_test_scored"], "test images scored")

# %% [markdown]
# ## Training curves

# %%
fig = views.training_curves(cfg)

# %% [markdown]
# ## Best and worst test images of U-Net$(D_s \cup D'_s)$

# %%
row = next((r for r in ("unet_D_s_plus_synth", "unet_D_s", "M") if r in result["rows"]), None)
if row:
    fig = views.best_worst(cfg, row, best=3, worst=3)
else:
    from fgbg_utils.views.gallery import no_ground_truth
    no_ground_truth(result.get("note", "no rows were scored"))

# %% [markdown]
# ## Explore: every row's mask on one test image (interactive in JupyterLab)

# %%
views.prediction_explorer(cfg, interactive=interactive)

# %% [markdown]
# ## Are the background samples object-free?
#
# The supervised U-Net, trained on ground truth, serves as an independent object detector: a sample
# counts as object-free when it predicts less than `segmentation.detector_area` of the image as
# object. `real_test_detected` is its detection rate on real test images (all of which contain the
# object). Samples from notebook 03 ($m$ and $m'$ with $y_f$, $y_b$, and $y_b$ contrasted against
# $y_f$) and the pure backgrounds of notebook 05.

# %%
# NBVAL_IGNORE_OUTPUT
check = result.get("object_free_check", {})
print({k: round(v, 3) if isinstance(v, float) else v for k, v in check.items() if not k.startswith("n_")})
